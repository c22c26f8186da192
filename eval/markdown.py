"""How report.md writes a measured number: mean [CI], with each seed's value and, for a change, its verdict.

Shared by eval/report.py and each suite's markdown section, which the report imports in turn.
"""

from __future__ import annotations

import numpy as np

from eval.stats import verdict


def summary_text(s: dict, pct: bool = False) -> str:
    if s is None or s.get("mean") is None or np.isnan(s["mean"]):
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3g}")
    out = f"{f(s['mean'])} [{f(s['ci_low'])}, {f(s['ci_high'])}]"
    if len(s.get("per_run", [])) > 1:  # aggregated over seeds: every seed's value next to the pooled one
        out += " (seeds: " + ", ".join(f(x) for x in s["per_run"]) + ")"
    return out


def delta_text(d: dict, pct: bool = False) -> str:
    """A change with its verdict (eval/stats.py `verdict`: n large enough, interval excludes 0, Holm-corrected)."""
    if not d:
        return ""
    return f"{summary_text(d, pct)} ({verdict(d)})"
