"""`python -m eval aggregate --runs DIR [DIR ...] --out DIR`: merge eval runs of several training seeds into one report.

Every summary ({mean, ci_low, ci_high, n}) becomes the mean of the run means; its interval combines the t interval
of their spread (k - 1 degrees of freedom: with 3 runs the factor is 4.30, not 1.96) with the item-level interval
the runs share (`eval.stats.across_runs`). `per_run` keeps each run's value, `n` stays the items per run (never
summed), and changes get a p-value corrected across each table when the report is written. The runs must have
scored the same items: the same data and eval recipe, with only the adapters' training seed differing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from eval.stats import across_runs

SUMMARY = {"mean", "ci_low", "ci_high", "n"}
# Written per report by write_report, or facts of one run rather than measurements
NOT_MERGED = ("model_index_results", "model_index_results_by_adapter", "plots", "multiple_comparisons", "timings",
              "not_computed", "forgetting_budget")


def _merge(values: list):
    first = values[0]
    if isinstance(first, dict):
        if SUMMARY <= set(first):  # a number a run could not compute is null in its report.json
            return across_runs([{k: float("nan") if v is None else v for k, v in d.items()} for d in values])
        keys = [k for k in first if all(isinstance(v, dict) and k in v for v in values)]
        return {k: _merge([v[k] for v in values]) for k in keys}
    if isinstance(first, list) and first and isinstance(first[0], dict) and any(k in first[0] for k in ("trait", "model")):
        def ident(rec):  # a record's labels (trait, split, axis, model, kind, ...): its string fields
            return tuple((k, v) for k, v in rec.items() if isinstance(v, str))
        per_run = [{ident(r): r for r in v} for v in values]
        common = [ident(r) for r in first if all(ident(r) in pr for pr in per_run)]
        return [_merge([pr[k] for pr in per_run]) for k in common]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(isinstance(v, (int, float)) for v in values):
        return float(np.mean(values))
    return first


def _measured(report: dict) -> str:
    """The report's measurements as one string, to spot the same run given twice (copied folders included)."""
    return json.dumps({k: v for k, v in report.items() if k not in NOT_MERGED + ("config", "adapters")}, sort_keys=True)


def _training_seed(report: dict):
    """The seed every adapter of a run was trained with (from its saved recipe.yaml), or None if unknown or mixed."""
    import yaml

    seeds = set()
    for adapter in report.get("adapters", {}).values():
        recipe = Path(adapter) / "recipe.yaml"
        seeds.add((yaml.safe_load(recipe.read_text()) or {}).get("seed") if recipe.is_file() else None)
    return seeds.pop() if len(seeds) == 1 else None


def load_runs(run_dirs: list[str]) -> list[dict]:
    resolved = [Path(d).resolve() for d in run_dirs]
    dupes = sorted({str(d) for d in resolved if resolved.count(d) > 1})
    if dupes:
        raise ValueError(f"aggregate: run folder(s) given more than once: {dupes} (the same run twice would show a "
                         "zero spread across seeds)")
    reports, seen = [], {}
    for d in run_dirs:
        p = Path(d) / "report.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no report.json (run `python -m eval` for this run first)")
        report = json.loads(p.read_text())
        # One seed = its own trained adapters: the same adapters scored twice, or a copied report, would show a
        # zero (or eval-seed-only) spread and call it a result
        keys = [_measured(report)] + [str(Path(a).resolve()) for a in report.get("adapters", {}).values()]
        for key in keys:
            if key in seen:
                what = "the same measurements" if key == keys[0] else f"the same adapter {key}"
                raise ValueError(f"aggregate: {p} holds {what} as {seen[key]}; a second look at one training run "
                                 "is not a second seed")
            seen[key] = p
        reports.append(report)
    return reports


def aggregate(run_dirs: list[str]) -> dict:
    reports = load_runs(run_dirs)
    merged = {k: _merge([r[k] for r in reports]) for k in reports[0]
              if k not in NOT_MERGED and all(k in r for r in reports)}
    merged.update(n_runs=len(reports), runs=[str(d) for d in run_dirs], seeds=[_training_seed(r) for r in reports],
                  tuned=reports[0].get("tuned", []), adapters=reports[0].get("adapters", {}))
    # Each seed's budget is its own run's record (limits, last check, held): listed per run, never averaged
    budgets = {f"{a} ({d})": b for d, r in zip(run_dirs, reports) for a, b in (r.get("forgetting_budget") or {}).items()}
    if budgets:
        merged["forgetting_budget"] = budgets
    return merged


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval aggregate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="eval output folders, one per training seed")
    p.add_argument("--out", required=True, help="folder for the merged report.md, report.json, plots/")
    return p


def main(argv=None) -> dict:
    from eval.report import headline, write_report

    args = make_parser().parse_args(argv)
    try:
        merged = aggregate(args.runs)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    report = write_report(merged, args.out)
    print(f"Aggregated {len(args.runs)} runs -> {Path(args.out) / 'report.md'}")
    print("\n".join(headline(report)))
    return report
