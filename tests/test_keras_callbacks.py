"""grace_dl.tensorflow.keras_hvd under both Keras modes (Keras 3 and tf-keras), one Horovod
rank: its callbacks (Horovod's break on TensorFlow 2.21) set the learning rates Horovod's
formulas give, average metrics and broadcast, and its DistributedOptimizer refuses a
Keras 3 optimizer, which Horovod's wrapper would leave without any exchange. The
two-rank averaging is checked by tests/multirank/hvd_keras_training.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = textwrap.dedent('''
    import os, warnings
    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd_tf
    import grace_dl.tensorflow as grace
    import grace_dl.tensorflow.keras_hvd as hvd
    from grace_dl.tensorflow.keras_callbacks import tf_variables

    hvd.init()
    legacy = os.environ.get("TF_USE_LEGACY_KERAS") == "1"
    assert type(tf.keras.optimizers.SGD(0.1)).__module__.startswith("tf_keras") == legacy
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = rng.standard_normal((64, 1)).astype(np.float32)

    def build(lr=0.01, momentum=0.0):
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([tf.keras.layers.Input((8,)), tf.keras.layers.Dense(1)])
        model.compile(optimizer=tf.keras.optimizers.SGD(lr, momentum=momentum), loss="mse", metrics=["mae"])
        return model

    class Record(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.lrs, self.logs = [], []
        def on_batch_begin(self, batch, logs=None):
            self.lrs.append(float(np.asarray(self.model.optimizer.learning_rate)))
        def on_epoch_end(self, epoch, logs=None):
            self.logs.append(dict(logs))

    # the namespace: grace-dl's replacements, Horovod's other callbacks
    from grace_dl.tensorflow import keras_callbacks
    for name in keras_callbacks.__all__[:-1]:
        assert getattr(hvd.callbacks, name) is getattr(keras_callbacks, name), name
    assert hvd.callbacks.BestModelCheckpoint.__module__.startswith("horovod")

    # metric average: one rank's mean is its own value; logs stay numbers other callbacks can read
    before, after = Record(), Record()
    build().fit(x, y, batch_size=16, epochs=2, verbose=0,
                callbacks=[before, hvd.callbacks.MetricAverageCallback(), after])
    assert [sorted(l) for l in after.logs] == [["loss", "mae"]] * 2, after.logs
    for b, a in zip(before.logs, after.logs):
        for key in b:
            assert abs(a[key] - float(b[key])) <= 1e-6 * abs(a[key]), (key, a, b)

    # warm-up under a pretend size of 4: Horovod's formula, batch by batch
    size, steps, lr = 4, 4, 0.4
    real_size, hvd_tf.size = hvd_tf.size, (lambda: size)
    try:
        record = Record()
        history = build(lr=lr).fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[
            hvd.callbacks.LearningRateWarmupCallback(initial_lr=lr, warmup_epochs=2), record])
    finally:
        hvd_tf.size = real_size
    want = [lr / size * ((e + (b + 1) / steps) * (size - 1) / 2 + 1) for e in range(2) for b in range(steps)]
    want += [want[-1]] * steps  # after the warm-up the rate stays where it ended
    assert np.allclose(record.lrs, want, rtol=1e-6), (record.lrs, want)
    assert abs(want[-1] - lr) < 1e-7 and abs(history.history["lr"][-1] - lr) < 1e-6, history.history

    # schedule: staircase, multiplier 0.5 per epoch; the momentum (a Python number) is left alone, said once
    record = Record()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(lr=0.1, momentum=0.9).fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[
            hvd.callbacks.LearningRateScheduleCallback(initial_lr=0.1, multiplier=0.5), record])
    assert np.allclose(record.lrs, [0.1] * 4 + [0.05] * 4 + [0.025] * 4, rtol=1e-6), record.lrs
    said = [w for w in caught if "momentum correction is not applied" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]

    # broadcast: done once, after the first batch; one rank keeps its values
    model = build()
    callback = hvd.callbacks.BroadcastGlobalVariablesCallback(0)
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert callback.broadcast_done

    # tf_variables: the tf.Variable behind each Keras variable, in both modes; anything else refused
    found = tf_variables(model.trainable_variables)
    assert len(found) == 2 and all(isinstance(v, tf.Variable) for v in found)
    try:
        tf_variables([np.zeros(3)])
    except TypeError as err:
        assert "neither a tf.Variable nor a Keras variable" in str(err), err
    else:
        raise AssertionError("a NumPy array was taken for a variable")

    # Horovod's Keras wrapper: refused with a Keras 3 optimizer (it would never be called), taken with tf-keras
    try:
        hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), grace=grace.topk(ratio=0.5))
    except TypeError as err:
        assert not legacy and "TF_USE_LEGACY_KERAS=1" in str(err), err
    else:
        assert legacy, "a Keras 3 optimizer was accepted"
    print("CALLBACKS-OK", "tf-keras" if legacy else "keras3")
''')


@pytest.mark.parametrize("mode", ["keras3", "tf-keras"])
def test_keras_hvd_callbacks_and_optimizer(mode, tmp_path):
    needed = ["tensorflow", "horovod"] + (["tf_keras"] if mode == "tf-keras" else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, not installed (scripts/setup.sh installs it)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)
    if mode == "tf-keras":
        env["TF_USE_LEGACY_KERAS"] = "1"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and f"CALLBACKS-OK {mode}" in proc.stdout, proc.stderr[-3000:]
