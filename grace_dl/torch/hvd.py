"""Stock ``horovod.torch`` with the signature of GRACE's patched Horovod, so that a GRACE
script changes only its import: ``import grace_dl.torch.hvd as hvd`` in place of
``import horovod.torch as hvd``.

Everything but :func:`DistributedOptimizer` is Horovod's own (looked up on
``horovod.torch`` on first use: ``hvd.init()``, ``hvd.size()``,
``hvd.broadcast_parameters`` ...). :func:`DistributedOptimizer` takes the method second,
as GRACE's patched Horovod did (``hvd.DistributedOptimizer(opt, grc,
named_parameters=...)``), and is :func:`grace_dl.torch.DistributedOptimizer`.
"""

from __future__ import annotations

from typing import Any, Iterable

import horovod.torch as _hvd
import torch

from .horovod import DistributedOptimizer as _distributed_optimizer


def DistributedOptimizer(optimizer: torch.optim.Optimizer, grace: Any = None,
                         named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                         compression: Any = None, backward_passes_per_step: int = 1, op: Any = None,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         **horovod_options: Any) -> torch.optim.Optimizer:
    """GRACE's ``hvd.DistributedOptimizer(optimizer, grace, named_parameters, ...)`` on
    stock Horovod: :func:`grace_dl.torch.DistributedOptimizer` with ``grace`` as the method.

    Args:
        optimizer: the torch optimizer to wrap.
        grace: the method (``grace_from_params(params)``, a factory's result or a
            :class:`~grace_dl.core.Grace`); default None: ``compression`` or none.
        named_parameters: ``model.named_parameters()`` (default None).
        compression: Horovod's compression, instead of ``grace`` (default None).
        backward_passes_per_step: local accumulations per exchange (default 1).
        op: ``hvd.Average`` (default, None) or ``hvd.Sum``.
        gradient_predivide_factor: Horovod's split of the average (default 1.0).
        num_groups: Horovod 0.21's number of allreduce groups (default 0: none); Horovod's
            later ``groups=`` goes in ``horovod_options``.
        horovod_options: the other keywords of :func:`grace_dl.torch.DistributedOptimizer`.
    """
    if num_groups:
        horovod_options.setdefault("groups", num_groups)
    return _distributed_optimizer(optimizer, named_parameters=named_parameters, compression=compression,
                                  backward_passes_per_step=backward_passes_per_step, op=op,
                                  gradient_predivide_factor=gradient_predivide_factor, grace=grace,
                                  **horovod_options)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # the import system's probes (__path__ ...) are not Horovod's
        raise AttributeError(name)
    return getattr(_hvd, name)
