"""One run folder, one owner: finished runs are never replaced, a second writer is refused, eval trusts only
adapters whose manifest vouches for them."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import wait_for, write_dataset

from train import dpo, sft
from train.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
SMOKE_SFT = str(REPO / "recipes/smoke/sft.yaml")
SMOKE_DPO = str(REPO / "recipes/smoke/dpo.yaml")


def run_stage(module, *argv):
    return module.main(*parse_recipe(module.make_parser(), list(argv)))


def sft_args(model, data, out, *extra):
    return ("--config", SMOKE_SFT, "--model_name_or_path", model, "--dataset_path", str(data),
            "--output_dir", str(out), *extra)


@pytest.fixture
def finished(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", n_train=16)
    out = tmp_path / "sft"
    run_stage(sft, *sft_args(tiny_model_dir, data, out))
    return data, out


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerun_of_a_finished_run_with_another_recipe_is_refused_and_loses_nothing(tiny_model_dir, finished):
    data, out = finished
    before = _snapshot(out)
    with pytest.raises(RuntimeError, match=r"(?s)finished sft run.*learning_rate.*new --output_dir"):
        run_stage(sft, *sft_args(tiny_model_dir, data, out, "--learning_rate", "5e-4"))
    assert _snapshot(out) == before


def test_rerun_of_a_finished_run_with_the_same_recipe_trains_nothing(tiny_model_dir, finished, capsys):
    data, out = finished
    before = _snapshot(out)
    assert run_stage(sft, *sft_args(tiny_model_dir, data, out)) == str(out)
    assert "already finished" in capsys.readouterr().out
    assert _snapshot(out) == before


@pytest.mark.subprocess
def test_second_writer_is_refused_while_the_first_runs(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", n_train=16)
    out = tmp_path / "sft"
    args = sft_args(tiny_model_dir, data, out, "--max_steps", "400")
    first = subprocess.Popen([sys.executable, "-m", "train.sft", *args], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (out / "checkpoint-2" / "trainer_state.json").exists(), 120), "no checkpoint"
        with pytest.raises(RuntimeError, match=r"in use by another run"):
            run_stage(sft, *args)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    # The killed owner's lock went with it: the folder is free again, and resuming still checks the recipe.
    with pytest.raises(RuntimeError, match=r"learning_rate"):
        run_stage(sft, *args, "--learning_rate", "5e-4")


def test_eval_refuses_an_adapter_its_manifest_does_not_vouch_for(tiny_model_dir, finished, tmp_path):
    from eval.variants import check_adapter_dir

    _, out = finished
    assert check_adapter_dir("sft", str(out), tiny_model_dir) == out
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert len(manifest["adapter_sha256"]) == 64

    swapped = tmp_path / "swapped"  # an adapter written after the manifest (a kill between the two)
    shutil.copytree(out, swapped)
    (swapped / "adapter_model.safetensors").write_bytes((out / "checkpoint-2" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="adapter_model.safetensors does not match"):
        check_adapter_dir("sft", str(swapped), tiny_model_dir)

    unfinished = tmp_path / "unfinished"  # killed before the manifest: checkpoints but no manifest
    shutil.copytree(out, unfinished)
    (unfinished / "training_manifest.json").unlink()
    with pytest.raises(ValueError, match="unfinished"):
        check_adapter_dir("sft", str(unfinished), tiny_model_dir)


def test_adapter_without_manifest_is_checked_against_its_config_base(tiny_model_dir, finished, tmp_path):
    from eval.variants import check_adapter_dir
    from train.tiny_model import build_tiny_model

    _, out = finished
    bare = tmp_path / "bare"  # a PEFT adapter from elsewhere: config and weights only
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(out / name, bare / name)
    assert check_adapter_dir("bare", str(bare), tiny_model_dir) == bare
    other_base = str(build_tiny_model(tmp_path / "other-tiny", seed=1))  # same shape, other weights
    with pytest.raises(ValueError, match=r"base_model_name_or_path"):
        check_adapter_dir("bare", str(bare), other_base)


def test_dpo_refuses_lora_shape_flags_that_differ_from_the_sft_adapter(tiny_model_dir, finished, tmp_path):
    data, out = finished
    args = ("--config", SMOKE_DPO, "--model_name_or_path", tiny_model_dir, "--dataset_path", str(data),
            "--sft_adapter", str(out), "--output_dir", str(tmp_path / "dpo"))
    with pytest.raises(ValueError, match=r"lora_r 32 has no effect.*r = 8"):
        run_stage(dpo, *args, "--lora_r", "32")


def test_publish_help_example_names_what_the_quickstart_writes():
    import re

    import yaml

    from train import publish

    example = publish.__doc__.split("\n\n")[1]
    recipes = {name: yaml.safe_load((REPO / f"recipes/quickstart/{name}.yaml").read_text()) for name in ("dpo", "eval")}
    adapter = re.search(r"--adapter (\S+)", example).group(1)
    report = re.search(r"--report (\S+)", example).group(1)
    assert adapter == recipes["dpo"]["output_dir"]
    assert report == f"{recipes['eval']['output_dir']}/report.json"
