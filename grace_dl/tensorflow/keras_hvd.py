"""Stock ``horovod.tensorflow.keras`` with the ``grace=`` keyword of GRACE's patched
Horovod, so that a GRACE Keras script changes only its import:
``import grace_dl.tensorflow.keras_hvd as hvd`` in place of
``import horovod.tensorflow.keras as hvd``.

Everything but :func:`DistributedOptimizer` is Horovod's own, looked up on
``horovod.tensorflow.keras`` on first use (``hvd.init()``, ``hvd.callbacks`` ...).
Horovod's Keras support needs tf-keras on TensorFlow 2.16 and later
(``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported; see the README).
"""

from __future__ import annotations

import importlib
from typing import Any

from .hvd import method_or_compression


def DistributedOptimizer(optimizer: Any, *args: Any, grace: Any = None, compression: Any = None,
                         **horovod_options: Any) -> Any:
    """``horovod.tensorflow.keras.DistributedOptimizer`` with GRACE's ``grace=`` keyword.

    Args:
        optimizer: the Keras optimizer to wrap.
        args: Horovod's positional arguments after the optimizer.
        grace: the grace-dl method (default None: ``compression``).
        compression: Horovod's compression, instead of ``grace`` (default None: none).
        horovod_options: Horovod's other keywords.
    """
    import horovod.tensorflow.keras as hvd

    return hvd.DistributedOptimizer(optimizer, *args, compression=method_or_compression(grace, compression),
                                    **horovod_options)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # the import system's probes (__path__ ...) are not Horovod's
        raise AttributeError(name)
    return getattr(importlib.import_module("horovod.tensorflow.keras"), name)
