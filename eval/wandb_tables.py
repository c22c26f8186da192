"""Log the report's tables to W&B (offline unless WANDB_MODE says otherwise; never prompts for a login)."""

from __future__ import annotations

import os


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


def log_report(report: dict, cfg) -> None:
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", cfg.output_dir)
    run = wandb.init(project=cfg.wandb_project, job_type="eval", config=report.get("config", {}), reinit="finish_previous")
    for name, (cols, rows) in report_tables(report).items():
        run.log({name: wandb.Table(columns=cols, data=rows)})
    for path in report.get("plots", []):
        run.log({f"plots/{os.path.basename(path)[:-4]}": wandb.Image(path)})
    run.finish()
