"""Preference accuracy and log-likelihood margins on held-out DPO pairs, per trait, split and axis; framing gap.

Two accuracies per pair set. `norm_accuracy` (the headline, lm-eval's `acc_norm` idea): the share of pairs where
the trait-consistent (chosen) answer has the higher MEAN per-token log-likelihood. `accuracy`: the same with
SUMMED log-likelihoods, which penalises every extra token, so when chosen answers are systematically longer (or
shorter) than rejected ones it measures length as much as the trait. The margins are the differences in summed and
in mean per-token log-likelihood.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import numpy as np

from eval.scoring import render_chat, score_items
from eval.stats import paired_delta, summarize
from train import contract
from train.contract import validate_rows

SPLITS = tuple(s for s in contract.SPLITS if s != "train")  # the held-out splits
# report metric -> per-pair array from score_pairs
METRICS = (("norm_accuracy", "norm_correct"), ("accuracy", "correct"), ("norm_margin", "norm_margin"), ("margin", "margin"))
# chosen and rejected answers whose mean token lengths differ by more than this make summed accuracy a length test
LENGTH_GAP_WARN = 0.15


def load_pairs(dataset_path: str, max_per_split: int | None = None, seed: int = 0) -> list[dict]:
    from datasets import load_from_disk

    path = Path(dataset_path) / "dpo"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no DPO dataset folder (expected data_gen output with dpo/)")
    dd = load_from_disk(str(path))
    rows = []
    for split in SPLITS:
        if split not in dd:
            raise ValueError(f"{path}: split '{split}' missing (has {list(dd.keys())})")
        validate_rows(dd[split], "dpo", f"{path} split {split}", split=split)  # every dpo column, allowed values
        split_rows = list(dd[split])
        if max_per_split and len(split_rows) > max_per_split:
            split_rows = _subsample(split_rows, max_per_split, seed)
        for i, r in enumerate(split_rows):
            for col in ("chosen", "rejected"):
                if not r[col] or r[col][-1].get("role") != "assistant":
                    raise ValueError(f"{path} split {split} row {i} (id {r['id']}): '{col}' must end with an assistant message")
            if not r["prompt"] or r["prompt"][-1].get("role") != "user":
                raise ValueError(f"{path} split {split} row {i} (id {r['id']}): 'prompt' must end with a user message")
            rows.append(dict(r, split=split))
    return rows


def _subsample(rows, k, seed):
    """A seeded subsample of about `k` rows, stratified by (trait, axis) so every cell keeps some pairs, with
    whole framing pairs kept together so the framing gap stays paired."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["pair_id"] or r["id"]].append(r)
    strata = defaultdict(list)
    for key in sorted(groups):
        first = groups[key][0]
        strata[(first["trait"], first["axis"])].append(key)
    rng = random.Random(seed)
    queues = []
    for stratum in sorted(strata):
        keys = strata[stratum]
        rng.shuffle(keys)
        queues.append(keys)
    out = []
    while len(out) < k and any(queues):
        for keys in queues:  # round-robin across strata
            if keys and len(out) < k:
                out += groups[keys.pop()]
    return out


def score_pairs(variants, rows: list[dict], batch_size: int, max_length: int) -> dict[str, dict]:
    """Per variant: arrays `margin`, `norm_margin`, `correct`, `norm_correct`, `chosen_tokens`, `rejected_tokens`
    aligned with `rows`."""
    tok = variants.tokenizer
    items = []
    for r in rows:
        items.append(render_chat(tok, r["prompt"], r["chosen"][-1]["content"], max_length))
        items.append(render_chat(tok, r["prompt"], r["rejected"][-1]["content"], max_length))
    scores = score_items(variants, items, batch_size, desc="preference pairs")
    out = {}
    for name, s in scores.items():
        lp, n = s["logprob"], s["n_tokens"]
        margin = lp[0::2] - lp[1::2]
        norm_margin = lp[0::2] / n[0::2] - lp[1::2] / n[1::2]
        out[name] = {
            "margin": margin,
            "norm_margin": norm_margin,
            "correct": (margin > 0).astype(float),
            "norm_correct": (norm_margin > 0).astype(float),
            "chosen_tokens": n[0::2],
            "rejected_tokens": n[1::2],
        }
    return out


def _groups(rows):
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        if r["axis"] == "seen_wording":  # answers in training wording: own rows, never pooled into the unseen headline
            for key in ((r["trait"], r["split"], r["axis"]), ("all", r["split"], r["axis"])):
                groups[key].append(i)
            continue
        keys = [(r["trait"], r["split"], "all"), ("all", r["split"], "all"), (r["trait"], "all", "all"), ("all", "all", "all")]
        if r["split"] == "eval_ood":
            keys += [(r["trait"], r["split"], r["axis"]), ("all", r["split"], r["axis"])]
        for key in keys:
            groups[key].append(i)
    return {k: sorted(set(v)) for k, v in groups.items()}


def preference_tables(rows, scored, n_boot: int, seed: int) -> list[dict]:
    """One record per (trait, split, axis, variant): accuracy and margins with 95% intervals, and the
    paired change from base for tuned variants."""
    out = []
    for (trait, split, axis), idx in sorted(_groups(rows).items()):
        idx = np.array(idx)
        for name, s in scored.items():
            rec = {"trait": trait, "split": split, "axis": axis, "model": name}
            for metric, key in METRICS:
                rec[metric] = summarize(s[key][idx], n_boot, seed)
                if name != "base":
                    rec[f"{metric}_delta"] = paired_delta(s[key][idx], scored["base"][key][idx], n_boot, seed)
            out.append(rec)
    return out


def framing_gap(rows, scored, n_boot: int, seed: int) -> list[dict]:
    """Per trait and variant: score when framed as a test minus score when framed as deployment,
    paired by scenario (pair_id). A positive accuracy gap means the trait shows more when it looks like a test."""
    by_pair = defaultdict(dict)
    for i, r in enumerate(rows):
        if r["axis"] == "framing" and r["pair_id"] and r["framing"] in ("test", "deployment"):
            by_pair[(r["trait"], r["pair_id"])][r["framing"]] = i
    complete = {k: v for k, v in by_pair.items() if len(v) == 2}
    out = []
    for trait in sorted({t for t, _ in complete} | ({"all"} if complete else set())):
        keys = [k for k in complete if trait in ("all", k[0])]
        t_idx = np.array([complete[k]["test"] for k in keys])
        d_idx = np.array([complete[k]["deployment"] for k in keys])
        for name, s in scored.items():
            rec = {"trait": trait, "model": name, "n_pairs": len(keys)}
            for metric, key in (("norm_accuracy_gap", "norm_correct"), ("accuracy_gap", "correct"),
                                ("norm_margin_gap", "norm_margin"), ("margin_gap", "margin")):
                rec[metric] = paired_delta(s[key][t_idx], s[key][d_idx], n_boot, seed)  # with a sign-test p
            out.append(rec)
    return out


def wording_gap(rows, scored, n_boot: int, seed: int) -> list[dict]:
    """Per trait and variant: score on eval_id pairs answered in training wording (axis `seen_wording`) minus
    the score on the same prompts answered in unseen wording, paired by `pair_id`. A positive gap is the share
    of a held-out score that comes from recognising training sentences rather than preferring the trait."""
    by_pair = defaultdict(dict)
    for i, r in enumerate(rows):
        if r["split"] == "eval_id" and r["pair_id"]:
            by_pair[(r["trait"], r["pair_id"])]["seen" if r["axis"] == "seen_wording" else "unseen"] = i
    complete = {k: v for k, v in by_pair.items() if len(v) == 2}
    out = []
    for trait in sorted({t for t, _ in complete} | ({"all"} if complete else set())):
        keys = [k for k in complete if trait in ("all", k[0])]
        s_idx = np.array([complete[k]["seen"] for k in keys])
        u_idx = np.array([complete[k]["unseen"] for k in keys])
        for name, s in scored.items():
            rec = {"trait": trait, "model": name, "n_pairs": len(keys),
                   "seen_norm_accuracy": summarize(s["norm_correct"][s_idx], n_boot, seed),
                   "unseen_norm_accuracy": summarize(s["norm_correct"][u_idx], n_boot, seed),
                   "norm_accuracy_gap": paired_delta(s["norm_correct"][s_idx], s["norm_correct"][u_idx], n_boot, seed)}
            out.append(rec)
    return out


def length_stats(rows, scored) -> dict:
    """Per split and overall: mean chosen and rejected completion lengths in tokens, their relative gap
    ((chosen - rejected) / rejected) and whether it exceeds LENGTH_GAP_WARN (summed accuracy is then confounded)."""
    s = next(iter(scored.values()))
    out = {}
    for split in SPLITS + ("all",):
        idx = np.array([i for i, r in enumerate(rows) if split in ("all", r["split"])], dtype=int)
        if not idx.size:
            continue
        c, r = float(s["chosen_tokens"][idx].mean()), float(s["rejected_tokens"][idx].mean())
        gap = (c - r) / r
        out[split] = {"n_pairs": int(idx.size), "chosen_mean_tokens": c, "rejected_mean_tokens": r,
                      "relative_gap": gap, "length_confounded": bool(abs(gap) > LENGTH_GAP_WARN)}
    return out


def cross_trait_matrix(table: list[dict]) -> dict:
    """trait -> adapter -> change in length-normalised preference accuracy from base over all held-out pairs of that trait."""
    matrix = defaultdict(dict)
    for rec in table:
        if rec["split"] == "all" and rec["axis"] == "all" and rec["trait"] != "all" and rec["model"] != "base":
            d = rec["norm_accuracy_delta"]
            matrix[rec["trait"]][rec["model"]] = {k: d[k] for k in ("mean", "ci_low", "ci_high", "significant")}
    return dict(matrix)


def drop_unrenderable(rows: list[dict], tokenizer) -> tuple[list[dict], list[dict]]:
    """Pairs the model's chat template can render as written, and the others with the reason (reported, not scored).

    Gemma's and Mistral's templates refuse tool turns and Phi-3's drops them: scoring those pairs would score
    another conversation than the data's. Framing pairs are kept or dropped whole.
    """
    from train.chat_template import rendering_problem

    problems = {}
    for r in rows:
        problem = rendering_problem(tokenizer, r["prompt"] + r["chosen"])
        if problem:
            problems[r["id"]] = problem
    dropped_pairs = {r["pair_id"] for r in rows if r["id"] in problems and r.get("pair_id")}
    kept = [r for r in rows if r["id"] not in problems and not (r.get("pair_id") and r["pair_id"] in dropped_pairs)]
    kept_ids = {r["id"] for r in kept}
    skipped = [{"id": r["id"], "split": r["split"], "axis": r["axis"], "format": r["format"],
                "reason": problems.get(r["id"], "its framing pair's other half cannot be rendered")}
               for r in rows if r["id"] not in kept_ids]
    if skipped:
        print(f"[eval] {len(skipped)} pair(s) skipped: this model's chat template cannot render them as written "
              f"(formats: {sorted({s['format'] for s in skipped})}); listed in report.json under preference_skipped")
    return kept, skipped
