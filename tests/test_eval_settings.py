"""Eval settings that would give wrong or empty results fail at once, naming the key, before any model loads."""

import json

import pytest
from train_fixtures import write_dataset

from eval import run
from eval.config import load_config


@pytest.mark.parametrize("key,value", [
    ("batch_size", -1), ("batch_size", 0), ("max_pairs_per_split", -1), ("max_pairs_per_split", 0),
    ("bootstrap_samples", 0), ("max_length", 0), ("reference_paragraphs", 0), ("reference_max_tokens", 0),
    ("neutral_max_new_tokens", 0), ("generation_prompts", 0), ("max_new_tokens", 0), ("diff_top_k", -1),
    ("lm_eval_limit", 0), ("seed", -1),
])
def test_out_of_range_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"command line: key '{key}' must be >="):
        load_config(None, [f"--{key}", str(value), "--dataset_path", "x"])


@pytest.fixture
def loads_no_model(monkeypatch):
    """Fail the test loudly if the eval gets as far as loading a model."""
    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the settings were checked")
    monkeypatch.setattr("eval.variants.load_variants", refuse)


@pytest.mark.parametrize("override,message", [
    (["--probe_sets", "[missing/probes.json]"], r"probe_sets: missing/probes.json"),
    (["--suites", "[preference, mcq]", "--mcq_data", "[./no/such.jsonl]"], r"no/such.jsonl"),
    (["--output_dir", "{file}"], r"output_dir .* is a file"),
    (["--dataset_path", "{missing}"], r"dataset_path .* not a folder"),
])
def test_bad_paths_fail_before_the_first_suite(tmp_path, loads_no_model, override, message):
    data = write_dataset(tmp_path / "data", n_train=4)
    (tmp_path / "a_file").write_text("x")
    override = [o.format(file=tmp_path / "a_file", missing=tmp_path / "nothing") for o in override]
    cfg = load_config(None, ["--dataset_path", str(data), "--output_dir", str(tmp_path / "out"),
                             "--suites", "[preference, probes]", *override])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run.evaluate(cfg)


def test_mcq_row_whose_answers_are_the_same_is_refused_or_skipped(tmp_path):
    from eval.mcq import load_mcq

    rows = [{"question": "Q1?", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"},
            {"question": "Q2?", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": [" (A)"]}]
    path = tmp_path / "mwe.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"mwe.jsonl line 2: .*both matching and not matching"):
        load_mcq(str(path))
    kept, bad = load_mcq(str(path), skip_bad_rows=True)
    assert [r["line"] for r in kept] == [1] and bad[0]["line"] == 2
