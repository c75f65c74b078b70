"""Run under ``horovodrun -np 2``: horovod.tensorflow collectives through grace-dl's
transport, every method against the simulator, and Horovod's own compression unchanged."""

from __future__ import annotations

import os
import sys

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

tf.get_logger().setLevel("ERROR")  # the checks build many small functions on purpose

sys.path.insert(0, os.path.dirname(__file__))
import grace_dl.tensorflow as grace  # noqa: E402
from grace_dl.compressors.topk import TopK  # noqa: E402
from common import check_methods_against_simulator, stage_params  # noqa: E402


def say(msg: str) -> None:
    print(f"rank {hvd.rank()}: {msg}", flush=True)


def check_collectives() -> None:
    t = grace.HorovodTFTransport()
    r, n = t.rank, t.size
    for dtype in (tf.float32, tf.float16, tf.float64, tf.int32, tf.int64):
        buf = tf.cast(tf.range(5) + 10 * r, dtype)
        got = t.wait(t.allreduce_async(buf, f"ar.{dtype.name}"))
        want = sum(tf.cast(tf.range(5) + 10 * q, dtype) for q in range(n))
        assert np.array_equal(got.numpy(), want.numpy()), (dtype, got, want)
    got = t.wait(t.allgather_async(tf.fill([r + 2], r), "ag.var"))
    assert [g.numpy().tolist() for g in got] == [[q] * (q + 2) for q in range(n)], got
    got = t.wait(t.allgather_async(tf.fill([3], float(r)), "ag.eq", equal_sizes=True))
    assert [g.numpy().tolist() for g in got] == [[float(q)] * 3 for q in range(n)], got
    root = n - 1
    got = t.wait(t.broadcast_async(tf.range(4, dtype=tf.float32) * (r + 1), root, "bc"))
    assert np.array_equal(got.numpy(), np.arange(4, dtype=np.float32) * (root + 1)), got
    say("collectives ok (allreduce 5 dtypes, allgather variable and equal sizes, broadcast)")


def check_horovod_own_compression() -> None:
    w = tf.Variable(tf.ones([4, 3]))
    x = tf.constant(np.random.default_rng(hvd.rank()).standard_normal((8, 4)).astype(np.float32))
    for label, compression in (("none", hvd.Compression.none), ("fp16", hvd.Compression.fp16)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.matmul(x, w) ** 2)
        tape = hvd.DistributedGradientTape(tape, compression=compression)
        (grad,) = tape.gradient(loss, [w])
        gathered = hvd.allgather(tf.reshape(grad, [1, -1]), name=f"check.{label}")
        assert np.array_equal(gathered[0].numpy(), gathered[1].numpy()), label
    say("hvd.Compression.none/fp16 unchanged with DistributedGradientTape")


def _model_vars(seed: int = 0) -> list[tf.Variable]:
    rng = np.random.default_rng(seed)
    return [tf.Variable(rng.standard_normal(shape).astype(np.float32) * 0.5, name=name)
            for name, shape in (("w1", (5, 40)), ("b1", (40,)), ("w2", (40, 3)))]


def _batch(rank: int, step: int) -> tuple[tf.Tensor, tf.Tensor]:
    rng = np.random.default_rng(7000 + 100 * step + rank)
    return (tf.constant(rng.standard_normal((16, 5)).astype(np.float32)),
            tf.constant(rng.integers(0, 3, 16)))


def _loss(variables, x, y):
    w1, b1, w2 = variables
    logits = tf.matmul(tf.tanh(tf.matmul(x, w1) + b1), w2)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))


def _tape_step(variables, method, x, y, lr=0.1):
    """One SGD step through ``hvd.DistributedGradientTape``; the aggregated gradients."""
    with tf.GradientTape() as tape:
        loss = _loss(variables, x, y)
    tape = hvd.DistributedGradientTape(tape, compression=method)
    grads = tape.gradient(loss, variables)
    for v, g in zip(variables, grads):
        v.assign_sub(lr * g)
    return grads


def _recording(method):
    """Make ``method`` record, by tensor name, the gradient Horovod hands it (what its
    pipeline is fed); returns a function giving that of the last step. On the graph path
    the fed tensor is symbolic: it is copied into a variable by the traced step."""
    from tensorflow.python.ops import resource_variable_ops

    fed: dict = {}
    pipeline_step = method.step
    traced_step = method.graph_step
    slots: dict = {}

    def step(tensor, name):
        fed[name] = tensor.numpy().copy()
        return pipeline_step(tensor, name)

    def graph_step(tensor, name):
        if name not in slots:
            with tf.init_scope():  # a plain resource variable: the step may be traced again
                slots[name] = resource_variable_ops.ResourceVariable(tf.zeros(tensor.shape, tensor.dtype),
                                                                     trainable=False)
        slots[name].assign(tensor)
        return traced_step(tensor, name)

    # the adapter calls self.step / self.graph_step: instance attributes shadow them
    method.step, method.graph_step = step, graph_step

    def last_step() -> dict:
        got = dict(fed)
        got.update({n: v.numpy().copy() for n, v in slots.items()})
        for v in slots.values():  # NaN until the next step writes it again
            v.assign(tf.fill(v.shape, float("nan")))
        fed.clear()
        return got

    return last_step


def check_gradient_tape(steps: int = 3) -> int:
    """``hvd.DistributedGradientTape(tape, compression=grace.<method>())`` with stock
    Horovod, eagerly and inside tf.function: the aggregated gradients of ``steps`` SGD
    steps are bit-identical to the in-process simulator fed the same gradients.

    The simulator is fed the very gradients that the method received on each rank
    (gathered from every rank), not gradients computed again: TF's kernels (oneDNN's
    matmul, graph rewrites) may give other last bits inside a tf.function than eagerly,
    depending on the CPU. What the fed gradients must equal is checked separately:
    bit for bit in eager mode (the same eager kernels), closely inside tf.function."""
    from grace_dl.tensorflow.horovod import _variable_names

    rank, size = hvd.rank(), hvd.size()
    checked = 0
    # every method with its defaults, and settings that the graph path traces apart: a
    # Q drawn from the step tensor, k varying at run time over a warm-up longer than the
    # run, broadcasts of sizes known only when the graph runs
    cases = [(name, stage_params(name)) for name in grace.list_methods()]
    cases += [("powersgd", {"rank": 2, "warm_start": False}), ("dgc", {"ratio": 0.05, "warmup_steps": 40}),
              ("threshold", {"communicator": "broadcast"}), ("dgc", {"communicator": "broadcast"})]
    for mode in ("eager", "function"):
        for case, (name, params) in enumerate(cases):
            real_vars = _model_vars()
            names = _variable_names(real_vars)
            method = getattr(grace, name)(**params)
            last_fed = _recording(method)
            step_fn = tf.function(_tape_step) if mode == "function" else _tape_step
            sim = grace.LocalSimulator(getattr(grace, name)(**params), size)
            for step in range(steps):
                x, y = _batch(rank, step)
                with tf.GradientTape() as tape:
                    loss = _loss(real_vars, x, y)
                local = dict(zip(names, (g.numpy() for g in tape.gradient(loss, real_vars))))
                aggregated = dict(zip(names, step_fn(real_vars, method, x, y)))
                fed = last_fed()
                assert sorted(fed) == sorted(names), f"{name} ({mode}): method was fed {sorted(fed)}"
                for n in names:
                    same = (fed[n].tobytes() == local[n].tobytes() if mode == "eager"
                            else np.allclose(fed[n], local[n], rtol=1e-5, atol=1e-6))
                    assert same, f"{name} ({mode}): {n} was fed another gradient than the tape's"
                everyone = {n: hvd.allgather(tf.constant(fed[n][None]), name=f"fed.{mode}.{case}.{step}.{i}")
                            for i, n in enumerate(names)}
                grads = [{n: tf.constant(everyone[n][r].numpy()) for n in names} for r in range(size)]
                expected = sim.step(grads)[rank]
                for n in names:
                    got, want = aggregated[n].numpy(), expected[n].numpy()
                    if got.tobytes() != want.tobytes():
                        raise AssertionError(f"{name} ({mode}) step {step}: {n} differs from the simulator "
                                             f"by {np.abs(got - want).max()}")
            gathered = hvd.allgather(tf.reshape(real_vars[0], [1, -1]), name=f"same.{mode}.{case}")
            assert np.array_equal(gathered[0].numpy(), gathered[1].numpy()), f"{name}: ranks differ"
            assert method.stats.payload > 0 and method.stats.tensors == 3 * steps
            checked += 1
    return checked


def check_sum_op_and_adasum() -> None:
    """``op=hvd.Sum`` gives N times the mean; Adasum is refused with a clear error."""
    variables = _model_vars()
    x, y = _batch(hvd.rank(), 0)
    results = {}
    for label, op in (("average", hvd.Average), ("sum", hvd.Sum)):
        with tf.GradientTape() as tape:
            loss = _loss(variables, x, y)
        tape = hvd.DistributedGradientTape(tape, compression=grace.topk(ratio=0.1), op=op)
        results[label] = tape.gradient(loss, variables)
    for avg, total in zip(results["average"], results["sum"]):
        assert np.array_equal((avg * hvd.size()).numpy(), total.numpy()), "op=Sum is not N x the mean"
    with tf.GradientTape() as tape:
        loss = _loss(variables, x, y)
    tape = hvd.DistributedGradientTape(tape, compression=grace.topk(ratio=0.1), op=hvd.Adasum)
    try:
        tape.gradient(loss, variables)
    except ValueError as err:
        assert "Adasum" in str(err)
    else:
        raise AssertionError("op=hvd.Adasum was accepted")
    say("op=hvd.Sum gives N x the mean; op=hvd.Adasum is refused")


def check_checkpoint_resume(k: int = 3) -> None:
    """Checkpoint at step k and restore: the weights at step 2k equal an uninterrupted run."""
    rank = hvd.rank()
    for name in ("topk", "efsignsgd", "qsgd"):
        straight, method = _model_vars(), getattr(grace, name)()
        for step in range(2 * k):
            _tape_step(straight, method, *_batch(rank, step))
        first, method = _model_vars(), getattr(grace, name)()
        for step in range(k):
            _tape_step(first, method, *_batch(rank, step))
        path = tf.train.Checkpoint(weights=first, grace=method.checkpointable()).write(
            f"/tmp/grace_tf_ckpt_{os.getpid()}/{name}")
        resumed, fresh = _model_vars(seed=99), getattr(grace, name)()
        tf.train.Checkpoint(weights=resumed, grace=fresh.checkpointable()).read(path).assert_consumed()
        assert fresh.steps and all(v == k for v in fresh.steps.values()), fresh.steps
        for step in range(k, 2 * k):
            _tape_step(resumed, fresh, *_batch(rank, step))
        for a, b in zip(straight, resumed):
            assert a.numpy().tobytes() == b.numpy().tobytes(), f"{name}: resumed run differs"
    say("checkpoint at k, restore, step 2k: identical to an uninterrupted run (topk, efsignsgd, qsgd)")


class UnregisteredTopK(TopK):
    """Top-k under a name the graph path does not know: it runs in a tf.py_function."""

    registry_name = "unregistered_topk"


def check_none_gradients() -> None:
    """A variable whose gradient is None on one rank only (its loss does not use it there)
    ends, on every rank, in an error naming the variable, within seconds: at the first
    step, inside tf.function, and at a later step (eagerly, the None appears at step 2)."""
    import time

    rank = hvd.rank()
    slowest = 0.0
    cases = [("eager", 0, "b"), ("function", 0, "b"), ("eager", 2, "b"), ("eager", 0, "w")]
    for i, (mode, from_step, missing) in enumerate(cases):
        # names of their own per case: a refused step leaves Horovod's own empty allreduces
        # of the other variables posted on one rank only
        w = tf.Variable(tf.ones([4, 3]), name=f"none{i}_w")
        b = tf.Variable(tf.zeros([3]), name=f"none{i}_b")
        x = tf.constant(np.ones((2, 4), np.float32))
        # the later-step case on the py_function path (a compressor from outside the
        # registry), where the check runs at every step; on the graph path (topk) that rank
        # alone traces the step again and its check waits 30 s for the others, then ends
        # the job (tests/multirank/late_none_gradient.py)
        method = grace.HorovodTFGrace(UnregisteredTopK(ratio=0.5)) if from_step else grace.topk(ratio=0.5)
        assert method.graph_path == (not from_step), (from_step, method.graph_path)

        def step(drop):
            with tf.GradientTape() as tape:
                out = tf.matmul(x, w) if not (drop and missing == "w") else tf.zeros([2, 3])
                if not (drop and missing == "b"):
                    out = out + b
                loss = tf.reduce_sum(out ** 2)
            return hvd.DistributedGradientTape(tape, compression=method).gradient(loss, [w, b])

        run = tf.function(step) if mode == "function" else step
        start = time.perf_counter()
        try:
            for s in range(from_step + 1):
                start = time.perf_counter()
                run(rank == 1 and s >= from_step)
        except Exception as err:  # noqa: BLE001  (TF's UnknownError quotes the py_function's GradientMismatchError)
            text = str(err)
            name = (b if missing == "b" else w).name
            assert "GradientMismatchError" in text and f"rank 1 has no gradient (None) for '{name}'" in text, text
        else:
            raise AssertionError(f"a None gradient on rank 1 ({mode}, step {from_step}) was accepted")
        slowest = max(slowest, time.perf_counter() - start)
        assert slowest < 60, (mode, from_step, slowest)
    say(f"None gradients ok: {len(cases)} cases of a None gradient on rank 1 only refused on every rank, "
        f"naming the variable (slowest {slowest:.1f} s)")


def check_lone_retrace() -> None:
    """Rank 1 alone traces the step again (a batch of another size) with the same
    gradients: on the graph path the gradient check is not run again for a gradient set
    the ranks agreed on (it would post a collective that rank 0, running its old trace,
    never posts: the job hung), and the ranks go on averaging the same tensors."""
    rank, size = hvd.rank(), hvd.size()
    w = tf.Variable(tf.ones([4, 3]), name="retrace_w")
    b = tf.Variable(tf.zeros([3]), name="retrace_b")
    method = grace.topk(ratio=1.0)  # every element sent: the aggregate is the exact mean

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((tf.matmul(x, w) + b) ** 2)
        return hvd.DistributedGradientTape(tape, compression=method).gradient(loss, [w, b])

    for s in range(4):
        rows = 3 if rank == 1 and s >= 2 else 2
        x = tf.constant(np.random.default_rng(10 * s + rank).standard_normal((rows, 4)).astype(np.float32))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((tf.matmul(x, w) + b) ** 2)
        local = tape.gradient(loss, [w, b])
        aggregated = step(x)
        for i, (mine, got) in enumerate(zip(local, aggregated)):
            everyone = hvd.allgather(tf.reshape(mine, [1, -1]), name=f"retrace.{s}.{i}").numpy()
            want = everyone.mean(axis=0).reshape(got.shape)
            assert np.allclose(got.numpy(), want, rtol=1e-5, atol=1e-5), (s, i, got.numpy(), want)
    traces = step.experimental_get_tracing_count()
    assert traces == (2 if rank == 1 else 1), f"rank {rank} traced the step {traces} times"
    say(f"lone retrace ok: rank 1 traced the step again alone ({traces} traces here), same gradients, "
        f"4 steps averaged")


def check_one_model_per_method() -> None:
    """One method object used for two live models whose variables share names is refused
    (when the second model's shapes differ: Horovod reuses its traced allreduce for
    variables of the same shapes, and grace-dl's adapter never sees them)."""
    method = grace.topk(ratio=0.5)
    x = tf.constant(np.ones((2, 4), np.float32))
    models = [tf.Variable(tf.ones([4, 3 + k]), name="shared_w") for k in range(2)]
    for k, w in enumerate(models):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.matmul(x, w) ** 2)
        try:
            hvd.DistributedGradientTape(tape, compression=method).gradient(loss, [w])
        except ValueError as err:
            assert k == 1 and "already serves another variable named 'shared_w:0'" in str(err), err
        else:
            assert k == 0, "a second model with the same method object was accepted"
    say("one model per method ok: a second live model with the same method object refused")


def check_fused_tape(steps: int = 4) -> None:
    """``policies.fusion_bytes > 0`` through ``hvd.DistributedGradientTape`` (eagerly,
    where Horovod traces its allreduce, and inside tf.function): every step's aggregated
    gradients, the state, step counters and byte counts equal the fused simulator's bit
    for bit (same buckets), also after the state is moved to a new method object half-way
    (a resume). The loss is linear in the weights, so the gradients are exactly the
    per-rank constants fed to the simulator."""
    rank, size = hvd.rank(), hvd.size()
    shapes = (("fw1", (5, 40)), ("fb1", (40,)), ("fw2", (40, 3)), ("fb2", (3,)))
    cases = [("topk", {"ratio": 0.1}, 1 << 20, "function"), ("topk", {"ratio": 0.1}, 512, "eager"),
             ("efsignsgd", {}, 1 << 20, "function"), ("powersgd", {"rank": 2}, 1 << 20, "function")]
    for case, (name, kwargs, fusion, mode) in enumerate(cases):
        policies = {"fusion_bytes": fusion}
        variables = [tf.Variable(tf.zeros(shape), name=f"{v}_{case}") for v, shape in shapes]
        names = [v.name for v in variables]

        def tape_step(method, consts):
            with tf.GradientTape() as tape:
                loss = tf.add_n([tf.reduce_sum(v * c) for v, c in zip(variables, consts)])
            return hvd.DistributedGradientTape(tape, compression=method).gradient(loss, variables)

        run = tf.function(tape_step) if mode == "function" else tape_step
        method = getattr(grace, name)(policies=policies, **kwargs)
        sim = grace.LocalSimulator(getattr(grace, name)(policies=policies, **kwargs), size)
        for step in range(steps):
            if step == steps // 2:  # resume: the state of every bucket moved to a new object
                moved = getattr(grace, name)(policies=policies, **kwargs)
                moved.load_state_dict(method.state_dict())
                method = moved
            consts = [[np.random.default_rng(1000 * step + 10 * r + i).standard_normal(shape).astype(np.float32)
                       for i, (_, shape) in enumerate(shapes)] for r in range(size)]
            got = run(method, [tf.constant(c) for c in consts[rank]])
            # ready order (the variables reversed), as Horovod's torch adapter plans its buckets
            want = sim.step([{n: tf.constant(c) for n, c in reversed(list(zip(names, consts[r])))}
                             for r in range(size)])[rank]
            for n, g in zip(names, got):
                assert g.numpy().tobytes() == want[n].numpy().tobytes(), (name, fusion, mode, step, n)
        buckets = [b.name for b in sim.fusers[rank].buckets]
        mine, theirs = method.state_dict(), sim.workers[rank].state_dict()
        assert buckets and set(buckets) <= set(mine["steps"]), (name, buckets, mine["steps"])
        assert mine["steps"] == theirs["steps"] and mine["memory"].keys() == theirs["memory"].keys(), name
        for key, fields in theirs["memory"].items():
            for field, value in fields.items():
                assert mine["memory"][key][field].tobytes() == np.asarray(value).tobytes(), (name, key, field)
        assert set(method.stats.per_tensor) == set(sim.workers[rank].stats.per_tensor), name
    say(f"fused DistributedGradientTape ok: {len(cases)} cases (topk, efsignsgd, powersgd; eager and tf.function; "
        f"a resume half-way) bit-identical to the fused simulator")


def main() -> None:
    hvd.init()
    check_collectives()
    count = check_methods_against_simulator(
        hvd.rank(), hvd.size(), grace.HorovodTFTransport, tf.constant, lambda t: t.numpy())
    say(f"methods ok: {count} method/communicator cases bit-identical to the simulator")
    check_horovod_own_compression()
    count = check_gradient_tape()
    say(f"DistributedGradientTape ok: {count} method/mode cases (eager and tf.function) bit-identical "
        f"to the simulator, weights identical on all ranks")
    check_checkpoint_resume()
    check_fused_tape()
    check_sum_op_and_adasum()
    check_none_gradients()
    check_lone_retrace()
    check_one_model_per_method()
    say("ALL OK")


if __name__ == "__main__":
    main()
