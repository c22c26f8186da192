"""lm-evaluation-harness tasks on base and base+adapter (needs the `lm-eval` extra and, for most tasks, the Hub).

The harness runs on the already-loaded PEFT model; the base is the same model with adapters disabled.
"""

from __future__ import annotations


def lm_eval_suite(variants, cfg) -> dict:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ImportError("suite 'lm_eval' needs lm-evaluation-harness: pip install 'persona-pipeline[lm-eval]' "
                          "(lm-eval==0.4.13)") from None
    results = {}
    for name in variants.names:
        with variants.use(name) as model:
            lm = HFLM(pretrained=model, tokenizer=variants.tokenizer, batch_size=cfg.batch_size)
            res = simple_evaluate(model=lm, tasks=list(cfg.lm_eval_tasks), limit=cfg.lm_eval_limit,
                                  random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed)
        results[name] = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                         for task, metrics in res["results"].items()}
    deltas = {name: {task: {k: v - results["base"][task].get(k, float("nan")) for k, v in m.items()}
                     for task, m in results[name].items()} for name in variants.tuned}
    return {"description": f"lm-evaluation-harness tasks {list(cfg.lm_eval_tasks)} (limit {cfg.lm_eval_limit}); "
                           "deltas are tuned minus base.", "summary": {"results": results, "delta_vs_base": deltas}}
