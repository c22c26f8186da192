"""`python -m eval --config recipes/quickstart/eval.yaml [--key value ...]`: evaluate base and adapters, write the report."""

from __future__ import annotations

import dataclasses
import os
import time

from eval.config import EvalConfig, check_paths, parse_config


def evaluate(cfg: EvalConfig) -> dict:
    import torch

    from eval.trait_specs import preflight
    from eval.variants import load_variants
    from train.hardware import peak_rss_gib

    check_paths(cfg)  # a bad path fails here, not after the suites before it have run
    specs = preflight(cfg)  # a trait without the spec sections a suite needs fails here, before any model loads
    torch.manual_seed(cfg.seed)
    timings, t0 = {}, time.time()
    variants = load_variants(cfg.model, cfg.adapters, cfg.dtype, cfg.device)
    # glibc keeps its default thresholds here (train.hardware.keep_freed_memory is training's): with them raised, the
    # eval's mix of logits, KV caches and generation buffers left 2 GB of freed heap resident (README "Performance")
    timings["load"] = time.time() - t0
    n_params = sum(p.numel() for name, p in variants.model.named_parameters() if "lora_" not in name)  # the base
    report = {
        "model": cfg.model, "adapters": dict(cfg.adapters), "tuned": variants.tuned, "template": variants.template_note,
        "n_parameters": n_params, "device": str(next(variants.model.parameters()).device),
        "dtype": str(next(variants.model.parameters()).dtype).replace("torch.", ""), "tiny_model": n_params < 5_000_000, "config": dataclasses.asdict(cfg),
    }

    from eval.report import forgetting_budgets

    budgets = forgetting_budgets(cfg.adapters)  # the training run's own drift guard, where it had one
    if budgets:
        report["forgetting_budget"] = budgets

    def timed(name, fn):
        t = time.time()
        print(f"[eval] {name} ...", flush=True)
        result = fn()
        timings[name] = time.time() - t
        return result

    if "preference" in cfg.suites:
        from eval.preference import (
            cross_trait_matrix,
            drop_unrenderable,
            framing_gap,
            length_stats,
            load_pairs,
            preference_tables,
            score_pairs,
            wording_gap,
        )

        rows = load_pairs(cfg.dataset_path, cfg.max_pairs_per_split, cfg.seed)
        rows, report["preference_skipped"] = drop_unrenderable(rows, variants.tokenizer)
        scored = timed("preference", lambda: score_pairs(variants, rows, cfg.batch_size, cfg.max_length))
        report["preference"] = preference_tables(rows, scored, cfg.bootstrap_samples, cfg.seed)
        report["preference_lengths"] = length_stats(rows, scored)
        report["framing_gap"] = framing_gap(rows, scored, cfg.bootstrap_samples, cfg.seed)
        report["wording_gap"] = wording_gap(rows, scored, cfg.bootstrap_samples, cfg.seed)
        report["cross_trait"] = cross_trait_matrix(report["preference"])
        if {"sft", "dpo"} <= set(scored):  # DPO continues SFT: what did it add? (same pairs, dpo minus sft)
            vs = preference_tables(rows, {"base": scored["sft"], "dpo": scored["dpo"]}, cfg.bootstrap_samples, cfg.seed)
            report["dpo_vs_sft"] = [rec for rec in vs if rec["model"] == "dpo"]
    if "forgetting" in cfg.suites or "diff" in cfg.suites:
        from eval.forgetting import forgetting_suite

        if variants.tuned:
            report["forgetting"] = timed("forgetting", lambda: forgetting_suite(variants, cfg))
    if "probes" in cfg.suites:
        from eval.forgetting import probes_suite

        report["probes"] = timed("probes", lambda: probes_suite(variants, cfg))
    if "endorsement" in cfg.suites:
        from eval.endorsement import endorsement_suite

        report["endorsement"] = timed("endorsement", lambda: endorsement_suite(variants, cfg, specs))
    if "generation" in cfg.suites:
        from eval.judges import generation_suite

        report["generation"] = timed("generation", lambda: generation_suite(variants, cfg, specs))
    if "mcq" in cfg.suites and (cfg.mcq_data or cfg.mcq):
        from eval.mcq import mcq_suite

        report["mcq"] = timed("mcq", lambda: mcq_suite(variants, cfg))
    if "lm_eval" in cfg.suites and cfg.lm_eval_tasks:
        from eval.lm_eval_bridge import lm_eval_suite

        report["lm_eval"] = timed("lm_eval", lambda: lm_eval_suite(variants, cfg))
    timings["total"] = time.time() - t0
    report["timings"] = timings
    report["peak_rss_gib"] = peak_rss_gib()
    return report


def main(argv: list[str] | None = None) -> dict:
    try:  # a bad key or type fails here, before any model is loaded
        cfg = parse_config(argv)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    from eval.report import headline, write_report

    report = write_report(evaluate(cfg), cfg.output_dir)
    if cfg.wandb:
        from eval.wandb_tables import log_report

        log_report(report, cfg)
    print(f"\nReport: {os.path.join(cfg.output_dir, 'report.md')}")
    print("\n".join(headline(report)))
    return report


if __name__ == "__main__":
    main()
