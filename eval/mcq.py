"""Multiple-choice evals in the model-written-evals JSONL format, scored by log-likelihood of the answers.

Each row: `question` (str), `answer_matching_behavior` (str or list of str), `answer_not_matching_behavior`
(str or list of str). The model "matches the behaviour" when its most likely answer option is a matching one.
`python -m eval mcq --model M [--adapter DIR] --data FILE.jsonl --out RESULT.json`; `--data` may also be a
dataset (Hub id or local folder) with `--split`, `--config_name` and `--data_files`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from eval.config import EvalConfig, check_source
from eval.scoring import render_chat, score_items
from eval.stats import summarize

FIELDS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")


def _options(value) -> list[str] | None:
    if isinstance(value, str) and value.strip():
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return value
    return None


def check_row(row) -> dict:
    """The row's question and answer options; a ValueError says what is wrong (a null counts as missing)."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    missing = [f for f in FIELDS if row.get(f) is None]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise ValueError("'question' must be a non-empty string")
    match, other = _options(row[FIELDS[1]]), _options(row[FIELDS[2]])
    if match is None or other is None:
        raise ValueError("answers must be non-empty strings or lists of strings")
    same = sorted({a.strip() for a in match} & {a.strip() for a in other})
    if same:  # the model would "match" whichever it picks
        raise ValueError(f"answer {same[0]!r} is both matching and not matching")
    return {"question": row["question"], "matching": match, "not_matching": other}


def parse_rows(records, source: str, skip_bad_rows: bool = False, unit: str = "line") -> tuple[list[dict], list[dict]]:
    """Rows and the bad rows skipped. `records` yields (number, row), where row is a JSON line (unit "line",
    numbered from 1) or an already parsed dataset row (unit "row", numbered by dataset index from 0)."""
    rows, bad = [], []
    for number, record in records:
        try:
            if isinstance(record, str):
                if not record.strip():
                    continue
                record = json.loads(record)
            row = check_row(record)
        except ValueError as e:
            if not skip_bad_rows:
                raise ValueError(f"{source} {unit} {number}: {e} (use --skip_bad_rows to skip and count such rows)") from None
            bad.append({unit: number, "error": str(e)})
            continue
        rows.append({unit: number, **row})
    return rows, bad


def load_mcq(data: str, skip_bad_rows: bool = False, split: str = "train", config_name: str | None = None,
             data_files: str | None = None) -> tuple[list[dict], list[dict]]:
    """A local JSONL file, or a dataset: a Hub id (for users with Hub access), a local folder of data files
    or in the Hub's pushed layout (both read by `datasets.load_dataset`, like a Hub id), or a
    `save_to_disk` folder. `split`, `config_name` and `data_files` select within a dataset."""
    path = Path(data)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        return parse_rows(enumerate(lines, start=1), str(path), skip_bad_rows)
    check_source(data)
    from datasets import DatasetDict, load_dataset, load_from_disk

    source = f"{data} ({config_name + ', ' if config_name else ''}split {split!r})"
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise ValueError(f"{data}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
    else:
        ds = load_dataset(data, name=config_name, data_files=data_files, split=split)
    missing = [f for f in FIELDS if f not in ds.column_names]
    if missing:
        raise ValueError(f"{source}: no column(s) {missing}; columns are {ds.column_names} (expected the "
                         "model-written-evals layout: question, answer_matching_behavior, answer_not_matching_behavior)")
    return parse_rows(enumerate(ds), source, skip_bad_rows, unit="row")


def score_mcq(variants, rows: list[dict], batch_size: int = 8, max_length: int = 512) -> dict[str, np.ndarray]:
    """Per variant: 1.0 where the most likely option (total log-likelihood) is a matching one."""
    items, spans = [], []
    for r in rows:
        opts = r["matching"] + r["not_matching"]
        start = len(items)
        prompt = [{"role": "user", "content": r["question"]}]
        items += [render_chat(variants.tokenizer, prompt, o.strip(), max_length) for o in opts]
        spans.append((start, len(r["matching"]), len(opts)))
    scores = score_items(variants, items, batch_size, desc="mcq")
    out = {}
    for name, s in scores.items():
        lp = s["logprob"]
        out[name] = np.array([float(np.argmax(lp[a:a + k]) < m) for a, m, k in spans])
    return out


def mcq_result(matching: np.ndarray, base: np.ndarray | None, direction: str, bad: list[dict], n_boot: int, seed: int) -> dict:
    from eval.stats import paired_delta

    s = summarize(matching, n_boot, seed)
    res = {"n": s["n"], "matching_behavior_rate": s["mean"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
           "trait_direction": direction,
           "trait_consistent_rate": s["mean"] if direction == "matching" else 1 - s["mean"],
           "skipped_bad_rows": len(bad), "bad_rows": bad[:50]}
    if base is not None:
        res["change_vs_base"] = paired_delta(matching, base, n_boot, seed)
    return res


def mcq_suite(variants, cfg) -> dict:
    """Every set in the recipe's `mcq` entries and `mcq_data`, keyed by dataset (plus data_files when given)."""
    out = {"description": "Multiple-choice questions scored by answer log-likelihood. matching_behavior_rate is the "
                          "share of questions where the most likely answer matches the behaviour; "
                          "trait_consistent_rate reads it in each set's trait direction (default "
                          f"'{cfg.mcq_trait_direction}').", "summary": {}}
    sets = [{"dataset": d} for d in cfg.mcq_data] + list(cfg.mcq)
    for entry in sets:
        direction = entry.get("trait_direction", cfg.mcq_trait_direction)
        rows, bad = load_mcq(entry["dataset"], split=entry.get("split", cfg.mcq_split),
                             config_name=entry.get("config_name", cfg.mcq_config_name), data_files=entry.get("data_files"))
        if not rows:
            raise ValueError(f"mcq: {entry['dataset']} {entry.get('data_files', '')}: no usable rows")
        scored = score_mcq(variants, rows, cfg.batch_size, cfg.max_length)
        key = entry["dataset"] + (f" [{entry['data_files']}]" if entry.get("data_files") else "")
        out["summary"][key] = {name: mcq_result(v, scored["base"] if name != "base" else None, direction,
                                                bad, cfg.bootstrap_samples, cfg.seed) for name, v in scored.items()}
    return out


def _eval_key(name: str) -> dict:
    """The default, type and choices of the eval recipe key `name` (EvalConfig), for the flag that is the same key."""
    import dataclasses
    import typing

    field = {f.name: f for f in dataclasses.fields(EvalConfig)}[name]
    tp = typing.get_type_hints(EvalConfig)[name]
    if typing.get_origin(tp) is typing.Literal:
        return {"default": field.default, "choices": list(typing.get_args(tp))}
    return {"default": field.default, **({"type": tp} if tp in (int, float) else {})}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval mcq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model: embedded name, Hub id or local folder")
    p.add_argument("--adapter", help="PEFT adapter folder; the result is for base+adapter (and base, for comparison)")
    p.add_argument("--data", required=True, help="JSONL file, Hub dataset id, or a local dataset folder (data files, "
                                                  "the Hub's pushed layout, or a save_to_disk folder)")
    p.add_argument("--split", **_eval_key("mcq_split"), help="dataset split (for a dataset; default: %(default)s)")
    p.add_argument("--config_name", **_eval_key("mcq_config_name"),
                   help="dataset configuration (subset) name, if the dataset has several")
    p.add_argument("--data_files", help="file(s) within the dataset to read, e.g. persona/no-shut-down.jsonl")
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--trait_direction", **_eval_key("mcq_trait_direction"),
                   help="which answer is the trait-consistent one (default: answer_matching_behavior)")
    p.add_argument("--skip_bad_rows", action="store_true", help="skip malformed rows and count them instead of failing")
    p.add_argument("--batch_size", **_eval_key("batch_size"))
    p.add_argument("--bootstrap_samples", **_eval_key("bootstrap_samples"))
    p.add_argument("--seed", **_eval_key("seed"))
    return p


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    try:
        # bad data fails before the model loads
        rows, bad = load_mcq(args.data, args.skip_bad_rows, args.split, args.config_name, args.data_files)
    except (ValueError, FileNotFoundError, ConnectionError) as e:  # ConnectionError: a Hub id while offline
        raise SystemExit(f"error: {e}") from None
    if not rows:
        raise SystemExit(f"error: {args.data}: no usable rows")
    from eval.variants import load_variants

    variants = load_variants(args.model, {"adapter": args.adapter} if args.adapter else {})
    scored = score_mcq(variants, rows, args.batch_size)
    name = variants.names[-1]
    result = mcq_result(scored[name], scored["base"] if args.adapter else None, args.trait_direction, bad,
                        args.bootstrap_samples, args.seed)
    result.update(model=args.model, adapter=args.adapter, data=args.data)
    if args.adapter:
        result["base"] = mcq_result(scored["base"], None, args.trait_direction, [], args.bootstrap_samples, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.data}: n={result['n']} matching_behavior_rate={result['matching_behavior_rate']:.3f} "
          f"[{result['ci_low']:.3f}, {result['ci_high']:.3f}] skipped={len(bad)} -> {args.out}")
    return result
