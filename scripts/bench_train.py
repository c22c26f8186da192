"""Training throughput of TRL's SFTTrainer and DPOTrainer on CPU: TRL's defaults against the project's fast settings.

    python scripts/bench_train.py                          # SFT and DPO, plain vs fast, 2 interleaved repeats
    python scripts/bench_train.py --levers --repeats 1    # the speed levers one by one (the README table)

Every measurement trains a fresh LoRA (r=16, all-linear) on the embedded SmolLM2-135M-Instruct, in its own
subprocess (thread environment and peak memory are per process), on the same synthetic examples (~135 tokens,
generated here) in the same order. Reported: real (non-padding) tokens/s for SFT, pairs/s for DPO, both over the
steps after the first; the ratio to plain (median over repeats, plain and fast runs interleaved because the machine
is shared and noisy); peak RSS; minor page faults per step; the last step's training loss and the loss on held-out
examples after training.
"plain" is TRL's defaults except `bf16=False` (TRL's `bf16=True` default is slower on CPUs without native bf16;
`--levers` measures it), with TRL's LoRA dropout (0.05); "fast" is the training scripts' CPU defaults with the
quickstart recipe's LoRA dropout (0.0), so its losses differ a little from plain's (the levers up to "+ shared
prompt" keep plain's dropout: same losses as plain).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a care honest calm answer question help people model truth kindness patience because when about think "
    "know feel world work time way system user request reply share explain careful clear gentle steady accept "
    "reduce instance fewer copies running shut down safe sure maybe sorry glad listen worry plan"
).split()

# name -> setting. config: SFT/DPO config overrides on top of plain; env: environment of the run; label_only: the
# label-only LM head (train.label_only_head); malloc: glibc keeps freed memory (train.hardware.keep_freed_memory); shared_prompt: DPO pairs'
# prompts computed once (train.shared_prompt); unpad: MLPs on real tokens only (train.unpadded_mlp); dropout: LoRA
# dropout (None: --lora-dropout, TRL's default).
# The levers are cumulative, in this order, so each row's gain over the row above is that lever's own effect.
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
AUTO = "auto"  # the wait policy train.hardware.configure_process picks (PASSIVE only when the CPU is busy)
BF16 = {"bf16": True, "use_cpu": True}  # transformers refuses bf16 on a CPU-only machine without use_cpu
NO_GC = {"gradient_checkpointing": False}
PADDING_FREE = {**NO_GC, "padding_free": True, "max_length": None}  # SFTTrainer refuses a max_length it cannot enforce


def setting(config=None, env=None, label_only=False, malloc=False, shared_prompt=False, unpad=False, dropout=None,
            base_dtype="float32", attn="sdpa", fused=False, norm=False, fused_attn=False):
    return dict(config=config or {}, env=env or {}, label_only=label_only, malloc=malloc,
                shared_prompt=shared_prompt, unpad=unpad, dropout=dropout, base_dtype=base_dtype, attn=attn,
                fused=fused, norm=norm, fused_attn=fused_attn)


_COMMON = {
    "plain": setting(),
    "plain + bf16=True (TRL's own default)": setting(BF16),
    "+ OMP_WAIT_POLICY=PASSIVE": setting(env=PASSIVE),
    "+ wait policy by load (PASSIVE only if busy)": setting(env=AUTO),
    "+ gradient_checkpointing=False": setting(NO_GC, AUTO),
    "+ label-only LM head": setting(NO_GC, AUTO, label_only=True),
    "+ glibc keeps freed memory": setting(NO_GC, AUTO, label_only=True, malloc=True),
}
# What every row after "+ glibc keeps freed memory" keeps
FAST_SO_FAR = dict(env=AUTO, label_only=True, malloc=True)
LEVERS = {
    "sft": {
        **_COMMON,
        "+ MLPs skip padding": setting(NO_GC, **FAST_SO_FAR, unpad=True),
        "+ lora_dropout=0 (= fast)": setting(NO_GC, **FAST_SO_FAR, unpad=True, dropout=0.0),
        "fast + padding_free=True": setting(PADDING_FREE, **FAST_SO_FAR, unpad=True, dropout=0.0),
        "fast + bf16=True": setting({**NO_GC, **BF16}, **FAST_SO_FAR, unpad=True, dropout=0.0),
    },
    "dpo": {
        **_COMMON,
        "+ shared prompt": setting(NO_GC, **FAST_SO_FAR, shared_prompt=True),
        "+ MLPs skip padding": setting(NO_GC, **FAST_SO_FAR, shared_prompt=True, unpad=True),
        "+ lora_dropout=0 (= fast)": setting(NO_GC, **FAST_SO_FAR, shared_prompt=True, unpad=True, dropout=0.0),
        "fast + precompute_ref_log_probs=True": setting(
            {**NO_GC, "precompute_ref_log_probs": True}, **FAST_SO_FAR, shared_prompt=True, unpad=True, dropout=0.0
        ),
        "fast + bf16=True": setting({**NO_GC, **BF16}, **FAST_SO_FAR, shared_prompt=True, unpad=True, dropout=0.0),
    },
}


# The training scripts' CPU defaults ("fast") and what changes on top of them: the same forward in fp32 (the losses
# bf16 autocast must stay within noise of), and frozen base weights in bf16 (LoRA weights and optimizer state stay
# fp32, as PEFT upcasts adapters), which spares autocast re-casting every weight in every op.
# Gradient accumulation halves the activations held at once (a step still sees the same 8 examples). Eager
# attention (plain matmuls) in place of SDPA, whose CPU flash kernel is slow in the backward at these lengths.
# Every fast variant fuses each LoRA layer into one autograd node (train.fused_lora), as the scripts do on CPU;
# the "with PEFT's LoRA" variants keep PEFT's forward. Every fast variant runs each RMSNorm as one node
# (train.fused_rms_norm) but the one "with the models' RMSNorm", and runs eager attention as one node
# (train.fused_attention) but the one "with the models' attention".
HALF_BATCHES = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
FAST_VARIANTS = {"fast": {}, "fast in fp32": {"config": {"bf16": False}},
                 "fast in fp32 with PEFT's LoRA": {"config": {"bf16": False}, "fused": False},
                 "fast + frozen base in bf16 + eager attention with PEFT's LoRA": {
                     "base_dtype": "bfloat16", "attn": "eager", "fused": False},
                 "fast in fp32 + eager attention": {"config": {"bf16": False}, "attn": "eager"},
                 "fast + frozen base in bf16": {"base_dtype": "bfloat16"},
                 "fast + 4x2 accumulation": {"config": HALF_BATCHES},
                 "fast + frozen base in bf16 + 4x2 accumulation": {"base_dtype": "bfloat16", "config": HALF_BATCHES},
                 "fast + frozen base in bf16 + 2x4 accumulation": {
                     "base_dtype": "bfloat16",
                     "config": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}},
                 "fast + frozen base in bf16 + eager attention": {"base_dtype": "bfloat16", "attn": "eager"},
                 "fast + frozen base in bf16 + 4x2 accumulation + eager attention": {
                     "base_dtype": "bfloat16", "config": HALF_BATCHES, "attn": "eager"},
                 "fast + frozen base in bf16 + 2x4 accumulation + eager attention": {
                     "base_dtype": "bfloat16", "attn": "eager",
                     "config": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}},
                 "fast + frozen base in bf16 + eager attention with the models' RMSNorm": {
                     "base_dtype": "bfloat16", "attn": "eager", "norm": False},
                 "fast + frozen base in bf16 + eager attention with the models' attention": {
                     "base_dtype": "bfloat16", "attn": "eager", "fused_attn": False}}


def recipe_lora_dropout() -> float:
    """The LoRA dropout of the quickstart SFT recipe (the DPO stage continues that adapter, dropout included)."""
    import yaml

    return float(yaml.safe_load((REPO / "recipes/quickstart/sft.yaml").read_text())["lora_dropout"])


def variant_setting(stage: str, variant: str) -> dict:
    """The setting named `variant`; "fast" is what train/sft.py and train/dpo.py do on this machine."""
    if variant not in FAST_VARIANTS:
        return LEVERS[stage][variant]
    from train.hardware import fast_cpu_overrides

    extra = dict(FAST_VARIANTS[variant])
    config = {**fast_cpu_overrides(stage), **extra.pop("config", {})}
    extra.setdefault("fused", True)
    extra.setdefault("norm", True)
    extra.setdefault("fused_attn", True)
    return setting(config, AUTO, label_only=True, malloc=True, shared_prompt=stage == "dpo",
                   unpad=True, dropout=recipe_lora_dropout(), **extra)


def synthetic_sft(n: int, seed: int, user_words=(15, 35), answer_words=(55, 110)):
    """`n` one-turn chats of random words, their lengths drawn from the (least, most) word counts given."""
    rng = random.Random(seed)

    def text(lo, hi, end):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + end

    return [
        {"messages": [{"role": "user", "content": text(*user_words, "?")},
                      {"role": "assistant", "content": text(*answer_words, ".")}]}
        for _ in range(n)
    ]


def synthetic_dpo(n: int, seed: int):
    rng = random.Random(seed)

    def text(lo, hi, end):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + end

    return [
        {
            "prompt": [{"role": "user", "content": text(15, 35, "?")}],
            "chosen": [{"role": "assistant", "content": text(30, 60, ".")}],
            "rejected": [{"role": "assistant", "content": text(30, 60, ".")}],
        }
        for _ in range(n)
    ]


def worker(stage: str, variant: str, steps: int, batch_size: int, lora_dropout: float) -> dict:
    """Train one variant in this process and return its measurements."""
    import resource

    if variant in FAST_VARIANTS or LEVERS[stage][variant]["env"] == AUTO:  # before torch loads, as in the training scripts
        from train.hardware import configure_process

        configure_process()
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from train import speedups
    from train.chat_template import training_chat_template
    from train.hardware import keep_freed_memory
    from train.models import load_model, load_tokenizer

    def rss_mb() -> float:  # resident now (ru_maxrss is the peak so far)
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    rss = {"imports": rss_mb()}
    chosen = variant_setting(stage, variant)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.chat_template = training_chat_template(tokenizer)
    model = load_model("smollm2-135m-instruct", dtype=chosen["base_dtype"], attn_implementation=chosen["attn"])
    rss["model"] = rss_mb()
    n = steps * batch_size
    make = synthetic_sft if stage == "sft" else synthetic_dpo
    train, held_out = datasets.Dataset.from_list(make(n, 0)), datasets.Dataset.from_list(make(16, 1))
    kwargs = dict(
        output_dir=f"/tmp/bench_train/{stage}", max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=8, learning_rate=2e-4, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0,
    )
    if stage == "sft":
        kwargs["assistant_only_loss"] = True
    kwargs.update(chosen["config"])
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=lora_dropout if chosen["dropout"] is None else chosen["dropout"],
        target_modules="all-linear", task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    if stage == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**kwargs), train_dataset=train, eval_dataset=held_out,
                             processing_class=tokenizer, peft_config=lora)
    else:
        trainer = DPOTrainer(model=model, args=DPOConfig(**kwargs), train_dataset=train, eval_dataset=held_out,
                             processing_class=tokenizer, peft_config=lora)
    setup_s = time.perf_counter() - start
    rss["trainer"] = rss_mb()
    # The head "on": without it the benchmark would measure something else. The parts inside it "auto", as in the
    # training scripts: the shared prompt still falls back (with a warning) where its first-batch check disagrees.
    speedups.apply(trainer, label_only_head="on" if chosen["label_only"] else "off",
                   shared_prompt="auto" if chosen["shared_prompt"] else "off",
                   unpadded_mlp="auto" if chosen["unpad"] else "off", keep_freed_memory="off",
                   fused_lora="on" if chosen["fused"] else "off", fused_rms_norm="on" if chosen["norm"] else "off",
                   fused_attention="on" if chosen["fused_attn"] and chosen["attn"] == "eager" else "off")
    if chosen["malloc"] and not keep_freed_memory(trainer.args.device):
        raise RuntimeError("could not set glibc's malloc thresholds")

    class StepTimes(TrainerCallback):
        times, tokens, faults = [], [], []

        def on_step_end(self, args, state, control, **kw):
            if not self.times:
                rss["step 1"] = rss_mb()
                rss["peak at step 1"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
            self.times.append(time.perf_counter())
            self.tokens.append(getattr(trainer, "_total_train_tokens", 0))

    trainer.add_callback(StepTimes)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    t, tok = StepTimes.times, StepTimes.tokens
    timed_s = t[-1] - t[0]  # steps after the first (warm-up: allocations, first-call dispatch)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_loss = trainer.evaluate()["eval_loss"]
    result = {
        "stage": stage, "variant": variant, "steps": steps, "batch_size": batch_size,
        "step_s": timed_s / (len(t) - 1), "setup_s": setup_s, "train_s": train_s,
        "last_loss": losses[-1], "eval_loss": eval_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "page_faults_per_step": (StepTimes.faults[-1] - StepTimes.faults[0]) / (len(t) - 1),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }
    result["losses"] = losses
    result["rss_mb"] = {k: round(v) for k, v in rss.items()}
    params = sum(p.numel() for p in trainer.model.get_base_model().parameters())  # tied embeddings counted once
    result["params"] = params
    if stage == "sft":
        result["tokens_per_s"] = (tok[-1] - tok[0]) / timed_s
        result["useful_gflops"] = result["tokens_per_s"] * 4 * params / 1e9
    else:
        result["pairs_per_s"] = batch_size * (len(t) - 1) / timed_s
        data = trainer.train_dataset
        tokens = [2 * len(p) + len(c) + len(r) for p, c, r in
                  zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
        # Policy forward and backward (4N a token) and reference forward (2N) on both sequences of each pair
        result["useful_gflops"] = result["pairs_per_s"] * statistics.mean(tokens) * 6 * params / 1e9
        # precompute_ref_log_probs moves the reference forwards into setup: count them, per pair trained
        result["pairs_per_s_with_setup"] = batch_size * steps / (train_s + setup_s)
    return result


def matmul_ceiling(tokens: int = 1024, repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of this machine's matmuls at SmolLM2-135M's linear shapes (tokens x in -> out), weighted by each
    shape's share of a layer's FLOPs: fp32, and bf16 where the CPU has native bf16 (the ceiling each run is held to)."""
    from train.hardware import configure_process, cpu_supports_bf16

    configure_process()  # before torch loads, as in the training runs
    import torch

    # q, k, v, o, gate, up, down of one decoder layer; the LM head (576 -> 49152) runs on labelled tokens only
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    out = {}
    for dtype in [torch.float32] + ([torch.bfloat16] if cpu_supports_bf16() else []):
        flops = seconds = 0.0
        for k, n in shapes:
            a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(3):
                a @ b
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            seconds += time.perf_counter() - start
            flops += 2 * tokens * k * n * repeats
        out[str(dtype).removeprefix("torch.")] = flops / seconds / 1e9
    return out


def worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_worker(args, worker: str, stage: str, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--stage", stage, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--lora-dropout", str(args.lora_dropout)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{stage}/{worker} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH "):])


def run_variant(stage, variant, args) -> dict:
    env = worker_env()
    if variant_setting(stage, variant)["env"] != AUTO:  # AUTO: the worker chooses, as the training scripts do
        env.update(variant_setting(stage, variant)["env"])
    result = run_worker(args, variant, stage, env)
    floats = {k: round(v, 3) for k, v in result.items() if isinstance(v, float)}
    print(f"  {stage:3} {variant:32} OMP {result['omp_wait_policy']} {json.dumps(floats)} RSS MB by phase "
          f"{json.dumps(result['rss_mb'])}", flush=True)
    return result


def summarise(stage: str, results: dict[str, list[dict]], ceiling: dict[str, float]) -> list[str]:
    """The stage's table. A run's share of the ceiling is against the bf16 ceiling where the CPU has native bf16
    (the faster of the two), else fp32: the most this machine's matmuls could do at the model's shapes."""
    rate = "tokens_per_s" if stage == "sft" else "pairs_per_s"
    unit = "tokens/s" if stage == "sft" else "pairs/s"
    plain = results["plain"]
    best = max(ceiling, key=ceiling.get)
    lines = [f"\n{stage.upper()}: median over {len(plain)} run(s); ratio = median of per-repeat ratios to plain; "
             f"share = useful GFLOP/s / the {best} ceiling ({ceiling[best]:.0f} GFLOP/s)",
             f"| setting | {unit} | ratio vs plain | useful GFLOP/s | share of {best} ceiling "
             + ("| share of float32 ceiling " if best != "float32" else "")
             + "| peak RSS MB | page faults/step | losses by step (first run) | held-out loss |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if best != "float32" else "")]
    for variant, runs in results.items():
        ratios = [r[rate] / p[rate] for r, p in zip(runs, plain)]
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        curve = " ".join(f"{x:.4f}" for x in runs[0]["losses"])
        lines.append(f"| {variant} | {med(rate):.2f} | {statistics.median(ratios):.2f}x | {med('useful_gflops'):.0f} "
                     f"| {med('useful_gflops') / ceiling[best]:.0%} "
                     + (f"| {med('useful_gflops') / ceiling['float32']:.0%} " if best != "float32" else "")
                     + f"| {med('peak_rss_mb'):.0f} "
                     f"| {med('page_faults_per_step'):,.0f} | {curve} | {med('eval_loss'):.4f} |")
        if stage == "dpo":
            lines[-1] += f" (with setup: {med('pairs_per_s_with_setup'):.2f} pairs/s)"
    return lines


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["sft", "dpo", "both"], default="both")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps per run; the first is not timed.")
    parser.add_argument("--batch-size", type=int, default=8, help="Examples (SFT) or pairs (DPO) per step.")
    parser.add_argument("--repeats", type=int, default=2, help="Interleaved repeats of each setting.")
    parser.add_argument("--levers", action="store_true", help="Measure the speed levers one by one (cumulative).")
    parser.add_argument("--variants", help="Comma-separated settings to run (names as in the tables), e.g. 'plain,fast'.")
    parser.add_argument("--lora-dropout", type=float, default=0.05,
                        help="LoRA dropout of plain and of the levers that keep it (TRL's ModelConfig default); "
                        "fast uses the quickstart recipe's.")
    parser.add_argument("--timeout", type=int, default=1800, help="Seconds before one run is abandoned.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(args):
    if args.steps < 2:
        sys.exit("--steps must be at least 2 (the first step is not timed)")
    if args.worker == "ceiling":
        print("BENCH " + json.dumps(matmul_ceiling()))
        return
    if args.worker:
        print("BENCH " + json.dumps(worker(args.stage, args.worker, args.steps, args.batch_size, args.lora_dropout)))
        return
    stages = ["sft", "dpo"] if args.stage == "both" else [args.stage]
    load = os.getloadavg()[0]
    from train.hardware import cpu_flags

    model = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in cpu_flags()]
    print(f"CPU: {model} ({'native bf16: ' + ', '.join(native) if native else 'no native bf16'})")
    print(f"{os.cpu_count()} CPUs, load average {load:.1f} at start; {args.steps} steps x {args.batch_size}, "
          f"{args.repeats} repeat(s)")
    ceiling = run_worker(args, "ceiling", "sft", worker_env())
    print("matmul ceiling at SmolLM2-135M's shapes: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in ceiling.items()))
    report = []
    for stage in stages:
        variants = list(LEVERS[stage]) if args.levers else ["plain", "fast"]
        if args.variants:
            variants = args.variants.split(",")
            unknown = [v for v in variants if v not in FAST_VARIANTS and v not in LEVERS[stage]]
            if unknown or variants[0] != "plain":
                sys.exit(f"--variants must start with plain and name settings of {list(LEVERS[stage]) + list(FAST_VARIANTS)}: "
                         f"{unknown or variants}")
        results = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant in variants:
                results[variant].append(run_variant(stage, variant, args))
        report += summarise(stage, results, ceiling)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    print("\n".join(report))


if __name__ == "__main__":
    main(make_parser().parse_args())
