"""Secrets given to a training stage (hub_token, any *_token/*_key argument) are never written to disk."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import write_dataset

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_secretTOKENforTheTest0123456789"


@pytest.mark.subprocess
def test_hub_token_on_the_command_line_is_in_no_written_file(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", n_train=8)
    run_dir = tmp_path / "exp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_TOKEN"))}
    env.update(HOME=str(tmp_path), WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "-m", "train.sft", "--config", str(REPO / "recipes/smoke/sft.yaml"),
         "--model_name_or_path", tiny_model_dir, "--dataset_path", str(data), "--output_dir", str(run_dir / "sft"),
         "--max_steps", "2", "--save_steps", "1", "--report_to", "wandb", "--hub_token", TOKEN],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in written) and any(p.suffix == ".wandb" for p in written)
    leaks = [str(p.relative_to(tmp_path)) for p in written if TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    assert TOKEN not in proc.stdout + proc.stderr


def test_resolved_recipe_drops_secret_fields_and_keeps_tokenizer_tokens():
    from train.recipe import resolved_recipe

    @dataclasses.dataclass
    class Args:
        hub_token: str | None = None
        wandb_api_key: str | None = None
        pad_token: str | None = None
        learning_rate: float = 1e-4

    recipe = resolved_recipe(Args(hub_token=TOKEN, wandb_api_key=TOKEN, pad_token="<pad>", learning_rate=0.1))
    assert recipe == {"pad_token": "<pad>", "learning_rate": 0.1}
