"""Plug grace-dl into stock, unpatched ``horovod.torch``.

``HorovodTorchTransport`` runs grace-dl's collectives on Horovod's torch ops.
``HorovodCompression`` is what ``hvd.DistributedOptimizer(..., compression=...)``
receives: Horovod calls ``compress(tensor)``, allreduces what it returns, and calls
``decompress(output, ctx)``. Our ``compress`` runs the whole grace pipeline up to the
start of the exchange (on our own, asynchronous, collective, so allgather methods work)
and hands Horovod an empty tensor, whose allreduce costs nothing; ``decompress`` waits
for our exchange and returns the aggregated gradient. The exchange therefore starts when
Horovod's gradient hook fires, overlapping the rest of the backward pass.

Stock Horovod's ``Compressor.compress`` receives no tensor name, but per-tensor state
(error feedback) needs one. It is read from Horovod's optimizer frame (``self`` and
``p`` in ``_allreduce_grad_async`` / ``_grouped_allreduce_grad_async`` of Horovod
0.28), where the name Horovod itself uses is ``self._parameter_names[p]``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..core import Grace
from ..transport.base import Transport, horovod_membership


class HorovodTorchTransport(Transport):
    """grace-dl collectives over ``horovod.torch`` (initialised by the caller)."""

    def __init__(self, process_set: Any = None):
        import horovod.torch as hvd

        self.hvd = hvd
        self._ps, self.rank, self.size = horovod_membership(hvd, process_set)

    def allreduce_async(self, buf, name):
        return ("reduce", self.hvd.allreduce_async(buf, name=name, op=self.hvd.Sum, **self._ps))

    def allgather_async(self, buf, name, equal_sizes=False):
        data = self.hvd.allgather_async(buf.reshape(-1), name=name, **self._ps)
        sizes = None
        if not equal_sizes:
            count = torch.tensor([buf.numel()], dtype=torch.int64)
            sizes = self.hvd.allgather_async(count, name=name + ".sizes", **self._ps)
        return ("gather", data, sizes, buf.numel())

    def broadcast_async(self, buf, root, name):
        return ("reduce", self.hvd.broadcast_async(buf, root_rank=root, name=name, **self._ps))

    def wait(self, handle):
        if handle[0] == "reduce":
            return self.hvd.synchronize(handle[1])
        _, data, sizes, mine = handle
        flat = self.hvd.synchronize(data)
        counts = [mine] * self.size if sizes is None else self.hvd.synchronize(sizes).tolist()
        return list(torch.split(flat, counts))


def _horovod_caller(tensor: torch.Tensor) -> tuple[str, Any]:
    """(name, optimizer) of the Horovod optimizer call that is compressing ``tensor``."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            break
        local = frame.f_locals
        opt, param = local.get("self"), local.get("p")
        names = getattr(opt, "_parameter_names", None)
        if isinstance(names, dict) and isinstance(param, torch.Tensor):
            name = names.get(param)
            if name is not None:
                return name, opt
        frame = frame.f_back
    raise RuntimeError(
        "grace-dl compression was called outside horovod.torch.DistributedOptimizer, so the "
        "tensor's name is unknown; call grace.step(tensor, name) yourself, or pass this object "
        "only as hvd.DistributedOptimizer(..., compression=...)"
    )


class HorovodCompression:
    """A grace-dl method in the shape of Horovod's ``Compressor``.

    Args:
        grace: the method (a :class:`~grace_dl.core.Grace`); bound to a
            :class:`HorovodTorchTransport` on first use.
    """

    def __init__(self, grace: Grace):
        self.grace = grace

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start the grace pipeline for ``tensor``; Horovod allreduces the returned empty tensor."""
        name, optimizer = _horovod_caller(tensor)
        hvd_op = getattr(optimizer, "op", None)
        import horovod.torch as hvd

        if hvd_op not in (None, hvd.Average, hvd.Sum):
            raise ValueError("grace-dl compression supports op=hvd.Average and op=hvd.Sum, not Adasum")
        if self.grace.transport is None:
            self.grace.bind(HorovodTorchTransport(getattr(optimizer, "process_set", None)))
        pending = self.grace.start(tensor, name)
        return tensor.new_zeros(0), (pending, hvd_op == hvd.Sum)

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Finish the exchange started by :meth:`compress`; the aggregated gradient."""
        pending, summed = ctx
        out = self.grace.finish(pending)
        return out * self.grace.transport.size if summed else out

    # state travels with the optimizer's state_dict (see grace_dl.torch.DistributedOptimizer)
    def state_dict(self) -> dict[str, Any]:
        """The method's state (error feedback, step counters)."""
        return self.grace.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.grace.load_state_dict(state)

    def __repr__(self) -> str:
        return f"HorovodCompression({self.grace!r})"
