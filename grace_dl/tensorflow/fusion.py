"""Tensor fusion on the graph path of :class:`~grace_dl.tensorflow.HorovodTFGrace`.

The buckets are those of :mod:`grace_dl.fusion` (the same :class:`~grace_dl.fusion.Fuser`
plan as the simulator and the torch adapters: the gradients in ready order, which is
the reversed order of the variables, packed up to the policy ``fusion_bytes``; tensors a
compressor needs in their own shape, or that a policy routes apart, stay alone). A
bucket is one flat tensor, the concatenation of its members in plan order, traced
through :func:`grace_dl.tensorflow.graph.trace_step` under the bucket's name: its state
(step counter, memory fields) lives in ``tf.Variable``s named after the bucket, its bytes
are counted under that name, and the first-use handshake compares the bucket's name and
size across workers, as for a tensor.

Horovod hands the gradients to ``compress`` one by one, each inside its own ``tf.cond``
branch. The first member of a bucket that arrives traces the whole bucket into the graph
that holds the gradients (the step's ``tf.function``, outside the branches), from the
gradient list of Horovod's ``allreduce_grads``; each member's branch then takes its slice
of the bucket's result. On one worker Horovod does not exchange (its ``tf.cond`` hands
the gradient back), and each tensor is traced alone, as without fusion.

:func:`fused_graph_step` runs the same code on a mapping of gradients, inside any
``tf.function`` (what the tests compare with the fused simulator).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import tensorflow as tf

from ..core import Grace
from ..fusion import Bucket, Fuser


class _GraphFusion:
    """The fusion plan of one method and the buckets traced into the graph being built."""

    def __init__(self, grace: Grace):
        self.grace = grace
        self.fuser = Fuser(grace)
        self.graph: Any = None
        self.traced: dict[Any, tuple[list[Any], Any]] = {}  # (bucket, member ids) -> (members, flat result)


def _fusion(grace: Grace) -> _GraphFusion:
    found = grace.__dict__.get("_graph_fusion")
    if found is None or found.grace is not grace:  # a fresh_copy shares the attribute: rebuild it
        found = grace.__dict__["_graph_fusion"] = _GraphFusion(grace)
    return found


def _plan(grace: Grace, ready: Sequence[tuple[str, Any]]) -> Fuser:
    """The method's :class:`Fuser`, planned for ``ready`` (``(name, tensor)`` in ready order)."""
    from . import TFOps

    ops = TFOps()
    tensors = []
    for name, tensor in ready:
        if not tensor.shape.is_fully_defined():
            raise ValueError(f"gradient {name!r} has shape {tensor.shape}, not fully known when the step is traced; "
                             f"tensor fusion (policies.fusion_bytes) plans its buckets from static shapes: "
                             f"set fusion_bytes=0 for this model")
        tensors.append((name, tuple(tensor.shape.as_list()), ops.dtype(tensor)))
    fuser = _fusion(grace).fuser
    fuser.plan(tensors)
    return fuser


def _bucket_output(grace: Grace, bucket: Bucket, tensors: Mapping[str, Any]) -> Any:
    """The aggregated flat bucket, traced once per step into the graph of its members."""
    from . import TFOps
    from .graph import trace_step

    state = _fusion(grace)
    members = [tensors[m] for m in bucket.members]
    graph = members[0].graph
    if state.graph is not graph:  # a new trace: what was traced for another graph is of no use
        state.graph, state.traced = graph, {}
    key = (bucket.name, tuple(id(t) for t in members))
    found = state.traced.get(key)
    if found is None:
        ops = TFOps()
        with graph.as_default():  # outside the tf.cond branch that asked: every member's branch reads it
            flat = trace_step(grace, ops.concat([ops.flatten(t) for t in members]), bucket.name)
        found = state.traced[key] = (members, flat)  # the members kept alive: their ids stay theirs
    return found[1]


def _member(bucket: Bucket, flat: Any, name: str) -> Any:
    index = bucket.members.index(name)
    start, shape = bucket.offsets[index], bucket.shapes[index]
    numel = 1
    for d in shape:
        numel *= d
    return tf.reshape(flat[start:start + numel], shape)


@tf.autograph.experimental.do_not_convert
def fused_graph_step(grace: Grace, grads: Mapping[str, Any]) -> dict[str, Any]:
    """The aggregated gradients of one step, fused by ``grace.policies.fusion_bytes``
    and traced into the ``tf.function`` being built.

    Args:
        grace: a method on the graph path, bound to a
            :class:`~grace_dl.tensorflow.HorovodTFTransport`.
        grads: every gradient of the step by name, in the order they become ready (as
            :meth:`grace_dl.LocalSimulator.step` takes them); the same names and shapes
            at every step and on every worker.

    Returns:
        The aggregated tensors by name (each its input's shape and dtype).
    """
    from .graph import trace_step

    fuser = _plan(grace, list(grads.items()))
    out = {}
    for name, tensor in grads.items():
        bucket = fuser.bucket_of(name)
        out[name] = (trace_step(grace, tensor, name) if bucket is None
                     else _member(bucket, _bucket_output(grace, bucket, grads), name))
    return out


def check_fusion_path(grace: Any) -> None:
    """Raise ValueError where ``grace`` with ``fusion_bytes > 0`` cannot fuse under
    Horovod TF (eagerly, or on the ``tf.py_function`` path): unfused, its results would
    differ from the fused simulator's without a word."""
    from .graph import graph_path_blocker

    fusion_bytes = grace.policies.fusion_bytes
    if tf.executing_eagerly():
        raise ValueError(f"policies.fusion_bytes={fusion_bytes}: under Horovod TF, tensor fusion runs where "
                         f"Horovod traces its allreduce (DistributedGradientTape, the Keras DistributedOptimizer), "
                         f"not in an eager call of compress; set fusion_bytes=0")
    blocker = graph_path_blocker(grace)
    if blocker is not None:
        raise ValueError(f"policies.fusion_bytes={fusion_bytes}: under Horovod TF, tensor fusion runs on the graph "
                         f"path, which this method cannot take ({blocker}); set fusion_bytes=0")


def _horovod_gradients() -> list[tuple[str, Any]]:
    """``(name, gradient)`` of every gradient Horovod's ``allreduce_grads`` exchanges
    through ``compress`` (dense, not None), in ready order (the variables reversed)."""
    from .horovod import _allreduce_grads_locals, _variable_names

    found = _allreduce_grads_locals(2)
    if found is not None:
        grads, variables = found
        names = (_variable_names(list(variables)) if variables is not None and len(variables) >= len(grads)
                 else [f"grad_{i}" for i in range(len(grads))])
        return [(names[i], g) for i, g in reversed(list(enumerate(grads)))
                if g is not None and not isinstance(g, tf.IndexedSlices)]
    raise RuntimeError("tensor fusion under Horovod TF reads the step's gradients from Horovod's allreduce_grads, "
                       "which is not on the stack: use hvd.DistributedGradientTape or the Keras DistributedOptimizer")


def fused_compress(grace: Any, tensor: Any, name: str) -> Any:
    """The aggregated gradient ``name`` for Horovod's ``compress`` (``tensor`` is its
    gradient inside Horovod's ``tf.cond`` branch): its slice of its bucket, or the
    tensor traced alone when it is in no bucket."""
    from .graph import trace_step

    if grace.transport.size == 1:  # Horovod's tf.cond hands the gradient back: nothing is exchanged
        return trace_step(grace, tensor, name)
    ready = _horovod_gradients()
    fuser = _plan(grace, ready)
    bucket = fuser.bucket_of(name)
    if bucket is None:
        return trace_step(grace, tensor, name)
    return _member(bucket, _bucket_output(grace, bucket, dict(ready)), name)
