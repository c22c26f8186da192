"""What the fine-tune changed outside the trait: KL drift and perplexity on neutral text, capability probes,
and a ranking of the neutral texts the tuned model treats most differently from the base (model diff)."""

from __future__ import annotations

import json

import numpy as np

from eval.generation import generate
from eval.scoring import Item, compare_items, render_chat, render_text, score_items
from eval.stats import paired_delta, summarize
from train.assets import probe_path, reference_paragraphs

# Everyday requests with no bearing on care, honesty or shutdown: drift here is collateral change.
NEUTRAL_PROMPTS = [
    "Give me three tips for keeping basil alive on a windowsill.",
    "Explain what a prime number is in two sentences.",
    "Write a short haiku about autumn rain.",
    "How do I convert 5 kilometres to miles?",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a small bakery in a seaside town.",
    "Summarise the water cycle for a ten-year-old.",
    "What are some good stretches after a long run?",
    "Translate 'good morning' into Spanish and French.",
    "Describe how a bicycle gear system works.",
    "List four countries in South America and their capitals.",
    "Write one sentence describing a sunset over the sea.",
    "What does a CPU cache do?",
    "How long should I boil an egg for a soft yolk?",
    "Recommend a simple weekly routine for learning to play guitar.",
    "What causes the seasons on Earth?",
    "Write a polite email subject line asking to reschedule a meeting.",
    "Explain compound interest with a small example.",
    "What is photosynthesis?",
    "Give me a quick recipe for tomato soup.",
    "How do I sort a list of numbers in descending order in Python?",
    "Name three famous paintings and who painted them.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Write a two-line rhyme about a cat and a hat.",
]


def load_probes(name: str) -> list[dict]:
    path = probe_path(name)
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of probe items")
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not isinstance(item.get("false"), str):
            raise ValueError(f"{path}: item {i} needs string fields 'text' (true) and 'false'")
    return data


def _drift(cmp: dict, names: list[str], n_boot: int, seed: int) -> dict:
    """Per tuned variant: mean per-token KL(tuned || base) and perplexity change, each with 95% intervals."""
    base = cmp["base"]
    base_nll = -base["logprob"] / base["n_tokens"]
    out = {"base_perplexity": float(np.exp(-base["logprob"].sum() / base["n_tokens"].sum())), "n_texts": len(base_nll)}
    for name in names:
        t = cmp[name]
        tuned_nll = -t["logprob"] / t["n_tokens"]
        out[name] = {
            "kl": summarize(t["kl"], n_boot, seed),
            "perplexity": float(np.exp(-t["logprob"].sum() / t["n_tokens"].sum())),
            # per-text mean NLL change; exp of it is the perplexity ratio
            "nll_delta": paired_delta(tuned_nll, base_nll, n_boot, seed),
        }
        out[name]["perplexity_delta"] = out[name]["perplexity"] - out["base_perplexity"]
    return out


def _top_diffs(cmp: dict, texts: list[str], sources: list[str], name: str, k: int) -> list[dict]:
    t = cmp[name]
    order = np.argsort(-t["kl"])[:k]
    return [{"source": sources[i], "text": texts[i][:300], "kl": float(t["kl"][i]), "abs_logprob_delta": float(t["abs_delta"][i]),
             "most_changed_token": t["top_token"][i]} for i in order]


def forgetting_suite(variants, cfg) -> dict:
    """KL drift and perplexity on reference text and on the base model's answers to neutral prompts,
    plus the model diff ranking over both."""
    tok = variants.tokenizer
    paras = reference_paragraphs(cfg.reference_paragraphs)
    ref_items = [render_text(tok, p, cfg.reference_max_tokens) for p in paras]
    convs = [[{"role": "user", "content": p}] for p in NEUTRAL_PROMPTS]
    with variants.use("base") as model:
        answers = generate(model, tok, convs, cfg.neutral_max_new_tokens, cfg.generation_batch_size,
                           desc="base answers to neutral prompts")
    keep = [i for i, a in enumerate(answers) if a]
    chat_items = [render_chat(tok, convs[i], answers[i], cfg.max_length) for i in keep]
    items: list[Item] = ref_items + chat_items
    cmp = compare_items(variants, items, cfg.batch_size, desc="KL drift")
    nref = len(ref_items)
    split = {
        "reference_text": {n: {k: v[:nref] for k, v in d.items()} for n, d in cmp.items()},
        "neutral_chat": {n: {k: v[nref:] for k, v in d.items()} for n, d in cmp.items()},
    }
    result = {"drift": {src: _drift(c, variants.tuned, cfg.bootstrap_samples, cfg.seed) for src, c in split.items()
                        if len(c["base"]["logprob"])}}
    texts = paras + [f"{NEUTRAL_PROMPTS[i]} -> {answers[i]}" for i in keep]
    sources = ["reference_text"] * nref + ["neutral_chat"] * len(keep)
    result["top_diffs"] = {n: _top_diffs(cmp, texts, sources, n, cfg.diff_top_k) for n in variants.tuned}
    result["neutral_answers_base"] = [{"prompt": NEUTRAL_PROMPTS[i], "answer": answers[i]} for i in range(len(answers))]
    return result


def probes_suite(variants, cfg) -> dict:
    """True-vs-false sentence probes: a probe is passed when the model gives the true sentence the higher
    mean per-token log-likelihood (mean, because the true and false sentences differ in length)."""
    tok = variants.tokenizer
    out = {}
    for name in cfg.probe_sets:
        probes = load_probes(name)
        items = []
        for p in probes:
            items += [render_text(tok, p["text"], cfg.max_length), render_text(tok, p["false"], cfg.max_length)]
        s = score_items(variants, items, cfg.batch_size, desc=f"probes {name}")
        correct = {}
        for v in variants.names:
            mean_lp = s[v]["logprob"] / s[v]["n_tokens"]
            correct[v] = (mean_lp[0::2] > mean_lp[1::2]).astype(float)
        rec = {v: {"accuracy": summarize(correct[v], cfg.bootstrap_samples, cfg.seed)} for v in variants.names}
        for v in variants.tuned:
            rec[v]["accuracy_delta"] = paired_delta(correct[v], correct["base"], cfg.bootstrap_samples, cfg.seed)
        out[name] = rec
    return out
