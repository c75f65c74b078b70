"""The first-use handshake: every worker checks that the others run the same configuration.

Workers that disagree on the method, its parameters, the seed or the tensors would
otherwise fail far from the cause (an index out of bounds on one rank, a split of the
wrong size on another), hang (a collective that one rank never posts), or, worst, train
on silently different replicas (randomk with a different seed per rank).

So the first time a :class:`~grace_dl.core.Grace` object processes a tensor name, its
pipeline starts with one extra collective: an allgather of the tensor's
*fingerprint*, a fixed-size array of 64-bit hashes, one per field of :data:`FIELDS`
(the grace-dl version, the world size, the tensor's name, shape and dtype, its step
counter, the compressor, memory and communicator with their parameters, the policies
and the seed). Every worker receives every worker's fingerprint and compares them; a
difference raises :class:`HandshakeError` on every worker, naming the tensor (and its
position among the tensors of the first step) and the first differing field, before any
of the method's own collectives is posted. The step counter is part of the fingerprint,
so a worker that resumed from another checkpoint (or none) is caught as well.

The collective is named after the tensor's position (``grace.handshake.<k>.<i>`` for the
``i``-th tensor of the ``k``-th method object of the process), not its name, so that
workers whose tensors have different names still meet in it. Its bytes
(``8 * len(FIELDS)`` per worker and tensor, once) are not counted in
:class:`~grace_dl.core.TrafficStats`, which reports what the method sends. Single-worker
runs and empty tensors skip it; ``grace.handshake = False`` turns it off.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import numpy as np

from .core import Collective, Grace, Pending, Rounds, TensorContext
from .ops import DTYPE_ITEMSIZE, Array, Ops
from .transport.base import allgather_traffic

#: the fields of a fingerprint, in the order they are compared (the first differing one is reported)
FIELDS = ("grace-dl version", "world size", "tensor name", "shape", "dtype", "step", "compressor", "memory",
          "communicator", "policies", "seed")


class HandshakeError(RuntimeError):
    """Workers disagree on the configuration of a tensor (see :mod:`grace_dl.handshake`)."""


# per Grace object: the tensor names it has checked (a weak map, so that Grace itself
# carries no handshake state and fresh copies start unchecked)
_CHECKED: "weakref.WeakKeyDictionary[Grace, dict[str, int]]" = weakref.WeakKeyDictionary()
# per Grace object: the tensor names of the checkpoint last loaded into it
_LOADED: "weakref.WeakKeyDictionary[Grace, set[str]]" = weakref.WeakKeyDictionary()
# per Grace object: its ordinal among the method objects of its rank that ran a handshake
_ORDINAL: "weakref.WeakKeyDictionary[Grace, int]" = weakref.WeakKeyDictionary()
# per world (a simulator's, or a transport class for real processes): rank -> ordinals given
_GIVEN: "weakref.WeakKeyDictionary[Any, dict[int, int]]" = weakref.WeakKeyDictionary()


def _ordinal(grace: Grace) -> int:
    """The number of method objects of this rank (in this world) that ran a handshake
    before ``grace``: the same on every rank when the ranks run the same code, and distinct
    per object, so that two objects' handshakes never share a collective name (Horovod
    refuses a name that is still in flight)."""
    ordinal = _ORDINAL.get(grace)
    if ordinal is None:
        transport = grace.transport
        world = getattr(transport, "world", None) or type(transport)
        given = _GIVEN.setdefault(world, {})
        ordinal = _ORDINAL[grace] = given.get(transport.rank, 0)
        given[transport.rank] = ordinal + 1
    return ordinal


_PLAIN = (bool, int, float, str, type(None), tuple)


def describe(component: Any) -> str:
    """``Class(param=value, ...)`` from a component's public, plain-valued attributes (its
    parameters; not its state, nor functions attached to it, such as profiling wrappers)."""
    params = sorted((k, v) for k, v in vars(component).items()
                    if not k.startswith("_") and k != "state" and isinstance(v, _PLAIN))
    return f"{type(component).__name__}({', '.join(f'{k}={v!r}' for k, v in params)})"


def _describe_policies(policies: Any) -> str:
    fusion = f"fusion_bytes={policies.fusion_bytes}"
    if not policies.active:
        return fusion if policies.fusion_bytes else "none"
    overrides = "; ".join(f"{pattern}: {describe(r.compressor)} {describe(r.memory)} {describe(r.communicator)}"
                          for pattern, r in policies.overrides)
    return (f"min_numel={policies.min_numel}, warmup_steps={policies.warmup_steps}, overrides=[{overrides}], "
            f"{fusion}")


def fingerprint_fields(grace: Grace, ctx: TensorContext, in_dtype: str) -> dict[str, str]:
    """The fields of the fingerprint of tensor ``ctx.name`` (see :data:`FIELDS`), as text."""
    from . import __version__

    return {
        "grace-dl version": __version__,
        "world size": str(ctx.world_size),
        "tensor name": ctx.name,
        "shape": str(tuple(ctx.shape)),
        "dtype": in_dtype,
        "step": str(ctx.step),
        "compressor": describe(grace.compressor),
        "memory": describe(grace.memory),
        "communicator": describe(grace.communicator),
        "policies": _describe_policies(grace.policies),
        "seed": str(grace.seed),
    }


def fingerprint(fields: dict[str, str]) -> np.ndarray:
    """One 63-bit hash per field, as int64 (identical on every machine and process)."""
    return np.array([int.from_bytes(hashlib.blake2b(fields[f].encode(), digest_size=8).digest(), "little") >> 1
                     for f in FIELDS], dtype=np.int64)


def guard(grace: Grace, ops: Ops, x: Array, ctx: TensorContext, pending: Pending, rounds: Rounds) -> Rounds:
    """``rounds`` (the pipeline of one tensor), preceded by the handshake when ``grace``
    processes ``ctx.name`` for the first time on more than one worker. At that first use
    a tensor must also fit the state loaded from a checkpoint, if any."""
    checked = _CHECKED.get(grace)
    if checked is None:
        checked = _CHECKED[grace] = {}
    if ctx.name in checked:
        return rounds
    position = checked[ctx.name] = len(checked)
    loaded = _LOADED.get(grace)
    if loaded:
        _check_against_checkpoint(grace, ctx, loaded)
    if ctx.world_size == 1 or not getattr(grace, "handshake", True):
        return rounds
    return _handshake_then(grace, ops, x, ctx, pending, rounds, position)


def loaded(grace: Grace) -> None:
    """Called when state is loaded into ``grace`` (a resume): the handshake runs again at
    each tensor's next use, and each tensor must then be one the checkpoint has state for."""
    _CHECKED.pop(grace, None)
    _LOADED[grace] = set(grace.steps)


def _check_against_checkpoint(grace: Grace, ctx: TensorContext, names: set[str]) -> None:
    if ctx.name not in names:
        listed = ", ".join(repr(n) for n in sorted(names)[:6]) + (", ..." if len(names) > 6 else "")
        raise ValueError(f"tensor {ctx.name!r} has no state in the checkpoint loaded into this method (it has "
                         f"{listed}): it was saved from another model, or under other tensor names")
    memory = grace.memory
    sized = getattr(type(memory), "tensor_sized_fields", getattr(type(memory), "state_fields", ()))
    for key, value in memory.state.get(ctx.name, {}).items():
        if key not in sized:
            continue
        size = int(np.prod(np.shape(value)))
        if size != ctx.numel:
            raise ValueError(f"tensor {ctx.name!r} has {ctx.numel} elements but its {key} in the loaded "
                             f"checkpoint has {size}: the model changed since the checkpoint was saved")


def _handshake_then(grace: Grace, ops: Ops, x: Array, ctx: TensorContext, pending: Pending, rounds: Rounds,
                    position: int) -> Rounds:
    fields = fingerprint_fields(grace, ctx, pending.in_dtype)
    mine = fingerprint(fields)
    buf = ops.from_numpy(mine, x)
    # named after the tensor's position, so that workers whose tensors have other names still meet here
    name = f"grace.handshake.{_ordinal(grace)}.{position}"
    (gathered,) = yield [Collective("allgather", buf, equal_sizes=True, name=name)]
    # the handshake is not the method's traffic: take its bytes back out of the counts
    nbytes = len(FIELDS) * DTYPE_ITEMSIZE["int64"]
    sent, received = allgather_traffic(nbytes, [nbytes] * ctx.world_size, ctx.rank, True)
    pending.sent -= sent
    pending.received -= received
    everyone = [np.asarray(ops.to_numpy(g)).reshape(-1) for g in gathered]
    for rank, theirs in enumerate(everyone):
        if theirs.shape != mine.shape or not np.array_equal(theirs, mine):
            raise HandshakeError(_describe(ctx, position, fields, mine, rank, theirs))
    return (yield from rounds)


def _describe(ctx: TensorContext, position: int, fields: dict[str, str], mine: np.ndarray, rank: int,
              theirs: np.ndarray) -> str:
    if theirs.shape != mine.shape:
        field = "grace-dl version"
    else:
        field = FIELDS[int(np.flatnonzero(theirs != mine)[0])]
    return (f"workers disagree on tensor {ctx.name!r} (tensor #{position} of this worker): its {field} differs "
            f"between rank {ctx.rank} and rank {rank}; rank {ctx.rank} has {field} = {fields[field]}. Every "
            f"worker must run the same method, parameters, seed and model (and resume from the same "
            f"checkpoint)")
