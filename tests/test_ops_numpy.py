"""The NumPy ops backend and the payload packing it underlies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from grace_dl.ops.numpy_backend import NumpyOps
from grace_dl.payload import layout_nbytes, pack_words, unpack_words

ops = NumpyOps()


@given(st.lists(st.booleans(), min_size=0, max_size=200))
def test_pack_bits_round_trip_and_layout(bits):
    mask = np.array(bits, dtype=bool)
    words = ops.pack_bits(mask)
    assert words.dtype == np.int32 and words.shape == (-(-len(bits) // 32),)
    assert np.array_equal(ops.unpack_bits(words, len(bits)), mask)
    # element i is bit i % 32 of word i // 32
    for i in np.flatnonzero(mask)[:5]:
        assert (int(words[i // 32]) >> (i % 32)) & 1 == 1


@given(st.integers(1, 12).flatmap(lambda b: st.tuples(
    st.just(b), st.lists(st.integers(0, 2**b - 1), min_size=1, max_size=50))))
def test_uint_bits_round_trip(case):
    bits, values = case
    v = np.array(values, dtype=np.int64)
    flat = ops.uint_to_bits(v, bits)
    assert flat.shape == (len(values) * bits,)
    assert np.array_equal(ops.bits_to_uint(flat, bits), v)


@given(st.integers(1, 16).flatmap(lambda b: st.tuples(
    st.just(b), st.lists(st.integers(0, 2**b - 1), min_size=0, max_size=70))))
def test_pack_uint_fast_path_equals_the_generic_bit_stream(case):
    from grace_dl.ops.base import Ops

    bits, values = case
    v = np.array(values, dtype=np.int64)
    words = ops.pack_uint(v, bits)
    assert np.array_equal(words, Ops.pack_uint(ops, v, bits))
    assert words.shape == (-(-len(values) * bits // 32),)
    assert np.array_equal(ops.unpack_uint(words, len(values), bits), v)


def test_topk_indices_breaks_ties_to_lowest_index():
    x = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0], dtype=np.float32)
    assert ops.topk_indices(x, 1).tolist() == [1]
    assert ops.topk_indices(x, 3).tolist() == [1, 2, 3]
    assert ops.topk_indices(x, 4).tolist() == [1, 2, 3, 4]
    assert ops.topk_indices(x, 0).tolist() == []
    assert ops.topk_indices(x, 9).tolist() == list(range(6))


@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e3, 1e3, width=32)),
       st.integers(1, 300))
def test_topk_indices_are_a_largest_set(x, k):
    k = min(k, len(x))
    idx = ops.topk_indices(x, k)
    assert len(idx) == k and np.all(np.diff(idx) > 0)
    rest = np.setdiff1d(np.arange(len(x)), idx)
    if len(rest):
        assert x[idx].min() >= x[rest].max()


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000, 4097])
def test_random_uniform_gives_the_generators_float32_draws(n):
    # built from the raw 64-bit Philox stream, the draws are the documented Generator's
    want = np.random.Generator(np.random.Philox(key=2**63 + 5, counter=11)).random(n, dtype=np.float32)
    got = ops.random_uniform(n, key=2**63 + 5, counter=11, like=None)
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


def test_random_draws_are_determined_by_key_and_counter():
    a = ops.random_uniform(1000, key=7, counter=3, like=None)
    assert np.array_equal(a, ops.random_uniform(1000, key=7, counter=3, like=None))
    assert not np.array_equal(a, ops.random_uniform(1000, key=7, counter=4, like=None))
    assert not np.array_equal(a, ops.random_uniform(1000, key=8, counter=3, like=None))
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() < 1
    state = np.random.get_state()[1].copy()
    c = ops.random_choice(1000, 50, key=1, counter=2, like=None)
    assert np.array_equal(np.random.get_state()[1], state), "global NumPy RNG was touched"
    assert len(np.unique(c)) == 50 and np.all(np.diff(c) > 0) and c.max() < 1000


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64", "bool"])
@settings(max_examples=25)
@given(n=st.integers(0, 70))
def test_pack_words_round_trips_mixed_layouts(dtype, n):
    rng = np.random.default_rng(n)
    part = (rng.random(n) > 0.5) if dtype == "bool" else (rng.standard_normal(n) * 100).astype(dtype)
    idx = np.arange(n, dtype=np.int32)
    layout = [("int32", n), (dtype, n), ("float32", 1)]
    buf = pack_words(ops, [idx, part, np.ones(1, np.float32)])
    assert buf.dtype == np.int32
    assert buf.nbytes == layout_nbytes(layout)
    got = unpack_words(ops, buf, layout)
    assert np.array_equal(got[0], idx) and np.array_equal(got[1], part) and got[2][0] == 1.0


def test_unpack_words_rejects_a_wrong_layout():
    buf = pack_words(ops, [np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="expects"):
        unpack_words(ops, buf, [("float32", 4)])


def test_log_exp_and_length():
    x = np.array([0.5, 1.0, 2.0, 1e-30, 700.0], np.float64)
    assert np.array_equal(ops.log(x), np.log(x)) and np.array_equal(ops.exp(x), np.exp(x))
    assert ops.log(x.astype(np.float32)).dtype == np.float32
    assert ops.length(x) == 5 and type(ops.length(x)) is int


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 9), m=st.integers(1, 9), dtype=st.sampled_from(["float32", "float64"]))
def test_matmul_and_transpose(n, k, m, dtype):
    rng = np.random.default_rng(n * 100 + k * 10 + m)
    a, b = rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((k, m)).astype(dtype)
    out = ops.matmul(a, b)
    assert out.dtype == np.dtype(dtype) and out.shape == (n, m)
    np.testing.assert_allclose(out, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-5, atol=1e-5)
    assert np.array_equal(ops.transpose(a), a.T) and ops.shape(ops.transpose(a)) == (k, n)


@pytest.mark.parametrize("dtype,width", [("int32", 32), ("int64", 64)])
@settings(max_examples=50)
@given(data=st.data())
def test_bitwise_ops_follow_python_integers(dtype, width, data):
    lo, hi = -(2 ** (width - 1)), 2 ** (width - 1) - 1
    values = data.draw(st.lists(st.integers(lo, hi), min_size=1, max_size=20))
    other = data.draw(st.lists(st.integers(lo, hi), min_size=len(values), max_size=len(values)))
    shifts = data.draw(st.lists(st.integers(0, width - 1), min_size=len(values), max_size=len(values)))
    a, b, k = (np.array(v, dtype=dtype) for v in (values, other, shifts))
    assert ops.bitwise_and(a, b).tolist() == [x & y for x, y in zip(values, other)]
    assert ops.bitwise_or(a, b).tolist() == [x | y for x, y in zip(values, other)]
    assert ops.shift_right(a, k).tolist() == [x >> s for x, s in zip(values, shifts)]  # arithmetic
    small = [x >> s for x, s in zip(values, shifts)]  # fits after shifting left by s
    assert ops.shift_left(np.array(small, dtype=dtype), k).tolist() == [x << s for x, s in zip(small, shifts)]
    assert ops.bitwise_and(a, 0xFF).tolist() == [x & 0xFF for x in values]
    assert ops.dtype(ops.shift_right(a, 3)) == dtype


@pytest.mark.parametrize("data", ["normal", "ties", "nan", "ints", "sparse"])
@pytest.mark.parametrize("n,k", [(5000, 1), (10000, 37), (70000, 8000), (300000, 3000)])
def test_sampled_topk_indices_equal_a_full_ranking(data, n, k):
    # large arrays take the sampled path (candidates not below a sampled threshold);
    # the answer is the k largest, NaN as the largest, ties to the lowest index
    rng = np.random.default_rng(n + k)
    x = {"normal": lambda: rng.standard_normal(n).astype(np.float32),
         "ties": lambda: rng.integers(-3, 3, n).astype(np.float32),
         "nan": lambda: np.where(rng.random(n) < 0.01, np.nan, rng.standard_normal(n)),
         "ints": lambda: rng.integers(0, 4, n),
         "sparse": lambda: np.where(rng.random(n) < 0.001, 1.0, 0.0).astype(np.float32)}[data]()
    key = np.where(np.isnan(x), np.inf, x) if x.dtype.kind == "f" else x
    want = np.sort(np.lexsort((np.arange(n), -key.astype(np.float64)))[:k])
    got = ops.topk_indices(x, k)
    assert got.dtype == np.int64 and np.array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [10, 5000, 100_000])
def test_where_of_a_mask_and_zero_is_numpys_where(dtype, n):
    # the bitwise path for where(mask, x, +0.0) (large arrays) against np.where, with
    # -0.0, NaN and infinities in x and other fills that must take np.where itself
    from grace_dl.ops.numpy_backend import NumpyOps

    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(dtype)
    x[:5] = [np.nan, -0.0, np.inf, -np.inf, 0.0]
    mask = rng.random(n) < 0.3
    for fill in (np.zeros(1, dtype), np.array([-0.0], dtype), np.ones(1, dtype)):
        want = np.where(mask, x, fill)
        got = NumpyOps().where(mask, x, fill)
        assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
