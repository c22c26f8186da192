#!/usr/bin/env bash
# Run the whole pipeline on the embedded default model: data -> LoRA SFT -> LoRA DPO -> eval -> report.
#
#   scripts/quickstart.sh           SmolLM2-135M-Instruct, recipes/quickstart/ (about 15 min on 2 CPU cores)
#   scripts/quickstart.sh --smoke   tiny random model, recipes/smoke/ (a few minutes incl. first install)
#
# Each step is a plain command you can run by hand; this script only chains them.
# Outputs land in runs/<recipe>/ (data/, sft/, dpo/, report.md, report.json, plots/).
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE=quickstart
for arg in "$@"; do
  case "$arg" in
    --smoke) RECIPE=smoke ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

# An explicit empty argument: a bare `source` would hand this script's own flags (--smoke) to setup_env.sh.
source scripts/setup_env.sh ""
R="recipes/$RECIPE"
ACCEL=recipes/accelerate_configs/cpu.yaml
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  ACCEL=recipes/accelerate_configs/single_gpu.yaml
fi

start=$(date +%s)
step() {
  local name="$1"; shift
  local t0; t0=$(date +%s)
  printf '\n==> %s\n    $ %s\n' "$name" "$*"
  "$@"
  printf '    %s done in %ss\n' "$name" "$(( $(date +%s) - t0 ))"
}

step "1/4 data"  python -m data_gen --config "$R/data.yaml"
step "2/4 SFT"   accelerate launch --config_file "$ACCEL" -m train.sft --config "$R/sft.yaml"
step "3/4 DPO"   accelerate launch --config_file "$ACCEL" -m train.dpo --config "$R/dpo.yaml"
step "4/4 eval"  python -m eval --config "$R/eval.yaml"

printf '\nPipeline finished in %ss. Report: runs/%s/report.md\n' "$(( $(date +%s) - start ))" "$RECIPE"
