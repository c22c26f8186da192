"""Resuming a killed run: only with the recipe and data it started with, and from a checkpoint that is whole."""

import json
import shutil
from pathlib import Path

import pytest
from train_fixtures import sft_rows, write_dataset

from train import sft
from train.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
SMOKE_SFT = str(REPO / "recipes/smoke/sft.yaml")


def run_sft(*argv):
    return sft.main(*parse_recipe(sft.make_parser(), list(argv)))


def sft_args(model, data, out, *extra):
    return ("--config", SMOKE_SFT, "--model_name_or_path", model, "--dataset_path", str(data),
            "--output_dir", str(out), *extra)


@pytest.fixture
def killed_run(tiny_model_dir, tmp_path):
    """A 4-step SFT run as a SIGKILL after step 3 leaves it: checkpoint-2 saved, no final adapter, no manifest.

    Made by finishing the run and removing what steps 4+ wrote, which is byte for byte what the kill leaves
    (the smoke recipe saves every 2 steps), without racing a real kill against the clock.
    """
    data = write_dataset(tmp_path / "data", n_train=16)
    out = tmp_path / "sft"
    run_sft(*sft_args(tiny_model_dir, data, out))
    for name in ("training_manifest.json", "adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    return data, out


def test_resume_with_another_learning_rate_is_refused(tiny_model_dir, killed_run):
    data, out = killed_run
    shutil.rmtree(out / "checkpoint-4")
    with pytest.raises(RuntimeError, match=r"(?s)learning_rate: 0\.001 -> 0\.0005.*new --output_dir"):
        run_sft(*sft_args(tiny_model_dir, data, out, "--learning_rate", "5e-4"))
    assert not (out / "training_manifest.json").exists() and (out / "checkpoint-2").is_dir()


def test_resume_on_other_data_is_refused(tiny_model_dir, killed_run):
    data, out = killed_run
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(data)
    write_dataset(data, sft=sft_rows(17)[1:])  # same folder, same size, other rows
    with pytest.raises(RuntimeError, match=r"(?s)training data sha256.*new --output_dir"):
        run_sft(*sft_args(tiny_model_dir, data, out))


def test_resume_with_the_same_recipe_continues_and_logging_may_change(tiny_model_dir, killed_run):
    data, out = killed_run
    shutil.rmtree(out / "checkpoint-4")
    run_sft(*sft_args(tiny_model_dir, data, out, "--logging_steps", "2"))
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["resumed_from"] == str(out / "checkpoint-2") and manifest["metrics"]["global_step"] == 4


@pytest.mark.parametrize("tear", ["truncated trainer_state.json", "empty optimizer.pt"])
def test_torn_last_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, killed_run, tear):
    data, out = killed_run
    last = out / "checkpoint-4"
    if tear.startswith("truncated"):
        text = (last / "trainer_state.json").read_text()
        (last / "trainer_state.json").write_text(text[: len(text) // 2])
    else:
        (last / "optimizer.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"checkpoint-4.*(trainer_state\.json|optimizer\.pt)"):
        run_sft(*sft_args(tiny_model_dir, data, out))
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["resumed_from"] == str(out / "checkpoint-2") and manifest["metrics"]["global_step"] == 4


def test_checkpoint_check_reads_every_file(tmp_path, tiny_model_dir, killed_run):
    from train.outputs import checkpoint_problem

    _, out = killed_run
    good = out / "checkpoint-2"
    assert checkpoint_problem(good) is None
    for name, damage in (("adapter_model.safetensors", b"\x10\x00"), ("scheduler.pt", b"PK\x03\x04 torn"),
                         ("rng_state.pth", b"")):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(good, bad)
        (bad / name).write_bytes(damage)
        assert name in checkpoint_problem(bad)


def test_run_killed_after_its_last_checkpoint_finishes_on_restart(tiny_model_dir, killed_run):
    data, out = killed_run  # checkpoint-4 is the last step: nothing is left to train, only the outputs to write
    run_sft(*sft_args(tiny_model_dir, data, out))
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["resumed_at_step"] == 4 and manifest["metrics"]["global_step"] == 4
    assert (out / "adapter_model.safetensors").is_file()
