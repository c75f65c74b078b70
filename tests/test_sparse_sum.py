"""The sum of sparse payloads without dense decompressions (Ops.scatter_sparse_sum, the
sparse methods' Compressor.decompress_sum) against the dense per-worker sum."""

from __future__ import annotations

import numpy as np
import pytest

# the data adds +inf and -inf on purpose (NaN, as in the dense sum)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

import grace_dl
from grace_dl.ops import get_ops

from helpers import normal

ops = get_ops(np.zeros(1, np.float32))
# NumPy (and torch on the CPU) scale only the held elements where the indices are few
# (a long array), the whole array otherwise (a short one)
LENGTHS = (40, 400)
SCALES = (1.0, 1 / 3)
ALL_NEGATIVE_ZERO = 7  # every worker sends -0.0 here: the one documented difference (+0.0, not -0.0)


def worker_buffers(dtype: str, with_empty: bool) -> list[np.ndarray]:
    """Three workers' sparse buffers (ascending distinct indices each, repeated across
    workers), with NaN, infinities of both signs and -0.0; with ``with_empty``, a fourth
    that sends nothing (a threshold method's empty payload)."""
    np_dtype = np.dtype(dtype)
    parts = [
        ([1, 3, 5, ALL_NEGATIVE_ZERO, 9, 12, 20, 30], [1.5, -0.0, np.nan, -0.0, np.inf, 2.0, -0.0, 1e-30]),
        ([3, 5, ALL_NEGATIVE_ZERO, 9, 12, 21, 30], [-0.0, 4.0, -0.0, -np.inf, -2.0, -0.0, -1e-30]),
        ([0, 4, 5, ALL_NEGATIVE_ZERO, 12, 20, 39], [0.25, -0.0, -1.0, -0.0, 0.1, 3.0, np.nan]),
    ]
    if with_empty:
        parts.insert(2, ([], []))
    # the layout of sparse_payload: int32 indices, then the values' words
    return [np.concatenate([np.asarray(idx, np.int32), np.asarray(values, np_dtype).view(np.int32)])
            for idx, values in parts]


def dense_sum(buffers: list[np.ndarray], dtype: str, n: int) -> np.ndarray:
    total = ops.scatter_sparse(n, buffers[0], dtype)
    for b in buffers[1:]:
        total = total + ops.scatter_sparse(n, b, dtype)
    return total


def assert_dense_sum(got: np.ndarray, buffers: list[np.ndarray], dtype: str, n: int, scale: float) -> None:
    """``got`` is the communicators' dense ``(d0 + d1 + ...) * scale``, but for the
    documented sign of zero."""
    want = dense_sum(buffers, dtype, n)
    every_worker_sent_it = all(b.size for b in buffers)
    assert want[ALL_NEGATIVE_ZERO] == 0 and np.signbit(want[ALL_NEGATIVE_ZERO]) == every_worker_sent_it
    want[ALL_NEGATIVE_ZERO] = 0.0  # +0.0 whether or not every worker sent -0.0 (the docstring's exception)
    if scale != 1.0:
        want = want * scale
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = np.isnan(want)
    assert nan.any() and np.array_equal(np.isnan(got), nan)
    # bit for bit elsewhere, signs of zeros included (3 and 21: -0.0 from some workers, none from others)
    assert got[~nan].tobytes() == want[~nan].tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_empty", [False, True])
def test_numpy_sum_equals_the_dense_sum(dtype, with_empty):
    from grace_dl.ops.base import Ops

    buffers = worker_buffers(dtype, with_empty)
    for n in LENGTHS:
        for scale in SCALES:
            assert_dense_sum(ops.scatter_sparse_sum(n, buffers, dtype, scale), buffers, dtype, n, scale)
            # the protocol's default (gather, add, update) gives the same bits
            assert_dense_sum(Ops.scatter_sparse_sum(ops, n, buffers, dtype, scale), buffers, dtype, n, scale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_sum_equals_the_dense_sum(dtype):
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    for with_empty in (False, True):
        buffers = worker_buffers(dtype, with_empty)
        for n in LENGTHS:
            for scale in SCALES:
                got = TorchOps().scatter_sparse_sum(n, [torch.from_numpy(b) for b in buffers], dtype, scale)
                assert_dense_sum(got.numpy(), buffers, dtype, n, scale)
                # the protocol's path, which torch takes off the CPU (a GPU)
                from grace_dl.ops.base import Ops
                got = Ops.scatter_sparse_sum(TorchOps(), n, [torch.from_numpy(b) for b in buffers], dtype, scale)
                assert_dense_sum(got.numpy(), buffers, dtype, n, scale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tf_sum_equals_the_dense_sum_eager_and_traced(dtype):
    tf = pytest.importorskip("tensorflow")
    from grace_dl.tensorflow import TFOps

    t_ops = TFOps()

    # lengths known only when the graph runs (threshold methods' payloads)
    n, scale = LENGTHS[0], SCALES[1]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)] * 4)
    def graph(*bs):
        return t_ops.scatter_sparse_sum(n, list(bs), dtype, scale)

    buffers = worker_buffers(dtype, with_empty=False)
    got = t_ops.scatter_sparse_sum(n, [tf.constant(b) for b in buffers], dtype)
    assert_dense_sum(got.numpy(), buffers, dtype, n, 1.0)
    buffers = worker_buffers(dtype, with_empty=True)
    assert_dense_sum(graph(*[tf.constant(b) for b in buffers]).numpy(), buffers, dtype, n, scale)


@pytest.mark.parametrize("method,kwargs", [("topk", {"ratio": 0.05}), ("dgc", {"ratio": 0.02}),
                                           ("threshold", {"threshold": 1.5})])
@pytest.mark.parametrize("communicator", ["allgather", "broadcast"])
@pytest.mark.parametrize("size", [1, 3])
def test_sparse_methods_aggregate_as_the_dense_path_does(method, kwargs, communicator, size):
    """A simulated run with the sparse sum gives every worker the same bits as with each
    payload decompressed and added (steps with error feedback carried over)."""
    sims = [grace_dl.LocalSimulator(grace_dl.make(method, communicator=communicator, **kwargs), size)
            for _ in range(2)]
    for w in sims[1].workers:
        w.compressor.decompress_sum = lambda *a, **k: None  # the dense path
    used = []
    original = sims[0].workers[0].compressor.decompress_sum
    sims[0].workers[0].compressor.decompress_sum = lambda *a, **k: used.append(1) or original(*a, **k)
    for step in range(3):
        grads = [{"g": normal(300, seed=10 * step + r)} for r in range(size)]
        outs = [sim.step(grads) for sim in sims]
        for r in range(size):
            assert outs[0][r]["g"].tobytes() == outs[1][r]["g"].tobytes(), (step, r)
    assert len(used) == 3


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_sparse_methods_aggregate_as_the_dense_path_does_on_torch_and_tf(backend):
    """The same on the framework backends (eager), three workers, mean and sum."""
    module = pytest.importorskip(backend)
    convert = module.from_numpy if backend == "torch" else module.constant
    for method, kwargs in [("topk", {"ratio": 0.05}), ("threshold", {"threshold": 1.5})]:
        for aggregate in ("mean", "sum"):
            sims = [grace_dl.LocalSimulator(grace_dl.make(method, aggregate=aggregate, **kwargs), 3)
                    for _ in range(2)]
            for w in sims[1].workers:
                w.compressor.decompress_sum = lambda *a, **k: None  # the dense path
            for step in range(2):
                grads = [{"g": convert(normal(300, seed=10 * step + r))} for r in range(3)]
                outs = [sim.step(grads) for sim in sims]
                for r in range(3):
                    got, want = (np.asarray(out[r]["g"]) for out in outs)
                    assert got.tobytes() == want.tobytes(), (method, aggregate, step, r)
