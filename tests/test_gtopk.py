"""gTop-k (Shi et al. 2019): every worker applies the same k elements, the top-k of the
sum of the local top-k's, and the residual takes back what the global selection dropped."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grace_dl
from grace_dl.compressors.gtopk import GlobalTopK, GlobalTopKCommunicator, GlobalTopKMemory
from grace_dl.registry import ConfigError
from grace_dl.transport.base import allgather_traffic


def local_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Dense top-k by magnitude, ties to the lowest index (stable sort)."""
    idx = np.argsort(-np.abs(x), kind="stable")[:k]
    out = np.zeros_like(x)
    out[idx] = x[idx]
    return out


def reference(xs: list[np.ndarray], k: int) -> np.ndarray:
    """top-k of (sum in rank order of the local top-k's), times 1/N, in the input dtype."""
    total = local_topk(xs[0], k)
    for x in xs[1:]:
        total = total + local_topk(x, k)
    return local_topk(total, k) * total.dtype.type(1 / len(xs))


def grads_for(size, n, step=0, dtype=np.float32):
    return [{"g": np.random.default_rng(1000 * step + r).standard_normal(n).astype(dtype)} for r in range(size)]


def test_factory_defaults():
    g = grace_dl.gtopk()
    assert isinstance(g.compressor, GlobalTopK) and g.compressor.ratio == 0.01
    assert isinstance(g.memory, GlobalTopKMemory) and (g.memory.beta, g.memory.gamma) == (1.0, 1.0)
    assert isinstance(g.communicator, GlobalTopKCommunicator) and g.communicator.aggregate == "mean"
    assert g.compressor.exact_across_backends and g.compressor.deterministic
    with pytest.raises(ConfigError, match=r"ratio must be in \(0, 1\]"):
        grace_dl.gtopk(ratio=0.0)
    with pytest.raises(ConfigError, match="aggregate must be 'mean' or 'sum'"):
        grace_dl.gtopk(aggregate="majority")


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 6), n=st.integers(1, 300), ratio=st.floats(0.005, 1.0),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_every_worker_applies_the_same_k_elements_the_top_k_of_the_summed_local_top_k(size, n, ratio, dtype):
    sim = grace_dl.LocalSimulator(grace_dl.gtopk(ratio=ratio), size)
    grads = grads_for(size, n, dtype=dtype)
    out = sim.step(grads)
    k = max(1, int(ratio * n))
    want = reference([g["g"] for g in grads], k)
    for r in range(size):
        assert np.count_nonzero(out[r]["g"]) == k
        assert out[r]["g"].tobytes() == want.tobytes()


def test_global_selection_is_k_where_plain_topk_applies_the_union():
    size, n, ratio = 4, 1000, 0.02
    grads = grads_for(size, n)
    g = grace_dl.LocalSimulator(grace_dl.gtopk(ratio=ratio), size).step(grads)[0]["g"]
    t = grace_dl.LocalSimulator(grace_dl.topk(ratio=ratio), size).step(grads)[0]["g"]
    assert np.count_nonzero(g) == 20 < np.count_nonzero(t) <= 80
    # what gTop-k applies is the part of top-k's result with the 20 largest magnitudes
    kept = np.flatnonzero(g)
    assert np.array_equal(g[kept], t[kept]) and np.abs(t[np.setdiff1d(np.flatnonzero(t), kept)]).max() \
        <= np.abs(g[kept]).min()


def test_residual_takes_back_local_values_the_global_selection_dropped():
    size, n, ratio = 3, 200, 0.05
    sim = grace_dl.LocalSimulator(grace_dl.gtopk(ratio=ratio), size)
    grads = grads_for(size, n)
    out = sim.step(grads)[0]["g"]
    k = 10
    dropped_somewhere = False
    for w, g in zip(sim.workers, grads):
        local = local_topk(g["g"], k) != 0
        kept = out != 0
        residual = w.memory.state["g"]["residual"]
        # selected locally and globally: sent, nothing left; everything else stays whole
        assert np.all(residual[local & kept] == 0)
        assert np.array_equal(residual[~(local & kept)], g["g"][~(local & kept)])
        dropped_somewhere |= bool(np.any(local & ~kept))
    assert dropped_somewhere, "no local value was dropped globally: the test would prove nothing"


@pytest.mark.parametrize("size", [1, 2, 4, 7])
def test_error_feedback_loses_no_mass(size):
    """sum over steps of N * aggregate + the workers' final residuals == sum of gradients."""
    sim = grace_dl.LocalSimulator(grace_dl.gtopk(ratio=0.03), size)
    total_grad, total_out = 0.0, 0.0
    for t in range(12):
        grads = grads_for(size, 257, step=t)
        out = sim.step(grads)
        total_grad = total_grad + sum(g["g"].astype(np.float64) for g in grads)
        total_out = total_out + out[0]["g"].astype(np.float64) * size
    residuals = sum(w.memory.state["g"]["residual"].astype(np.float64) for w in sim.workers)
    np.testing.assert_allclose(total_out + residuals, total_grad, atol=1e-4)
    assert np.abs(residuals).max() > 0


@pytest.mark.parametrize("dtype,item", [(np.float32, 4), (np.float64, 8), (np.float16, 4)])
@pytest.mark.parametrize("size", [1, 3])
def test_wire_bytes(dtype, item, size):
    n, ratio = 1000, 0.01
    sim = grace_dl.LocalSimulator(grace_dl.gtopk(ratio=ratio), size)
    sim.step(grads_for(size, n, dtype=dtype))
    payload = 10 * (4 + item)
    for r, w in enumerate(sim.workers):
        s = w.stats
        assert s.payload == payload == w.compressor.payload_nbytes(n, "float64" if item == 8 else "float32")
        sent, received = allgather_traffic(payload, [payload] * size, r, equal_sizes=True)
        assert (s.sent, s.received) == (sent, received) == ((size - 1) * payload,) * 2


def test_plain_allgather_behaves_as_topk_with_residual():
    size = 3
    a = grace_dl.LocalSimulator(grace_dl.gtopk(ratio=0.05, communicator="allgather"), size)
    b = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.05), size)
    for t in range(3):
        grads = grads_for(size, 120, step=t)
        assert a.step(grads)[1]["g"].tobytes() == b.step(grads)[1]["g"].tobytes()
        for wa, wb in zip(a.workers, b.workers):
            assert wa.memory.state["g"]["residual"].tobytes() == wb.memory.state["g"]["residual"].tobytes()


def test_zero_tensor_and_one_element():
    size = 3
    sim = grace_dl.LocalSimulator(grace_dl.gtopk(ratio=0.1), size)
    out = sim.step([{"z": np.zeros(50, np.float32), "one": np.array([r + 1.0], np.float32)} for r in range(size)])
    assert not out[0]["z"].any() and not sim.workers[0].memory.state["z"]["residual"].any()
    assert out[0]["one"][0] == np.float32(6.0) * np.float32(1 / 3)


def test_sum_aggregate():
    grads = grads_for(3, 100)
    mean = grace_dl.LocalSimulator(grace_dl.gtopk(ratio=0.1), 3).step(grads)[0]["g"]
    total = grace_dl.LocalSimulator(grace_dl.gtopk(ratio=0.1, aggregate="sum"), 3).step(grads)[0]["g"]
    np.testing.assert_allclose(total * np.float32(1 / 3), mean, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_reaches_the_aggregate_but_never_a_residual(bad):
    size = 3
    sim = grace_dl.LocalSimulator(grace_dl.gtopk(ratio=0.05), size)
    sim.step(grads_for(size, 100))
    before = [w.memory.state["g"]["residual"].copy() for w in sim.workers]
    grads = grads_for(size, 100, step=1)
    grads[1]["g"][7] = bad
    out = sim.step(grads)
    assert all(not np.isfinite(o["g"]).all() for o in out), "a loss scaler must see the bad step"
    assert sim.workers[1].memory.state["g"]["residual"].tobytes() == before[1].tobytes()
    for w in sim.workers:
        assert np.isfinite(w.memory.state["g"]["residual"]).all()
    assert np.count_nonzero(out[0]["g"]) == 5


def test_communicator_refuses_other_compressors():
    with pytest.raises(TypeError, match="gtopk communicator serves the gtopk compressor"):
        grace_dl.LocalSimulator(grace_dl.topk(communicator="gtopk"), 2).step([{"g": np.ones(10, np.float32)}] * 2)
