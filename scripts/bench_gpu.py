"""MFU of LoRA SFT on one GPU: plain TRL against the GPU recipes' settings, packing, Liger kernels and flash attention.

    python scripts/bench_gpu.py                          # Qwen2.5-1.5B's shape, every setting this machine can run
    python scripts/bench_gpu.py --shape llama-3.2-1b --steps 20
    python scripts/bench_gpu.py --rehearsal              # the same code on the CPU, a tiny shape, fp32: checks the script

Random weights of a real model's shape (no Hub access needed; the figures are speed and memory, the losses mean
nothing), SmolLM2's tokenizer with the training chat template, synthetic chats of 150-450 tokens, LoRA r=32
all-linear and a batch of 16 as in recipes/qwen2.5-1.5b-instruct/sft_lora.yaml. Settings:
  plain TRL                      SFTConfig's defaults (gradient checkpointing as TRL sets it), SDPA, padded batches
  recipe                         the GPU recipe: no gradient checkpointing
  + Liger                        the recipe with use_liger_kernel=True (needs liger-kernel: pip install -e '.[gpu]')
  + packing                      the recipe with packing=True (best-fit decreasing): TRL flattens the batch into one
                                 padding-free row, and SDPA then runs it under a block-diagonal mask, computing the
                                 masked-out blocks too (flash attention is what padding-free is meant for)
  + packing + flash-attn         the same with attn_implementation flash_attention_2 (needs flash-attn): each
                                 conversation attends only to itself, no padding anywhere
  + packing + flash-attn + Liger both (needs both packages)
Packed settings take as many rows of max_length tokens as hold the recipe's batch (16 conversations' tokens), so
every setting trains about the same tokens a step. Each runs in its own subprocess; settings whose package is
missing are listed as skipped, a failed or timed-out one is reported and the rest still run.
MFU = trained (non-padding) tokens/s x 4N / peak: N counts the linear layers and the LM head (LoRA: the forward is
2N a token and the activation gradients 2N; frozen weights get no weight gradient). Not counted: attention's own
FLOPs and the LoRA matmuls; counted though not run: the LM head on unlabelled tokens (TRL's fused head projects the
labelled ones only). Peak = this GPU's bf16 matmul rate measured here (8192^3) and, where the GPU's dense bf16 figure
is known, that figure.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # config fields of the real models (their Hub config.json), random weights here
    "qwen2.5-1.5b": ("Qwen2Config", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                         tie_word_embeddings=True, rope_theta=1e6)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         tie_word_embeddings=True, rope_theta=5e5)),
    "tiny": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)),
}
NO_CHECKPOINTING = {"gradient_checkpointing": False}
PACKING = {"gradient_checkpointing": False, "packing": True}
SETTINGS = {  # name -> (SFTConfig fields, attention implementation, packages it needs)
    "plain TRL": ({}, "sdpa", ()),
    "recipe": (NO_CHECKPOINTING, "sdpa", ()),
    "+ Liger": ({**NO_CHECKPOINTING, "use_liger_kernel": True}, "sdpa", ("liger_kernel",)),
    "+ packing": (PACKING, "sdpa", ()),
    "+ packing + flash-attn": (PACKING, "flash_attention_2", ("flash_attn",)),
    "+ packing + flash-attn + Liger": ({**PACKING, "use_liger_kernel": True}, "flash_attention_2",
                                     ("flash_attn", "liger_kernel")),
}
# NVIDIA's dense bf16 TFLOP/s by device name, first match wins (the PCIe and NVL H100s run slower than the SXM)
DENSE_BF16_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312))


def synthetic_chats(n: int, seed: int) -> list[dict]:
    """The CPU benchmark's random-word chats, at the GPU recipe's lengths (~150-450 tokens)."""
    from bench_train import synthetic_sft

    return synthetic_sft(n, seed, user_words=(40, 120), answer_words=(100, 330))


def matmul_tflops(device: str, dtype) -> float:
    import torch

    size = 8192 if device == "cuda" else 1024
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def worker(setting: str, shape: str, steps: int, batch_size: int, max_length: int, rehearsal: bool) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from train.chat_template import training_chat_template
    from train.models import load_tokenizer

    device = "cpu" if rehearsal else "cuda"
    dtype = torch.float32 if rehearsal else torch.bfloat16
    fields, attention, _ = SETTINGS[setting]
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.chat_template = training_chat_template(tokenizer)
    config_class, shape_fields = SHAPES[shape]
    config = getattr(transformers, config_class)(**shape_fields, max_position_embeddings=4096,
                                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                 pad_token_id=tokenizer.pad_token_id, attn_implementation=attention)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: a 1.5B model's random init on the CPU takes minutes
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # incl. the LM head
    rows = batch_size
    if fields.get("packing"):  # as many full rows as hold `batch_size` conversations' tokens
        sample = synthetic_chats(64, 1)
        texts = [tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in sample]
        mean = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) / len(sample)
        rows = max(1, round(batch_size * min(mean, max_length) / max_length))
    args = SFTConfig(output_dir=f"/tmp/bench_gpu/{setting}", max_steps=steps, per_device_train_batch_size=rows,
                     max_length=max_length, assistant_only_loss=True, learning_rate=2e-4, bf16=not rehearsal,
                     use_cpu=rehearsal, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                     seed=0, **fields)
    # enough conversations for every step (a packed row holds several)
    data = datasets.Dataset.from_list(synthetic_chats(batch_size * 2 * (steps + 2), 0))
    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)

    class StepTimes(TrainerCallback):
        times, tokens = [], []

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.tokens.append(trainer._total_train_tokens)

    trainer.add_callback(StepTimes)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    t, tok = StepTimes.times, StepTimes.tokens
    # timed from the end of step 2: the first steps compile kernels and fill caches
    tokens_per_s = (tok[-1] - tok[1]) / (t[-1] - t[1])
    return {"setting": setting, "tokens_per_s": tokens_per_s, "tflops": tokens_per_s * 4 * linear / 1e12,
            "rows": rows, "tokens_per_step": (tok[-1] - tok[1]) / (len(t) - 2), "linear_params": linear,
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
            "losses": [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="qwen2.5-1.5b")
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per setting; the first 2 are not timed.")
    parser.add_argument("--batch-size", type=int, default=16, help="Conversations per step; packed settings take as many full rows as hold their tokens.")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--settings", help="Comma-separated settings (default: all this machine can run).")
    parser.add_argument("--rehearsal", action="store_true", help="Run on the CPU in fp32 with a tiny shape.")
    parser.add_argument("--timeout", type=int, default=300, help="Seconds before one setting is abandoned.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be at least 4 (the first 2 are not timed)")
    shape = "tiny" if args.rehearsal else args.shape
    if args.worker:
        print("BENCH " + json.dumps(worker(args.worker, shape, args.steps, args.batch_size, args.max_length,
                                           args.rehearsal)))
        return
    import torch

    if not args.rehearsal and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible; --rehearsal runs the same code on the CPU")
    names = args.settings.split(",") if args.settings else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    device = "cpu" if args.rehearsal else "cuda"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (rehearsal)"
    measured = matmul_tflops(device, torch.float32 if args.rehearsal else torch.bfloat16)
    spec = next((v for k, v in DENSE_BF16_TFLOPS if k in gpu), None)
    print(f"{gpu}: matmul {measured:.1f} TFLOP/s measured" + (f", {spec} TFLOP/s dense bf16 spec" if spec else "")
          + f"; shape {shape}, {args.steps} steps of {args.batch_size} conversations, max_length {args.max_length}")
    rows = []
    for name in names:
        missing = [p for p in SETTINGS[name][2] if importlib.util.find_spec(p) is None]
        if missing:
            print(f"  {name}: skipped ({', '.join(missing)} not installed)")
            continue
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--max-length", str(args.max_length)] + (["--rehearsal"] if args.rehearsal else [])
        # the caller's PYTHONPATH kept: gpu_check.sh installs wheels there on machines without network
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled"})
        except subprocess.TimeoutExpired:
            print(f"  {name}: timed out after {args.timeout} s")
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
        if proc.returncode or not lines:
            print(f"  {name}: FAILED (exit {proc.returncode})\n" + proc.stderr[-2000:])
            continue
        rows.append(json.loads(lines[-1][len("BENCH "):]))
        print(f"  {name}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'losses'})}", flush=True)
    if not rows:
        sys.exit("no setting ran")
    plain = rows[0]["tokens_per_s"] if rows[0]["setting"] == "plain TRL" else None
    print(f"\n| setting | tokens/s | vs plain | rows, tokens a step | TFLOP/s (4N) | MFU vs measured {measured:.3g} "
          + (f"| MFU vs spec {spec} " if spec else "") + "| peak GPU GiB | losses |")
    print("|---|---|---|---|---|---|" + ("---|" if spec else "") + "---|---|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / plain:.2f}x" if plain else "-"
        print(f"| {r['setting']} | {r['tokens_per_s']:,.0f} | {ratio} | {r['rows']}, {r['tokens_per_step']:,.0f} | {r['tflops']:.3g} "
              f"| {r['tflops'] / measured:.0%} " + (f"| {r['tflops'] / spec:.0%} " if spec else "")
              + f"| {r['peak_gib']:.2f} | {' '.join(map(str, r['losses'][:3]))} ... {r['losses'][-1]} |")


if __name__ == "__main__":
    main()
