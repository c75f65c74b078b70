"""Reliability in the simulator: empty tensors, and the first-use handshake that makes
workers configured differently fail at once, on every worker, naming the tensor and the
field (instead of an index error on one rank, a hang, or silently different replicas)."""

from __future__ import annotations

import numpy as np
import pytest

import grace_dl
from grace_dl.handshake import FIELDS, HandshakeError


# -- empty tensors ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", grace_dl.list_methods())
def test_every_method_passes_empty_tensors_through(name):
    sim = grace_dl.LocalSimulator(grace_dl.make(name), 2)
    shapes = {"a": (0,), "b": (0, 5), "c": (3, 0, 4)}
    rng = np.random.default_rng(0)
    for step in range(3):
        grads = [{**{k: np.zeros(s, np.float32) for k, s in shapes.items()},
                  "w": rng.standard_normal(40).astype(np.float32)} for _ in range(2)]
        out = sim.step(grads)
        for k, s in shapes.items():
            assert out[0][k].shape == s and out[0][k].dtype == np.float32, (k, out[0][k].shape)
        assert np.all(np.isfinite(out[0]["w"]))
    stats = sim.workers[0].stats.per_tensor
    assert all(stats[k]["payload"] == stats[k]["sent"] == 0 for k in shapes), stats
    assert all(k not in sim.workers[0].memory.state for k in shapes)


# -- handshake ---------------------------------------------------------------------------------
def mixed(*methods: grace_dl.Grace) -> grace_dl.LocalSimulator:
    """A simulator whose worker ``r`` runs ``methods[r]``."""
    sim = grace_dl.LocalSimulator(methods[0], len(methods))
    sim.workers = [m.bind(t) for m, t in zip(methods, sim.world.transports)]
    return sim


def grads(names=("layer.weight", "layer.bias"), shapes=((8, 5), (5,)), workers=2, dtype=np.float32):
    rng = np.random.default_rng(1)
    return [{n: rng.standard_normal(s).astype(dtype) for n, s in zip(names, shapes)} for _ in range(workers)]


@pytest.mark.parametrize("a, b, field", [
    (grace_dl.topk(ratio=0.5), grace_dl.qsgd(), "compressor"),
    (grace_dl.topk(ratio=0.5), grace_dl.topk(ratio=0.25), "compressor"),
    (grace_dl.qsgd(levels=4), grace_dl.qsgd(levels=8), "compressor"),
    (grace_dl.powersgd(rank=1), grace_dl.powersgd(rank=2), "compressor"),
    (grace_dl.randomk(ratio=0.5, seed=0), grace_dl.randomk(ratio=0.5, seed=1), "seed"),
    (grace_dl.topk(ratio=0.5), grace_dl.topk(ratio=0.5, memory="none"), "memory"),
    (grace_dl.qsgd(), grace_dl.qsgd(communicator="broadcast"), "communicator"),
    (grace_dl.topk(ratio=0.5), grace_dl.topk(ratio=0.5, policies={"min_numel": 10}), "policies"),
])
def test_workers_configured_differently_fail_on_every_worker(a, b, field):
    sim = mixed(a, b)
    with pytest.raises(HandshakeError) as caught:
        sim.step(grads())
    message = str(caught.value)
    assert f"tensor 'layer.weight' (tensor #0 of this worker): its {field} differs between rank 0 and rank 1" \
        in message, message
    # the other worker fails the same way (its pending handshake has every fingerprint)
    pending = b.start(grads()[1]["layer.bias"], "layer.bias")
    assert pending is not None
    assert not a.stats.tensors and not b.stats.tensors, "nothing was exchanged"


def test_rank_one_raises_too():
    world = grace_dl.LocalWorld(2)
    a = grace_dl.randomk(ratio=0.5, seed=0).bind(world.transports[0])
    b = grace_dl.randomk(ratio=0.5, seed=7).bind(world.transports[1])
    g = grads()
    pa, pb = a.start(g[0]["layer.weight"], "layer.weight"), b.start(g[1]["layer.weight"], "layer.weight")
    for method, pending, rank in ((a, pa, 0), (b, pb, 1)):
        with pytest.raises(HandshakeError, match=f"its seed differs between rank {rank} and rank {1 - rank}; "
                                                 f"rank {rank} has seed = {(0, 7)[rank]}"):
            method.finish(pending)


@pytest.mark.parametrize("other, field", [
    (dict(names=("layer.weight", "other.bias")), "tensor name"),
    (dict(names=("fc.weight", "fc.bias")), "tensor name"),
    (dict(shapes=((5, 8), (5,))), "shape"),
    (dict(shapes=((8, 6), (6,))), "shape"),
    (dict(dtype=np.float64), "dtype"),
])
def test_different_models_fail_naming_the_tensor(other, field):
    world = grace_dl.LocalWorld(2)
    methods = [grace_dl.topk(ratio=0.5).bind(t) for t in world.transports]
    mine, theirs = grads()[0], grads(**other)[1]
    pendings = [[m.start(v, n) for n, v in g.items()] for m, g in zip(methods, (mine, theirs))]
    position = 0 if field != "tensor name" or other["names"][0] != "layer.weight" else 1
    with pytest.raises(HandshakeError, match=f"\\(tensor #{position} of this worker\\): its {field} differs"):
        for m, ps in zip(methods, pendings):
            for p in ps:
                m.advance(p)


def test_resumed_step_counters_must_agree():
    # a worker that resumed from another checkpoint: randomk would draw other indices
    sim = grace_dl.LocalSimulator(grace_dl.randomk(ratio=0.5), 2)
    sim.step(grads())
    saved = sim.workers[0].state_dict()
    resumed = mixed(grace_dl.randomk(ratio=0.5), grace_dl.randomk(ratio=0.5))
    resumed.workers[0].load_state_dict(saved)  # rank 1 starts afresh
    with pytest.raises(HandshakeError, match="its step differs between rank 0 and rank 1; rank 0 has step = 1"):
        resumed.step(grads())
    both = mixed(grace_dl.randomk(ratio=0.5), grace_dl.randomk(ratio=0.5))
    for w in both.workers:
        w.load_state_dict(saved)
    both.step(grads())


def test_handshake_once_per_name_and_not_counted():
    sim = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.5), 2)
    plain = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.5), 2)
    for w in plain.workers:
        w.handshake = False
    for step in range(3):
        g = grads()
        out, want = sim.step(g), plain.step(g)
        assert all(out[r][n].tobytes() == want[r][n].tobytes() for r in range(2) for n in g[0])
    assert sim.workers[0].stats.as_dict() == plain.workers[0].stats.as_dict()
    # the handshake ran once per name: later steps post one collective per tensor
    posted = []
    transport = sim.workers[0].transport
    original = transport.allgather_async
    transport.allgather_async = lambda buf, name, equal_sizes=False: posted.append(name) or original(buf, name,
                                                                                                     equal_sizes)
    sim.step(grads())
    assert posted == ["grace.layer.weight", "grace.layer.bias"]


def test_same_configuration_passes_and_fields_are_listed():
    sim = mixed(grace_dl.randomk(ratio=0.5, seed=3), grace_dl.randomk(ratio=0.5, seed=3))
    sim.step(grads())
    assert FIELDS[0] == "grace-dl version" and "seed" in FIELDS and "step" in FIELDS
    one = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.5), 1)  # one worker: nothing to compare
    one.step(grads(workers=1))


# -- checkpoints that do not fit ------------------------------------------------------------------
def trained(method: grace_dl.Grace, names=("layer.weight", "layer.bias"), shapes=((8, 5), (5,))) -> dict:
    sim = grace_dl.LocalSimulator(method, 2)
    sim.step(grads(names, shapes))
    return sim.workers[0].state_dict()


def test_state_of_another_method_is_refused():
    with pytest.raises(ValueError, match="has a field 'residual', but the dgc_momentum memory keeps momentum, "
                                         "velocity: the state was saved by another method"):
        grace_dl.dgc().load_state_dict(trained(grace_dl.topk(ratio=0.5)))
    with pytest.raises(ValueError, match="the none memory keeps nothing"):
        grace_dl.qsgd().load_state_dict(trained(grace_dl.topk(ratio=0.5)))
    grace_dl.topk(ratio=0.25).load_state_dict(trained(grace_dl.efsignsgd()))  # same memory: fits


def test_non_finite_state_is_refused():
    state = trained(grace_dl.topk(ratio=0.5))
    state["memory"]["layer.bias"]["residual"][2] = np.nan
    with pytest.raises(ValueError, match="tensor 'layer.bias', field 'residual', holds NaN or Inf"):
        grace_dl.topk(ratio=0.5).load_state_dict(state)


def test_state_under_other_names_or_shapes_is_refused_at_first_use():
    state = trained(grace_dl.topk(ratio=0.5))
    for other, error in (({"names": ("fc.weight", "fc.bias")}, "tensor 'fc.weight' has no state in the checkpoint"),
                         ({"shapes": ((8, 6), (5,))}, "tensor 'layer.weight' has 48 elements but its residual in "
                                                      "the loaded checkpoint has 40: the model changed")):
        sim = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.5), 2)
        for w in sim.workers:
            w.load_state_dict(state)
        with pytest.raises(ValueError, match=error):
            sim.step(grads(**other))
    # the same model resumes (and runs the handshake again)
    sim = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.5), 2)
    for w in sim.workers:
        w.load_state_dict(state)
    sim.step(grads())
    assert sim.workers[0].steps == {"layer.weight": 2, "layer.bias": 2}


# -- the TF graph path's gradient check at trace time ------------------------------------------
class _TwoRanks:
    """A transport of rank 1 of 2 whose peer answers a digest allgather with ``peer``'s
    digest, or never (``peer`` None: it runs a step it traced before)."""

    def __init__(self, peer):
        self.rank, self.size, self.peer, self.posted = 1, 2, peer, []

    def allgather_async(self, buf, name, equal_sizes=False):
        self.posted.append(name)
        return np.asarray(buf)

    def wait(self, mine):
        if self.peer is None:
            import threading

            threading.Event().wait()  # like Horovod's TF collectives: no time-out
        return [np.asarray(self.peer), mine]


def test_graph_path_check_names_a_gradient_that_turns_none_when_one_rank_retraces(monkeypatch):
    pytest.importorskip("tensorflow")
    import time

    from grace_dl.tensorflow import checks

    def digest(names):
        return np.array([len(names), checks._name_hash("\n".join(names))], np.int64)

    monkeypatch.setattr(checks, "FIRST_STEP_TIMEOUT_S", 0.3)

    class Method:  # what the check uses of a bound method object
        transport = _TwoRanks(digest(["w", "b"]))

    method = Method()
    checks.check_traced_gradients(method, ["w", "b"], [])  # first trace: every rank agrees
    assert len(method.transport.posted) == 1
    # a retrace with the same gradients (another input shape on this rank only) posts nothing:
    # the other rank runs its old trace and would never answer
    method.transport.peer = None
    checks.check_traced_gradients(method, ["w", "b"], [])
    assert len(method.transport.posted) == 1
    # b's gradient turned None here only: the check waits a bounded time, then names b
    start = time.perf_counter()
    with pytest.raises(checks.GradientMismatchError) as caught:
        checks.check_traced_gradients(method, ["w"], ["b"])
    assert time.perf_counter() - start < 5
    said = str(caught.value)
    assert "rank 1 has no gradient (None) for 'b', which it had when the step was last traced" in said, said
    assert "did not trace the step again" in said and "GRACE_DL_FIRST_STEP_TIMEOUT" in said, said
    # a new gradient set on every rank (all retrace together) is checked and accepted
    method.transport.peer = digest(["w"])
    checks.check_traced_gradients(method, ["w"], ["b"])
    assert len(method.transport.posted) == 3


# -- resuming: another world size, truncated files ------------------------------------------------
def test_resume_with_another_world_size_trains_on():
    # the state holds no world size: each worker's memory is its own error feedback, which
    # stays valid in a job of another size (elastic Horovod resizes jobs the same way);
    # the handshake then checks that every worker resumed at the same step
    four = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.5), 4)
    for _ in range(2):
        four.step(grads(workers=4))
    saved = [w.state_dict() for w in four.workers]
    for size, states in ((2, saved[:2]), (8, [saved[0]] * 8)):  # shrunk, or rank 0's state broadcast
        resumed = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.5), size)
        for w, state in zip(resumed.workers, states):
            w.load_state_dict(state)
        out = resumed.step(grads(workers=size))
        assert all(np.all(np.isfinite(o[n])) for o in out for n in o)
        assert all(w.steps == {"layer.weight": 3, "layer.bias": 3} for w in resumed.workers)


def test_truncated_checkpoint_files_are_refused(tmp_path):
    # a checkpoint cut short (a full disk, a copy killed half-way) must fail to load, not
    # load part of the state: torch's zip reader and TF's checksummed bundle refuse it
    torch = pytest.importorskip("torch")

    sim = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.5), 2)
    sim.step(grads())
    path = tmp_path / "opt.pt"
    torch.save({"grace": {n: {k: torch.from_numpy(v) for k, v in f.items()}
                          for n, f in sim.workers[0].state_dict()["memory"].items()}}, path)
    data = path.read_bytes()
    for cut in (len(data) // 10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(Exception) as caught:
            torch.load(path, weights_only=True)
        assert "zip" in str(caught.value).lower() or isinstance(caught.value, EOFError), caught.value

    tf = pytest.importorskip("tensorflow")
    import grace_dl.tensorflow as gtf

    tf_method = gtf.topk(ratio=0.5)
    tf_sim = gtf.LocalSimulator(tf_method, 2)
    tf_sim.step([{k: tf.constant(v) for k, v in g.items()} for g in grads()])
    prefix = tf.train.Checkpoint(grace=tf_sim.workers[0].checkpointable()).write(str(tmp_path / "ckpt"))
    (data_file,) = tmp_path.glob("ckpt.data-*")
    whole = data_file.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 1):
        data_file.write_bytes(whole[:cut])
        fresh = gtf.topk(ratio=0.5)
        # (TF's reader: IndexError "Read less bytes than requested", or DataLossError on a checksum)
        with pytest.raises((tf.errors.OpError, IndexError)) as caught:
            tf.train.Checkpoint(grace=fresh.checkpointable()).read(prefix)
        assert isinstance(caught.value, tf.errors.OpError) or "Read less bytes" in str(caught.value)
        assert not fresh.steps and not fresh.memory.state, "part of a truncated checkpoint was loaded"
