#!/usr/bin/env bash
# One-command, idempotent development environment for grace-dl on a bare Debian machine:
#   1. Debian packages (Open MPI for Horovod's MPI controller and mpi4py, Debian's cmake for
#      Horovod's build), installed only when missing;
#   2. a virtual environment in .venv (ignored by git) with the pinned requirements and the
#      package in editable mode;
#   3. Horovod 0.28.1 built from source (scripts/build_horovod.sh), cached outside the clone.
# A second run with nothing changed takes seconds.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
ROOT=$PWD
VENV=${GRACE_DL_VENV:-$ROOT/.venv}

apt_packages=(openmpi-bin libopenmpi-dev cmake g++)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: Debian packages missing: ${missing[*]}; run as root, or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "[setup] installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x $VENV/bin/python ]]; then
  echo "[setup] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python

stamp=$VENV/.grace-dl-requirements
want=$(cat requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml setup.py | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "[setup] installing pinned requirements into $VENV"
  # (the grep drops the notices this machine's pip.conf prints for its absent local mirrors)
  "$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
else
  echo "[setup] requirements already installed"
fi

scripts/build_horovod.sh "$PY"
echo "[setup] environment ready: $VENV"
