"""The backend-neutral pipeline: Compressor, Memory, Communicator and Grace.

For each named tensor, one step is::

    compensate (memory) -> compress -> update memory -> exchange (communicator)
      -> decompress -> aggregate

:class:`Grace` runs that pipeline over any :class:`~grace_dl.transport.Transport`, in two
halves (:meth:`Grace.start` posts the exchange, :meth:`Grace.finish` completes it) so
that the exchange of one tensor overlaps the production of the next.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generator

import numpy as np

from .checks import announce_skipped_update
from .ops import DTYPE_ITEMSIZE, Array, Ops, get_ops
from .payload import Payload
from .transport.base import Transport, allgather_traffic, allreduce_traffic


def derive_key(*parts: Any) -> int:
    """A 64-bit random key from the given parts (seed, tensor name, rank ...), identical
    on every machine and Python process (unlike ``hash()``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class TensorContext:
    """What a compressor and a memory know about the tensor being processed.

    Attributes:
        name: the tensor's name (the key of all per-tensor state).
        shape: its original shape.
        numel: its element count.
        dtype: the compute dtype the pipeline hands to the compressor
            (``float32``, or ``float64`` for float64 input).
        in_dtype: the dtype of the tensor as the framework produced it.
        step: how many times this name went through the pipeline before.
        shared_key: random key identical on every worker (shared randomness).
        worker_key: random key distinct per worker (independent randomness).
        rank: this worker's rank.
        world_size: number of workers.
        scratch: a dict private to this tensor's pipeline in this step, in which the
            compressor, memory and communicator of one method may leave each other what
            the pipeline's flat-tensor arguments cannot carry (PowerSGD's agreed ``P``);
            never saved (state that outlives a step belongs in the memory).
        step_range: where ``step`` is a symbolic tensor (TensorFlow's graph path) that
            takes only the steps ``[start, stop)`` in this trace, that pair (a schedule,
            such as DGC's warm-up, then reads its values from a table); None otherwise:
            an int step, or a symbolic one from every schedule's horizon on.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    dtype: str
    in_dtype: str
    step: int
    shared_key: int
    worker_key: int
    rank: int
    world_size: int
    scratch: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    step_range: tuple[int, int] | None = None


class _ContextTemplate:
    """What :meth:`Grace.start` knows of a tensor name between steps: every
    :class:`TensorContext` field but ``step`` and ``scratch``, valid while the tensor's
    shape and dtype, the seed and the transport's rank and size stay the same."""

    __slots__ = ("valid_for", "fields", "dense_nbytes")

    def __init__(self, valid_for: tuple, fields: dict[str, Any], dense_nbytes: int):
        self.valid_for = valid_for
        self.fields = fields
        self.dense_nbytes = dense_nbytes

    def context(self, step: int, step_range: tuple[int, int] | None = None) -> TensorContext:
        """The context of this tensor at ``step`` (``step_range``: see
        :class:`TensorContext`), with a fresh ``scratch``. Fills the frozen dataclass's
        ``__dict__`` directly: its generated ``__init__`` (one ``object.__setattr__`` per
        field) costs ~4 us, a tenth of a small tensor's step."""
        ctx = object.__new__(TensorContext)
        ctx.__dict__.update(self.fields)
        ctx.__dict__["step"] = step
        ctx.__dict__["scratch"] = {}
        if step_range is not None:  # otherwise the class default, None
            ctx.__dict__["step_range"] = step_range
        return ctx


@dataclass
class Collective:
    """A collective that a method asks the pipeline to run.

    Methods that exchange more than one message (a size exchange before a broadcast,
    PowerSGD's two allreduces, a norm exchange before choosing chunks) are written as
    generators that ``yield`` a list of collectives and receive the list of their
    results; the pipeline posts them on the transport, counts their bytes and resumes the
    method when they complete. All workers yield the same collectives in the same order.

    Attributes:
        kind: ``"allreduce"`` (elementwise sum), ``"allgather"`` (the result is the list
            of every worker's buffer) or ``"broadcast"`` (the result is root's buffer).
        buf: this worker's 1-D buffer (for a broadcast off the root: any buffer of the
            root's length and dtype).
        tag: distinguishes the collectives of one tensor (part of the collective's name).
        root: the root of a broadcast.
        equal_sizes: for an allgather, whether every worker's buffer has the same length
            (otherwise the transport exchanges the sizes first, counted in the bytes).
        name: the collective's full name, replacing ``grace.<tensor name>.<tag>``
            (default empty: that one); for collectives that workers must meet in
            whatever their tensors are called (the first-use handshake).
    """

    kind: str
    buf: Array
    tag: str = ""
    root: int = 0
    equal_sizes: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("allreduce", "allgather", "broadcast"):
            raise ValueError(f"unknown collective kind {self.kind!r}; valid: allreduce, allgather, broadcast")


#: What a multi-round method yields and receives back; see :class:`Collective`.
Rounds = Generator[list[Collective], list[Any], Any]


def run_alone(rounds: Rounds, on_collective: Any = None) -> Any:
    """Run a multi-round method as the only worker: an allreduce returns the buffer, an
    allgather a one-element list, a broadcast the buffer. Lets such methods also offer a
    plain :meth:`Compressor.compress` for one worker and for tests.

    Args:
        rounds: the generator (e.g. ``compressor.compress_rounds(ops, x, ctx)``).
        on_collective: called with each :class:`Collective` the method asks for (e.g. to
            count its bytes); default none.
    """
    try:
        requests = next(rounds)
        while True:
            if on_collective is not None:
                for c in requests:
                    on_collective(c)
            requests = rounds.send([[c.buf] if c.kind == "allgather" else c.buf for c in requests])
    except StopIteration as done:
        return done.value


class Compressor(abc.ABC):
    """Turns a flat tensor into a :class:`Payload` and back.

    Class attributes state the method's contract (checked by the test suite):

    * ``summable``: payloads of several workers may be added elementwise (allreduce);
    * ``bias``: ``"unbiased"`` (E[decompress(compress(x))] = x), ``"contraction"``
      (``||x - C(x)||^2 <= (1 - delta) ||x||^2``) or ``"biased"``;
    * ``memory`` and ``communicator``: the registry names of the defaults it is meant for,
      and ``aggregate``: the communicator's default aggregation (``"majority"`` for
      sign methods);
    * ``deterministic``: same input gives the same payload (no random draws);
    * ``zero_preserving``: a zero tensor decompresses to zero (false for 1-bit signs,
      which cannot encode zero);
    * ``exact_across_backends``: a deterministic method gives bit-identical results on
      every backend and device (false where it relies on a framework kernel that adds
      in its own order, such as PowerSGD's matrix products; cross-backend tests then
      compare with a stated tolerance; one backend still agrees with itself bit for bit).
    """

    summable: ClassVar[bool] = False
    bias: ClassVar[str] = "unbiased"
    memory: ClassVar[str] = "none"
    communicator: ClassVar[str] = "allgather"
    aggregate: ClassVar[str] = "mean"
    deterministic: ClassVar[bool] = True
    zero_preserving: ClassVar[bool] = True
    exact_across_backends: ClassVar[bool] = True

    @abc.abstractmethod
    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        """Compress flat ``x`` (``ctx.dtype``, ``ctx.numel`` elements)."""

    @abc.abstractmethod
    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        """A flat dense ``ctx.dtype`` array of ``ctx.numel`` elements from a payload
        buffer (or, for summable methods, from the sum of several)."""

    def decompress_sum(self, ops: Ops, buffers: list[Array], sent: Array, ctx: TensorContext,
                       scale: float = 1.0) -> Array | None:
        """The sum, in rank order, of the decompressions of every worker's buffer of an
        allgather (``buffers``; this worker's own is ``sent``) times ``scale`` (the
        mean's factor; 1.0 for a sum), computed without decompressing each buffer into a
        dense array, or None where the compressor has no such shortcut (the default):
        the communicator then decompresses each buffer (:func:`decompress_all`) and adds
        the dense arrays. Used for the ``"mean"`` and ``"sum"`` aggregates; must equal
        ``(d0 + d1 + ...) * scale`` bit for bit, up to a sign of zero that the
        overriding method's docstring states."""
        return None

    def compress_rounds(self, ops: Ops, x: Array, ctx: TensorContext) -> Rounds:
        """Compress ``x`` where compression itself needs collectives (a generator, see
        :class:`Collective`); returns the :class:`Payload`. Bytes of these collectives
        count as payload. The default runs :meth:`compress` with no collective."""
        return self.compress(ops, x, ctx)
        yield  # pragma: no cover  (makes this a generator)

    def residual(self, ops: Ops, x: Array, payload: Payload, ctx: TensorContext) -> Array:
        """What error feedback keeps of ``x`` once this worker's own ``payload``
        (compressed from ``x`` in this step) is sent: ``x - decompress(payload)``, bit for
        bit. Sparse compressors override it to touch only the sent elements of a copy of
        ``x`` rather than decompressing and subtracting the whole tensor. The local
        decompression is noted in ``ctx.scratch`` (:func:`decompress_own`), so that the
        exchange does not decompress this worker's own payload a second time."""
        return x - decompress_own(self, ops, payload, ctx)

    def fusable(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of ``shape`` may be fused with others into one flat bucket
        (see :mod:`grace_dl.fusion`): true where compression never looks at the shape.
        Methods that do (PowerSGD's matrix view) answer true only for the shapes they
        treat as flat vectors at every step."""
        return True

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int | None:
        """The exact payload size for ``numel`` elements of compute dtype ``dtype``
        (input dtype ``in_dtype``, default the same), or None where it depends on the
        data (threshold methods)."""
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


#: the key in ``ctx.scratch`` of the array a memory's compensate made in this step (see note_fresh)
_FRESH_COMPENSATED = "fresh_compensated"


def note_fresh(ctx: TensorContext, compensated: Array) -> Array:
    """Note that ``compensated``, what a memory's ``compensate`` returns, is an array it
    made in this step that nothing else refers to (not the gradient, not its state), so
    that what it keeps after compression may be written into it (:func:`is_fresh`)
    instead of into a full-size copy. Returns ``compensated``."""
    ctx.scratch[_FRESH_COMPENSATED] = compensated
    return compensated


def is_fresh(ctx: TensorContext, x: Array) -> bool:
    """Whether ``x`` is the array :func:`note_fresh` noted in this step: used no more
    after the memory update, so the update may consume it (``consume=True`` of
    :meth:`~grace_dl.ops.Ops.index_subtract`)."""
    return ctx.scratch.get(_FRESH_COMPENSATED) is x


#: the key in ``ctx.scratch`` of this worker's decompressed own payload (see decompress_own)
_OWN_DECOMPRESSION = "own_decompression"


def decompress_own(compressor: Compressor, ops: Ops, payload: Payload, ctx: TensorContext) -> Array:
    """``compressor.decompress`` of this worker's own ``payload`` of this step, noted in
    ``ctx.scratch`` with the buffer it came from, for :func:`decompress_all`. The
    result is also handed to the exchange's aggregation, so it is noted only where
    nothing keeps it (the default :meth:`Compressor.residual` keeps ``x`` minus it)."""
    dense = compressor.decompress(ops, payload.buffer, ctx)
    ctx.scratch[_OWN_DECOMPRESSION] = (payload.buffer, dense)
    return dense


def decompress_all(compressor: Compressor, ops: Ops, buffers: list[Array], sent: Array,
                   ctx: TensorContext) -> list[Array]:
    """The decompression of every worker's buffer of an allgather (or of one broadcast
    per root), in rank order. This worker's own entry (rank ``ctx.rank``) is the buffer
    ``sent``, as every worker sent it, so where :func:`decompress_own` noted the
    decompression of ``sent`` in this step, that is taken instead of decompressing it
    again (the same bits: decompression is a function of the buffer and the context)."""
    noted = ctx.scratch.get(_OWN_DECOMPRESSION)
    own = noted[1] if noted is not None and noted[0] is sent else None
    return [own if own is not None and rank == ctx.rank else compressor.decompress(ops, b, ctx)
            for rank, b in enumerate(buffers)]


# memories that have announced a skipped update (see Memory._finite_update); a weak set,
# so that copies (fresh_copy) announce again and the memory itself carries no flag
_ANNOUNCED: "weakref.WeakSet[Memory]" = weakref.WeakSet()


class Memory(abc.ABC):
    """Per-tensor state that feeds back what compression dropped (error feedback).

    State is a dict ``{tensor name: {field: array}}``; :meth:`state_dict` gives it as
    NumPy arrays, so that it is saved and restored independently of the backend.
    """

    #: whether :meth:`update` needs the locally decompressed payload
    needs_transmitted: ClassVar[bool] = True

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    @abc.abstractmethod
    def compensate(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        """The tensor to compress, given the new gradient ``x``."""

    @abc.abstractmethod
    def update(self, ops: Ops, compensated: Array, transmitted: Array | None, ctx: TensorContext) -> None:
        """Record what was not sent: ``compensated`` minus the local decompression."""

    def update_from(self, ops: Ops, compensated: Array, payload: Payload, compressor: "Compressor",
                    ctx: TensorContext) -> None:
        """What the pipeline calls after compression: :meth:`update` with the local
        decompression of ``payload`` (or None where :attr:`needs_transmitted` is false).
        Memories that only need what was not sent override it to ask the compressor for
        :meth:`Compressor.residual`, which sparse methods compute without a dense
        decompression."""
        transmitted = compressor.decompress(ops, payload.buffer, ctx) if self.needs_transmitted else None
        self.update(ops, compensated, transmitted, ctx)

    def after_exchange(self, ops: Ops, aggregated: Array, ctx: TensorContext) -> None:
        """Called with the aggregated flat tensor once the exchange completes, for
        memories whose state depends on what all workers sent (PowerSGD's error is the
        local tensor minus the aggregated approximation). Default: nothing."""
        return None

    def _field(self, ops: Ops, name: str, key: str, like: Array) -> Array | None:
        """A state array as a backend array like ``like`` (state restored from a
        checkpoint is NumPy until first used)."""
        value = self.state.get(name, {}).get(key)
        if value is not None and not ops.owns(value):
            value = ops.cast(ops.from_numpy(np.asarray(value), like), ops.dtype(like))
            self.state[name][key] = value
        return value

    def _finite_update(self, ops: Ops, finite: Array, ctx: TensorContext, fields: str) -> bool | None:
        """Whether this step's new state of ``ctx.name`` is kept, as a Python bool where
        the on-device flag ``finite`` reads without a device sync (None elsewhere: the
        caller then picks on the device with :meth:`Ops.choose`). The first update that
        a NaN or Inf makes this memory skip is announced, once per memory object, with
        a :class:`~grace_dl.checks.NonFiniteWarning` naming the tensor and ``fields``."""
        if self in _ANNOUNCED:
            return None  # said once: leave the decision to the device
        keep = ops.read_flag(finite)
        if keep is False:
            _ANNOUNCED.add(self)
            announce_skipped_update(self, ctx, fields)
        return keep

    @staticmethod
    def _pick(ops: Ops, finite: Array, keep: bool | None, new: Array, previous: Array) -> Array:
        """``new`` where the update is kept, else ``previous`` (``keep`` as given by
        :meth:`_finite_update`; None decides on the device from ``finite``)."""
        if keep is None:
            return ops.choose(finite, new, previous)
        return new if keep else previous

    def state_dict(self) -> dict[str, dict[str, np.ndarray]]:
        """All per-tensor state as NumPy arrays."""
        return {
            name: {k: get_ops(v).to_numpy(v) for k, v in fields.items()}
            for name, fields in self.state.items()
        }

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Restore state saved by :meth:`state_dict`."""
        self.state = {name: {k: np.asarray(v) for k, v in fields.items()} for name, fields in state.items()}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "state" and not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class Communicator(abc.ABC):
    """Moves payloads between workers and aggregates the decompressed results."""

    #: whether the communicator sums payloads, so the compressor must be summable
    requires_summable: ClassVar[bool] = False

    def __init__(self, aggregate: str = "mean"):
        if aggregate not in ("mean", "sum", "majority"):
            raise ValueError(f"aggregate must be one of 'mean', 'sum', 'majority', got {aggregate!r}")
        self.aggregate = aggregate

    @abc.abstractmethod
    def exchange(self, ops: Ops, payload: Payload, compressor: Compressor, ctx: TensorContext) -> Rounds:
        """Exchange ``payload`` (a generator yielding :class:`Collective` lists, see
        there) and return the aggregated flat tensor."""

    def _combine_buffers(self, ops: Ops, compressor: Compressor, buffers: list[Array], sent: Array,
                         ctx: TensorContext) -> Array:
        """The aggregate of every worker's payload buffer (rank order; this worker's own
        is ``sent``): the compressor's :meth:`~Compressor.decompress_sum` where it has
        one and the aggregate is a sum or mean, else each buffer decompressed
        (:func:`decompress_all`) and combined."""
        if self.aggregate != "majority":
            scale = mean_factor(ctx.world_size) if self.aggregate == "mean" else 1.0
            total = compressor.decompress_sum(ops, buffers, sent, ctx, scale)
            if total is not None:
                return total
        # this worker's own part was decompressed already where the memory needed it
        return self._combine(ops, decompress_all(compressor, ops, buffers, sent, ctx), ctx.world_size)

    def _combine(self, ops: Ops, dense: list[Array], world_size: int) -> Array:
        total = dense[0]
        if self.aggregate == "majority":
            total = ops.sign(total)
            for d in dense[1:]:
                total = total + ops.sign(d)
            return ops.sign(total)
        for d in dense[1:]:
            total = total + d
        return total * mean_factor(world_size) if self.aggregate == "mean" else total

    def __repr__(self) -> str:
        return f"{type(self).__name__}(aggregate={self.aggregate!r})"


def mean_factor(world_size: int) -> float:
    """The factor that turns a sum over workers into a mean. Means multiply by ``1/N``
    rather than divide by ``N``: GPU kernels divide by a scalar that way, so every
    backend and device then rounds the same way."""
    return 1.0 / world_size


@dataclass
class TrafficStats:
    """Exact per-worker byte counts, per tensor and per step.

    ``dense`` is the uncompressed size of the tensors (in their input dtype),
    ``payload`` what this worker's compressor produced, ``sent``/``received`` what the
    collective moved under the byte model of :mod:`grace_dl.transport.base`.
    ``per_tensor`` breaks the totals down by tensor name, ``per_step`` by step (the
    step counter of each tensor: step ``s`` sums every tensor's ``s``-th exchange).
    """

    dense: int = 0
    payload: int = 0
    sent: int = 0
    received: int = 0
    tensors: int = 0
    per_tensor: dict[str, dict[str, int]] = field(default_factory=dict)
    per_step: dict[int, dict[str, int]] = field(default_factory=dict)

    def record(self, name: str, dense: int, payload: int, sent: int, received: int, step: int = 0) -> None:
        """Add one exchange of tensor ``name`` at its ``step``."""
        self.dense += dense
        self.payload += payload
        self.sent += sent
        self.received += received
        self.tensors += 1
        for table, key in ((self.per_tensor, name), (self.per_step, step)):
            t = table.setdefault(key, {"dense": 0, "payload": 0, "sent": 0, "received": 0, "count": 0})
            t["dense"] += dense
            t["payload"] += payload
            t["sent"] += sent
            t["received"] += received
            t["count"] += 1

    @property
    def compression_ratio(self) -> float:
        """Dense bytes over payload bytes (inf when nothing was sent)."""
        return self.dense / self.payload if self.payload else float("inf")

    def as_dict(self) -> dict[str, Any]:
        """Totals as a plain dict."""
        return {"dense_bytes": self.dense, "payload_bytes": self.payload, "sent_bytes": self.sent,
                "received_bytes": self.received, "tensors": self.tensors,
                "compression_ratio": self.compression_ratio}


@dataclass
class Pending:
    """A tensor whose pipeline was started by :meth:`Grace.start`: the suspended
    pipeline, the collectives it waits on, and its byte counts so far."""

    ops: Ops
    ctx: TensorContext
    in_dtype: str
    dense_nbytes: int
    rounds: Rounds | None = None
    requests: list[Collective] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    payload: int = 0
    sent: int = 0
    received: int = 0
    result: Array | None = None

    @property
    def done(self) -> bool:
        """Whether the aggregated result is ready."""
        return self.rounds is None


_COMPUTE_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}


class Grace:
    """One compression method: Memory + Compressor + Communicator over a transport.

    Args:
        compressor: the :class:`Compressor`.
        memory: the :class:`Memory` (error feedback); default: none.
        communicator: the :class:`Communicator`; default: allgather.
        seed: global seed of all random draws (default 0); with the tensor name and the
            step it determines every draw, so runs are reproducible.
        transport: where collectives go; can be bound later with :meth:`bind`.
        policies: a :class:`~grace_dl.policies.Policies` (tensors below a size or steps
            in a warm-up go dense; per-name overrides); default: none.
    """

    def __init__(self, compressor: Compressor, memory: Memory | None = None,
                 communicator: Communicator | None = None, *, seed: int = 0,
                 transport: Transport | None = None, policies: Any = None):
        from .communicators import Allgather
        from .memories import NoMemory
        from .policies import Policies, Route, dense_route

        self.compressor = compressor
        self.memory = memory if memory is not None else NoMemory()
        self.communicator = communicator if communicator is not None else Allgather()
        if self.communicator.requires_summable and not compressor.summable:
            raise ValueError(
                f"{type(compressor).__name__} payloads cannot be summed, so they cannot go over "
                f"{type(self.communicator).__name__}; use communicator='allgather' or 'broadcast'"
            )
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.transport = transport
        self.policies = policies if policies is not None else Policies()
        if self.policies.active and any(getattr(type(c), "returns_update", False)
                                        for c in [compressor] + [r.compressor for _, r in self.policies.overrides]):
            # a dense or other route hands back a gradient where the optimizer expects an update
            raise ValueError("a method that hands back an optimizer update (onebit_adam) takes no policies: "
                             "min_numel, warmup_steps and overrides would hand some tensors their averaged "
                             "gradient instead; onebit_adam has its own warm-up (freeze_step)")
        self._main = Route(self.compressor, self.memory, self.communicator, "main")
        self._dense = dense_route()
        self.steps: dict[str, int] = {}
        self.stats = TrafficStats()
        # tensor name -> what its context holds besides the step (see _ContextTemplate)
        self._templates: dict[str, _ContextTemplate] = {}

    # -- configuration ------------------------------------------------------------------
    def bind(self, transport: Transport) -> "Grace":
        """Use ``transport`` for collectives; returns self."""
        self.transport = transport
        return self

    def fresh_copy(self) -> "Grace":
        """An unbound copy with the same configuration and empty state."""
        clone = copy.copy(self)
        clone.compressor = copy.deepcopy(self.compressor)
        clone.memory = copy.deepcopy(self.memory)
        clone.memory.state = {}
        clone.communicator = copy.deepcopy(self.communicator)
        clone.policies = copy.deepcopy(self.policies)
        for _, route in clone.policies.overrides:
            route.memory.state = {}
        clone._main = type(self._main)(clone.compressor, clone.memory, clone.communicator, "main")
        clone._dense = copy.deepcopy(self._dense)
        clone.transport = None
        clone.steps = {}
        clone.stats = TrafficStats()
        clone._templates = {}
        return clone

    # -- the pipeline ---------------------------------------------------------------------
    def start(self, tensor: Array, name: str) -> Pending:
        """Compensate, compress, update memory and post the exchange of ``tensor``."""
        if self.transport is None:
            raise RuntimeError("Grace has no transport: call bind(transport) first")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        ops = get_ops(tensor)
        in_dtype = ops.dtype(tensor)
        if in_dtype not in _COMPUTE_DTYPE:
            raise TypeError(f"tensor {name!r} has dtype {in_dtype}; grace-dl compresses float16, "
                            f"bfloat16, float32 and float64 gradients")
        shape = ops.shape(tensor)
        transport = self.transport
        valid_for = (shape, in_dtype, self.seed, transport.rank, transport.size)
        template = self._templates.get(name)
        if template is None or template.valid_for != valid_for:  # first step of this name (or it changed)
            template = self._template(name, ops.numel(tensor), valid_for)
            self._templates[name] = template
        step = self.steps.get(name, 0)
        self.steps[name] = step + 1
        ctx = template.context(step)
        x = ops.flatten(tensor)
        if in_dtype != ctx.dtype:
            x = ops.cast(x, ctx.dtype)
        pending = Pending(ops, ctx, in_dtype, template.dense_nbytes)
        if ctx.numel == 0:
            # nothing to compress or send (every worker has the same empty shape): the
            # result is the empty tensor itself, without collectives or state
            pending.result = x
            return pending
        rounds = self._pipeline(ops, x, ctx, pending, self.route(name, ctx.numel, step))
        # the first use of a name starts with the workers' configuration handshake
        pending.rounds = _handshake.guard(self, ops, x, ctx, pending, rounds)
        self._resume(pending, None)
        return pending

    def _template(self, name: str, numel: int, valid_for: tuple) -> _ContextTemplate:
        """The context pieces of tensor ``name`` (its random keys hashed once, not per
        step); ``valid_for`` is (shape, input dtype, seed, rank, world size)."""
        shape, in_dtype, seed, rank, world_size = valid_for
        fields = dict(name=name, shape=shape, numel=numel, dtype=_COMPUTE_DTYPE[in_dtype], in_dtype=in_dtype,
                      shared_key=derive_key(seed, name), worker_key=derive_key(seed, name, rank), rank=rank,
                      world_size=world_size)
        return _ContextTemplate(valid_for, fields, numel * DTYPE_ITEMSIZE[in_dtype])

    def route(self, name: str, numel: int, step: int) -> Any:
        """The components (a :class:`~grace_dl.policies.Route`) that process tensor
        ``name`` of ``numel`` elements at ``step``, after the policies."""
        policies = self.policies
        if not policies.active:
            return self._main
        if policies.is_dense(numel, step):
            return self._dense
        return policies.override_for(name) or self._main

    def _pipeline(self, ops: Ops, x: Array, ctx: TensorContext, pending: Pending, route: Any) -> Rounds:
        compressor, memory = route.compressor, route.memory
        compensated = memory.compensate(ops, x, ctx)
        if type(compressor).compress_rounds is Compressor.compress_rounds:  # one round: no generators
            payload = compressor.compress(ops, compensated, ctx)
        else:
            payload = yield from _counting_payload(compressor.compress_rounds(ops, compensated, ctx), ops, pending)
        pending.payload += payload.nbytes
        memory.update_from(ops, compensated, payload, compressor, ctx)
        aggregated = yield from route.communicator.exchange(ops, payload, compressor, ctx)
        memory.after_exchange(ops, aggregated, ctx)
        return aggregated

    def _resume(self, pending: Pending, results: list[Any] | None) -> None:
        """Run the pipeline of ``pending`` up to its next collectives and post them (or
        to its end)."""
        try:
            requests = pending.rounds.send(results)
        except StopIteration as end:
            pending.rounds, pending.requests, pending.handles = None, [], []
            pending.result = end.value
            return
        transport = self.transport
        prefix = f"grace.{pending.ctx.name}"
        handles = []
        for c in requests:
            name = c.name or (f"{prefix}.{c.tag}" if c.tag else prefix)
            if c.kind == "allreduce":
                handles.append(transport.allreduce_async(c.buf, name))
            elif c.kind == "allgather":
                handles.append(transport.allgather_async(c.buf, name, equal_sizes=c.equal_sizes))
            else:
                handles.append(transport.broadcast_async(c.buf, c.root, name))
        pending.requests, pending.handles = list(requests), handles

    def advance(self, pending: Pending) -> bool:
        """Wait for the collectives ``pending`` is blocked on, then run it up to its next
        ones (or its end). Returns whether it is done. Every worker's collectives of
        that round must have been posted (the simulator advances workers in lockstep)."""
        if pending.done:
            return True
        ops, ctx = pending.ops, pending.ctx
        results = []
        for c, h in zip(pending.requests, pending.handles):
            result = self.transport.wait(h)
            mine = ops.numel(c.buf) * DTYPE_ITEMSIZE[ops.dtype(c.buf)]
            if c.kind == "allreduce":
                sent, received = allreduce_traffic(mine, ctx.world_size)
            elif c.kind == "allgather":
                sizes = ([mine] * ctx.world_size if c.equal_sizes
                         else [ops.numel(b) * DTYPE_ITEMSIZE[ops.dtype(b)] for b in result])
                sent, received = allgather_traffic(mine, sizes, ctx.rank, c.equal_sizes)
            else:
                root_nbytes = ops.numel(result) * DTYPE_ITEMSIZE[ops.dtype(result)]
                sent = (ctx.world_size - 1) * root_nbytes if c.root == ctx.rank else 0
                received = 0 if c.root == ctx.rank else root_nbytes
            pending.sent += sent
            pending.received += received
            results.append(result)
        self._resume(pending, results)
        return pending.done

    def finish(self, pending: Pending) -> Array:
        """Complete the pipeline of ``pending`` (wait, decompress, aggregate); the
        result has the input's shape and dtype."""
        while not self.advance(pending):
            pass
        ops, ctx = pending.ops, pending.ctx
        self.stats.record(ctx.name, pending.dense_nbytes, pending.payload, pending.sent, pending.received, ctx.step)
        flat = pending.result
        pending.result = None
        if pending.in_dtype != ctx.dtype:
            flat = ops.cast(flat, pending.in_dtype)
        return ops.reshape(flat, ctx.shape)

    def step(self, tensor: Array, name: str) -> Array:
        """:meth:`start` then :meth:`finish`."""
        return self.finish(self.start(tensor, name))

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Memory state and step counters, as NumPy arrays and ints."""
        state = {"steps": dict(self.steps), "memory": self.memory.state_dict()}
        if self.policies.overrides:
            state["overrides"] = {pattern: route.memory.state_dict() for pattern, route in self.policies.overrides}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. State of another method, or with NaN or
        Inf values, raises ValueError (see :func:`grace_dl.checks.check_state`); the tensor
        names are checked at their first use (see :mod:`grace_dl.handshake`)."""
        from .checks import check_state

        unknown = set(state) - {"steps", "memory", "overrides"}
        if unknown:
            raise KeyError(f"unknown keys in Grace state: {sorted(unknown)}")
        check_state(self, state)
        routes = dict(self.policies.overrides)
        saved = state.get("overrides", {})
        if set(saved) != set(routes):
            raise KeyError(f"state has overrides for {sorted(saved)}, this method has {sorted(routes)}")
        self.steps = {str(k): int(v) for k, v in state.get("steps", {}).items()}
        self.memory.load_state_dict(state.get("memory", {}))
        for pattern, memory_state in saved.items():
            routes[pattern].memory.load_state_dict(memory_state)
        _handshake.loaded(self)

    def __repr__(self) -> str:
        policies = f", policies={self.policies!r}" if self.policies.active else ""
        return f"Grace({self.compressor!r}, {self.memory!r}, {self.communicator!r}, seed={self.seed}{policies})"


def _counting_payload(rounds: Rounds, ops: Ops, pending: Pending) -> Rounds:
    """Pass a compressor's collectives through, adding this worker's buffers to the
    payload bytes of ``pending``."""
    try:
        requests = next(rounds)
        while True:
            pending.payload += sum(ops.numel(c.buf) * DTYPE_ITEMSIZE[ops.dtype(c.buf)] for c in requests)
            requests = rounds.send((yield requests))
    except StopIteration as done:
        return done.value


def traffic_for(kind: str, mine: int, all_nbytes: list[int] | None, rank: int, size: int,
                equal_sizes: bool) -> tuple[int, int]:
    """(sent, received) bytes of one exchange; see :mod:`grace_dl.transport.base`."""
    if kind == "allreduce":
        return allreduce_traffic(mine, size)
    return allgather_traffic(mine, all_nbytes or [mine] * size, rank, equal_sizes)


from . import handshake as _handshake  # noqa: E402  (it builds on the classes above)
