"""PowerSGD (Vogels et al. 2019): the low-rank approximation, warm start, error
feedback, the dense paths, wire bytes, state, and an independent NumPy reference."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grace_dl
from grace_dl.compressors.powersgd import PowerSGD, PowerSGDCommunicator, PowerSGDMemory
from grace_dl.core import TensorContext, derive_key
from grace_dl.ops.numpy_backend import NumpyOps
from grace_dl.registry import ConfigError
from grace_dl.transport.base import allreduce_traffic
from grace_dl.transport.local import LocalWorld

ops = NumpyOps()


def ctx_for(shape, *, dtype="float32", step=0, name="w", seed=0, rank=0, world_size=1) -> TensorContext:
    numel = int(np.prod(shape))
    return TensorContext(name=name, shape=tuple(shape), numel=numel, dtype=dtype, in_dtype=dtype, step=step,
                         shared_key=derive_key(seed, name), worker_key=derive_key(seed, name, rank),
                         rank=rank, world_size=world_size)


def approx(comp: PowerSGD, m: np.ndarray, step: int = 0) -> np.ndarray:
    """One worker's approximation of matrix ``m`` with a fresh Q (no memory)."""
    ctx = ctx_for(m.shape, dtype=m.dtype.name, step=step)
    payload = comp.compress(ops, m.reshape(-1), ctx)
    return comp.decompress(ops, payload.buffer, ctx).reshape(m.shape)


def decaying(n, m, seed=0, decay=0.5, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """A matrix with singular values decay**i, and those values."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((m, m)))
    s = decay ** np.arange(min(n, m))
    return ((u[:, :len(s)] * s) @ v[:, :len(s)].T).astype(dtype), s


def best_error(s: np.ndarray, r: int) -> float:
    """Frobenius error of the best rank-r approximation (Eckart-Young)."""
    return float(np.sqrt(np.sum(s[r:] ** 2)))


def run(sim, grads_per_step):
    return [sim.step(g) for g in grads_per_step]


def worker_grads(size, step, shapes, dtype=np.float32):
    return [{name: np.random.default_rng(1000 * step + 10 * r + i).standard_normal(shape).astype(dtype)
             for i, (name, shape) in enumerate(shapes.items())} for r in range(size)]


# -- configuration ---------------------------------------------------------------------------
def test_factory_defaults_work_out_of_the_box():
    g = grace_dl.powersgd(rank=2)
    assert isinstance(g.compressor, PowerSGD) and g.compressor.rank == 2
    assert isinstance(g.memory, PowerSGDMemory) and isinstance(g.communicator, PowerSGDCommunicator)
    assert g.communicator.aggregate == "mean" and g.memory.error_feedback
    assert (g.compressor.warm_start, g.compressor.min_compression_rate, g.compressor.start_iter,
            g.compressor.epsilon) == (True, 2.0, 0, 1e-8)
    assert not g.compressor.exact_across_backends and g.compressor.summable
    assert grace_dl.from_config({"compressor": "powersgd", "rank": 3, "error_feedback": False}).memory.error_feedback \
        is False


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "rank must be an int >= 1"),
    ({"rank": 1.5}, "rank must be int"),
    ({"min_compression_rate": -1.0}, "min_compression_rate must be in [0, inf)"),
    ({"start_iter": -1}, "start_iter must be an int >= 0"),
    ({"epsilon": 0.0}, "epsilon must be in (0, inf)"),
    ({"aggregate": "majority"}, "aggregate must be 'mean' or 'sum'"),
])
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        grace_dl.powersgd(**kwargs)


def test_plan_matrix_view_rank_cap_and_dense_rules():
    comp = PowerSGD(rank=2)
    assert comp.plan((16, 33)) == (16, 33, 2)
    assert comp.plan((4, 3, 5)) is None  # (4 + 15) * 2 * 2 >= 60
    assert PowerSGD(rank=2, min_compression_rate=1.0).plan((4, 3, 5)) == (4, 15, 2)  # (shape[0], numel / shape[0])
    assert comp.plan((33,)) is None and comp.plan(()) is None and comp.plan((0, 5)) is None
    # factors not smaller by min_compression_rate: (n + m) r rate >= n m
    assert PowerSGD(rank=1).plan((4, 4)) is None  # 8 * 2 = 16 >= 16
    assert PowerSGD(rank=1, min_compression_rate=1.99).plan((4, 4)) == (4, 4, 1)
    # the rank is capped at min(n, m); rate 0 forces low rank
    assert PowerSGD(rank=9, min_compression_rate=0.0).plan((3, 7)) == (3, 7, 3)
    assert PowerSGD(rank=1, start_iter=2).plan((16, 33), step=1) is None
    assert PowerSGD(rank=1, start_iter=2).plan((16, 33), step=2) == (16, 33, 1)


# -- the approximation ---------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), m=st.integers(2, 30), seed=st.integers(0, 10**6))
def test_approximation_error_never_grows_with_rank(n, m, seed):
    # the draw for rank r + 1 extends the one for rank r (same key and counter), so the
    # column space of P grows with the rank and the projection error can only shrink;
    # a tiny epsilon, as the default (1e-8) shortens columns of P of norm near 1e-8
    x = np.random.default_rng(seed).standard_normal((n, m))
    errors = [np.linalg.norm(x - approx(PowerSGD(rank=r, min_compression_rate=0.0, epsilon=1e-30), x))
              for r in range(1, min(n, m) + 1)]
    assert all(b <= a * (1 + 1e-6) + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] <= 1e-6 * np.linalg.norm(x)  # full rank: exact
    # one worker's result is an orthogonal projection of the input: never longer
    assert all(e <= np.linalg.norm(x) * (1 + 1e-9) for e in errors)


def test_approximation_error_decreases_with_rank_on_a_decaying_spectrum():
    x, s = decaying(40, 60)
    errors = [np.linalg.norm(x - approx(PowerSGD(rank=r), x)) for r in (1, 2, 4, 8)]
    assert all(b < 0.7 * a for a, b in zip(errors, errors[1:])), errors
    assert all(e >= best_error(s, r) * (1 - 1e-9) for e, r in zip(errors, (1, 2, 4, 8)))


def test_rank_at_least_min_dimension_is_exact():
    x = np.random.default_rng(3).standard_normal((6, 50))
    for rank in (6, 7, 100):  # epsilon shortens columns of P of norm near it: make it tiny
        out = approx(PowerSGD(rank=rank, min_compression_rate=0.0, epsilon=1e-30), x)
        np.testing.assert_allclose(out, x, rtol=0, atol=1e-12)
    x32 = x.astype(np.float32)
    np.testing.assert_allclose(approx(PowerSGD(rank=6, min_compression_rate=0.0), x32), x32, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_warm_start_power_iteration_converges_to_the_best_rank_r(rank):
    # the same matrix every step, no error feedback: warm start makes the steps one power
    # iteration, whose error falls to the optimum; without it every step starts afresh
    x, s = decaying(30, 45, seed=rank)
    warm = grace_dl.LocalSimulator(grace_dl.powersgd(rank=rank, error_feedback=False), 1)
    cold = grace_dl.LocalSimulator(grace_dl.powersgd(rank=rank, error_feedback=False, warm_start=False), 1)
    warm_err = [np.linalg.norm(warm.step([{"w": x}])[0]["w"] - x) for _ in range(25)]
    cold_err = [np.linalg.norm(cold.step([{"w": x}])[0]["w"] - x) for _ in range(25)]
    best = best_error(s, rank)
    assert warm_err[-1] <= best * (1 + 1e-6)
    assert warm_err[0] > best * 1.01, "the first step was already optimal: the test proves nothing"
    assert min(cold_err) > best * 1.001 and "q" not in cold.workers[0].memory.state.get("w", {})


def test_matches_an_independent_numpy_reference():
    """Algorithm 1 of the paper with error feedback, written here in float64 from the
    paper: P = sum_w M_w Q; P^ = orthonormal(P); Q = mean_w M_w^T P^; A = P^ Q^T;
    e_w = M_w - A; next Q = this Q."""
    size, rank, shape, steps = 4, 2, (12, 20), 5
    sim = grace_dl.LocalSimulator(grace_dl.powersgd(rank=rank), size)
    key = derive_key(0, "w")
    q = (ops.random_uniform(rank * shape[1], key, 0, None).astype(np.float64) * 2 - 1).reshape(rank, shape[1]).T
    errors = [np.zeros(shape) for _ in range(size)]
    for t in range(steps):
        grads = worker_grads(size, t, {"w": shape}, dtype=np.float64)
        out = sim.step(grads)
        ms = [g["w"] + e for g, e in zip(grads, errors)]
        p = sum(mw @ q for mw in ms)
        p_hat, tri = np.linalg.qr(p)  # Gram-Schmidt's result: R with a positive diagonal
        p_hat = p_hat * np.sign(np.diag(tri))
        q = sum(mw.T @ p_hat for mw in ms) / size
        a = p_hat @ q.T
        errors = [mw - a for mw in ms]
        # float64 rounding, and epsilon = 1e-8 against columns of norm ~1
        for r in range(size):
            np.testing.assert_allclose(out[r]["w"], a, rtol=0, atol=1e-8)
        np.testing.assert_allclose(sim.workers[1].memory.state["w"]["error"].reshape(shape), errors[1], atol=1e-8)
        np.testing.assert_allclose(sim.workers[2].memory.state["w"]["q"].reshape(rank, -1), q.T, atol=1e-8)
        assert np.abs(errors[1]).max() > 0.1 and np.abs(a).max() > 0.1


# -- error feedback and the warm-start state ---------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 4])
def test_error_feedback_loses_no_mass(size):
    """sum over steps of N * aggregate + the workers' final errors == sum of gradients."""
    shapes = {"w": (16, 33), "conv": (8, 3, 3, 3), "b": (33,)}
    sim = grace_dl.LocalSimulator(grace_dl.powersgd(rank=2), size)
    total_grad = {k: 0.0 for k in shapes}
    total_out = {k: 0.0 for k in shapes}
    for t in range(10):
        grads = worker_grads(size, t, shapes)
        out = sim.step(grads)
        for k in shapes:
            total_grad[k] = total_grad[k] + sum(g[k].astype(np.float64) for g in grads)
            total_out[k] = total_out[k] + out[0][k].astype(np.float64) * size
    for k in ("w", "conv"):
        errors = sum(w.memory.state[k]["error"].astype(np.float64) for w in sim.workers).reshape(shapes[k])
        np.testing.assert_allclose(total_out[k] + errors, total_grad[k], atol=1e-4)
        assert np.abs(errors).max() > 0.1, "nothing was held back: the test would prove nothing"
    assert "b" not in sim.workers[0].memory.state  # 1-D: dense, nothing lost, no state
    np.testing.assert_allclose(total_out["b"], total_grad["b"], atol=1e-4)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_warm_start_q_is_identical_on_all_workers_and_moves(size):
    sim = grace_dl.LocalSimulator(grace_dl.powersgd(rank=3), size)
    previous = None
    for t in range(4):
        sim.step(worker_grads(size, t, {"w": (16, 33)}))
        qs = [w.memory.state["w"]["q"] for w in sim.workers]
        assert qs[0].shape == (3 * 33,)
        assert all(q.tobytes() == qs[0].tobytes() for q in qs)
        assert previous is None or not np.array_equal(previous, qs[0])
        previous = qs[0]


@pytest.mark.parametrize("communicator", ["allreduce", "allgather", "broadcast"])
def test_other_communicators_give_the_same_aggregate_and_warm_start(communicator):
    size = 3
    ref = grace_dl.LocalSimulator(grace_dl.powersgd(rank=2), size)
    other = grace_dl.LocalSimulator(grace_dl.powersgd(rank=2, communicator=communicator), size)
    for t in range(4):
        grads = worker_grads(size, t, {"w": (16, 33), "b": (5,)})
        a, b = ref.step(grads), other.step(grads)
        for r in range(size):
            np.testing.assert_allclose(b[r]["w"], a[r]["w"], atol=2e-5)
            assert np.array_equal(b[r]["w"], b[0]["w"])
        qa = ref.workers[0].memory.state["w"]["q"]
        assert all(np.array_equal(w.memory.state["w"]["q"], other.workers[0].memory.state["w"]["q"])
                   for w in other.workers)
        np.testing.assert_allclose(other.workers[0].memory.state["w"]["q"], qa, atol=2e-4)


def test_state_dict_resume_is_bit_identical_with_four_workers():
    size, shapes, k = 4, {"w": (16, 33), "conv": (6, 2, 5), "b": (7,)}, 3
    make = lambda: grace_dl.LocalSimulator(grace_dl.powersgd(rank=2, start_iter=1), size)  # noqa: E731
    straight = make()
    expected = [straight.step(worker_grads(size, t, shapes)) for t in range(2 * k)]
    first = make()
    for t in range(k):
        first.step(worker_grads(size, t, shapes))
    saved = [w.state_dict() for w in first.workers]
    assert set(saved[0]["memory"]["w"]) == {"error", "q"}
    resumed = make()
    for w, state in zip(resumed.workers, saved):
        w.load_state_dict(state)
    for t in range(k, 2 * k):
        got = resumed.step(worker_grads(size, t, shapes))
        for r in range(size):
            for name in shapes:
                assert got[r][name].tobytes() == expected[t][r][name].tobytes(), (t, r, name)


# -- dense paths ----------------------------------------------------------------------------------
def exact_mean(grads, name):
    return sum(g[name] for g in grads) * np.float32(1 / len(grads))


def test_start_iter_exchanges_dense_before_it():
    size = 3
    sim = grace_dl.LocalSimulator(grace_dl.powersgd(rank=1, start_iter=2), size)
    for t in range(3):
        grads = worker_grads(size, t, {"w": (16, 33)})
        out = sim.step(grads)
        if t < 2:
            assert np.array_equal(out[0]["w"], exact_mean(grads, "w"))
            assert "w" not in sim.workers[0].memory.state
        else:
            assert np.linalg.matrix_rank(out[0]["w"]) == 1
            assert set(sim.workers[0].memory.state["w"]) == {"error", "q"}
    per_step = sim.workers[0].stats.per_step
    assert [per_step[t]["payload"] for t in range(3)] == [16 * 33 * 4, 16 * 33 * 4, (16 + 33) * 4]


def test_min_compression_rate_and_1d_tensors_go_dense():
    size = 2
    sim = grace_dl.LocalSimulator(grace_dl.powersgd(rank=1), size)
    shapes = {"small": (4, 4), "bias": (33,), "one": (1,), "row": (1, 50)}
    for t in range(2):
        grads = worker_grads(size, t, shapes)
        out = sim.step(grads)
        for name in shapes:
            assert np.array_equal(out[1][name], exact_mean(grads, name)), name
    assert sim.workers[0].memory.state == {}
    assert sim.workers[0].stats.payload == 2 * sum(int(np.prod(s)) for s in shapes.values()) * 4
    forced = grace_dl.LocalSimulator(grace_dl.powersgd(rank=1, min_compression_rate=1.0), size)
    out = forced.step(worker_grads(size, 0, {"small": (4, 4)}))
    assert np.linalg.matrix_rank(out[0]["small"]) == 1


# -- wire bytes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("size", [1, 2, 5])
def test_wire_bytes_are_exact(dtype, size):
    shapes = {"w": (16, 33), "conv": (8, 3, 3, 3), "b": (33,)}
    rank = 3
    sim = grace_dl.LocalSimulator(grace_dl.powersgd(rank=rank), size)
    sim.step(worker_grads(size, 0, shapes, dtype=np.dtype(dtype)))
    item = 8 if dtype == "float64" else 4  # float16 is compressed in float32
    comp = sim.workers[0].compressor
    for w in sim.workers:
        t = w.stats.per_tensor
        for name, (n, m) in (("w", (16, 33)), ("conv", (8, 27))):
            compute = "float64" if dtype == "float64" else "float32"
            assert t[name]["payload"] == (n + m) * rank * item == comp.payload_nbytes_for_shape(shapes[name], compute)
            sent = allreduce_traffic(n * rank * item, size)[0] + allreduce_traffic(m * rank * item, size)[0]
            assert t[name]["sent"] == t[name]["received"] == sent
        assert t["b"]["payload"] == 33 * item == comp.payload_nbytes(33, compute)
        assert comp.payload_nbytes_for_shape((33,), compute) == 33 * item
        assert t["b"]["sent"] == allreduce_traffic(33 * item, size)[0]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 40), rank=st.integers(1, 5),
       dtype=st.sampled_from(["float32", "float64"]))
def test_payload_is_the_q_factor_and_bytes_follow_the_formula(n, m, rank, dtype):
    comp = PowerSGD(rank=rank)
    x = np.random.default_rng(n * m).standard_normal(n * m).astype(dtype)
    ctx = ctx_for((n, m), dtype=dtype)
    payload = comp.compress(ops, x, ctx)
    plan = comp.plan((n, m))
    item = np.dtype(dtype).itemsize
    if plan is None:
        assert payload.nbytes == n * m * item == comp.payload_nbytes_for_shape((n, m), dtype)
        assert np.array_equal(comp.decompress(ops, payload.buffer, ctx), x)
    else:  # the P round is counted by the pipeline; the payload is Q
        r = min(rank, n, m)
        assert payload.nbytes == payload.buffer.nbytes == m * r * item
        assert comp.payload_nbytes_for_shape((n, m), dtype) == (n + m) * r * item < n * m * item / 2
        assert comp.decompress(ops, payload.buffer, ctx).shape == (n * m,)


# -- edge cases ----------------------------------------------------------------------------------
def test_zero_gradient_gives_zero_and_does_not_kill_the_warm_start():
    size = 2
    sim = grace_dl.LocalSimulator(grace_dl.powersgd(rank=2, error_feedback=False), size)
    zero = [{"w": np.zeros((16, 33), np.float32)} for _ in range(size)]
    out = sim.step(zero)
    assert not out[0]["w"].any()
    q = sim.workers[0].memory.state["w"]["q"]
    assert np.count_nonzero(q) == q.size, "a zero Q would stay zero: P = M 0"
    x, s = decaying(16, 33, dtype=np.float32)
    for _ in range(5):  # a zero Q would give zero forever: an error of |x|
        out = sim.step([{"w": x} for _ in range(size)])
    assert np.linalg.norm(out[0]["w"] - x) < 1.5 * best_error(s, 2) < 0.4 * np.linalg.norm(x)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_reaches_the_aggregate_but_never_the_state(bad):
    size = 3
    sim = grace_dl.LocalSimulator(grace_dl.powersgd(rank=2), size)
    sim.step(worker_grads(size, 0, {"w": (16, 33)}))
    before = [{k: v.copy() for k, v in w.memory.state["w"].items()} for w in sim.workers]
    grads = worker_grads(size, 1, {"w": (16, 33)})
    grads[1]["w"][3, 4] = bad
    out = sim.step(grads)
    assert all(not np.isfinite(o["w"]).all() for o in out), "a loss scaler must see the bad step"
    for w, old in zip(sim.workers, before):
        for k in ("error", "q"):
            assert w.memory.state["w"][k].tobytes() == old[k].tobytes()
    out = sim.step(worker_grads(size, 2, {"w": (16, 33)}))
    assert all(np.isfinite(o["w"]).all() for o in out)


def test_parts_refuse_other_methods_and_decompress_needs_the_step_p():
    with pytest.raises(TypeError, match="powersgd communicator serves the powersgd compressor"):
        grace_dl.LocalSimulator(grace_dl.make("randomk", communicator="powersgd"), 2).step(
            [{"w": np.ones(10, np.float32)}] * 2)
    with pytest.raises(TypeError, match="memory 'powersgd' serves the powersgd compressor"):
        grace_dl.LocalSimulator(grace_dl.make("topk", memory="powersgd"), 1).step([{"w": np.ones(10, np.float32)}])
    comp = PowerSGD()
    with pytest.raises(RuntimeError, match="was not compressed with this context"):
        comp.decompress(ops, np.zeros(33, np.float32), ctx_for((16, 33)))
    g = grace_dl.Grace(comp, PowerSGDMemory()).bind(LocalWorld(1).transports[0])
    g.load_state_dict({"memory": {"w": {"q": np.ones(5, np.float32)}}})
    with pytest.raises(ValueError, match="rank changed, or two tensors share one name"):
        g.step(np.ones((16, 33), np.float32), "w")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rank,length", [(1, 7), (2, 100), (4, 33)])
def test_numpy_orthonormalize_rows_takes_the_protocol_steps(dtype, rank, length):
    from grace_dl.ops.base import Ops

    ops = NumpyOps()
    rng = np.random.default_rng(rank * length)
    for case in range(6):
        rows = rng.standard_normal((rank, length)).astype(dtype)
        if case == 1:
            rows[0] = 0.0  # a zero row stays zero
        if case == 2 and rank > 1:
            rows[1] = rows[0] * 3  # a dependent row
        if case == 3:
            rows[-1, 0] = np.nan
        if case == 4:
            rows *= 1e-30
        with np.errstate(all="ignore"):
            got = ops.orthonormalize_rows(rows, 1e-8)
            want = Ops.orthonormalize_rows(ops, rows, 1e-8)
        assert got.dtype == rows.dtype and got.shape == rows.shape
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan) and got[~nan].tobytes() == want[~nan].tobytes()
    if rank > 1:  # and the rows come out orthonormal
        q = ops.orthonormalize_rows(rng.standard_normal((rank, length)).astype(dtype), 1e-8)
        np.testing.assert_allclose(q @ q.T, np.eye(rank), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tf_orthonormalize_rows_takes_the_protocol_steps(dtype):
    """TFOps' Gram-Schmidt (fewer graph ops) gives the protocol's bits, eagerly and
    traced, a zero row, a dependent row and a NaN first row included."""
    tf = pytest.importorskip("tensorflow")
    from grace_dl.ops.base import Ops
    from grace_dl.tensorflow import TFOps

    ops = TFOps()
    traced = tf.function(lambda rows: ops.orthonormalize_rows(rows, 1e-8))
    protocol = tf.function(lambda rows: Ops.orthonormalize_rows(ops, rows, 1e-8))
    rng = np.random.default_rng(11)
    for rank, length in ((1, 7), (3, 33)):
        for case in range(4):
            rows = rng.standard_normal((rank, length)).astype(dtype)
            if case == 1:
                rows[0] = 0.0
            if case == 2:
                rows[-1] = rows[0] * 3
            if case == 3:
                rows[0, 1] = np.nan  # every row after it turns NaN either way
            x = tf.constant(rows)
            want = Ops.orthonormalize_rows(ops, x, 1e-8).numpy()
            for got in (ops.orthonormalize_rows(x, 1e-8).numpy(), traced(x).numpy(), protocol(x).numpy()):
                assert got.tobytes() == want.tobytes(), (rank, case)
