"""Step time of a TensorFlow training step with grace-dl methods against Horovod's own
``hvd.Compression.none`` (and, with ``--framework torch``, the same models and methods on
PyTorch with Horovod's torch ``DistributedOptimizer``).

Run under Horovod, e.g. 2 ranks on one machine::

    horovodrun -np 2 --gloo python benchmarks/tf_step_time.py
    horovodrun -np 2 --gloo python benchmarks/tf_step_time.py --framework torch

Each model trains with ``hvd.DistributedGradientTape`` inside a ``tf.function`` (the way
Horovod's TF2 examples do) on scikit-learn's bundled 8x8 digits. Rank 0 prints, per model
and method, the median step time over ``--steps`` timed steps (after ``--warmup`` steps
that trace and warm up) and its ratio to ``none`` (the model's first method) on the same
framework; ``--repeats N`` runs the cases N times round-robin and prints the median of
their medians and their range; with
``--fusion 0,65536`` each method runs once per bucket size (``policies.fusion_bytes``,
see :mod:`grace_dl.fusion`), in the same run. Models:

* ``digits_mlp``: 64-128-128-10 dense network (6 gradient tensors);
* ``keras_cnn``: a Keras CNN, 3 conv + 3 dense layers (12 gradient tensors).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Horovod 0.28 needs tf-keras on TF >= 2.16
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

METHODS = {
    "none": None,
    "topk": ("topk", {"ratio": 0.01}),
    "dgc": ("dgc", {}),
    "powersgd": ("powersgd", {"rank": 2}),
    "qsgd": ("qsgd", {}),
}


def digits(rank: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(rank)
    pick = rng.choice(len(data.target), batch, replace=False)
    return (data.images[pick] / 16.0).astype(np.float32), data.target[pick].astype(np.int64)


def tf_model(name: str):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(1)
    if name == "digits_mlp":
        return tf.keras.Sequential([tf.keras.layers.Input((8, 8)), tf.keras.layers.Flatten(),
                                    tf.keras.layers.Dense(128, activation="relu"),
                                    tf.keras.layers.Dense(128, activation="relu"), tf.keras.layers.Dense(10)])
    return tf.keras.Sequential([
        tf.keras.layers.Input((8, 8)), tf.keras.layers.Reshape((8, 8, 1)),
        tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        tf.keras.layers.Conv2D(32, 3, activation="relu"), tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(10)])


def _compression(grace, hvd, method: str, fusion: int):
    spec = METHODS[method]
    if spec is None:
        return hvd.Compression.none
    return getattr(grace, spec[0])(policies={"fusion_bytes": fusion}, **spec[1])


def time_tf(model_name: str, method: str, steps: int, warmup: int, batch: int,
            fusion: int = 0) -> tuple[float, int]:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import grace_dl.tensorflow as grace

    model = tf_model(model_name)
    compression = _compression(grace, hvd, method, fusion)
    opt = tf.keras.optimizers.SGD(0.01)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = (tf.constant(a) for a in digits(hvd.rank(), batch))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        tape = hvd.DistributedGradientTape(tape, compression=compression)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step().numpy()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), len(model.trainable_variables)


def time_torch(model_name: str, method: str, steps: int, warmup: int, batch: int,
               fusion: int = 0) -> tuple[float, int]:
    import horovod.torch as hvd
    import torch

    import grace_dl.torch as grace

    torch.manual_seed(1)
    torch.set_num_threads(1)
    if model_name == "digits_mlp":
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    else:
        model = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 8)), torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(32 * 36, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
            torch.nn.ReLU(), torch.nn.Linear(64, 10))
    compression = _compression(grace, hvd, method, fusion)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), compression=compression)
    xs, ys = digits(hvd.rank(), batch)
    x, y = torch.from_numpy(xs), torch.from_numpy(ys)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), sum(1 for _ in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits_mlp,keras_cnn", help="comma-separated: digits_mlp, keras_cnn")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--batch", type=int, default=64, help="batch per rank (default 64)")
    parser.add_argument("--framework", default="tf", choices=["tf", "torch"],
                        help="tf (default), or torch for the same models and methods on PyTorch (Horovod's "
                             "TF and torch modules do not share one process)")
    parser.add_argument("--fusion", default="0",
                        help="comma-separated bucket sizes in bytes (policies.fusion_bytes) to run each method "
                             "with (default 0: per tensor)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every case, round-robin; the median of their medians is printed, with "
                             "their range (default 1)")
    args = parser.parse_args()

    if args.framework == "tf":
        import horovod.tensorflow as hvd
    else:
        import horovod.torch as hvd
    hvd.init()
    fusions = [int(f) for f in args.fusion.split(",")]
    timer = time_tf if args.framework == "tf" else time_torch
    cases = [(model_name, method, fusion) for model_name in args.models.split(",")
             for method in args.methods.split(",") for fusion in ([0] if METHODS[method] is None else fusions)]
    # round-robin repeats: a busy machine's drift then falls on every case alike
    medians: dict = {case: [] for case in cases}
    tensors: dict = {}
    for _ in range(args.repeats):
        for case in cases:
            model_name, method, fusion = case
            seconds, tensors[model_name] = timer(model_name, method, args.steps, args.warmup, args.batch, fusion)
            medians[case].append(seconds)
    if hvd.rank() == 0:
        spread = args.repeats > 1
        print(f"| model | tensors | method | {args.framework} ms/step | / none |" + (" min-max ms |" if spread else ""))
        print("|---|---|---|---|---|" + ("---|" if spread else ""))
        base = {}
        for model_name, method, fusion in cases:
            times = medians[(model_name, method, fusion)]
            seconds = statistics.median(times)
            base.setdefault(model_name, seconds)
            label = f"{method},fusion={fusion}" if len(fusions) > 1 and METHODS[method] else method
            print(f"| {model_name} | {tensors[model_name]} | {label} | {seconds * 1e3:.1f} | "
                  f"{seconds / base[model_name]:.2f} |" + (f" {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} |"
                                                           if spread else ""))

if __name__ == "__main__":
    main()
