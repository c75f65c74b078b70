"""CPU per ``Grace.step`` of the sparse methods with their aggregate summed from the
payloads (``Compressor.decompress_sum``) and with each payload decompressed into a
dense array and the dense arrays added (the path of methods without the hook).

Two simulated workers (``LocalSimulator``), both variants interleaved in one process;
each figure is the process's CPU time (``time.process_time``, so that time spent
descheduled on a shared machine is not counted) of one simulator step divided by the
two workers, best and median of ``--repeats`` steps (fewer at 1e6 and above; the
process's CPU time includes the frameworks' background threads, whose rare long
bursts make a mean meaningless). Checks that
both variants give every worker the same bits.

    PYTHONPATH=. python benchmarks/sparse_aggregate.py --backend numpy
    PYTHONPATH=. python benchmarks/sparse_aggregate.py --backend torch --size 1e4 1e6
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import grace_dl

METHODS = (("topk", {"ratio": 0.01}), ("dgc", {"ratio": 0.001}))
WORKERS = 2


def simulator(method: str, params: dict, dense: bool) -> grace_dl.LocalSimulator:
    sim = grace_dl.LocalSimulator(grace_dl.make(method, **params), WORKERS)
    if dense:
        for worker in sim.workers:
            worker.compressor.decompress_sum = lambda *args, **kwargs: None  # no shortcut: decompress each
    return sim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["numpy", "torch"], default="numpy")
    parser.add_argument("--size", type=float, nargs="+", default=[1e4, 1e6])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    convert = np.asarray
    if args.backend == "torch":
        import torch

        torch.set_num_threads(1)
        convert = torch.from_numpy
    print(f"backend {args.backend}, {WORKERS} workers, load average {os.getloadavg()[0]:.1f}")
    print("| method | elements | dense us (best / median) | summed us (best / median) | ratio best | ratio median |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, params in METHODS:
        for n in map(int, args.size):
            rng = np.random.default_rng(0)
            grads = [[{"g": convert(rng.standard_normal(n).astype(np.float32))} for _ in range(WORKERS)]
                     for _ in range(4)]
            sims = {"dense": simulator(method, params, True), "summed": simulator(method, params, False)}
            for sim in sims.values():  # warm-up (DGC's warm-up schedule starts, buffers allocate)
                for i in range(3):
                    sim.step(grads[i])
            times: dict[str, list[float]] = {v: [] for v in sims}
            repeats = args.repeats if n < 1_000_000 else max(3, args.repeats // 7)
            for r in range(repeats):
                for variant, sim in sims.items():
                    start = time.process_time()
                    sim.step(grads[r % 4])
                    times[variant].append((time.process_time() - start) / WORKERS * 1e6)
            outs = [sim.step(grads[0]) for sim in sims.values()]
            for r in range(WORKERS):
                a, b = (np.asarray(out[r]["g"]) for out in outs)
                assert a.tobytes() == b.tobytes(), f"{method} {n}: the two paths differ on worker {r}"
            best = {v: min(t) for v, t in times.items()}
            median = {v: float(np.median(t)) for v, t in times.items()}
            label = f"{method} {params['ratio']}"
            print(f"| {label} | {n:.0e} | {best['dense']:.0f} / {median['dense']:.0f} | "
                  f"{best['summed']:.0f} / {median['summed']:.0f} | {best['dense'] / best['summed']:.2f} | "
                  f"{median['dense'] / median['summed']:.2f} |")


if __name__ == "__main__":
    main()
