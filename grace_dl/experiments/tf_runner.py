"""The experiments on TensorFlow (Keras 3 models): the same tasks and models as
:mod:`grace_dl.experiments.torch_runner`.

Under ``horovodrun`` the gradients go through STOCK ``hvd.DistributedGradientTape`` with
``compression=grace_dl.tensorflow.from_config(...)`` (a
:class:`~grace_dl.tensorflow.horovod.HorovodTFGrace`: a Grace that Horovod accepts as
compression, whose ``stats`` keep the byte counts; its pipeline runs eagerly in a
``tf.py_function``, so the timers measure real work). Under the ``simulator`` launcher one model stands for the N
identical replicas: each worker's gradient is computed on its own batch (in a
``tf.function``), :class:`grace_dl.LocalSimulator` exchanges them eagerly, and the
optimizer applies the aggregate.

Weight decay is added to the aggregated gradient (coupled L2, as PyTorch's SGD and Adam
do), so both frameworks optimise the same objective.
"""

from __future__ import annotations

import os
import numpy as np

from .config import ExperimentConfig
from .tasks import TaskData


def build_model(config: ExperimentConfig, data: TaskData):
    """The Keras model of the task."""
    import keras
    from keras import layers

    m = config.model
    if data.name == "digits":
        if m["arch"] == "mlp":
            body = [layers.Dense(m["hidden"], activation="relu"), layers.Dense(10)]
        else:
            body = [layers.Reshape((8, 8, 1)), layers.Conv2D(16, 3, padding="same", activation="relu"),
                    layers.Conv2D(32, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
                    layers.Flatten(), layers.Dense(m["hidden"], activation="relu"), layers.Dense(10)]
        return keras.Sequential([keras.Input((64,))] + body)
    if data.name == "charlm":
        rnn = layers.GRU if m["arch"] == "gru" else layers.LSTM
        return keras.Sequential([keras.Input((data.input_dim,), dtype="int32"),
                                 layers.Embedding(data.num_classes, m["embed"])]
                                + [rnn(m["hidden"], return_sequences=True) for _ in range(m["layers"])]
                                + [layers.Dense(data.num_classes)])
    # start at w = 0: the initial distance to the optimum is |w*|
    return keras.Sequential([keras.Input((data.input_dim,)),
                             layers.Dense(1, use_bias=False, kernel_initializer="zeros")])


def make_optimizer(config: ExperimentConfig):
    """Keras SGD (with momentum) or Adam; weight decay is applied by the runner."""
    import keras

    o = config.optimizer
    if o["name"] == "sgd":
        return keras.optimizers.SGD(learning_rate=o["lr"], momentum=o["momentum"])
    return keras.optimizers.Adam(learning_rate=o["lr"])


class TFRunner:
    """One worker of a Horovod launch (``horovod=True``), or every worker of the simulator;
    the same interface as :class:`~grace_dl.experiments.torch_runner.TorchRunner`."""

    def __init__(self, config: ExperimentConfig, data: TaskData, horovod: bool):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF's first import: quiet C++ logs
        import tensorflow as tf

        self.tf = tf
        self.config, self.data, self.horovod = config, data, horovod
        self._x_dtype = tf.int32 if data.kind == "sequence" else tf.float32
        self._y_dtype = tf.int32 if data.kind in ("classification", "sequence") else tf.float32
        if horovod:
            import horovod.tensorflow as hvd

            hvd.init()
            self.hvd = hvd
            self.rank, self.size = hvd.rank(), hvd.size()
            threads = max(1, (os.cpu_count() or 1) // max(1, hvd.local_size()))
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
            except RuntimeError:  # TF already initialised by the caller
                pass
        import keras

        import grace_dl.tensorflow as gtf

        keras.utils.set_random_seed(config.seed)
        self.model = build_model(config, data)
        self.variables = list(self.model.trainable_variables)
        # the names Horovod's tape gives gradients (the tf.Variable names, e.g.
        # "sequential/dense/kernel:0"), so policies match the same tensors in both modes
        names = [getattr(v, "value", v).name for v in self.variables]
        self.names = names if len(set(names)) == len(names) else [v.path for v in self.variables]
        self.optimizer = make_optimizer(config)
        self.weight_decay = config.optimizer["weight_decay"]
        if horovod:
            compression = gtf.from_config(config.compression)
            if not (hasattr(compression, "compress") and hasattr(compression, "decompress")):
                raise RuntimeError(
                    "grace_dl.tensorflow.from_config returned no Horovod compression (an object with "
                    "compress and decompress for hvd.DistributedGradientTape); this grace-dl has no TF "
                    "tape adapter: use launcher: simulator for TensorFlow")
            self.compression = compression
            # the adapter is the Grace itself (HorovodTFGrace), or wraps one as .grace
            self.grace = getattr(compression, "grace", compression)
            self.graces = [self.grace]
            # Horovod assigns to tf.Variables: Keras 3 keeps one as each variable's .value
            hvd.broadcast_variables([getattr(v, "value", v) for v in self.model.variables], root_rank=0)
            self.local_ranks = [self.rank]
        else:
            import grace_dl

            from .config import build_compression

            self.rank, self.size = 0, config.workers
            self.sim = grace_dl.LocalSimulator(build_compression(config.compression), config.workers)
            self.graces = self.sim.workers
            self.grace = self.sim.workers[0]
            self.local_ranks = list(range(config.workers))
            self._grad_fn = tf.function(self._loss_and_grads)

    def timing_active(self) -> bool:
        """Whether pipeline timers measure real work (not a ``tf.function`` trace)."""
        return self.tf.executing_eagerly()

    def _loss(self, out, y):
        tf = self.tf
        kind = self.data.kind
        if kind in ("classification", "sequence"):
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out))
        z = tf.reshape(out, [-1])
        if kind == "least_squares":
            data_loss = tf.reduce_mean(0.5 * (z - y) ** 2)
        else:
            data_loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z))
        return data_loss + 0.5 * self.data.l2 * tf.add_n([tf.reduce_sum(v ** 2) for v in self.variables])

    def _loss_and_grads(self, x, y):
        with self.tf.GradientTape() as tape:
            loss = self._loss(self.model(x, training=True), y)
        # an embedding's gradient is IndexedSlices: every method compresses dense tensors
        return loss, [self.tf.convert_to_tensor(g) for g in tape.gradient(loss, self.variables)]

    def _tensors(self, x: np.ndarray, y: np.ndarray):
        return self.tf.constant(x, self._x_dtype), self.tf.constant(y, self._y_dtype)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of the next step."""
        self.optimizer.learning_rate = lr

    def _apply(self, grads) -> None:
        if self.weight_decay:
            grads = [g + self.weight_decay * v for g, v in zip(grads, self.variables)]
        self.optimizer.apply_gradients(zip(grads, self.variables))

    def train_step(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
        """One step on each local worker's batch; the mean loss over all workers."""
        tf = self.tf
        if self.horovod:
            x, y = self._tensors(*batches[0])
            with tf.GradientTape() as tape:
                loss = self._loss(self.model(x, training=True), y)
            # sparse_as_dense: Horovod would allgather an embedding's IndexedSlices itself,
            # bypassing the compression
            tape = self.hvd.DistributedGradientTape(tape, compression=self.compression, sparse_as_dense=True)
            # Horovod's tape wants tf.Variables (it calls .ref()): Keras 3 keeps one as .value
            self._apply(tape.gradient(loss, [getattr(v, "value", v) for v in self.variables]))
            return float(self.hvd.allreduce(loss, name="grace_dl.experiment.loss").numpy())
        grads, losses = [], []
        for batch in batches:
            loss, g = self._grad_fn(*self._tensors(*batch))
            losses.append(float(loss.numpy()))
            grads.append(dict(zip(self.names, g)))
        out = self.sim.step(grads)
        for r, agg in enumerate(out[1:], 1):
            for n in self.names:
                if not np.array_equal(agg[n].numpy(), out[0][n].numpy()):
                    raise RuntimeError(f"simulated worker {r} received a different aggregate for {n!r} "
                                       f"than worker 0; replicas would diverge")
        self._apply([out[0][n] for n in self.names])
        return float(np.mean(losses))

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the test set (classification and sequence tasks)."""
        tf = self.tf
        x, y = self._tensors(self.data.x_test, self.data.y_test)
        out = self.model(x, training=False)
        loss = float(self._loss(out, y).numpy())
        accuracy = float(tf.reduce_mean(tf.cast(tf.equal(tf.argmax(out, -1, output_type=y.dtype), y),
                                                tf.float32)).numpy())
        return {"eval_loss": loss, "accuracy": accuracy}

    def flat_weights(self) -> np.ndarray:
        """All trainable weights, flattened (the synthetic task's ``w``)."""
        return np.concatenate([np.asarray(v.numpy(), np.float64).reshape(-1) for v in self.variables])

    def replicas_identical(self) -> bool:
        """Under Horovod: whether every rank holds the same weights."""
        if not self.horovod:
            return True
        tf = self.tf
        flat = tf.concat([tf.reshape(v, [-1]) for v in self.variables], 0)
        gathered = self.hvd.allgather(tf.reshape(flat, [1, -1]), name="grace_dl.experiment.params").numpy()
        return bool(all(np.array_equal(gathered[0], g) for g in gathered[1:]))

    def all_traffic(self, mine: dict[str, int], keys: tuple[str, ...]) -> list[dict[str, int]]:
        """Every worker's byte totals, in rank order."""
        if not self.horovod:
            return [{k: int(getattr(w.stats, k)) for k in keys} for w in self.sim.workers]
        row = self.tf.constant([[mine[k] for k in keys]], self.tf.int64)
        rows = self.hvd.allgather(row, name="grace_dl.experiment.traffic").numpy().tolist()
        return [dict(zip(keys, r)) for r in rows]
