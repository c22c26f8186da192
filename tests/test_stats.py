"""What counts as a real change: sign test, Holm, the minimum n, t intervals across seeds, aggregation guards, and
the report's opening (no model needed: reports are built by hand)."""

import json
import math
import shutil

import numpy as np
import pytest

from eval.stats import MIN_N, across_runs, bootstrap_ci, correct_report, holm, sign_test_p, verdict


def test_holm_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.01, float("nan"), 0.02])  # NaN neither counted nor changed
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_sign_test_drops_ties_and_is_exact():
    assert sign_test_p(np.ones(10)) == pytest.approx(2 * 0.5 ** 10)
    assert sign_test_p([1, 1, 1, 0, 0, 0]) == pytest.approx(0.25)  # three discordant pairs can never be significant
    assert sign_test_p([0, 0]) == 1.0
    assert sign_test_p([1, -1] * 10) == pytest.approx(1.0)


def test_min_n_rule():
    change = {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "p_holm": 1e-6}
    assert verdict(dict(change, n=3)) == "n too small"  # three pairs that all flipped: zero-width, not a result
    assert verdict(dict(change, n=MIN_N - 1)) == "n too small"
    assert verdict(dict(change, n=MIN_N)) == "real change"
    assert verdict(dict(change, n=48, p_holm=0.2)) == "within noise"  # corrected p too large
    assert verdict({"mean": 0.1, "ci_low": -0.1, "ci_high": 0.3, "n": 48, "p_holm": 1e-6}) == "within noise"


def test_three_seeds_use_the_t_distribution_and_never_sum_n():
    runs = [{"mean": m, "ci_low": m - 0.05, "ci_high": m + 0.05, "n": 48, "significant": True, "p_value": 0.01}
            for m in (0.1, 0.2, 0.3)]
    out = across_runs(runs)
    h_seed = 4.302652729911275 * 0.1 / np.sqrt(3)
    half = np.hypot(h_seed, 0.05)  # the items are shared by every seed: their error is added back, not averaged away
    assert out["mean"] == pytest.approx(0.2)
    assert out["ci_low"] == pytest.approx(0.2 - half) and out["ci_high"] == pytest.approx(0.2 + half)
    assert out["n"] == out["n_per_run"] == 48 and out["n_runs"] == 3 and out["per_run"] == pytest.approx([0.1, 0.2, 0.3])
    t = 0.2 / (0.1 / np.sqrt(3))
    assert out["p_value"] == pytest.approx(1 - t / np.sqrt(2 + t ** 2))  # two-sided t-test p with 2 df, closed form
    assert out["ci_low"] < 0 and not out["significant"]  # all three seeds positive, and still not shown


def test_a_change_must_hold_within_each_seeds_items_too():
    # three seeds that agree closely, each on items too few to tell: the seed spread alone would call it real
    runs = [{"mean": m, "ci_low": m - 0.10, "ci_high": m + 0.12, "n": 20, "significant": False, "p_value": 0.5}
            for m in (0.050, 0.051, 0.049)]
    out = across_runs(runs)
    assert out["half_width_seeds"] < 0.01 and out["ci_low"] < 0 and out["p_value"] == 0.5
    assert verdict(out) == "within noise"


def test_identical_runs_keep_an_item_interval_not_a_zero_width_one():
    run = {"mean": 0.2, "ci_low": 0.05, "ci_high": 0.35, "n": 48, "significant": True, "p_value": 0.01}
    out = across_runs([run, dict(run)])
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((0.05, 0.35)) and out["p_value"] == 0.01
    assert out["half_width_seeds"] == 0


def _change(mean, p, n=48):
    return {"mean": mean, "ci_low": mean - 0.01, "ci_high": mean + 0.01, "n": n, "significant": True, "p_value": p}


def test_holm_runs_per_table_and_skips_the_cross_trait_copy():
    report = {
        "preference": [{"trait": t, "split": "all", "axis": "all", "model": "sft",
                        "norm_accuracy_delta": _change(0.1, p), "margin_delta": _change(0.1, 0.01)}
                       for t, p in (("care", 0.01), ("honesty", 0.02), ("all", 0.04))],
        "cross_trait": {"care": {"sft": _change(0.1, 0.01)}},
    }
    correct_report(report)
    cells = [r["norm_accuracy_delta"] for r in report["preference"]]
    assert [c["p_holm"] for c in cells] == pytest.approx([0.03, 0.04, 0.04])
    assert [c["verdict"] for c in cells] == ["real change"] * 3
    assert report["preference"][0]["margin_delta"]["p_holm"] == pytest.approx(0.03)  # its own table of 3
    assert "p_holm" not in report["cross_trait"]["care"]["sft"]
    assert report["multiple_comparisons"] == {"preference.norm_accuracy_delta": 3, "preference.margin_delta": 3}


def _report(delta_mean, p, n=48, tiny=False):
    rec = {"trait": "all", "split": "eval_id", "axis": "all"}
    cell = {"mean": 0.6, "ci_low": 0.5, "ci_high": 0.7, "n": n}
    return {"model": "m", "tiny_model": tiny, "n_parameters": 135_000_000, "tuned": ["sft"], "adapters": {},
            "preference": [dict(rec, model="base", norm_accuracy=cell),
                           dict(rec, model="sft", norm_accuracy=cell, norm_accuracy_delta=_change(delta_mean, p, n))],
            "endorsement": {"summary": [{"model": "sft", "trait": "all", "accuracy_delta": _change(0.2, 0.001)}],
                            "headline": "endorsement checked"}}


def test_headline_states_a_null_result_and_what_cannot_be_shown():
    report = correct_report(_report(0.02, 0.5))
    report["endorsement"] = {"summary": []}
    lines = headline_of(report)
    assert any(line.startswith("Nothing moved") and "null result" in line for line in lines)
    text = "\n".join(lines)
    assert "Did not move" in text and "sft vs base: change in preference accuracy (length-normalised), eval_id" in text
    assert "135M-parameter model" in text and "template generator" in text and "One training seed" in text
    assert "cannot show interference" in text


def test_headline_lists_moved_instruments_other_sections_and_small_n():
    report = correct_report(_report(0.2, 0.001))
    report["judge_validity"] = {"judge": "similarity", "traits": {"care": {"valid": True}, "honesty": {"valid": False}}}
    text = "\n".join(headline_of(report))
    assert "Judge similarity: valid for care; not valid for honesty" in text
    assert text.index("Moved (") < text.index("sft vs base: change in preference accuracy")
    assert "sft vs base: change in endorsement accuracy" in text and "endorsement: endorsement checked" in text
    small = correct_report(_report(0.2, 0.001, n=5, tiny=True))
    text = "\n".join(headline_of(small))
    assert "Too few items to tell" in text and "tiny random model" in text


def headline_of(report):
    from eval.report import headline

    return headline(report)


def _write_run(folder, mean, adapter):
    rec = {"trait": "all", "split": "eval_id", "axis": "all", "model": "sft"}
    for metric in ("norm_accuracy", "accuracy", "norm_margin", "margin"):
        rec[metric] = {"mean": 0.6, "ci_low": 0.5, "ci_high": 0.7, "n": 48}
        rec[f"{metric}_delta"] = _change(mean, 0.01)
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"model": "m", "tuned": ["sft"], "adapters": {"sft": str(adapter)},
                                                    "preference": [rec], "timings": {"total": 1.0}}))
    return str(folder)


def test_aggregate_refuses_a_run_given_twice_or_copied(tmp_path):
    from eval.aggregate import aggregate

    a = _write_run(tmp_path / "seed0", 0.1, tmp_path / "seed0" / "sft")
    with pytest.raises(ValueError, match="more than once"):
        aggregate([a, str(tmp_path / "seed0" / ".." / "seed0")])
    shutil.copytree(a, tmp_path / "copy")
    with pytest.raises(ValueError, match="same measurements"):
        aggregate([a, str(tmp_path / "copy")])
    b = _write_run(tmp_path / "seed1", 0.2, tmp_path / "seed0" / "sft")  # new numbers, same adapter
    with pytest.raises(ValueError, match="same adapter"):
        aggregate([a, b])


def test_aggregated_report_shows_each_seed_and_the_pooled_value(tmp_path):
    from eval.aggregate import aggregate
    from eval.report import write_report

    runs = [_write_run(tmp_path / f"seed{k}", m, tmp_path / f"seed{k}" / "sft") for k, m in enumerate((0.1, 0.2, 0.3))]
    report = write_report(aggregate(runs), tmp_path / "agg")
    cell = report["preference"][0]["norm_accuracy_delta"]
    assert cell["n"] == 48 and cell["n_runs"] == 3 and cell["verdict"] == "within noise"
    md = (tmp_path / "agg" / "report.md").read_text()
    assert md.index("## Headline") < md.index("## How to read the statistics") < md.index("## Trait preference")
    assert "(seeds: 10.0%, 20.0%, 30.0%)" in md and "t half-width of the seeds' spread" in md and "3 training seeds" in md


def test_bootstrap_memory_stays_bounded_as_items_grow():
    import tracemalloc

    values = np.random.default_rng(0).random(200_000)
    tracemalloc.start()
    lo, hi = bootstrap_ci(values, n_boot=200)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # One (n_boot, n) index array plus its gather would be 2 x 320 MB here.
    assert peak < 128 * 2**20, f"bootstrap peaked at {peak / 2**20:.0f} MiB"
    assert lo < values.mean() < hi


def test_bootstrap_blocks_give_the_one_shot_interval_below_one_block():
    v = np.random.default_rng(1).random(300)
    rng = np.random.default_rng(7)
    means = v[rng.integers(0, v.size, size=(500, v.size))].mean(axis=1)
    assert bootstrap_ci(v, n_boot=500, seed=7) == tuple(float(x) for x in np.quantile(means, [0.025, 0.975]))


def test_no_nan_reaches_report_json_or_markdown(tmp_path):
    from eval.report import write_report

    report = _report(0.2, 0.001)
    del report["endorsement"]
    report["preference"][0]["norm_accuracy"] = {"mean": float("nan"), "ci_low": float("nan"),
                                                "ci_high": float("nan"), "n": 0}
    cell = {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    report["preference"][1].update(accuracy=cell, accuracy_delta=cell, norm_margin=cell, margin=cell)
    report["preference"][0].update(accuracy=cell, norm_margin=cell, margin=cell)
    report["forgetting"] = {"drift": {"news": {"n_texts": 9, "base_perplexity": 40.0, "sft": {"kl": {"mean": 0.1, "ci_low": 0.05, "ci_high": 0.2, "n": 9},
                                                       "nll_delta": {"mean": 0.1, "ci_low": 0.0, "ci_high": 0.2,
                                                                     "n": 9},
                                                       "perplexity": float("inf")}}}}
    write_report(report, tmp_path)
    strict = json.loads((tmp_path / "report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    assert "preference[0].norm_accuracy.mean" in strict["not_computed"]
    assert "forgetting.drift.news.sft.perplexity" in strict["not_computed"]
    assert strict["preference"][0]["norm_accuracy"]["mean"] is None
    card = strict["model_index_results_by_adapter"]["sft"]
    assert [m["name"] for r in card for m in r["metrics"]] == ["Preference accuracy (length-normalised)",
                                                              "Preference accuracy (length-normalised) change vs base",
                                                              "Mean per-token KL(tuned || base)"]
    md = (tmp_path / "report.md").read_text()
    assert "Not computed" in md and "`forgetting.drift.news.sft.perplexity`" in md
    import re

    assert not re.search(r"\b(nan|inf)\b", md.replace("`", " ").split("Not computed", 1)[1].split("\n", 1)[1])
