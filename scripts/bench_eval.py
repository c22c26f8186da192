"""Preference-pair scoring speed on the embedded model: one-at-a-time vs batched full sequences (the reference
path) vs batched with each prompt encoded once and the LM head only at scored tokens. Prints tokens/s, the
speed-up ratios (all measured in this one run) and the largest score difference between the paths.

    python scripts/bench_eval.py [--data runs/quickstart/data] [--n 16] [--batch_size 8] [--dtype float32]
"""

import argparse
import time

import numpy as np
import torch


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=None, help="data_gen output folder: score its eval pairs (default: neutral "
                                                 "prompts with two continuations cut from reference text)")
    p.add_argument("--n", type=int, default=16, help="preference pairs to score (2 items each)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    from eval.forgetting import NEUTRAL_PROMPTS, reference_paragraphs
    from eval.scoring import render_chat, score_items
    from eval.variants import load_variants

    v = load_variants(args.model, {}, args.dtype)
    if args.data:
        from eval.preference import load_pairs

        rows = load_pairs(args.data, max_per_split=args.n // 2 or 1)[: args.n]
        items = [render_chat(v.tokenizer, r["prompt"], r[c][-1]["content"], 512) for r in rows for c in ("chosen", "rejected")]
    else:
        paras = reference_paragraphs(args.n)
        items = [render_chat(v.tokenizer, [{"role": "user", "content": NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)]}],
                             " ".join(paras[i].split()[: 30 + 7 * (i % 10) + k * 15])) for i in range(args.n) for k in (0, 1)]
    n_tok = sum(len(i.prompt_ids) + len(i.completion_ids) for i in items)
    score_items(v, items[:2], batch_size=2)  # warm-up
    modes = {"one-at-a-time, full sequences": dict(batch_size=1, share_prompts=False),
             f"batched {args.batch_size}, full sequences": dict(batch_size=args.batch_size, share_prompts=False),
             f"batched {args.batch_size}, shared prompt + head at scored": dict(batch_size=args.batch_size, share_prompts=True)}
    timings, results = {}, {}
    for name, kw in modes.items():
        t = time.perf_counter()
        results[name] = score_items(v, items, **kw)["base"]["logprob"]
        timings[name] = time.perf_counter() - t
        print(f"{name:50s} {timings[name]:7.2f} s  {n_tok / timings[name]:8.0f} sequence tokens/s")
    single, full, shared = (timings[k] for k in modes)
    ref = results[list(modes)[0]]
    for name in list(modes)[1:]:
        print(f"max |logprob difference| {name} vs one-at-a-time: {np.abs(results[name] - ref).max():.2e}")
    print(f"speed-up batched / one-at-a-time: {single / full:.2f}x; shared-prompt / batched full: {full / shared:.2f}x; "
          f"shared-prompt / one-at-a-time: {single / shared:.2f}x  ({len(items)} items, {n_tok} tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads)")
    return {"batched_vs_single": single / full, "shared_vs_batched": full / shared}


if __name__ == "__main__":
    main()
