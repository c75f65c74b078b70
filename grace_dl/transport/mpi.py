"""A transport over mpi4py for NumPy arrays, for jobs started by ``mpirun`` or
``horovodrun``.

MPI matches collectives by order, not by name: every rank must issue the same
collectives in the same order (the pipeline does, since every rank processes the same
tensor names in the same order). float16 is not an MPI reduction type, so a float16
allreduce is carried out as an allgather followed by a sum in rank order, which also
makes it bit-identical to the in-process simulator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Transport


class MPITransport(Transport):
    """Collectives over an mpi4py communicator (default ``MPI.COMM_WORLD``)."""

    def __init__(self, comm: Any = None):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allreduce_async(self, buf, name):
        buf = np.ascontiguousarray(buf)
        if buf.dtype == np.float16:
            return ("sum_of_gathered", self.allgather_async(buf, name, equal_sizes=True))
        out = np.empty_like(buf)
        # the handle keeps the send buffer alive until Wait: MPI reads it asynchronously
        return ("request", self.comm.Iallreduce(buf, out, op=self._mpi.SUM), out, buf)

    def allgather_async(self, buf, name, equal_sizes=False):
        buf = np.ascontiguousarray(buf).reshape(-1)
        if equal_sizes:
            counts = [buf.shape[0]] * self.size
        else:
            counts = self.comm.allgather(int(buf.shape[0]))
        out = np.empty(sum(counts), dtype=buf.dtype)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        if buf.dtype == np.float16:  # no MPI type for float16: move its bytes as int16
            req = self.comm.Iallgatherv(buf.view(np.int16), [out.view(np.int16), counts, displs, self._mpi.SHORT])
        else:
            req = self.comm.Iallgatherv(buf, [out, counts, displs, self._mpi._typedict[buf.dtype.char]])
        return ("gather", req, out, counts, displs, buf)

    def broadcast_async(self, buf, root, name):
        buf = np.array(buf, copy=True).reshape(-1)
        view = buf.view(np.int16) if buf.dtype == np.float16 else buf
        return ("request", self.comm.Ibcast(view, root=root), buf)

    def wait(self, handle):
        kind = handle[0]
        if kind == "request":
            handle[1].Wait()
            return handle[2]
        if kind == "gather":
            _, req, out, counts, displs, _ = handle
            req.Wait()
            return [out[d:d + c] for d, c in zip(displs, counts)]
        parts = self.wait(handle[1])
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total
