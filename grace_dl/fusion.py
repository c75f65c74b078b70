"""Tensor fusion: small gradients merged into buckets, one pipeline per bucket.

A model's gradients are many tensors of very different sizes (ResNet-18: 62, of which 40
are batch-norm scales and shifts of a few hundred elements). Run one by one, each pays
the pipeline's fixed cost (a Python call chain, its own collectives, in Horovod its own
empty allreduce), which for small tensors dwarfs the work. Merging consecutive small
gradients into one flat buffer before compression pays that cost once per bucket, as
Horovod's tensor fusion, DDP's gradient buckets and MG-WFBP (Shi, Chu and Li,
"MG-WFBP: Efficient Data Communication for Distributed Synchronous SGD Algorithms",
INFOCOM 2019, which merges gradients to cut per-message start-up cost) do.

The bucket size is the policy ``fusion_bytes`` (:class:`~grace_dl.policies.Policies`):

* tensors are taken in the order the adapter gives (the order gradients become ready:
  reversed parameter order, as DDP assumes), and consecutive tensors of one input dtype
  are packed into a bucket until adding the next one would pass ``fusion_bytes``;
* a tensor of ``fusion_bytes`` or more, or a bucket that ends up with a single tensor,
  stays a tensor of its own, under its own name (so ``fusion_bytes=0`` is exactly the
  per-tensor pipeline);
* tensors a method needs in their own shape are never fused: a compressor says which
  through :meth:`~grace_dl.core.Compressor.fusable` (PowerSGD fuses only what it would
  send dense anyway, 1-D tensors and matrices too small to factor), and so are tensors
  that a policy routes apart (a name override, or fewer than ``min_numel`` elements).

A bucket is exchanged as one flat tensor under a name derived from its members
(:func:`bucket_name`): its state (residuals, momenta, step counter) is saved and restored
under that name, and its bytes are counted under it. A checkpoint saved with other
buckets (another ``fusion_bytes``, another model) then fails at the bucket's first use
with a message naming it (see :mod:`grace_dl.handshake`), and the handshake's tensor name
and shape, which are the bucket's, make every worker agree on the buckets before any
method collective runs. Methods are elementwise or whole-tensor, so on a bucket they act
as on one long tensor: top-k selects over the bucket (MG-WFBP's merged sparsification),
quantizers scale by the bucket's norm.

:class:`Fuser` is the one implementation; the simulator, the Horovod torch adapter, the
DDP hook and the Horovod TF adapter (graph path, :mod:`grace_dl.tensorflow.fusion`) all
plan their buckets with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

from .ops import DTYPE_ITEMSIZE, Array, get_ops

#: The default of ``Policies.fusion_bytes``: 0, every tensor on its own (the per-tensor
#: pipeline, bit for bit). Fusion is opt-in: see docs/bench.md for measured bucket sizes.
DEFAULT_FUSION_BYTES = 0


@dataclass(frozen=True)
class Bucket:
    """Several tensors exchanged as one flat tensor.

    Attributes:
        name: the bucket's name (:func:`bucket_name`), the key of its state and bytes.
        members: the member tensors' names, in the order they are concatenated.
        shapes: their shapes.
        offsets: where each starts in the flat bucket.
        numel: the bucket's element count.
        dtype: the input dtype shared by every member.
    """

    name: str
    members: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int
    dtype: str


def bucket_name(members: Sequence[str]) -> str:
    """The name of a bucket holding ``members`` (in order): readable (first and last
    member, count) and unique to the exact member list (a hash of every name)."""
    digest = hashlib.blake2b("\0".join(members).encode(), digest_size=4).hexdigest()
    return f"fused[{members[0]}..{members[-1]};{len(members)};{digest}]"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def plan_buckets(tensors: Sequence[tuple[str, tuple[int, ...], str]], fusion_bytes: int,
                 fusable: Any = None) -> list[Bucket]:
    """The buckets of ``tensors``; a pure function of its arguments, so every worker
    given the same list gets the same buckets.

    Args:
        tensors: ``(name, shape, input dtype)`` in the order gradients become ready.
        fusion_bytes: the largest bucket in bytes (of the input dtype); 0: no buckets.
        fusable: ``fusable(name, shape, dtype) -> bool``, whether a tensor may share a
            bucket (default: every tensor).

    Returns:
        Buckets of two or more tensors, in the order they close; tensors in none of
        them are exchanged on their own.
    """
    if isinstance(fusion_bytes, bool) or not isinstance(fusion_bytes, int) or fusion_bytes < 0:
        raise ValueError(f"fusion_bytes must be an int >= 0, got {fusion_bytes!r}")
    names = [t[0] for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tensor names must be distinct to be fused, {dup[0]!r} appears twice")
    if fusion_bytes == 0:
        return []
    buckets: list[Bucket] = []
    open_: dict[str, list[tuple[str, tuple[int, ...]]]] = {}  # dtype -> members so far
    sizes: dict[str, int] = {}

    def close(dtype: str) -> None:
        members = open_.pop(dtype, [])
        sizes.pop(dtype, None)
        if len(members) < 2:
            return
        offsets, total = [], 0
        for _, shape in members:
            offsets.append(total)
            total += _numel(shape)
        names_ = tuple(m[0] for m in members)
        buckets.append(Bucket(bucket_name(names_), names_, tuple(m[1] for m in members), tuple(offsets), total,
                              dtype))

    for name, shape, dtype in tensors:
        shape = tuple(int(d) for d in shape)
        nbytes = _numel(shape) * DTYPE_ITEMSIZE[dtype]
        if nbytes == 0 or nbytes >= fusion_bytes or (fusable is not None and not fusable(name, shape, dtype)):
            continue
        if sizes.get(dtype, 0) + nbytes > fusion_bytes:
            close(dtype)
        open_.setdefault(dtype, []).append((name, shape))
        sizes[dtype] = sizes.get(dtype, 0) + nbytes
    for dtype in list(open_):
        close(dtype)
    return buckets


class _Arrival:
    """One bucket in one step: the member tensors handed over so far, then its pipeline."""

    __slots__ = ("bucket", "parts", "pending", "result", "taken")

    def __init__(self, bucket: Bucket):
        self.bucket = bucket
        self.parts: dict[str, Array] = {}
        self.pending: Any = None
        self.result: Array | None = None
        self.taken = 0


@dataclass
class Ticket:
    """What :meth:`Fuser.start` returns for one tensor; give it to :meth:`Fuser.finish`.

    Attributes:
        name: the tensor's name.
        pending: its own pipeline (a :class:`~grace_dl.core.Pending`) when it is not
            fused, else None.
        arrival: its bucket's state in this step when it is fused, else None.
        opened: whether handing this tensor over started a pipeline (its own, or its
            bucket's as the last member).
        index: its position among its bucket's members.
    """

    name: str
    pending: Any = None
    arrival: Any = None
    opened: bool = False
    index: int = 0

    @property
    def started(self) -> Any:
        """The pipeline this tensor's result comes from (its own, or its bucket's; None
        while the bucket waits for other members)."""
        return self.pending if self.arrival is None else self.arrival.pending


class Fuser:
    """Runs named tensors through a :class:`~grace_dl.core.Grace`, fusing those that
    share a bucket (see the module docstring) into one pipeline.

    Call :meth:`plan` with every tensor of a step (same list on every worker), then per
    step :meth:`start` each tensor (in any order; a bucket's pipeline starts when its
    last member arrives, with the members in plan order) and :meth:`finish` each ticket.

    Args:
        grace: the method, bound to its transport.
    """

    def __init__(self, grace: Any):
        self.grace = grace
        self.buckets: list[Bucket] = []
        self._plan_key: Any = None
        self._member_of: dict[str, tuple[Bucket, int]] = {}  # name -> (its bucket, its index there)
        self._open: dict[str, _Arrival] = {}

    @property
    def fusion_bytes(self) -> int:
        """The bucket size of the method's policies."""
        return self.grace.policies.fusion_bytes

    def fusable(self, name: str, shape: tuple[int, ...], dtype: str) -> bool:
        """Whether tensor ``name`` may share a bucket: its compressor treats it as a flat
        vector, and no policy routes it apart (name override, ``min_numel``)."""
        policies = self.grace.policies
        if policies.override_for(name) is not None or _numel(shape) < policies.min_numel:
            return False
        return self.grace.compressor.fusable(shape)

    def plan(self, tensors: Sequence[tuple[str, tuple[int, ...], str]]) -> list[Bucket]:
        """Assign ``tensors`` (``(name, shape, input dtype)`` in ready order) to buckets
        (:func:`plan_buckets` with this method's ``fusion_bytes``); kept until called
        with another list. Returns the buckets."""
        key = (tuple((n, tuple(s), d) for n, s, d in tensors), self.fusion_bytes)
        if key != self._plan_key:
            if self._open:
                raise RuntimeError("cannot plan new buckets while buckets of this step are open")
            self.buckets = plan_buckets(key[0], self.fusion_bytes, self.fusable)
            self._member_of = {m: (b, i) for b in self.buckets for i, m in enumerate(b.members)}
            self._plan_key = key
        return self.buckets

    def bucket_of(self, name: str) -> Bucket | None:
        """The bucket of tensor ``name`` (None: it travels alone)."""
        found = self._member_of.get(name)
        return None if found is None else found[0]

    def start(self, tensor: Array, name: str) -> Ticket:
        """Hand over ``tensor``: started at once when it travels alone, else kept until
        the last member of its bucket arrives, which starts the bucket's pipeline."""
        found = self._member_of.get(name)
        if found is None:
            return Ticket(name, pending=self.grace.start(tensor, name), opened=True)
        bucket, index = found
        ops = get_ops(tensor)
        if tuple(ops.shape(tensor)) != bucket.shapes[index] or ops.dtype(tensor) != bucket.dtype:
            raise ValueError(f"tensor {name!r} has shape {tuple(ops.shape(tensor))} and dtype {ops.dtype(tensor)}, "
                             f"but its bucket {bucket.name!r} was planned for {bucket.shapes[index]} "
                             f"{bucket.dtype}: plan the buckets again with the new shapes")
        arrival = self._open.get(bucket.name)
        if arrival is None:
            arrival = self._open[bucket.name] = _Arrival(bucket)
        if name in arrival.parts:
            raise ValueError(f"tensor {name!r} was handed over twice in one step (bucket {bucket.name!r})")
        arrival.parts[name] = ops.flatten(tensor)
        if len(arrival.parts) == len(bucket.members):
            flat = ops.concat([arrival.parts[m] for m in bucket.members])
            arrival.parts = {}
            del self._open[bucket.name]
            arrival.pending = self.grace.start(flat, bucket.name)
            return Ticket(name, arrival=arrival, opened=True, index=index)
        return Ticket(name, arrival=arrival, index=index)

    def open_buckets(self) -> list[str]:
        """Names of the buckets still waiting for members in this step."""
        return list(self._open)

    def finish(self, ticket: Ticket) -> Array:
        """The aggregated tensor of ``ticket`` (its input's shape and dtype); the first
        member of a bucket to finish completes the bucket's pipeline."""
        arrival = ticket.arrival
        if arrival is None:
            return self.grace.finish(ticket.pending)
        bucket = arrival.bucket
        if arrival.pending is None:
            missing = [m for m in bucket.members if m not in arrival.parts]
            raise RuntimeError(f"tensor {ticket.name!r} is in bucket {bucket.name!r}, whose members "
                               f"{missing} were not handed over in this step; every tensor planned must "
                               f"be exchanged every step (or plan without them)")
        if arrival.result is None:
            arrival.result = self.grace.finish(arrival.pending)
        index = ticket.index
        start = bucket.offsets[index]
        shape = bucket.shapes[index]
        out = arrival.result[start:start + _numel(shape)]
        arrival.taken += 1
        if arrival.taken == len(bucket.members):
            arrival.result = None
        return get_ops(out).reshape(out, shape)

    def abandon(self) -> None:
        """Forget buckets of this step still waiting for members (after an error)."""
        self._open = {}
