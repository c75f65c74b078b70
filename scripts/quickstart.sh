#!/usr/bin/env bash
# The main job: set up the environment if needed (idempotent), then train a small MLP on
# scikit-learn's bundled digits with 2 Horovod workers on localhost (Gloo), exchanging
# gradients with grace-dl's top-k (5%) + residual error feedback, and print the loss,
# accuracy and bytes. Extra arguments go to the training script (see --help).
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" TF_CPP_MIN_LOG_LEVEL=2
if [[ $# -eq 0 ]]; then set -- --method topk --ratio 0.05; fi
exec horovodrun -np 2 --gloo python examples/torch_horovod_digits.py "$@"
