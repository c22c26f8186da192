"""One W&B setup for every stage (train/tracking.py), read back from the offline run files: data, SFT, DPO and
eval share a group, have readable names, carry their headline numbers and artifacts, name their inputs; a
resumed training run continues its W&B run; no login means offline, never a prompt."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from wandb_records import read_runs

from data_gen.generate import main as data_main
from train import dpo, sft
from train.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--sft_train_per_trait", "4", "--dpo_train_per_trait", "4", "--eval_id_per_trait", "2",
         "--eval_ood_per_axis_per_trait", "2", "--leakage_embedding_check", "false", "--diversity_sample", "10"]


def run_stage(module, *argv):
    return module.main(*parse_recipe(module.make_parser(), list(argv)))


def train_args(recipe, tiny_model_dir, data, out, *extra):
    return ("--config", str(REPO / f"recipes/smoke/{recipe}.yaml"), "--model_name_or_path", tiny_model_dir,
            "--dataset_name", str(data), "--output_dir", str(out), "--report_to", "wandb", "--max_steps", "2",
            "--save_steps", "1", "--per_device_train_batch_size", "2", *extra)


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    for key in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory):
    """data -> SFT -> DPO -> eval's W&B logging, one experiment folder `exp`."""
    mp = pytest.MonkeyPatch()
    for key in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        mp.delenv(key, raising=False)
    mp.setenv("WANDB_MODE", "offline")
    exp = tmp_path_factory.mktemp("runs") / "exp"
    data_main(["--output_dir", str(exp / "data"), "--wandb", "true", *SMALL])
    run_stage(sft, *train_args("sft", tiny_model_dir, exp / "data", exp / "sft"))
    run_stage(dpo, *train_args("dpo", tiny_model_dir, exp / "data", exp / "dpo", "--sft_adapter", str(exp / "sft")))

    import matplotlib

    from eval.wandb_tables import log_report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (exp / "plots").mkdir()
    plt.figure(figsize=(1, 1))
    plt.savefig(exp / "plots" / "preference.png")
    plt.close("all")
    stat = lambda x: {"mean": x, "ci_low": x - 0.1, "ci_high": x + 0.1}  # noqa: E731
    pref = [{"trait": "all", "axis": "all", "split": split, "model": model, "norm_accuracy": stat(acc),
             "accuracy": stat(acc), "norm_margin": stat(0.1), "margin": stat(0.2),
             **({"norm_accuracy_delta": stat(acc - 0.5)} if model != "base" else {})}
            for split in ("eval_id", "eval_ood") for model, acc in (("base", 0.5), ("sft", 0.6), ("dpo", 0.7))]
    report = {"preference": pref, "tuned": ["sft", "dpo"], "plots": [str(exp / "plots" / "preference.png")],
              "config": {"seed": 0}}
    (exp / "report.md").write_text("# Eval report\n")
    (exp / "report.json").write_text(json.dumps(report))
    cfg = SimpleNamespace(adapters={"sft": str(exp / "sft"), "dpo": str(exp / "dpo")}, dataset_path=str(exp / "data"),
                          output_dir=str(exp), wandb_project="persona-pipeline")
    log_report(report, cfg)
    mp.undo()
    return exp, read_runs(exp / "wandb")


def test_four_stages_share_one_group_with_readable_names(pipeline):
    exp, runs = pipeline
    assert sorted(runs) == ["data", "dpo", "eval", "sft"]
    for stage, (run,) in runs.items():
        assert run["group"] == "exp" and run["name"] == f"exp/{stage}", stage


def test_headline_numbers_are_in_each_runs_summary(pipeline):
    _, runs = pipeline
    assert runs["data"][0]["summary"]["rows/sft/train"] == 12
    for stage in ("sft", "dpo"):
        summary = runs[stage][0]["summary"]
        assert summary["final/global_step"] == 2 and "final/train_loss" in summary, stage
        assert len(summary["data_sha256"]) == 64
    summary = runs["eval"][0]["summary"]
    assert summary["dpo/eval_ood/norm_accuracy"] == 0.7 and summary["sft/eval_id/norm_accuracy_delta"] == pytest.approx(0.1)


def test_artifacts_reference_each_other(pipeline):
    exp, runs = pipeline
    made = {}
    for stage, (run,) in runs.items():
        for name, art in run["artifacts"].items():
            if name.startswith("run-"):  # W&B's own store of logged tables
                continue
            made[name] = art
            assert run["summary"][f"artifact/{name}"] == art["digest"]
    assert made["exp-data"]["type"] == "dataset" and "jsonl/dpo_train.jsonl" in made["exp-data"]["files"]
    assert made["exp-sft"]["type"] == made["exp-dpo"]["type"] == "model"
    assert "adapter_model.safetensors" in made["exp-dpo"]["files"] and "training_manifest.json" in made["exp-dpo"]["files"]
    assert {"report.md", "report.json", "plots/preference.png"} <= set(made["exp-report"]["files"])
    # Each consumer names the exact version its producer logged (content digests match).
    digest = {name: art["digest"] for name, art in made.items()}
    assert runs["sft"][0]["config"]["inputs"] == {"exp-data": digest["exp-data"]}
    assert runs["dpo"][0]["config"]["inputs"] == {"exp-data": digest["exp-data"], "exp-sft": digest["exp-sft"]}
    assert runs["eval"][0]["config"]["inputs"] == {k: digest[k] for k in ("exp-data", "exp-sft", "exp-dpo")}
    assert "report.md" in runs["eval"][0]["files"]


def test_resumed_training_run_continues_the_same_wandb_run(tiny_model_dir, tmp_path, offline_wandb):
    exp = tmp_path / "exp2"
    data_main(["--output_dir", str(exp / "data"), *SMALL])
    out = exp / "sft"
    run_stage(sft, *train_args("sft", tiny_model_dir, exp / "data", out))
    first_id = (out / "wandb_run_id").read_text().strip()
    # As if killed after its first checkpoint: no manifest, no later checkpoint. The same command resumes it.
    (out / "training_manifest.json").unlink()
    shutil.rmtree(out / "checkpoint-2")
    run_stage(sft, *train_args("sft", tiny_model_dir, exp / "data", out))
    assert json.loads((out / "training_manifest.json").read_text())["resumed_from"]
    ids = [run["id"] for run in read_runs(exp / "wandb")["sft"]]
    assert ids == [first_id, first_id]


def test_mode_is_online_only_when_logged_in_and_a_users_mode_wins(monkeypatch, tmp_path):
    from train.tracking import choose_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert choose_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert choose_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_mode() == "disabled"
