#!/usr/bin/env bash
# Run the whole pipeline on the embedded default model: data -> LoRA SFT -> LoRA DPO -> eval -> report.
#
#   scripts/quickstart.sh             SmolLM2-135M-Instruct, recipes/quickstart/ (about 7 min on 2 CPU cores)
#   scripts/quickstart.sh --smoke     tiny random model, recipes/smoke/ (a few minutes incl. first install)
#   scripts/quickstart.sh --seeds N   data once, then SFT, DPO and eval for training seeds 0..N-1 into
#                                     runs/<recipe>/seed<k>/, and one report across seeds (t intervals); N >= 3
#                                     for intervals worth reading. Combines with --smoke.
#
# Each step is a plain command you can run by hand; this script only chains them.
# Outputs land in runs/<recipe>/ (data/, sft/, dpo/ or seed<k>/, report.md, report.json, plots/).
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE=quickstart
SEEDS=
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) RECIPE=smoke ;;
    --seeds) SEEDS="${2:-none}"; shift $(( $# > 1 ? 1 : 0 )) ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
STEPS=4
if [ -n "$SEEDS" ]; then
  [[ "$SEEDS" =~ ^[1-9][0-9]*$ ]] || { echo "--seeds needs a whole number >= 1, got '$SEEDS'" >&2; exit 2; }
  STEPS=5
fi

# An explicit empty argument: a bare `source` would hand this script's own flags (--smoke) to setup_env.sh.
source scripts/setup_env.sh ""
R="recipes/$RECIPE"
ACCEL=recipes/accelerate_configs/cpu.yaml
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  ACCEL=recipes/accelerate_configs/single_gpu.yaml
fi

# Training runs with mimalloc preloaded where it is installed (pyproject: Linux x86-64), keeping freed memory for
# reuse: glibc's heap fragments across batches of different lengths (README "Performance"). A user's LD_PRELOAD wins.
TRAIN_ENV=()
MIMALLOC=$(python -c "from train.hardware import mimalloc_library; print(mimalloc_library() or '')")
if [ -n "$MIMALLOC" ] && [ -z "${LD_PRELOAD:-}" ]; then
  TRAIN_ENV=(env "LD_PRELOAD=$MIMALLOC" "MIMALLOC_PURGE_DELAY=${MIMALLOC_PURGE_DELAY:--1}")
fi

start=$(date +%s)
step() {
  local name="$1"; shift
  local t0; t0=$(date +%s)
  printf '\n==> %s\n    $ %s\n' "$name" "$*"
  "$@"
  printf '    %s done in %ss\n' "$name" "$(( $(date +%s) - t0 ))"
}

step "1/$STEPS data"  python -m data_gen --config "$R/data.yaml"
if [ -z "$SEEDS" ]; then
  step "2/4 SFT"   "${TRAIN_ENV[@]}" accelerate launch --config_file "$ACCEL" -m train.sft --config "$R/sft.yaml"
  step "3/4 DPO"   "${TRAIN_ENV[@]}" accelerate launch --config_file "$ACCEL" -m train.dpo --config "$R/dpo.yaml"
  step "4/4 eval"  python -m eval --config "$R/eval.yaml"
else
  # Only the training seed changes: the eval's own seed (bootstrap, pair subsample) stays, so every seed is
  # scored on the same pairs.
  RUNS=()
  for k in $(seq 0 $((SEEDS - 1))); do
    S="runs/$RECIPE/seed$k"
    step "2/5 SFT seed $k"  "${TRAIN_ENV[@]}" accelerate launch --config_file "$ACCEL" -m train.sft --config "$R/sft.yaml" \
                              --seed "$k" --output_dir "$S/sft"
    step "3/5 DPO seed $k"  "${TRAIN_ENV[@]}" accelerate launch --config_file "$ACCEL" -m train.dpo --config "$R/dpo.yaml" \
                              --seed "$k" --sft_adapter "$S/sft" --output_dir "$S/dpo"
    step "4/5 eval seed $k" python -m eval --config "$R/eval.yaml" --adapters "{sft: $S/sft, dpo: $S/dpo}" --output_dir "$S"
    RUNS+=("$S")
  done
  step "5/5 aggregate" python -m eval aggregate --runs "${RUNS[@]}" --out "runs/$RECIPE"
fi

printf '\nPipeline finished in %ss. Report: runs/%s/report.md\n' "$(( $(date +%s) - start ))" "$RECIPE"
