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
PowerSGD's error and Q, 1-bit Adam's moments and errors ...) and its byte counts. The
step counter is a tensor inside the graph: methods draw their random numbers from
``(key, step)`` with it, exactly as eagerly (PowerSGD's ``Q``, drawn as NumPy's Philox
stream, :meth:`~grace_dl.ops.Ops.reference_uniform`, also without warm start). A
memory's first step differs from the later ones (nothing to add back; PowerSGD draws
its initial Q): the pipeline is traced twice, once without state and once with it,
and a ``tf.cond`` on the state flag picks one at run time, so that results are those
of the eager pipeline bit for bit. Memories whose first step is a steady step from
fields filled with ``-0.0`` or ``+0.0`` (residual, Signum's and DGC's momentum,
PowerSGD's error; see :data:`_ONE_TRACE_FILL`), and a memory whose missing fields read
as zeros (1-bit Adam's), keep every field in a variable from the start and are traced
once (the executor still visits a ``tf.cond``'s untaken branch, as dead ops).
PowerSGD's ``Q`` variable holds, while the tensor has no state, the ``Q`` drawn on the
host for its next step (:func:`primed_fields`), so that its first step too is traced
once, without a draw in the graph.
``Grace.state_dict`` reads the variables back, and ``load_state_dict`` writes them, so
checkpoints and resumes work as eagerly.

Schedules that decide on the step in Python (DGC's warm-up of sparsity, PowerSGD's
``start_iter``, 1-bit Adam's ``freeze_step``, the ``warmup_steps`` policy) hold only
before a horizon: the steps before it are split into runs that decide alike
(:func:`early_groups`), each traced once, and a ``tf.switch_case`` on the step picks
the run. A run whose steps leave the step out of their arithmetic (exchanged dense) is
traced with its first int step; any other with the step tensor and
``TensorContext.step_range``, from which the method looks what its schedule gives each
step up in tables of the int steps' values (DGC's k and sample rank, so that k varies
at run time however long the warm-up; 1-bit Adam's bias corrections). Collectives
whose sizes depend on the data (DGC's and the threshold methods' allgathers,
broadcasts of such payloads) take sizes known when the graph runs. TensorFlow's graph
optimizer (Grappler) reassociates products with constants and chains of sums, which
would round otherwise than eagerly: :meth:`~grace_dl.ops.Ops.hold` (a ``Snapshot``)
keeps each gradient, and the sums and products of a method that need it, as written.
Every registered method traces (no ``tf.py_function``) except those
:func:`graph_path_blocker` names.

Byte counts (``method.stats``) are kept in variables on this path: totals per tensor,
and per step a ring of the last :data:`STEP_HISTORY` steps of each tensor (its step and
its four counts), which reading ``method.stats`` (and loading a checkpoint) drains into
a host-side table, so that ``stats.per_step`` is the eager path's as long as the stats
are read at least every :data:`STEP_HISTORY` steps (steps overwritten before that are
left out, with a warning).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from ..compressors.topk import k_for
from ..core import _COMPUTE_DTYPE, Grace, Pending
from ..ops import DTYPE_ITEMSIZE
from ..transport.base import allgather_traffic, allreduce_traffic

#: compressors whose pipeline traces with a tensor step (tested against the eager
#: pipeline); others (methods from outside the registry) run in a ``tf.py_function``
GRAPH_COMPRESSORS = frozenset({
    "none", "fp16", "bf16", "topk", "randomk", "dgc", "powersgd", "qsgd", "terngrad", "signsgd", "efsignsgd",
    "onebit", "signum", "threshold", "natural", "natural_dithering", "stc", "sbc", "adaptive_threshold",
    "sidco", "chunk", "gtopk", "onebit_adam", "sketch",
})
#: memories whose state the graph path keeps in variables
GRAPH_MEMORIES = frozenset({"none", "residual", "signum_momentum", "dgc_momentum", "powersgd", "gtopk",
                            "onebit_adam"})
#: steps of per-step byte counts kept per tensor until ``method.stats`` reads them
#: (a ring of rows of five int64: 40 bytes a step)
STEP_HISTORY = 1024
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
        if cname == "onebit_adam" and compressor.bias_correction:
            try:  # the symbolic step looks Adam's bias corrections up in tables
                for beta, cap in ((compressor.beta1, None), (compressor.beta2, compressor.freeze_step)):
                    compressor.correction_table(beta, cap, "float64")
            except ValueError as err:
                return str(err)
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
            # row step % STEP_HISTORY: (step, dense, payload, sent, received); step -1: empty
            history = np.zeros((STEP_HISTORY, len(_STAT_FIELDS) + 1), np.int64)
            history[:, 0] = -1
            self.history = _variable(history, f"grace_bytes_by_step_{safe}")
        # the first step whose row the host has not read yet (see drain_history)
        self.unread = int(grace.steps.get(name, 0))
        self.safe = safe
        self.memory = memory  # the memory of the tensor's route from its schedule's horizon on
        # fields that hold, while the memory has no state, what its first step starts from
        # (PowerSGD's Q drawn for that step), by key: the draw for a step (see primed_fields)
        self.primed: dict[str, Any] = {}
        self.horizon = 0  # the tensor's first step past its schedule's horizon
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
        for r in [grace._main] + [r for _, r in grace.policies.overrides]:
            if getattr(type(r.memory), "missing_fields_are_zero", False):
                # every field from the start (zero until written), so that steps which
                # write different fields (1-bit Adam's warm-up keeps no errors) trace alike
                for key in r.memory.state_fields:
                    slot.field(key, np.zeros(numel, template.fields["dtype"]))
    slot.horizon = horizon
    with tf.init_scope():
        step0 = int(slot.step.numpy())

    compute_dtype = template.fields["dtype"]
    x = ops.flatten(tensor)
    if in_dtype != compute_dtype:
        x = ops.cast(x, compute_dtype)
    # the gradient as the caller's graph computed it: Grappler may not fold the method's
    # products with constants into those that made it (the eager pipeline gets it whole)
    x = ops.hold(x)
    step_t = slot.step.read_value()
    has_state = slot.has_state.read_value()

    def run(step: Any, state: dict[str, Any] | None, route: Any,
            step_range: tuple[int, int] | None = None) -> tuple[Any, Any, list[Any], Any]:
        memory = route.memory
        if state is None:
            memory.state.pop(name, None)
        else:
            memory.state[name] = state
        ctx = template.context(step, step_range)
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
        return flat, counts, values, tf.constant(len(written) > 0)

    def with_state(step: Any, route: Any, step_range: tuple[int, int] | None = None) -> Any:
        return lambda: run(step, {k: v.read_value() for k, v in slot.fields.items()}, route, step_range)

    stateful = bool(getattr(type(memory), "state_fields", True))

    def zero_fields(route: Any) -> bool:
        # a memory whose missing fields read as zeros has every field in a variable,
        # zero while it holds no state: every step reads them (no constant zeros that
        # Grappler would fold away, -0.0 signs and all)
        return bool(getattr(type(route.memory), "missing_fields_are_zero", False))

    def one_trace(step: Any, route: Any, step_range: tuple[int, int] | None = None) -> Any:
        # a memory whose first step is a steady step from filled fields (see
        # _ONE_TRACE_FILL): traced once, its fields read through the state flag
        fill = one_trace_fill(route.memory)
        if fill is None:
            return None

        def traced() -> Any:
            initial = one_trace_fields(route, template, shape, max(step0, horizon))
            for key, value in initial.items():
                slot.field(key, value)
            primed = primed_fields(route, template, shape)
            slot.primed.update(primed)
            return run(step, _OneTraceState(slot.fields, has_state, fill, frozenset(primed)), route, step_range)
        return traced

    def late() -> Any:
        if not stateful:
            return run(step_t, {}, route)
        if zero_fields(route):
            return with_state(step_t, route)()
        single = one_trace(step_t, route)
        if single is not None:
            return single()
        # a memory traced twice (gtopk's; methods from outside the registry): the first
        # step of this name traced with its int step, afterwards steady, with the step
        # tensor (also for a tensor whose memory keeps nothing).
        # tf.cond traces first first: it creates the field variables that steady reads
        first_step = max(step0, horizon)
        first = tf.logical_and(tf.logical_not(has_state), tf.equal(step_t, first_step))
        return tf.cond(first, lambda: run(first_step, None, route), with_state(step_t, route))

    def early(start: int, stop: int, route: Any, symbolic: bool) -> Any:
        # steps before the horizon: traced with the step tensor, which takes the steps of
        # [start, stop) (symbolic), or with the int start (the group's steps leave the
        # step out of their arithmetic); with state or without it as the memory has it
        step, step_range = (step_t, (start, stop)) if symbolic else (start, None)
        if not getattr(type(route.memory), "state_fields", True):
            return lambda: run(step, {}, route, step_range)
        if zero_fields(route):
            return with_state(step, route, step_range)
        single = one_trace(step, route, step_range)
        if single is not None:
            return single
        return lambda: tf.cond(has_state, with_state(step, route, step_range),
                               lambda: run(step, None, route, step_range))

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
                return early(*groups[0])()
            group_of = tf.constant(np.repeat(np.arange(len(groups)), [b - a for a, b, _, _ in groups]), tf.int32)
            return tf.switch_case(tf.gather(group_of, tf.minimum(step_t, horizon - 1)),
                                  [early(*group) for group in groups])

        flat, counts, values, wrote = tf.cond(step_t >= horizon, late, before)
    for variable, value in zip(slot.fields.values(), values):
        variable.assign(value)
    if slot.fields:
        slot.has_state.assign(wrote)
    slot.step.assign_add(1)
    slot.stats.assign_add(tf.concat([counts, tf.ones([1], tf.int64)], 0))
    row = tf.concat([tf.reshape(step_t, [1]), counts], 0)
    slot.history.scatter_nd_update(tf.reshape(step_t % slot.history.shape[0], [1, 1]), row[None])
    if in_dtype != compute_dtype:
        flat = ops.cast(flat, in_dtype)
    return tf.reshape(flat, shape)


#: memories whose first step gives the bits of a steady step from fields that read as
#: the fill (by registry name), so that the graph path traces them once instead of a
#: ``tf.cond`` between a first and a steady step (both of whose branches the executor
#: visits on every step). ``residual``: ``residual * beta + x * gamma`` and
#: ``residual + x`` from ``-0.0`` give ``x * gamma`` and ``x`` bitwise (``-0.0 * beta``
#: is ``-0.0`` for a finite ``beta >= 0``, and ``-0.0 + y`` is ``y`` for every ``y``,
#: zeros of both signs, NaN and Inf included). ``signum_momentum``: likewise
#: ``-0.0 * momentum + fresh``. ``dgc_momentum`` reads missing fields as ``+0.0`` zeros
#: in every formula, so ``+0.0``. ``powersgd``: its error as the residual's (``x +
#: error``), its ``Q`` read as stored (:func:`primed_fields`). An update that skips a
#: non-finite step keeps the stored field, which eagerly is ``+0.0`` zeros at the first
#: step: :class:`_OneTraceState` gives the fill only to the compensation's read.
_ONE_TRACE_FILL = {"residual": -0.0, "signum_momentum": -0.0, "dgc_momentum": 0.0, "powersgd": -0.0}


def one_trace_fill(memory: Any) -> float | None:
    """The fill from which ``memory``'s steady step gives its first step's bits (see
    :data:`_ONE_TRACE_FILL`), or None where the graph path must trace both steps."""
    fill = _ONE_TRACE_FILL.get(getattr(type(memory), "registry_name", ""))
    if fill is None:
        return None
    if type(memory).registry_name == "residual" and not math.isfinite(memory.beta):
        return None  # -0.0 * inf is NaN
    return fill


def one_trace_fields(route: Any, template: Any, shape: tuple[int, ...], first_step: int) -> dict[str, np.ndarray]:
    """The initial values of the fields that a memory traced once (see
    :data:`_ONE_TRACE_FILL`) keeps in variables for a tensor of ``shape``: every one of
    its ``state_fields`` as zeros, except for PowerSGD, which keeps only what it writes:
    its error (with error feedback) and its warm-start ``Q`` (with warm start), the
    latter holding the ``Q`` drawn for ``first_step`` (see :func:`primed_fields`),
    and nothing for a tensor that it always exchanges dense."""
    numel, dtype = template.fields["numel"], template.fields["dtype"]
    memory = route.memory
    if type(memory).registry_name != "powersgd":
        return {key: np.zeros(numel, dtype) for key in memory.state_fields}
    if route.compressor.plan(tuple(shape)) is None:
        return {}
    fields = {"error": np.zeros(numel, dtype)} if memory.error_feedback else {}
    fields.update({key: draw(first_step) for key, draw in primed_fields(route, template, shape).items()})
    return fields


def primed_fields(route: Any, template: Any, shape: tuple[int, ...]) -> dict[str, Any]:
    """The fields of a memory traced once whose variable holds, while the tensor has no
    state, what its first step starts from, read as stored whatever the state flag
    says: by key, a function of the step that gives that value. PowerSGD with warm
    start: ``"q"``, the initial ``Q`` drawn for the step on the host as eagerly
    (:meth:`~grace_dl.ops.Ops.reference_uniform`), so that its first step is a steady
    step from that ``Q`` (and a ``-0.0`` error), traced once with no draw in the graph."""
    from ..ops.numpy_backend import NumpyOps

    compressor = route.compressor
    if getattr(type(route.memory), "registry_name", "") != "powersgd" or not compressor.warm_start:
        return {}
    plan = compressor.plan(tuple(shape))
    if plan is None:
        return {}
    _, m, r = plan
    like = np.zeros(1, template.fields["dtype"])

    def draw(step: int) -> np.ndarray:
        return np.asarray(compressor._initial_q(NumpyOps(), like, template.context(int(step)), m, r))
    return {"q": draw}


class _OneTraceState(dict):
    """The state of one tensor for a step traced once for a memory's first and later
    steps: while the state flag is false (no state yet, or a checkpoint without it) a
    field's first read (the compensation's) gives ``fill`` and later reads (what a
    skipped update keeps) ``+0.0`` zeros, as eagerly; otherwise the stored field. What
    the memory writes this step is the dict's own items."""

    def __init__(self, fields: dict[str, tf.Variable], has_state: Any, fill: float,
                 primed: frozenset[str] = frozenset()):
        super().__init__()
        self._fields, self._has_state, self._fill, self._primed = fields, has_state, fill, primed
        self._read: set[str] = set()
        self._stored: dict[str, Any] = {}  # one read of each variable per step

    def __bool__(self) -> bool:
        return True  # state to read, whether or not the memory wrote some yet

    def get(self, key: str, default: Any = None) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        variable = self._fields.get(key)
        if variable is None:
            return default
        stored = self._stored.get(key)
        if stored is None:
            stored = self._stored[key] = variable.read_value()
        if key in self._primed:  # holds the first step's value while there is no state
            return stored
        fill = self._fill if key not in self._read else 0.0
        self._read.add(key)
        return tf.where(self._has_state, stored, tf.fill(tf.shape(stored), tf.constant(fill, stored.dtype)))


def _step_decision(compressor: Any, shape: tuple[int, ...], step: int) -> tuple[Any, bool]:
    """What a compressor decides in Python from ``step`` (part of the key of a group of
    early steps), and whether that step's pipeline leaves the step out of its arithmetic."""
    cname = getattr(compressor, "registry_name", "")
    numel = math.prod(shape)
    if cname == "dgc":
        if k_for(compressor.density(step), numel) >= numel:
            return ("dgc", "every element"), True  # the step decides nothing else
        # a warm-up step: the step tensor looks its counts up (DGC._counts_in_range)
        return ("dgc", step < compressor.warmup_horizon), False
    if cname == "powersgd":
        plan = compressor.plan(shape, step)
        return ("plan", plan), plan is None  # exchanged dense: the step is not used
    if cname == "onebit_adam":
        return ("frozen", compressor.frozen(step)), False  # the step enters the bias correction
    return None, False


def _schedule_horizon(compressor: Any) -> int:
    """The first step from which ``compressor`` decides nothing from the step in Python."""
    cname = getattr(compressor, "registry_name", "")
    if cname == "dgc":
        return compressor.warmup_horizon
    if cname == "powersgd":
        return compressor.start_iter
    if cname == "onebit_adam":
        return compressor.freeze_step
    return 0


def early_groups(grace: Grace, name: str, numel: int,
                 shape: tuple[int, ...]) -> tuple[int, list[tuple[int, int, Any, bool]]]:
    """``(horizon, groups)``: from step ``horizon`` on, tensor ``name`` takes one route
    and its pipeline decides nothing from the step in Python (it is traced once, with
    the step tensor). ``groups`` split the steps before it into ``(start, stop, route,
    symbolic)`` runs of steps that take one route and decide alike in Python: a run
    that leaves the step out of its arithmetic (exchanged dense, say) is traced with
    its int ``start`` (``symbolic`` False), any other run with the step tensor and
    ``TensorContext.step_range = (start, stop)`` (DGC's warm-up looks its counts up at
    the step: one trace for the whole warm-up, however long)."""
    policies = grace.policies
    routes = [grace._main] + [r for _, r in policies.overrides]
    horizon = max([policies.warmup_steps] + [_schedule_horizon(r.compressor) for r in routes])
    groups: list[tuple[int, int, Any, bool]] = []
    last = None
    for step in range(horizon):
        route = grace.route(name, numel, step)
        decision, step_free = _step_decision(route.compressor, shape, step)
        step_free = step_free or route is grace._dense
        key = (id(route), decision, step_free)
        if last == key:
            groups[-1] = (groups[-1][0], step + 1, route, not step_free)
        else:
            groups.append((step, step + 1, route, not step_free))
        last = key
    return horizon, groups


def _drive(grace: Grace, ops: Any, rounds: Any, pending: Pending, ctx: Any) -> Any:
    """Run a pipeline generator at trace time, its collectives as Horovod graph ops."""
    import horovod.tensorflow as hvd

    from .collectives import allgather
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
                # 4-byte items as int32, so that Horovod fuses the allgathers of a cycle (collectives.py)
                result, sizes = allgather(c.buf, name, _op_name(full + ".sizes"), size, c.equal_sizes, ps)
                if c.equal_sizes:
                    sent, received = allgather_traffic(mine, [mine] * size, ctx.rank, True)
                else:
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
    drain_history(grace)  # the steps run so far count under their old step numbers
    with tf.init_scope():
        for name, slot in table.items():
            memory = slot.memory
            slot.step.assign(grace.steps.get(name, 0))
            slot.unread = grace.steps.get(name, 0)
            loaded = memory.state.pop(name, None) or {}
            for key, value in loaded.items():
                variable = slot.field(key, np.asarray(value))
                variable.assign(np.asarray(value).reshape(variable.shape))
            for key, variable in slot.fields.items():
                if key in loaded:
                    continue
                if key in slot.primed:  # what the next step starts from without state
                    step = max(grace.steps.get(name, 0), slot.horizon)
                    variable.assign(slot.primed[key](step).reshape(variable.shape))
                else:  # not in the checkpoint: nothing of an earlier run stays
                    variable.assign(tf.zeros_like(variable))
            slot.has_state.assign(bool(loaded))


def drain_history(grace: Grace) -> dict[int, dict[str, int]]:
    """Move the per-step rows of the graph-path variables that the host has not read
    yet into ``grace``'s host-side per-step table, and return that table. Rows
    overwritten before being read (more than :data:`STEP_HISTORY` steps since the last
    read) are left out, with a warning."""
    import warnings

    per_step = grace.__dict__.setdefault("_graph_per_step", {})
    table = grace.__dict__.get("_graph_slots") or {}
    with tf.init_scope():
        for name, slot in table.items():
            now = int(slot.step.numpy())
            if now <= slot.unread:
                slot.unread = now
                continue
            rows = slot.history.numpy()
            capacity = len(rows)
            lost = 0
            for step in range(slot.unread, now):
                row = rows[step % capacity]
                if step < now - capacity or int(row[0]) != step:
                    lost += 1
                    continue
                counts = per_step.setdefault(step, {"dense": 0, "payload": 0, "sent": 0, "received": 0, "count": 0})
                for key, value in zip(_STAT_FIELDS, row[1:]):
                    counts[key] += int(value)
                counts["count"] += 1
            slot.unread = now
            if lost:
                warnings.warn(f"grace-dl: the per-step byte counts of {lost} steps of tensor {name!r} were "
                              f"overwritten before method.stats was read (the TF graph path keeps the last "
                              f"{capacity} steps of each tensor, grace_dl.tensorflow.graph.STEP_HISTORY); "
                              f"stats.per_step leaves them out, the totals count them", RuntimeWarning,
                              stacklevel=3)
    return per_step


def graph_stats(grace: Grace, stats: Any) -> Any:
    """``stats`` (the eager path's :class:`~grace_dl.core.TrafficStats`) plus the byte
    counts kept in the graph-path variables: totals, per tensor and per step (see
    :func:`drain_history`)."""
    from ..core import TrafficStats

    table = grace.__dict__.get("_graph_slots") or {}
    if not table:
        return stats
    merged = TrafficStats(stats.dense, stats.payload, stats.sent, stats.received, stats.tensors,
                          {k: dict(v) for k, v in stats.per_tensor.items()},
                          {k: dict(v) for k, v in stats.per_step.items()})
    for step, counts in drain_history(grace).items():
        row = merged.per_step.setdefault(step, {"dense": 0, "payload": 0, "sent": 0, "received": 0, "count": 0})
        for key, value in counts.items():
            row[key] += value
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
