"""grace-dl collectives over stock ``horovod.tensorflow``.

Horovod's TensorFlow ops have no asynchronous form: eagerly, each call returns once the
collective is done (inside ``tf.function`` the graph's executor overlaps them). The
``*_async`` methods therefore run the collective at once and the handle holds the
result. The consequence is that, eagerly, every worker must issue its collectives in the
same order (which :class:`~grace_dl.core.Grace` does when the workers run the same code),
since a worker blocked on one name cannot post the next.
"""

from __future__ import annotations

import re
from typing import Any

import tensorflow as tf

from ..core import derive_key
from ..transport.base import Transport, horovod_membership


def _op_name(name: str) -> str:
    """A Horovod/TF-safe collective name for ``name``.

    Horovod replaces every character outside ``[A-Za-z0-9_]`` by ``_``, so distinct
    names (``a.b`` and ``a_b``) could collide; a short hash of the original keeps them
    apart, identically on every worker.
    """
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return f"{safe}_{derive_key(name) & 0xFFFFFFFF:08x}"


class HorovodTFTransport(Transport):
    """grace-dl collectives over ``horovod.tensorflow`` (initialised by the caller).

    Args:
        process_set: a Horovod process set to run the collectives in (default: all
            processes).
    """

    def __init__(self, process_set: Any = None):
        import horovod.tensorflow as hvd  # only when used: importing horovod is slow

        self.hvd = hvd
        self._ps, self.rank, self.size = horovod_membership(hvd, process_set)

    def allreduce_async(self, buf: Any, name: str) -> Any:
        """Sum ``buf`` over all workers; the handle is the result."""
        return ("done", self.hvd.allreduce(buf, op=self.hvd.Sum, name=_op_name(name), **self._ps))

    def allgather_async(self, buf: Any, name: str, equal_sizes: bool = False) -> Any:
        """Gather every worker's 1-D ``buf``; :meth:`wait` gives them in rank order."""
        flat = tf.reshape(buf, [-1])
        data = self.hvd.allgather(flat, name=_op_name(name), **self._ps)
        if equal_sizes:
            return ("split", data, None)
        # lengths may differ: exchange them, so that the concatenation can be cut apart
        count = tf.reshape(tf.size(flat, out_type=tf.int64), [1])
        sizes = self.hvd.allgather(count, name=_op_name(name + ".sizes"), **self._ps)
        return ("split", data, sizes)

    def broadcast_async(self, buf: Any, root: int, name: str) -> Any:
        """Send root's ``buf`` to every worker; the handle is the result."""
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} outside 0..{self.size - 1}")
        return ("done", self.hvd.broadcast(buf, root_rank=root, name=_op_name(name), **self._ps))

    def wait(self, handle: Any) -> Any:
        """The result of a collective started by one of the ``*_async`` methods."""
        kind, result, *rest = handle
        if kind == "done":
            return result
        sizes = rest[0]
        if sizes is None:
            return tf.split(result, self.size, axis=0)
        return tf.split(result, tf.cast(sizes, tf.int64), num=self.size, axis=0)
