"""lm-evaluation-harness tasks on base and base+adapter (needs the `lm-eval` extra; built-in tasks need the Hub).

The harness runs on the already-loaded PEFT model; the base is the same model with adapters disabled, and both
use the one tokenizer (and chat template) chosen by `eval.variants`, so a delta is never a formatting difference.
Local tasks: put lm-eval task YAMLs in `lm_eval_include_path` (e.g. `dataset_path: json` with
`dataset_kwargs: {data_files: ...}`), which works offline.
"""

from __future__ import annotations

import math
from pathlib import Path


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _metric_name(key: str) -> tuple[str, str]:
    """lm-eval keys are "metric,filter"; the default filter "none" is dropped from the reported name."""
    metric, _, filt = key.partition(",")
    return metric, filt


def _label(metric: str, filt: str) -> str:
    return metric if filt == "none" else f"{metric},{filt}"


def _per_doc(samples: list[dict], metric: str, filt: str) -> dict[int, float]:
    return {s["doc_id"]: float(s[metric]) for s in samples if s.get("filter") == filt and _numeric(s.get(metric))}


def _paired_stderr(base: dict[int, float], tuned: dict[int, float]) -> float | None:
    """Standard error of the mean per-document difference: base and tuned answer the same documents, so pairing
    removes the shared item difficulty that two independent stderrs would count twice."""
    ids = sorted(base.keys() & tuned.keys())
    if len(ids) < 2:
        return None
    d = [tuned[i] - base[i] for i in ids]
    m = sum(d) / len(d)
    return math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def run_harness(model, tokenizer, tasks: list[str], task_manager, batch_size: int, limit, seed: int,
                chat_template: bool, bootstrap_iters: int) -> dict:
    """One `simple_evaluate` call on a loaded model: {"results", "samples", "n"} with numeric metrics only."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
                          apply_chat_template=chat_template, bootstrap_iters=bootstrap_iters, log_samples=True,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if res is None:  # only non-zero ranks under a multi-process launch get None
        raise RuntimeError("lm-eval returned no results (run the eval in a single process)")
    out = {}
    for task, metrics in res["results"].items():
        values, stderrs = {}, {}
        for key, v in metrics.items():
            if "," not in key:  # "alias", "sample_len": bookkeeping, not metrics
                continue
            metric, filt = _metric_name(key)
            if metric.endswith("_stderr"):
                stderrs[(metric[: -len("_stderr")], filt)] = v if _numeric(v) else None
            elif _numeric(v):
                values[(metric, filt)] = float(v)
        out[task] = {k: {"value": v, "stderr": stderrs.get(k)} for k, v in values.items()}
    n = {task: d.get("effective") for task, d in res.get("n-samples", {}).items()}
    return {"results": out, "samples": res.get("samples", {}), "n": n}


def lm_eval_suite(variants, cfg) -> dict:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("suite 'lm_eval' needs lm-evaluation-harness: pip install 'persona-pipeline[lm-eval]' "
                          "(lm-eval==0.4.13)") from None
    include = cfg.lm_eval_include_path
    if include and not Path(include).is_dir():
        raise FileNotFoundError(f"lm_eval_include_path {include}: not a folder of lm-eval task YAMLs")
    tm = TaskManager(include_path=include, include_defaults=False) if include else None
    if tm is None or any(t not in tm.all_tasks for t in cfg.lm_eval_tasks):
        tm = TaskManager(include_path=include)  # indexing lm-eval's own thousands of task YAMLs takes seconds
    unknown = [t for t in cfg.lm_eval_tasks if t not in tm.all_tasks and not Path(t).is_file()]
    if unknown:
        raise ValueError(f"lm_eval_tasks {unknown} not found in lm-eval's tasks"
                         + (f" or in {include}" if include else " (local tasks need lm_eval_include_path)"))

    runs = {}
    for name in variants.names:
        with variants.use(name) as model:
            runs[name] = run_harness(model, variants.tokenizer, cfg.lm_eval_tasks, tm, cfg.batch_size,
                                     cfg.lm_eval_limit, cfg.seed, cfg.lm_eval_chat_template, cfg.bootstrap_samples)

    base = runs["base"]
    summary = {}
    for task, metrics in base["results"].items():
        rows = {}
        for (metric, filt), b in metrics.items():
            row = {"base": b}
            base_docs = _per_doc(base["samples"].get(task, []), metric, filt)
            for name in variants.tuned:
                t = runs[name]["results"].get(task, {}).get((metric, filt))
                if t is None:
                    raise RuntimeError(f"lm-eval gave base but not '{name}' a value for {task} {metric}")
                tuned_docs = _per_doc(runs[name]["samples"].get(task, []), metric, filt)
                row[name] = {**t, "delta": t["value"] - b["value"], "delta_stderr": _paired_stderr(base_docs, tuned_docs)}
            rows[_label(metric, filt)] = row
        summary[task] = {"n": base["n"].get(task), "metrics": rows}
    return {
        "description": f"lm-evaluation-harness tasks {list(cfg.lm_eval_tasks)} (limit {cfg.lm_eval_limit}), "
                       + ("prompts in the chat template shared by base and tuned" if cfg.lm_eval_chat_template
                          else "plain prompts (no chat template)")
                       + ". Values +- lm-eval's stderr; delta is tuned minus base, +- the paired stderr over documents.",
        "tasks": list(cfg.lm_eval_tasks), "summary": summary,
    }


def _pm(value, stderr, signed=False) -> str:
    s = f"{value:+.3f}" if signed else f"{value:.3f}"
    return s + (f" ± {stderr:.3f}" if stderr is not None else "")


def lm_eval_markdown(section: dict, tuned: list[str]) -> list[str]:
    L = ["## lm-evaluation-harness", "", section.get("description", ""), "",
         "| task | metric | n | base | " + " | ".join(f"{a} | {a} - base" for a in tuned) + " |",
         "|---" * (4 + 2 * len(tuned)) + "|"]
    for task, rec in section["summary"].items():
        for metric, row in rec["metrics"].items():
            cells = [_pm(row["base"]["value"], row["base"]["stderr"])]
            for a in tuned:
                cells += [_pm(row[a]["value"], row[a]["stderr"]), _pm(row[a]["delta"], row[a]["delta_stderr"], signed=True)]
            L.append(f"| {task} | {metric} | {rec['n']} | " + " | ".join(cells) + " |")
    return L + [""]
