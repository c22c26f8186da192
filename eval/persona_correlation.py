"""How well the persona monitor's projection shift predicted the trait change that was measured.

    python -m eval.persona_correlation --changes changes.json [--out persona_correlation.json]

Data it needs:
- monitor records: per training run, the `persona_monitor.json` the run wrote (train/persona_monitor.py): a list of
  {"step": int, "projections": {trait: float}}, the first record being the baseline before training.
- measured changes: one point per (run, checkpoint, trait): {"run": run folder, "trait": str, "change": float,
  "step": int or null}, e.g. the trait's preference accuracy of that checkpoint minus the base model's, from the eval
  reports. `step` null means the run's last record. `changes.json` is {"points": [...]}.

The shift of a point is the trait's projection at the last record at or before its step minus the baseline. The
answer: Pearson r over the points with a Fisher-z 95% interval and a bootstrap interval that resamples whole runs
(checkpoints of one run are not independent), overall and per trait.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def fisher_interval(r: float, n: int, z_crit: float = 1.959964) -> list[float] | None:
    if n <= 3 or r is None:
        return None
    z, se = math.atanh(max(min(r, 0.999999), -0.999999)), 1 / math.sqrt(n - 3)
    return [round(math.tanh(z - z_crit * se), 4), round(math.tanh(z + z_crit * se), 4)]


def shift(records: list[dict], trait: str, step: int | None) -> float:
    """The trait's projection at the last record at or before `step` (None: the last one) minus the first record's."""
    records = sorted(records, key=lambda r: r["step"])
    upto = [r for r in records if step is None or r["step"] <= step]
    if not upto or trait not in records[0]["projections"]:
        raise KeyError(f"no persona record of trait {trait!r} at or before step {step}")
    return upto[-1]["projections"][trait] - records[0]["projections"][trait]


def _summary(points: list[dict], n_boot: int, seed: int) -> dict:
    xs, ys = [p["shift"] for p in points], [p["change"] for p in points]
    r = _pearson(xs, ys)
    runs = sorted({p["run"] for p in points})
    boot = []
    rng = random.Random(seed)
    if r is not None and len(runs) > 1:
        by_run = {run: [p for p in points if p["run"] == run] for run in runs}
        for _ in range(n_boot):
            sample = [p for run in rng.choices(runs, k=len(runs)) for p in by_run[run]]
            b = _pearson([p["shift"] for p in sample], [p["change"] for p in sample])
            if b is not None:
                boot.append(b)
    boot.sort()
    ci = [round(boot[int(0.025 * (len(boot) - 1))], 4), round(boot[int(0.975 * (len(boot) - 1))], 4)] if boot else None
    return {"n": len(points), "runs": len(runs), "r": None if r is None else round(r, 4),
            "fisher_ci95": fisher_interval(r, len(points)), "bootstrap_ci95": ci, "bootstrap_resamples": len(boot)}


def correlate(monitor_records: dict[str, list[dict]], measured_changes: list[dict], n_boot: int = 2000,
              seed: int = 0) -> dict:
    """Correlation of projection shift with measured change (see the module docstring for the inputs)."""
    points = []
    for c in measured_changes:
        if c["run"] not in monitor_records:
            raise KeyError(f"measured change for run {c['run']!r}, which has no persona monitor records")
        points.append({**c, "shift": shift(monitor_records[c["run"]], c["trait"], c.get("step"))})
    traits = sorted({p["trait"] for p in points})
    return {"overall": _summary(points, n_boot, seed),
            "per_trait": {t: _summary([p for p in points if p["trait"] == t], n_boot, seed) for t in traits},
            "points": points}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", required=True, help='JSON {"points": [{run, trait, change, step}]}')
    parser.add_argument("--out", default=None, help="Write the result here (JSON); default: print it")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    changes = json.loads(Path(args.changes).read_text(encoding="utf-8"))["points"]
    records = {}
    for run in sorted({c["run"] for c in changes}):
        path = Path(run) / "persona_monitor.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run {run} has no persona monitor records (train with persona_monitor)")
        records[run] = json.loads(path.read_text(encoding="utf-8"))
    result = correlate(records, changes, args.bootstrap)
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        from train.outputs import write_atomic

        write_atomic(Path(args.out), text)
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
