#!/usr/bin/env bash
# Build (or reuse) a Horovod 0.28.1 wheel that works with torch 2.13 and TensorFlow 2.21,
# and install it into the given Python environment.
#
# Usage: scripts/build_horovod.sh PYTHON
#
# Horovod 0.28.1 is the last release and, as shipped, does not build against torch >= 2.1
# or TF 2.21. scripts/horovod_edits.sh lists the three edits made to its unmodified PyPI
# source release and why. Nothing of Horovod's installed files is edited afterwards:
# grace-dl plugs into the stock Python API.
#
# The wheel is cached outside the clone, keyed by the Horovod, torch, TF and Python
# versions and by the content of horovod_edits.sh, in
#   ${GRACE_DL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/grace-dl}/wheels/
set -euo pipefail

PYTHON=${1:?usage: build_horovod.sh PYTHON}
HOROVOD_VERSION=0.28.1
CACHE_ROOT=${GRACE_DL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/grace-dl}
EDITS=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/horovod_edits.sh
# shellcheck source=horovod_edits.sh
source "$EDITS"

versions=$("$PYTHON" - <<'EOF'
import sys, importlib.metadata as md
print(f"py{sys.version_info.major}{sys.version_info.minor}",
      "torch" + md.version("torch"), "tf" + md.version("tensorflow-cpu"))
EOF
)
key=$(printf '%s %s\n' "$HOROVOD_VERSION" "$versions" | cat - "$EDITS" | sha256sum | cut -c1-16)
wheel_dir="$CACHE_ROOT/wheels/horovod-$HOROVOD_VERSION-$key"

prefix=$("$PYTHON" -c 'import sys; print(sys.prefix)')
if [[ -f "$prefix/.horovod-key" && $(cat "$prefix/.horovod-key") == "$key" ]] \
   && "$PYTHON" -c "import horovod" 2>/dev/null; then
  echo "[horovod] $HOROVOD_VERSION already installed from cached build $key"
  exit 0
fi

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  echo "[horovod] no cached wheel for key $key ($versions); building from source (about 11 minutes)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
  tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"

  apply_horovod_edits "$src"

  # Debian's cmake (3.25): cmake 4 from PyPI rejects Horovod's CMake files.
  cmake_bin=/usr/bin/cmake
  [[ -x $cmake_bin ]] || { echo "[horovod] $cmake_bin missing: install Debian's cmake (scripts/setup.sh does)" >&2; exit 1; }
  mkdir -p "$work/bin"; ln -s "$cmake_bin" "$work/bin/cmake"

  build_jobs=$(nproc)
  env PATH="$work/bin:$PATH" "${HOROVOD_BUILD_FLAGS[@]}" MAKEFLAGS="-j$build_jobs" \
    "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src" \
    > "$work/build.log" 2>&1 || { tail -60 "$work/build.log" >&2; echo "[horovod] build failed" >&2; exit 1; }
  mkdir -p "$wheel_dir"
  cp "$work"/dist/horovod-*.whl "$wheel_dir/"
  printf '%s %s\n' "$HOROVOD_VERSION" "$versions" > "$wheel_dir/KEY"
  echo "[horovod] built and cached in $wheel_dir"
else
  echo "[horovod] reusing cached wheel $wheel_dir"
fi

"$PYTHON" -m pip install --quiet --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
echo "$key" > "$prefix/.horovod-key"
echo "[horovod] installed $HOROVOD_VERSION ($versions)"
