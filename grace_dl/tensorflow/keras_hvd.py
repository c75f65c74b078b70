"""Stock ``horovod.tensorflow.keras`` with the ``grace=`` keyword of GRACE's patched
Horovod, so that a GRACE Keras script changes only its import:
``import grace_dl.tensorflow.keras_hvd as hvd`` in place of
``import horovod.tensorflow.keras as hvd``.

Everything but :func:`DistributedOptimizer` and ``callbacks`` is Horovod's own, looked
up on ``horovod.tensorflow.keras`` on first use (``hvd.init()``, ``hvd.size()`` ...).
``hvd.callbacks`` is Horovod's callbacks module with the callbacks that break on
TensorFlow 2.21 (``BroadcastGlobalVariablesCallback`` under Keras 3,
``MetricAverageCallback``, ``LearningRateScheduleCallback``,
``LearningRateWarmupCallback``) replaced by those of
:mod:`grace_dl.tensorflow.keras_callbacks`, which work under both Keras modes.
Horovod's Keras ``DistributedOptimizer`` needs tf-keras on TensorFlow 2.16 and later
(``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported; see docs/user-guide.md).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from .hvd import method_or_compression


def _is_keras3_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a Keras 3 one (the ``keras`` package at major version 3)."""
    try:
        import keras
    except ImportError:
        return False
    if not str(getattr(keras, "__version__", "")).startswith("3."):
        return False
    return isinstance(optimizer, keras.optimizers.Optimizer)


def DistributedOptimizer(optimizer: Any, *args: Any, grace: Any = None, compression: Any = None,
                         **horovod_options: Any) -> Any:
    """``horovod.tensorflow.keras.DistributedOptimizer`` with GRACE's ``grace=`` keyword.

    Args:
        optimizer: the Keras optimizer to wrap.
        args: Horovod's positional arguments after the optimizer.
        grace: the grace-dl method (default None: ``compression``).
        compression: Horovod's compression, instead of ``grace`` (default None: none).
        horovod_options: Horovod's other keywords.

    Raises:
        TypeError: ``optimizer`` is a Keras 3 optimizer. Horovod 0.28's wrapper overrides
            Keras 2 methods that Keras 3's ``model.fit`` never calls, so it would train
            without exchanging any gradient; use tf-keras (``TF_USE_LEGACY_KERAS=1``) or
            ``DistributedGradientTape`` in a custom ``train_step``.
    """
    import horovod.tensorflow.keras as hvd

    if _is_keras3_optimizer(optimizer):
        raise TypeError(
            f"{type(optimizer).__name__} is a Keras 3 optimizer: Horovod 0.28's Keras DistributedOptimizer "
            f"is never called by Keras 3's model.fit, so no gradient would be exchanged. Set "
            f"TF_USE_LEGACY_KERAS=1 before importing TensorFlow (tf-keras), or keep Keras 3 and use "
            f"hvd.DistributedGradientTape in a custom train_step (docs/user-guide.md, 'Keras 3 and tf-keras')")

    return hvd.DistributedOptimizer(optimizer, *args, compression=method_or_compression(grace, compression),
                                    **horovod_options)


_CALLBACKS: list[types.SimpleNamespace] = []


def _callbacks() -> types.SimpleNamespace:
    """Horovod's ``callbacks`` module with grace-dl's working replacements in it."""
    if not _CALLBACKS:
        from . import keras_callbacks

        horovod_callbacks = importlib.import_module("horovod.tensorflow.keras.callbacks")
        names = {n: getattr(horovod_callbacks, n) for n in dir(horovod_callbacks) if not n.startswith("_")}
        names.update({n: getattr(keras_callbacks, n) for n in keras_callbacks.__all__})
        _CALLBACKS.append(types.SimpleNamespace(**names))
    return _CALLBACKS[0]


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # the import system's probes (__path__ ...) are not Horovod's
        raise AttributeError(name)
    if name == "callbacks":
        return _callbacks()
    return getattr(importlib.import_module("horovod.tensorflow.keras"), name)
