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


def kth_largest_value(x: np.ndarray, k: int) -> Any:
    """The ``k``-th largest element of 1-D ``x`` (NaN as the largest), ``1 <= k <= n``:
    ``np.partition(x, n - k)[n - k]``, except that a float array of which a quarter or
    more is zero is partitioned without its zeros (NumPy's introselect slows down ~40x
    on many equal values: 1.8 ms for 1e4 elements with 99% zeros, sorting takes 46 us);
    a zero answer comes back as +0."""
    n = x.shape[0]
    if n >= 64 and x.dtype.kind == "f":
        zeros = n - np.count_nonzero(x)
        if 4 * zeros >= n:
            upper = x[~(x <= 0)]  # the positives and NaN
            if k <= upper.shape[0]:
                return np.partition(upper, upper.shape[0] - k)[upper.shape[0] - k]
            if k <= upper.shape[0] + zeros:
                return x.dtype.type(0)
            lower = x[x < 0]
            j = k - upper.shape[0] - zeros
            return np.partition(lower, lower.shape[0] - j)[lower.shape[0] - j]
    return np.partition(x, n - k)[n - k]


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
        return kth_largest_value(x, k)

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
        v = np.asarray(v)
        n = v.shape[0]
        if bits in (1, 2, 4, 8):  # whole fields per byte: or shifted columns of bytes
            per = 8 // bits
            u = v.astype(np.uint8)
            pad = (-n) % (4 * per)
            if pad:
                u = np.concatenate([u, np.zeros(pad, np.uint8)])
            if per > 1:
                cols = u.reshape(-1, per)
                packed = cols[:, 0].copy()
                for j in range(1, per):
                    packed |= cols[:, j] << np.uint8(j * bits)
                u = packed
            return u.view("<i4").astype(np.int32, copy=False)
        if bits <= 16:
            return self._bytes_to_words(_pack_groups_of_eight(v, bits))
        # any other width: the little-endian bits of each value, cut to `bits`, as one stream
        width = 4 if bits <= 32 else 8
        u = v.astype(f"<u{width}")
        stream = np.unpackbits(u.view(np.uint8).reshape(n, width), axis=1, bitorder="little")[:, :bits]
        return self._bytes_to_words(np.packbits(stream.reshape(-1), bitorder="little"))

    def unpack_uint(self, words, n, bits):
        n = int(n)
        raw = np.ascontiguousarray(words, dtype="<i4").view(np.uint8)
        if bits in (1, 2, 4, 8):
            per = 8 // bits
            u = raw[: -(-n // per)]
            if per > 1:
                shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
                u = ((u[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)[:n]
            return u[:n].astype(np.int64)
        if bits <= 16:
            return _unpack_groups_of_eight(raw, n, bits)
        width = 4 if bits <= 32 else 8
        stream = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits)
        fields = np.zeros((n, 8 * width), np.uint8)
        fields[:, :bits] = stream
        return np.packbits(fields, axis=1, bitorder="little").view(f"<u{width}").reshape(-1).astype(np.int64)

    @staticmethod
    def _generator(key, counter):
        return np.random.Generator(np.random.Philox(key=int(key), counter=int(counter)))

    def random_uniform(self, n, key, counter, like):
        # the values of Generator(Philox(key, counter)).random(n, dtype=float32), made from
        # the raw 64-bit stream: each word gives two 32-bit draws, low half first, and a
        # draw u becomes (u >> 8) / 2**24, as the Generator does; ~25% faster than it
        n = int(n)
        raw = np.random.Philox(key=int(key), counter=int(counter)).random_raw(-(-n // 2))
        out = np.right_shift(raw.view("<u4")[:n], np.uint32(8)).astype(np.float32)
        out *= np.float32(2.0**-24)
        return out

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

    def index_subtract(self, x, idx, values):
        out = np.array(x, copy=True)
        out[idx] = np.take(x, idx) - values
        return out

    def pack_sparse(self, x, idx):
        k = idx.shape[0]
        buffer = np.empty(k * (1 + x.dtype.itemsize // 4), np.int32)
        buffer[:k] = idx  # one converting pass instead of a cast and a concatenation
        # the values gathered straight into the buffer (mode "clip" writes unbuffered;
        # the indices come from a selection, so none is out of range)
        np.take(x, idx, out=buffer[k:].view(x.dtype), mode="clip")
        return buffer

    def scatter_sparse(self, n, buffer, dtype):
        np_dtype = _np_dtype(dtype)
        k = buffer.shape[0] // (1 + np.dtype(np_dtype).itemsize // 4)
        out = np.zeros(int(n), np_dtype)
        # int64 indices: NumPy's fancy assignment is ~3x slower with int32 ones
        out[buffer[:k].astype(np.int64)] = buffer[k:].view(np_dtype)
        return out

    def nonzero_magnitude_at_least(self, x, threshold):
        if not isinstance(threshold, (int, float)):
            threshold = np.asarray(threshold).reshape(-1)[0]
        t = x.dtype.type(threshold)
        keep = np.abs(x)
        keep = ~(keep < t)  # true for NaN
        if not t > 0:  # a threshold of 0 (or NaN) passes zeros too: drop them
            keep &= x != 0
        return np.flatnonzero(keep)

    def read_flag(self, cond):
        return bool(cond)

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
            kth = kth_largest_value(x, k)
            idx = np.flatnonzero(~(x < kth))
            if idx.shape[0] == k:
                return idx.astype(np.int64, copy=False)
        return super().topk_indices(x, k)

    # -- quantization kernels
    @staticmethod
    def _bytes_to_words(packed: np.ndarray) -> np.ndarray:
        """Little-endian bytes as int32 words, the last word padded with zero bytes."""
        pad = (-packed.shape[0]) % 4
        if pad:
            packed = np.concatenate([packed, np.zeros(pad, np.uint8)])
        return packed.view("<i4").astype(np.int32, copy=False)

    def pack_signs(self, x):
        return self._bytes_to_words(np.packbits(x >= 0, bitorder="little"))

    def select_bits(self, words, n, on, off):
        # one row of 8 output values per byte of the bit stream, looked up in a 256-row table
        raw = np.ascontiguousarray(words, dtype="<i4").view(np.uint8)[: -(-int(n) // 8)]
        return np.take(_bit_table(np.asarray(on), np.asarray(off)), raw, axis=0).reshape(-1)[: int(n)]

    def full(self, n, value, dtype, like):
        return np.full(int(n), value, dtype=_np_dtype(dtype))

    def tree_sum(self, x, scale=1.0):
        n = x.shape[0]
        if n <= 1:
            out = x.copy() if n else np.zeros(1, x.dtype)
            return out * x.dtype.type(scale) if scale != 1.0 else out
        h = 1 << ((n - 1).bit_length() - 1)
        acc = np.empty(h, x.dtype)
        np.add(x[:n - h], x[h:], out=acc[:n - h])
        acc[n - h:] = x[n - h:h]  # carried unchanged
        return _halve(acc, h, scale)

    def abs_tree_sum(self, x, scale=1.0):
        n = x.shape[0]
        if n <= 1:
            return self.tree_sum(np.abs(x), scale)
        # the first level straight from x: |x_i| (carried ones included), then + |x_{i+h}|
        h = 1 << ((n - 1).bit_length() - 1)
        acc = np.abs(x[:h])
        acc[:n - h] += np.abs(x[h:])
        return _halve(acc, h, scale)

    def sign_means(self, x):
        mask = x >= 0
        # each side as x's bits anded with an all-ones or all-zeros word: np.where branches
        # per element and is 15x slower on random signs
        ints = np.dtype(f"i{x.dtype.itemsize}")
        bits = np.ascontiguousarray(x).view(ints)
        keep = np.negative(mask.view(np.uint8), dtype=ints)  # -1 where x >= 0, else 0
        pos = np.bitwise_and(bits, keep).view(x.dtype)
        neg = np.bitwise_and(bits, np.invert(keep, out=keep), out=keep).view(x.dtype)
        sums = np.concatenate([self.tree_sum(pos), self.tree_sum(neg)])
        positive = np.count_nonzero(mask)
        counts = np.array([max(positive, 1), max(x.shape[0] - positive, 1)], np.int64)
        return sums / counts.astype(x.dtype)

    def take_fields(self, words, n, bits, values):
        if bits not in (1, 2, 4, 8):
            return super().take_fields(words, n, bits, values)
        per = 8 // bits
        raw = np.ascontiguousarray(words, dtype="<i4").view(np.uint8)[: -(-int(n) // per)]
        if per == 1:
            return np.take(values, raw)
        # one row of `per` output values per byte, looked up in a 256-row table
        return np.take(np.take(values, _BYTE_FIELDS[bits]), raw, axis=0).reshape(-1)[: int(n)]

    def ternary_codes(self, x, bound, u):
        ratio = np.abs(x)
        np.divide(ratio, bound, out=ratio)
        keep = np.less(u, ratio).view(np.uint8)
        # 1 + keep - 2 (keep and x < 0), in bytes: no branch per element
        codes = np.add(keep, 1, dtype=np.uint8)
        codes -= np.left_shift(keep & (x < 0).view(np.uint8), 1)
        return codes

    def power_of_two_codes(self, x, r):
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32)
        mag = bits & np.int32(0x7FFFFFFF)
        e = mag >> 23
        up = (r < (mag & np.int32(0x7FFFFF))) & (e < 254)
        e += up
        # the sign adds 256 where e > 0; no branch per element
        e |= ((bits < 0) & (e > 0)).view(np.uint8).astype(np.int32) << 8
        np.copyto(e, np.int32(256), where=mag > 0x7F800000)  # NaN: rare, so cheap
        return e

    def power_of_two_values(self, codes):
        codes = np.asarray(codes).astype(np.int32, copy=False)
        bits = (codes & 255) << 23
        bits |= (codes >> 8) << 31  # codes < 512: bit 8 is the sign
        np.copyto(bits, np.int32(0x7FC00000), where=codes == 256)
        return bits.view(np.float32)

    def bfloat16_words(self, x):
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        # round to nearest even on the dropped half; no finite value carries into the sign
        halves = ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
        nan = np.isnan(x)
        np.copyto(halves, ((u >> 16) & np.uint32(0x8000)).astype(np.uint16) | np.uint16(0x7FC0), where=nan)
        if halves.shape[0] % 2:
            halves = np.concatenate([halves, np.zeros(1, np.uint16)])
        return halves.astype("<u2", copy=False).view("<i4").astype(np.int32, copy=False)

    def dither_codes(self, y, u, levels):
        if y.dtype != np.float32:
            return super().dither_codes(y, u, levels)
        # branch-free on the bits: np.where on data-dependent masks is 15x slower
        mag = np.abs(y)
        mag = np.minimum(mag, mag * np.float32(0) + np.float32(1))  # +-inf becomes NaN, as NaN
        a = mag.view(np.int32)
        top = (a >= (128 - levels) << 23) & (a <= 0x7F800000)  # |y| >= 2**(1-s); NaN is not
        keep = np.negative(top.view(np.uint8), dtype=np.int32)  # -1 where top
        fraction_top = ((a & 0x7FFFFF).astype(np.float32) * np.float32(2.0 ** -23)).view(np.int32)
        fraction_low = (mag * np.float32(2.0 ** (levels - 1))).view(np.int32)
        fraction = ((fraction_top & keep) | (fraction_low & ~keep)).view(np.float32)
        k = (((a >> 23) - (127 - levels)) & keep) + (u < fraction)
        negative = np.negative((y < 0).view(np.uint8), dtype=np.int32)
        return levels + k - ((k << 1) & negative)

    def dither_values(self, codes, levels, dtype):
        if dtype != "float32":
            return super().dither_values(codes, levels, dtype)
        signed = np.asarray(codes).astype(np.int32) - np.int32(levels)
        k = np.abs(signed)
        present = np.negative((k > 0).view(np.uint8), dtype=np.int32)
        bits = ((k + (127 - levels)) << 23) & present
        bits |= (signed >> 31) << 31  # the sign; a negative code always has k > 0
        return bits.view(np.float32)


    def clip_magnitude(self, x, bound):
        b = np.asarray(bound).reshape(-1)[0]
        if b != b:
            return np.full(x.shape, np.nan, x.dtype)
        out = np.minimum(x, b)  # NaN stays NaN
        np.maximum(out, -b, out=out)
        # +-inf must come out NaN: two reductions (no temporary) find whether any is there
        if x.shape[0] and not (np.isfinite(x.min()) and np.isfinite(x.max())):
            out += x * x.dtype.type(0)
        return out

    def bucket_levels(self, grid, noise, levels):
        # the protocol's arithmetic, in place: two temporaries of the grid's size, not six
        dtype = grid.dtype.type
        mag = np.abs(grid)
        peak = mag.max(axis=1)
        peak = np.where(peak > 0, peak, peak * dtype(0) + dtype(1))  # NaN stays NaN
        unit = grid / peak[:, None]
        np.multiply(unit, unit, out=unit)
        norms = np.sqrt(np.sum(unit, axis=1, dtype=grid.dtype)) * peak
        safe = np.where(norms > 0, norms, norms * dtype(0) + dtype(1))
        np.divide(mag, safe[:, None], out=mag)
        np.multiply(mag, levels, out=mag)
        np.add(mag, noise, out=mag)
        np.floor(mag, out=mag)
        np.minimum(mag, np.full(1, levels, grid.dtype), out=mag)
        # sign(g) * level as level with g's sign: level is 0 where g is +-0, NaN where g is
        np.copysign(mag, grid, out=mag)
        np.add(mag, levels, out=mag)
        return norms, mag.reshape(-1).astype(np.int32)


    def scale_buckets(self, x, scales, bucket_size):
        # whole buckets as one broadcast product, the short one apart: no padded copy
        n = x.shape[0]
        full = n // bucket_size
        out = np.empty(n, np.result_type(x, scales))
        body = full * bucket_size
        np.multiply(x[:body].reshape(full, bucket_size), scales[:full, None], out=out[:body].reshape(full, bucket_size))
        if body < n:
            np.multiply(x[body:], scales[full], out=out[body:])
        return out


#: field j of byte value b for fields of 1, 2 and 4 bits, as (256, 8 / bits) index tables
_BYTE_FIELDS = {bits: (np.arange(256)[:, None] >> (np.arange(8 // bits) * bits)) & ((1 << bits) - 1)
                for bits in (1, 2, 4)}

#: bit j of byte value b, as a (256, 8) bool table
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(np.bool_)

#: recent (256, 8) tables of select_bits, by dtype and the bits of ``on`` and ``off``: the
#: sign methods' +-1 tables repeat every call
_BIT_TABLES: dict = {}


def _bit_table(on: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Row ``b``: ``on`` where bit ``j`` of byte value ``b`` is set, else ``off``."""
    key = (on.dtype.str, on.tobytes(), off.tobytes())
    table = _BIT_TABLES.get(key)
    if table is None:
        table = np.where(_BYTE_BITS, np.reshape(on, (1, 1)), np.reshape(off, (1, 1)))
        table.flags.writeable = False
        if len(_BIT_TABLES) >= 8:
            _BIT_TABLES.clear()
        _BIT_TABLES[key] = table
    return table


def _halve(acc: np.ndarray, h: int, scale: float) -> np.ndarray:
    """The rest of :meth:`Ops.tree_sum` on its ``h`` (a power of two) first-level sums,
    in place: halves added until one is left, times ``scale``."""
    while h > 1:
        h //= 2
        np.add(acc[:h], acc[h:2 * h], out=acc[:h])
    if scale != 1.0:
        np.multiply(acc[:1], acc.dtype.type(scale), out=acc[:1])
    return acc[:1]


def _pack_groups_of_eight(v: np.ndarray, bits: int) -> np.ndarray:
    """The bit stream of ``bits``-wide fields (``bits <= 16``) as bytes: eight fields make
    ``bits`` bytes, built as two little-endian 64-bit accumulators per group of eight."""
    n = v.shape[0]
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, np.uint64)
    padded[:n] = v
    fields = np.ascontiguousarray(padded.reshape(groups, 8).T)  # field j of each group: row j
    lo = np.zeros(groups, "<u8")
    hi = np.zeros(groups, "<u8")
    for j in range(8):
        shift = bits * j
        if shift < 64:
            lo |= fields[j] << np.uint64(shift)  # bits past 63 fall off, into hi below
            if shift + bits > 64:
                hi |= fields[j] >> np.uint64(64 - shift)
        else:
            hi |= fields[j] << np.uint64(shift - 64)
    out = np.concatenate([lo.view(np.uint8).reshape(groups, 8), hi.view(np.uint8).reshape(groups, 8)], axis=1)
    return out[:, :bits].reshape(-1)[: -(-n * bits // 8)]


def _unpack_groups_of_eight(raw: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_groups_of_eight`: ``n`` int64 fields from the bytes ``raw``."""
    groups = -(-n // 8)
    take = min(raw.shape[0], groups * bits)
    stream = np.zeros(groups * bits, np.uint8)
    stream[:take] = raw[:take]
    buf = np.zeros((groups, 16), np.uint8)
    buf[:, :bits] = stream.reshape(groups, bits)
    halves = np.ascontiguousarray(buf.view("<u8").T)  # rows: low and high 64 bits of each group
    lo, hi = halves[0], halves[1]
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((8, groups), np.uint64)  # field j of each group: row j
    for j in range(8):
        shift = bits * j
        if shift + bits <= 64:
            np.bitwise_and(lo >> np.uint64(shift), mask, out=out[j])
        elif shift < 64:
            np.bitwise_and((lo >> np.uint64(shift)) | (hi << np.uint64(64 - shift)), mask, out=out[j])
        else:
            np.bitwise_and(hi >> np.uint64(shift - 64), mask, out=out[j])
    return out.T.reshape(-1)[:n].astype(np.int64)
