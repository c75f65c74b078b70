"""The TF graph path traces a memory's step once where its first step is a steady step
from filled fields (residual, Signum's and DGC's momentum, PowerSGD's error and the ``Q``
drawn for that step): no ``tf.cond`` between a first and a steady step in the traced
step, and the results, state and resumes of the eager pipeline bit for bit, with the
cases where a fill could show: gradients with ``-0.0`` elements, a non-finite first step
(whose skipped update keeps ``+0.0`` zeros eagerly) and a checkpoint without the
tensor's state loaded after steps."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd
    import grace_dl.tensorflow as grace
    from grace_dl.tensorflow import graph

    hvd.init()  # one rank: Horovod's collectives are graph ops all the same

    def conditionals(concrete):
        # If/StatelessIf nodes of the traced step, those in nested functions included
        kinds = {"If", "StatelessIf"}
        count = sum(op.type in kinds for op in concrete.graph.get_operations())
        for function in concrete.graph._functions.values():
            count += sum(node.op in kinds for node in function.definition.node_def)
        return count

    rng = np.random.default_rng(3)
    n = 64
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(6)]
    grads[0][::3] = -0.0  # a fill of the wrong sign would show in these
    grads[2][::5] = -0.0
    nan_first = [g.copy() for g in grads]
    nan_first[0][7] = np.nan
    for factory, memory, kwargs in [("topk", "residual", {"ratio": 0.25}),
                                    ("efsignsgd", "residual", {}),
                                    ("signum", "signum_momentum", {}),
                                    ("dgc", "dgc_momentum", {"ratio": 0.25})]:
        probe = getattr(grace, factory)(**kwargs)
        assert probe.memory.registry_name == memory, (factory, probe.memory)
        assert graph.one_trace_fill(probe.memory) is not None, factory
        for label, series in (("finite", grads), ("nan-first", nan_first)):
            traced = getattr(grace, factory)(**kwargs).bind(grace.HorovodTFTransport())
            eager = getattr(grace, factory)(**kwargs).bind(grace.HorovodTFTransport())
            step = tf.function(lambda g: traced.graph_step(g, "w"))
            count = conditionals(step.get_concrete_function(tf.TensorSpec([n], tf.float32)))
            print("CONDS", factory, count, flush=True)
            # before the first step: no state, as eagerly
            assert traced.state_dict()["memory"] == eager.state_dict()["memory"] == {}, factory
            for i, g in enumerate(series):
                if i == 3:  # a checkpoint without this tensor's state: it starts afresh
                    empty = eager.state_dict()
                    empty["memory"] = {}
                    eager.load_state_dict(empty)
                    traced.load_state_dict(empty)
                if i == 5:  # a resume from the eager state
                    traced.load_state_dict(eager.state_dict())
                mine, want = step(tf.constant(g)).numpy(), eager.step(tf.constant(g), "w").numpy()
                # DGC's threshold selection of a gradient with a NaN differs between the
                # traced and the eager kernels (so before this test, and not the memory):
                # its state is compared all the same
                if not (factory == "dgc" and label == "nan-first" and i == 0):
                    assert mine.tobytes() == want.tobytes(), (factory, label, i)
                theirs, ours = eager.state_dict()["memory"], traced.state_dict()["memory"]
                assert ours.keys() == theirs.keys(), (factory, label, i)
                for field, value in theirs["w"].items():
                    assert ours["w"][field].tobytes() == value.tobytes(), (factory, label, i, field)
            assert traced.stats.as_dict() == eager.stats.as_dict(), (factory, label)
            print("SAME", factory, label, flush=True)
""")


def test_memory_step_traced_once_and_bit_identical():
    """topk, efsignsgd (residual), signum and dgc: the traced step of one tensor holds no
    If node (it held one, a first and a steady branch, before), and gives the eager
    pipeline's results, state and byte counts bit for bit."""
    if importlib.util.find_spec("horovod") is None:
        pytest.skip("horovod is not installed (run scripts/setup.sh)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    counts = {line.split()[1]: int(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("CONDS")}
    assert counts == {"topk": 0, "efsignsgd": 0, "signum": 0, "dgc": 0}, counts
    assert proc.stdout.count("SAME") == 8, proc.stdout


_POWERSGD_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd
    import grace_dl.tensorflow as grace

    hvd.init()

    def conditionals(concrete):
        kinds = {"If", "StatelessIf"}
        count = sum(op.type in kinds for op in concrete.graph.get_operations())
        for function in concrete.graph._functions.values():
            count += sum(node.op in kinds for node in function.definition.node_def)
        return count

    rng = np.random.default_rng(5)
    shapes = {"w": (16, 12), "b": (12,)}  # low rank, and a vector always sent dense
    series = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(7)]
    series[0]["w"][::3] = -0.0  # a -0.0 error fill of the wrong sign would show
    nan_first = [dict(g) for g in series]
    nan_first[0]["w"] = nan_first[0]["w"].copy()
    nan_first[0]["w"][2, 7] = np.nan
    cases = [("default", {"rank": 2}, series), ("nan-first", {"rank": 2}, nan_first),
             ("no-error-feedback", {"rank": 1, "error_feedback": False}, series),
             ("no-warm-start", {"rank": 2, "warm_start": False}, series)]
    for label, kwargs, grads in cases:
        traced = grace.powersgd(**kwargs).bind(grace.HorovodTFTransport())
        eager = grace.powersgd(**kwargs).bind(grace.HorovodTFTransport())
        step = tf.function(lambda w, b: [traced.graph_step(w, "w"), traced.graph_step(b, "b")])
        specs = [tf.TensorSpec(shapes[k], tf.float32) for k in ("w", "b")]
        print("CONDS", label, conditionals(step.get_concrete_function(*specs)), flush=True)
        for i, g in enumerate(grads):
            if i == 3:  # a checkpoint without the tensors' state: Q drawn afresh at this step
                empty = eager.state_dict()
                empty["memory"] = {}
                eager.load_state_dict(empty)
                traced.load_state_dict(empty)
            if i == 5:  # a resume from the eager state
                traced.load_state_dict(eager.state_dict())
            mine = [t.numpy() for t in step(tf.constant(g["w"]), tf.constant(g["b"]))]
            want = [eager.step(tf.constant(g[k]), k).numpy() for k in ("w", "b")]
            for a, b in zip(mine, want):
                assert a.tobytes() == b.tobytes(), (label, i)
            theirs, ours = eager.state_dict()["memory"], traced.state_dict()["memory"]
            assert ours.keys() == theirs.keys(), (label, i, ours.keys(), theirs.keys())
            for name, fields in theirs.items():
                assert ours[name].keys() == fields.keys(), (label, i, name)
                for field, value in fields.items():
                    assert ours[name][field].tobytes() == value.tobytes(), (label, i, name, field)
        assert traced.stats.as_dict() == eager.stats.as_dict(), label
        print("SAME", label, flush=True)
""")


def test_powersgd_step_traced_once_and_bit_identical():
    """PowerSGD's memory: its first step is a steady step from a ``-0.0`` error and the
    ``Q`` drawn for that step, which the ``Q`` variable holds while the tensor has no
    state (drawn again on loading a checkpoint without it): the traced step holds no
    If node, and gives the eager pipeline's results, state and byte counts bit for bit
    with a NaN first step, without error feedback or warm start, across a checkpoint
    without the tensors' state and a resume."""
    if importlib.util.find_spec("horovod") is None:
        pytest.skip("horovod is not installed (run scripts/setup.sh)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _POWERSGD_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    counts = {line.split()[1]: int(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("CONDS")}
    assert counts == {"default": 0, "nan-first": 0, "no-error-feedback": 0, "no-warm-start": 0}, counts
    assert proc.stdout.count("SAME") == 4, proc.stdout
