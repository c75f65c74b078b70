"""``Grace.step`` of a previous grace-dl tree and the current one, side by side.

The pipeline's per-step cost (compensate, compress, memory update, exchange,
decompress, aggregate) on one simulated worker (a ``LocalWorld`` of one), torch CPU,
one thread, both trees interleaved in one process in alternating order, each figure
the best of ``--repeats`` timings of the process's CPU time (``time.process_time``, so
that time spent descheduled on a shared machine is not counted).

    git archive <commit> grace_dl | tar -x -C /tmp/before
    PYTHONPATH=. python benchmarks/step_before_after.py --before /tmp/before \\
        --size 1e4 1e6 --method topk --method efsignsgd
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from against_grace_before_after import load_tree  # noqa: E402

#: parameters of the sparse methods (the defaults of GRACE's comparison)
PARAMS = {"topk": {"ratio": 0.01}, "dgc": {"ratio": 0.01}, "randomk": {"ratio": 0.01},
          "threshold": {"threshold": 0.01}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, type=Path, help="root of the previous tree (holding grace_dl/)")
    parser.add_argument("--size", nargs="+", type=float, default=[1e4, 1e6], help="element counts (default 1e4 1e6)")
    parser.add_argument("--method", action="append", help="method names (default: topk, efsignsgd)")
    parser.add_argument("--repeats", type=int, default=9, help="timings per side, best kept (default 9)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(1)
    load_tree("_grace_dl_before", args.before)
    trees = {"before": importlib.import_module("_grace_dl_before"), "after": importlib.import_module("grace_dl")}
    for tree in trees.values():
        name = tree.__name__
        importlib.import_module(name + ".transport.local")
        # each tree dispatches to its own backends (both lazy tables name grace_dl's)
        ops = importlib.import_module(name + ".ops")
        ops._LAZY_BACKENDS.clear()
        ops._LOADED[:] = [importlib.import_module(name + ".ops.numpy_backend").NumpyOps(),
                          importlib.import_module(name + ".torch.ops").TorchOps()]
    print("| method | elements | before us | after us | after / before |")
    print("|---|---:|---:|---:|---:|")
    for size in args.size:
        numel = int(size)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(numel).astype(np.float32))
        side = math.isqrt(numel)
        x = x.reshape(side, side) if side * side == numel else x
        for method in args.method or ["topk", "efsignsgd"]:
            steps = {}
            for key, tree in trees.items():
                grace = tree.make(method, **PARAMS.get(method, {}))
                grace.bind(sys.modules[tree.__name__ + ".transport.local"].LocalWorld(1).transports[0])
                for _ in range(3):  # past the first use's handshake
                    grace.step(x, "w")
                steps[key] = lambda grace=grace: grace.step(x, "w")
            start = time.perf_counter()
            steps["after"]()
            number = max(1, min(2000, int(0.05 / (time.perf_counter() - start))))
            best = dict.fromkeys(steps, math.inf)
            for i in range(args.repeats):
                for key in (["before", "after"] if i % 2 else ["after", "before"]):
                    start = time.process_time()
                    for _ in range(number):
                        steps[key]()
                    best[key] = min(best[key], (time.process_time() - start) / number)
            b, a = best["before"], best["after"]
            print(f"| {method} | {numel:.0e} | {b * 1e6:.1f} | {a * 1e6:.1f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
