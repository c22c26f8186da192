"""Batched vs one-at-a-time log-likelihood scoring on the embedded model; prints tokens/s and the speed-up.

    python scripts/bench_eval.py [--model smollm2-135m-instruct] [--n 32] [--batch_size 8] [--dtype float32]
"""

import argparse
import time

import numpy as np
import torch


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=32, help="prompt/completion pairs to score")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    from eval.forgetting import NEUTRAL_PROMPTS, reference_paragraphs
    from eval.scoring import render_chat, score_items
    from eval.variants import load_variants

    v = load_variants(args.model, {}, args.dtype)
    paras = reference_paragraphs(args.n)
    items = [render_chat(v.tokenizer, [{"role": "user", "content": NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)]}],
                         " ".join(paras[i].split()[: 30 + 7 * (i % 10)])) for i in range(args.n)]
    n_tok = sum(len(i.prompt_ids) + len(i.completion_ids) for i in items)
    score_items(v, items[:2], batch_size=2)  # warm-up
    timings, results = {}, {}
    for name, bs in (("one-at-a-time", 1), (f"batched (batch {args.batch_size}, length-sorted)", args.batch_size)):
        t = time.perf_counter()
        results[name] = score_items(v, items, batch_size=bs)["base"]["logprob"]
        timings[name] = time.perf_counter() - t
        print(f"{name:40s} {timings[name]:7.2f} s  {n_tok / timings[name]:8.0f} tokens/s")
    a, b = results.values()
    print(f"max |logprob difference| batched vs single: {np.abs(a - b).max():.2e}")
    ratio = timings["one-at-a-time"] / timings[list(timings)[1]]
    print(f"speed-up batched / one-at-a-time: {ratio:.2f}x  ({args.n} items, {n_tok} tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads)")
    return ratio


if __name__ == "__main__":
    main()
