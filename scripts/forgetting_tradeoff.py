"""Trait gain vs forgetting, plain SFT against anchored SFT, over training seeds; and how well the persona monitor's
projection shift predicted the trait changes.

    python scripts/forgetting_tradeoff.py [--seeds 3] [--anchor-weights 0 2.0] [--steps 60] [--out runs/tradeoff]
    python scripts/forgetting_tradeoff.py --recipes recipes/smoke --seeds 1 --steps 4   # the plumbing, in seconds

A thin driver, like scripts/quickstart.sh: every step is one of the pipeline's own commands, run as a subprocess,
and this script only reads the JSON they write.

1. Data: `python -m data_gen --config RECIPES/data.yaml` into the recipe's output_dir, unless it is already there.
2. For each training seed k (outer loop, so that a stopped measurement leaves whole seeds) and each anchor weight w:
   `accelerate launch ... -m train.sft --config RECIPES/sft.yaml --seed k --anchor_weight w --persona_monitor true
   --max_steps STEPS --save_steps EVERY --save_total_limit null` into OUT/w{w}/seed{k}/sft (checkpoints every
   EVERY steps are kept; a finished run is left as it is and reused).
3. `python -m eval --config RECIPES/eval.yaml --suites [preference, endorsement, forgetting, probes]` of that run's
   checkpoints and final adapter into OUT/w{w}/seed{k}/eval. A checkpoint folder carries the adapter, tokenizer and
   chat template but no training manifest; eval accepts it as an adapter whose adapter_config.json names the eval
   base (the manifest's sha256 check applies to the final adapter only).
4. From each report.json: the change vs base of length-normalised preference accuracy on eval_id and eval_ood
   (trait "all", axis "all": unseen answer wording only), of the endorsement margin, KL(tuned || base) on news text
   and on neutral chat, and of capability-probe accuracy; per arm (anchor weight) the mean across seeds with the
   repo's across-seed interval (`eval.stats.across_runs`: t across seeds combined with the item bootstrap), and the
   anchored-minus-plain difference paired by seed (t interval across seeds).
5. `python -m eval.persona_correlation` on the per-trait preference accuracy changes at every checkpoint.
6. OUT/tradeoff.json, OUT/tradeoff.md (tables) and OUT/tradeoff.png (trait gain vs drift), rewritten after every
   evaluated run, so a measurement stopped early leaves the summary of what finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = "[preference, endorsement, forgetting, probes]"
# (key, label, is a share (shown in points)); KL is a level (>= 0), the others are changes vs base
METRICS = (
    ("pref_eval_id", "preference accuracy change, eval_id (unseen wording), pts", True),
    ("pref_eval_ood", "preference accuracy change, eval_ood, pts", True),
    ("endorsement_margin", "endorsement margin change (log-odds)", False),
    ("kl_reference_text", "KL(tuned ‖ base), news text", False),
    ("kl_neutral_chat", "KL(tuned ‖ base), neutral chat", False),
    ("probe_accuracy", "probe accuracy change, pts", True),
)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="recipes/quickstart", help="folder with data.yaml, sft.yaml and eval.yaml")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..S-1")
    p.add_argument("--anchor-weights", "--anchor_weights", dest="anchor_weights", type=float, nargs="+",
                   default=[0.0, 2.0], help="anchor weights to compare (0: plain SFT)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--checkpoint-every", "--checkpoint_every", dest="checkpoint_every", type=int, default=None,
                   help="save and evaluate a checkpoint every N steps (default: steps / 3)")
    p.add_argument("--out", default="runs/tradeoff")
    p.add_argument("--data", default=None, help="data_gen folder (default: data.yaml's output_dir; made if absent)")
    p.add_argument("--bootstrap", type=int, default=None,
                   help="bootstrap resamples for eval and the correlation (default: the eval recipe's, and 2000)")
    return p


def run(cmd: list[str], what: str) -> None:
    t0 = time.time()
    print(f"\n==> {what}\n    $ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    print(f"    {what} done in {time.time() - t0:.0f}s", flush=True)


def weight_name(w: float) -> str:
    return f"w{w:g}"


# Reading the reports ----------------------------------------------------------------------------------------------

def _pref(report: dict, adapter: str, trait: str, split: str) -> dict | None:
    for rec in report.get("preference", []):
        if (rec["model"], rec["trait"], rec["split"], rec["axis"]) == (adapter, trait, split, "all"):
            return rec.get("norm_accuracy_delta")
    return None


def read_report(report: dict, adapter: str) -> dict:
    """One adapter's numbers from an eval report.json (each a summary {mean, ci_low, ci_high, n, ...} or None)."""
    drift = (report.get("forgetting") or {}).get("drift", {})
    endorsement = next((r.get("margin_delta") for r in (report.get("endorsement") or {}).get("summary", [])
                        if r["model"] == adapter and r["trait"] == "all"), None)
    probes = {name: rec[adapter]["accuracy_delta"] for name, rec in (report.get("probes") or {}).items() if adapter in rec}
    traits = sorted({r["trait"] for r in report.get("preference", []) if r["trait"] != "all"})
    return {
        "pref_eval_id": _pref(report, adapter, "all", "eval_id"),
        "pref_eval_ood": _pref(report, adapter, "all", "eval_ood"),
        "endorsement_margin": endorsement,
        "kl_reference_text": (drift.get("reference_text", {}).get(adapter) or {}).get("kl"),
        "kl_neutral_chat": (drift.get("neutral_chat", {}).get(adapter) or {}).get("kl"),
        "probe_accuracy": next(iter(probes.values()), None),
        "probes": probes,
        # per trait, both splits pooled (unseen wording): the points of the persona-monitor correlation
        "trait_changes": {t: (_pref(report, adapter, t, "all") or {}).get("mean") for t in traits},
    }


# Statistics -------------------------------------------------------------------------------------------------------

def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def t_interval(values: list[float]) -> dict:
    """Mean and its two-sided 95% t interval (n - 1 degrees of freedom); no interval from one value."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n_seeds": n, "per_seed": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n_seeds": n, "per_seed": values}


def summarize_runs(runs: list[dict], weights: list[float]) -> tuple[dict, dict]:
    """Per arm and checkpoint: across seeds (`eval.stats.across_runs`); and anchored minus plain, paired by seed."""
    from eval.stats import across_runs

    arms = {}
    for w in weights:
        mine = [r for r in runs if r["anchor_weight"] == w]
        labels = [c["label"] for c in mine[0]["checkpoints"]] if mine else []
        arm = {"anchor_weight": w, "n_seeds": len(mine), "seeds": [r["seed"] for r in mine], "checkpoints": {}}
        for label in labels:
            cell = {}
            for key, *_ in METRICS:
                summaries = [c[key] for r in mine for c in r["checkpoints"] if c["label"] == label and c[key]]
                summaries = [s for s in summaries if _finite(s.get("mean"))]
                if len(summaries) == len(mine):
                    pooled = across_runs([{k: (float("nan") if v is None else v) for k, v in s.items()
                                           if k in ("mean", "ci_low", "ci_high", "n", "p_value")} for s in summaries])
                    cell[key] = {**pooled, "t_across_seeds": t_interval([s["mean"] for s in summaries])}
            arm["checkpoints"][label] = cell
        arms[f"{w:g}"] = arm
    contrasts = {}
    plain = weights[0]
    for w in weights[1:]:
        paired = {}
        for label in arms[f"{w:g}"]["checkpoints"]:
            cell = {}
            for key, *_ in METRICS:
                diffs = []
                for r in runs:
                    if r["anchor_weight"] != w:
                        continue
                    twin = next((p for p in runs if p["anchor_weight"] == plain and p["seed"] == r["seed"]), None)
                    a = next((c[key] for c in r["checkpoints"] if c["label"] == label), None)
                    b = next((c[key] for c in (twin or {}).get("checkpoints", []) if c["label"] == label), None)
                    if a and b and _finite(a.get("mean")) and _finite(b.get("mean")):
                        diffs.append(a["mean"] - b["mean"])
                if diffs:
                    cell[key] = t_interval(diffs)
            paired[label] = cell
        contrasts[f"{w:g} minus {plain:g}"] = paired
    return arms, contrasts


# Output -----------------------------------------------------------------------------------------------------------

def _num(s: dict | None, pct: bool, signed: bool = True) -> str:
    if not s or not _finite(s.get("mean")):
        return "n/a"
    sign = "+" if signed else ""
    f = (lambda x: f"{100 * x:{sign}.1f}") if pct else (lambda x: f"{x:{sign}.3g}")
    lo, hi = s.get("ci_low"), s.get("ci_high")
    text = f(s["mean"])
    if _finite(lo) and _finite(hi):
        text += f" [{f(lo)}, {f(hi)}]"
    return text


def _verdict(d: dict | None) -> str:
    if not d or d.get("ci_low") is None:
        return "no interval (one seed)"
    if d["ci_low"] == d["ci_high"]:  # seeds that agree exactly (an accuracy moves in whole items): no spread to test
        return f"same value in all {d['n_seeds']} seeds: no interval"
    if d["ci_low"] > 0 or d["ci_high"] < 0:
        return "interval excludes 0"
    return "within noise"


def write_markdown(result: dict, path: Path) -> None:
    weights = result["anchor_weights"]
    arms, contrasts = result["arms"], result["contrasts"]
    final = result["final_label"]
    L = ["# Forgetting trade-off: plain vs anchored SFT", "",
         f"Recipes `{result['recipes']}`, {result['steps']} steps, anchor weights {', '.join(f'{w:g}' for w in weights)} "
         f"(0 = plain SFT), training seeds finished per arm: "
         + ", ".join(f"w={a['anchor_weight']:g}: {a['n_seeds']}" for a in arms.values()) + ".", "",
         "Changes are tuned minus base on the same eval items; preference accuracy is length-normalised, trait "
         "\"all\", unseen answer wording; shares in points. Arm cells: mean across seeds [95% interval combining "
         "the t interval across seeds with the item bootstrap, `eval.stats.across_runs`]. Difference cells: "
         "anchored minus plain, paired by seed (same seed: same LoRA init and data order), mean [t 95% interval "
         "across seeds]; with one seed there is no interval.", ""]
    for label in [final] + [c for c in result["checkpoint_labels"] if c != final]:
        head = ["metric"] + [f"w={w:g}" for w in weights] + [f"{k} (paired)" for k in contrasts]
        L += [f"## {'Final adapter' if label == final else 'Checkpoint ' + label} "
              f"(step {result['checkpoint_steps'][label]})", "",
              "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for key, name, pct in METRICS:
            cells = [_num(arms[f"{w:g}"]["checkpoints"].get(label, {}).get(key), pct, not key.startswith("kl_"))
                     for w in weights]
            for c in contrasts.values():
                d = c.get(label, {}).get(key)
                cells.append(f"{_num(d, pct)} ({_verdict(d)})" if d else "n/a")
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L.append("")
    L += ["## Per run (final adapter)", "",
          "| anchor weight | seed | " + " | ".join(name for _, name, _ in METRICS) + " |",
          "|---|---|" + "---|" * len(METRICS)]
    for r in result["runs"]:
        c = next((c for c in r["checkpoints"] if c["label"] == final), None)
        if c:
            L.append(f"| {r['anchor_weight']:g} | {r['seed']} | "
                     + " | ".join(_num(c[key], pct, not key.startswith("kl_")) for key, _, pct in METRICS) + " |")
    L.append("")
    corr = result.get("persona_correlation")
    L += ["## Persona monitor: projection shift vs measured trait change", ""]
    if corr:
        o = corr["overall"]
        L += ["One point per (run, checkpoint, trait): the shift of the trait's projection since step 0 "
              "(persona_monitor.json) against the change in that trait's preference accuracy vs base (both "
              "splits, unseen wording). Pearson r with a Fisher-z 95% interval and a bootstrap interval that "
              "resamples whole runs (`eval.persona_correlation`).", "",
              "| traits | points | runs | r | Fisher-z 95% | run bootstrap 95% |", "|---|---|---|---|---|---|"]

        def row(name, s):
            return (f"| {name} | {s['n']} | {s['runs']} | {s['r'] if s['r'] is not None else 'n/a'} | "
                    f"{s['fisher_ci95'] or 'n/a'} | {s['bootstrap_ci95'] or 'n/a'} |")

        L.append(row("all traits", o))
        L += [row(t, s) for t, s in corr["per_trait"].items()]
    else:
        L.append("Not computed.")
    L += ["", "## Notes", "",
          "- Checkpoints other than the final adapter are evaluated from their checkpoint folders (adapter, "
          "tokenizer and chat template, no training manifest); eval checks that their adapter_config.json names "
          "the eval base, but only the final adapter's weights are checked against a manifest's sha256.",
          "- Every run is scored on the same eval items (same data and eval recipe), so the item sampling is "
          "shared by all arms; the paired difference's t interval covers seed-to-seed variation only.",
          "- The anchor's replay text is disjoint from eval's news paragraphs (train/forgetting_budget.py), so the "
          "KL on news text is not measured on text the anchor trained on.", "",
          "![trait gain vs drift](tradeoff.png)", ""]
    path.write_text("\n".join(L))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = result["anchor_weights"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, name in ((axes[0], "pref_eval_id", "eval_id"), (axes[1], "pref_eval_ood", "eval_ood")):
        for i, w in enumerate(weights):
            colour = colours[i % len(colours)]
            for r in (r for r in result["runs"] if r["anchor_weight"] == w):
                pts = [(c["kl_reference_text"]["mean"], 100 * c[key]["mean"]) for c in r["checkpoints"]
                       if c.get("kl_reference_text") and c.get(key)]
                if pts:
                    ax.plot(*zip(*pts), color=colour, alpha=0.35, lw=0.8, marker=".", ms=4, zorder=3)
                    ax.plot(*pts[-1], color=colour, marker="o", ms=6, mec="white", ls="none", zorder=4)
            cell = result["arms"][f"{w:g}"]["checkpoints"].get(result["final_label"], {})
            x, y = cell.get("kl_reference_text"), cell.get(key)
            if x and y:
                ax.errorbar(x["mean"], 100 * y["mean"],
                            xerr=[[x["mean"] - x["ci_low"]], [x["ci_high"] - x["mean"]]],
                            yerr=[[100 * (y["mean"] - y["ci_low"])], [100 * (y["ci_high"] - y["mean"])]],
                            color=colour, marker="D", ms=9, mec="black", capsize=4, lw=1.5, alpha=0.6, zorder=2,
                            label=f"anchor weight {w:g} (mean of {result['arms'][f'{w:g}']['n_seeds']} seeds, 95%)")
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("drift: mean per-token KL(tuned || base) on news text")
        ax.set_ylabel(f"trait gain: preference accuracy change, {name} (pts)")
        ax.set_title(f"Trait gain ({name}) vs drift")
        ax.legend(fontsize=7)
    fig.suptitle("Plain vs anchored SFT: one dot per run (final adapter; the line runs through its checkpoints), "
                 "diamonds: mean across seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def correlation(runs: list[dict], out: Path, bootstrap: int | None) -> dict | None:
    points = [{"run": r["train_dir"], "trait": t, "step": c["step"], "change": v}
              for r in runs for c in r["checkpoints"] for t, v in c["trait_changes"].items() if _finite(v)]
    if not points:
        return None
    (out / "changes.json").write_text(json.dumps({"points": points}, indent=1) + "\n")
    cmd = [sys.executable, "-m", "eval.persona_correlation", "--changes", str(out / "changes.json"),
           "--out", str(out / "persona_correlation.json")]
    run(cmd + (["--bootstrap", str(bootstrap)] if bootstrap else []), "persona-monitor correlation")
    result = json.loads((out / "persona_correlation.json").read_text())
    return {k: result[k] for k in ("overall", "per_trait")}


def _strict(obj):
    """Strict JSON: a number that could not be computed (NaN) is null."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_summary(runs: list[dict], args, out: Path, labels: list[str], steps_of: dict, commands: dict) -> dict:
    arms, contrasts = summarize_runs(runs, args.anchor_weights)
    result = {"recipes": args.recipes, "steps": args.steps, "anchor_weights": args.anchor_weights,
              "seeds_asked": args.seeds, "checkpoint_labels": labels, "checkpoint_steps": steps_of,
              "final_label": labels[-1], "metrics": {k: name for k, name, _ in METRICS},
              "interval_notes": {"arms": "eval.stats.across_runs: t across seeds combined with the item bootstrap",
                                 "contrasts": "anchored minus plain paired by seed, t interval across seeds"},
              "arms": arms, "contrasts": contrasts, "runs": runs, "commands": commands,
              "persona_correlation": correlation(runs, out, args.bootstrap)}
    (out / "tradeoff.json").write_text(json.dumps(_strict(result), indent=1, allow_nan=False) + "\n")
    write_markdown(result, out / "tradeoff.md")
    plot(result, out / "tradeoff.png")
    print(f"    wrote {out / 'tradeoff.md'}, tradeoff.json, tradeoff.png ({len(runs)} run(s))", flush=True)
    return result


# Main -------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    os.chdir(ROOT)  # recipes and runs/ relative to the repository, as scripts/quickstart.sh does
    import yaml

    every = args.checkpoint_every or max(1, args.steps // 3)
    if args.seeds < 1 or args.steps < 1 or every > args.steps:
        raise SystemExit("--seeds and --steps must be >= 1 and --checkpoint-every at most --steps")
    if args.anchor_weights[0] != 0 or len(args.anchor_weights) < 2:
        raise SystemExit("--anchor-weights: the first must be 0 (plain SFT, the comparison), then one or more > 0")
    recipes = Path(args.recipes)
    data = Path(args.data or yaml.safe_load((recipes / "data.yaml").read_text())["output_dir"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    import torch

    accel = "recipes/accelerate_configs/" + ("single_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml")
    steps = sorted({*range(every, args.steps + 1, every), args.steps})
    labels = [f"c{s}" for s in steps[:-1]] + ["final"]
    steps_of = dict(zip(labels, steps))
    commands = {}

    if not (data / "dpo").is_dir():
        run([py, "-m", "data_gen", "--config", str(recipes / "data.yaml"), "--output_dir", str(data), "--wandb", "false"],
            "data")
    runs = []
    for seed in range(args.seeds):
        for w in args.anchor_weights:
            folder = out / weight_name(w) / f"seed{seed}"
            train_dir, eval_dir = folder / "sft", folder / "eval"
            train = [py, "-m", "accelerate.commands.launch", "--config_file", accel, "-m", "train.sft",
                     "--config", str(recipes / "sft.yaml"), "--dataset_name", str(data), "--output_dir", str(train_dir),
                     "--seed", str(seed), "--anchor_weight", f"{w:g}", "--budget_eval_recipe", str(recipes / "eval.yaml"),
                     "--persona_monitor", "true", "--max_steps", str(args.steps), "--save_strategy", "steps",
                     "--save_steps", str(every), "--save_total_limit", "null", "--report_to", "none"]
            run(train, f"SFT seed {seed}, anchor weight {w:g}")  # a finished run with this recipe is left as it is
            adapters = {label: str(train_dir if label == "final" else train_dir / f"checkpoint-{s}")
                        for label, s in steps_of.items()}
            evaluate = [py, "-m", "eval", "--config", str(recipes / "eval.yaml"), "--dataset_path", str(data),
                        "--suites", SUITES, "--adapters", json.dumps(adapters), "--output_dir", str(eval_dir),
                        "--wandb", "false"] + (["--bootstrap_samples", str(args.bootstrap)] if args.bootstrap else [])
            report_path = eval_dir / "report.json"
            previous = json.loads(report_path.read_text()) if report_path.is_file() else None
            # a report of these adapters, with these suites, written after the run finished: scored already
            if (previous and previous.get("adapters") == adapters
                    and previous.get("config", {}).get("suites") == SUITES.strip("[]").split(", ")
                    and report_path.stat().st_mtime > (train_dir / "training_manifest.json").stat().st_mtime):
                print(f"\n==> eval seed {seed}, anchor weight {w:g}: reusing {report_path}", flush=True)
            else:
                run(evaluate, f"eval seed {seed}, anchor weight {w:g}")
            commands[f"{weight_name(w)}/seed{seed}"] = {"train": train, "eval": evaluate}
            report = json.loads(report_path.read_text())
            runs.append({"anchor_weight": w, "seed": seed, "train_dir": str(train_dir), "eval_dir": str(eval_dir),
                         "checkpoints": [{"label": label, "step": s, **read_report(report, label)}
                                         for label, s in steps_of.items()]})
            result = write_summary(runs, args, out, labels, steps_of, commands)
    print(f"\nDone: {out / 'tradeoff.md'}", flush=True)
    return result


if __name__ == "__main__":
    main()
