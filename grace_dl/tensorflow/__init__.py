"""grace-dl for TensorFlow: ``import grace_dl.tensorflow as grace``.

Importing this package registers the TensorFlow array backend (:class:`TFOps`), so every
method runs on ``tf.Tensor`` and ``tf.Variable``, and re-exports the core API: one
factory per method (``grace.topk(ratio=0.01)``, ``grace.qsgd(levels=15)``, ...),
:func:`from_config`, :func:`grace_from_params`, :func:`list_methods` and :class:`Grace`::

    import horovod.tensorflow as hvd
    import grace_dl.tensorflow as grace

    hvd.init()
    method = grace.topk(ratio=0.01).bind(grace.HorovodTFTransport())
    aggregated = method.step(gradient, "dense/kernel")

Horovod is imported only when :class:`HorovodTFTransport` is instantiated.
"""

from __future__ import annotations

from typing import Any

import grace_dl as _core
from grace_dl import Grace, from_config, grace_from_params, list_methods
from grace_dl.ops import register_backend as _register_backend

from .ops import TFOps

_register_backend(TFOps())


def _export_methods() -> list[str]:
    """Expose each registered method's core factory under its own name."""
    names = _core.list_methods()
    for name in names:
        globals()[name] = getattr(_core, name)
    return names


_METHODS = _export_methods()


def __getattr__(name: str) -> Any:
    # the transport module is loaded on first use only
    if name == "HorovodTFTransport":
        from .horovod import HorovodTFTransport

        return HorovodTFTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TFOps", "HorovodTFTransport", "Grace", "from_config", "grace_from_params",
           "list_methods"] + _METHODS
