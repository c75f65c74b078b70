"""Shared test helpers."""

from __future__ import annotations

import numpy as np

from grace_dl.core import TensorContext, derive_key


def make_ctx(numel: int, *, dtype: str = "float32", in_dtype: str | None = None, step: int = 0,
             name: str = "t", seed: int = 0, rank: int = 0, world_size: int = 1) -> TensorContext:
    """A TensorContext for calling a compressor directly."""
    return TensorContext(name=name, shape=(numel,), numel=numel, dtype=dtype, in_dtype=in_dtype or dtype,
                         step=step, shared_key=derive_key(seed, name), worker_key=derive_key(seed, name, rank),
                         rank=rank, world_size=world_size)


def normal(n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Standard normal test data."""
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)
