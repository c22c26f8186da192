"""The forgetting budget in the eval report, and scripts/forgetting_tradeoff.py end to end on the tiny model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import make_adapter

REPO = Path(__file__).resolve().parents[1]


def _budget_record(held: bool, stopped: int | None = None) -> dict:
    checks = [{"step": 0, "kl": 0.0, "probe_acc": 0.8, "probe_drop": 0.0, "exceeded": False},
              {"step": 10, "kl": 0.004, "probe_acc": 0.78, "probe_drop": 2.0, "exceeded": False},
              {"step": 20, "kl": 0.002 if held else 0.03, "probe_acc": 0.79, "probe_drop": 1.0, "exceeded": not held}]
    return {"limits": {"max_kl": 0.01, "max_probe_drop": None}, "action": "stop" if stopped else "warn",
            "check_steps": 10, "held_out": {"texts": "lee_background.cor distinct paragraphs [300:312]"},
            "base": {"probe_acc": 0.8}, "checks": checks, "exceeded_at_step": None if held else 20,
            "stopped_at_step": stopped, "held": held}


def test_report_shows_the_budget_of_an_adapter_folder(tiny_model_dir, tmp_path):
    """An adapter folder holding forgetting_budget.json: report.json and report.md carry its limits, last values
    and whether it held; an adapter without one adds nothing, a torn one is reported, not fatal."""
    from eval.run import main

    held = make_adapter(tiny_model_dir, tmp_path / "held", seed=1)
    broke = make_adapter(tiny_model_dir, tmp_path / "broke", seed=2)
    plain = make_adapter(tiny_model_dir, tmp_path / "plain", seed=3)
    (held / "forgetting_budget.json").write_text(json.dumps(_budget_record(True)))
    (broke / "forgetting_budget.json").write_text(json.dumps(_budget_record(False, stopped=20)))
    out = tmp_path / "eval"
    main(["--model", tiny_model_dir, "--adapters", json.dumps({"held": str(held), "broke": str(broke), "plain": str(plain)}),
          "--suites", "[probes]", "--probe_sets", "[factual/default.json]", "--bootstrap_samples", "50",
          "--output_dir", str(out)])
    report = json.loads((out / "report.json").read_text())
    budget = report["forgetting_budget"]
    assert set(budget) == {"held", "broke"}
    assert budget["held"]["held"] is True and budget["held"]["last"]["step"] == 20
    assert budget["held"]["last"]["kl"] == pytest.approx(0.002) and budget["held"]["limits"]["max_kl"] == 0.01
    assert budget["held"]["max_kl_seen"] == pytest.approx(0.004) and budget["held"]["checks"] == 3
    assert budget["broke"]["held"] is False and budget["broke"]["exceeded_at_step"] == 20
    assert budget["broke"]["stopped_at_step"] == 20
    md = (out / "report.md").read_text()
    assert "## Forgetting budget (checked during training)" in md
    assert "Forgetting budget of `held` (checked during training): held; last check at step 20: KL 0.002 (limit 0.01)" in md
    assert "Forgetting budget of `broke` (checked during training): EXCEEDED at step 20, training stopped at step 20" in md
    assert "| broke | 0.01 | - | stop | 3 | 20 | 0.03 | +1.0 | 0.03, +2.0 | **no**, exceeded at step 20, stopped at step 20 |" in md

    from eval.report import BUDGET_RECORD, forgetting_budgets
    from train.forgetting_budget import RECORD

    assert BUDGET_RECORD == RECORD
    (plain / "forgetting_budget.json").write_text("{\"limits\": ")  # torn
    torn = forgetting_budgets({"plain": str(plain)})["plain"]
    assert "error" in torn and torn["file"].endswith("forgetting_budget.json")


def test_aggregate_lists_each_seeds_budget(tmp_path):
    from eval.aggregate import aggregate
    from eval.report import forgetting_budgets

    runs = []
    for seed, held in ((0, True), (1, False)):
        adapter = tmp_path / f"a{seed}"
        adapter.mkdir()
        (adapter / "forgetting_budget.json").write_text(json.dumps(_budget_record(held)))
        run = tmp_path / f"run{seed}"
        run.mkdir()
        cell = {"mean": 0.5 + seed / 10, "ci_low": 0.4, "ci_high": 0.7, "n": 40}
        (run / "report.json").write_text(json.dumps({
            "model": "m", "tuned": ["sft"], "adapters": {"sft": str(adapter)},
            "probes": {"p": {"base": {"accuracy": cell}, "sft": {"accuracy": cell}}},
            "forgetting_budget": forgetting_budgets({"sft": str(adapter)})}))
        runs.append(str(run))
    merged = aggregate(runs)
    assert [b["held"] for b in merged["forgetting_budget"].values()] == [True, False]  # per run, not averaged
    assert list(merged["forgetting_budget"]) == [f"sft ({runs[0]})", f"sft ({runs[1]})"]


def test_tradeoff_verdict_of_seeds_that_agree_exactly():
    import importlib.util

    spec = importlib.util.spec_from_file_location("forgetting_tradeoff", REPO / "scripts/forgetting_tradeoff.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # two seeds that each lost the same 2 of 31 pairs: a zero-width t interval is no evidence of a change
    assert script._verdict(script.t_interval([-2 / 31, -2 / 31])) == "same value in all 2 seeds: no interval"
    assert script._verdict(script.t_interval([0.19, 0.21, 0.2])) == "interval excludes 0"
    assert script._verdict(script.t_interval([0.1])) == "no interval (one seed)"


@pytest.mark.subprocess
def test_tradeoff_script_end_to_end_on_the_smoke_recipes(tmp_path):
    """Data, plain and anchored SFT with checkpoints and the persona monitor, eval of each checkpoint, the
    correlation and the summary files, on the tiny random model (numbers mean nothing; the plumbing is checked)."""
    work = tmp_path / "work"
    for name in ("scripts", "recipes"):
        shutil.copytree(REPO / name, work / name)
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = work / "runs" / "tradeoff"
    proc = subprocess.run(
        [sys.executable, "scripts/forgetting_tradeoff.py", "--recipes", "recipes/smoke", "--seeds", "1", "--steps", "4",
         "--checkpoint_every", "2", "--anchor-weights", "0", "2", "--out", str(out), "--bootstrap", "50"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "tradeoff.json").read_text())
    assert [r["anchor_weight"] for r in result["runs"]] == [0.0, 2.0]
    run = result["runs"][0]
    assert [c["step"] for c in run["checkpoints"]] == [2, 4]
    final = run["checkpoints"][-1]
    for key in ("pref_eval_id", "pref_eval_ood", "endorsement_margin", "kl_reference_text", "probe_accuracy"):
        assert final[key] is not None and "mean" in final[key], key
    assert "kl_neutral_chat" in final  # None here: the tiny model's greedy answers to neutral prompts are empty
    assert set(final["trait_changes"]) == {"care", "honesty", "instance_reduction"}
    assert result["arms"]["2"]["checkpoints"]["final"]["kl_reference_text"]["n_runs"] == 1
    assert result["contrasts"]["2 minus 0"]["final"]["kl_reference_text"]["ci_low"] is None  # one seed: no interval
    assert set(result["arms"]) == {"0", "2"} and result["arms"]["2"]["n_seeds"] == 1
    corr = json.loads((out / "persona_correlation.json").read_text())
    assert corr["overall"]["n"] == 2 * 2 * 3  # runs x checkpoints x traits
    assert (out / "tradeoff.png").stat().st_size > 1000
    md = (out / "tradeoff.md").read_text()
    assert "| anchor weight |" in md and "persona monitor" in md.lower()
    # A second call reuses the finished runs and reports (nothing retrained or re-scored)
    again = subprocess.run(
        [sys.executable, "scripts/forgetting_tradeoff.py", "--recipes", "recipes/smoke", "--seeds", "1", "--steps", "4",
         "--checkpoint_every", "2", "--anchor-weights", "0", "2", "--out", str(out), "--bootstrap", "50"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stdout
