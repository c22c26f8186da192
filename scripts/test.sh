#!/usr/bin/env bash
# Run the test suite: creates or reuses .venv, installs the project with its dev extras, runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` or `scripts/test.sh tests/test_models.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
export HF_HUB_OFFLINE=1
python -m pytest "$@"
