#!/usr/bin/env bash
# Run the checks: creates or reuses .venv, installs the project with its dev extras, runs ruff, then pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` or `scripts/test.sh tests/test_models.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
export HF_HUB_OFFLINE=1
# Tests start several torch processes at once (DDP, the pipeline smoke run): sleeping OpenMP threads keep them from
# stalling each other (the scripts choose by load; see train/hardware.py)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
python -m ruff check .  # lint first: seconds, where the tests take minutes
python -m pytest "$@"
