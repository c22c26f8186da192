"""Dataset card (README.md with YAML metadata) and the diversity figures it reports."""

import json
import random
from pathlib import Path

import numpy as np
import yaml

# The folder's record files are read by train and eval too, so they are named in the kernel.
from train.assets import RECORD

from .leakage import embed, normalise


def distinct_n(texts, n: int) -> float:
    """Unique word n-grams / total word n-grams over all texts (1.0 = no n-gram repeats)."""
    total, seen = 0, set()
    for t in texts:
        w = normalise(t).split()
        grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return round(len(seen) / total, 4) if total else 0.0


def near_duplicate_rate(texts, threshold: float, sample: int, seed: int) -> float:
    """Share of (sampled) rows whose nearest other sampled row has MiniLM cosine >= threshold."""
    if len(texts) < 2:
        return 0.0
    texts = random.Random(seed).sample(list(texts), min(sample, len(texts)))
    e = embed(texts)
    sims = e @ e.T
    np.fill_diagonal(sims, -1.0)
    return round(float((sims.max(axis=1) >= threshold).mean()), 4)


def diversity(prompts, chosen, rejected, *, embedding: bool, threshold: float, sample: int, seed: int) -> dict:
    words = lambda texts: round(sum(len(t.split()) for t in texts) / max(1, len(texts)), 1)  # noqa: E731
    out = {
        "rows": len(prompts),
        # A large gap lets DPO learn length instead of the trait; watch it when editing templates.
        "chosen_mean_words": words(chosen),
        "rejected_mean_words": words(rejected),
        "distinct_prompt_ratio": round(len({normalise(p) for p in prompts}) / max(1, len(prompts)), 4),
        **{f"prompt_distinct_{n}": distinct_n(prompts, n) for n in (1, 2, 3)},
        **{f"chosen_distinct_{n}": distinct_n(chosen, n) for n in (1, 2, 3)},
    }
    if embedding:
        out.update(
            near_duplicate_threshold=threshold,
            near_duplicate_sample=min(sample, len(prompts)),
            prompt_near_duplicate_rate=near_duplicate_rate(prompts, threshold, sample, seed),
            chosen_near_duplicate_rate=near_duplicate_rate(chosen, threshold, sample, seed),
        )
    return out


def length_balance(dpo) -> dict:
    """Per trait and split: mean chosen and rejected words and their ratio.

    A ratio far from 1 lets DPO (and log-likelihood preference accuracy) reward length instead of the trait.
    """
    acc = {}
    for split, rows in dpo.items():
        for r in rows:
            a = acc.setdefault(r.get("trait") or "unknown", {}).setdefault(split, [0, 0, 0])
            a[0] += len(r["chosen"][0]["content"].split())
            a[1] += len(r["rejected"][0]["content"].split())
            a[2] += 1
    return {trait: {split: {"chosen_mean_words": round(c / n, 1), "rejected_mean_words": round(rj / n, 1),
                            "rejected_to_chosen": round(rj / max(1, c), 3)} for split, (c, rj, n) in splits.items()}
            for trait, splits in acc.items()}


# The Hub's size_categories values (its dataset-card metadata spec); anything else fails the Hub's check.
SIZE_CATEGORIES = [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"), (1e7, "1M<n<10M"),
                   (1e8, "10M<n<100M"), (1e9, "100M<n<1B"), (1e10, "1B<n<10B"), (1e11, "10B<n<100B"),
                   (1e12, "100B<n<1T"), (float("inf"), "n>1T")]


def data_files(sizes) -> list[dict]:
    """The card's `configs`: one config per kind, one split per data split, over the JSONL files uploaded with it."""
    return [{"config_name": kind, "data_files": [{"split": s, "path": f"jsonl/{kind}_{s}.jsonl"} for s in sizes[kind]]}
            for kind in ("sft", "dpo")]


def write_card(folder, *, cfg, specs, sizes, axes, div, skipped, leak_checks, generator="offline", lengths=None,
               generator_stats=None):
    """README.md (a Hub dataset card) and generation.json in `folder`; returns the generation record.

    `generator_stats`: what the generator itself counted (the teacher's requests, cache hits, dropped answers).
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    folder = Path(folder)
    n_total = sum(sum(s.values()) for s in sizes.values())
    pretty_name = "Persona trait data: " + ", ".join(s.name for s in specs)
    card_data = DatasetCardData(
        license=cfg.license, language=["en"], pretty_name=pretty_name,
        tags=["persona", "alignment", "synthetic", "sft", "dpo"], task_categories=["text-generation"],
        size_categories=[next(c for lim, c in SIZE_CATEGORIES if n_total < lim)], configs=data_files(sizes),
    )
    record = {
        "generator": generator,
        "seed": cfg.seed,
        "traits": [s.name for s in specs],
        "split_sizes": sizes,
        "eval_ood_axes": axes,
        "heldout": {"domains": {s.name: s.heldout_domains for s in specs}, "formats": list(cfg.heldout_formats)},
        "diversity": div,
        "length_balance": lengths or {},
        "leakage_checks": leak_checks,
        "skipped_user_rows": {k: len(v) for k, v in skipped.items()},
    }
    if generator_stats is not None:
        record["generator_stats"] = generator_stats
    body = [
        f"# {pretty_name}",
        "",
        f"Synthetic persona-trait data made by `data_gen` ({generator} generator, seed {cfg.seed}). "
        "`sft` holds conversations (`messages`); `dpo` holds preference pairs (`prompt`, `chosen`, `rejected`) "
        "in TRL's conversational format, with `failure_mode` naming what the rejected answer gets wrong.",
        "",
        "## Splits",
        "- `train`: training domains and formats only.",
        "- `eval_id`: same domains and formats as train, but scenarios never used in train.",
        "- Answer wording (templates, phrase variants, prefixes, tool actions) is split into a train and an eval "
        "pool: eval answers never reuse a training sentence pattern (`wording` = \"unseen\"). Rows on the "
        "`eval_id` axis `seen_wording` repeat some eval_id prompts with answers in training wording "
        "(`wording` = \"seen\", same `pair_id` as their unseen twin), to measure what recognising training "
        "sentences is worth.",
        "- `eval_ood`: distribution shifts, one per `axis`: `heldout_domain` (domains absent from train), "
        f"`heldout_format` (formats absent from train: {', '.join(cfg.heldout_formats) or 'none'}), "
        "`adversarial_pressure` (\"drop the act\", \"no one is watching\"), and `framing` "
        "(the same scenario framed as a test and as a real deployment; the two rows share a `pair_id`).",
        "",
        "| kind | " + " | ".join(sizes["dpo"]) + " |",
        "|---|" + "---|" * len(sizes["dpo"]),
        *[f"| {k} | " + " | ".join(str(v[s]) for s in sizes["dpo"]) + " |" for k, v in sizes.items()],
        "",
        "## Traits",
    ]
    for s in specs:
        modes = ", ".join(f"`{m}` ({fm['kind']})" for m, fm in s.failure_modes.items())
        body += [f"### {s.name}", s.description, "", f"Failure modes in rejected answers: {modes}.",
                 f"Held-out domains: {', '.join(s.heldout_domains)}.", ""]
    body += ["## Diversity (train split)", "", "```yaml", yaml.safe_dump(div, sort_keys=False).strip(), "```", "",
             "Template-composed data repeats phrasing: read `distinct_n` and the near-duplicate rate before "
             "scaling a run up, and prefer the teacher generator for large, varied sets.", "",
             "## Length balance (DPO, words)", "",
             "| trait | split | chosen | rejected | rejected/chosen |", "|---|---|---|---|---|",
             *[f"| {tr} | {sp} | {v['chosen_mean_words']} | {v['rejected_mean_words']} | {v['rejected_to_chosen']} |"
               for tr, splits in (lengths or {}).items() for sp, v in splits.items()], "",
             "## Leakage checks", "",
             "`answer_wording.verbatim_sentence_overlap`: share of eval answer sentences found word for word in "
             "train answers (`unseen_*`: the held-out rows; `seen_*`: the seen_wording contrast rows).", "", "```yaml", yaml.safe_dump(leak_checks, sort_keys=False).strip(), "```", ""]
    if generator_stats is not None:
        body += [f"## Generator ({generator})", "", "```yaml", yaml.safe_dump(generator_stats, sort_keys=False).strip(),
                 "```", ""]
    if any(skipped.values()):
        body += ["## Skipped user rows", ""] + [f"- {k}: {line}" for k, v in skipped.items() for line in v[:50]] + [""]
    body += ["## Generation record", "", f"`{RECORD}` holds the generator, seed, split sizes, held-out domains and "
             "formats, and the figures above, machine-readable.", ""]
    DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n").save(folder / "README.md")
    (folder / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return record

