"""End-to-end eval on the tiny model: report files, KL drift, config validation (builders: tests/train_fixtures.py)."""

import json
from pathlib import Path

import pytest
from train_fixtures import TRAITS, make_adapter, make_dpo_data


@pytest.fixture(scope="module")
def eval_setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_adapter(tiny_model_dir, root / "sft", seed=1)
    make_adapter(tiny_model_dir, root / "dpo", seed=2)
    make_adapter(tiny_model_dir, root / "zero", seed=3, scale=0.0)
    make_dpo_data(root / "data")
    return root


def _run(tiny_model_dir, root, out, adapters, extra=()):
    from eval.run import main

    args = ["--model", tiny_model_dir, "--adapters", json.dumps(adapters), "--dataset_path", str(root / "data"),
            "--output_dir", str(out), "--reference_paragraphs", "4", "--reference_max_tokens", "32",
            "--neutral_max_new_tokens", "6", "--bootstrap_samples", "100", "--probe_sets", "[factual/default.json]",
            "--suites", "[preference, forgetting, diff, probes]", *extra]
    return main(args)


def test_end_to_end_report(tiny_model_dir, eval_setup, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    root = eval_setup
    report = _run(tiny_model_dir, root, tmp_path / "out", {"sft": str(root / "sft"), "dpo": str(root / "dpo")},
                  ["--suites", "[preference, forgetting, diff, probes, generation]", "--generation_prompts", "3",
                   "--max_new_tokens", "5", "--wandb", "true"])
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("preference", "framing_gap", "cross_trait", "forgetting", "probes", "model_index_results", "timings"):
        assert key in on_disk, key
    assert on_disk["tiny_model"] is True
    assert "tiny random model" in (tmp_path / "out" / "report.md").read_text()
    # every trait x split x model has a record; tuned records carry a paired delta
    recs = {(r["trait"], r["split"], r["axis"], r["model"]): r for r in on_disk["preference"]}
    for trait in TRAITS + ("all",):
        for split in ("eval_id", "eval_ood"):
            for model in ("base", "sft", "dpo"):
                assert (trait, split, "all", model) in recs
    assert recs[("all", "eval_ood", "framing", "sft")]["accuracy_delta"]["n"] == 4
    assert recs[("all", "eval_ood", "framing", "sft")]["norm_accuracy_delta"]["n"] == 4
    assert set(on_disk["preference_lengths"]) == {"eval_id", "eval_ood", "all"}
    assert "length-normalised" in on_disk["model_index_results"][0]["metrics"][0]["name"]
    assert {r["trait"] for r in on_disk["framing_gap"]} == {"care", "honesty", "all"}
    assert set(on_disk["cross_trait"]["care"]) == {"sft", "dpo"}
    mir = on_disk["model_index_results"]
    assert mir and all(set(e) == {"task", "dataset", "metrics"} for e in mir)
    assert all({"type", "name", "value"} <= set(m) for e in mir for m in e["metrics"])
    pngs = {Path(p).name for p in on_disk["plots"]}
    assert {"preference_accuracy.png", "forgetting.png", "cross_trait.png", "framing_gap.png", "top_diffs.png"} <= pngs
    assert all((tmp_path / "out" / "plots" / p).stat().st_size > 1000 for p in pngs)
    assert len(report["forgetting"]["top_diffs"]["dpo"]) > 0
    gen = {(r["model"], r["trait"]): r for r in on_disk["generation"]["summary"]}
    # 3 prompts per trait; the fixture's 2 train pairs are too few to train the classifier judge, so every trait
    # is unscored and its judge INVALID (scores withheld), which the report must say
    assert gen[("dpo", "all")]["n"] == 9 and gen[("base", "all")]["unscored"] == 9
    assert len(on_disk["generation"]["samples"]) == 27
    assert not on_disk["generation"]["validity"]["valid"] and gen[("dpo", "care")]["trait_score"] is None
    assert "INVALID" in (tmp_path / "out" / "report.md").read_text()
    from train.hardware import cpu_supports_bf16

    # dtype auto: the judge's encoder in bf16 exactly where the CPU runs it natively, and the report says which
    assert on_disk["generation"]["encoder_dtype"] == ("bfloat16" if cpu_supports_bf16() else "float32")
    assert list(tmp_path.glob("wandb/offline-run-*")), "W&B offline run not written"


def test_kl_zero_for_identical_model_positive_after_perturbing(tiny_model_dir, eval_setup, tmp_path):
    from eval.config import EvalConfig
    from eval.forgetting import forgetting_suite
    from eval.variants import load_variants

    root = eval_setup
    v = load_variants(tiny_model_dir, {"zero": str(root / "zero"), "sft": str(root / "sft")})
    cfg = EvalConfig(model=tiny_model_dir, suites=["forgetting"], reference_paragraphs=4, reference_max_tokens=32,
                     neutral_max_new_tokens=6, bootstrap_samples=50)
    res = forgetting_suite(v, cfg)
    ref = res["drift"]["reference_text"]
    assert ref["zero"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert ref["zero"]["perplexity"] == pytest.approx(ref["base_perplexity"], rel=1e-5)
    assert ref["sft"]["kl"]["mean"] > 1e-4
    assert ref["sft"]["kl"]["ci_low"] > 0


def test_eval_model_head_gets_contiguous_hidden_states(tiny_model_dir, eval_setup):
    """`logits_to_keep` slices the hidden states; a strided slice into a frozen head takes PyTorch's broadcast
    matmul on CPU (a weight copy per row). The eval's model hands its head a contiguous tensor, same logits."""
    import torch

    from eval.variants import load_variants

    v = load_variants(tiny_model_dir, {"sft": str(eval_setup / "sft")})
    head = v.model.get_output_embeddings()
    assert not head.weight.requires_grad  # the case the slow path needs
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(3, 100, (3, 9))
    with torch.inference_mode():
        kept = v.model(input_ids=ids, logits_to_keep=4).logits
        full = v.model(input_ids=ids).logits
    assert seen == [True, True]
    torch.testing.assert_close(kept, full[:, -4:])


def test_config_errors_name_file_and_key_before_loading(tmp_path):
    from eval.run import main

    bad = tmp_path / "eval.yaml"
    bad.write_text("model: does-not-exist/nowhere\nbatch_sise: 4\n")
    with pytest.raises(SystemExit, match=r"eval.yaml: unknown key 'batch_sise'"):
        main(["--config", str(bad)])
    bad.write_text("model: does-not-exist/nowhere\nbatch_size: four\n")
    with pytest.raises(SystemExit, match=r"eval.yaml: key 'batch_size' must be"):
        main(["--config", str(bad)])
    bad.write_text("model: does-not-exist/nowhere\nadapters: [a, b]\n")
    with pytest.raises(SystemExit, match=r"key 'adapters'"):
        main(["--config", str(bad)])
    with pytest.raises(SystemExit, match=r"command line: unknown key 'bogus'"):
        main(["--bogus", "1"])


def test_recipes_validate():
    from eval.config import load_config

    for name in ("quickstart", "smoke"):
        cfg = load_config(f"recipes/{name}/eval.yaml")
        assert cfg.adapters and cfg.dataset_path


def test_adapters_with_different_templates_fail(tiny_model_dir, tmp_path):
    from eval.variants import load_variants
    from train.chat_template import shipped_template

    make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    other = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    make_adapter(tiny_model_dir, tmp_path / "b", seed=1, template=other)
    assert other != shipped_template("chatml")
    with pytest.raises(ValueError, match="different chat templates"):
        load_variants(tiny_model_dir, {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})


def test_aggregate_two_runs(tiny_model_dir, eval_setup, tmp_path):
    from eval.aggregate import main as aggregate_main

    root = eval_setup
    # two different adapters stand in for two training seeds (the same adapter twice is refused)
    for seed, adapter in ((0, "sft"), (1, "dpo")):
        _run(tiny_model_dir, root, tmp_path / f"s{seed}", {"sft": str(root / adapter)}, ["--suites", "[preference, probes]"])
    rep = aggregate_main(["--runs", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "agg")])
    assert rep["n_runs"] == 2
    rec = next(r for r in rep["preference"] if r["trait"] == "all" and r["split"] == "eval_id" and r["model"] == "sft")
    assert len(rec["accuracy"]["per_run"]) == 2 and rec["accuracy"]["n"] == rec["accuracy"]["n_per_run"] == 6
    assert rec["accuracy_delta"]["verdict"] == "n too small"  # 6 pairs per run
    with pytest.raises(SystemExit, match="more than once"):
        aggregate_main(["--runs", str(tmp_path / "s0"), str(tmp_path / "s0"), "--out", str(tmp_path / "agg2")])
    assert (tmp_path / "agg" / "report.md").read_text().startswith("# Eval report")
    assert json.loads((tmp_path / "agg" / "report.json").read_text())["model_index_results"]
