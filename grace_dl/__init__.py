"""grace-dl: gradient compression for distributed deep learning, written once.

Every method runs on NumPy, PyTorch and TensorFlow arrays over any transport::

    import grace_dl
    grace = grace_dl.topk(ratio=0.01)          # TopK + residual memory + allgather
    grace = grace_dl.from_config({"compressor": "qsgd", "levels": 15})

Framework adapters live in ``grace_dl.torch`` and ``grace_dl.tensorflow``. This package
imports neither framework.
"""

from __future__ import annotations

import inspect as _inspect
from typing import Any as _Any

from . import communicators, compressors, memories  # noqa: F401  (registers components)
from .core import Communicator, Compressor, Grace, Memory, TensorContext, TrafficStats
from .payload import Payload
from .registry import ConfigError, entries, from_config, grace_from_params, list_methods, make, register
from .localsgd import LocalSGD, LocalSGDSimulator, local_sgd
from .registry import algorithms
from .simulator import LocalSimulator
from .transport.base import Transport
from .transport.local import LocalWorld

__version__ = "0.1.0"


def _factory(method: str):
    entry = entries("compressor")[method]

    def factory(**kwargs: _Any) -> Grace:
        return make(method, **kwargs)

    params = [_inspect.Parameter(p.name, _inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=p.type)
              for p in entry.params.values()]
    params += [
        _inspect.Parameter("memory", _inspect.Parameter.KEYWORD_ONLY, default=entry.cls.memory),
        _inspect.Parameter("communicator", _inspect.Parameter.KEYWORD_ONLY, default=entry.cls.communicator),
        _inspect.Parameter("seed", _inspect.Parameter.KEYWORD_ONLY, default=0),
        _inspect.Parameter("options", _inspect.Parameter.VAR_KEYWORD),
    ]
    factory.__signature__ = _inspect.Signature(params, return_annotation=Grace)
    factory.__name__ = factory.__qualname__ = method
    factory.__doc__ = (
        f"A ready Grace running {entry.cls.__name__} with memory={entry.cls.memory!r} and "
        f"communicator={entry.cls.communicator!r} unless given; other keywords go to the "
        f"memory or communicator that takes them.\n\n{entry.cls.__doc__}"
    )
    return factory


for _method in list_methods():
    globals()[_method] = _factory(_method)


def __getattr__(name: str) -> _Any:
    # a method registered after this package was imported (a user's own) gets its
    # factory on first access
    if name in entries("compressor"):
        factory = globals()[name] = _factory(name)
        return factory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Grace", "Compressor", "Memory", "Communicator", "TensorContext", "TrafficStats", "Payload",
    "Transport", "LocalWorld", "LocalSimulator", "ConfigError", "register", "make", "from_config",
    "grace_from_params", "list_methods", "entries",
    "LocalSGD", "LocalSGDSimulator", "local_sgd", "algorithms",
] + list_methods()
