"""The graph path of :class:`~grace_dl.tensorflow.HorovodTFGrace`: a method's pipeline
traced into the caller's ``tf.function``.

Horovod hands each gradient to ``compress`` while it traces (``DistributedGradientTape``
and the Keras ``DistributedOptimizer`` trace even when called eagerly). On this path the
pipeline (compensate, compress, update memory, exchange, decompress, aggregate; every
round of a multi-round method) is traced with the TensorFlow ops backend, and every
collective it asks for becomes a Horovod TF graph op (``hvd.allreduce``,
``hvd.allgather``, ``hvd.broadcast``), ordered by data dependencies: no
``tf.py_function``, no lock, and the collectives of different tensors are free to be in
flight at once. Horovod matches collectives by name, which is derived from the tensor's
name, so every worker traces the same names.

State lives in ``tf.Variable``s, created when a tensor is first traced (under
``tf.init_scope``, as plain resource variables, so that a method built inside a
``tf.function`` that is retraced can create them again): per tensor, its step counter,
whether its memory holds state yet, its memory fields (residual, momentum, velocity,
PowerSGD's error and Q ...) and its byte counts. The step counter is a tensor inside the
graph: methods draw their random numbers from ``(key, step)`` with it, exactly as
eagerly. A memory's first step differs from the later ones (nothing to add back; PowerSGD
draws its initial Q): the pipeline is traced twice, once without state and once with
it, and a ``tf.cond`` on the state flag picks one at run time, so that results are those
of the eager pipeline bit for bit. ``Grace.state_dict`` reads the variables back, and
``load_state_dict`` writes them, so checkpoints and resumes work as eagerly.

Schedules that decide on the step in Python (DGC's warm-up of sparsity, PowerSGD's
``start_iter``, the ``warmup_steps`` policy) hold only before a horizon: the steps before
it are traced with their int values, grouped where they trace alike (a run of dense
steps is traced once), and a ``tf.switch_case`` on the step picks the group, so that
the step tensor is used only from the horizon on (:func:`early_groups`). Methods whose
pipeline needs Python values of the data, or of every step (a size exchange read on
the host, PowerSGD without warm start), keep the ``tf.py_function`` path;
:func:`graph_path_blocker` says which and why. Byte counts (``method.stats``) are kept
in variables on this path: totals and per tensor, not per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from ..core import _COMPUTE_DTYPE, Grace, Pending
from ..ops import DTYPE_ITEMSIZE
from ..transport.base import allgather_traffic, allreduce_traffic

#: compressors whose pipeline traces with a tensor step (tested against the eager
#: pipeline); others run in a ``tf.py_function``
GRAPH_COMPRESSORS = frozenset({
    "none", "fp16", "bf16", "topk", "randomk", "dgc", "powersgd", "qsgd", "terngrad", "signsgd", "efsignsgd",
    "onebit", "signum", "threshold", "natural", "natural_dithering", "stc", "sbc", "adaptive_threshold",
    "sidco", "chunk", "gtopk", "sketch",
})
#: memories whose state the graph path keeps in variables
GRAPH_MEMORIES = frozenset({"none", "residual", "signum_momentum", "dgc_momentum", "powersgd", "gtopk"})
#: most warm-up steps of DGC traced one by one (each step its own density)
MAX_WARMUP_TRACES = 32
_STAT_FIELDS = ("dense", "payload", "sent", "received")


def graph_path_blocker(grace: Grace) -> str | None:
    """Why ``grace`` cannot run on the graph path (so it runs in a ``tf.py_function``),
    or None when it can."""
    policies = grace.policies
    routes = [(grace.compressor, grace.memory, grace.communicator)]
    routes += [(r.compressor, r.memory, r.communicator) for _, r in policies.overrides]
    for compressor, memory, communicator in routes:
        cname = getattr(compressor, "registry_name", type(compressor).__name__)
        mname = getattr(memory, "registry_name", type(memory).__name__)
        if cname not in GRAPH_COMPRESSORS:
            return f"compressor {cname!r} is not traced on the graph path"
        if mname not in GRAPH_MEMORIES:
            return f"memory {mname!r} is not traced on the graph path"
        if cname == "dgc" and compressor.ratio < 0.25 and compressor.warmup_steps > MAX_WARMUP_TRACES:
            return (f"dgc's warm-up of {compressor.warmup_steps} steps would trace as many pipelines "
                    f"(the graph path traces at most {MAX_WARMUP_TRACES})")
        if cname == "powersgd" and not compressor.warm_start:
            return "powersgd without warm start draws a new Q on the host at every step"
        if getattr(communicator, "registry_name", "") == "broadcast" and compressor.payload_nbytes(
                8, "float32") is None:
            return "a broadcast of data-dependent size reads the sizes on the host"
    return None


class _TensorSlot:
    """The variables of one tensor name on the graph path."""

    def __init__(self, grace: Grace, name: str, memory: Any):
        safe = "".join(c if c.isalnum() else "_" for c in name)[:60]
        loaded = memory.state.pop(name, None) or {}
        with tf.init_scope():
            self.step = _variable(np.int64(grace.steps.get(name, 0)), f"grace_step_{safe}")
            self.has_state = _variable(bool(loaded), f"grace_has_state_{safe}")
            self.stats = _variable(np.zeros(len(_STAT_FIELDS) + 1, np.int64), f"grace_bytes_{safe}")
        self.safe = safe
        self.memory = memory  # the memory of the tensor's route from its schedule's horizon on
        self.fields: dict[str, tf.Variable] = {}
        for key, value in loaded.items():
            self.field(key, np.asarray(value))

    def field(self, key: str, initial: Any) -> tf.Variable:
        """The variable of memory field ``key``, created from ``initial`` (an array, or a
        symbolic tensor whose static shape and dtype give a zero variable)."""
        if key not in self.fields:
            with tf.init_scope():
                if not isinstance(initial, np.ndarray):
                    initial = np.zeros(initial.shape.as_list(), initial.dtype.as_numpy_dtype)
                self.fields[key] = _variable(initial, f"grace_{key}_{self.safe}")
        return self.fields[key]


def _variable(initial: Any, name: str) -> tf.Variable:
    # a ResourceVariable built directly skips tf.function's variable creator scope,
    # which refuses variables created after a function's first trace (a method built
    # inside a retraced tf.function); init_scope makes it an eager, lasting variable
    return resource_variable_ops.ResourceVariable(initial, trainable=False, name=name)


def slots(grace: Grace) -> dict[str, _TensorSlot]:
    """The graph-path variables of ``grace`` by tensor name (empty until a trace)."""
    found = grace.__dict__.get("_graph_slots")
    if found is None:
        found = grace.__dict__["_graph_slots"] = {}
    return found


def trace_step(grace: Grace, tensor: Any, name: str) -> Any:
    """The aggregated ``tensor`` (its shape and dtype), traced into the current graph."""
    from . import TFOps
    from ..ops import get_ops

    ops = get_ops(tensor)
    assert isinstance(ops, TFOps)
    in_dtype = ops.dtype(tensor)
    if in_dtype not in _COMPUTE_DTYPE:
        raise TypeError(f"tensor {name!r} has dtype {in_dtype}; grace-dl compresses float16, "
                        f"bfloat16, float32 and float64 gradients")
    shape = ops.shape(tensor)
    transport = grace.transport
    valid_for = (shape, in_dtype, grace.seed, transport.rank, transport.size)
    template = grace._templates.get(name)
    if template is None or template.valid_for != valid_for:
        template = grace._templates[name] = grace._template(name, ops.numel(tensor), valid_for)
    numel = template.fields["numel"]
    if numel == 0:
        return tensor
    horizon, groups = early_groups(grace, name, numel, shape)
    route = grace.route(name, numel, horizon)  # the route of every step from the horizon on
    memory = route.memory
    table = slots(grace)
    slot = table.get(name)
    if slot is None:
        # the handshake checks loaded state against the tensor before the slot takes it
        _handshake(grace, ops, tensor, template.context(grace.steps.get(name, 0)), in_dtype)
        slot = table[name] = _TensorSlot(grace, name, memory)
    with tf.init_scope():
        step0 = int(slot.step.numpy())

    compute_dtype = template.fields["dtype"]
    x = ops.flatten(tensor)
    if in_dtype != compute_dtype:
        x = ops.cast(x, compute_dtype)
    step_t = slot.step.read_value()
    has_state = slot.has_state.read_value()

    def run(step: Any, state: dict[str, Any] | None, route: Any) -> tuple[Any, Any, list[Any], Any]:
        memory = route.memory
        if state is None:
            memory.state.pop(name, None)
        else:
            memory.state[name] = state
        ctx = template.context(step)
        pending = Pending(ops, ctx, in_dtype, template.dense_nbytes)
        try:
            flat = _drive(grace, ops, grace._pipeline(ops, x, ctx, pending, route), pending, ctx)
        finally:
            written = memory.state.pop(name, None) or {}
        counts = tf.stack([tf.cast(v, tf.int64) for v in (pending.dense_nbytes, pending.payload, pending.sent,
                                                          pending.received)])
        known = len(slot.fields)
        for key, value in written.items():
            slot.field(key, value)
        if fresh_fields_closed and len(slot.fields) != known:
            raise RuntimeError(f"tensor {name!r}: a step before {horizon} keeps memory fields "
                               f"{sorted(set(slot.fields) - set(closed_fields))} that later steps do not; "
                               f"the graph path cannot trace it")
        values = [written[k] if k in written else v.read_value() for k, v in slot.fields.items()]
        # the memory holds state after this step iff it wrote some, as eagerly
        return flat, counts, values, tf.constant(bool(written))

    def with_state(step: Any, route: Any) -> Any:
        return lambda: run(step, {k: v.read_value() for k, v in slot.fields.items()}, route)

    stateful = bool(getattr(type(memory), "state_fields", True))

    def late() -> Any:
        if not stateful:
            return run(step_t, {}, route)
        # the first step of this name: traced with its int step (PowerSGD draws its
        # initial Q on the host from it); afterwards steady, with the step tensor (also
        # for a tensor whose memory keeps nothing, such as PowerSGD's dense vectors).
        # tf.cond traces first first: it creates the field variables that steady reads
        first_step = max(step0, horizon)
        first = tf.logical_and(tf.logical_not(has_state), tf.equal(step_t, first_step))
        return tf.cond(first, lambda: run(first_step, None, route), with_state(step_t, route))

    def early(start: int, route: Any) -> Any:
        # a step before the horizon: traced with an int step (every step of the group
        # traces alike), with state or without it as the memory has it
        if not getattr(type(route.memory), "state_fields", True):
            return lambda: run(start, {}, route)
        return lambda: tf.cond(has_state, with_state(start, route), lambda: run(start, None, route))

    fresh_fields_closed = False
    closed_fields: list[str] = []
    if not groups:
        flat, counts, values, wrote = late()
    else:
        def before() -> Any:
            nonlocal fresh_fields_closed, closed_fields
            # the late steps were traced first and made every field: the early ones may
            # not add any (the branches must return alike)
            fresh_fields_closed, closed_fields = True, list(slot.fields)
            if len(groups) == 1:
                return early(groups[0][0], groups[0][2])()
            group_of = tf.constant(np.repeat(np.arange(len(groups)), [b - a for a, b, _ in groups]), tf.int32)
            return tf.switch_case(tf.gather(group_of, tf.minimum(step_t, horizon - 1)),
                                  [early(a, r) for a, _, r in groups])

        flat, counts, values, wrote = tf.cond(step_t >= horizon, late, before)
    for variable, value in zip(slot.fields.values(), values):
        variable.assign(value)
    if slot.fields:
        slot.has_state.assign(wrote)
    slot.step.assign_add(1)
    slot.stats.assign_add(tf.concat([counts, tf.ones([1], tf.int64)], 0))
    if in_dtype != compute_dtype:
        flat = ops.cast(flat, in_dtype)
    return tf.reshape(flat, shape)


def _step_decision(compressor: Any, shape: tuple[int, ...], step: int) -> Any:
    """What a compressor decides in Python from ``step`` (part of the key of a group of
    early steps), and whether that step's pipeline leaves the step out of its arithmetic."""
    cname = getattr(compressor, "registry_name", "")
    if cname == "dgc":
        return ("density", compressor.density(step)), False
    if cname == "powersgd":
        plan = compressor.plan(shape, step)
        return ("plan", plan), plan is None  # exchanged dense: the step is not used
    return None, False


def _schedule_horizon(compressor: Any) -> int:
    """The first step from which ``compressor`` decides nothing from the step in Python."""
    cname = getattr(compressor, "registry_name", "")
    if cname == "dgc" and compressor.warmup_steps and compressor.ratio < 0.25:
        return compressor.warmup_steps
    if cname == "powersgd":
        return compressor.start_iter
    return 0


def early_groups(grace: Grace, name: str, numel: int,
                 shape: tuple[int, ...]) -> tuple[int, list[tuple[int, int, Any]]]:
    """``(horizon, groups)``: from step ``horizon`` on, tensor ``name`` takes one route
    and its pipeline decides nothing from the step in Python (it is traced once, with
    the step tensor). ``groups`` split the steps before it into ``(start, stop, route)``
    that trace alike: a run of steps exchanged dense (where the step does not enter the
    arithmetic), or a single step (DGC's warm-up: each its own density)."""
    policies = grace.policies
    routes = [grace._main] + [r for _, r in policies.overrides]
    horizon = max([policies.warmup_steps] + [_schedule_horizon(r.compressor) for r in routes])
    groups: list[tuple[int, int, Any]] = []
    last = None
    for step in range(horizon):
        route = grace.route(name, numel, step)
        decision, step_free = _step_decision(route.compressor, shape, step)
        step_free = step_free or route is grace._dense
        key = (id(route), decision)
        if step_free and last == key:
            groups[-1] = (groups[-1][0], step + 1, route)
        else:
            groups.append((step, step + 1, route))
        last = key if step_free else None
    return horizon, groups


def _drive(grace: Grace, ops: Any, rounds: Any, pending: Pending, ctx: Any) -> Any:
    """Run a pipeline generator at trace time, its collectives as Horovod graph ops."""
    import horovod.tensorflow as hvd

    from .horovod import _op_name

    ps = grace.transport._ps
    size = ctx.world_size
    results = None
    prefix = f"grace.{ctx.name}"
    while True:
        try:
            requests = rounds.send(results)
        except StopIteration as end:
            return end.value
        results = []
        for c in requests:
            full = c.name or (f"{prefix}.{c.tag}" if c.tag else prefix)
            name = _op_name(full)
            itemsize = DTYPE_ITEMSIZE[ops.dtype(c.buf)]
            mine = ops.length(c.buf) * itemsize
            if c.kind == "allreduce":
                result = hvd.allreduce(c.buf, op=hvd.Sum, name=name, **ps)
                sent, received = allreduce_traffic(mine, size)
            elif c.kind == "allgather":
                flat = tf.reshape(c.buf, [-1])
                data = hvd.allgather(flat, name=name, **ps)
                if c.equal_sizes:
                    n = flat.shape.num_elements()
                    # a static length gives each worker's piece its static shape
                    result = (tf.unstack(tf.reshape(data, [size, n])) if n is not None
                              else tf.split(data, size, axis=0))
                    sent, received = allgather_traffic(mine, [mine] * size, ctx.rank, True)
                else:
                    count = tf.reshape(tf.size(flat, out_type=tf.int64), [1])
                    sizes = hvd.allgather(count, name=_op_name(full + ".sizes"), **ps)
                    result = tf.split(data, sizes, num=size, axis=0)
                    sent, received = allgather_traffic(mine, [sizes[r] * itemsize for r in range(size)], ctx.rank,
                                                       False)
            else:
                result = hvd.broadcast(c.buf, root_rank=c.root, name=name, **ps)
                root_nbytes = ops.length(result) * itemsize
                sent = (size - 1) * root_nbytes if c.root == ctx.rank else 0
                received = 0 if c.root == ctx.rank else root_nbytes
            pending.sent += sent
            pending.received += received
            results.append(result)


def _handshake(grace: Grace, ops: Any, tensor: Any, ctx: Any, in_dtype: str) -> None:
    """The first-use handshake (:mod:`grace_dl.handshake`) of ``ctx.name``, run eagerly
    while tracing: its fingerprint is known at trace time, and a mismatch is raised
    before the graph exists."""
    from .. import handshake

    def nothing():
        return None
        yield  # pragma: no cover  (makes this a generator)

    pending = Pending(ops, ctx, in_dtype, 0)
    rounds = handshake.guard(grace, ops, tensor, ctx, pending, nothing())
    with tf.init_scope():
        transport = grace.transport
        results = None
        while True:
            try:
                requests = rounds.send(results)
            except StopIteration:
                return
            results = []
            for c in requests:
                buf = tf.constant(tf.get_static_value(c.buf))
                results.append(transport.wait(transport.allgather_async(buf, c.name, equal_sizes=True)))


def pull(grace: Grace) -> None:
    """Copy the graph-path variables into ``grace.steps`` and the memories' state (as
    NumPy), so that :meth:`Grace.state_dict` sees them."""
    table = grace.__dict__.get("_graph_slots") or {}
    if not table:
        return
    with tf.init_scope():
        for name, slot in table.items():
            memory = slot.memory
            grace.steps[name] = int(slot.step.numpy())
            if bool(slot.has_state.numpy()) and slot.fields:
                memory.state[name] = {k: v.numpy() for k, v in slot.fields.items()}
            else:
                memory.state.pop(name, None)


def after_pull(grace: Grace) -> None:
    """Drop what :func:`pull` copied out of the variables (they stay the state)."""
    table = grace.__dict__.get("_graph_slots") or {}
    for name, slot in table.items():
        slot.memory.state.pop(name, None)


def push(grace: Grace) -> None:
    """Write ``grace.steps`` and the memories' state (just loaded) into the graph-path
    variables; names without loaded state start afresh."""
    table = grace.__dict__.get("_graph_slots") or {}
    with tf.init_scope():
        for name, slot in table.items():
            memory = slot.memory
            slot.step.assign(grace.steps.get(name, 0))
            loaded = memory.state.pop(name, None) or {}
            for key, value in loaded.items():
                variable = slot.field(key, np.asarray(value))
                variable.assign(np.asarray(value).reshape(variable.shape))
            slot.has_state.assign(bool(loaded))


def graph_stats(grace: Grace, stats: Any) -> Any:
    """``stats`` (the eager path's :class:`~grace_dl.core.TrafficStats`) plus the byte
    counts kept in the graph-path variables (totals and per tensor)."""
    from ..core import TrafficStats

    table = grace.__dict__.get("_graph_slots") or {}
    if not table:
        return stats
    merged = TrafficStats(stats.dense, stats.payload, stats.sent, stats.received, stats.tensors,
                          {k: dict(v) for k, v in stats.per_tensor.items()},
                          {k: dict(v) for k, v in stats.per_step.items()})
    with tf.init_scope():
        for name, slot in table.items():
            dense, payload, sent, received, count = (int(v) for v in slot.stats.numpy())
            if not count:
                continue
            merged.dense += dense
            merged.payload += payload
            merged.sent += sent
            merged.received += received
            merged.tensors += count
            row = merged.per_tensor.setdefault(name, {"dense": 0, "payload": 0, "sent": 0, "received": 0,
                                                      "count": 0})
            for key, value in zip(("dense", "payload", "sent", "received", "count"),
                                  (dense, payload, sent, received, count)):
                row[key] += value
    return merged
