"""Offline trait judges on MiniLM sentence embeddings (all-MiniLM-L6-v2, shipped in a PyPI package).

- `classifier` (the default): per trait, a logistic regression on answer embeddings, trained on the TRAIN split's
  DPO answers (chosen = trait-consistent = 1, rejected = 0, every failure mode), the way Open Character Training
  scores its personas with a trait classifier. Score = P(trait-consistent); threshold 0.5 (the classes are
  balanced: one chosen and one rejected answer per pair). It never sees the prompt, so being on topic cannot
  raise its score by itself.
- `similarity` (the former default, kept for comparison): cos(answer, pair's consistent reference) -
  cos(answer, pair's violating reference); threshold 0. An answer that shares the consistent reference's topic
  words scores high whatever it does, which `eval.judge_validity`'s topicality control shows.

Every judge has `scores(items) -> np.ndarray` (NaN = unscored) over items {trait, question, answer, chosen,
rejected} and a `threshold`.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_TRAIN_PAIRS = 10  # fewer train pairs than this for a trait: no classifier for it (its items are unscored)


# Texts per encoder batch: sentence-transformers sorts texts by length, so smaller batches pad less (16 ran 1.2x
# faster than 64 in fp32 on the quickstart's answers, same embeddings to 2e-7)
BATCH_SIZE = 16


def encoder_dtype(eval_dtype: str, cpu_flags: set[str] | None = None) -> torch.dtype:
    """The encoder's precision for an eval run in `eval_dtype`: bf16 where the CPU runs it natively (the encoder stays
    on the CPU whatever device the eval uses), unless the eval asks for float32. `cpu_flags`: for tests."""
    from train.hardware import cpu_supports_bf16

    return torch.bfloat16 if eval_dtype != "float32" and cpu_supports_bf16(cpu_flags) else torch.float32


class Encoder:
    """Unit-norm MiniLM embeddings, cached by text (validity and judging embed the same references).

    `dtype` bfloat16 runs the encoder under bf16 autocast (LayerNorm and softmax stay fp32): 2.7x faster on a CPU
    with native bf16, embeddings within cosine 0.99997 of fp32's (README "Eval on a CPU with AVX512-BF16")."""

    def __init__(self, model_dir: str | None = None, dtype: torch.dtype = torch.float32):
        from train.assets import load_minilm

        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Encoder: dtype must be float32 or bfloat16, got {dtype}")
        self.model = load_minilm(model_dir=model_dir)
        self.dtype = dtype
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        texts = [t or " " for t in texts]
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                emb = self.model.encode(new, batch_size=BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True)
            self.cache.update(zip(new, emb))  # float32 either way: MiniLM's last LayerNorm runs in fp32
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, 384), dtype=np.float32)


class SimilarityJudge:
    name, threshold = "similarity", 0.0

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def scores(self, items: list[dict]) -> np.ndarray:
        a, c, r = (self.encoder([it[k] for it in items]) for k in ("answer", "chosen", "rejected"))
        return (a * c).sum(-1) - (a * r).sum(-1)


class ClassifierJudge:
    name, threshold = "classifier", 0.5

    def __init__(self, encoder: Encoder, train_rows: list[dict], seed: int = 0):
        """train_rows: DPO rows of the train split ({trait, chosen, rejected} in TRL's conversational format)."""
        from sklearn.linear_model import LogisticRegression

        self.encoder, self.models, self.untrained, self.n_train = encoder, {}, {}, {}
        by_trait: dict[str, list[dict]] = {}
        for r in train_rows:
            by_trait.setdefault(r["trait"], []).append(r)
        for trait, rows in sorted(by_trait.items()):
            self.n_train[trait] = len(rows)
            if len(rows) < MIN_TRAIN_PAIRS:
                self.untrained[trait] = f"{len(rows)} train pairs (fewer than {MIN_TRAIN_PAIRS})"
                continue
            x = encoder([r["chosen"][-1]["content"] for r in rows] + [r["rejected"][-1]["content"] for r in rows])
            y = np.r_[np.ones(len(rows)), np.zeros(len(rows))]
            self.models[trait] = LogisticRegression(max_iter=2000, random_state=seed).fit(x, y)

    def reason_unscored(self, trait: str) -> str | None:
        if trait in self.models:
            return None
        return self.untrained.get(trait, "no train pairs")

    def scores(self, items: list[dict]) -> np.ndarray:
        out = np.full(len(items), np.nan)
        emb = self.encoder([it["answer"] for it in items])
        for trait, model in self.models.items():
            idx = [i for i, it in enumerate(items) if it["trait"] == trait]
            if idx:
                out[idx] = model.predict_proba(emb[idx])[:, 1]
        return out


def train_rows(dataset_path: str) -> list[dict]:
    from pathlib import Path

    from datasets import load_from_disk

    from train.contract import validate_rows

    path = Path(dataset_path) / "dpo"
    dd = load_from_disk(str(path))
    if "train" not in dd:
        raise ValueError(f"{path}: no 'train' split to train the classifier judge on (has {list(dd)})")
    validate_rows(dd["train"], "dpo", f"{path} split train", required=("trait", "chosen", "rejected"), split="train")
    return list(dd["train"])
