"""Local SGD on TensorFlow: an object called after each local optimizer step.

::

    import grace_dl.tensorflow as grace
    hvd.broadcast_variables(model.variables, root_rank=0)
    local = grace.LocalSGD(model.trainable_variables, method=grace.local_sgd(period=4))

    for x, y in data:
        loss = train_step(x, y)       # a tf.function or eager: tape, plain apply_gradients
        local(loss)                   # averages the models every 4th call

The call runs eagerly (outside ``tf.function``): the schedule (when to average, the
adaptive H) is Python state that changes from step to step, and eager Horovod
collectives block, so an averaging step costs the same in or out of a graph. The
user's training step itself may be a ``tf.function``; only the call is eager. Calling it
inside a ``tf.function`` raises a RuntimeError saying so.
"""

from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf

from ..localsgd import LocalSGD as _Method
from ..transport.base import Transport


def _names(variables: Sequence[Any]) -> list[str]:
    """Distinct, stable names: the variable's path or name, with its position where
    names repeat (Keras layers' ``kernel``)."""
    names = [str(getattr(v, "path", None) or getattr(v, "name", None) or f"var{i}") for i, v in enumerate(variables)]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [f"{n}#{i}" if counts[n] > 1 else n for i, n in enumerate(names)]


class LocalSGD:
    """Average ``variables`` every H calls (see :class:`grace_dl.LocalSGD` for the
    schedule and variants); call it once after each local ``apply_gradients``.

    The anchor is taken from the variables when this object is made: they must be
    identical on every worker then (``hvd.broadcast_variables`` first).

    Args:
        variables: the trained variables (``model.trainable_variables``).
        method: a :class:`grace_dl.LocalSGD` (``grace_dl.tensorflow.local_sgd(period=4)``);
            default None: ``local_sgd()``.
        transport: where the averaging goes (default None: Horovod's TensorFlow
            collectives, ``HorovodTFTransport()``).
        names: the variables' names (default None: from their paths or names); the same
            on every worker.
    """

    def __init__(self, variables: Sequence[tf.Variable], method: _Method | None = None,
                 transport: Transport | None = None, names: Sequence[str] | None = None):
        self.variables = list(variables)
        if not self.variables:
            raise ValueError("variables is empty: pass model.trainable_variables (after the model is built)")
        bad = [type(v).__name__ for v in self.variables if not isinstance(v, tf.Variable)]
        if bad:
            raise TypeError(f"LocalSGD averages tf.Variables, got {bad[0]}")
        self.names = list(names) if names is not None else _names(self.variables)
        if len(self.names) != len(self.variables) or len(set(self.names)) != len(self.names):
            raise ValueError("names must give one distinct name per variable")
        method = _Method() if method is None else method
        if not isinstance(method, _Method):
            raise TypeError(f"method must be a grace_dl.LocalSGD (grace_dl.tensorflow.local_sgd(...)), got "
                            f"{type(method).__name__}")
        self.method = method
        if transport is None and method.transport is None:
            from .horovod import HorovodTFTransport

            transport = HorovodTFTransport()
        if transport is not None:
            method.bind(transport)
        self.method.set_anchor(self._values())

    def _values(self) -> dict[str, tf.Tensor]:
        return {n: tf.convert_to_tensor(v) for n, v in zip(self.names, self.variables)}

    def __call__(self, loss: Any = None) -> bool:
        """Record one local step (taken); at an averaging step, average and assign the
        variables. ``loss`` is this step's training loss (needed by adaptive H). Returns
        whether the variables were averaged."""
        if not tf.executing_eagerly():
            raise RuntimeError("grace_dl.tensorflow.LocalSGD runs eagerly: call it after the tf.function that "
                               "takes the step, not inside it")
        if loss is not None and self.method.adaptive:
            loss = float(loss)
        averaged = self.method.step(self._values(), loss if self.method.adaptive else None)
        if averaged is None:
            return False
        for name, v in zip(self.names, self.variables):
            v.assign(averaged[name])
        return True

    def state_dict(self) -> dict[str, Any]:
        """The local SGD state (anchor, step, current H, compression memory), as NumPy
        arrays and plain numbers."""
        return self.method.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.method.load_state_dict(state, like=tf.convert_to_tensor(self.variables[0]))

    def __repr__(self) -> str:
        return f"LocalSGD({len(self.variables)} variables, {self.method!r})"
