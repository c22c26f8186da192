"""The eval stage's W&B run: the report's tables, plots and headline numbers, and the report as an artifact.

Set up by train/tracking.py like every stage's run (online when logged in, else offline; never a prompt),
in the experiment's group, with the dataset and the adapters it scored named as its inputs.
"""

from __future__ import annotations

import os
from pathlib import Path


def report_tables(report: dict) -> dict[str, tuple[list[str], list[list]]]:
    """name -> (columns, rows): the same numbers as report.md."""
    tables = {}
    pref = report.get("preference", [])
    if pref:
        cols = ["trait", "split", "axis", "model", "norm_accuracy", "norm_acc_ci_low", "norm_acc_ci_high", "norm_accuracy_delta",
                "accuracy", "acc_ci_low", "acc_ci_high", "accuracy_delta", "norm_margin", "margin"]
        tables["preference"] = (cols, [[r["trait"], r["split"], r["axis"], r["model"], r["norm_accuracy"]["mean"],
                                        r["norm_accuracy"]["ci_low"], r["norm_accuracy"]["ci_high"],
                                        r.get("norm_accuracy_delta", {}).get("mean"), r["accuracy"]["mean"], r["accuracy"]["ci_low"],
                                        r["accuracy"]["ci_high"], r.get("accuracy_delta", {}).get("mean"), r["norm_margin"]["mean"],
                                        r["margin"]["mean"]] for r in pref])
    if report.get("framing_gap"):
        tables["framing_gap"] = (["trait", "model", "n_pairs", "norm_accuracy_gap", "accuracy_gap", "norm_margin_gap", "margin_gap"],
                                 [[r["trait"], r["model"], r["n_pairs"], r["norm_accuracy_gap"]["mean"], r["accuracy_gap"]["mean"],
                                   r["norm_margin_gap"]["mean"], r["margin_gap"]["mean"]] for r in report["framing_gap"]])
    if report.get("cross_trait"):
        tables["cross_trait"] = (["trait", "adapter", "norm_accuracy_delta", "ci_low", "ci_high"],
                                 [[t, a, d["mean"], d["ci_low"], d["ci_high"]] for t, row in report["cross_trait"].items() for a, d in row.items()])
    drift = report.get("forgetting", {}).get("drift", {})
    if drift:
        tables["forgetting"] = (["text", "adapter", "kl", "kl_ci_low", "kl_ci_high", "perplexity_base", "perplexity_tuned"],
                                [[s, a, d[a]["kl"]["mean"], d[a]["kl"]["ci_low"], d[a]["kl"]["ci_high"], d["base_perplexity"], d[a]["perplexity"]]
                                 for s, d in drift.items() for a in report.get("tuned", []) if a in d])
    diffs = report.get("forgetting", {}).get("top_diffs", {})
    if diffs:
        tables["top_diffs"] = (["adapter", "kl", "source", "text"],
                               [[a, r["kl"], r["source"], r["text"]] for a, rows in diffs.items() for r in rows])
    if report.get("probes"):
        tables["probes"] = (["probe_set", "model", "accuracy", "ci_low", "ci_high"],
                            [[n, m, v["accuracy"]["mean"], v["accuracy"]["ci_low"], v["accuracy"]["ci_high"]]
                             for n, rec in report["probes"].items() for m, v in rec.items()])
    return tables


def headline_summary(report: dict) -> dict:
    """run.summary: held-out preference accuracy and its change per model and split, drift, probes."""
    out = {}
    for r in report.get("preference", []):
        if r["trait"] == "all" and r["axis"] == "all" and r["split"] in ("eval_id", "eval_ood"):
            for metric in ("norm_accuracy", "accuracy", "norm_accuracy_delta", "accuracy_delta"):
                if r.get(metric, {}).get("mean") is not None:
                    out[f"{r['model']}/{r['split']}/{metric}"] = r[metric]["mean"]
    for src, d in report.get("forgetting", {}).get("drift", {}).items():
        for a in report.get("tuned", []):
            if a in d:
                out[f"{a}/kl/{src}"] = d[a]["kl"]["mean"]
                out[f"{a}/perplexity/{src}"] = d[a]["perplexity"]
    for name, rec in report.get("probes", {}).items():
        for model, v in rec.items():
            out[f"{model}/probe/{name}"] = v["accuracy"]["mean"]
    return out


def experiment_of(cfg) -> str:
    """The group of the runs that made what this eval scores: the adapters' experiment, else the output folder."""
    from train.tracking import experiment_name

    first = next(iter(cfg.adapters.values()), None)
    return experiment_name(first, None) if first else Path(cfg.output_dir).resolve().name


def log_report(report: dict, cfg) -> None:
    import wandb

    from train.tracking import artifact_name, folder_artifact, input_artifact, log_output, start_run, use_inputs

    experiment = experiment_of(cfg)
    out = Path(cfg.output_dir)
    run = start_run("eval", experiment=experiment, project=cfg.wandb_project, wandb_dir=out,
                    config=report.get("config", {}))
    use_inputs(run, [input_artifact(p) for p in [cfg.dataset_path, *cfg.adapters.values()] if p])
    run.summary.update(headline_summary(report))
    for name, (cols, rows) in report_tables(report).items():
        run.log({name: wandb.Table(columns=cols, data=rows)})
    for path in report.get("plots", []):
        run.log({f"plots/{os.path.basename(path)[:-4]}": wandb.Image(path)})
    run.save(str(out / "report.md"), base_path=str(out), policy="now")
    files = ["report.md", "report.json", *(Path(p).resolve().relative_to(out.resolve()).as_posix()
                                           for p in report.get("plots", []))]
    log_output(run, folder_artifact(artifact_name(experiment, "report"), "report", out, files))
    run.finish()
