"""GRACE's examples/tensorflow/tensorflow2_keras_mnist.py, moved to grace-dl
(docs/migrating-from-grace.md).

The same structure (Horovod's Keras API, a tf.data pipeline, a small CNN, Horovod's
DistributedOptimizer with GRACE's ``grace=``, Horovod's callbacks, ``model.fit``), on
scikit-learn's bundled 8x8 digits instead of a downloaded MNIST. The lines that differ
from a GRACE script are marked "grace-dl:".
Run: ``TF_USE_LEGACY_KERAS=1 horovodrun -np 2 python examples/migrate_tf2_keras_mnist.py``.
"""

import argparse
import hashlib
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Horovod 0.28's Keras wrapper needs tf-keras (README)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import grace_dl.tensorflow.keras_hvd as hvd  # noqa: E402  grace-dl: was `import horovod.tensorflow.keras as hvd`
from grace_dl.tensorflow.helper import grace_from_params  # noqa: E402  grace-dl: was the 3 class imports

parser = argparse.ArgumentParser(description="TF2 Keras digits example (GRACE's tensorflow2_keras_mnist, on grace-dl)")
parser.add_argument("--epochs", type=int, default=3, help="epochs (default: 3)")
args = parser.parse_args()

# Horovod: initialize Horovod.
hvd.init()
tf.keras.utils.set_random_seed(1)

digits = load_digits()
dataset = tf.data.Dataset.from_tensor_slices(
    (tf.cast(digits.images[..., tf.newaxis] / 16.0, tf.float32), tf.cast(digits.target, tf.int64)))
dataset = dataset.shard(hvd.size(), hvd.rank()).repeat().shuffle(1000, seed=hvd.rank()).batch(32)

mnist_model = tf.keras.Sequential([
    tf.keras.layers.Input((8, 8, 1)),
    tf.keras.layers.Conv2D(8, [3, 3], activation='relu'),
    tf.keras.layers.Conv2D(16, [3, 3], activation='relu'),
    tf.keras.layers.MaxPooling2D(pool_size=(2, 2)),
    tf.keras.layers.Flatten(),
    tf.keras.layers.Dense(32, activation='relu'),
    tf.keras.layers.Dense(10, activation='softmax')
])

# Horovod: adjust learning rate based on number of workers.
opt = tf.optimizers.Adam(0.001 * hvd.size())

# GRACE: compression algorithm
grc = grace_from_params({'compressor': 'topk', 'memory': 'residual', 'communicator': 'allgather'})  # grace-dl

# Horovod: add Horovod DistributedOptimizer.
opt = hvd.DistributedOptimizer(opt, grace=grc)

# Horovod: Specify `experimental_run_tf_function=False` to ensure TensorFlow
# uses hvd.DistributedOptimizer() to compute gradients (tf-keras ignores it today).
mnist_model.compile(loss=tf.losses.SparseCategoricalCrossentropy(),
                    optimizer=opt,
                    metrics=['accuracy'],
                    experimental_run_tf_function=False)

callbacks = [
    # Horovod: broadcast initial variable states from rank 0 to all other processes.
    hvd.callbacks.BroadcastGlobalVariablesCallback(0),
    # Horovod: average metrics among workers at the end of every epoch. (grace-dl: keras_hvd's
    # callbacks replace Horovod 0.28's, which call keras.backend.constant, absent from Keras 3.)
    hvd.callbacks.MetricAverageCallback(),
]

# Horovod: write logs on worker 0.
verbose = 2 if hvd.rank() == 0 else 0

# Train the model.
# Horovod: adjust number of steps based on number of workers.
history = mnist_model.fit(dataset, steps_per_epoch=60 // hvd.size(), callbacks=callbacks, epochs=args.epochs,
                          verbose=verbose)

# every rank applied the same aggregated gradients: the weights agree bit for bit
flat = np.concatenate([v.numpy().ravel() for v in mnist_model.weights])
gathered = hvd.allgather(tf.constant(flat[None]), name="final_weights").numpy()
assert all(np.array_equal(gathered[0], row) for row in gathered), "weights differ between ranks"
digest = hashlib.sha256(flat.tobytes()).hexdigest()[:16]
print(f"rank {hvd.rank()}: parameters identical on every rank ({digest}), "
      f"accuracy {history.history['accuracy'][-1]:.3f}")
