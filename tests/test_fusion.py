"""Tensor fusion (grace_dl/fusion.py): the bucket plan, fused pipelines in the simulator
(equal to exchanging the concatenated buckets by hand, bit for bit and byte for byte),
fusion_bytes=0 equal to the per-tensor pipeline, state that resumes bit-identically and
refuses other buckets, and the handshake over the buckets."""

from __future__ import annotations

import re

import numpy as np
import pytest

import grace_dl
from grace_dl.fusion import Fuser, bucket_name, plan_buckets
from grace_dl.handshake import HandshakeError

# many small tensors (norm scales and shifts, biases) around a few matrices, in ready order
SHAPES = {"fc.weight": (10, 64), "fc.bias": (10,), "bn2.weight": (64,), "bn2.bias": (64,),
          "conv2.weight": (64, 16, 3, 3), "bn1.weight": (16,), "bn1.bias": (16,),
          "conv1.weight": (16, 3, 3, 3), "stem.bias": (3,)}


def grads(workers: int, step: int, dtype=np.float32) -> list[dict[str, np.ndarray]]:
    out = []
    for r in range(workers):
        rng = np.random.default_rng(100 * step + r)
        out.append({n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()})
    return out


def method(name: str, fusion_bytes: int, **kwargs) -> grace_dl.Grace:
    return grace_dl.make(name, policies={"fusion_bytes": fusion_bytes}, **kwargs)


def entries(shapes=SHAPES, dtype="float32"):
    return [(n, s, dtype) for n, s in shapes.items()]


# -- the plan --------------------------------------------------------------------------------
def test_plan_packs_consecutive_small_tensors_up_to_the_limit():
    # fc.weight (2560 bytes) and conv2 (36 kB) are >= 2048 bytes: alone, and the small ones
    # around them are merged: 40 + 256 + 256 + 64 + 64 bytes, then conv1.weight (1728) does not fit
    buckets = plan_buckets(entries(), 2048)
    assert [b.members for b in buckets] == [("fc.bias", "bn2.weight", "bn2.bias", "bn1.weight", "bn1.bias"),
                                            ("conv1.weight", "stem.bias")]
    first = buckets[0]
    assert first.offsets == (0, 10, 74, 138, 154) and first.numel == 170 and first.dtype == "float32"
    assert first.name == bucket_name(first.members) and first.name.startswith("fused[fc.bias..bn1.bias;5;")
    # a limit that cuts a run: 40 + 256 fit in 300 bytes, the next 256 does not
    assert [b.members for b in plan_buckets(entries(), 300)][0] == ("fc.bias", "bn2.weight")
    assert plan_buckets(entries(), 0) == []
    # the same list gives the same buckets (every worker plans alone)
    assert plan_buckets(entries(), 2048) == buckets


def test_plan_keeps_dtypes_apart_and_refuses_bad_input():
    mixed = [("a", (4,), "float32"), ("b", (4,), "float64"), ("c", (4,), "float32"), ("d", (4,), "float64")]
    assert [b.members for b in plan_buckets(mixed, 1024)] == [("a", "c"), ("b", "d")]
    with pytest.raises(ValueError, match="fusion_bytes must be an int >= 0"):
        plan_buckets(mixed, -1)
    with pytest.raises(ValueError, match="'a' appears twice"):
        plan_buckets(mixed + [("a", (2,), "float32")], 1024)
    with pytest.raises(ValueError, match="fusion_bytes"):
        grace_dl.make("topk", policies={"fusion_bytes": "1MB"})


def test_powersgd_fuses_only_what_it_sends_dense():
    fuser = Fuser(method("powersgd", 1 << 20, rank=2))
    members = {m for b in fuser.plan(entries()) for m in b.members}
    # conv1.weight (16 x 27) is factored at rank 2 ((16 + 27) * 2 * 2 < 432), so stays a layer
    assert members == {"fc.bias", "bn2.weight", "bn2.bias", "bn1.weight", "bn1.bias", "stem.bias"}
    # policies route some tensors apart: a name override, and min_numel (dense on their own)
    fuser = Fuser(grace_dl.make("topk", ratio=0.5, policies={
        "fusion_bytes": 1 << 20, "min_numel": 12, "overrides": {"bn1.*": {"ratio": 1.0}}}))
    members = {m for b in fuser.plan(entries()) for m in b.members}
    assert "bn1.weight" not in members and "stem.bias" not in members and "fc.bias" not in members
    assert {"bn2.weight", "bn2.bias", "conv1.weight"} <= members


# -- results ---------------------------------------------------------------------------------
CASES = [("topk", {"ratio": 0.1}), ("qsgd", {}), ("efsignsgd", {}), ("randomk", {"ratio": 0.2}),
         ("dgc", {"ratio": 0.1}), ("fp16", {}), ("powersgd", {"rank": 2}), ("terngrad", {})]


@pytest.mark.parametrize("name, kwargs", CASES)
def test_fused_simulator_equals_exchanging_the_buckets_by_hand(name, kwargs):
    """A bucket is exchanged as its members concatenated under the bucket's name: results,
    state and bytes (per bucket, the compressor's formula of the bucket's size) agree."""
    workers = 2
    fused = grace_dl.LocalSimulator(method(name, 4096, **kwargs), workers)
    by_hand = grace_dl.LocalSimulator(method(name, 0, **kwargs), workers)
    buckets = fused.fusers[0].plan(entries())
    assert buckets, "the case must fuse something"
    in_bucket = {m: b for b in buckets for m in b.members}
    for step in range(3):
        g = grads(workers, step)
        out = fused.step(g)
        concatenated = []
        for gr in g:
            mine, done = {}, set()
            for n, t in gr.items():
                b = in_bucket.get(n)
                if b is None:
                    mine[n] = t
                elif b.name not in done:
                    done.add(b.name)
                    mine[b.name] = np.concatenate([gr[m].reshape(-1) for m in b.members])
            concatenated.append(mine)
        want = by_hand.step(concatenated)
        for r in range(workers):
            for n in SHAPES:
                b = in_bucket.get(n)
                expected = want[r][n] if b is None else \
                    want[r][b.name][b.offsets[b.members.index(n)]:][:int(np.prod(SHAPES[n]))].reshape(SHAPES[n])
                assert out[r][n].shape == SHAPES[n] and out[r][n].tobytes() == expected.tobytes(), (n, step)
    for a, b in zip(fused.workers, by_hand.workers):
        assert a.stats.as_dict() == b.stats.as_dict() and a.stats.per_tensor == b.stats.per_tensor
        assert a.steps == b.steps
    per_tensor = fused.workers[0].stats.per_tensor
    compressor = fused.workers[0].compressor
    for b in buckets:
        assert per_tensor[b.name]["dense"] == 3 * b.numel * 4
        formula = compressor.payload_nbytes(b.numel)
        if formula is not None:
            assert per_tensor[b.name]["payload"] == 3 * formula, b.name
        assert not any(m in per_tensor for m in b.members)


@pytest.mark.parametrize("name, kwargs", CASES)
def test_fusion_zero_is_the_per_tensor_pipeline(name, kwargs):
    """fusion_bytes=0 runs each tensor through Grace.start/finish as before, bit for bit."""
    workers = 2
    sim = grace_dl.LocalSimulator(method(name, 0, **kwargs), workers)
    plain = [grace_dl.make(name, **kwargs).bind(t) for t in grace_dl.LocalWorld(workers).transports]
    for step in range(3):
        g = grads(workers, step)
        out = sim.step(g)
        pending = [[(n, w.start(gr[n], n)) for n in SHAPES] for w, gr in zip(plain, g)]
        while not all(p.done for ps in pending for _, p in ps):
            for w, ps in zip(plain, pending):
                for _, p in ps:
                    w.advance(p)
        for r, (w, ps) in enumerate(zip(plain, pending)):
            for n, p in ps:
                assert out[r][n].tobytes() == w.finish(p).tobytes(), (n, step)
    assert sim.workers[0].stats.per_tensor == plain[0].stats.per_tensor


def test_powersgd_fused_equals_per_layer():
    """PowerSGD fuses only dense vectors, whose mean is elementwise: same bits as per layer."""
    fused = grace_dl.LocalSimulator(method("powersgd", 1 << 20, rank=2), 2)
    layered = grace_dl.LocalSimulator(method("powersgd", 0, rank=2), 2)
    for step in range(3):
        g = grads(2, step)
        a, b = fused.step(g), layered.step(g)
        assert all(a[r][n].tobytes() == b[r][n].tobytes() for r in range(2) for n in SHAPES)
    assert fused.workers[0].stats.sent == layered.workers[0].stats.sent
    assert fused.workers[0].stats.tensors < layered.workers[0].stats.tensors


# -- state -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [("topk", {"ratio": 0.1}), ("dgc", {"ratio": 0.1}),
                                          ("efsignsgd", {}), ("powersgd", {"rank": 2})])
def test_fused_state_resumes_bit_identically(name, kwargs):
    workers = 2
    straight = grace_dl.LocalSimulator(method(name, 4096, **kwargs), workers)
    for step in range(2):
        straight.step(grads(workers, step))
    saved = [w.state_dict() for w in straight.workers]
    bucket = straight.fusers[0].buckets[0]
    assert bucket.name in saved[0]["steps"] and not any(m in saved[0]["steps"] for m in bucket.members)
    resumed = grace_dl.LocalSimulator(method(name, 4096, **kwargs), workers)
    for w, s in zip(resumed.workers, saved):
        w.load_state_dict(s)
    for step in range(2, 4):
        g = grads(workers, step)
        a, b = straight.step(g), resumed.step(g)
        assert all(a[r][n].tobytes() == b[r][n].tobytes() for r in range(workers) for n in SHAPES), step


def test_state_of_other_buckets_is_refused_at_first_use():
    sim = grace_dl.LocalSimulator(method("topk", 4096, ratio=0.1), 2)
    sim.step(grads(2, 0))
    other = grace_dl.LocalSimulator(method("topk", 300, ratio=0.1), 2)
    for w, s in zip(other.workers, [w.state_dict() for w in sim.workers]):
        w.load_state_dict(s)
    with pytest.raises(ValueError, match=r"tensor '(fused\[.*|fc.weight)' has no state in the checkpoint"):
        other.step(grads(2, 1))


def test_workers_with_other_buckets_fail_the_handshake():
    sim = grace_dl.LocalSimulator(method("topk", 4096, ratio=0.1), 2)
    sim.workers[1] = method("topk", 300, ratio=0.1).bind(sim.world.transports[1])
    with pytest.raises(HandshakeError, match="differs between rank 0 and rank 1"):
        sim.step(grads(2, 0))


def test_a_missing_member_is_named():
    grace = method("topk", 4096, ratio=0.1).bind(grace_dl.LocalWorld(1).transports[0])
    fuser = Fuser(grace)
    bucket = fuser.plan(entries())[0]
    g = grads(1, 0)[0]
    ticket = fuser.start(g[bucket.members[0]], bucket.members[0])
    assert fuser.open_buckets() == [bucket.name]
    with pytest.raises(RuntimeError, match=re.escape(f"whose members {list(bucket.members[1:])!r} were not handed")):
        fuser.finish(ticket)
    with pytest.raises(ValueError, match="planned for"):
        fuser.start(g[bucket.members[1]][:2], bucket.members[1])
