"""grace-dl for PyTorch: ``import grace_dl.torch as grace``.

Each factory (``grace.topk(ratio=0.01)``, ``grace.dgc(...)``, ...) returns an object that
stock Horovod accepts as ``compression=``::

    import horovod.torch as hvd
    import grace_dl.torch as grace
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=grace.topk(ratio=0.01))

The wrapped :class:`~grace_dl.core.Grace` is available as ``.grace`` for direct use
(``.grace.bind(transport).step(tensor, name)``).

Also here: :func:`DistributedOptimizer`, the explicit form whose ``state_dict()`` carries
the method's state; :func:`ddp_hook`, a torch.distributed DDP communication hook
(``model.register_comm_hook(None, grace.ddp_hook(grace.topk(ratio=0.01)))``); and
:class:`TorchDistributedTransport`, grace-dl's collectives over torch.distributed.
"""

from __future__ import annotations

from typing import Any

import grace_dl as _core
from grace_dl.ops import register_backend as _register_backend

from .ddp import GraceCommHook, ddp_hook
from .distributed import TorchDistributedTransport
from .horovod import DistributedOptimizer, HorovodCompression, HorovodTorchTransport
from .localsgd import LocalSGD, PostLocalSGDHook, PostLocalSGDOptimizer, post_local_sgd_hook
from .ops import TorchOps

_register_backend(TorchOps())


def _factory(method: str):
    core_factory = getattr(_core, method)

    def factory(**kwargs: Any) -> HorovodCompression:
        return HorovodCompression(core_factory(**kwargs))

    factory.__name__ = factory.__qualname__ = method
    factory.__signature__ = core_factory.__signature__
    factory.__doc__ = core_factory.__doc__
    return factory


def from_config(config: Any) -> HorovodCompression:
    """:func:`grace_dl.from_config`, wrapped for Horovod."""
    return HorovodCompression(_core.from_config(config))


def grace_from_params(params: dict[str, Any]) -> HorovodCompression:
    """GRACE's ``grace_from_params``, wrapped for Horovod."""
    return HorovodCompression(_core.grace_from_params(params))


for _method in _core.list_methods():
    globals()[_method] = _factory(_method)


def __getattr__(name: str) -> Any:
    # methods registered after this module was imported get their factory on first access
    if name in _core.list_methods():
        factory = globals()[name] = _factory(name)
        return factory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

list_methods = _core.list_methods
local_sgd = _core.local_sgd

__all__ = ["DistributedOptimizer", "GraceCommHook", "HorovodCompression", "HorovodTorchTransport",
           "TorchDistributedTransport", "TorchOps", "ddp_hook", "from_config", "grace_from_params",
           "list_methods", "LocalSGD", "PostLocalSGDOptimizer", "PostLocalSGDHook", "post_local_sgd_hook",
           "local_sgd"] + _core.list_methods()
