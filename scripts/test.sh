#!/usr/bin/env bash
# The test command: set up the environment if needed (idempotent), then run the whole
# suite (unit tests, then the multi-rank horovodrun/mpirun tests). Extra arguments go to
# pytest, e.g. `scripts/test.sh -m "not multirank"` for the fast tier only.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
