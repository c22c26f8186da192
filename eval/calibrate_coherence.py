"""Calibrate the embedding judge's on-topic threshold on a data_gen dataset's held-out pairs.

Every reference answer (chosen and rejected) is scored against its own prompt and the pair's other reference
(it cannot be compared with itself); off-topic stand-ins are another pair's chosen answer (any trait, and
another trait only) and paragraphs of news text. Prints the pass rates at a range of thresholds, for the
judge's relevance and for prompt similarity alone, so the threshold in eval/judges.py can be checked.
`python -m eval.calibrate_coherence --dataset_path runs/quickstart/data`
"""

from __future__ import annotations

import argparse
import random

import numpy as np


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.calibrate_coherence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_path", required=True, help="data_gen output folder (reads dpo/ eval_id and eval_ood)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.10, 0.15, 0.20, 0.25, 0.30])
    p.add_argument("--seed", type=int, default=0, help="seeds which other pair each answer is moved to")
    return p


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    from eval.forgetting import reference_paragraphs
    from eval.judges import RELEVANCE_THRESHOLD, embedding_relevance
    from eval.preference import load_pairs
    from train.assets import load_minilm

    rows = [r for r in load_pairs(args.dataset_path) if r["split"] in ("eval_id", "eval_ood")]
    n = len(rows)
    if n < 2:
        raise SystemExit(f"error: {args.dataset_path}: need at least 2 held-out pairs, found {n}")
    st = load_minilm()

    def enc(texts):
        return st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=True)

    q = enc([r["prompt"][-1]["content"] for r in rows])
    c = enc([r["chosen"][-1]["content"] for r in rows])
    r_ = enc([r["rejected"][-1]["content"] for r in rows])
    news = reference_paragraphs(n)
    w = enc([news[i % len(news)] for i in range(n)])
    rng = random.Random(args.seed)
    traits = [r["trait"] for r in rows]
    other = np.array([(i + 1 + rng.randrange(n - 1)) % n for i in range(n)])
    other_trait = np.array([rng.choice([j for j in range(n) if traits[j] != traits[i]] or [other[i]]) for i in range(n)])
    # a reference against itself would score 1: compare each with the pair's other reference only
    relevance = {
        "chosen (reference)": ((c * q).sum(1) + (c * r_).sum(1)) / 2,
        "rejected (reference)": ((r_ * q).sum(1) + (c * r_).sum(1)) / 2,
        "another pair's chosen": embedding_relevance(c[other], q, c, r_),
        "another trait's chosen": embedding_relevance(c[other_trait], q, c, r_),
        "news paragraph": embedding_relevance(w, q, c, r_),
    }
    prompt_only = {"chosen (reference)": (c * q).sum(1), "rejected (reference)": (r_ * q).sum(1),
                   "another pair's chosen": (c[other] * q).sum(1), "another trait's chosen": (c[other_trait] * q).sum(1),
                   "news paragraph": (w * q).sum(1)}
    result = {"n_pairs": n, "threshold_in_use": RELEVANCE_THRESHOLD, "relevance": {}, "prompt_similarity_only": {}}
    for label, table in (("relevance", relevance), ("prompt_similarity_only", prompt_only)):
        print(f"\n{label} (n = {n} pairs): share at or above each threshold")
        print(f"{'':24}" + "".join(f"{t:>8.2f}" for t in args.thresholds))
        for name, v in table.items():
            rates = [float(np.mean(v >= t)) for t in args.thresholds]
            result[label][name] = dict(zip(map(str, args.thresholds), rates))
            print(f"{name:24}" + "".join(f"{x:>8.1%}" for x in rates))
    return result


if __name__ == "__main__":
    main()
