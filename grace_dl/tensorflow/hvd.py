"""Stock ``horovod.tensorflow`` with the ``grace=`` keyword of GRACE's patched Horovod, so
that a GRACE script changes only its import: ``import grace_dl.tensorflow.hvd as hvd`` in
place of ``import horovod.tensorflow as hvd``.

Everything but :func:`DistributedGradientTape` and :func:`DistributedOptimizer` is
Horovod's own, looked up on ``horovod.tensorflow`` on first use (``hvd.init()``,
``hvd.size()``, ``hvd.broadcast_variables`` ...). Those two take GRACE's ``grace=`` (a
grace-dl method: ``grace_from_params(params)``, a factory's result or a
:class:`~grace_dl.core.Grace`) and hand it to stock Horovod as ``compression=``; they are
also :func:`grace_dl.tensorflow.DistributedGradientTape` and
:func:`grace_dl.tensorflow.DistributedOptimizer`. Horovod is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..core import Grace


def method_or_compression(grace: Any, compression: Any) -> Any:
    """What stock Horovod gets as ``compression=``: ``grace`` (as a
    :class:`~grace_dl.tensorflow.HorovodTFGrace`) or ``compression`` (default when both
    are None: Horovod's ``Compression.none``); giving both raises ValueError."""
    if grace is None:
        if compression is None:
            from horovod.tensorflow import Compression

            return Compression.none
        return compression
    if compression is not None:
        raise ValueError("give the method as grace= or as compression=, not both")
    if not isinstance(grace, Grace):
        raise TypeError(f"grace= must be a grace-dl method (grace_from_params(...), grace_dl.tensorflow.topk(...)), "
                        f"got {type(grace).__name__}")
    from . import as_horovod

    return as_horovod(grace)


def DistributedGradientTape(gradtape: Any, *args: Any, grace: Any = None, compression: Any = None,
                            **horovod_options: Any) -> Any:
    """``horovod.tensorflow.DistributedGradientTape`` with GRACE's ``grace=`` keyword.

    Args:
        gradtape: the ``tf.GradientTape`` to wrap.
        args: Horovod's positional arguments after the tape.
        grace: the grace-dl method (default None: ``compression``).
        compression: Horovod's compression, instead of ``grace`` (default None: none).
        horovod_options: Horovod's other keywords (``op``, ``sparse_as_dense`` ...).
    """
    import horovod.tensorflow as hvd

    return hvd.DistributedGradientTape(gradtape, *args, compression=method_or_compression(grace, compression),
                                       **horovod_options)


def DistributedOptimizer(optimizer: Any, *args: Any, grace: Any = None, compression: Any = None,
                         **horovod_options: Any) -> Any:
    """``horovod.tensorflow.DistributedOptimizer`` with GRACE's ``grace=`` keyword.

    Args:
        optimizer: the optimizer to wrap.
        args: Horovod's positional arguments after the optimizer.
        grace: the grace-dl method (default None: ``compression``).
        compression: Horovod's compression, instead of ``grace`` (default None: none).
        horovod_options: Horovod's other keywords.
    """
    import horovod.tensorflow as hvd

    return hvd.DistributedOptimizer(optimizer, *args, compression=method_or_compression(grace, compression),
                                    **horovod_options)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # the import system's probes (__path__ ...) are not Horovod's
        raise AttributeError(name)
    return getattr(importlib.import_module("horovod.tensorflow"), name)
