"""The sign methods: signsgd, signum (with its momentum memory), efsignsgd and onebit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grace_dl
from grace_dl.compressors.sign import pairwise_sum
from grace_dl.memories import SignumMomentum
from grace_dl.ops.numpy_backend import NumpyOps

from helpers import make_ctx, normal

ops = NumpyOps()
SIGN_METHODS = ["signsgd", "signum", "efsignsgd", "onebit"]
SCALES = {"signsgd": 0, "signum": 0, "efsignsgd": 1, "onebit": 2}


def round_trip(comp, x, **ctx_args):
    ctx = make_ctx(len(x), dtype=x.dtype.name, **ctx_args)
    payload = comp.compress(ops, x, ctx)
    return payload, comp.decompress(ops, payload.buffer, ctx)


def expected_signs(x):
    return np.where(x >= 0, 1.0, -1.0).astype(x.dtype)


# -- wire size ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", SIGN_METHODS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_payload_size_formula(name, dtype):
    comp = grace_dl.make(name).compressor
    itemsize = np.dtype(dtype).itemsize
    for n in list(range(1, 70)) + [95, 96, 97, 1000, 1024, 4097]:
        formula = 4 * math.ceil(n / 32) + SCALES[name] * itemsize
        assert comp.payload_nbytes(n, dtype) == formula
        payload, out = round_trip(comp, normal(n, seed=n, dtype=dtype))
        assert payload.nbytes == payload.buffer.nbytes == formula
        assert out.shape == (n,) and out.dtype == np.dtype(dtype)


def test_signsgd_is_sixteen_times_smaller_than_float32():
    assert grace_dl.make("signsgd").compressor.payload_nbytes(32 * 1000) * 32 == 32 * 1000 * 4


# -- decompressed values ------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 700), seed=st.integers(0, 10**6), dtype=st.sampled_from(["float32", "float64"]),
       zeros=st.integers(0, 5))
def test_values_match_a_numpy_computation(n, seed, dtype, zeros):
    x = normal(n, seed=seed, dtype=dtype)
    x[: min(zeros, n)] = 0  # zeros are sent as +1
    signs = expected_signs(x)
    for name in ("signsgd", "signum"):
        _, out = round_trip(grace_dl.make(name).compressor, x)
        assert np.array_equal(out, signs)

    _, out = round_trip(grace_dl.make("efsignsgd").compressor, x)
    scale = np.abs(x.astype(np.float64)).sum() / n
    np.testing.assert_allclose(out, signs * scale, rtol=1e-5 if dtype == "float32" else 1e-12)
    assert len(np.unique(np.abs(out))) == 1

    _, out = round_trip(grace_dl.make("onebit").compressor, x)
    pos, neg = x >= 0, x < 0
    pos_mean = x[pos].astype(np.float64).mean() if pos.any() else 0.0
    neg_mean = x[neg].astype(np.float64).mean() if neg.any() else 0.0
    want = np.where(pos, pos_mean, neg_mean)
    np.testing.assert_allclose(out, want, rtol=1e-5 if dtype == "float32" else 1e-12, atol=0)
    assert np.all(out[neg] < 0) and np.all(out[pos] >= 0)


def test_signsgd_bits_on_the_wire():
    x = np.array([1.0, -2.0, 0.0, -0.0, 3.0, -1e-30] + [5.0] * 30, np.float32)
    payload, _ = round_trip(grace_dl.make("signsgd").compressor, x)
    bits = np.unpackbits(payload.buffer.view(np.uint8), bitorder="little")[:36]
    assert list(bits[:6]) == [1, 0, 1, 1, 1, 0]  # -0.0 >= 0 too
    assert bits[6:].all()
    assert payload.buffer.dtype == np.int32 and len(payload.buffer) == 2


@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 513])
def test_zero_tensor(n):
    zero = np.zeros(n, np.float32)
    for name in ("signsgd", "signum"):
        comp = grace_dl.make(name).compressor
        assert not comp.zero_preserving
        assert np.array_equal(round_trip(comp, zero)[1], np.ones(n, np.float32))
    for name in ("efsignsgd", "onebit"):
        comp = grace_dl.make(name).compressor
        assert comp.zero_preserving
        assert np.array_equal(round_trip(comp, zero)[1], zero)


def test_onebit_one_sided_tensors():
    comp = grace_dl.make("onebit").compressor
    pos = np.array([1.0, 2.0, 3.0], np.float32)
    assert np.array_equal(round_trip(comp, pos)[1], np.full(3, 2.0, np.float32))
    assert np.array_equal(round_trip(comp, -pos)[1], np.full(3, -2.0, np.float32))


def test_pairwise_sum_is_exact_on_integers_and_handles_odd_lengths():
    for n in [1, 2, 3, 5, 31, 33, 100, 1001]:
        x = np.arange(n, dtype=np.float32)
        out = pairwise_sum(ops, x, "float32")
        assert out.shape == (1,) and out[0] == n * (n - 1) / 2
    assert pairwise_sum(ops, np.zeros(0, np.float32), "float32")[0] == 0


def test_defaults_and_contracts():
    for name in SIGN_METHODS:
        g = grace_dl.make(name)
        c = g.compressor
        assert c.deterministic and not c.summable and c.bias == "biased"
        assert type(g.communicator).__name__ == "Allgather"
    assert grace_dl.make("signsgd").communicator.aggregate == "majority"
    assert grace_dl.make("signum").communicator.aggregate == "majority"
    assert grace_dl.make("efsignsgd").communicator.aggregate == "mean"
    assert grace_dl.make("onebit").communicator.aggregate == "mean"
    assert type(grace_dl.make("signsgd").memory).__name__ == "NoMemory"
    assert isinstance(grace_dl.make("signum").memory, SignumMomentum)
    assert grace_dl.make("signum", momentum=0.5).memory.momentum == 0.5
    for name in ("efsignsgd", "onebit"):
        assert type(grace_dl.make(name).memory).__name__ == "ResidualMemory"
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(grace_dl.ConfigError):
            grace_dl.make("signum", momentum=bad)
    with pytest.raises(grace_dl.ConfigError):
        grace_dl.make("signsgd", allgather=1)
    with pytest.raises(grace_dl.ConfigError):
        grace_dl.make("signsgd", communicator="allreduce")


# -- in the simulator ---------------------------------------------------------------------
def grads_for(size, step, n=203):
    return [{"a": normal(n, seed=1000 * step + 10 * r), "b": normal(n + 40, seed=1000 * step + 10 * r + 1)}
            for r in range(size)]


@pytest.mark.parametrize("method", ["efsignsgd", "onebit"])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_error_feedback_loses_no_mass(method, size):
    sim = grace_dl.LocalSimulator(grace_dl.make(method), size)
    total_grad = {"a": 0.0, "b": 0.0}
    total_out = {"a": 0.0, "b": 0.0}
    for t in range(10):
        grads = grads_for(size, t)
        out = sim.step(grads)
        for name in total_grad:
            total_grad[name] = total_grad[name] + sum(g[name].astype(np.float64) for g in grads)
            total_out[name] = total_out[name] + out[0][name].astype(np.float64) * size
    for name in total_grad:
        residuals = sum(w.memory.state[name]["residual"].astype(np.float64) for w in sim.workers)
        np.testing.assert_allclose(total_out[name] + residuals, total_grad[name], atol=1e-4)
        assert np.abs(residuals).max() > 0


@pytest.mark.parametrize("method", ["signsgd", "signum"])
def test_majority_vote_of_three_workers(method):
    sim = grace_dl.LocalSimulator(grace_dl.make(method, aggregate="majority", momentum=0.0)
                                  if method == "signum" else grace_dl.make(method, aggregate="majority"), 3)
    for t in range(3):
        grads = grads_for(3, t)
        grads[0]["a"][:5] = 0.0  # a zero votes +1
        out = sim.step(grads)
        for name in ("a", "b"):
            votes = sum(np.where(g[name] >= 0, 1, -1) for g in grads)
            want = np.sign(votes).astype(np.float32)
            assert np.all(want != 0)  # three voters never tie
            for r in range(3):
                assert np.array_equal(out[r][name], want)


def test_majority_is_the_factory_default_and_mean_is_available():
    grads = grads_for(3, 0)
    out = grace_dl.LocalSimulator(grace_dl.signsgd(), 3).step(grads)
    assert set(np.unique(out[0]["a"])) <= {-1.0, 1.0}
    mean = grace_dl.LocalSimulator(grace_dl.signsgd(aggregate="mean"), 3).step(grads)
    signs = sum(expected_signs(g["a"]) for g in grads) * np.float32(1 / 3)
    np.testing.assert_allclose(mean[0]["a"], signs, rtol=1e-6)


def test_signum_momentum_follows_the_formula_and_survives_a_checkpoint():
    beta = 0.75
    sim = grace_dl.LocalSimulator(grace_dl.signum(momentum=beta, aggregate="majority"), 1)
    m = {"a": np.zeros(203, np.float64), "b": np.zeros(243, np.float64)}
    for t in range(4):
        grads = grads_for(1, t)
        out = sim.step(grads)
        for name in m:
            m[name] = beta * m[name] + (1 - beta) * grads[0][name]
            state = sim.workers[0].memory.state[name]["momentum"]
            assert set(sim.workers[0].memory.state[name]) == {"momentum"}
            np.testing.assert_allclose(state, m[name], rtol=1e-5, atol=1e-6)
            assert np.array_equal(out[0][name], expected_signs(state))
    saved = sim.workers[0].state_dict()
    fresh = grace_dl.LocalSimulator(grace_dl.signum(momentum=beta, aggregate="majority"), 1)
    fresh.workers[0].load_state_dict(saved)
    grads = grads_for(1, 9)
    a, b = sim.step(grads), fresh.step(grads)
    for name in m:
        assert np.array_equal(a[0][name], b[0][name])
        assert np.array_equal(sim.workers[0].memory.state[name]["momentum"],
                              fresh.workers[0].memory.state[name]["momentum"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_never_enters_the_signum_momentum(bad):
    mem = SignumMomentum(momentum=0.9)
    ctx = make_ctx(50)
    g = normal(50)
    mem.update(ops, mem.compensate(ops, g, ctx), None, ctx)
    before = mem.state["t"]["momentum"].copy()
    poisoned = normal(50, seed=1)
    poisoned[7] = bad
    compensated = mem.compensate(ops, poisoned, ctx)
    assert not np.all(np.isfinite(compensated))  # it passes through to the compressor
    mem.update(ops, compensated, None, ctx)
    assert np.array_equal(mem.state["t"]["momentum"], before)
    # and on a first step, the state starts at zero rather than non-finite
    fresh = SignumMomentum()
    fresh.update(ops, fresh.compensate(ops, poisoned, ctx), None, ctx)
    assert np.array_equal(fresh.state["t"]["momentum"], np.zeros(50, np.float32))


def test_signum_momentum_rejects_a_reused_name_of_another_size():
    mem = SignumMomentum()
    mem.update(ops, mem.compensate(ops, normal(10), make_ctx(10)), None, make_ctx(10))
    with pytest.raises(ValueError, match="share one name"):
        mem.compensate(ops, normal(11), make_ctx(11))


# -- backends -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SIGN_METHODS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 5, 32, 33, 100, 1000, 4099])
def test_torch_payloads_are_bit_identical_to_numpy(name, dtype, n):
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    t_ops = TorchOps()
    comp = grace_dl.make(name).compressor
    x = normal(n, seed=n, dtype=dtype) * 7
    x[: n // 4] = 0
    ctx = make_ctx(n, dtype=dtype)
    a = comp.compress(ops, x, ctx)
    b = comp.compress(t_ops, torch.from_numpy(x.copy()), ctx)
    assert a.nbytes == b.nbytes and a.buffer.tobytes() == b.buffer.numpy().tobytes()
    da = comp.decompress(ops, a.buffer, ctx)
    db = comp.decompress(t_ops, b.buffer, ctx).numpy()
    assert da.dtype == db.dtype and da.tobytes() == db.tobytes()


def test_torch_signum_state_moves_between_backends():
    torch = pytest.importorskip("torch")
    g = grace_dl.signum(aggregate="majority")
    sim = grace_dl.LocalSimulator(g, 1)
    sim.step([{"w": torch.from_numpy(normal(40))}])
    state = sim.workers[0].state_dict()
    assert isinstance(state["memory"]["w"]["momentum"], np.ndarray)
    fresh = grace_dl.LocalSimulator(g, 1)
    fresh.workers[0].load_state_dict(state)
    fresh.step([{"w": torch.from_numpy(normal(40, seed=1))}])
    assert isinstance(fresh.workers[0].memory.state["w"]["momentum"], torch.Tensor)


@pytest.mark.parametrize("name", SIGN_METHODS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 7, 33, 100, 1000])
def test_tensorflow_payloads_are_bit_identical_to_numpy(name, dtype, n):
    tf = pytest.importorskip("tensorflow")
    from grace_dl.tensorflow import TFOps

    t_ops = TFOps()
    comp = grace_dl.make(name).compressor
    x = normal(n, seed=n, dtype=dtype) * 7
    x[: n // 4] = 0
    ctx = make_ctx(n, dtype=dtype)
    a = comp.compress(ops, x, ctx)
    b = comp.compress(t_ops, tf.constant(x), ctx)
    assert a.nbytes == b.nbytes and a.buffer.tobytes() == t_ops.to_numpy(b.buffer).tobytes()
    da = comp.decompress(ops, a.buffer, ctx)
    db = t_ops.to_numpy(comp.decompress(t_ops, b.buffer, ctx))
    assert da.dtype == db.dtype and da.tobytes() == db.tobytes()


@pytest.mark.parametrize("name", SIGN_METHODS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensorflow_simulator_matches_numpy(name, dtype):
    tf = pytest.importorskip("tensorflow")
    sim_np = grace_dl.LocalSimulator(grace_dl.make(name), 3)
    sim_tf = grace_dl.LocalSimulator(grace_dl.make(name), 3)
    for t in range(3):
        grads = [{k: v.astype(dtype) for k, v in g.items()} for g in grads_for(3, t)]
        out_np = sim_np.step(grads)
        out_tf = sim_tf.step([{k: tf.constant(v) for k, v in g.items()} for g in grads])
        for r in range(3):
            for k in out_np[r]:
                assert out_np[r][k].tobytes() == out_tf[r][k].numpy().tobytes()


def test_sign_methods_trace_in_tf_function():
    tf = pytest.importorskip("tensorflow")
    from grace_dl.tensorflow import TFOps

    t_ops, n = TFOps(), 77
    ctx = make_ctx(n)
    comps = [grace_dl.make(name).compressor for name in SIGN_METHODS]

    def body(x):
        return [c.decompress(t_ops, c.compress(t_ops, x, ctx).buffer, ctx) for c in comps]

    graph = tf.function(body, input_signature=[tf.TensorSpec([n], tf.float32)])
    x = tf.constant(normal(n))
    for e, g in zip(body(x), graph(x)):
        assert e.numpy().tobytes() == g.numpy().tobytes()
