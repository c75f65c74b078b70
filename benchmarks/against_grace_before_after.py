"""GRACE's torch compressors, a previous grace-dl tree and the current one, side by side.

``grace-dl bench --against-grace`` compares one grace-dl tree with GRACE; to show what a
change bought, this script times three round trips (compress + decompress, torch CPU,
one thread) interleaved in one process, in rotating order, each with a copy of the
tensor timed just before: GRACE's, the previous tree's (loaded under the name
``_grace_dl_before``) and the current tree's (``grace_dl`` from ``PYTHONPATH``). Each
figure is the best of ``--repeats`` timings. On a shared machine use the default clock,
the process's CPU time, so that time spent descheduled by other jobs is not counted
(``--wall`` for wall time, as ``grace-dl bench`` measures).

    git archive <commit> grace_dl | tar -x -C /tmp/before
    PYTHONPATH=. python benchmarks/against_grace_before_after.py --before /tmp/before \\
        --grace /path/to/grace --size 1e4 1e6 --method qsgd --method terngrad
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable


def load_tree(name: str, root: Path) -> None:
    """Import the ``grace_dl`` package under ``root`` as package ``name`` (its modules
    import one another relatively, so the copy runs beside the current tree)."""
    init = root / "grace_dl" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--before: {root} holds no grace_dl/__init__.py")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, type=Path, help="root of the previous tree (holding grace_dl/)")
    parser.add_argument("--grace", required=True, help="a checkout of sands-lab/grace")
    parser.add_argument("--size", nargs="+", type=float, default=[1e4, 1e6], help="element counts (default 1e4 1e6)")
    parser.add_argument("--method", action="append", help="grace-dl method names (default: all GRACE has)")
    parser.add_argument("--repeats", type=int, default=9, help="timings per round trip, best kept (default 9)")
    parser.add_argument("--wall", action="store_true", help="wall time instead of the process's CPU time")
    args = parser.parse_args(argv)
    clock: Callable[[], float] = time.perf_counter if args.wall else time.process_time

    import torch

    from grace_dl import bench as current

    torch.set_num_threads(1)
    load_tree("_grace_dl_before", args.before)
    before = importlib.import_module("_grace_dl_before.bench")
    # each tree's own backend: get_ops of either tree may hand out the other's
    ops_before = importlib.import_module("_grace_dl_before.torch.ops").TorchOps()
    ops_current = importlib.import_module("grace_dl.torch.ops").TorchOps()
    methods = args.method or [m for m in current.GRACE_METHODS if m != "natural"]
    grace = current.load_grace(args.grace, methods)

    def timing(fn: Callable[[], Any], number: int) -> float:
        start = clock()
        for _ in range(number):
            fn()
        return (clock() - start) / number

    print("| method | elements | GRACE us | before us | after us | speedup before | speedup after | after / before |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.size:
        numel = int(size)
        for method in methods:
            entry = current.GRACE_METHODS[method]
            case = current._make_case(method, numel, "torch", entry.params)
            case.ops = ops_current
            old = before._make_case(method, numel, "torch", entry.params)
            old.ops, old.x = ops_before, case.x  # the same tensor
            sides = {"GRACE": current._grace_round_trip(method, grace[method], case.x, case.shape, case.sync),
                     "before": old.round_trip, "after": case.round_trip}
            numbers = {k: current._calls_per_timing(f) for k, f in sides.items()}
            copies = current._calls_per_timing(case.copy_synced)
            best = dict.fromkeys(sides, math.inf)
            order = list(sides)
            for i in range(args.repeats):
                for key in order[i % 3:] + order[:i % 3]:
                    timing(case.copy_synced, copies)  # the same cache state before each side
                    best[key] = min(best[key], timing(sides[key], numbers[key]))
            g, b, a = best["GRACE"], best["before"], best["after"]
            print(f"| {method} | {numel:.0e} | {g * 1e6:.1f} | {b * 1e6:.1f} | {a * 1e6:.1f} | {g / b:.2f} | "
                  f"{g / a:.2f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
