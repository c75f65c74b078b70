"""The N-worker pipeline in the in-process simulator."""

from __future__ import annotations

import numpy as np
import pytest

import grace_dl
from grace_dl.transport.base import SIZE_HEADER_BYTES

from helpers import normal

SIZES = [1, 2, 3, 8]


def grads_for(size, n=257, step=0, names=("a", "b")):
    return [{name: normal(n + i, seed=1000 * step + 10 * r + i) for i, name in enumerate(names)}
            for r in range(size)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("communicator", ["allreduce", "allgather", "broadcast"])
def test_none_gives_the_exact_mean_on_every_worker(size, communicator):
    sim = grace_dl.LocalSimulator(grace_dl.none(communicator=communicator), size)
    grads = grads_for(size)
    out = sim.step(grads)
    for name in ("a", "b"):
        exact = sum(g[name].astype(np.float64) for g in grads) / size
        for r in range(size):
            assert np.array_equal(out[r][name], sum(g[name] for g in grads) * np.float32(1 / size))
            np.testing.assert_allclose(out[r][name], exact, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", ["topk", "randomk"])
def test_error_feedback_loses_no_mass(size, method):
    """sum over steps of what all workers transmitted + their final residuals == the sum
    of all their gradients."""
    sim = grace_dl.LocalSimulator(grace_dl.make(method, ratio=0.05, communicator="allgather"), size)
    steps = 12
    total_grad = {"a": 0.0, "b": 0.0}
    total_out = {"a": 0.0, "b": 0.0}
    for t in range(steps):
        grads = grads_for(size, step=t)
        out = sim.step(grads)
        for name in total_grad:
            total_grad[name] = total_grad[name] + sum(g[name].astype(np.float64) for g in grads)
            total_out[name] = total_out[name] + out[0][name].astype(np.float64) * size
    for name in total_grad:
        residuals = sum(w.memory.state[name]["residual"].astype(np.float64) for w in sim.workers)
        np.testing.assert_allclose(total_out[name] + residuals, total_grad[name], atol=1e-4)
        assert np.abs(residuals).max() > 0, "nothing was held back: the test would prove nothing"


@pytest.mark.parametrize("size", SIZES)
def test_randomk_picks_the_same_indices_on_every_worker(size):
    sim = grace_dl.LocalSimulator(grace_dl.randomk(ratio=0.1), size)
    for t in range(3):
        out = sim.step(grads_for(size, step=t))
        kept = [np.flatnonzero(w.memory.state["a"]["residual"] == 0) for w in sim.workers]
        assert all(np.array_equal(kept[0], k) for k in kept)
        assert len(kept[0]) == 25
        assert np.array_equal(np.flatnonzero(out[0]["a"]), kept[0])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", grace_dl.list_methods())
def test_every_worker_gets_the_same_aggregate(size, method):
    sim = grace_dl.LocalSimulator(grace_dl.make(method), size)
    for t in range(2):
        out = sim.step(grads_for(size, step=t))
        for r in range(1, size):
            for name in out[0]:
                assert np.array_equal(out[0][name], out[r][name])


@pytest.mark.parametrize("size", [1, 3])
def test_byte_accounting_follows_the_traffic_model(size):
    n = 1000
    topk = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.01), size)
    topk.step(grads_for(size, n=n, names=("a",)))
    stats = topk.workers[0].stats
    payload = 10 * (4 + 4)
    assert (stats.dense, stats.payload) == (4 * n, payload)
    assert stats.sent == stats.received == (size - 1) * payload  # fixed size: no size exchange

    fp16 = grace_dl.LocalSimulator(grace_dl.fp16(), size)
    fp16.step(grads_for(size, n=n, names=("a",)))
    stats = fp16.workers[0].stats
    assert stats.payload == 2 * n
    assert stats.sent == stats.received == 2 * (size - 1) * 2 * n // size  # ring allreduce
    assert stats.compression_ratio == 2.0


def test_bytes_are_broken_down_per_tensor_and_per_step():
    sim = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.1), 2)
    for t in range(3):
        sim.step(grads_for(2, n=100, step=t))  # tensors "a" (100) and "b" (101 elements)
    stats = sim.workers[0].stats
    assert stats.per_tensor["a"] == {"dense": 1200, "payload": 3 * 80, "sent": 3 * 80, "received": 3 * 80, "count": 3}
    assert stats.per_tensor["b"]["payload"] == 3 * 80
    assert sorted(stats.per_step) == [0, 1, 2]
    assert stats.per_step[1] == {"dense": 804, "payload": 160, "sent": 160, "received": 160, "count": 2}
    assert sum(s["sent"] for s in stats.per_step.values()) == stats.sent


def test_variable_size_allgather_counts_the_size_exchange():
    from grace_dl.core import traffic_for

    sent, received = traffic_for("allgather", 40, [40, 24, 8], rank=0, size=3, equal_sizes=False)
    assert sent == 2 * 40 + 2 * SIZE_HEADER_BYTES
    assert received == 24 + 8 + 2 * SIZE_HEADER_BYTES


def test_start_all_then_finish_overlaps_tensors_and_missing_workers_raise():
    world = grace_dl.LocalWorld(2)
    g0 = grace_dl.topk(ratio=0.5).bind(world.transports[0])
    g1 = grace_dl.topk(ratio=0.5).bind(world.transports[1])
    p0 = g0.start(normal(10), "w")
    with pytest.raises(RuntimeError, match="only workers \\[0\\] of 2"):
        g0.finish(p0)
    p1 = g1.start(normal(10, seed=1), "w")
    # the first use of a name is two rounds (the configuration handshake, then the data):
    # both workers take the first before either finishes
    assert not g0.advance(p0) and not g1.advance(p1)
    assert np.array_equal(g0.finish(p0), g1.finish(p1))


def test_shapes_and_dtypes_are_restored():
    sim = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.3), 2)
    grads = [{"w": normal(24, seed=r).reshape(2, 3, 4).astype(np.float16)} for r in range(2)]
    out = sim.step(grads)
    assert out[0]["w"].shape == (2, 3, 4) and out[0]["w"].dtype == np.float16


def test_non_finite_gradient_reaches_the_output_but_not_the_residual():
    sim = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.2), 2)
    sim.step(grads_for(2, n=50, names=("a",)))
    before = [w.memory.state["a"]["residual"].copy() for w in sim.workers]
    bad = grads_for(2, n=50, step=1, names=("a",))
    bad[0]["a"][3] = np.nan
    bad[1]["a"][4] = np.inf
    out = sim.step(bad)
    assert not np.all(np.isfinite(out[0]["a"]))
    for w, old in zip(sim.workers, before):
        assert np.array_equal(w.memory.state["a"]["residual"], old)
    out = sim.step(grads_for(2, n=50, step=2, names=("a",)))
    assert np.all(np.isfinite(out[0]["a"]))


def test_state_dict_resume_is_bit_identical():
    def run(steps, resume_at=None):
        sim = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.05), 2)
        outs = []
        for t in range(steps):
            if t == resume_at:
                saved = [w.state_dict() for w in sim.workers]
                sim = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.05), 2)
                for w, s in zip(sim.workers, saved):
                    w.load_state_dict(s)
            outs.append(sim.step(grads_for(2, step=t))[0]["a"])
        return outs

    for a, b in zip(run(6), run(6, resume_at=3)):
        assert np.array_equal(a, b)


def test_allreduce_needs_a_summable_compressor():
    with pytest.raises(grace_dl.ConfigError, match="cannot be summed"):
        grace_dl.topk(communicator="allreduce")


def test_simulator_checks_its_input():
    sim = grace_dl.LocalSimulator(grace_dl.none(), 2)
    with pytest.raises(ValueError, match="expected gradients of 2 workers"):
        sim.step([{"a": normal(3)}])
    with pytest.raises(ValueError, match="worker 1 has tensors"):
        sim.step([{"a": normal(3)}, {"b": normal(3)}])
    with pytest.raises(TypeError, match="dtype int64"):
        sim.step([{"a": np.arange(3)}, {"a": np.arange(3)}])


class _RecordingCompressor(grace_dl.core.Compressor):
    """No compression; keeps every context it was given."""

    def __init__(self):
        self.contexts = []

    def compress(self, ops, x, ctx):
        assert "mine" not in ctx.scratch  # scratch never carries over from a previous step
        ctx.scratch["mine"] = True
        self.contexts.append(ctx)
        return grace_dl.payload.Payload.of(ops, x)

    def decompress(self, ops, buffer, ctx):
        return buffer

    def payload_nbytes(self, numel, dtype="float32", in_dtype=None):
        return numel * 4


def test_context_of_a_name_follows_its_shape_dtype_seed_and_transport():
    """Grace keeps each name's context pieces between steps; a tensor that comes back
    under the same name with another shape or dtype, or a changed seed or transport,
    gets a context of its own."""
    recorder = _RecordingCompressor()
    g = grace_dl.Grace(recorder).bind(grace_dl.LocalWorld(1).transports[0])
    out = g.step(np.ones((2, 5), np.float32), "w")
    assert out.shape == (2, 5)
    assert g.step(np.ones(10, np.float32), "w").shape == (10,)  # same name, new shape: its own
    assert g.step(np.ones(3, np.float64), "w").dtype == np.float64
    g.seed = 7
    g.step(np.ones(3, np.float64), "w")
    g.bind(grace_dl.LocalWorld(2).transports[1])  # rank 1 of 2; only this worker posts: expect the hang error
    with pytest.raises(RuntimeError, match="only workers"):
        g.step(np.ones(3, np.float64), "w")
    c = recorder.contexts
    assert [x.step for x in c] == [0, 1, 2, 3, 4]
    assert [x.shape for x in c] == [(2, 5), (10,), (3,), (3,), (3,)]
    assert [x.numel for x in c] == [10, 10, 3, 3, 3]
    assert [x.dtype for x in c] == ["float32", "float32", "float64", "float64", "float64"]
    assert c[0].shared_key == c[2].shared_key == grace_dl.core.derive_key(0, "w")
    assert c[3].shared_key == grace_dl.core.derive_key(7, "w") != c[2].shared_key
    assert (c[4].rank, c[4].world_size, c[4].worker_key) == (1, 2, grace_dl.core.derive_key(7, "w", 1))
    assert (c[3].rank, c[3].world_size) == (0, 1)
    assert len({id(x.scratch) for x in c}) == len(c)
    # the contexts are ordinary frozen TensorContexts
    assert c[1] == grace_dl.core.TensorContext(name="w", shape=(10,), numel=10, dtype="float32", in_dtype="float32",
                                               step=1, shared_key=c[0].shared_key, worker_key=c[0].worker_key,
                                               rank=0, world_size=1)
    with pytest.raises(Exception):
        c[1].step = 9


def test_a_name_reused_with_another_size_is_an_error_for_residual_memory():
    g = grace_dl.make("topk", ratio=0.5).bind(grace_dl.LocalWorld(1).transports[0])
    g.step(np.arange(8, dtype=np.float32), "w")
    g.step(np.arange(8, dtype=np.float32).reshape(2, 4), "w")  # same size, new shape: fine
    with pytest.raises(ValueError, match="two tensors share one name"):
        g.step(np.arange(6, dtype=np.float32), "w")


@pytest.mark.parametrize("communicator", ["allgather", "broadcast"])
@pytest.mark.parametrize("method", ["efsignsgd", "onebit"])
def test_own_payload_is_decompressed_once_with_the_same_result(monkeypatch, communicator, method):
    """The residual memory's local decompression stands in for this worker's own part of
    the exchange: each worker decompresses world_size payloads per step (not one more),
    and every result and residual is what decompressing every gathered buffer gives."""
    from grace_dl import core

    size, steps = 3, 3
    fast = grace_dl.LocalSimulator(grace_dl.make(method, communicator=communicator), size)
    calls = []
    compressor_cls = type(fast.workers[0].compressor)
    decompress = compressor_cls.decompress
    monkeypatch.setattr(compressor_cls, "decompress", lambda self, *a: calls.append(1) or decompress(self, *a))
    outs_fast = [fast.step(grads_for(size, step=s)) for s in range(steps)]
    assert len(calls) == steps * 2 * size * size  # two tensors, each worker decompresses each worker's payload once
    # the same run with the reuse switched off: every gathered buffer decompressed
    monkeypatch.setattr(core, "_OWN_DECOMPRESSION", "switched off")
    monkeypatch.setattr(core, "decompress_own", lambda c, ops, p, ctx: c.decompress(ops, p.buffer, ctx))
    slow = grace_dl.LocalSimulator(grace_dl.make(method, communicator=communicator), size)
    calls.clear()
    outs_slow = [slow.step(grads_for(size, step=s)) for s in range(steps)]
    assert len(calls) == steps * 2 * size * (size + 1)
    for a, b in zip(outs_fast, outs_slow):
        for r in range(size):
            for name in ("a", "b"):
                assert a[r][name].tobytes() == b[r][name].tobytes()
    for wf, ws in zip(fast.workers, slow.workers):
        for name, fields in ws.memory.state_dict().items():
            assert wf.memory.state_dict()[name]["residual"].tobytes() == fields["residual"].tobytes()
