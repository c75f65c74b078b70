"""Horovod TF graph collectives of the graph path (:mod:`grace_dl.tensorflow.graph`).

Allgathers of 4-byte dtypes travel as int32. Horovod fuses the collectives that are
ready in the same negotiation cycle into one call only when they have the same dtype: a
float32 payload beside int32 ones, or an allgather of data-dependent size with its int64
size exchange (DGC's packed int32 payload), made one Gloo call per dtype, one after
another, each a round trip in which one rank waits for the other. Viewed as int32
(``tf.bitcast``: no copy, the same bits and the same bytes on the wire), the allgathers
of a cycle fuse into one; a size travels as two int32. Other dtypes go as they are: a bitcast that changes the item size
followed by the method's own bitcast is folded into one by Grappler's arithmetic
optimizer, which then fails on the shape (uint8 -> int32 -> bfloat16 becomes
uint8 -> bfloat16 of the wrong last dimension). Allreduces keep their dtype: they add.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

#: the dtype 4-byte allgathers travel as
WIRE = tf.int32


def to_wire(flat: Any) -> Any:
    """The 1-D tensor ``flat`` as sent: viewed as :data:`WIRE` when its items are 4
    bytes, else unchanged."""
    if flat.dtype.size == 4 and flat.dtype != WIRE:
        return tf.bitcast(flat, WIRE)
    return flat


def from_wire(data: Any, dtype: Any) -> Any:
    """Undo :func:`to_wire`: ``data`` read as ``dtype``."""
    if data.dtype != dtype:
        return tf.bitcast(data, dtype)
    return data


def allgather(buf: Any, name: str, sizes_name: str, world_size: int, equal_sizes: bool,
              process_set: dict[str, Any]) -> tuple[list[Any], Any]:
    """Every worker's 1-D piece of an allgather of ``buf`` (flattened), in rank order,
    as Horovod TF graph ops (4-byte items sent as int32: see the module docstring).

    Args:
        buf: this worker's buffer (any shape; gathered flat).
        name: the Horovod name of the data's allgather (the same on every worker).
        sizes_name: the Horovod name of the size exchange (used when ``equal_sizes`` is False).
        world_size: the number of workers.
        equal_sizes: whether every worker's ``buf`` has the same length (then no size
            exchange; a static length gives each piece its static shape).
        process_set: keyword arguments for Horovod's collectives (``process_set=``).

    Returns:
        ``(pieces, counts)``: the pieces in ``buf``'s dtype, and the int64 tensor of
        every worker's length (None for equal sizes).
    """
    import horovod.tensorflow as hvd

    flat = tf.reshape(buf, [-1])
    dtype = flat.dtype
    data = hvd.allgather(to_wire(flat), name=name, **process_set)
    if equal_sizes:
        n = flat.shape.num_elements()
        # a static length gives each worker's piece its static shape
        rows = tf.unstack(tf.reshape(data, [world_size, n])) if n is not None else tf.split(data, world_size, axis=0)
        return [from_wire(row, dtype) for row in rows], None
    # the length as two int32 (it fuses with int32 data); the items keep their size
    count = tf.reshape(tf.bitcast(tf.size(flat, out_type=tf.int64), WIRE), [2])
    halves = hvd.allgather(count, name=sizes_name, **process_set)
    counts = tf.bitcast(tf.reshape(halves, [world_size, 2]), tf.int64)
    rows = tf.split(data, counts, num=world_size, axis=0)
    return [from_wire(row, dtype) for row in rows], counts
