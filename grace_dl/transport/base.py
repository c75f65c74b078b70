"""The transport protocol: the collectives that communicators use.

A transport moves flat arrays between the workers of one job. Every call is
non-blocking and returns a handle; :meth:`Transport.wait` completes it. Every worker must
issue every collective name. The simulator and Horovod's torch ops match them by name;
MPI matches by order and Horovod's eager TF ops block, so portable code issues them in
the same order on every worker, as the pipeline does when workers run the same code.
"""

from __future__ import annotations

import abc
from typing import Any

from ..ops import Array


class Transport(abc.ABC):
    """Collectives over ``size`` workers, seen from worker ``rank``."""

    rank: int = 0
    size: int = 1

    @abc.abstractmethod
    def allreduce_async(self, buf: Array, name: str) -> Any:
        """Start an elementwise sum of ``buf`` over all workers (same shape everywhere)."""

    @abc.abstractmethod
    def allgather_async(self, buf: Array, name: str, equal_sizes: bool = False) -> Any:
        """Start gathering every worker's 1-D ``buf``; lengths may differ per worker
        unless ``equal_sizes`` promises they do not (which saves a size exchange).
        :meth:`wait` returns the list of buffers in rank order."""

    @abc.abstractmethod
    def broadcast_async(self, buf: Array, root: int, name: str) -> Any:
        """Start sending root's 1-D ``buf`` to every worker (non-roots pass any array of
        the right dtype; the length is taken from the root)."""

    @abc.abstractmethod
    def wait(self, handle: Any) -> Any:
        """Complete a collective and return its result."""


def horovod_membership(hvd: Any, process_set: Any = None) -> tuple[dict[str, Any], int, int]:
    """(extra keyword arguments for Horovod's collectives, rank, size) for one of
    Horovod's framework modules and an optional process set; Horovod must be initialised."""
    if not hvd.is_initialized():
        raise RuntimeError(f"{hvd.__name__} is not initialised: call hvd.init() first")
    if process_set is None:
        return {}, hvd.rank(), hvd.size()
    return {"process_set": process_set}, process_set.rank(), process_set.size()


# Byte model used for accounting, per worker: what it puts on and takes off the network.
SIZE_HEADER_BYTES = 8  # one int64 length per worker when an allgather's sizes differ


def allreduce_traffic(nbytes: int, size: int) -> tuple[int, int]:
    """(sent, received) bytes of a bandwidth-optimal ring allreduce of ``nbytes``:
    ``2 (N-1)/N * nbytes`` each way (reduce-scatter then allgather)."""
    moved = (2 * (size - 1) * nbytes) // size if size > 1 else 0
    return moved, moved


def allgather_traffic(mine: int, all_nbytes: list[int], rank: int, equal_sizes: bool) -> tuple[int, int]:
    """(sent, received) bytes of an allgather: every peer gets this worker's block and
    this worker gets every peer's; a size exchange is added when sizes may differ."""
    size = len(all_nbytes)
    sent = (size - 1) * mine
    received = sum(b for r, b in enumerate(all_nbytes) if r != rank)
    if not equal_sizes and size > 1:
        sent += (size - 1) * SIZE_HEADER_BYTES
        received += (size - 1) * SIZE_HEADER_BYTES
    return sent, received
