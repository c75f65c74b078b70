"""Micro-benchmark: compress + decompress time per element against a memory copy of the
same tensor measured in the same run, and wire bits per element against the formula.

Timings on a shared machine are noisy, so the figure to compare is the ratio to the copy
measured alongside, not the absolute time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .core import TensorContext, derive_key, run_alone
from .ops import DTYPE_ITEMSIZE, get_ops
from .registry import make


@dataclass
class BenchResult:
    """One benchmark row."""

    method: str
    numel: int
    backend: str
    ns_per_element: float
    copy_ns_per_element: float
    bits_per_element: float
    formula_bits_per_element: float | None

    @property
    def copy_multiple(self) -> float:
        """Compress+decompress time as a multiple of a memory copy."""
        return self.ns_per_element / self.copy_ns_per_element


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench(method: str, numel: int, *, backend: str = "numpy", repeats: int = 5,
          params: dict[str, Any] | None = None) -> BenchResult:
    """Time one method on a float32 normal tensor of ``numel`` elements.

    Args:
        method: registered method name.
        numel: tensor size.
        backend: ``"numpy"`` (default), ``"torch"`` (CPU) or ``"torch-cuda"``.
        repeats: best of this many timings (default 5).
        params: the method's parameters (default: its defaults).
    """
    grace = make(method, **(params or {}))
    comp = grace.compressor
    data = np.random.default_rng(0).standard_normal(numel).astype(np.float32)
    sync = lambda: None  # noqa: E731
    if backend in ("torch", "torch-cuda"):
        import torch

        x = torch.from_numpy(data)
        if backend == "torch-cuda":
            x = x.cuda()
            sync = torch.cuda.synchronize
        copy = lambda: x.clone()  # noqa: E731
    elif backend == "numpy":
        x = data
        copy = lambda: x.copy()  # noqa: E731
    else:
        raise ValueError(f"unknown backend {backend!r}; valid: numpy, torch, torch-cuda")
    ops = get_ops(x)
    # a square matrix where numel is a square (1e4, 1e6, 2.5e7), so low-rank methods
    # see a layer's weight matrix rather than a vector they would send dense
    side = math.isqrt(numel)
    shape = (side, side) if side * side == numel else (numel,)
    ctx = TensorContext(name="bench", shape=shape, numel=numel, dtype="float32", in_dtype="float32", step=0,
                        shared_key=derive_key(0, "bench"), worker_key=derive_key(0, "bench", 0), rank=0,
                        world_size=1)

    def round_trip():
        # compress_rounds, so that the bytes of collectives made while compressing
        # (PowerSGD's P, chunk norms) count, as the pipeline counts them
        sent: list[int] = []
        rounds = comp.compress_rounds(ops, x, ctx)
        payload = run_alone(rounds, lambda c: sent.append(ops.numel(c.buf) * DTYPE_ITEMSIZE[ops.dtype(c.buf)]))
        out = comp.decompress(ops, payload.buffer, ctx)
        sync()  # GPU kernels are asynchronous: time them to completion
        return payload.nbytes + sum(sent), out

    def copy_synced():
        copy()
        sync()

    payload_nbytes, out = round_trip()  # warm-up, and the payload whose size is reported
    t = _best_time(round_trip, repeats)
    t_copy = _best_time(copy_synced, repeats)
    formula = comp.payload_nbytes(numel, "float32", "float32")
    if hasattr(comp, "payload_nbytes_for_shape"):  # low rank: the size depends on the matrix shape
        formula = comp.payload_nbytes_for_shape(shape, "float32", 0)
    elif formula is None and hasattr(comp, "payload_nbytes_for"):
        # data-dependent sizes (threshold methods) are stated for the count sent
        formula = comp.payload_nbytes_for(int(np.count_nonzero(ops.to_numpy(out))), numel, "float32")
    if formula is not None and hasattr(comp, "rounds_nbytes"):  # collectives made while compressing
        formula += comp.rounds_nbytes(numel, "float32")
    return BenchResult(method, numel, backend, 1e9 * t / numel, 1e9 * t_copy / numel,
                       8 * payload_nbytes / numel, None if formula is None else 8 * formula / numel)


def format_table(rows: list[BenchResult]) -> str:
    """A Markdown table of benchmark rows."""
    lines = ["| method | elements | backend | ns/element | x memcpy | bits/element | formula |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        formula = "data-dependent" if r.formula_bits_per_element is None else f"{r.formula_bits_per_element:.3f}"
        lines.append(f"| {r.method} | {r.numel:.2g} | {r.backend} | {r.ns_per_element:.2f} | "
                     f"{r.copy_multiple:.1f} | {r.bits_per_element:.3f} | {formula} |")
    return "\n".join(lines)


