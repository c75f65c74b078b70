"""grace-dl on rank 0 and Horovod's own compression (``hvd.Compression.none``) on rank 1:
the job must end with an error that says so, within a minute of the first step.

    horovodrun -np 2 --gloo python tests/multirank/mixed_compression.py torch|tf

torch: Horovod pairs grace-dl's empty placeholder with rank 1's gradient and reports a
shape mismatch on both ranks; rank 0 re-raises it as grace-dl's CompressionMismatchError.
TF: Horovod's collectives are never paired and have no time-out; rank 0 gives up after
grace-dl's first-step time limit (GRACE_DL_FIRST_STEP_TIMEOUT, 30 s) and raises. Each
rank prints ``rank <r>: <error class>: <message> after <seconds since the first step> s``
and exits with status 1, which ends the job.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_torch() -> tuple[int, float]:
    import horovod.torch as hvd
    import torch

    import grace_dl.torch as grace

    hvd.init()
    torch.set_num_threads(1)
    rank = hvd.rank()
    net = torch.nn.Linear(4, 3)
    compression = grace.topk(ratio=0.5) if rank == 0 else hvd.Compression.none
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                   named_parameters=net.named_parameters(), compression=compression)
    start = time.perf_counter()
    try:
        for _ in range(3):
            opt.zero_grad()
            net(torch.ones(2, 4)).pow(2).sum().backward()
            opt.step()
    except Exception as err:  # noqa: BLE001
        report(rank, err, start)
    return rank, start


def run_tf() -> tuple[int, float]:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import grace_dl.tensorflow as grace

    hvd.init()
    rank = hvd.rank()
    w = tf.Variable(tf.ones([4, 3]), name="w")
    x = tf.constant(np.ones((2, 4), np.float32))
    compression = grace.topk(ratio=0.5) if rank == 0 else hvd.Compression.none
    start = time.perf_counter()
    try:
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.matmul(x, w) ** 2)
            hvd.DistributedGradientTape(tape, compression=compression).gradient(loss, [w])
    except Exception as err:  # noqa: BLE001
        report(rank, err, start)
    return rank, start


def report(rank: int, err: Exception, start: float) -> None:
    # TF quotes the Python exception of a py_function inside its UnknownError: show that line
    lines = [line for line in str(err).splitlines() if "Error" in line] or [str(err).splitlines()[0]]
    print(f"rank {rank}: {type(err).__name__}: {lines[-1].strip()} after {time.perf_counter() - start:.1f} s",
          flush=True)
    sys.stdout.flush()
    os._exit(1)  # the launcher then ends the job (the other rank may wait in a collective for ever)


if __name__ == "__main__":
    rank, _ = run_torch() if sys.argv[1] == "torch" else run_tf()
    print(f"rank {rank}: trained although the ranks run different compressions", flush=True)
