"""Seeded bootstrap intervals (items: pairs, paragraphs, questions, are the resampling unit), t intervals across
runs, sign tests, Holm's correction across a table, and the rule that decides what is called a real change."""

from __future__ import annotations

import numpy as np

BOOTSTRAP_BLOCK = 1 << 22  # resampled indices held at once by bootstrap_ci


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of the mean of `values`."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    # Resamples are drawn in blocks of rows so memory stays ~2**22 indices whatever the item count (one
    # (n_boot, n) index array is 6 GiB at 400k items). Below one block the draw is the single call it always was.
    rows = max(1, BOOTSTRAP_BLOCK // v.size)
    means = np.concatenate([v[rng.integers(0, v.size, size=(min(rows, n_boot - i), v.size))].mean(axis=1)
                            for i in range(0, n_boot, rows)])
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def summarize(values, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean with its 95% bootstrap interval and n."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(v, n_boot, seed)
    return {"mean": float(v.mean()) if v.size else float("nan"), "ci_low": lo, "ci_high": hi, "n": int(v.size)}


def paired_delta(tuned, base, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of tuned - base over the same items, with a 95% interval, whether it excludes zero (uncorrected) and a
    sign-test p-value (corrected across a table by correct_report)."""
    t, b = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if t.shape != b.shape:
        raise ValueError(f"paired_delta needs the same items for both models, got {t.shape} vs {b.shape}")
    out = summarize(t - b, n_boot, seed)
    out["significant"] = bool(out["n"] > 0 and (out["ci_low"] > 0 or out["ci_high"] < 0))
    out["p_value"] = sign_test_p(t - b)
    return out


# --- Deciding what counts as a real change -------------------------------------------------------------------
# Below this many paired items no change is called real. A percentile bootstrap of a few 0/1 differences collapses
# to a zero-width interval whenever they agree (three pairs that all flipped give [1, 1]), and with fewer than 20
# items an accuracy moves in steps of 5 points or more; an exact sign test on n items cannot reach p < 0.05 at all
# below n = 6, and not after Holm over a table of ~80 cells below n = 12.
MIN_N = 20
ALPHA = 0.05


def sign_test_p(diffs) -> float:
    """Two-sided exact sign test that paired differences centre on zero (ties dropped). On 0/1 correctness changes
    it is McNemar's exact test. Chosen over a bootstrap p-value, whose resolution is 1/bootstrap_samples: with 200
    resamples no cell could pass Holm over 80 cells (0.05/80 < 1/200)."""
    from scipy.stats import binomtest

    d = np.asarray(diffs, dtype=np.float64)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    return 1.0 if pos + neg == 0 else float(binomtest(pos, pos + neg, 0.5).pvalue)


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (NaN stays NaN and is not counted). Controls the
    chance of any false 'real change' among the cells at ALPHA, whatever their dependence (cells overlap:
    'all traits' pools the per-trait cells)."""
    p = np.asarray(pvalues, dtype=np.float64)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.full(p.shape, np.nan)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def across_runs(summaries: list[dict]) -> dict:
    """Pool one cell's summaries from several runs (training seeds) that scored the same items.

    The mean is the mean of the run means. Seeds only sample training: the items are the same in every run, so
    their sampling error does not shrink with more seeds and is added back. The 95% half-width is
    sqrt(h_seed^2 + h_item^2): h_seed the t half-width (k - 1 degrees of freedom: 4.30 for 3 runs) of the run means'
    spread, h_item the runs' mean item-bootstrap half-width. A change's p-value is the larger of the across-run
    one-sample t-test's and the largest per-run item-level p-value: it must hold across seeds and within each
    seed's items. n stays the items per run, never a sum."""
    from scipy import stats

    means = np.array([s["mean"] for s in summaries], dtype=np.float64)
    ns = sorted({s["n"] for s in summaries})
    out = {"mean": float(means.mean()), "per_run": means.tolist(), "n_runs": len(means), "n": ns[0],
           "n_per_run": ns[0] if len(ns) == 1 else [s["n"] for s in summaries]}
    is_change = any(k in summaries[0] for k in ("significant", "p_value"))
    h_item = float(np.mean([(s["ci_high"] - s["ci_low"]) / 2 for s in summaries]))
    spread = means.std(ddof=1) if len(means) > 1 else 0.0
    h_seed = float(stats.t.ppf(1 - ALPHA / 2, len(means) - 1) * spread / np.sqrt(len(means))) if spread > 0 else 0.0
    half = float(np.hypot(h_seed, h_item))
    out.update(ci_low=float(means.mean() - half), ci_high=float(means.mean() + half), half_width_seeds=h_seed,
               half_width_items=h_item, interval="t across runs combined with the item bootstrap")
    if is_change:
        item_p = [float("nan") if s.get("p_value") is None else s["p_value"] for s in summaries]
        seed_p = float(stats.ttest_1samp(means, 0.0).pvalue) if spread > 0 else 0.0  # identical runs: items decide
        out["p_value"] = float(max([seed_p] + item_p)) if not np.isnan(item_p).any() else seed_p
        out["significant"] = bool(out["ci_low"] > 0 or out["ci_high"] < 0)
    return out


def verdict(d: dict) -> str:
    """'n too small', 'real change' or 'within noise' for one change summary. Real needs n >= MIN_N items (per
    run), an interval that excludes zero, and, where a p-value exists, a Holm-adjusted one (across the cells of
    its table, see correct_report) below ALPHA."""
    n = d.get("n")
    if n is not None and n < MIN_N:
        return "n too small"
    excludes_zero = d.get("ci_low", np.nan) > 0 or d.get("ci_high", np.nan) < 0
    p = d.get("p_holm", d.get("p_value"))
    real = excludes_zero and (p is None or p < ALPHA)
    return "real change" if real else "within noise"


def _changes(obj, path=()):
    """(path, dict) for every change summary (a mean with an interval and a p-value) anywhere under `obj`."""
    if isinstance(obj, dict):
        if {"mean", "ci_low", "ci_high", "p_value"} <= set(obj):
            yield path, obj
            return
        for k, v in obj.items():
            yield from _changes(v, path + (k,))
    elif isinstance(obj, list):
        for v in obj:
            yield from _changes(v, path)


def correct_report(report: dict) -> dict:
    """Holm across the cells of each table, in place: a table is one report section and one measure (e.g. every
    `norm_accuracy_delta` in `preference`: all traits, splits, axes and adapters). Each change gets `p_holm` and
    `verdict`; `report['multiple_comparisons']` says how many cells each table had."""
    families: dict[tuple, list[dict]] = {}
    for path, d in _changes(report):
        if path and path[0] != "cross_trait":  # the matrix repeats cells of `preference`
            families.setdefault((path[0], path[-1]), []).append(d)
    for cells in families.values():
        for d, p in zip(cells, holm([c["p_value"] for c in cells])):
            d["p_holm"] = p
            d["verdict"] = verdict(d)
    report["multiple_comparisons"] = {f"{sec}.{measure}": len(cells) for (sec, measure), cells in families.items()}
    return report
