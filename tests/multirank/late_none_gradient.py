"""A gradient that turns None at a later step on one rank only, on the graph path (top-k
inside ``tf.function``): the job must end with an error naming the variable, within a
minute of that step, and never hang.

    horovodrun -np 2 --gloo python tests/multirank/late_none_gradient.py

From step ``NONE_AT`` on, rank 1's loss does not use ``late_b``, so its gradient is None
there and rank 1 alone traces the step again, while rank 0 runs the step it traced before
and waits in its collectives. grace-dl's gradient check, run while rank 1 traces, gets no
answer within GRACE_DL_FIRST_STEP_TIMEOUT (30 s); rank 1 raises GradientMismatchError
(which TF's tracing wraps in a StagingError) and exits, and Horovod ends the job: rank 0's
collective fails with Horovod's shutdown error. Each rank prints ``rank <r>: step <s>
starts at <epoch seconds>`` before each step and ``rank <r>: <error class>: <message>
after <seconds since the step started> s`` when it fails, then lets the error end the
process as a user's script would.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

NONE_AT = 2
STEPS = 5


def main() -> None:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import grace_dl.tensorflow as grace

    hvd.init()
    rank = hvd.rank()
    w = tf.Variable(tf.ones([4, 3]), name="late_w")
    b = tf.Variable(tf.zeros([3]), name="late_b")
    x = tf.constant(np.ones((2, 4), np.float32))
    method = grace.topk(ratio=0.5)
    assert method.graph_path, "top-k left the graph path: this script checks the graph path"

    @tf.function
    def step(use_b: bool):
        with tf.GradientTape() as tape:
            out = tf.matmul(x, w)
            if use_b:  # a Python bool: a new value traces the step again
                out = out + b
            loss = tf.reduce_sum(out ** 2)
        return hvd.DistributedGradientTape(tape, compression=method).gradient(loss, [w, b])

    for s in range(STEPS):
        start = time.time()
        print(f"rank {rank}: step {s} starts at {start:.3f}", flush=True)
        try:
            step(not (rank == 1 and s >= NONE_AT))
        except Exception as err:
            text = str(err)
            lines = [line for line in text.splitlines() if "Error" in line or "Horovod has been shut down" in line]
            print(f"rank {rank}: {type(err).__name__}: {(lines or text.splitlines() or [''])[-1].strip()} "
                  f"after {time.time() - start:.1f} s", flush=True)
            raise
    print(f"rank {rank}: trained although rank 1's gradient for late_b turned None", flush=True)


if __name__ == "__main__":
    main()
