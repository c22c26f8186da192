#!/usr/bin/env bash
# Run the test suite: creates or reuses .venv, installs the project with its dev extras, runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` or `scripts/test.sh tests/test_models.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
export HF_HUB_OFFLINE=1
# Tests start several torch processes at once (DDP, the pipeline smoke run): sleeping OpenMP threads keep them from
# stalling each other (the training scripts choose by load; see train/cpu_speed.py)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
python -m pytest "$@"
