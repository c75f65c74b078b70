"""NumPy implementation of the ops protocol (the reference backend)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .base import Ops

_NP_DTYPES = {
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "bool": np.bool_,
}


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes  # only needed for bf16 arrays; ships with TF and JAX

        return ml_dtypes.bfloat16
    try:
        return _NP_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_NP_DTYPES) + ['bfloat16']}") from None


def draws_for_distinct(n: int, k: int, have: int = 0) -> int:
    """How many uniform draws from ``range(n)`` to make so that, with ``have`` distinct
    values already drawn, about ``k`` distinct ones are reached (the expectation plus a
    margin, so that one batch nearly always suffices; ``2 * k <= n``)."""
    expected = n * (math.log1p(-have / n) - math.log1p(-k / n))
    return int(expected * 1.02 + 3.0 * math.sqrt(k - have) + 16)


def _first_distinct(generator: np.random.Generator, n: int, k: int) -> np.ndarray:
    """The first ``k`` distinct values of a stream of uniform draws from ``range(n)``,
    ascending: a uniform random ``k``-subset (each new distinct value is uniform over
    those not yet drawn), in ``O(k log k)`` rather than a permutation of ``n``."""
    draws = generator.integers(0, n, size=draws_for_distinct(n, k), dtype=np.int64)
    while True:
        values, first = np.unique(draws, return_index=True)
        if values.shape[0] >= k:
            break
        more = generator.integers(0, n, size=draws_for_distinct(n, k, values.shape[0]), dtype=np.int64)
        draws = np.concatenate([draws, more])
    if values.shape[0] > k:  # keep the k drawn first
        values = values[first <= np.partition(first, k - 1)[k - 1]]
    return values


class NumpyOps(Ops):
    """Ops over ``numpy.ndarray``."""

    name = "numpy"

    @staticmethod
    def owns(x: Any) -> bool:
        return isinstance(x, (np.ndarray, np.generic))

    def dtype(self, x):
        name = np.asarray(x).dtype.name
        return "bool" if name == "bool" else name

    def numel(self, x):
        return int(np.size(x))

    def shape(self, x):
        return tuple(int(d) for d in np.shape(x))

    def reshape(self, x, shape):
        return np.reshape(x, tuple(shape))

    def cast(self, x, dtype):
        return np.asarray(x).astype(_np_dtype(dtype), copy=False)

    def bitcast(self, x, dtype):
        return np.ascontiguousarray(x).view(_np_dtype(dtype))

    def concat(self, xs: Sequence[Any]):
        return np.concatenate([np.asarray(x).reshape(-1) for x in xs])

    def to_numpy(self, x):
        return np.array(x, copy=True)

    def from_numpy(self, a, like):
        return np.asarray(a)

    def zeros(self, n, dtype, like):
        return np.zeros(int(n), dtype=_np_dtype(dtype))

    def arange(self, n, like):
        return np.arange(int(n), dtype=np.int64)

    def abs(self, x):
        return np.abs(x)

    def sign(self, x):
        return np.sign(x)

    def floor(self, x):
        return np.floor(x)

    def sqrt(self, x):
        return np.sqrt(x)

    def log(self, x):
        return np.log(x)

    def exp(self, x):
        return np.exp(x)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def minimum(self, a, b):
        return np.minimum(a, b)

    def isfinite(self, x):
        return np.isfinite(x)

    def sum(self, x, axis=None):
        return np.sum(x, axis=axis, dtype=np.asarray(x).dtype if np.asarray(x).dtype.kind == "f" else None)

    def max(self, x, axis=None):
        return np.max(x, axis=axis)

    def item(self, x):
        return np.asarray(x).item()

    def kth_largest(self, x, k):
        n = x.shape[0]
        return np.partition(x, n - k)[n - k]

    def nonzero(self, mask):
        return np.flatnonzero(mask).astype(np.int64, copy=False)

    def gather(self, x, idx):
        return x[idx]

    def scatter(self, n, idx, values):
        out = np.zeros(int(n), dtype=values.dtype)
        out[idx] = values
        return out

    def sort(self, x):
        return np.sort(x)

    def matmul(self, a, b):
        return np.matmul(a, b)

    def transpose(self, x):
        return np.transpose(x)

    def bitwise_and(self, a, b):
        return np.bitwise_and(a, b)

    def bitwise_or(self, a, b):
        return np.bitwise_or(a, b)

    def shift_left(self, a, b):
        return np.left_shift(a, b)

    def shift_right(self, a, b):
        return np.right_shift(a, b)

    def pack_bits(self, mask):
        n = mask.shape[0]
        packed = np.packbits(mask.astype(np.bool_, copy=False), bitorder="little")
        pad = (-packed.shape[0]) % 4
        if pad:
            packed = np.concatenate([packed, np.zeros(pad, np.uint8)])
        words = packed.view("<i4")
        assert words.shape[0] == -(-n // 32)
        return words.astype(np.int32, copy=False)

    def unpack_bits(self, words, n):
        raw = np.ascontiguousarray(words, dtype="<i4").view(np.uint8)
        return np.unpackbits(raw, count=int(n), bitorder="little").astype(np.bool_)

    def uint_to_bits(self, v, bits):
        shifts = np.arange(bits, dtype=np.int64)
        return ((v.astype(np.int64)[:, None] >> shifts) & 1).astype(np.bool_).reshape(-1)

    def bits_to_uint(self, b, bits):
        weights = np.int64(1) << np.arange(bits, dtype=np.int64)
        return (b.reshape(-1, bits).astype(np.int64) * weights).sum(axis=1)

    def pack_uint(self, v, bits):
        if 32 % bits:  # fields straddle words: use the generic bit stream
            return super().pack_uint(v, bits)
        per = 32 // bits
        pad = (-v.shape[0]) % per
        u = v.astype(np.uint64)
        if pad:
            u = np.concatenate([u, np.zeros(pad, np.uint64)])
        shifts = np.arange(per, dtype=np.uint64) * np.uint64(bits)
        words = np.bitwise_or.reduce(u.reshape(-1, per) << shifts, axis=1)
        return words.astype("<u4").view("<i4").astype(np.int32, copy=False)

    def unpack_uint(self, words, n, bits):
        if 32 % bits:
            return super().unpack_uint(words, n, bits)
        per = 32 // bits
        u = np.ascontiguousarray(words, dtype="<i4").view("<u4").astype(np.int64)
        shifts = np.arange(per, dtype=np.int64) * bits
        return ((u[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[: int(n)]

    @staticmethod
    def _generator(key, counter):
        return np.random.Generator(np.random.Philox(key=int(key), counter=int(counter)))

    def random_uniform(self, n, key, counter, like):
        return self._generator(key, counter).random(int(n), dtype=np.float32)

    def random_choice(self, n, k, key, counter, like):
        n, k = int(n), int(k)
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        if k >= n:
            return np.arange(n, dtype=np.int64)
        generator = self._generator(key, counter)
        if 2 * k > n:  # draw the n - k left out: fewer draws, then one pass over n
            keep = np.ones(n, dtype=np.bool_)
            keep[_first_distinct(generator, n, n - k)] = False
            return np.flatnonzero(keep).astype(np.int64, copy=False)
        return _first_distinct(generator, n, k)

    # -- selection kernels
    def count_true(self, mask):
        return int(np.count_nonzero(mask))

    def all_finite(self, x):
        x = np.asarray(x)
        if x.size <= 1 << 16:  # one fused pass; its bool temporary is small
            return np.bool_(np.isfinite(x).all())
        # min and max propagate NaN and show an Inf: two reductions, no temporary array
        return np.bool_(np.isfinite(x.min()) and np.isfinite(x.max()))

    def nonzero_magnitude_at_least(self, x, threshold):
        if not isinstance(threshold, (int, float)):
            threshold = np.asarray(threshold).reshape(-1)[0]
        t = x.dtype.type(threshold)
        keep = np.abs(x)
        keep = ~(keep < t)  # true for NaN
        if not t > 0:  # a threshold of 0 (or NaN) passes zeros too: drop them
            keep &= x != 0
        return np.flatnonzero(keep)

    def choose(self, cond, a, b):
        return a if bool(cond) else b

    def index_update(self, x, idx, values):
        out = np.array(x, copy=True)
        out[idx] = values
        return out

    def topk_indices(self, x, k):
        n = x.shape[0]
        if 0 < k < n:
            # the k-th largest (NaN sorts last, as the largest); when exactly k elements
            # are not below it they are the answer, already ascending (no tie to break)
            kth = np.partition(x, n - k)[n - k]
            idx = np.flatnonzero(~(x < kth))
            if idx.shape[0] == k:
                return idx.astype(np.int64, copy=False)
        return super().topk_indices(x, k)
