"""Run under ``horovodrun -np 2``: horovod.tensorflow collectives through grace-dl's
transport, every method against the simulator, and Horovod's own compression unchanged."""

from __future__ import annotations

import os
import sys

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(__file__))
import grace_dl.tensorflow as grace  # noqa: E402
from common import check_methods_against_simulator  # noqa: E402


def say(msg: str) -> None:
    print(f"rank {hvd.rank()}: {msg}", flush=True)


def check_collectives() -> None:
    t = grace.HorovodTFTransport()
    r, n = t.rank, t.size
    for dtype in (tf.float32, tf.float16, tf.float64, tf.int32, tf.int64):
        buf = tf.cast(tf.range(5) + 10 * r, dtype)
        got = t.wait(t.allreduce_async(buf, f"ar.{dtype.name}"))
        want = sum(tf.cast(tf.range(5) + 10 * q, dtype) for q in range(n))
        assert np.array_equal(got.numpy(), want.numpy()), (dtype, got, want)
    got = t.wait(t.allgather_async(tf.fill([r + 2], r), "ag.var"))
    assert [g.numpy().tolist() for g in got] == [[q] * (q + 2) for q in range(n)], got
    got = t.wait(t.allgather_async(tf.fill([3], float(r)), "ag.eq", equal_sizes=True))
    assert [g.numpy().tolist() for g in got] == [[float(q)] * 3 for q in range(n)], got
    root = n - 1
    got = t.wait(t.broadcast_async(tf.range(4, dtype=tf.float32) * (r + 1), root, "bc"))
    assert np.array_equal(got.numpy(), np.arange(4, dtype=np.float32) * (root + 1)), got
    say("collectives ok (allreduce 5 dtypes, allgather variable and equal sizes, broadcast)")


def check_horovod_own_compression() -> None:
    w = tf.Variable(tf.ones([4, 3]))
    x = tf.constant(np.random.default_rng(hvd.rank()).standard_normal((8, 4)).astype(np.float32))
    for label, compression in (("none", hvd.Compression.none), ("fp16", hvd.Compression.fp16)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.matmul(x, w) ** 2)
        tape = hvd.DistributedGradientTape(tape, compression=compression)
        (grad,) = tape.gradient(loss, [w])
        gathered = hvd.allgather(tf.reshape(grad, [1, -1]), name=f"check.{label}")
        assert np.array_equal(gathered[0].numpy(), gathered[1].numpy()), label
    say("hvd.Compression.none/fp16 unchanged with DistributedGradientTape")


def main() -> None:
    hvd.init()
    check_collectives()
    count = check_methods_against_simulator(
        hvd.rank(), hvd.size(), grace.HorovodTFTransport, tf.constant, lambda t: t.numpy())
    say(f"methods ok: {count} method/communicator cases bit-identical to the simulator")
    check_horovod_own_compression()
    say("ALL OK")


if __name__ == "__main__":
    main()
