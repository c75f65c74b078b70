"""Tensor fusion on the Horovod TF graph path (grace_dl/tensorflow/fusion.py) against the
fused simulator: the same buckets, results, state, byte counts and resume, bit for bit.
The two-rank case through hvd.DistributedGradientTape is in tests/multirank/hvd_tf_checks.py."""

from __future__ import annotations

import textwrap

import pytest
from helpers import run_horovod_tf_script

tf = pytest.importorskip("tensorflow")

import grace_dl.tensorflow as grace_tf  # noqa: E402


_FUSED_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd
    import grace_dl
    import grace_dl.tensorflow as grace
    from grace_dl.tensorflow.fusion import fused_graph_step

    hvd.init()  # one rank: Horovod's collectives are graph ops all the same

    # ready order (the variables reversed): vectors and small matrices, one large matrix
    shapes = {"out.b": (10,), "out.w": (32, 10), "h2.b": (32,), "h2.w": (64, 32), "h1.b": (64,), "h1.w": (8, 64)}
    rng = np.random.default_rng(0)
    steps = [{n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()} for _ in range(5)]
    for name, kwargs, fusion in [("topk", {"ratio": 0.1}, 1 << 20), ("topk", {"ratio": 0.1}, 2048),
                                 ("efsignsgd", {}, 4096), ("powersgd", {"rank": 2}, 1 << 20),
                                 ("fp16", {}, 1 << 20)]:
        policies = {"fusion_bytes": fusion}
        sim = grace_dl.LocalSimulator(grace_dl.make(name, policies=policies, **kwargs), 1)
        traced = getattr(grace, name)(policies=policies, **kwargs).bind(grace.HorovodTFTransport())
        step = tf.function(lambda g: fused_graph_step(traced, g))
        for i, g in enumerate(steps):
            if i == 3:  # a resume from the simulator's state: the bucket names and fields must match
                traced.load_state_dict(sim.workers[0].state_dict())
            # the simulator on TF eager tensors: PowerSGD's matmul is TF's on both sides
            want = sim.step([{n: tf.constant(t) for n, t in g.items()}])[0]
            got = step({n: tf.constant(t) for n, t in g.items()})
            assert list(got) == list(g), list(got)
            for n in g:
                mine, ref = got[n].numpy(), want[n].numpy()
                assert mine.shape == ref.shape and mine.tobytes() == ref.tobytes(), (name, fusion, n, i)
        buckets = [b.name for b in sim.fusers[0].buckets]
        assert buckets, (name, fusion)  # something was fused
        mine, theirs = traced.state_dict(), sim.workers[0].state_dict()
        assert mine["steps"] == theirs["steps"], (name, mine["steps"], theirs["steps"])
        assert set(buckets) <= set(mine["steps"]), (buckets, mine["steps"])
        assert mine["memory"].keys() == theirs["memory"].keys(), name
        for key, fields in theirs["memory"].items():
            for field, value in fields.items():
                assert mine["memory"][key][field].tobytes() == np.asarray(value).tobytes(), (name, key, field)
        stats, ref = traced.stats, sim.workers[0].stats
        assert (stats.dense, stats.payload, stats.sent, stats.received, stats.tensors) == \\
            (ref.dense, ref.payload, ref.sent, ref.received, ref.tensors), (name, stats, ref)
        assert set(stats.per_tensor) == set(ref.per_tensor), (name, stats.per_tensor.keys())
        print("FUSED-SAME", name, fusion, len(buckets), "buckets", flush=True)
""")


def test_fused_graph_step_matches_the_fused_simulator():
    """fused_graph_step, the code under Horovod TF's compress with fusion_bytes > 0, traced
    in a tf.function on one rank: results, state (also after a resume from the
    simulator's checkpoint), step counters and byte counts equal the fused simulator's,
    bit for bit, with the simulator's bucket names (PowerSGD keeps its matrices apart)."""
    out = run_horovod_tf_script(_FUSED_SCRIPT)
    assert out.count("FUSED-SAME") == 5, out


def test_fusion_is_refused_where_it_cannot_run():
    """fusion_bytes > 0 runs on the graph path only: an eager compress and a method on the
    py_function path are refused, naming the reason, instead of silently not fusing."""
    pytest.importorskip("horovod.tensorflow")
    method = grace_tf.topk(ratio=0.5, policies={"fusion_bytes": 1 << 20})
    with pytest.raises(ValueError, match="fusion_bytes=1048576.*not in an eager call"):
        method.compress(tf.ones([4]))
    unfused = grace_tf.topk(ratio=0.5, policies={"fusion_bytes": 0})
    with pytest.raises(RuntimeError, match="outside Horovod"):  # it gets past the check
        unfused.compress(tf.ones([4]))

    @tf.function
    def traced(x):
        # 1-bit Adam with beta1 this close to 1 has too many bias corrections to tabulate for
        # the step tensor: off the graph path
        return grace_tf.onebit_adam(beta1=1 - 1e-9, policies={"fusion_bytes": 64}).compress(x)

    with pytest.raises(ValueError, match="fusion_bytes=64.*cannot take.*too many to tabulate"):
        traced(tf.ones([4]))
