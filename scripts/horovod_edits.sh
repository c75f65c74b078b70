# The edits applied to Horovod 0.28.1's PyPI source release before building, and the build
# flags. Sourced by scripts/build_horovod.sh; the wheel cache key is a hash of this file's
# content, so changing an edit or a flag here rebuilds, and nothing else does.
#
#   1. CMakeLists.txt:                    CMAKE_CXX_STANDARD 14 -> 17
#      (the headers of torch >= 2.1 and TF 2.21 need C++17)
#   2. horovod/torch/CMakeLists.txt:      CMAKE_CXX_STANDARD 14 -> 17   (same reason)
#   3. horovod/tensorflow/CMakeLists.txt: drop the xla_mpi_ops.cc source
#      (it includes highwayhash headers that TF 2.21 no longer ships; the XLA ops are an
#      optional extra that grace-dl does not use)

HOROVOD_BUILD_FLAGS=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1
                     HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1)

apply_horovod_edits() {
  local src=$1 f
  for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || { echo "[horovod] expected C++14 setting not found in $f" >&2; return 1; }
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
  done
  f="$src/horovod/tensorflow/CMakeLists.txt"
  grep -q 'xla_mpi_ops.cc' "$f" || { echo "[horovod] expected xla_mpi_ops.cc line not found in $f" >&2; return 1; }
  sed -i '/xla_mpi_ops.cc/d' "$f"
}
