"""The quantization kernels of the ops protocol: each backend's fast kernel gives the bits
of the protocol's default, written in terms of the basic primitives."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grace_dl.ops.base import Ops
from grace_dl.ops.numpy_backend import NumpyOps

ops = NumpyOps()
SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -1e-40, 3e38, -3e38]


def _floats(draw_n, seed, dtype, specials):
    x = np.random.default_rng(seed).standard_normal(draw_n).astype(dtype)
    if specials and draw_n:
        idx = np.random.default_rng(seed + 1).integers(0, draw_n, size=min(draw_n, 4))
        x[idx] = np.array(SPECIAL, dtype)[idx % len(SPECIAL)]
    return x


cases = st.tuples(st.integers(0, 2100), st.integers(0, 10**6), st.sampled_from(["float32", "float64"]), st.booleans())


@settings(max_examples=80, deadline=None)
@given(case=cases)
def test_numpy_kernels_equal_the_protocol_defaults(case):
    n, seed, dtype, specials = case
    x = _floats(n, seed, dtype, specials)
    assert ops.pack_signs(x).tobytes() == Ops.pack_signs(ops, x).tobytes()
    assert ops.tree_sum(x).tobytes() == Ops.tree_sum(ops, x).tobytes()
    assert ops.tree_sum(np.abs(x), 1 / 3).tobytes() == Ops.tree_sum(ops, np.abs(x), 1 / 3).tobytes()
    if n:
        assert ops.sign_means(x).tobytes() == Ops.sign_means(ops, x).tobytes()
    words = ops.pack_signs(x)
    on, off = np.array([2.5], dtype), np.array([-0.0], dtype)
    got = ops.select_bits(words, n, on, off)
    assert got.dtype == np.dtype(dtype) and got.tobytes() == Ops.select_bits(ops, words, n, on, off).tobytes()
    assert got.tobytes() == np.where(x >= 0, on, off).tobytes()


def test_tree_sum_order_is_the_stated_tree():
    # 5 elements: h = 4, so x0 + x4 is added first, x1..x3 carried, then halves
    x = np.array([1e8, 1.0, -1e8, 1.0, 1.0], np.float32)
    a = np.float32(1e8) + np.float32(1.0)
    want = (a + np.float32(-1e8)) + (np.float32(1.0) + np.float32(1.0))
    assert ops.tree_sum(x)[0] == want == Ops.tree_sum(ops, x)[0]


def test_sign_means_of_one_sided_and_empty_sides():
    x = np.array([1.0, 2.0, 3.0, -0.0], np.float32)
    assert ops.sign_means(x).tolist() == [1.5, 0.0]
    assert ops.sign_means(-np.abs(x) - 1).tolist() == [0.0, -2.5]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 20), n=st.integers(0, 300), seed=st.integers(0, 10**6))
def test_pack_uint_kernels_equal_the_generic_bit_stream(bits, n, seed):
    v = np.random.default_rng(seed).integers(0, 1 << bits, n)
    words = ops.pack_uint(v, bits)
    assert words.dtype == np.int32 and words.tobytes() == Ops.pack_uint(ops, v, bits).tobytes()
    back = ops.unpack_uint(words, n, bits)
    assert back.dtype == np.int64 and np.array_equal(back, v)
    assert np.array_equal(back, Ops.unpack_uint(ops, words, n, bits))


@pytest.mark.parametrize("n", [0, 1, 31, 33, 1000, 4097])
def test_torch_kernels_match_numpy_on_cpu_and_through_the_defaults(n):
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()

    class Generic(TorchOps):  # the protocol defaults, as a device without a kernel runs them
        pack_signs = Ops.pack_signs
        select_bits = Ops.select_bits
        tree_sum = Ops.tree_sum
        sign_means = Ops.sign_means

    G = Generic()
    for dtype in ("float32", "float64"):
        x = _floats(n, n, dtype, True)
        t = torch.from_numpy(x.copy())
        for backend in (T, G):
            assert backend.pack_signs(t).numpy().tobytes() == ops.pack_signs(x).tobytes()
            assert backend.tree_sum(t).numpy().tobytes() == ops.tree_sum(x).tobytes()
            if n:
                assert backend.sign_means(t).numpy().tobytes() == ops.sign_means(x).tobytes()
            w = torch.from_numpy(ops.pack_signs(x))
            on, off = torch.tensor([1.5], dtype=t.dtype), torch.tensor([-2.0], dtype=t.dtype)
            assert backend.select_bits(w, n, on, off).numpy().tobytes() == np.where(x >= 0, 1.5, -2.0).astype(dtype).tobytes()
