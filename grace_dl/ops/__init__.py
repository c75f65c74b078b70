"""Backend dispatch: find the :class:`Ops` implementation for an array.

Backends are found by the array's type, einops-style: a framework backend is only
imported when that framework is already loaded (``sys.modules``), so importing
``grace_dl`` never imports torch or TensorFlow.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from .base import DTYPE_ITEMSIZE, FLOAT_DTYPES, Array, Ops
from .numpy_backend import NumpyOps

__all__ = ["Ops", "Array", "get_ops", "DTYPE_ITEMSIZE", "FLOAT_DTYPES", "register_backend"]

# framework module name -> "module:Class" of its Ops implementation
_LAZY_BACKENDS: dict[str, str] = {
    "torch": "grace_dl.torch.ops:TorchOps",
    "tensorflow": "grace_dl.tensorflow.ops:TFOps",
}
_LOADED: list[Ops] = [NumpyOps()]


def register_backend(ops: Ops) -> None:
    """Add an :class:`Ops` instance to the dispatch list (first match wins)."""
    if not any(type(o) is type(ops) for o in _LOADED):
        _LOADED.append(ops)


def _load_present_frameworks() -> None:
    for framework, target in list(_LAZY_BACKENDS.items()):
        if framework in sys.modules:
            module_name, cls_name = target.split(":")
            register_backend(getattr(importlib.import_module(module_name), cls_name)())
            del _LAZY_BACKENDS[framework]


def get_ops(x: Any) -> Ops:
    """The :class:`Ops` backend owning array ``x``; raises TypeError naming the type."""
    for ops in _LOADED:
        if ops.owns(x):
            return ops
    _load_present_frameworks()
    for ops in _LOADED:
        if ops.owns(x):
            return ops
    raise TypeError(
        f"grace-dl has no array backend for {type(x).__module__}.{type(x).__name__}; "
        f"supported: numpy.ndarray, torch.Tensor, tf.Tensor"
    )
