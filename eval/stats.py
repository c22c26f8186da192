"""Seeded bootstrap intervals. Items (pairs, paragraphs, questions) are the resampling unit."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of the mean of `values`."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def summarize(values, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean with its 95% bootstrap interval and n."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(v, n_boot, seed)
    return {"mean": float(v.mean()) if v.size else float("nan"), "ci_low": lo, "ci_high": hi, "n": int(v.size)}


def paired_delta(tuned, base, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of tuned - base over the same items, with a 95% interval and whether it excludes zero."""
    t, b = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if t.shape != b.shape:
        raise ValueError(f"paired_delta needs the same items for both models, got {t.shape} vs {b.shape}")
    out = summarize(t - b, n_boot, seed)
    out["significant"] = bool(out["n"] > 0 and (out["ci_low"] > 0 or out["ci_high"] < 0))
    return out
