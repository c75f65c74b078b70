"""The compiled kernels (grace_dl.ops.jit, numba) give the NumPy kernels' bits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from grace_dl.ops import jit
from grace_dl.ops.base import Ops
from grace_dl.ops.numpy_backend import NumpyOps

pytest.importorskip("numba")

ops = NumpyOps()


@pytest.fixture
def without_jit(monkeypatch):
    """Runs a block with the NumPy kernels: ``with without_jit(): ...``."""
    import contextlib

    @contextlib.contextmanager
    def block():
        compiled = jit.kernels()
        monkeypatch.setitem(jit._LOADED, "kernels", None)
        try:
            yield
        finally:
            monkeypatch.setitem(jit._LOADED, "kernels", compiled)

    return block


def _floats(n: int, seed: int) -> np.ndarray:
    """float32 over the whole exponent range, with NaN (either sign), +-inf, signed
    zeros, subnormals, the largest finite values and zero runs."""
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-45, 39, n)).astype(np.float32)
    x[rng.random(n) < 0.05] = 0
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, -1e-45, 3.4e38, -3.4e38], np.float32)
    if n:
        x[rng.integers(0, n, min(n, 12))] = specials[rng.integers(0, len(specials), min(n, 12))]
    if n > 700:
        x[600:700] = 0.0  # whole zero buckets
    return x


def test_the_kernels_are_compiled_here():
    # numba is installed (this module is skipped otherwise): the kernels must load, or
    # every other test here would compare the NumPy kernels with themselves
    assert jit.kernels() is not None
    assert "numba" in jit.describe()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 33, 1000, (1 << 18) + 37])
def test_natural_compression_compiled_is_the_numpy_kernels(without_jit, n):
    x = _floats(n, n)
    compiled = ops.power_of_two_words(x, 11, 3)
    back = ops.power_of_two_from_words(compiled, n)
    with without_jit():
        words = ops.power_of_two_words(x, 11, 3)
        values = ops.power_of_two_from_words(words, n)
    assert compiled.dtype == np.int32 and compiled.tobytes() == words.tobytes()
    assert back.dtype == np.float32 and back.tobytes() == values.tobytes()
    if n <= 1000:  # and the protocol's own definition
        assert compiled.tobytes() == Ops.power_of_two_words(ops, x, 11, 3).tobytes()
        assert back.tobytes() == Ops.power_of_two_from_words(ops, compiled, n).tobytes()


@pytest.mark.parametrize("levels", [1, 3, 7, 8, 15, 127])
@pytest.mark.parametrize("bucket", [1, 5, 32, 512])
@pytest.mark.parametrize("n", [0, 1, 31, 33, 1000, 70_001])
def test_natural_dithering_compiled_is_the_numpy_kernels(without_jit, levels, bucket, n):
    x = _floats(n, n + levels)
    compiled = ops.dither_bucket_words(x, levels, bucket, 5, 9)
    back = ops.dither_bucket_values(compiled, n, levels, bucket, "float32")
    with without_jit():
        words = ops.dither_bucket_words(x, levels, bucket, 5, 9)
        values = ops.dither_bucket_values(words, n, levels, bucket, "float32")
    assert compiled.dtype == np.int32 and compiled.tobytes() == words.tobytes()
    assert back.dtype == np.float32 and back.tobytes() == values.tobytes()
    if n <= 1000:
        assert compiled.tobytes() == Ops.dither_bucket_words(ops, x, levels, bucket, 5, 9).tobytes()


def test_grace_dl_jit_0_turns_the_kernels_off():
    env = dict(os.environ, GRACE_DL_JIT="0")
    code = "from grace_dl.ops import jit; print(jit.kernels() is None, jit.describe())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("True compiled kernels: off (GRACE_DL_JIT=0")


def test_importing_grace_dl_does_not_import_numba():
    code = "import sys, grace_dl, grace_dl.ops.numpy_backend; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("levels", [1, 2, 127])
@pytest.mark.parametrize("bucket", [1, 7, 128, 512])
@pytest.mark.parametrize("n", [0, 1, 31, 1000, 70_001])
def test_qsgd_compiled_is_the_numpy_kernels(without_jit, levels, bucket, n):
    x = _floats(n, n + bucket)
    x[np.isnan(x) | np.isinf(x)] = 1.5  # no NaN norm: the compiled loop codes every block
    # one bucket with a NaN norm: the NumPy kernel codes that block
    nan = x.copy()
    nan[n // 2:n // 2 + 1] = np.nan
    finite, with_nan = ops.bucket_level_words(x, levels, bucket, 3, 4), ops.bucket_level_words(nan, levels, bucket, 3, 4)
    with without_jit():
        want, want_nan = ops.bucket_level_words(x, levels, bucket, 3, 4), ops.bucket_level_words(nan, levels, bucket, 3, 4)
    assert finite.tobytes() == want.tobytes() and with_nan.tobytes() == want_nan.tobytes()
    if n <= 1000:
        assert with_nan.tobytes() == Ops.bucket_level_words(ops, nan, levels, bucket, 3, 4).tobytes()


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 999, 5000])
def test_sketch_median_compiled_is_the_numpy_kernels(without_jit, count, n):
    # the count-sketch estimate: medians in totalOrder (NaN, signed zeros, ties), an even
    # row count's mean of the middle two, rotations that wrap and negated blocks
    width = 300
    blocks = -(-n // width)
    rng = np.random.default_rng(count * n)
    rows = _floats(count * width, count + n).reshape(count, width)
    rows[:, :40] = rng.integers(-2, 3, (count, 40))  # ties across rows
    shifts = rng.integers(0, width, (count, blocks))
    negate = rng.random((count, blocks)) < 0.5
    compiled = ops.rotated_block_median(rows, n, shifts, negate)
    with without_jit():
        want = ops.rotated_block_median(rows, n, shifts, negate)
    assert compiled.dtype == np.float32 and compiled.tobytes() == want.tobytes()
    assert compiled.tobytes() == Ops.rotated_block_median(ops, rows, n, shifts, negate).tobytes()


@pytest.mark.parametrize("key, counter", [(0, 0), (5, 7), (2**128 - 1, 2**64 - 2), (9, 2**64 - 6),
                                          (123456789 << 70, 2**192 - 3), (3, 2**256 - 9)])
def test_compiled_philox_is_numpys_stream(key, counter):
    # successive calls of every length, across blocks and counter carries, continue one
    # stream exactly as NumPy's random_raw does (its unused words kept for the next call)
    from grace_dl.ops.numpy_backend import _CompiledPhilox

    compiled, numpy_philox = _CompiledPhilox(jit.kernels(), key, counter), np.random.Philox(key=key, counter=counter)
    for m in [1, 3, 4, 5, 16, 17, 0, 2, 64, 1001, 7]:
        got, want = compiled.random_raw(m), numpy_philox.random_raw(m)
        assert got.dtype == np.uint64 and np.array_equal(got, want), m


def test_random_kernels_draw_numpys_stream(without_jit):
    draws = ops.random_uniform(100_003, 12, 34, None), ops.uniform_ints(70_001, 9, 12, 34, None)
    with without_jit():
        want = ops.random_uniform(100_003, 12, 34, None), ops.uniform_ints(70_001, 9, 12, 34, None)
    generator = np.random.Generator(np.random.Philox(key=12, counter=34))
    assert draws[0].tobytes() == want[0].tobytes() == generator.random(100_003, dtype=np.float32).tobytes()
    assert draws[1].tobytes() == want[1].tobytes()


@pytest.mark.parametrize("threshold", [0.5, 1e-30, 2.0, np.inf])
def test_threshold_selection_and_scatter_compiled_are_the_numpy_kernels(without_jit, monkeypatch, threshold):
    import grace_dl.ops.numpy_backend as numpy_backend

    monkeypatch.setattr(numpy_backend, "_PACK_AT_LEAST_BLOCKED_MIN", 1)  # the kernels at every size
    x = _floats(50_001, 3)
    x[100:5000] = 0.25  # a long run with nothing at or above 0.5
    level = np.full(1, threshold, np.float32)
    packed = ops.pack_magnitude_at_least(x, level)
    dense = ops.scatter_sparse(x.shape[0], packed, "float32")
    with without_jit():
        want = ops.pack_magnitude_at_least(x, level)
        want_dense = ops.scatter_sparse(x.shape[0], want, "float32")
    assert packed.dtype == np.int32 and packed.tobytes() == want.tobytes()
    assert packed.tobytes() == Ops.pack_magnitude_at_least(ops, x, threshold).tobytes()
    assert dense.dtype == np.float32 and dense.tobytes() == want_dense.tobytes()


def test_scatter_of_indices_not_ascending_takes_the_general_path(without_jit):
    # a payload the compiled one-pass scatter does not take: indices out of order (the
    # last write wins, as NumPy assigns), and one outside the tensor (NumPy's error)
    k = 5000
    idx = np.arange(k, dtype=np.int32)[::-1].copy()
    idx[10] = idx[11]  # a repeated index
    values = np.arange(k, dtype=np.float32) + 1
    buffer = np.concatenate([idx, values.view(np.int32)])
    got = ops.scatter_sparse(2 * k, buffer, "float32")
    with without_jit():
        want = ops.scatter_sparse(2 * k, buffer, "float32")
    assert got.tobytes() == want.tobytes()
    buffer[0] = 3 * k  # out of range
    with pytest.raises(IndexError):
        ops.scatter_sparse(2 * k, buffer, "float32")


@pytest.mark.parametrize("threshold", [0.5, 1e-30, np.inf])
def test_sparse_selection_and_packing_compiled_are_the_numpy_kernels(without_jit, threshold):
    x = _floats(70_001, 8)
    level = np.full(1, threshold, np.float32)
    idx = ops.nonzero_magnitude_at_least(x, level)
    payload = ops.pack_sparse(x, idx)
    with without_jit():
        want_idx = ops.nonzero_magnitude_at_least(x, level)
        want = ops.pack_sparse(x, want_idx)
    assert idx.dtype == np.int64 and np.array_equal(idx, want_idx)
    assert payload.dtype == np.int32 and payload.tobytes() == want.tobytes()
    bad = np.arange(5000, dtype=np.int64)
    bad[-1] = x.shape[0]  # out of range: the kernel hands over to NumPy's own path
    got = ops.pack_sparse(x, bad)
    with without_jit():
        assert got.tobytes() == ops.pack_sparse(x, bad).tobytes()
