#!/usr/bin/env bash
# The main job: set up the environment if needed (idempotent), then run the quickstart
# experiment (configs/quickstart.yaml): 2 Horovod workers on localhost (Gloo) train a small
# MLP on scikit-learn's bundled digits through stock hvd.DistributedOptimizer with
# grace-dl's top-k (5%) + residual error feedback, and print the summary (loss, accuracy,
# bytes sent per worker, compression ratio, time per step). Extra arguments go to
# `grace-dl run` (e.g. --set compression.ratio=0.01; see grace-dl run --help).
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" TF_CPP_MIN_LOG_LEVEL=2
exec grace-dl run configs/quickstart.yaml "$@"
