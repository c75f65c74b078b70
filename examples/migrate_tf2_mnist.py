"""GRACE's examples/tensorflow/tensorflow2_mnist.py, moved to grace-dl
(docs/migrating-from-grace.md).

The same structure (Horovod, a tf.data pipeline, a small CNN, a tf.function training step
with Horovod's DistributedGradientTape and GRACE's ``grace=``, broadcast after the first
step), on scikit-learn's bundled 8x8 digits instead of a downloaded MNIST. The lines
that differ from a GRACE script are marked "grace-dl:".
Run: ``horovodrun -np 2 python examples/migrate_tf2_mnist.py``.
"""

import argparse
import hashlib
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Horovod 0.28 needs tf-keras on TF >= 2.16 (README)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import grace_dl.tensorflow.hvd as hvd  # noqa: E402  grace-dl: was `import horovod.tensorflow as hvd`
from grace_dl.tensorflow.helper import grace_from_params  # noqa: E402  grace-dl: was the 3 class imports

parser = argparse.ArgumentParser(description="TF2 digits example (GRACE's tensorflow2_mnist, on grace-dl)")
parser.add_argument("--steps", type=int, default=120, help="training steps in all, split over workers")
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
loss = tf.losses.SparseCategoricalCrossentropy()

# Horovod: adjust learning rate based on number of workers.
opt = tf.optimizers.Adam(0.001 * hvd.size())

# GRACE: compression algorithm
grc = grace_from_params({'compressor': 'topk', 'memory': 'residual', 'communicator': 'allgather'})  # grace-dl


@tf.function
def training_step(images, labels, first_batch):
    with tf.GradientTape() as tape:
        probs = mnist_model(images, training=True)
        loss_value = loss(labels, probs)

    # Horovod: add Horovod Distributed GradientTape.
    tape = hvd.DistributedGradientTape(tape, grace=grc)

    grads = tape.gradient(loss_value, mnist_model.trainable_variables)
    opt.apply_gradients(zip(grads, mnist_model.trainable_variables))

    # Horovod: broadcast initial variable states from rank 0 to all other processes,
    # after the first gradient step so that the optimizer's variables exist.
    if first_batch:
        hvd.broadcast_variables(mnist_model.variables, root_rank=0)
        hvd.broadcast_variables(opt.variables(), root_rank=0)

    return loss_value


# Horovod: adjust number of steps based on number of workers.
for batch, (images, labels) in enumerate(dataset.take(args.steps // hvd.size())):
    loss_value = training_step(images, labels, batch == 0)
    if batch % 10 == 0 and hvd.local_rank() == 0:
        print('Step #%d\tLoss: %.6f' % (batch, loss_value))

# every rank applied the same aggregated gradients: the weights agree bit for bit
flat = np.concatenate([v.numpy().ravel() for v in mnist_model.variables])
gathered = hvd.allgather(tf.constant(flat[None]), name="final_weights").numpy()
assert all(np.array_equal(gathered[0], row) for row in gathered), "weights differ between ranks"
digest = hashlib.sha256(flat.tobytes()).hexdigest()[:16]
print(f"rank {hvd.rank()}: parameters identical on every rank ({digest}), last loss {float(loss_value):.3f}")
