"""Horovod's Keras callbacks that break on TensorFlow 2.21, written to work under both
Keras modes (Keras 3, TensorFlow's default, and tf-keras with ``TF_USE_LEGACY_KERAS=1``).

Horovod 0.28's ``horovod.tensorflow.keras.callbacks`` calls ``keras.backend.constant``,
``get_value`` and ``set_value``, which Keras 3's backend no longer has; Horovod imports
that backend from the ``keras`` package, which is Keras 3 even when tf-keras is selected.
So ``MetricAverageCallback``, ``LearningRateScheduleCallback`` and
``LearningRateWarmupCallback`` fail with an ``AttributeError`` at their first epoch, with
or without grace-dl, and under Keras 3 ``BroadcastGlobalVariablesCallback`` fails as well
(Keras 3 variables have no ``ref()``). The classes here take the same arguments and do
the same thing with plain TensorFlow and Horovod calls. ``grace_dl.tensorflow.keras_hvd``
serves them as ``hvd.callbacks`` (with Horovod's other callbacks). TensorFlow is imported
with this module: select the Keras mode before importing it.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import numpy as np
import tensorflow as tf

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateScheduleCallback",
           "LearningRateWarmupCallback", "tf_variables"]


def tf_variables(variables: Any) -> list[tf.Variable]:
    """The ``tf.Variable`` behind each Keras variable, for TensorFlow and Horovod calls that
    need them (``hvd.broadcast_variables``, ``DistributedGradientTape.gradient``): Keras 3
    wraps one (``v.value``), tf-keras's variables are ``tf.Variable`` already.

    Args:
        variables: Keras or TensorFlow variables (``model.trainable_variables`` ...).
    """
    out = []
    for v in variables:
        if isinstance(v, tf.Variable):
            out.append(v)
            continue
        inner = getattr(v, "value", None)
        if not isinstance(inner, tf.Variable):
            raise TypeError(f"{getattr(v, 'path', v)!r} is neither a tf.Variable nor a Keras variable backed by one "
                            f"(got {type(v).__name__})")
        out.append(inner)
    return out


def _optimizer_variables(optimizer: Any) -> list[Any]:
    found = optimizer.variables
    return list(found() if callable(found) else found)  # a method in tf-keras, a property in Keras 3


def _learning_rate(optimizer: Any) -> float:
    return float(np.asarray(optimizer.learning_rate))


class BroadcastGlobalVariablesCallback(tf.keras.callbacks.Callback):
    """Broadcast the model's and the optimizer's variables from ``root_rank`` at the end of
    the first batch (when the optimizer's slots exist), as Horovod's callback of the same name.

    Args:
        root_rank: the rank whose values every rank takes.
        device: device of the broadcasts (default ``""``: Horovod's choice).
        local_variables: variables not to broadcast (default None: none).
    """

    def __init__(self, root_rank: int, device: str = "", local_variables: Any = None):
        super().__init__()
        self.root_rank = root_rank
        self.device = device
        if local_variables is not None and not isinstance(local_variables, (list, tuple, set)):
            local_variables = [local_variables]
        self._local = {v.ref() for v in tf_variables(local_variables or [])}
        self.broadcast_done = False

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Broadcast once, after the first batch."""
        if self.broadcast_done:
            return
        import horovod.tensorflow as hvd

        with tf.device(self.device):
            hvd.broadcast_variables([v for v in tf_variables(self.model.variables) if v.ref() not in self._local],
                                    root_rank=self.root_rank)
            hvd.broadcast_variables(tf_variables(_optimizer_variables(self.model.optimizer)),
                                    root_rank=self.root_rank)
        self.broadcast_done = True


class MetricAverageCallback(tf.keras.callbacks.Callback):
    """Replace each metric of the epoch's logs by its mean over the ranks (an allreduce per
    metric, in sorted order so that every rank posts the same sequence), as Horovod's
    callback of the same name. Put it before callbacks that read the metrics.

    Args:
        device: device of the allreduces (default ``""``: Horovod's choice).
    """

    def __init__(self, device: str = ""):
        super().__init__()
        self.device = device

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Average ``logs`` in place."""
        if not logs:
            return
        import horovod.tensorflow as hvd

        with tf.device(self.device):
            for metric in sorted(logs):
                name = "MetricAverageCallback." + re.sub(r"[^A-Za-z0-9_.]", "_", metric)
                value = tf.constant(float(np.asarray(logs[metric])), tf.float64)
                logs[metric] = float(hvd.allreduce(value, op=hvd.Average, name=name).numpy())


class LearningRateScheduleCallback(tf.keras.callbacks.Callback):
    """Set the optimizer's learning rate to ``initial_lr * multiplier(epoch)`` between
    ``start_epoch`` and ``end_epoch``, as Horovod's callback of the same name: once per
    epoch with ``staircase``, else before every batch with a fractional epoch.

    The learning rate is assigned through ``optimizer.learning_rate``, so it must be a
    number or a variable, not a ``LearningRateSchedule``. Momentum correction (momentum
    scaled by ``new_lr / old_lr`` for the batch where the rate changes) needs the momentum
    in a ``tf.Variable``, as tf-keras's legacy optimizers keep it; Keras 3's and tf-keras's
    current optimizers hold it as a Python number read when the training step is traced,
    so there it is left alone (a warning says so once).

    Args:
        initial_lr: learning rate the multiplier scales (required).
        multiplier: a number ``m`` (``m ** (epoch - start_epoch)``) or a function of the epoch.
        start_epoch: first epoch adjusted (default 0).
        end_epoch: first epoch no longer adjusted (default None: all).
        staircase: adjust once per epoch (default True) or at every batch.
        momentum_correction: scale the momentum with the rate (default True, where possible).
        steps_per_epoch: batches per epoch (default None: ``model.fit``'s).
    """

    def __init__(self, initial_lr: float, multiplier: float | Callable[[float], float], start_epoch: int = 0,
                 end_epoch: int | None = None, staircase: bool = True, momentum_correction: bool = True,
                 steps_per_epoch: int | None = None):
        super().__init__()
        if initial_lr is None:
            raise ValueError("initial_lr is required (the learning rate the multiplier scales)")
        self.initial_lr = float(initial_lr)
        self.multiplier = multiplier if callable(multiplier) else (lambda epoch: multiplier ** (epoch - start_epoch))
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.staircase = staircase
        self.momentum_correction = momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = 0
        self._restore_momentum: float | None = None
        self._warned = False

    def _momentum_variable(self) -> tf.Variable | None:
        momentum = getattr(self.model.optimizer, "momentum", None)
        if isinstance(momentum, tf.Variable):
            return momentum
        if momentum and not self._warned:
            warnings.warn(f"{type(self).__name__}: the optimizer's momentum is a Python number baked into the "
                          f"traced training step, so momentum correction is not applied", stacklevel=2)
            self._warned = True
        return None

    def _adjust_learning_rate(self, epoch: float) -> None:
        optimizer = self.model.optimizer
        old_lr = _learning_rate(optimizer)
        new_lr = self.initial_lr * self.multiplier(epoch)
        optimizer.learning_rate = new_lr
        momentum = self._momentum_variable() if self.momentum_correction else None
        if momentum is not None and old_lr:
            self._restore_momentum = float(momentum.numpy())
            momentum.assign(self._restore_momentum * new_lr / old_lr)

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Find the number of steps per epoch when it is needed and not given."""
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self.params.get("steps")
            if not self.steps_per_epoch:
                raise ValueError(f"{type(self).__name__}: model.fit did not say its steps per epoch; "
                                 f"pass steps_per_epoch=")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Remember the epoch."""
        self.current_epoch = epoch

    def on_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        """Set the learning rate of this batch."""
        if self.current_epoch < self.start_epoch or (self.end_epoch is not None
                                                     and self.current_epoch >= self.end_epoch):
            return
        if self.staircase:
            if batch == 0:
                self._adjust_learning_rate(self.current_epoch)
        else:
            self._adjust_learning_rate(self.current_epoch + batch / self.steps_per_epoch)

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Restore the momentum after a corrected batch."""
        if self._restore_momentum is not None:
            self.model.optimizer.momentum.assign(self._restore_momentum)
            self._restore_momentum = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Log the learning rate as ``lr``."""
        if logs is not None:
            logs["lr"] = _learning_rate(self.model.optimizer)


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Ramp the learning rate linearly from ``initial_lr / size`` to ``initial_lr`` over
    ``warmup_epochs`` epochs, batch by batch, as Horovod's callback of the same name (Goyal
    et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour"). A
    step-based ``LearningRateSchedule`` does the same inside the traced step (see
    docs/user-guide.md).

    Args:
        initial_lr: the learning rate after the warm-up (required).
        warmup_epochs: epochs of warm-up (default 5).
        momentum_correction: as in :class:`LearningRateScheduleCallback` (default True).
        steps_per_epoch: batches per epoch (default None: ``model.fit``'s).
        verbose: 1 prints the rate reached at the end of the warm-up on rank 0 (default 0).
    """

    def __init__(self, initial_lr: float, warmup_epochs: int = 5, momentum_correction: bool = True,
                 steps_per_epoch: int | None = None, verbose: int = 0):
        import horovod.tensorflow as hvd

        def multiplier(epoch: float) -> float:
            # the rate reached at the end of the batch, so that the last batch of the warm-up
            # reaches initial_lr exactly
            epoch += 1.0 / self.steps_per_epoch
            return 1.0 / hvd.size() * (epoch * (hvd.size() - 1) / warmup_epochs + 1)

        super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=warmup_epochs, staircase=False,
                         momentum_correction=momentum_correction, steps_per_epoch=steps_per_epoch)
        self.verbose = verbose

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Log the learning rate; say when the warm-up ends."""
        super().on_epoch_end(epoch, logs)
        import horovod.tensorflow as hvd

        if epoch == self.end_epoch - 1 and self.verbose > 0 and hvd.rank() == 0:
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to "
                  f"{_learning_rate(self.model.optimizer):g}.")
