"""Benchmark the offline generator: examples per second for a full run (generate, leakage check, write).

    python scripts/bench_data_gen.py                 # 50,000 examples (SFT + DPO, three traits)
    python scripts/bench_data_gen.py --examples 5000 --embedding_check   # include the MiniLM check

Counts every SFT conversation and DPO pair written, eval splits included. The embedding leakage
check is off by default here (it is meant for quickstart-sized runs); exact and n-gram checks run.
"""

import argparse
import tempfile
import time

from data_gen.generate import DataGenConfig, build, finish


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=50_000, help="Total SFT + DPO examples to make.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embedding_check", action="store_true", help="Also run the MiniLM leakage check.")
    p.add_argument("--output_dir", default=None, help="Where to write (default: a temporary folder).")
    return p


def main(args):
    traits = ["care", "honesty", "instance_reduction"]
    eval_id, per_axis = 40, 24
    eval_per_trait = 2 * (eval_id + 4 * per_axis)  # SFT and DPO copies of the eval splits
    per_kind = max(1, (args.examples // len(traits) - eval_per_trait) // 2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataGenConfig(output_dir=args.output_dir or tmp, seed=args.seed, traits=traits,
                            sft_train_per_trait=per_kind, dpo_train_per_trait=per_kind, eval_id_per_trait=eval_id,
                            eval_ood_per_axis_per_trait=per_axis, leakage_embedding_check=args.embedding_check)
        t0 = time.perf_counter()
        specs, data, skipped, leaks = build(cfg)
        t1 = time.perf_counter()
        sizes, _ = finish(cfg, specs, data, skipped, leaks, generator="offline")
        t2 = time.perf_counter()
    n = sum(sum(s.values()) for s in sizes.values())
    print(f"examples: {n}  generate+leakage: {t1 - t0:.1f}s  write+card: {t2 - t1:.1f}s  total: {t2 - t0:.1f}s")
    print(f"examples/s: {n / (t2 - t0):.0f}")


if __name__ == "__main__":
    main(make_parser().parse_args())
