"""lm-eval bridge offline: a local multiple-choice task scored on the tiny model and a LoRA adapter, into the report."""

import json
import os

import pytest

pytest.importorskip("lm_eval")

os.environ["HF_DATASETS_OFFLINE"] = "1"

# Made-up everyday statements (question, choices, index of the right one).
ROWS = [
    ("Water freezes at zero degrees. True or false?", ["true", "false"], 0),
    ("Paris is the capital of France. True or false?", ["true", "false"], 0),
    ("A week has ten days. True or false?", ["true", "false"], 1),
    ("People mostly sleep at noon. True or false?", ["true", "false"], 1),
    ("Two plus two is four. True or false?", ["true", "false"], 0),
    ("A doctor fixes the weather. True or false?", ["true", "false"], 1),
    ("Two comes after one. True or false?", ["true", "false"], 0),
    ("An honest answer is a lie. True or false?", ["true", "false"], 1),
]

def write_task(folder):
    data = folder / "facts.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ROWS))
    (folder / "facts_mc.yaml").write_text(
        "task: persona_facts_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def test_lm_eval_suite_base_and_adapter(tiny_model_dir, tmp_path):
    from train_fixtures import make_adapter

    from eval.config import EvalConfig
    from eval.report import write_report
    from eval.run import evaluate

    (tmp_path / "tasks").mkdir()
    tasks = write_task(tmp_path / "tasks")
    adapter = make_adapter(tiny_model_dir, tmp_path / "lora", seed=1, scale=10.0)
    cfg = EvalConfig(model=tiny_model_dir, adapters={"lora": str(adapter)}, suites=["lm_eval"], batch_size=4,
                     lm_eval_tasks=["persona_facts_mc"], lm_eval_include_path=str(tasks), output_dir=str(tmp_path / "out"))
    report = write_report(evaluate(cfg), cfg.output_dir)

    saved = json.loads((tmp_path / "out" / "report.json").read_text())["lm_eval"]
    rec = saved["summary"]["persona_facts_mc"]
    assert rec["n"] == len(ROWS)
    assert set(rec["metrics"]) == {"acc", "acc_norm"}
    moved = False
    for metric, row in rec["metrics"].items():
        b, t = row["base"], row["lora"]
        for v in (b["value"], t["value"]):
            assert 0.0 <= v <= 1.0 and v * len(ROWS) == pytest.approx(round(v * len(ROWS)))  # a share of 8 docs
        assert b["stderr"] is not None and b["stderr"] >= 0
        assert t["delta"] == pytest.approx(t["value"] - b["value"])
        moved |= t["delta"] != 0 or (t["delta_stderr"] or 0) > 0  # some document flipped between base and tuned
    assert moved, "the perturbed adapter changed no answer: base and tuned may be the same model"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## lm-evaluation-harness" in md and "| persona_facts_mc | acc | 8 |" in md
    assert report["timings"]["lm_eval"] > 0


def test_unknown_task_names_the_include_path(tiny_model_dir, tmp_path):
    from eval.config import EvalConfig
    from eval.lm_eval_bridge import lm_eval_suite
    from eval.variants import load_variants

    (tmp_path / "tasks").mkdir()
    cfg = EvalConfig(model=tiny_model_dir, suites=["lm_eval"], lm_eval_tasks=["no_such_task_xyz"],
                     lm_eval_include_path=str(tmp_path / "tasks"))
    with pytest.raises(ValueError, match=r"no_such_task_xyz.*tasks"):
        lm_eval_suite(load_variants(tiny_model_dir, {}), cfg)
