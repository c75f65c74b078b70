"""Local SGD on PyTorch: an optimizer wrapper for Horovod and torch.distributed, and the
DDP communication hook of post-local SGD.

Horovod (no ``hvd.DistributedOptimizer``: no gradient is allreduced)::

    import grace_dl.torch as grace
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = grace.LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                         method=grace.local_sgd(period=4))
    ...
    loss.backward(); opt.step(loss=loss)   # the local step; the models are averaged every 4th

torch.distributed, post-local SGD as torch's ``PostLocalSGDOptimizer`` and DDP hook do it:
the hook allreduces gradients during the first ``switch_step`` steps and sends nothing
afterwards; the optimizer averages the models every H steps after the switch::

    method = grace.local_sgd(period=4, switch_step=100)
    ddp.register_comm_hook(None, grace.post_local_sgd_hook(method))
    opt = grace.PostLocalSGDOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1),
                                      ddp.module.named_parameters(), method=method)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..localsgd import LocalSGD as _Method
from ..transport.base import Transport, allreduce_traffic

#: the key of :meth:`LocalSGD.state_dict` under which the method's state is kept
STATE_KEY = "grace_dl_local_sgd"


class LocalSGD(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that its ``step()`` is a local step, and every H steps the
    models are averaged (see :class:`grace_dl.LocalSGD` for the schedule and variants).

    The parameters must be identical on every worker before the first step (broadcast
    them); the anchor is taken from them right before the first local step.

    Args:
        optimizer: the user's plain torch optimizer (not Horovod's).
        named_parameters: ``model.named_parameters()``: the averaged tensors, by name (the
            same names on every worker).
        method: a :class:`grace_dl.LocalSGD` (``grace_dl.torch.local_sgd(period=4)``);
            default None: ``local_sgd()`` (H=4, uncompressed).
        transport: where the averaging goes (default None: Horovod's torch collectives,
            ``HorovodTorchTransport()``; :class:`PostLocalSGDOptimizer` passes
            torch.distributed's).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, torch.Tensor]],
                 method: _Method | None = None, transport: Transport | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if type(optimizer).__name__ == "_DistributedOptimizer" or hasattr(optimizer, "_compression"):
            raise TypeError("LocalSGD wraps the plain optimizer: Horovod's DistributedOptimizer would also "
                            "allreduce every gradient; pass the optimizer before hvd.DistributedOptimizer")
        method = _Method() if method is None else method
        if not isinstance(method, _Method):
            raise TypeError(f"method must be a grace_dl.LocalSGD (grace_dl.torch.local_sgd(...)), got "
                            f"{type(method).__name__}")
        self.named = [(str(n), p) for n, p in named_parameters]
        if not self.named:
            raise ValueError("named_parameters is empty: pass model.named_parameters()")
        names = [n for n, _ in self.named]
        if len(set(names)) != len(names):
            raise ValueError("named_parameters has duplicate names")
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        stray = [n for n, p in self.named if id(p) not in owned]
        if stray:
            raise ValueError(f"parameters {stray[:3]} are not in the optimizer's param_groups")
        self.optimizer = optimizer
        self.method = method
        if transport is None and method.transport is None:
            from .horovod import HorovodTorchTransport

            transport = HorovodTorchTransport()
        if transport is not None:
            method.bind(transport)
        # share the wrapped optimizer's groups and state (LR schedulers change them here)
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named}

    def step(self, closure: Any = None, loss: Any = None) -> Any:
        """One local optimizer step, then the averaging where the schedule says so.

        Args:
            closure: the wrapped optimizer's closure (default None); its loss stands in
                for ``loss`` when that is None.
            loss: this step's training loss (a float or a 0-d tensor), needed by adaptive H.
        """
        if not self.method.anchor:
            self.method.set_anchor(self._params())
        result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if loss is None:
            loss = result
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().item()
        averaged = self.method.step(self._params(), loss if self.method.adaptive else None)
        if averaged is not None:
            with torch.no_grad():
                for name, p in self.named:
                    p.copy_(averaged[name])
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, with the local SGD state (anchor, step,
        current H, compression memory) under :data:`STATE_KEY`."""
        state = self.optimizer.state_dict()
        state[STATE_KEY] = self.method.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        state_dict = dict(state_dict)
        local = state_dict.pop(STATE_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        if local is not None:
            self.method.load_state_dict(local, like=self.named[0][1].detach())

    def __repr__(self) -> str:
        return f"LocalSGD({self.optimizer!r}, {self.method!r})"


class PostLocalSGDOptimizer(LocalSGD):
    """:class:`LocalSGD` over torch.distributed (a process group), the counterpart of
    torch's ``PostLocalSGDOptimizer``; with :func:`post_local_sgd_hook` registered on the
    DDP model, the first ``switch_step`` steps average gradients (DDP's allreduce) and
    the models from then on.

    Args:
        optimizer: the user's plain torch optimizer.
        named_parameters: ``ddp_model.module.named_parameters()``.
        method: a :class:`grace_dl.LocalSGD` (default None: ``local_sgd()``).
        process_group: the process group (default None: the default group).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, torch.Tensor]],
                 method: _Method | None = None, process_group: Any = None):
        from .distributed import TorchDistributedTransport

        super().__init__(optimizer, named_parameters, method, TorchDistributedTransport(process_group))


class PostLocalSGDHook:
    """A DDP communication hook for post-local SGD: the mean of the gradients (an
    allreduce, counted in the method's byte counts as ``ddp.gradients``) while the
    method is before its ``switch_step``, the local gradient unchanged (no
    communication) afterwards. Registering it tells ``method`` that the warm-up's
    gradients are averaged, so the optimizer sends nothing then.

    Args:
        method: the :class:`grace_dl.LocalSGD` that the optimizer wrapper steps.
        process_group: the process group (default None: the default group).
    """

    def __init__(self, method: _Method, process_group: Any = None):
        if not isinstance(method, _Method):
            raise TypeError(f"method must be a grace_dl.LocalSGD, got {type(method).__name__}")
        method.gradients_averaged_in_warmup = True
        self.method = method
        self.process_group = process_group
        self.__name__ = self.__qualname__ = "grace_post_local_sgd_hook"

    def __call__(self, state, bucket):
        import torch.distributed as dist

        buffer = bucket.buffer()
        if self.method.step_count >= self.method.switch_step:  # local phase: nothing to send
            future = torch.futures.Future(devices=[buffer.device]) if buffer.is_cuda else torch.futures.Future()
            future.set_result(buffer)
            return future
        group = self.process_group if state is None else getattr(state, "process_group", state)
        size = dist.get_world_size(group)
        nbytes = buffer.numel() * buffer.element_size()
        sent, received = allreduce_traffic(nbytes, size)
        self.method.stats.record("ddp.gradients", nbytes, nbytes, sent, received, self.method.step_count)
        buffer.mul_(1.0 / size)  # the mean as the rest of grace-dl takes it: times 1/N, then summed
        work = dist.all_reduce(buffer, group=group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])


def post_local_sgd_hook(method: _Method, process_group: Any = None) -> PostLocalSGDHook:
    """The DDP hook of post-local SGD (see :class:`PostLocalSGDHook`)::

        ddp_model.register_comm_hook(None, grace_dl.torch.post_local_sgd_hook(method))
    """
    return PostLocalSGDHook(method, process_group)
