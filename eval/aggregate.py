"""`python -m eval aggregate --runs DIR [DIR ...] --out DIR`: merge several eval runs (seeds) into one report.

Every summary ({mean, ci_low, ci_high, n}) becomes the mean over runs with an across-run interval
(mean +- 1.96 standard errors; with one run, that run's own interval); the per-run means are kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SUMMARY = {"mean", "ci_low", "ci_high", "n"}


def _merge(values: list):
    first = values[0]
    if isinstance(first, dict):
        if SUMMARY <= set(first):
            means = np.array([v["mean"] for v in values], dtype=float)
            se = means.std(ddof=1) / np.sqrt(len(means)) if len(means) > 1 else None
            out = {"mean": float(means.mean()), "n": int(sum(v["n"] for v in values)), "per_run": means.tolist(),
                   "ci_low": float(means.mean() - 1.96 * se) if se is not None else first["ci_low"],
                   "ci_high": float(means.mean() + 1.96 * se) if se is not None else first["ci_high"]}
            if "significant" in first:
                out["significant"] = bool(len(means) > 1 and (out["ci_low"] > 0 or out["ci_high"] < 0))
            return out
        keys = [k for k in first if all(isinstance(v, dict) and k in v for v in values)]
        return {k: _merge([v[k] for v in values]) for k in keys}
    if isinstance(first, list) and first and isinstance(first[0], dict) and any(k in first[0] for k in ("trait", "model")):
        def ident(rec):
            return tuple((k, rec[k]) for k in ("trait", "split", "axis", "model") if k in rec)
        per_run = [{ident(r): r for r in v} for v in values]
        common = [ident(r) for r in first if all(ident(r) in pr for pr in per_run)]
        return [_merge([pr[k] for pr in per_run]) for k in common]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(isinstance(v, (int, float)) for v in values):
        return float(np.mean(values))
    return first


def aggregate(run_dirs: list[str]) -> dict:
    reports = []
    for d in run_dirs:
        p = Path(d) / "report.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no report.json (run `python -m eval` for this run first)")
        reports.append(json.loads(p.read_text()))
    merged = {k: _merge([r[k] for r in reports]) for k in reports[0]
              if k not in ("model_index_results", "model_index_results_by_adapter", "plots") and all(k in r for r in reports)}
    merged["seeds"], merged["runs"] = len(reports), [str(d) for d in run_dirs]
    merged["tuned"] = reports[0].get("tuned", [])
    return merged


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval aggregate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="eval output folders, one per seed")
    p.add_argument("--out", required=True, help="folder for the merged report.md, report.json, plots/")
    return p


def main(argv=None) -> dict:
    from eval.report import headline, write_report

    args = make_parser().parse_args(argv)
    report = write_report(aggregate(args.runs), args.out)
    print(f"Aggregated {len(args.runs)} runs -> {Path(args.out) / 'report.md'}")
    print("\n".join(headline(report)))
    return report
