"""A torch.distributed DDP communication hook that runs any grace-dl method::

    import grace_dl.torch as grace
    model = torch.nn.parallel.DistributedDataParallel(model)
    model.register_comm_hook(None, grace.ddp_hook(grace.powersgd(rank=2)))

DDP hands the hook one ``GradBucket`` at a time (the flattened gradients of several
parameters) and expects a future of the averaged flat bucket. The hook runs the grace
pipeline **per parameter** inside the bucket, not on the flat bucket, because:

* matrix methods (PowerSGD) need each layer's shape, which a flat bucket has lost;
* DDP rebuilds its buckets after the first iteration (by the order gradients became
  ready), so a bucket index does not name the same tensors from one step to the next,
  while per-tensor state (residuals, momenta, PowerSGD's Q) must stay with its tensor;
* the results are then those of the Horovod adapter and of the simulator for the same
  named tensors.

With ``named_parameters`` given, the method's fusion policy (``policies.fusion_bytes``,
see :mod:`grace_dl.fusion`) merges small gradients into fusion buckets planned once from
the parameters (reversed, DDP's own ready order), independently of DDP's buckets, which
DDP may rebuild; a fusion bucket starts when its last member is handed over, whichever
DDP bucket that comes in. Without ``named_parameters`` every tensor goes on its own.

The exchange of a bucket is posted when DDP calls the hook (during the backward pass);
the hook of the last bucket completes every exchange of the step in bucket order (all
workers do the same, so multi-round methods post their later rounds in the same order
everywhere) and fulfils the futures.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..core import Grace
from ..fusion import Fuser, Ticket
from .checks import claim_for_hook
from .distributed import TorchDistributedTransport
from .horovod import HorovodCompression
from .ops import TorchOps


class GraceCommHook:
    """A DDP communication hook, ``hook(state, bucket) -> Future[Tensor]``.

    ``state`` (the first argument of ``register_comm_hook``) may be None (the default
    process group, or ``process_group`` given here), a process group, or an object with
    a ``process_group`` attribute (like torch's own hook states); it is read on the
    first call, which binds the method to a :class:`TorchDistributedTransport`.

    Tensor names key the method's per-tensor state and its shared random draws, so
    they must be the same on every worker: with ``named_parameters`` they are the
    model's names, otherwise ``param<k>`` numbered in the order DDP first hands the
    parameters over (its first-iteration bucket order, the same on every worker).

    Args:
        method: a grace-dl method (``grace_dl.torch.topk(...)``, or a
            :class:`~grace_dl.core.Grace`).
        named_parameters: ``model.named_parameters()`` (optional), for readable names.
        process_group: the process group when ``state`` is None (default: the default group).
    """

    def __init__(self, method: Any, named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                 process_group: Any = None):
        if isinstance(method, HorovodCompression):
            method = method.grace
        if not isinstance(method, Grace):
            raise TypeError(f"ddp_hook takes a grace-dl method (grace_dl.torch.topk(...) or a Grace), "
                            f"got {method!r}")
        claim_for_hook(method, self)  # one method object per hook (model): its state is kept per name
        self.grace = method
        self.process_group = process_group
        self._named = named_parameters is not None
        self._params: list[torch.Tensor] = []  # keeps the named tensors alive, so ids stay unique
        self._names: dict[int, str] = {}
        self._fuser = Fuser(method)
        if named_parameters is not None:
            order = []
            for name, p in named_parameters:
                self._remember(p, name)
                if p.requires_grad:
                    order.append((name, tuple(p.shape), TorchOps().dtype(p)))
            self._fuser.plan(order[::-1])
        self._queue: list[tuple[torch.futures.Future, torch.Tensor, list[tuple[int | None, Ticket]]]] = []
        # DDP reads the hook's __name__ (for its logs and its bf16 hook check)
        self.__name__ = self.__qualname__ = "grace_ddp_hook"

    def _remember(self, p: torch.Tensor, name: str) -> str:
        self._params.append(p)
        self._names[id(p)] = name
        return name

    def name_of(self, p: torch.Tensor) -> str:
        """The name under which parameter ``p`` is exchanged."""
        name = self._names.get(id(p))
        if name is None:
            if self._named:
                raise KeyError("DDP handed over a parameter that is not in named_parameters")
            name = self._remember(p, f"param{len(self._params)}")
        return name

    # no annotations: DDP's register_comm_hook compares them with dist.GradBucket and
    # Future[Tensor], which postponed (string) annotations never equal
    def __call__(self, state, bucket):
        if self.grace.transport is None:
            self.grace.bind(TorchDistributedTransport(self._group(state)))
        buffer = bucket.buffer()
        started = []
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            started.append((_offset_in(g, buffer), self._fuser.start(g, self.name_of(p))))
        if buffer.device.type == "cuda":
            future = torch.futures.Future(devices=[buffer.device])
        else:
            future = torch.futures.Future()
        self._queue.append((future, buffer, started))
        if bucket.is_last():
            self.flush()
        return future

    def _group(self, state: Any) -> Any:
        import torch.distributed as dist

        if state is None:
            return self.process_group
        if isinstance(state, dist.ProcessGroup):
            return state
        if hasattr(state, "process_group"):  # torch's hook states (DefaultState, PowerSGDState)
            return state.process_group
        raise TypeError(f"the DDP hook state must be None, a process group or an object with a "
                        f".process_group, got {state!r}")

    def flush(self) -> None:
        """Complete every exchange posted since the last flush and fulfil its future
        (called by the hook of the step's last bucket)."""
        queue, self._queue = self._queue, []
        # round by round over all tensors (every worker in the same order, which
        # torch.distributed's order matching needs): each wait posts that tensor's next
        # round (PowerSGD's second allreduce) before the next tensor's wait, so the later
        # rounds of all tensors are in flight together instead of one after another
        pendings = [ticket.started for _, _, started in queue for _, ticket in started if ticket.opened]
        if self._fuser.open_buckets():
            self._fuser.abandon()  # Fuser.finish below names the members that never came
        while not all(pending.done for pending in pendings):
            for pending in pendings:
                self.grace.advance(pending)
        for future, buffer, started in queue:
            out = torch.empty_like(buffer)
            position = 0
            for offset, ticket in started:
                result = self._fuser.finish(ticket).reshape(-1)
                start = position if offset is None else offset
                out[start:start + result.numel()] = result
                position = start + result.numel()
            future.set_result(out)

    def check_optimizer(self, optimizer: Any) -> None:
        """Raise ValueError when the method keeps its own momentum (DGC, Signum) and the
        torch ``optimizer`` applies one too (momentum twice: training diverges). The hook
        never sees the optimizer, so call this once after building it."""
        from .horovod import refuse_double_momentum

        refuse_double_momentum(optimizer, self.grace)

    def state_dict(self) -> dict[str, Any]:
        """The method's state (residuals, step counters), as NumPy arrays and ints."""
        return self.grace.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.grace.load_state_dict(state)

    def __repr__(self) -> str:
        return f"GraceCommHook({self.grace!r})"


def _offset_in(view: torch.Tensor, buffer: torch.Tensor) -> int | None:
    """Where ``view`` starts inside the flat ``buffer`` (None when it is not a view of it;
    then the gradients are laid out one after the other)."""
    if view.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr():
        return None
    return view.storage_offset() - buffer.storage_offset()


def ddp_hook(method: Any, named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
             process_group: Any = None) -> GraceCommHook:
    """A DDP communication hook running ``method`` (see :class:`GraceCommHook`)::

        model.register_comm_hook(None, grace_dl.torch.ddp_hook(grace_dl.torch.topk(ratio=0.01)))
    """
    return GraceCommHook(method, named_parameters, process_group)
