"""The TensorFlow backend (:class:`grace_dl.tensorflow.TFOps`) against the NumPy reference.

Deterministic primitives and methods must agree bit for bit with NumPy; random ones
must be reproducible from their ``(key, counter)`` seed. Inputs avoid float32
subnormals: TensorFlow's CPU kernels flush them to zero, NumPy does not.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import grace_dl  # noqa: E402
import grace_dl.tensorflow as grace_tf  # noqa: E402
from grace_dl.core import TensorContext, derive_key  # noqa: E402
from grace_dl.ops import Ops, get_ops  # noqa: E402
from grace_dl.ops.numpy_backend import NumpyOps  # noqa: E402
from grace_dl.tensorflow import TFOps  # noqa: E402

T = TFOps()
N = NumpyOps()
LENGTHS = (1, 7, 33, 100)
REPO = Path(__file__).resolve().parents[1]


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def assert_same(got, want) -> None:
    """``got`` (a TF tensor) holds exactly ``want`` (a NumPy array): dtype, shape, bytes."""
    got_np = T.to_numpy(got)
    want = np.asarray(want)
    assert got_np.dtype == want.dtype, (got_np.dtype, want.dtype)
    assert got_np.shape == want.shape, (got_np.shape, want.shape)
    assert got_np.tobytes() == want.tobytes(), (got_np, want)


def rand(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    """Random test values of ``dtype``: normal floats (no subnormals), small ints, bools."""
    if dtype == "bool":
        return rng.random(n) < 0.5
    if dtype in ("int32", "int64"):
        return rng.integers(-1000, 1000, n).astype(dtype)
    if dtype == "uint8":
        return rng.integers(0, 256, n).astype(np.uint8)
    return (rng.standard_normal(n) * 10).astype(_np_dtype(dtype))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# -- identity, layout, conversion -------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "int32", "int64", "uint8", "bool"])
def test_identity_and_numpy_round_trip(rng, dtype):
    a = rand(rng, 33, dtype)
    x = T.from_numpy(a, tf.zeros(1))
    assert T.owns(x) and T.owns(tf.Variable(x)) and not T.owns(a)
    assert isinstance(get_ops(x), TFOps) and isinstance(get_ops(tf.Variable(x)), TFOps)
    assert T.dtype(x) == T.dtype(tf.Variable(x)) == N.dtype(a) == dtype
    assert T.numel(x) == 33 and T.shape(T.reshape(x, (3, 11))) == (3, 11)
    assert_same(x, a)
    assert_same(T.flatten(T.reshape(x, (11, 3))), a)
    assert_same(T.concat([x[:5], x[5:], x[:0]]), a)


def test_creation():
    like = tf.zeros(1)
    for dtype in ("float32", "int64", "bool", "bfloat16"):
        assert_same(T.zeros(5, dtype, like), N.zeros(5, dtype, None))
    assert_same(T.arange(7, like), N.arange(7, None))
    assert_same(T.zeros(0, "int64", like), N.zeros(0, "int64", None))


@pytest.mark.parametrize("src,dst", [
    ("float32", "float16"), ("float32", "bfloat16"), ("float64", "float16"), ("float64", "float32"),
    ("float16", "float32"), ("bfloat16", "float32"), ("float32", "float64"), ("float32", "int32"),
    ("int64", "int32"), ("int64", "float32"), ("int32", "int64"), ("bool", "uint8"), ("float32", "bool"),
])
@pytest.mark.parametrize("n", LENGTHS)
def test_cast(rng, src, dst, n):
    a = rand(rng, n, src)
    assert_same(T.cast(tf.constant(a), dst), N.cast(a, dst))


def test_cast_float64_to_float16_rounds_once():
    # just above a float16 midpoint: float32 rounds onto the midpoint, then ties go to
    # even; NumPy (and TFOps) round the float64 value once
    a = np.array([1 + 2**-11 + 2**-40, -(1 + 2**-11 + 2**-40), 1 + 2**-11, 65519.99, 65520.0, 2**-25 + 2**-60,
                  np.inf, -np.inf, 0.0, -0.0], np.float64)
    with np.errstate(over="ignore"):
        assert_same(T.cast(tf.constant(a), "float16"), a.astype(np.float16))
    mids = (np.arange(1, 2000, dtype=np.float16).astype(np.float64) + np.arange(2, 2001, dtype=np.float16)) / 2
    near = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf), mids * (1 + 2**-40)])
    assert_same(T.cast(tf.constant(near), "float16"), near.astype(np.float16))


def test_cast_float32_to_float64_keeps_subnormals():
    # TF's own cast flushes float32 subnormals to zero; TFOps rebuilds them from the bits
    a = np.array([1e-40, -1e-40, 1.4e-45, -1.4e-45, 1.1754942e-38, 1.17549435e-38, 0.0, -0.0, 1.5, -np.inf,
                  np.inf, np.nan], np.float32)
    assert_same(T.cast(tf.constant(a), "float64"), a.astype(np.float64))


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_bitwise_primitives(rng, dtype):
    width = np.dtype(dtype).itemsize * 8
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, 300, dtype=dtype, endpoint=True)
    b = rng.integers(info.min, info.max, 300, dtype=dtype, endpoint=True)
    k = rng.integers(0, width, 300).astype(dtype)
    small = N.shift_right(a, k)  # shifting back left by k stays in range
    assert_same(T.bitwise_and(tf.constant(a), tf.constant(b)), N.bitwise_and(a, b))
    assert_same(T.bitwise_or(tf.constant(a), tf.constant(b)), N.bitwise_or(a, b))
    assert_same(T.shift_right(tf.constant(a), tf.constant(k)), N.shift_right(a, k))
    assert_same(T.shift_left(tf.constant(small), tf.constant(k)), N.shift_left(small, k))
    assert_same(T.bitwise_and(tf.constant(a), 0x7F0F), N.bitwise_and(a, 0x7F0F))
    assert_same(T.shift_right(tf.constant(a), 5), N.shift_right(a, 5))
    # broadcasting a column against a row, as lane unpacking does
    col, row = a[:10].reshape(10, 1), k[:4]
    assert_same(T.shift_right(tf.constant(col), tf.constant(row)), N.shift_right(col, row))


@pytest.mark.parametrize("wide,narrow", [("float16", "int32"), ("bfloat16", "int32"), ("float32", "int32"),
                                         ("float64", "int32"), ("int64", "int32"), ("uint8", "int32"),
                                         ("bool", "uint8"), ("float64", "float16")])
@pytest.mark.parametrize("words", [1, 4, 17, 50])
def test_bitcast_matches_numpy_view(rng, wide, narrow, words):
    # ``words`` 8-byte units, so every pair divides evenly
    a = rand(rng, words * 8 // np.dtype(_np_dtype(wide)).itemsize, wide)
    b = N.bitcast(a, narrow)
    assert_same(T.bitcast(tf.constant(a), narrow), b)
    assert_same(T.bitcast(tf.constant(b), wide), a)
    assert_same(T.bitcast(T.bitcast(tf.constant(a), narrow), wide), a)


def test_bitcast_rejects_uneven_lengths():
    with pytest.raises(ValueError):
        T.bitcast(tf.zeros(3, tf.float16), "int32")


# -- elementwise and reductions ---------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("n", LENGTHS)
def test_elementwise(rng, dtype, n):
    a, b = rand(rng, n, dtype), rand(rng, n, dtype)
    a[0] = 0
    x, y = tf.constant(a), tf.constant(b)
    assert_same(T.abs(x), N.abs(a))
    assert_same(T.sign(x), N.sign(a))
    assert_same(T.floor(x), N.floor(a))
    assert_same(T.sqrt(T.abs(x)), N.sqrt(N.abs(a)))
    assert_same(T.where(x > y, x, y), N.where(a > b, a, b))
    assert_same(T.minimum(x, y), N.minimum(a, b))
    special = np.array([np.inf, -np.inf, np.nan, 1.0], dtype)
    assert_same(T.isfinite(tf.constant(special)), N.isfinite(special))


def test_int_elementwise(rng):
    a = rand(rng, 33, "int64")
    assert_same(T.abs(tf.constant(a)), N.abs(a))
    assert_same(T.sign(tf.constant(a)), N.sign(a))
    assert_same(T.isfinite(tf.constant(a)), N.isfinite(a))


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "bool"])
def test_reductions(rng, dtype):
    a = rand(rng, 60, dtype)
    x = tf.constant(a)
    for axis, xs, arr in ((None, x, a), (1, T.reshape(x, (6, 10)), a.reshape(6, 10)),
                          (0, T.reshape(x, (6, 10)), a.reshape(6, 10))):
        s, want = T.to_numpy(T.sum(xs, axis=axis)), N.sum(arr, axis=axis)
        assert s.dtype == np.asarray(want).dtype
        np.testing.assert_allclose(s, want, rtol=1e-6)  # summation order may differ
        assert_same(T.max(xs, axis=axis), np.asarray(N.max(arr, axis=axis)))
    if dtype.startswith("float"):
        np.testing.assert_allclose(T.to_numpy(T.norm(x)), N.norm(a), rtol=1e-6)
    item = T.item(T.max(x))
    assert type(item) is type(N.item(N.max(a))) and item == N.item(N.max(a))


# -- selection ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("n", LENGTHS)
def test_selection(rng, dtype, n):
    a = rand(rng, n, dtype)
    x = tf.constant(a)
    for k in sorted({1, (n + 1) // 2, n}):
        assert_same(T.kth_largest(x, k), N.kth_largest(a, k))
    mask = a > 0
    assert_same(T.nonzero(tf.constant(mask)), N.nonzero(mask))
    idx = np.sort(rng.choice(n, size=(n + 1) // 2, replace=False)).astype(np.int64)
    assert_same(T.gather(x, tf.constant(idx)), N.gather(a, idx))
    assert_same(T.scatter(n + 3, tf.constant(idx), T.gather(x, tf.constant(idx))), N.scatter(n + 3, idx, a[idx]))
    assert_same(T.sort(x), N.sort(a))


def test_sort_puts_nan_last():
    a = np.array([np.nan, 3.0, -1.0, np.inf, -np.inf, np.nan, 0.5], np.float32)
    assert_same(T.sort(tf.constant(a)), N.sort(a))
    b = np.array([True, False, True])
    assert_same(T.sort(tf.constant(b)), N.sort(b))
    c = np.array([np.iinfo(np.int64).max, np.iinfo(np.int64).min, 0])
    assert_same(T.sort(tf.constant(c)), N.sort(c))


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("levels", [1, 3, 1000])  # 1 and 3: heavy ties at the boundary
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_topk_indices_ties(rng, n, levels, dtype):
    a = rng.integers(0, levels, n).astype(dtype)
    x = tf.constant(a)
    for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n, n + 1}):
        got, want = T.topk_indices(x, k), N.topk_indices(a, k)
        assert_same(got, want)
        # and the generic protocol implementation on TF tensors agrees too
        assert_same(Ops.topk_indices(T, x, k), want)


# -- bits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", LENGTHS + (0, 32, 64, 65))
def test_pack_unpack_bits(rng, n):
    m = rng.random(n) < 0.5
    words = N.pack_bits(m)
    assert_same(T.pack_bits(tf.constant(m)), words)
    assert_same(T.unpack_bits(tf.constant(words), n), m)
    ones = np.ones(n, bool)
    assert_same(T.pack_bits(tf.constant(ones)), N.pack_bits(ones))  # bit 31: negative words


@pytest.mark.parametrize("bits", [1, 4, 8, 17, 62])
@pytest.mark.parametrize("n", LENGTHS)
def test_uint_bits(rng, bits, n):
    v = rng.integers(0, 2**bits, n, dtype=np.int64)
    b = N.uint_to_bits(v, bits)
    assert_same(T.uint_to_bits(tf.constant(v), bits), b)
    assert_same(T.bits_to_uint(tf.constant(b), bits), N.bits_to_uint(b, bits))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("n", LENGTHS + (0, 31, 33))
def test_pack_uint_and_fields(rng, bits, n):
    """The TF byte paths of pack_uint, unpack_uint and take_fields give NumPy's words
    and values, top values (a set sign bit) included, eagerly and traced."""
    v = rng.integers(0, 2**bits, n, dtype=np.int64)
    v[: min(n, 3)] = 2**bits - 1
    words = N.pack_uint(v, bits)
    assert_same(T.pack_uint(tf.constant(v.astype(np.int32)), bits), words)
    assert_same(T.unpack_uint(tf.constant(words), n, bits), N.unpack_uint(words, n, bits))
    traced = tf.function(lambda w: T.pack_uint(w, bits))(tf.constant(v.astype(np.int32)))
    assert_same(traced, words)
    if bits <= 8:
        table = (np.arange(2**bits) * 0.5 - 3).astype(np.float32)
        assert_same(T.take_fields(tf.constant(words), n, bits, tf.constant(table)),
                    N.take_fields(words, n, bits, table))


# -- randomness --------------------------------------------------------------------------------
def test_random_uniform_is_seeded_by_key_and_counter():
    like = tf.zeros(1)
    key = derive_key(0, "w")
    u = T.to_numpy(T.random_uniform(1000, key, 3, like))
    assert u.dtype == np.float32 and u.shape == (1000,)
    assert u.min() >= 0.0 and u.max() < 1.0 and 0.4 < u.mean() < 0.6
    np.testing.assert_array_equal(u, T.to_numpy(T.random_uniform(1000, key, 3, like)))
    for other in (T.random_uniform(1000, key, 4, like), T.random_uniform(1000, key + 1, 3, like),
                  T.random_uniform(1000, key + 2**40, 3, like)):
        assert not np.array_equal(u, T.to_numpy(other))


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 17, 1001])
@pytest.mark.parametrize("key", [0, derive_key(0, "w"), 2**64 - 1, 2**100 + 5])
def test_reference_uniform_is_numpys_philox_in_the_graph(n, key):
    """PowerSGD's initial Q inside tf.function: the step tensor gives NumPy's draws bit
    for bit (a TF Philox-4x64 of NumPy's counter and word layout)."""
    like = tf.zeros(1)
    draw = tf.function(lambda step: T.reference_uniform(n, key, step, like))
    for step in (0, 1, 6, 2**40, 2**63 - 10):
        want = N.random_uniform(n, key, step, None)
        got = T.to_numpy(draw(tf.constant(step, tf.int64)))
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes(), (n, key, step)
        assert T.to_numpy(T.reference_uniform(n, key, step, like)).tobytes() == want.tobytes()  # an int: NumPy's


def test_random_uniform_leaves_global_rng_alone():
    tf.random.set_seed(7)
    first = tf.random.uniform([4]).numpy()
    tf.random.set_seed(7)
    T.random_uniform(100, 1, 2, tf.zeros(1))
    T.random_choice(100, 10, 1, 2, tf.zeros(1))
    np.testing.assert_array_equal(tf.random.uniform([4]).numpy(), first)


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (33, 33), (100, 10), (1000, 0)])
def test_random_choice(n, k):
    like = tf.zeros(1)
    c = T.to_numpy(T.random_choice(n, k, 11, 5, like))
    assert c.dtype == np.int64 and c.shape == (k,)
    assert len(set(c.tolist())) == k and np.all(np.diff(c) > 0)
    assert k == 0 or (c.min() >= 0 and c.max() < n)
    np.testing.assert_array_equal(c, T.to_numpy(T.random_choice(n, k, 11, 5, like)))
    if 0 < k < n and n >= 100:
        assert not np.array_equal(c, T.to_numpy(T.random_choice(n, k, 11, 6, like)))
    # roughly uniform over many draws
    if (n, k) == (100, 10):
        counts = np.zeros(n)
        for counter in range(200):
            counts[T.to_numpy(T.random_choice(n, k, 3, counter, like))] += 1
        assert counts.min() > 5 and counts.max() < 45  # expected 20 each


# -- compressors -------------------------------------------------------------------------------
_COMPUTE = {"float16": "float32", "float32": "float32", "float64": "float64", "bfloat16": "float32"}


def _ctx(n: int, in_dtype: str) -> TensorContext:
    return TensorContext(name="w", shape=(n,), numel=n, dtype=_COMPUTE[in_dtype], in_dtype=in_dtype, step=0,
                         shared_key=derive_key(0, "w"), worker_key=derive_key(0, "w", 0), rank=0, world_size=1)


@pytest.mark.parametrize("method,kwargs", [("none", {}), ("fp16", {}), ("topk", {"ratio": 0.1}),
                                           ("topk", {"ratio": 0.5})])
@pytest.mark.parametrize("in_dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("n", LENGTHS)
def test_deterministic_compressors_bit_identical(rng, method, kwargs, in_dtype, n):
    compressor = grace_dl.make(method, **kwargs).compressor
    ctx = _ctx(n, in_dtype)
    a = rand(rng, n, in_dtype)
    a[n // 2] = a[0]  # a tie
    x_np = N.cast(a, ctx.dtype)
    x_tf = T.cast(tf.constant(a), ctx.dtype)
    p_np, p_tf = compressor.compress(N, x_np, ctx), compressor.compress(T, x_tf, ctx)
    assert p_tf.nbytes == p_np.nbytes
    assert_same(p_tf.buffer, p_np.buffer)
    out_np = compressor.decompress(N, p_np.buffer, ctx)
    assert_same(compressor.decompress(T, p_tf.buffer, ctx), out_np)
    # a payload made by one backend decompresses the same on the other
    assert_same(compressor.decompress(T, tf.constant(N.to_numpy(p_np.buffer)), ctx), out_np)


def _grads(rng, n: int, dtype: str, workers: int = 3) -> list[np.ndarray]:
    return [rand(rng, n, dtype).reshape(5, n // 5) for _ in range(workers)]


@pytest.mark.parametrize("method,kwargs", [("topk", {"ratio": 0.1}), ("none", {}), ("fp16", {}),
                                           ("topk", {"ratio": 0.3, "communicator": "broadcast"})])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_simulator_matches_numpy(rng, method, kwargs, dtype):
    sim_np = grace_dl.LocalSimulator(grace_dl.make(method, **kwargs), 3)
    sim_tf = grace_dl.LocalSimulator(getattr(grace_tf, method)(**kwargs), 3)
    for _ in range(3):  # several steps, so residual memory is exercised
        grads = _grads(rng, 100, dtype)
        out_np = sim_np.step([{"w": g} for g in grads])
        out_tf = sim_tf.step([{"w": tf.constant(g)} for g in grads])
        for r in range(3):
            assert T.owns(out_tf[r]["w"])
            assert_same(out_tf[r]["w"], out_np[r]["w"])
    assert sim_tf.workers[0].stats.as_dict() == sim_np.workers[0].stats.as_dict()
    # memory state round-trips through NumPy
    state = sim_tf.workers[0].state_dict()
    for fields in state["memory"].values():
        assert all(isinstance(v, np.ndarray) for v in fields.values())


@pytest.mark.parametrize("method,kwargs", [("qsgd", {"levels": 15, "bucket_size": 16}), ("qsgd", {}),
                                           ("randomk", {"ratio": 0.2}), ("randomk", {"ratio": 0.2, "rescale": True})])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_simulator_random_methods(rng, method, kwargs, dtype):
    sim = grace_dl.LocalSimulator(getattr(grace_tf, method)(**kwargs), 3)
    grads = [g.astype(np.float64) for g in _grads(rng, 100, "float32")]
    out = sim.step([{"w": tf.constant(g.astype(_np_dtype(dtype)))} for g in grads])
    mean = np.mean([g.astype(_np_dtype(dtype)).astype(np.float64) for g in grads], axis=0)
    results = [T.to_numpy(o["w"]) for o in out]
    for res in results:
        assert res.shape == (5, 20) and res.dtype == _np_dtype(dtype)
        np.testing.assert_array_equal(res, results[0])  # every worker aggregates the same
        err = np.linalg.norm(res.astype(np.float64) - mean)
        if method == "qsgd":
            levels, bucket = kwargs.get("levels", 127), kwargs.get("bucket_size", 512)
            flat = [g.reshape(-1) for g in grads]
            worst = max(np.linalg.norm(f[i:i + bucket]) for f in flat for i in range(0, 100, bucket))
            assert np.abs(res - mean).max() <= worst / levels * 1.01 + 1e-2
        elif kwargs.get("rescale"):
            assert np.isfinite(res).all() and err <= 5 * np.linalg.norm(mean) + 1
        else:
            # the mean restricted to 20 shared indices: never further than the mean itself
            assert np.count_nonzero(res) <= 20 and err <= np.linalg.norm(mean) * 1.001
            nz = res != 0
            np.testing.assert_allclose(res[nz], mean[nz], rtol=1e-2, atol=1e-2)
    # reproducible: a fresh simulator draws the same
    again = grace_dl.LocalSimulator(getattr(grace_tf, method)(**kwargs), 3)
    out2 = again.step([{"w": tf.constant(g.astype(_np_dtype(dtype)))} for g in grads])
    np.testing.assert_array_equal(T.to_numpy(out2[0]["w"]), results[0])


def test_variables_go_through_the_pipeline(rng):
    grads = _grads(rng, 100, "float32")
    out_np = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.1), 3).step([{"w": g} for g in grads])
    out_tf = grace_dl.LocalSimulator(grace_tf.topk(ratio=0.1), 3).step([{"w": tf.Variable(g)} for g in grads])
    assert_same(out_tf[1]["w"], out_np[1]["w"])


def test_skipped_state_update_is_said_once():
    """A NaN gradient leaves the residual of TF tensors as it was, and the skip is
    announced once (a NonFiniteWarning naming the tensor and step)."""
    import warnings

    from grace_dl.checks import NonFiniteWarning

    good = np.linspace(-1, 1, 40, dtype=np.float32)
    bad = good.copy()
    bad[5] = np.nan
    method = grace_tf.topk(ratio=0.1).bind(grace_dl.LocalWorld(1).transports[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method.step(tf.constant(good), "w")
        before = method.memory.state["w"]["residual"].numpy()
        method.step(tf.constant(bad), "w")
        method.step(tf.constant(bad), "w")
    said = [str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)]
    assert len(said) == 1 and "tensor 'w' held NaN or Inf at step 1" in said[0], said
    assert method.memory.state["w"]["residual"].numpy().tobytes() == before.tobytes()


def test_gradient_mismatch_message_names_the_variables():
    from grace_dl.tensorflow.checks import _describe, _labels, _name_hash

    def hashes(names):
        return np.array([_name_hash(n) for n in names], np.int64)

    # rank 1 has no gradient for b: each rank names it, from its own side
    on_rank0 = _describe(0, ["w", "b"], [], [hashes(["w", "b"]), hashes(["w"])])
    assert "rank 1 has no gradient (None) for 'b', which rank 0 has" in on_rank0, on_rank0
    on_rank1 = _describe(1, ["w"], ["b"], [hashes(["w", "b"]), hashes(["w"])])
    assert "rank 1 has no gradient (None) for 'b', which rank 0 has" in on_rank1, on_rank1
    # (Keras drops a None gradient from the list: the variable is unknown to rank 1)
    keras = _describe(1, ["w"], [], [hashes(["w", "b"]), hashes(["w"])])
    assert "rank 1 has no gradient for 1 variable(s) that rank 0 has (see rank 0's message" in keras, keras
    assert "another order" in _describe(0, ["w", "b"], [], [hashes(["w", "b"]), hashes(["b", "w"])])
    # names as the adapter names tensors: duplicates get their position
    v = [tf.Variable(1.0, name="x"), tf.Variable(2.0, name="x"), tf.Variable(3.0, name="y")]
    assert _labels([1, 2, 3], v) == ["x:0#0", "x:0#1", "y:0"]


# -- tf.function -------------------------------------------------------------------------------
def test_counts_known_at_run_time_inside_tf_function(rng):
    """DGC's warm-up inside tf.function: top-k and k-th largest with k a tensor, and
    zeros of a length known at run time, give the int-k results."""
    x = rng.standard_normal(50).astype(np.float32)
    x[[3, 17, 30]] = x[5]  # ties go to the lower index
    topk = tf.function(lambda x, k: T.topk_indices(x, k))
    kth = tf.function(lambda x, k: T.kth_largest(x, k))
    zeros = tf.function(lambda n: T.zeros(n, "float32", x))
    for k in (1, 2, 7, 49, 50):
        k_t = tf.constant(k, tf.int64)
        assert T.to_numpy(topk(tf.constant(x), k_t)).tolist() == N.topk_indices(x, k).tolist(), k
        assert T.to_numpy(kth(tf.constant(x), k_t)).tobytes() == np.asarray(N.kth_largest(x, k)).tobytes(), k
        assert T.to_numpy(zeros(k_t)).tobytes() == np.zeros(k, np.float32).tobytes()


def test_ops_trace_in_tf_function(rng):
    n = 77
    compressor = grace_dl.make("topk", ratio=0.1).compressor
    ctx = _ctx(n, "float32")

    def body(x, mask):
        words = T.pack_bits(mask)
        payload = compressor.compress(T, x, ctx).buffer
        return (words, T.unpack_bits(words, n), payload, compressor.decompress(T, payload, ctx),
                T.cast(tf.cast(x, tf.float64), "float16"), T.sort(x), T.random_choice(n, 5, 3, 4, x),
                T.uint_to_bits(T.bits_to_uint(T.uint_to_bits(tf.cast(T.abs(x), tf.int64), 6), 6), 6))

    graph = tf.function(body, input_signature=[tf.TensorSpec([n], tf.float32), tf.TensorSpec([n], tf.bool)])
    a = rand(rng, n, "float32")
    a[3] = a[40]
    m = rng.random(n) < 0.5
    eager = body(tf.constant(a), tf.constant(m))
    traced = graph(tf.constant(a), tf.constant(m))
    for e, t in zip(eager, traced):
        assert_same(t, T.to_numpy(e))
    assert_same(eager[0], N.pack_bits(m))
    assert_same(eager[2], compressor.compress(N, a, ctx).buffer)


def test_log_exp_and_run_time_lengths(rng):
    for dtype in ("float32", "float64"):
        a = np.abs(rand(rng, 1000, dtype)) + 1e-3
        for np_f, tf_f in ((N.log, T.log), (N.exp, T.exp)):
            want, got = np_f(a / 10), T.to_numpy(tf_f(tf.constant(a / 10)))
            assert got.dtype == want.dtype
            # TensorFlow's own kernels: within a few units in the last place, not bit-identical
            assert (np.abs(got - want) / np.spacing(np.abs(want))).max() <= 4
    assert T.length(tf.zeros(5)) == 5

    # inside tf.function, a selection's length is known only when the graph runs: length
    # is then a tensor, and top-k takes an input of run-time length (at least k long)
    @tf.function(input_signature=[tf.TensorSpec([40], tf.float32)])
    def select(x):
        idx = T.nonzero(x > 0)
        padded = T.concat([T.gather(x, idx), T.zeros(3, "float32", x) - 1])
        return T.length(idx) * 1, T.topk_indices(padded, 3)

    a = rand(rng, 40, "float32")
    a[:37] = -np.abs(a[:37])
    a[37:] = np.abs(a[37:]) + 1  # three positives at the end
    count, top = select(tf.constant(a))
    assert int(count) == 3 and T.to_numpy(top).tolist() == [0, 1, 2]
    a[:] = -1.0  # none: the padding fills the top-k
    count, top = select(tf.constant(a))
    assert int(count) == 0 and T.to_numpy(top).tolist() == [0, 1, 2]


@pytest.mark.skipif(os.environ.get("GRACE_DL_ONEDNN_FLIPPED") == "1", reason="already the flipped run")
def test_bit_identity_holds_with_onednn_switched_the_other_way():
    """TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import: the bit-identity tests run
    again in a process with oneDNN switched the other way from this one (CI covers both
    settings on every CPU; oneDNN's kernels differ from TF's own in the last bits)."""
    flipped = "1" if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "") == "0" else "0"
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=flipped, GRACE_DL_ONEDNN_FLIPPED="1", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "bit_identical or simulator_matches_numpy or ops_trace"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]


# -- package surface -------------------------------------------------------------------------------
def test_package_exports():
    import inspect

    from grace_dl.tensorflow import HorovodTFGrace

    for name in grace_dl.list_methods():
        # same signature as the core factory, returning what Horovod takes as compression=
        assert inspect.signature(getattr(grace_tf, name)) == inspect.signature(getattr(grace_dl, name))
        method = getattr(grace_tf, name)()
        assert isinstance(method, HorovodTFGrace) and isinstance(method, grace_dl.Grace)
        assert callable(method.compress) and callable(method.decompress)
    assert isinstance(grace_tf.topk(ratio=0.01), grace_dl.Grace)
    assert grace_tf.from_config({"compressor": "fp16"}).compressor.registry_name == "fp16"
    assert grace_tf.grace_from_params({"compressor": "topk", "communicator": "allgather",
                                      "compress_ratio": 0.1}).compressor.ratio == 0.1
    with pytest.raises(AttributeError):
        grace_tf.no_such_thing  # noqa: B018


def test_import_does_not_load_horovod():
    code = ("import sys, grace_dl.tensorflow as g; g.topk(); "
            "assert not any(m.startswith('horovod') for m in sys.modules), 'horovod imported'")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


_RETRACE_SCRIPT = textwrap.dedent("""
    import tensorflow as tf
    import horovod.tensorflow as hvd
    import grace_dl.tensorflow as grace

    hvd.init()

    def train(make_compression):
        w = tf.Variable(tf.reshape(tf.range(12, dtype=tf.float32), [4, 3]) / 10)

        @tf.function
        def step(x):
            # the method is built inside the traced step, as Horovod's TF2 benchmark does
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.matmul(x, w) ** 2)
            tape = hvd.DistributedGradientTape(tape, compression=make_compression())
            w.assign_sub(0.01 * tape.gradient(loss, [w])[0])
            return loss

        for rows in (2, 5, 3, 5):  # new input shapes retrace the step
            step(tf.ones([rows, 4]) / rows)
        return step.experimental_get_tracing_count(), w.numpy()

    traces, ours = train(lambda: grace.none())
    _, stock = train(lambda: hvd.Compression.none)
    assert traces >= 3, traces  # retraced for each new shape (plus once for the first call's variables)
    assert ours.tobytes() == stock.tobytes(), (ours, stock)
    # a method with state (variables for its residuals and step counters) built per trace
    # traces too (one rank: Horovod hands back the gradient itself)
    traces, topk = train(lambda: grace.topk(ratio=0.5))
    assert traces >= 3 and topk.tobytes() == stock.tobytes(), (traces, topk)
    print("RETRACE-OK")
""")


def test_method_built_inside_a_retraced_tf_function():
    """A method object built inside a tf.function survives retracing (no variable is
    created per method), and grace's `none` gives Horovod's own uncompressed result."""
    if importlib.util.find_spec("horovod") is None:
        pytest.skip("horovod is not installed (run scripts/setup.sh)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _RETRACE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "RETRACE-OK" in proc.stdout, proc.stderr[-3000:]


_HVD_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd
    import grace_dl
    import grace_dl.tensorflow as grace

    hvd.init()
    t = grace.HorovodTFTransport()
    r, size = t.rank, t.size
    assert t.wait(t.allreduce_async(tf.constant([1.0, r]), "grace.a")).numpy().tolist() == [size, size * (size - 1) / 2]
    got = [g.numpy().tolist() for g in t.wait(t.allgather_async(tf.range(r + 1, dtype=tf.int64), "grace.b"))]
    assert got == [list(range(i + 1)) for i in range(size)], got
    got = [g.numpy().tolist() for g in t.wait(t.allgather_async(tf.constant([r, r]), "grace.c", equal_sizes=True))]
    assert got == [[i, i] for i in range(size)], got
    assert t.wait(t.broadcast_async(tf.constant([r, 7.0]), size - 1, "grace.d")).numpy().tolist() == [size - 1, 7]
    # collisions after Horovod's name normalisation stay apart
    a = t.allreduce_async(tf.constant([1.0]), "grace.x.y")
    b = t.allreduce_async(tf.constant([2.0]), "grace.x_y")
    assert t.wait(a).numpy()[0] == size and t.wait(b).numpy()[0] == 2 * size

    grads = [np.random.default_rng(i).standard_normal((4, 25)).astype(np.float32) for i in range(size)]
    for method, kwargs in [("topk", {"ratio": 0.1}), ("fp16", {}), ("qsgd", {}),
                           ("topk", {"ratio": 0.1, "communicator": "broadcast"})]:
        sim = grace_dl.LocalSimulator(grace_dl.make(method, **kwargs), size)
        mine = getattr(grace, method)(**kwargs).bind(t)
        for step in range(2):
            ref = sim.step([{"w": g * (step + 1)} for g in grads])[r]["w"]
            out = mine.step(tf.constant(grads[r] * (step + 1)), "w").numpy()
            if method != "qsgd":  # qsgd's draws differ across backends
                assert out.tobytes() == ref.tobytes(), (method, out, ref)
            assert out.shape == ref.shape and out.dtype == ref.dtype
    print("HVD-OK", r)
""")


@pytest.mark.multirank
def test_horovod_transport_two_ranks(tmp_path):
    horovodrun = Path(sys.executable).with_name("horovodrun")
    if importlib.util.find_spec("horovod") is None or not horovodrun.exists():
        pytest.skip("horovod (with horovodrun) is not installed")
    script = tmp_path / "hvd_tf.py"
    script.write_text(_HVD_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    proc = subprocess.run([str(horovodrun), "-np", "2", "--gloo", "-H", "localhost:2", sys.executable, str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "HVD-OK 0" in out and "HVD-OK 1" in out, out[-4000:]


#: (label, factory, kwargs) of the settings that the graph path traces apart from a
#: method's defaults: schedules that decide on the step in Python (traced in runs before
#: their horizon: DGC's warm-up of sparsity, its counts looked up at the step tensor, a
#: long one across its horizon and a resume; PowerSGD's start_iter, dense and then the
#: first low-rank step right after the resume; 1-bit Adam's warm-up and compression
#: stage; the warm-up policy, dense route first), PowerSGD drawing its Q from the step
#: tensor, and broadcasts of data-dependent sizes
GRAPH_VARIANTS = [
    ("dgc+warmup", "dgc", {"ratio": 0.05, "warmup_steps": 3}),
    ("dgc+long_warmup", "dgc", {"ratio": 0.01, "warmup_steps": 36}),
    ("dgc+warmup_100", "dgc", {"warmup_steps": 100}),
    ("powersgd+start_iter", "powersgd", {"rank": 2, "start_iter": 2}),
    ("powersgd+no_warm_start", "powersgd", {"rank": 2, "warm_start": False}),
    ("onebit_adam+freeze", "onebit_adam", {"freeze_step": 2}),
    ("threshold+broadcast", "threshold", {"communicator": "broadcast"}),
    ("dgc+broadcast", "dgc", {"communicator": "broadcast"}),
    ("topk+warmup_policy", "topk", {"ratio": 0.1, "policies": {"warmup_steps": 2}}),
    ("dgc+warmup_policy", "dgc", {"ratio": 0.05, "warmup_steps": 2, "policies": {"warmup_steps": 1}}),
    ("sketch+one_round", "sketch", {"second_round": False}),
]
#: steps run, and the step before which the state is reloaded, where not (4, 2)
GRAPH_HORIZONS = {"dgc+long_warmup": (38, 20)}

_GRAPH_SCRIPT = textwrap.dedent("""
    import json
    import sys

    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd
    import grace_dl
    import grace_dl.tensorflow as grace

    hvd.init()  # one rank: Horovod's collectives are graph ops all the same

    def op_types(graph):
        # every op of the traced step, those of nested functions (tf.cond branches) included
        types = {op.type for op in graph.get_operations()}
        for function in graph._functions.values():
            types |= {node.op for node in function.definition.node_def}
        return types

    rng = np.random.default_rng(0)
    grads = [{"w": rng.standard_normal((12, 30)).astype(np.float32), "b": rng.standard_normal(30).astype(np.float32)}
             for _ in range(40)]
    variants, horizons = json.loads(sys.argv[1])
    # every registered method with its defaults, then the variants
    configs = [(name, name, {}) for name in grace_dl.list_methods()] + [tuple(v) for v in variants]
    for name, factory, kwargs in configs:
        method = getattr(grace, factory)(**kwargs)
        # 1. what a DistributedGradientTape step traces: no py_function on the graph path
        w = tf.Variable(tf.ones([4, 3]))

        @tf.function
        def tape_step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.matmul(x, w) ** 2)
            tape = hvd.DistributedGradientTape(tape, compression=method)
            return tape.gradient(loss, [w])[0]

        types = op_types(tape_step.get_concrete_function(tf.TensorSpec([2, 4], tf.float32)).graph)
        py = bool(types & {"EagerPyFunc", "PyFunc", "PyFuncStateless"})
        hvd_ops = {t for t in types if t.startswith("Horovod") and t != "HorovodSize"}
        print("PATH", name, method.graph_path, "pyfunc" if py else "no-pyfunc", ",".join(sorted(hvd_ops)), flush=True)
        if not method.graph_path:
            continue
        # 2. the traced pipeline gives the eager pipeline's results, state and byte counts
        traced = getattr(grace, factory)(**kwargs).bind(grace.HorovodTFTransport())
        eager = getattr(grace, factory)(**kwargs).bind(grace.HorovodTFTransport())
        step = tf.function(lambda g: {n: traced.graph_step(t, n) for n, t in g.items()})
        steps, resume = horizons.get(name, (4, 2))
        for i, g in enumerate(grads[:steps]):
            if i == resume:  # a resume between steps: state written into the variables
                traced.load_state_dict(eager.state_dict())
            got = step({n: tf.constant(t) for n, t in g.items()})
            for n, t in g.items():  # a matrix and a vector (PowerSGD sends vectors dense, without state)
                mine, want = got[n].numpy(), eager.step(tf.constant(t), n).numpy()
                assert mine.tobytes() == want.tobytes(), (name, n, i, np.abs(mine - want).max())
        mine, theirs = traced.state_dict(), eager.state_dict()
        assert mine["steps"] == theirs["steps"] == {"w": steps, "b": steps}, (name, mine["steps"])
        assert mine["memory"].keys() == theirs["memory"].keys(), name
        for key, fields in theirs["memory"].items():
            for field, value in fields.items():
                assert mine["memory"][key][field].tobytes() == value.tobytes(), (name, field)
        assert traced.stats.as_dict() == eager.stats.as_dict(), (name, traced.stats, eager.stats)
        print("SAME", name, flush=True)
""")


@functools.lru_cache(maxsize=1)
def _graph_run() -> tuple[int, str, str]:
    """(return code, stdout, stderr) of the graph-path script, run once per session."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _GRAPH_SCRIPT, json.dumps([GRAPH_VARIANTS, GRAPH_HORIZONS])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    return proc.returncode, proc.stdout, proc.stderr


def _traced_paths() -> dict[str, list[str]]:
    """label -> [graph_path, pyfunc or no-pyfunc, Horovod ops...] from the script."""
    if importlib.util.find_spec("horovod") is None:
        pytest.skip("horovod is not installed (run scripts/setup.sh)")
    code, out, err = _graph_run()
    assert code == 0, (out[-2000:], err[-3000:])
    return {line.split()[1]: line.split()[2:] for line in out.splitlines() if line.startswith("PATH")}


def test_graph_path_traces_without_py_function():
    """Inside tf.function, graph-path methods trace their pipeline into the step: the
    traced graph (its nested functions included) has Horovod collectives and no
    py_function, and the traced pipeline gives the eager one's results, state (also
    after loading a checkpoint between steps) and byte counts bit for bit. Methods off
    the graph path keep their py_function."""
    paths = _traced_paths()
    out = _graph_run()[1]
    assert set(paths) == set(grace_dl.list_methods()) | {label for label, _, _ in GRAPH_VARIANTS}, out
    for must in ("topk", "gtopk", "dgc", "powersgd", "qsgd", "fp16", "randomk", "signsgd", "efsignsgd", "onebit",
                 "terngrad", "threshold", "onebit_adam", "sketch") + tuple(label for label, _, _ in GRAPH_VARIANTS):
        assert paths[must][0] == "True", (must, paths[must])
    for name, (on_graph, pyfunc, *collectives) in paths.items():
        if on_graph == "True":
            assert pyfunc == "no-pyfunc" and collectives, (name, pyfunc, collectives)
            assert f"SAME {name}" in out, out
        else:
            assert pyfunc == "pyfunc", (name, pyfunc)


def _every_traced_config() -> list[str]:
    return list(grace_dl.list_methods()) + [label for label, _, _ in GRAPH_VARIANTS]


@pytest.mark.parametrize("label", _every_traced_config())
def test_no_py_function_on_the_tf_function_path(label):
    """Every registered method (its default memory and communicator) and every variant
    that the graph path traces apart: a Horovod TF step inside tf.function holds no
    PyFunc/EagerPyFunc op (its nested functions included), and its Horovod collectives
    are graph ops."""
    on_graph, pyfunc, *collectives = _traced_paths()[label]
    assert pyfunc == "no-pyfunc", f"{label}: a py_function in the traced step"
    assert on_graph == "True" and collectives, (label, on_graph, collectives)


# -- matmul and the low-rank / global top-k methods ----------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matmul_and_transpose(rng, dtype):
    for n, k, m in [(1, 1, 1), (7, 3, 33), (64, 2, 100)]:
        a, b = rand(rng, n * k, dtype).reshape(n, k), rand(rng, k * m, dtype).reshape(k, m)
        assert_same(T.transpose(tf.constant(a)), a.T.copy())
        got, want = T.to_numpy(T.matmul(tf.constant(a), tf.constant(b))), N.matmul(a, b)
        assert got.dtype == want.dtype and got.shape == want.shape
        # each framework's kernel adds in its own order: equal to rounding only
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-4)
        ai, bi = np.round(a), np.round(b)  # integer-valued: exact sums in any order
        assert_same(T.matmul(tf.constant(ai), tf.constant(bi)), N.matmul(ai, bi))


@pytest.mark.parametrize("method,kwargs", [("gtopk", {"ratio": 0.1}),
                                           ("powersgd", {"rank": 2, "min_compression_rate": 1.0}),
                                           ("powersgd", {"rank": 1, "start_iter": 1})])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_low_rank_and_global_topk_match_numpy(rng, method, kwargs, dtype):
    sim_np = grace_dl.LocalSimulator(grace_dl.make(method, **kwargs), 3)
    sim_tf = grace_dl.LocalSimulator(getattr(grace_tf, method)(**kwargs), 3)
    if method == "powersgd":  # (5, 20) goes low rank (from step start_iter)
        assert sim_np.workers[0].compressor.plan((5, 20)) is not None
    for _ in range(3):
        grads = _grads(rng, 100, dtype)
        out_np = sim_np.step([{"w": g} for g in grads])
        out_tf = sim_tf.step([{"w": tf.constant(g)} for g in grads])
        for r in range(3):
            if sim_np.workers[0].compressor.exact_across_backends:
                assert_same(out_tf[r]["w"], out_np[r]["w"])
            else:  # matmuls add in TF's order: equal to rounding, carried on by the memory
                scale = max(np.abs(g).max() for g in grads)
                np.testing.assert_allclose(T.to_numpy(out_tf[r]["w"]), out_np[r]["w"], rtol=0,
                                           atol=(1e-4 if dtype == "float32" else 1e-12) * scale)
    assert sim_tf.workers[0].stats.as_dict() == sim_np.workers[0].stats.as_dict()


# -- every registered deterministic method, generated from the registry ---------------------------
_SMALL_PARAMS = {"topk": {"ratio": 0.1}, "randomk": {"ratio": 0.1}, "dgc": {"ratio": 0.1, "sample_ratio": 0.1},
                 "threshold": {"threshold": 1.0}, "chunk": {"ratio": 0.1, "chunk_size": 16}}


@pytest.mark.parametrize("name", [m for m in grace_dl.list_methods() if grace_dl.make(m).compressor.deterministic])
@pytest.mark.parametrize("in_dtype", ["float32", "float64"])
def test_every_deterministic_method_is_bit_identical_to_numpy(rng, name, in_dtype):
    compressor = grace_dl.make(name, **_SMALL_PARAMS.get(name, {})).compressor
    for n in (7, 100, 1000):
        ctx = _ctx(n, in_dtype)
        x_np = N.cast(rand(rng, n, in_dtype), ctx.dtype)
        p_np = compressor.compress(N, x_np, ctx)
        p_tf = compressor.compress(T, tf.constant(x_np), ctx)
        out_np = compressor.decompress(N, p_np.buffer, ctx)
        out_tf = compressor.decompress(T, p_tf.buffer, ctx)
        assert p_tf.nbytes == p_np.nbytes
        if compressor.exact_across_backends:
            assert_same(p_tf.buffer, p_np.buffer)
            assert_same(out_tf, out_np)
        else:  # framework kernels (matmul, log) add or round in their own way
            np.testing.assert_allclose(T.to_numpy(out_tf), out_np, rtol=1e-4, atol=1e-5)
