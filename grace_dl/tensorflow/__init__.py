"""grace-dl for TensorFlow: ``import grace_dl.tensorflow as grace``.

Importing this package registers the TensorFlow array backend (:class:`TFOps`), so every
method runs on ``tf.Tensor`` and ``tf.Variable``, and re-exports the core API: one
factory per method (``grace.topk(ratio=0.01)``, ``grace.qsgd(levels=15)``, ...),
:func:`from_config`, :func:`grace_from_params`, :func:`list_methods` and :class:`Grace`::

    import horovod.tensorflow as hvd
    import grace_dl.tensorflow as grace

    hvd.init()
    tape = hvd.DistributedGradientTape(tape, compression=grace.topk(ratio=0.01))

Each factory returns a :class:`HorovodTFGrace`: a Grace that stock Horovod accepts as
``compression=`` (``DistributedGradientTape`` and the Keras ``DistributedOptimizer``), and
that also runs on its own: ``method.bind(grace.HorovodTFTransport()).step(gradient, name)``.
Horovod is imported only when it is first used.

GRACE's ``grace=`` keyword: :func:`DistributedGradientTape` and :func:`DistributedOptimizer`
take ``grace=grace_from_params(params)`` and hand it to stock Horovod as ``compression=``
(``grace_dl.tensorflow.hvd`` and ``grace_dl.tensorflow.keras_hvd`` are Horovod's modules
with them; see docs/migrating-from-grace.md).
"""

from __future__ import annotations

import inspect as _inspect
from typing import Any

import grace_dl as _core
from grace_dl import Grace, LocalSimulator, list_methods
from grace_dl.ops import register_backend as _register_backend

from .horovod import HorovodTFGrace
from .ops import TFOps

_register_backend(TFOps())


def as_horovod(method: Grace) -> HorovodTFGrace:
    """``method`` as a :class:`HorovodTFGrace`, usable as Horovod's ``compression=``
    (the object is converted in place and returned)."""
    if not isinstance(method, Grace):
        raise TypeError(f"expected a grace_dl.Grace, got {type(method).__name__}")
    method.__class__ = HorovodTFGrace
    return method


def _tf_factory(core_factory: Any) -> Any:
    def factory(**kwargs: Any) -> HorovodTFGrace:
        return as_horovod(core_factory(**kwargs))

    factory.__signature__ = _inspect.signature(core_factory)
    factory.__name__ = factory.__qualname__ = core_factory.__name__
    factory.__doc__ = core_factory.__doc__
    return factory


def from_config(config: Any) -> HorovodTFGrace:
    """:func:`grace_dl.from_config`, returning a :class:`HorovodTFGrace`."""
    return as_horovod(_core.from_config(config))


def grace_from_params(params: dict[str, Any]) -> HorovodTFGrace:
    """:func:`grace_dl.grace_from_params` (GRACE's keys), returning a :class:`HorovodTFGrace`."""
    return as_horovod(_core.grace_from_params(params))


def _export_methods() -> list[str]:
    """Expose each registered method under its own name: a factory returning a
    :class:`HorovodTFGrace` (a Grace that Horovod accepts as ``compression=``)."""
    names = _core.list_methods()
    for name in names:
        globals()[name] = _tf_factory(getattr(_core, name))
    return names


_METHODS = _export_methods()


def __getattr__(name: str) -> Any:
    # methods registered after this module was imported get their factory on first access
    if name in _core.list_methods():
        factory = globals()[name] = _tf_factory(getattr(_core, name))
        return factory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from .horovod import HorovodTFTransport  # noqa: E402  (imports Horovod only when instantiated)
from .hvd import DistributedGradientTape, DistributedOptimizer  # noqa: E402  (GRACE's grace=; Horovod on use)
from .localsgd import LocalSGD  # noqa: E402  (Horovod only when it makes its transport)

local_sgd = _core.local_sgd

__all__ = ["TFOps", "HorovodTFTransport", "HorovodTFGrace", "Grace", "LocalSimulator", "as_horovod", "from_config",
           "grace_from_params", "list_methods", "DistributedGradientTape", "DistributedOptimizer", "LocalSGD", "local_sgd"] + _METHODS
