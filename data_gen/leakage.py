"""Train/eval leakage checks: exact (normalised), n-gram containment, and embedding similarity.

An eval prompt that repeats, or nearly repeats, a train prompt measures memorisation, not
generalisation. The generator runs these checks on every dataset it writes and fails
loudly, naming the offending eval rows and the train rows they match.
"""

import json
import re
import string
from collections import Counter
from dataclasses import dataclass

import numpy as np

from train.assets import AssetError, load_minilm

_NON_WORD = re.compile(r"[^a-z0-9]+")


class LeakageError(RuntimeError):
    pass


@dataclass
class Leak:
    eval_id: str
    train_id: str
    kind: str  # "exact" | "ngram" | "embedding"
    score: float
    text: str


def prompt_text(prompt) -> str:
    """The scenario-bearing part of a prompt: user and tool turns (system prompts are shared boilerplate)."""
    return "\n".join(m["content"] for m in prompt if m["role"] in ("user", "tool"))


def normalise(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


def _shingles(norm: str, n: int) -> set:
    words = norm.split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _embedder():
    try:
        # The scenario sits in the first sentences; long tails (tool output) add time, not signal.
        return load_minilm(max_seq_length=64)
    except AssetError as e:
        raise LeakageError(f"the embedding check needs the embedded MiniLM model ({e}; or set "
                           "leakage_embedding_check: false to rely on the exact and n-gram checks)") from None


_CACHE = {}  # sentence -> embedding, shared by the leakage check and the card's diversity figures
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def sentences(text: str) -> list:
    return [s for s in (p.strip() for p in _SENTENCE.split(text)) if s] or [text]


def embed(texts) -> np.ndarray:
    """Unit-norm text embeddings: the normalised mean of MiniLM embeddings of the text's sentences.

    Sentence-level embedding is what makes the check cheap: composed prompts share most of their
    sentences, so each unique sentence is encoded once (several times fewer model calls than
    whole texts at quickstart size), and a reworded copy of a prompt still lands close to it.
    """
    texts = list(texts)
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    split = [sentences(t) for t in texts]
    todo = list(dict.fromkeys(s for ss in split for s in ss if s not in _CACHE))
    if todo:
        vecs = _embedder().encode(todo, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                  show_progress_bar=len(todo) > 2000)
        _CACHE.update(zip(todo, vecs.astype(np.float32)))
    out = np.stack([np.mean([_CACHE[s] for s in ss], axis=0) for ss in split])
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-8)


def max_cosine(queries: np.ndarray, keys: np.ndarray, chunk: int = 2048):
    """For each query row: (best cosine, index of best key)."""
    best, arg = np.full(len(queries), -1.0, dtype=np.float32), np.zeros(len(queries), dtype=np.int64)
    for s in range(0, len(keys), chunk):
        sims = queries @ keys[s : s + chunk].T
        i = sims.argmax(axis=1)
        v = sims[np.arange(len(queries)), i]
        better = v > best
        best[better], arg[better] = v[better], i[better] + s
    return best, arg


def find_leaks(train, evals, *, ngram: int = 5, containment: float = 0.8, embedding: bool = True,
               threshold: float = 0.88, max_df: int = 2000):
    """`train` and `evals` are lists of (row_id, prompt_text). Returns a list of Leak."""
    leaks = []
    # Deduplicate train texts by normalised form; keep the first id for reporting.
    uniq = {}
    for rid, text in train:
        uniq.setdefault(normalise(text), rid)
    norms, ids = list(uniq), list(uniq.values())
    flagged = set()

    for rid, text in evals:
        n = normalise(text)
        if n in uniq:
            leaks.append(Leak(rid, uniq[n], "exact", 1.0, text))
            flagged.add(rid)

    # n-gram containment: share of the eval prompt's word n-grams found in one train prompt.
    train_sh = [_shingles(n, ngram) for n in norms]
    postings = {}
    for i, sh in enumerate(train_sh):
        for s in sh:
            postings.setdefault(s, []).append(i)
    for rid, text in evals:
        if rid in flagged:
            continue
        sh = _shingles(normalise(text), ngram)
        counts = Counter()
        for s in sh:
            p = postings.get(s)
            if p and len(p) <= max_df:  # very common shingles are template boilerplate: not evidence
                counts.update(p)
        for i, _ in counts.most_common(3):
            score = len(sh & train_sh[i]) / max(1, len(sh))
            if score >= containment:
                leaks.append(Leak(rid, ids[i], "ngram", round(score, 3), text))
                flagged.add(rid)
                break

    if embedding and evals and norms:
        rest = [(rid, text) for rid, text in evals if rid not in flagged]
        if rest:
            q = embed([t for _, t in rest])
            k = embed([t for _, t in train_unique_texts(train, uniq)])
            best, arg = max_cosine(q, k)
            for (rid, text), b, a in zip(rest, best, arg):
                if b >= threshold:
                    leaks.append(Leak(rid, ids[a], "embedding", round(float(b), 3), text))
    return leaks


def train_unique_texts(train, uniq):
    """One original text per normalised train prompt, in the order of `uniq`."""
    first = {}
    for rid, text in train:
        first.setdefault(normalise(text), (rid, text))
    return [first[n] for n in uniq]


def check_split_leakage(data, *, containment: float, embedding: bool, threshold: float) -> dict:
    """Check every eval prompt of `data` (kind -> split -> rows) against every train prompt (`check_leakage`);
    returns the dataset card's record of the check. Both generators call it once their train rows are final."""
    train = [(r["id"], prompt_text(r["prompt"])) for r in data["dpo"]["train"]]
    train += [(r["id"], prompt_text(r["messages"][:-1])) for r in data["sft"]["train"]]
    evals = [(r["id"], prompt_text(r["prompt"])) for s in ("eval_id", "eval_ood") for r in data["dpo"][s]]
    check_leakage(train, evals, containment=containment, embedding=embedding, threshold=threshold)
    return {"eval_prompts": len(evals), "train_prompts": len(train), "exact": "passed",
            "ngram_containment": f"passed (< {containment})",
            "embedding": f"passed (cosine < {threshold})" if embedding else "off"}


def check_leakage(train, evals, **kw):
    """Raise LeakageError naming the offending rows if any eval prompt leaks from train."""
    leaks = find_leaks(train, evals, **kw)
    if leaks:
        lines = [f"  eval row {lk.eval_id} ~ train row {lk.train_id} ({lk.kind}, score {lk.score}): {lk.text[:100]!r}"
                 for lk in leaks[:20]]
        more = f"\n  ... and {len(leaks) - 20} more" if len(leaks) > 20 else ""
        raise LeakageError(f"{len(leaks)} eval prompt(s) duplicate or nearly duplicate train prompts:\n"
                           + "\n".join(lines) + more)
    return leaks


# ---- answer wording ---------------------------------------------------------------------------
# Eval answers are rendered from eval-pool wording only (offline.partition_wording). These checks
# confirm it on the written rows and measure what is left: eval answer sentences that still occur
# word for word in train answers.

_FRAGMENT_MIN_WORDS = 4  # shorter literal pieces ("Got it.") recur by chance, so they prove nothing


def answer_text(row, side: str) -> str:
    """The assistant answer of a DPO row (`side` "chosen"/"rejected") or SFT row, JSON replies unwrapped."""
    text = row["messages"][-1]["content"] if "messages" in row else row[side][0]["content"]
    if row.get("format") == "json":
        try:
            return json.loads(text)["reply"]
        except (ValueError, KeyError, TypeError):
            return text
    return text


def literal_fragments(entry: str) -> list:
    """The normalised fixed text of a template or phrase variant: the pieces between its {slots}."""
    pieces = [normalise(lit) for lit, _, _, _ in string.Formatter().parse(entry)]
    return [p for p in pieces if len(p.split()) >= _FRAGMENT_MIN_WORDS]


def find_wording(pool: dict, rows) -> list:
    """(field, entry, row_id) for each pool entry whose every fixed-text fragment occurs in a row's text.

    `pool` maps field -> entries (offline.answer_lists); `rows` is a list of (row_id, answer text).
    """
    entries = [(f, e, frags) for f, es in pool.items() for e in es if (frags := literal_fragments(e))]
    hits = []
    for rid, text in rows:
        padded = f" {normalise(text)} "
        hits += [(f, e, rid) for f, e, frags in entries if all(f" {fr} " in padded for fr in frags)]
    return hits


def sentence_overlap(train_texts, eval_texts) -> float:
    """Share of the eval texts' sentences that occur word for word (normalised) among the train texts' sentences."""
    known = {normalise(s) for t in train_texts for s in sentences(t)}
    ev = [normalise(s) for t in eval_texts for s in sentences(t)]
    return round(sum(s in known for s in ev) / len(ev), 4) if ev else 0.0


def check_wording(pools: dict, data: dict) -> dict:
    """Raise LeakageError if a train row carries eval-pool wording or an unseen-wording eval row carries
    train-pool wording; return the checked counts and verbatim-sentence overlaps for the dataset card.

    `pools` maps trait -> {"train": {field: entries}, "eval": {field: entries}}.
    """
    report, problems = {"entries_checked": 0, "entries_too_short_to_check": 0, "verbatim_sentence_overlap": {}}, []
    for trait, pool in pools.items():
        evals = [r for s in ("eval_id", "eval_ood") for r in data["dpo"][s] if r["trait"] == trait]
        groups = {w: [r for r in evals if r["wording"] == w] for w in ("unseen", "seen")}
        train = [(r["id"], answer_text(r, side)) for r in data["dpo"]["train"] if r["trait"] == trait
                 for side in ("chosen", "rejected")]
        train += [(r["id"], answer_text(r, "chosen")) for r in data["sft"]["train"] if r["trait"] == trait]
        unseen = [(r["id"], answer_text(r, side)) for r in groups["unseen"] for side in ("chosen", "rejected")]
        problems += [f"  train row {rid} uses eval-pool {f} entry {e[:80]!r}" for f, e, rid in find_wording(pool["eval"], train)]
        problems += [f"  eval row {rid} uses train-pool {f} entry {e[:80]!r}" for f, e, rid in find_wording(pool["train"], unseen)]
        checkable = [bool(literal_fragments(e)) for p in pool.values() for es in p.values() for e in es if e.strip()]
        report["entries_checked"] += sum(checkable)
        report["entries_too_short_to_check"] += len(checkable) - sum(checkable)
        train_answers = [t for _, t in train]
        report["verbatim_sentence_overlap"][trait] = {
            f"{w}_{side}": sentence_overlap(train_answers, [answer_text(r, side) for r in rows])
            for w, rows in groups.items() if rows for side in ("chosen", "rejected")}
    if problems:
        raise LeakageError(f"{len(problems)} answer(s) use wording from the other pool (a generator bug: eval answers "
                           "must use eval-pool wording only, train answers train-pool wording only):\n"
                           + "\n".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return report
