"""Step time of a TensorFlow training step with grace-dl methods against Horovod's own
``hvd.Compression.none`` (and, with ``--framework torch``, the same models and methods on
PyTorch with Horovod's torch ``DistributedOptimizer``).

Run under Horovod, e.g. 2 ranks on one machine::

    horovodrun -np 2 --gloo python benchmarks/tf_step_time.py
    horovodrun -np 2 --gloo python benchmarks/tf_step_time.py --framework torch

Each model trains with ``hvd.DistributedGradientTape`` inside a ``tf.function`` (the way
Horovod's TF2 examples do) on scikit-learn's bundled 8x8 digits. Rank 0 prints, per model
and method, the median step time over ``--steps`` timed steps (after ``--warmup`` steps
that trace and warm up; the fastest of ``--rounds`` rounds that time every method in
turn, with the rounds' range) and its ratio to ``none`` on the same framework; with
``--fusion 0,65536`` each grace-dl method runs once per bucket size
(``policies.fusion_bytes``, see :mod:`grace_dl.fusion`), in the same rounds. Models:

* ``digits_mlp``: 64-128-128-10 dense network (6 gradient tensors);
* ``keras_cnn``: a Keras CNN, 3 conv + 3 dense layers (12 gradient tensors).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Horovod 0.28 needs tf-keras on TF >= 2.16
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

METHODS = {
    "none": None,
    "topk": ("topk", {"ratio": 0.01}),
    "dgc": ("dgc", {}),
    "powersgd": ("powersgd", {"rank": 2}),
    "qsgd": ("qsgd", {}),
    # settings that ran in a tf.py_function before the graph path traced them
    "powersgd_no_warm_start": ("powersgd", {"rank": 2, "warm_start": False}),
    "dgc_long_warmup": ("dgc", {"warmup_steps": 1000}),
    "threshold_broadcast": ("threshold", {"threshold": 0.01, "communicator": "broadcast"}),
    "onebit_adam": ("onebit_adam", {"freeze_step": 3}),
}
#: Horovod's own steps (no grace-dl method): ``none_two_rounds`` is ``none`` whose every
#: allreduce first waits for a dependent allreduce of two elements of the same gradient
#: (TF only), the step of a method that makes two dependent rounds per step (PowerSGD's
#: ``P`` then ``Q``) with no compression work: the floor of such a method's step time
HOROVOD_BASELINES = ("none", "none_two_rounds")
METHODS["none_two_rounds"] = None
#: the methods timed by default
DEFAULT_METHODS = ("none", "topk", "dgc", "powersgd", "qsgd")


class TwoRoundsTF:
    """Horovod's TF ``Compression.none`` behind a dependent first round (see
    :data:`HOROVOD_BASELINES`): what it returns to Horovod's allreduce depends on the
    data of an allreduce of two of the gradient's elements."""

    @staticmethod
    def compress(tensor):
        import horovod.tensorflow as hvd
        import tensorflow as tf

        first = hvd.allreduce(tf.reshape(tensor, [-1])[:2], op=hvd.Sum)
        # a data dependency (the gradient plus 0 times a value of the first round): with
        # a control dependency on an identity instead, TF pruned the first round from
        # the traced step (a Horovod timeline showed no first-round allreduce), so this
        # baseline measured one round
        return tensor + tf.cast(first[0], tensor.dtype) * 0, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


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


def _compression(grace, hvd, method: str, fusion: int, py_function: bool = False):
    spec = METHODS[method]
    if method == "none_two_rounds":
        if not hvd.__name__.startswith("horovod.tensorflow"):
            raise ValueError("none_two_rounds is a TF baseline (--framework tf)")
        return TwoRoundsTF
    if spec is None:
        return hvd.Compression.none
    compression = getattr(grace, spec[0])(policies={"fusion_bytes": fusion}, **spec[1])
    if py_function:
        # the path of methods the graph path cannot trace: one tf.py_function per gradient
        cls = type(compression)
        compression.__class__ = type(f"{cls.__name__}OnPyFunction", (cls,), {"graph_path": property(lambda _: False)})
    return compression


def build_tf(model_name: str, method: str, batch: int, fusion: int = 0,
             py_function: bool = False) -> tuple[Callable[[], None], int]:
    """A TF training step (traced on first call) of ``model_name`` with ``method``
    (``py_function``: on the ``tf.py_function`` path rather than the graph path)."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import grace_dl.tensorflow as grace

    model = tf_model(model_name)
    compression = _compression(grace, hvd, method, fusion, py_function)
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

    return lambda: step().numpy(), len(model.trainable_variables)


def build_torch(model_name: str, method: str, batch: int, fusion: int = 0) -> tuple[Callable[[], None], int]:
    """A PyTorch training step of ``model_name`` with ``method`` (Horovod's torch optimizer)."""
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

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step, sum(1 for _ in model.parameters())


def timed(step: Callable[[], None], steps: int) -> float:
    """Median wall time of ``steps`` calls of ``step``."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits_mlp,keras_cnn", help="comma-separated: digits_mlp, keras_cnn")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--py-function", default="",
                        help="comma-separated methods (of --methods) to time a second time on the tf.py_function "
                             "path, the one that methods the graph path cannot trace take (TF only)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case and round (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of timing every method in turn; the fastest round's median is kept (default 3)")
    parser.add_argument("--batch", type=int, default=64, help="batch per rank (default 64)")
    parser.add_argument("--fusion", default="0",
                        help="comma-separated fusion bucket sizes in bytes for the grace-dl methods (default 0)")
    parser.add_argument("--framework", default="tf", choices=["tf", "torch"],
                        help="tf (default), or torch for the same models and methods on PyTorch (Horovod's "
                             "TF and torch modules do not share one process)")
    args = parser.parse_args()

    if args.framework == "tf":
        import horovod.tensorflow as hvd
    else:
        import horovod.torch as hvd
    hvd.init()
    builder = build_tf if args.framework == "tf" else build_torch
    fusions = [int(f) for f in args.fusion.split(",")]
    cases = [(method, fusion, False) for method in args.methods.split(",")
             for fusion in ([0] if method in HOROVOD_BASELINES else fusions)]
    cases += [(method, 0, True) for method in args.py_function.split(",") if method]
    rows = []
    for model_name in args.models.split(","):
        # every case's step built and warmed up first, then timed in turn, round after
        # round: a load spike from other jobs hits one round of every case rather than
        # all rounds of one, and the fastest round's median is kept
        built = {}
        for case in cases:
            on_py_function = {"py_function": True} if case[2] else {}
            step, tensors = builder(model_name, case[0], args.batch, case[1], **on_py_function)
            for _ in range(args.warmup):
                step()
            built[case] = (step, tensors, [])
        for _ in range(args.rounds):
            for case in cases:
                step, _, medians = built[case]
                medians.append(timed(step, args.steps))
        base = min(built[cases[0]][2])
        for case in cases:
            method, fusion, on_py_function = case
            medians = built[case][2]
            label = f"{method},fusion={fusion}" if len(fusions) > 1 and method not in HOROVOD_BASELINES else method
            if on_py_function:
                label += " (py_function)"
            rows.append((model_name, built[case][1], label, min(medians) * 1e3, min(medians) / base,
                         max(medians) * 1e3))
    if hvd.rank() == 0:
        print(f"| model | tensors | method | {args.framework} ms/step | / none | slowest round ms |")
        print("|---|---|---|---|---|---|")
        for model_name, tensors, label, ms, ratio, slowest in rows:
            print(f"| {model_name} | {tensors} | {label} | {ms:.1f} | {ratio:.2f} | {slowest:.1f} |")

if __name__ == "__main__":
    main()
