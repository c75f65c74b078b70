"""Run under ``mpirun -np 2``: grace-dl's mpi4py transport for NumPy arrays."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import check_methods_against_simulator  # noqa: E402
from grace_dl.transport.mpi import MPITransport  # noqa: E402


def main() -> None:
    t = MPITransport()
    r, n = t.rank, t.size
    for dtype in (np.float32, np.float16, np.float64, np.int32, np.int64):
        got = t.wait(t.allreduce_async((np.arange(5) + 10 * r).astype(dtype), "ar"))
        want = sum((np.arange(5) + 10 * q).astype(dtype) for q in range(n))
        assert got.dtype == dtype and np.array_equal(got, want), (dtype, got, want)
    got = t.wait(t.allgather_async(np.full(r + 2, r, np.int32), "ag"))
    assert [g.tolist() for g in got] == [[q] * (q + 2) for q in range(n)], got
    got = t.wait(t.allgather_async(np.full(3, r, np.float16), "ag16", equal_sizes=True))
    assert [g.tolist() for g in got] == [[float(q)] * 3 for q in range(n)], got
    got = t.wait(t.broadcast_async(np.arange(4, dtype=np.float32) * (r + 1), n - 1, "bc"))
    assert np.array_equal(got, np.arange(4, dtype=np.float32) * n), got
    print(f"rank {r}: collectives ok", flush=True)
    count = check_methods_against_simulator(r, n, lambda: t, lambda a: a.copy(), lambda a: np.asarray(a))
    print(f"rank {r}: methods ok: {count} method/communicator cases bit-identical to the simulator", flush=True)
    print(f"rank {r}: ALL OK", flush=True)


if __name__ == "__main__":
    main()
