"""Byte counts (``method.stats``) on the Horovod TF graph path against the eager pipeline:
totals, per tensor and per step, across a resume and a rewind to an earlier checkpoint
(grace_dl/tensorflow/graph.py keeps a ring of per-step rows per tensor)."""

from __future__ import annotations

import textwrap

import pytest
from helpers import run_horovod_tf_script

pytest.importorskip("tensorflow")


_STATS_SCRIPT = textwrap.dedent("""
    import warnings

    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd
    import grace_dl
    import grace_dl.tensorflow as grace
    import grace_dl.tensorflow.graph as graph
    from grace_dl.tensorflow.fusion import fused_graph_step

    hvd.init()  # one rank: Horovod's collectives are graph ops all the same

    def per_step(stats):
        return {int(k): dict(v) for k, v in stats.per_step.items()}

    rng = np.random.default_rng(1)
    shapes = {"w": (24, 30), "b": (30,)}
    grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()} for _ in range(7)]
    # data-dependent sizes (threshold's allgather of a varying count), schedules traced
    # step by step before their horizon (DGC's warm-up, PowerSGD's start_iter), a fixed
    # size method, and the warm-up policy's dense steps
    configs = [("topk", {"ratio": 0.1}), ("dgc", {"ratio": 0.05, "warmup_steps": 3}),
               ("powersgd", {"rank": 2, "start_iter": 2}), ("qsgd", {}), ("threshold", {"threshold": 1.0}),
               ("topk", {"ratio": 0.1, "policies": {"warmup_steps": 2}})]
    for factory, kwargs in configs:
        traced = getattr(grace, factory)(**kwargs).bind(grace.HorovodTFTransport())
        eager = getattr(grace, factory)(**kwargs).bind(grace.HorovodTFTransport())
        assert traced.graph_path, factory
        step = tf.function(lambda g: {n: traced.graph_step(t, n) for n, t in g.items()})
        saved = None
        # steps 0, 1; resume at 2 from the eager state; read the stats midway; save after
        # step 3; run 4, 5; rewind to the checkpoint after step 3 and run its steps 4, 5
        # again (each step number then counts two exchanges per tensor, as eagerly)
        plan = [0, 1, 2, 3, 4, 5, "rewind", 4, 5]
        for i in plan:
            if i == "rewind":
                traced.load_state_dict(saved)
                eager.load_state_dict(saved)
                continue
            if i == 2:
                traced.load_state_dict(eager.state_dict())
            g = grads[i]
            got = step({n: tf.constant(t) for n, t in g.items()})
            for n, t in g.items():
                mine, want = got[n].numpy(), eager.step(tf.constant(t), n).numpy()
                assert mine.tobytes() == want.tobytes(), (factory, n, i)
            if i == 1:
                assert per_step(traced.stats) == per_step(eager.stats), (factory, "midway")
            if i == 3:
                saved = eager.state_dict()
        mine, theirs = traced.stats, eager.stats
        assert mine.as_dict() == theirs.as_dict(), (factory, mine, theirs)
        assert mine.per_tensor == theirs.per_tensor, (factory, mine.per_tensor, theirs.per_tensor)
        assert per_step(mine) == per_step(theirs), (factory, mine.per_step, theirs.per_step)
        assert sorted(per_step(mine)) == [0, 1, 2, 3, 4, 5], (factory, sorted(mine.per_step))
        assert mine.per_step[4]["count"] == 4, (factory, mine.per_step[4])  # two tensors, twice
        # reading twice adds nothing
        assert per_step(traced.stats) == per_step(theirs), factory
        print("STATS-SAME", factory, flush=True)

    # fusion: per-step counts of the buckets equal the fused simulator's
    policies = {"fusion_bytes": 1 << 20}
    sim = grace_dl.LocalSimulator(grace_dl.make("topk", ratio=0.1, policies=policies), 1)
    fused = grace.topk(ratio=0.1, policies=policies).bind(grace.HorovodTFTransport())
    step = tf.function(lambda g: fused_graph_step(fused, g))
    for i, g in enumerate(grads[:4]):
        if i == 2:
            fused.load_state_dict(sim.workers[0].state_dict())
        sim.step([{n: tf.constant(t) for n, t in g.items()}])
        step({n: tf.constant(t) for n, t in g.items()})
    assert per_step(fused.stats) == per_step(sim.workers[0].stats), (fused.stats.per_step,
                                                                     sim.workers[0].stats.per_step)
    assert fused.stats.per_tensor == sim.workers[0].stats.per_tensor
    print("STATS-SAME fused", flush=True)

    # a ring shorter than the steps between two reads: the overwritten steps are left
    # out of per_step, with a warning; the totals still count them
    graph.STEP_HISTORY = 2
    short = grace.topk(ratio=0.1).bind(grace.HorovodTFTransport())
    eager = grace.topk(ratio=0.1).bind(grace.HorovodTFTransport())
    step = tf.function(lambda g: {n: short.graph_step(t, n) for n, t in g.items()})
    for g in grads[:5]:
        step({n: tf.constant(t) for n, t in g.items()})
        for n, t in g.items():
            eager.step(tf.constant(t), n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = short.stats
    assert any("overwritten" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert sorted(stats.per_step) == [3, 4], sorted(stats.per_step)
    assert all(stats.per_step[s] == eager.stats.per_step[s] for s in (3, 4))
    assert stats.as_dict() == eager.stats.as_dict()
    print("STATS-RING", flush=True)
""")


def test_graph_path_stats_per_step_match_the_eager_pipeline():
    """On the graph path, ``method.stats`` gives the eager pipeline's byte counts: totals,
    per tensor and per step, for fixed-size, data-dependent-size and scheduled methods,
    across a resume, a midway read and a rewind to an earlier checkpoint (whose steps
    then count twice, as eagerly); with fusion, the fused simulator's per-bucket and
    per-step counts; with a ring shorter than the steps between reads, the overwritten
    steps are left out of per_step with a warning while the totals keep them."""
    out = run_horovod_tf_script(_STATS_SCRIPT)
    lines = [line for line in out.splitlines() if line.startswith("STATS-")]
    assert len(lines) == 8, out
