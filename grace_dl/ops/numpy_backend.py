"""NumPy implementation of the ops protocol (the reference backend)."""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Sequence

import numpy as np

from . import jit
from .base import Ops, level_bits, median_network, run_median_network

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


def _group_max_topk(x: np.ndarray, k: int) -> np.ndarray | None:
    """Ascending indices of the ``k`` largest elements of 1-D float ``x`` (``8 k <= n``),
    or None where the caller must select otherwise. The candidates are the elements not
    below ``t``, the k-th largest of the maxima of ``2 k`` disjoint groups (strided, so
    one elementwise reduction finds them): at least ``k`` elements (those maxima) are
    not below ``t``, so the candidates hold every element at or above the k-th largest,
    about ``1.4 k`` of them on a normal tensor, with no sample that can mislead. None
    where ``t`` or the k-th candidate is NaN, where a tie straddles the k-th value, or
    where the candidates are over a quarter of ``x`` (many equal values)."""
    n = x.shape[0]
    groups = 2 * k
    if not (0 < k and 4 * groups <= n):
        return None
    per_group = n // groups
    maxima = np.maximum.reduce(x[:groups * per_group].reshape(per_group, groups), axis=0)
    t = kth_largest_value(maxima, k)
    if t != t:
        return None
    candidates = np.flatnonzero(~(x < t))  # NaN is "not below"
    if candidates.shape[0] > n // 4:
        return None
    values = x[candidates]
    kth = kth_largest_value(values, k)
    chosen = np.flatnonzero(~(values < kth))
    return candidates[chosen] if chosen.shape[0] == k else None


_PHILOX = threading.local()
_WORD = (1 << 64) - 1


def _philox(key: int, counter: int) -> np.random.Philox:
    """``np.random.Philox(key=key, counter=counter)``, as this thread's one instance with
    its state set: constructing a Philox takes ~9 us, setting the state of one ~1 us
    (random methods draw once per tensor and step)."""
    if not (0 <= key < 1 << 128 and 0 <= counter < 1 << 256):
        return np.random.Philox(key=key, counter=counter)  # its own error for a bad value
    generator = getattr(_PHILOX, "generator", None)
    if generator is None:
        generator = _PHILOX.generator = np.random.Philox(key=0)
        # the state handed to the setter, which copies it: its arrays are refilled per
        # call rather than built (~1.3 us a call instead of ~2.8)
        _PHILOX.state = {
            "bit_generator": "Philox",
            "state": {"counter": np.zeros(4, np.uint64), "key": np.zeros(2, np.uint64)},
            "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
        }
    state = _PHILOX.state
    words = state["state"]["counter"]
    words[0], words[1] = counter & _WORD, (counter >> 64) & _WORD
    words[2], words[3] = (counter >> 128) & _WORD, counter >> 192
    words = state["state"]["key"]
    words[0], words[1] = key & _WORD, key >> 64
    generator.state = state
    return generator


class _CompiledPhilox:
    """The raw words of NumPy's ``Philox(key=key, counter=counter)``, made by the compiled
    kernel (grace_dl.ops.jit, ~2x NumPy's speed): ``random_raw(m)`` as NumPy's, the words
    of a block that one call leaves unused handed out first by the next."""

    def __init__(self, compiled: Any, key: int, counter: int):
        self._words = compiled.philox_words
        self._counter = np.array([(counter >> (64 * i)) & _WORD for i in range(4)], np.uint64)
        self._key = np.array([key & _WORD, key >> 64], np.uint64)
        self._left = np.zeros(0, np.uint64)  # the unused words of the last block

    def random_raw(self, m: int) -> np.ndarray:
        out = np.empty(m, np.uint64)
        held = min(m, self._left.shape[0])
        out[:held] = self._left[:held]
        self._left = self._left[held:]
        rest = m - held
        if rest:
            whole = rest // 4 * 4
            self._words(self._counter, self._key, out[held:held + whole])
            if whole < rest:  # a block's first words now, its others for the next call
                block = np.empty(4, np.uint64)
                self._words(self._counter, self._key, block)
                out[held + whole:] = block[:rest - whole]
                self._left = block[rest - whole:]
        return out


def _raw_stream(key: int, counter: int) -> Any:
    """Something with NumPy's ``random_raw``: the compiled Philox where it is there (and
    the key and counter are in range), else :func:`_philox`."""
    compiled = jit.kernels()
    if compiled is not None and 0 <= key < 1 << 128 and 0 <= counter < 1 << 256:
        return _CompiledPhilox(compiled, key, counter)
    return _philox(key, counter)


def _sampled_order_statistics(x: np.ndarray, positions: list[int], hits: int) -> list:
    """``sort(x)[p]`` (NaN last) for each ``p`` of ``positions`` within ``n / 8`` of either
    end, from the elements past the ``j``-th most extreme of a strided sample (``j`` a few
    standard deviations beyond the sample's expected share): when at least the needed
    count of elements lies past it, the answer is among them. The candidates of every
    position are gathered in one pass over ``x``, a cache block at a time. None for a
    position where that fails (and for other positions)."""
    n = x.shape[0]
    plans = []  # (position, near the top, sampled threshold) or None
    for p in positions:
        top = n - p  # the answer is the top-th largest
        k = min(top, p + 1)
        if 8 * k > n:
            plans.append(None)
            continue
        aim = min(hits, max(8, n >> 14))
        stride = max(1, n // min(n, -(-aim * n // k)))
        sample = np.ascontiguousarray(x[::stride])
        s = sample.shape[0]
        share = k * s / n
        j = min(s, math.ceil(share + 4.0 * math.sqrt(share) + 8.0))
        near_top = top <= p + 1
        # near the top: the elements not below the threshold (NaN included); near the
        # bottom: those not above it
        threshold = np.partition(sample, s - j)[s - j] if near_top else np.partition(sample, j - 1)[j - 1]
        plans.append(None if threshold != threshold else (p, near_top, threshold))
    wanted = [plan for plan in plans if plan is not None]
    found = _candidates_past(x, [(near_top, threshold) for _, near_top, threshold in wanted])
    values = iter(found)
    out = []
    for plan in plans:
        if plan is None:
            out.append(None)
            continue
        p, near_top, _ = plan
        candidates = next(values)
        c = candidates.shape[0]
        if near_top:
            top = n - p
            out.append(np.partition(candidates, c - top)[c - top] if top <= c <= n // 4 else None)
        else:
            out.append(np.partition(candidates, p)[p] if p + 1 <= c <= n // 4 else None)
    return out


def _candidates_past(x: np.ndarray, bounds: list[tuple[bool, Any]]) -> list[np.ndarray]:
    """For each ``(upper, threshold)`` of ``bounds``, the elements of ``x`` not below
    ``threshold`` (``upper``; NaN among them) or not above it, in index order: one pass
    over ``x`` a block at a time, its masks in the cache."""
    if not bounds:
        return []
    n = x.shape[0]
    size = min(n, _TAIL_CODES_BLOCK)
    mask = np.empty(size, np.bool_)
    parts: list[list[np.ndarray]] = [[] for _ in bounds]
    for a in range(0, n, size):
        block = x[a:a + size]
        m = mask[:block.shape[0]]
        for (upper, threshold), found in zip(bounds, parts):
            if upper:
                np.less(block, threshold, out=m)
                np.logical_not(m, out=m)
            else:
                np.less_equal(block, threshold, out=m)
            found.append(block[m])
    return [np.concatenate(found) for found in parts]


def draws_for_distinct(n: int, k: int, have: int = 0) -> int:
    """How many uniform draws from ``range(n)`` to make so that, with ``have`` distinct
    values already drawn, about ``k`` distinct ones are reached (the expectation plus a
    margin, so that one batch nearly always suffices; ``2 * k <= n``)."""
    expected = n * (math.log1p(-have / n) - math.log1p(-k / n))
    return int(expected * 1.02 + 3.0 * math.sqrt(k - have) + 16)


def sorted_random_subset(generator: np.random.Generator, n: int, k: int) -> np.ndarray:
    """A uniform random ``k``-subset of ``range(n)`` (``1 <= k``, ``2 * k <= n``) as
    ascending int64, in ``O(k)`` without a sort.

    ``k`` uniform draws are made already sorted: the partial sums of ``k + 1``
    exponential spacings, divided by their total, are distributed as the order
    statistics of ``k`` uniforms on [0, 1) (Devroye 1986, Non-Uniform Random Variate
    Generation, V.2), and ``floor(n u)`` keeps the order. By symmetry the distinct
    values among them, given their count, are a uniform subset of that size; the
    missing ones are further uniform draws that are not yet present, taken in the
    order drawn, so the whole is a uniform ``k``-subset. Duplicates are few when
    ``k`` is small against ``n`` (about ``k**2 / 2n``): the top-up is small."""
    points = np.cumsum(generator.standard_exponential(k + 1))
    values = (points[:k] * (n / points[k])).astype(np.int64)  # non-decreasing: no sort needed
    np.minimum(values, n - 1, out=values)  # a rounded-up product may reach n
    if k > 1:
        new = np.empty(k, np.bool_)
        new[0] = True
        np.not_equal(values[1:], values[:-1], out=new[1:])
        values = values[new]
    while values.shape[0] < k:
        need = k - values.shape[0]
        # enough draws for the missing ones, with a margin, where a draw is already
        # present with probability len(values) / n (at most a half)
        extra = generator.integers(0, n, size=draws_for_distinct(n, k, values.shape[0]), dtype=np.int64)
        at = np.searchsorted(values, extra)
        fresh = extra[values[np.minimum(at, values.shape[0] - 1)] != extra]
        if fresh.shape[0] <= 256:  # the usual few: a loop costs less than NumPy's calls
            seen: dict[int, None] = {}
            for value in fresh.tolist():
                seen.setdefault(value)
                if len(seen) == need:
                    break
            added = np.array(sorted(seen), np.int64)
        else:
            _, first = np.unique(fresh, return_index=True)  # each fresh value once, at its first draw
            added = np.sort(fresh[np.sort(first)[:need]])
        values = np.insert(values, np.searchsorted(values, added), added)
    return values


def _bucket_words_output(n: int, d: int, bits: int, dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The int32 output of a kernel that writes one norm (of ``dtype``) per bucket of
    ``d`` of ``n`` elements, then ``bits``-bit codes packed into words; returns (output,
    its norms, its words, buckets per cache block: a multiple of the rows that fill whole
    words of codes; 0 when there are no buckets)."""
    buckets = -(-n // d)
    norm_words = buckets * np.dtype(dtype).itemsize // 4
    out = np.empty(norm_words + -(-n * bits // 32), np.int32)
    if out.shape[0] > norm_words:
        out[-1] = 0  # the bits past the last code
    step = 32 // math.gcd(d, 32)
    rows = min(buckets, max(step, _FUSED_BLOCK // d // step * step))
    return out, out[:norm_words].view(dtype), out[norm_words:], rows


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
        if type(x) is np.ndarray:  # the common case, without np.size's dispatch
            return x.size
        return int(np.size(x))

    def shape(self, x):
        if type(x) is np.ndarray:  # already a tuple of ints (np.shape and a genexpr: ~2 us)
            return x.shape
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

    def orthonormalize_rows(self, rows, epsilon):
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.dtype.kind != "f":
            return super().orthonormalize_rows(rows, epsilon)
        # the protocol's steps and NumPy calls, written out (PowerSGD's factors are small:
        # the per-call dispatch of the generic steps cost as much as their arithmetic)
        out = rows.copy()
        reduce = np.add.reduce
        r = out.shape[0]
        for i in range(r):
            row = out[i]
            norm = np.sqrt(reduce(row * row, dtype=row.dtype))
            if i + 1 < r:
                direction = row / (norm if norm > 0 else norm * 0 + 1)  # a zero row stays zero
                for j in range(i + 1, r):
                    out[j] = out[j] - reduce(direction * out[j], dtype=row.dtype) * direction
            out[i] = row / (norm + epsilon)
        return out

    def exp(self, x):
        return np.exp(x)

    def where(self, cond, a, b):
        if (type(cond) is np.ndarray and type(a) is np.ndarray and type(b) is np.ndarray
                and cond.dtype == np.bool_ and cond.size >= _WHERE_MASK_MIN and a.shape == cond.shape
                and a.dtype in (np.float32, np.float64) and b.size == 1 and b.dtype == a.dtype
                and not b.view(f"i{a.itemsize}").any()):
            # where(mask, x, +0.0) as x's bits anded with an all-ones or all-zeros word:
            # np.where branches per element (30 against 15 ms at 2.5e7, random mask)
            ints = np.dtype(f"i{a.itemsize}")
            keep = np.negative(cond.view(np.uint8), dtype=ints)  # -1 where cond, else 0
            np.bitwise_and(np.ascontiguousarray(a).view(ints), keep, out=keep)
            return keep.view(a.dtype)
        return np.where(cond, a, b)

    def minimum(self, a, b):
        return np.minimum(a, b)

    def isfinite(self, x):
        return np.isfinite(x)

    def sum(self, x, axis=None):
        # the ufunc's reduce, as np.sum calls it, without np.sum's keyword wrapping (~2 us)
        x = np.asarray(x)
        return np.add.reduce(x, axis=axis, dtype=x.dtype if x.dtype.kind == "f" else None)

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
            u = v.astype(np.uint8, copy=False)
            pad = (-n) % (4 * per)
            if pad:
                u = np.concatenate([u, np.zeros(pad, np.uint8)])
            if bits == 2:
                # four codes as the bytes of a little-endian word w: bits 2j..2j+1 of its
                # low byte are code j after w | w >> 6 (code 1 to bits 2-3, code 3 to
                # bits 18-19) and t | t >> 12 (codes 2 and 3 to bits 4-7); no other field
                # reaches the low byte. Four passes over a quarter as many words
                w = np.ascontiguousarray(u).view("<u4")
                t = np.right_shift(w, np.uint32(6))
                t |= w
                w = np.right_shift(t, np.uint32(12))
                w |= t
                return w.astype(np.uint8).view("<i4").astype(np.int32, copy=False)
            if per > 1:
                cols = u.reshape(-1, per)
                packed = cols[:, 0].copy()
                for j in range(1, per):
                    packed |= cols[:, j] << np.uint8(j * bits)
                u = packed
            return u.view("<i4").astype(np.int32, copy=False)
        if bits <= 16:
            return _pack_groups_in_words(v, bits).view("<i4").astype(np.int32, copy=False)
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
            return _unpack_groups_in_words(raw, n, bits).astype(np.int64)
        width = 4 if bits <= 32 else 8
        stream = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits)
        fields = np.zeros((n, 8 * width), np.uint8)
        fields[:, :bits] = stream
        return np.packbits(fields, axis=1, bitorder="little").view(f"<u{width}").reshape(-1).astype(np.int64)

    def random_uniform(self, n, key, counter, like):
        # the values of Generator(Philox(key, counter)).random(n, dtype=float32), made from
        # the raw 64-bit stream: each word gives two 32-bit draws, low half first, and a
        # draw u becomes (u >> 8) / 2**24, as the Generator does; ~25% faster than it.
        # Drawn in blocks (successive random_raw calls continue one stream), so that the
        # raw words and the shifted draws are block-sized: the output is the only
        # full-size array
        n = int(n)
        generator = _raw_stream(int(key), int(counter))
        out = np.empty(n, np.float32)
        for start in range(0, n, _RANDOM_BLOCK):
            stop = min(n, start + _RANDOM_BLOCK)  # _RANDOM_BLOCK is even: whole words
            draws = generator.random_raw(-(-(stop - start) // 2)).view("<u4")[:stop - start]
            np.right_shift(draws, np.uint32(8), out=draws)
            # exact: < 2**24; as int32 (the same values), whose conversion is faster
            np.multiply(draws.view(np.int32), np.float32(2.0**-24), out=out[start:stop], dtype=np.float32)
        return out

    def reference_uniform(self, n, key, counter, like):
        return self.random_uniform(n, key, counter, like)  # this backend's draws are the reference

    def reference_uniform_signed(self, n, key, counter, dtype, like):
        u = self.random_uniform(n, key, counter, like).astype(_np_dtype(dtype), copy=False)
        np.multiply(u, u.dtype.type(2), out=u)  # exact
        return np.subtract(u, u.dtype.type(1), out=u)

    def uniform_ints(self, n, bits, key, counter, like):
        # a draw u is (w >> 8) / 2**24 for a 32-bit word w (random_uniform), so
        # u * 2**bits truncated is w >> (32 - bits), with no float pass
        if not 1 <= bits <= 23:
            raise ValueError(f"bits must be in [1, 23], got {bits}")
        n = int(n)
        generator = _raw_stream(int(key), int(counter))
        out = np.empty(n, np.int32)
        for start in range(0, n, _RANDOM_BLOCK):
            stop = min(n, start + _RANDOM_BLOCK)
            draws = generator.random_raw(-(-(stop - start) // 2)).view("<u4")[:stop - start]
            np.right_shift(draws, np.uint32(32 - bits), out=out[start:stop].view(np.uint32))
        return out

    def random_choice(self, n, k, key, counter, like):
        n, k = int(n), int(k)
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        if k >= n:
            return np.arange(n, dtype=np.int64)
        # the thread's Philox with its state set (not a new one: ~10x the draws' own cost)
        generator = np.random.Generator(_philox(int(key), int(counter)))
        if 2 * k > n:  # draw the n - k left out: fewer draws, then one pass over n
            keep = np.ones(n, dtype=np.bool_)
            keep[sorted_random_subset(generator, n, n - k)] = False
            return np.flatnonzero(keep).astype(np.int64, copy=False)
        return sorted_random_subset(generator, n, k)

    # -- selection kernels
    def count_true(self, mask):
        return int(np.count_nonzero(mask))

    def all_finite(self, x):
        x = np.asarray(x)
        if x.size <= 1 << 16:  # one fused pass; its bool temporary is small
            return np.bool_(np.isfinite(x).all())
        # min and max propagate NaN and show an Inf: two reductions, no temporary array
        return np.bool_(np.isfinite(x.min()) and np.isfinite(x.max()))

    def index_subtract(self, x, idx, values, consume=False):
        out = x if consume and x.flags.writeable else np.array(x, copy=True)
        out[idx] = np.take(x, idx) - values
        return out

    def pack_sparse(self, x, idx):
        k = idx.shape[0]
        buffer = np.empty(k * (1 + x.dtype.itemsize // 4), np.int32)
        compiled = jit.kernels() if k >= _SMALL_SPARSE and x.dtype == np.float32 and x.ndim == 1 else None
        if compiled is not None and idx.dtype == np.int64:
            # one compiled pass; an index out of range: NumPy's take below (and its error)
            if compiled.pack_pairs(np.ascontiguousarray(x).view(np.int32), idx, buffer[:k], buffer[k:]):
                return buffer
        buffer[:k] = idx  # one converting pass instead of a cast and a concatenation
        if k < _SMALL_SPARSE:  # a gathered copy costs less than take's out= handling
            buffer[k:] = x[idx].view(np.int32)
            return buffer
        # the values gathered straight into the buffer (mode "clip" writes unbuffered;
        # the indices come from a selection, so none is out of range)
        np.take(x, idx, out=buffer[k:].view(x.dtype), mode="clip")
        return buffer

    def scatter_sparse(self, n, buffer, dtype):
        np_dtype = _np_dtype(dtype)
        k = buffer.shape[0] // (1 + np.dtype(np_dtype).itemsize // 4)
        compiled = jit.kernels() if np_dtype == np.float32 and k >= _SMALL_SPARSE else None
        if compiled is not None:  # one compiled pass for ascending indices
            out = np.zeros(int(n), np_dtype)
            if compiled.scatter_ascending(buffer[:k], buffer[k:].view(np_dtype), out) == 0:
                return out
        out = np.zeros(int(n), np_dtype)
        values = buffer[k:].view(np_dtype)
        if k < _SMALL_SPARSE:  # few indices: int32 ones as they are, in one assignment
            out[buffer[:k]] = values
            return out
        # int64 indices (NumPy's fancy assignment is ~3x slower with int32 ones), widened
        # a block at a time: a dense payload's int64 copy would be as large as the tensor
        for start in range(0, k, _RANDOM_BLOCK):
            stop = min(k, start + _RANDOM_BLOCK)
            out[buffer[start:stop].astype(np.int64)] = values[start:stop]
        return out

    def scatter_sparse_sum(self, n, buffers, dtype, scale=1.0):
        np_dtype = _np_dtype(dtype)
        words_per_pair = 1 + np.dtype(np_dtype).itemsize // 4
        out = np.zeros(int(n), np_dtype)
        counts = [buffer.shape[0] // words_per_pair for buffer in buffers]
        # scale only the elements the buffers hold where their int64 indices are few to
        # keep (+0.0 times a positive factor stays +0.0): no pass over the whole array
        sparse_scale = scale != 1.0 and 0.0 < scale < float("inf") and 8 * sum(counts) <= out.shape[0]
        touched = []
        for buffer, k in zip(buffers, counts):
            values = buffer[k:].view(np_dtype)
            # in place, a block of int64 indices at a time (as scatter_sparse): indices are
            # distinct within a buffer, so `+=` adds each value once, as out[i] + value
            for start in range(0, k, _RANDOM_BLOCK):
                stop = min(k, start + _RANDOM_BLOCK)
                idx = buffer[start:stop].astype(np.int64)
                out[idx] += values[start:stop]
                if sparse_scale:
                    touched.append(idx)
        if scale != 1.0:
            factor = out.dtype.type(scale)  # as `out * scale`: the factor rounded to out's dtype
            if sparse_scale:
                # every product read before any is written: an index held by several
                # buffers is scaled once
                scaled = [out[idx] * factor for idx in touched]
                for idx, values in zip(touched, scaled):
                    out[idx] = values
            else:
                np.multiply(out, factor, out=out)
        return out

    def nonzero_magnitude_at_least(self, x, threshold):
        if not isinstance(threshold, (int, float)):
            threshold = np.asarray(threshold).reshape(-1)[0]
        t = x.dtype.type(threshold)
        compiled = jit.kernels() if x.dtype == np.float32 and x.ndim == 1 and x.shape[0] >= _SMALL_SPARSE else None
        if t > 0 and compiled is not None:  # count, then the indices: two compiled passes
            bits, level = np.ascontiguousarray(x).view(np.int32), np.asarray(t).view(np.int32)
            idx = np.empty(compiled.count_magnitude_at_least(bits, level), np.int64)
            compiled.indices_magnitude_at_least(bits, level, idx)
            return idx
        if t > 0 and x.dtype in (np.float32, np.float64):
            # the magnitudes' bits compared as integers: they order like the values, and
            # a NaN's (sign cleared by abs) lie above +inf's, so NaN is selected as by
            # "not below"; one pass fewer than the comparison and its negation
            ints = np.dtype(np.int32 if x.dtype == np.float32 else np.int64)
            mags = np.abs(x).view(ints)
            return np.flatnonzero(np.greater_equal(mags, np.asarray(t).view(ints)))
        keep = np.abs(x) < t
        np.logical_not(keep, out=keep)  # true for NaN; in place: one temporary fewer
        if not t > 0:  # a threshold of 0 (or NaN) passes zeros too: drop them
            keep &= x != 0
        return np.flatnonzero(keep)

    def pack_magnitude_at_least(self, x, threshold):
        if not isinstance(threshold, (int, float)):
            threshold = np.asarray(threshold).reshape(-1)[0]
        n = x.shape[0]
        if x.ndim != 1 or x.dtype not in (np.float32, np.float64) or n < _PACK_AT_LEAST_BLOCKED_MIN:
            return super().pack_magnitude_at_least(x, threshold)
        t = x.dtype.type(threshold)
        if not t > 0:
            return super().pack_magnitude_at_least(x, threshold)
        compiled = jit.kernels() if x.dtype == np.float32 else None
        if compiled is not None:  # the same two passes, each one compiled loop
            bits, level = np.ascontiguousarray(x).view(np.int32), np.asarray(t).view(np.int32)
            k = compiled.count_magnitude_at_least(bits, level)
            buffer = np.empty(2 * k, np.int32)
            compiled.pack_magnitude_at_least(bits, level, buffer[:k], buffer[k:])
            return buffer
        # two passes a cache block at a time: count, then write each block's int32
        # indices and values straight into the payload (the selection of
        # nonzero_magnitude_at_least: magnitudes' bits compared as integers, NaN passes)
        ints = np.dtype(np.int32 if x.dtype == np.float32 else np.int64)
        level = np.asarray(t).view(ints)
        size = _PACK_AT_LEAST_BLOCK
        mags, mask = np.empty(size, x.dtype), np.empty(size, np.bool_)
        starts = range(0, n, size)

        def select(a: int) -> np.ndarray:
            m = mask[:min(n, a + size) - a]
            np.abs(x[a:a + m.shape[0]], out=mags[:m.shape[0]])
            return np.greater_equal(mags[:m.shape[0]].view(ints), level, out=m)

        counts = [int(np.count_nonzero(select(a))) for a in starts]
        k = sum(counts)
        buffer = np.empty(k * (1 + x.dtype.itemsize // 4), np.int32)
        indices, values = buffer[:k], buffer[k:].view(x.dtype)
        at = 0
        for a, c in zip(starts, counts):
            if c:
                local = np.flatnonzero(select(a))
                np.add(local, a, out=indices[at:at + c], casting="unsafe")  # below 2**31
                np.take(x[a:a + size], local, out=values[at:at + c], mode="clip")
                at += c
        return buffer

    def read_flag(self, cond):
        return bool(cond)

    def choose(self, cond, a, b):
        return a if bool(cond) else b

    def index_update(self, x, idx, values, consume=False):
        out = x if consume and x.flags.writeable else np.array(x, copy=True)
        out[idx] = values
        return out

    def topk_indices(self, x, k):
        n = x.shape[0]
        if 0 < k < n and n >= self.SAMPLED_TOPK_MIN_NUMEL and 8 * k <= n and x.dtype.kind in "fiu":
            idx = self._sampled_topk_indices(x, k)
            if idx is not None:
                return idx
        if 0 < k < n:
            # the k-th largest (NaN sorts last, as the largest); when exactly k elements
            # are not below it they are the answer, already ascending (no tie to break)
            kth = kth_largest_value(x, k)
            idx = np.flatnonzero(~(x < kth))
            if idx.shape[0] == k:
                return idx.astype(np.int64, copy=False)
        return super().topk_indices(x, k)

    def topk_magnitude_indices(self, x, k):
        if x.shape[0] <= _SMALL_TOPK and x.dtype.kind == "f":
            # a small tensor's magnitudes cost less than the protocol's sampling steps
            # around them (the same set: topk_indices of abs(x), NaN ranking as +inf)
            mags = np.abs(x)
            idx = _group_max_topk(mags, k)
            return self.topk_indices(mags, k) if idx is None else idx
        return super().topk_magnitude_indices(x, k)

    def _sampled_topk_indices(self, x: np.ndarray, k: int) -> np.ndarray | None:
        """:meth:`topk_indices` from candidates: the elements not below the ``j``-th
        largest of a strided sample (``j`` a few standard deviations above the sample's
        expected share of the top ``k``). When at least ``k`` elements are not below it,
        they hold every element ranking at or above the k-th largest (NaN, the largest,
        included), ties in index order, so the top k among them is the answer; else
        None (the caller selects on the whole array)."""
        n = x.shape[0]
        stride, j = self.topk_sample_plan(n, k)
        threshold = kth_largest_value(np.ascontiguousarray(x[::stride]), j)
        if threshold != threshold:  # NaN: too many NaN to gain anything
            return None
        candidates = np.flatnonzero(~(x < threshold))
        if not k <= candidates.shape[0] <= n // 4:
            return None
        chosen = self.topk_indices(x[candidates], k)
        return candidates[chosen]

    def count_true_array(self, mask):
        return np.array(np.count_nonzero(mask), np.int64)

    def sorted_values_at(self, x, positions):
        x = np.asarray(x)
        positions = np.asarray(positions).reshape(-1)
        n = x.shape[0]
        out = np.empty(positions.shape[0], x.dtype)
        full = []
        wanted = [int(p) for p in positions.tolist()]
        # near either end, among the candidates past a sampled threshold
        values = _sampled_order_statistics(x, wanted, self.SAMPLED_TOPK_HITS) if n >= 1 << 12 else [None] * len(wanted)
        for i, value in enumerate(values):
            if value is None:
                full.append(i)
            else:
                out[i] = value
        if full:
            wanted = positions[full]
            out[full] = np.partition(x, np.unique(wanted))[wanted]
        return out

    def sign_counts(self, x):
        x = np.asarray(x)
        n = x.size
        if n < _STREAMED_TAILS_MIN:
            return np.array([n - np.count_nonzero(x <= 0), np.count_nonzero(x < 0)], np.int64)
        # a block at a time: the masks stay in the cache
        flat = x.reshape(-1)
        size = _TAIL_CODES_BLOCK
        mask = np.empty(size, np.bool_)
        at_most_zero = below_zero = 0
        for a in range(0, n, size):
            block = flat[a:a + size]
            m = mask[:block.shape[0]]
            at_most_zero += np.count_nonzero(np.less_equal(block, 0, out=m))
            below_zero += np.count_nonzero(np.less(block, 0, out=m))
        return np.array([n - at_most_zero, below_zero], np.int64)

    def tail_sums(self, x, top, bottom):
        x = np.asarray(x)
        n = x.shape[0]
        if x.ndim != 1 or x.dtype not in (np.float32, np.float64):
            return super().tail_sums(x, top, bottom)
        # each tail as x's bits anded with an all-ones or all-zeros word (np.where branches
        # per element)
        t, b = x.dtype.type(np.asarray(top).reshape(-1)[0]), x.dtype.type(np.asarray(bottom).reshape(-1)[0])
        ints = np.dtype(f"i{x.dtype.itemsize}")
        bits = np.ascontiguousarray(x).view(ints)
        if n < max(2, _STREAMED_TAILS_MIN):
            below_top, lower = x < t, x <= b
            upper_bits = np.subtract(below_top.view(np.uint8), 1, dtype=ints)  # -1 where not below
            np.bitwise_and(bits, upper_bits, out=upper_bits)
            lower_bits = np.negative(lower.view(np.uint8), dtype=ints)
            np.bitwise_and(bits, lower_bits, out=lower_bits)
            sums = np.concatenate([self.tree_sum(upper_bits.view(x.dtype)), self.tree_sum(lower_bits.view(x.dtype))])
            return sums, np.array([n - np.count_nonzero(below_top), np.count_nonzero(lower)], np.int64)
        # streamed a cache block at a time (_streamed_tree_sums): no full-size temporary
        h = 1 << ((n - 1).bit_length() - 1)
        size = min(_FUSED_BLOCK, h)
        mask, keep = np.empty(size, np.bool_), np.empty(size, ints)
        far_upper, far_lower = np.empty(size, x.dtype), np.empty(size, x.dtype)
        counts = np.zeros(2, np.int64)

        def split(a: int, z: int, upper: np.ndarray, lower: np.ndarray) -> None:
            m, k = mask[:z - a], keep[:z - a]
            np.less(x[a:z], t, out=m)  # below top: outside the upper tail
            np.subtract(m.view(np.uint8), 1, dtype=ints, out=k)  # -1 where not below, else 0
            np.bitwise_and(bits[a:z], k, out=upper.view(ints))
            counts[0] += (z - a) - np.count_nonzero(m)
            np.less_equal(x[a:z], b, out=m)
            np.negative(m.view(np.uint8), dtype=ints, out=k)  # -1 where at or below bottom
            np.bitwise_and(bits[a:z], k, out=lower.view(ints))
            counts[1] += np.count_nonzero(m)

        def first_level(a: int, z: int, out: list[np.ndarray]) -> None:
            split(a, z, out[0], out[1])
            far = min(z, n - h) - a  # elements i + h that exist (i < n - h)
            if far > 0:
                split(a + h, a + h + far, far_upper[:far], far_lower[:far])
                out[0][:far] += far_upper[:far]
                out[1][:far] += far_lower[:far]

        return np.concatenate(_streamed_tree_sums(h, size, first_level, x.dtype, 2)), counts

    def tail_codes(self, x, top, bottom):
        x = np.asarray(x)
        n = x.shape[0]
        if x.ndim != 1 or n < _STREAMED_TAILS_MIN or x.dtype not in (np.float32, np.float64):
            return super().tail_codes(x, top, bottom)
        # a block at a time, its masks in the cache: only the selected codes are full-size
        t, b = x.dtype.type(np.asarray(top).reshape(-1)[0]), x.dtype.type(np.asarray(bottom).reshape(-1)[0])
        size = _TAIL_CODES_BLOCK
        below, lower = np.empty(size, np.bool_), np.empty(size, np.bool_)
        parts = []
        for a in range(0, n, size):
            z = min(n, a + size)
            below_top = np.less(x[a:z], t, out=below[:z - a])
            either = np.less_equal(x[a:z], b, out=lower[:z - a])
            np.logical_or(either, ~below_top, out=either)
            picked = np.flatnonzero(either)
            if picked.shape[0]:
                codes = picked + a
                low_only = below_top[picked]  # not in the upper tail: in the lower one
                codes[low_only] = -codes[low_only] - 1
                parts.append(codes)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    # -- quantization kernels
    @staticmethod
    def _bytes_to_words(packed: np.ndarray) -> np.ndarray:
        """Little-endian bytes as int32 words, the last word padded with zero bytes."""
        pad = (-packed.shape[0]) % 4
        if pad:
            packed = np.concatenate([packed, np.zeros(pad, np.uint8)])
        return packed.view("<i4").astype(np.int32, copy=False)

    def pack_signs(self, x, scales=None):
        packed = np.packbits(x >= 0, bitorder="little")
        if scales is None:
            return self._bytes_to_words(packed)
        # the sign bytes and the scales' words written into one buffer
        n_words = -(-x.shape[0] // 32)
        tail = np.ascontiguousarray(scales).view(np.int32)
        out = np.empty(n_words + tail.shape[0], np.int32)
        raw = out.view(np.uint8)
        raw[:packed.shape[0]] = packed
        raw[packed.shape[0]:4 * n_words] = 0
        out[n_words:] = tail
        return out

    def pack_signs_abs_sum(self, x, scale):
        n = x.shape[0]
        if x.ndim != 1 or n < max(_STREAMED_TREE_MIN, 9) or x.dtype not in (np.float32, np.float64):
            return super().pack_signs_abs_sum(x, scale)
        # the streamed abs_tree_sum, packing each block's signs while the block is in the
        # cache: one read of x instead of two, and no n-byte mask (h >= 8 and the block a
        # power of two: every block starts on a whole byte of signs)
        n_words = -(-n // 32)
        out = np.empty(n_words + x.dtype.itemsize // 4, np.int32)
        raw = out.view(np.uint8)
        raw[-(-n // 8):4 * n_words] = 0  # the bytes past the last sign
        h = 1 << ((n - 1).bit_length() - 1)
        size = min(_FUSED_BLOCK, h)
        far_abs, signs = np.empty(size, x.dtype), np.empty(size, np.bool_)

        def pack(a: int, b: int) -> None:  # a is a multiple of 8: whole bytes
            m = np.greater_equal(x[a:b], 0, out=signs[:b - a])
            raw[a // 8:a // 8 + -(-(b - a) // 8)] = np.packbits(m, bitorder="little")

        def first_level(a: int, b: int, acc: list[np.ndarray]) -> None:
            np.abs(x[a:b], out=acc[0])
            pack(a, b)
            far = max(0, min(b, n - h) - a)
            if far:
                np.abs(x[a + h:a + h + far], out=far_abs[:far])
                pack(a + h, a + h + far)
                acc[0][:far] += far_abs[:far]

        total = _streamed_tree_sums(h, size, first_level, x.dtype, 1, scale)[0]
        out[n_words:] = total.view(np.int32)
        return out

    def select_bits(self, words, n, on, off):
        # one row of 8 output values per byte of the bit stream, looked up in a 256-row table
        raw = np.ascontiguousarray(words, dtype="<i4").view(np.uint8)[: -(-int(n) // 8)]
        return np.take(_bit_table(np.asarray(on), np.asarray(off)), raw, axis=0).reshape(-1)[: int(n)]

    def unpack_signs(self, words, n, dtype, scale=None):
        if scale is None:
            np_dtype = _np_dtype(dtype)
            on, off = _UNIT_SIGNS.get(np_dtype) or (np.ones(1, np_dtype), -np.ones(1, np_dtype))
        else:
            on = np.asarray(scale)
            off = np.negative(on)
        return self.select_bits(words, n, on, off)

    def unpack_scaled_signs(self, words, n, dtype):
        raw = np.ascontiguousarray(words, dtype="<i4")
        scale = raw[-(-int(n) // 32):].view(_np_dtype(dtype))[:1]
        return self.select_bits(raw, n, scale, np.negative(scale))

    def full(self, n, value, dtype, like):
        return np.full(int(n), value, dtype=_np_dtype(dtype))

    def tree_sum(self, x, scale=1.0):
        n = x.shape[0]
        if n <= 1:
            out = x.copy() if n else np.zeros(1, x.dtype)
            return out * x.dtype.type(scale) if scale != 1.0 else out
        h = 1 << ((n - 1).bit_length() - 1)
        if n >= _STREAMED_TREE_MIN:  # streamed: no h-element array
            def first_level(a: int, b: int, out: list[np.ndarray]) -> None:
                far = max(0, min(b, n - h) - a)  # elements i + h that exist
                np.add(x[a:a + far], x[a + h:a + h + far], out=out[0][:far])
                out[0][far:] = x[a + far:b]  # carried unchanged

            return _streamed_tree_sums(h, min(_FUSED_BLOCK, h), first_level, x.dtype, 1, scale)[0]
        acc = _tree_buffer(h, x.dtype)
        np.add(x[:n - h], x[h:], out=acc[:n - h])
        acc[n - h:] = x[n - h:h]  # carried unchanged
        return _halve(acc, h, scale)

    def tree_sum_in(self, x, dtype):
        wide = _np_dtype(dtype)
        n = x.shape[0]
        if x.dtype == wide or n <= 1:
            return self.tree_sum(x.astype(wide, copy=False))
        # the first level with the cast fused (the ufunc casts in small buffers), so the
        # only wide array is the h first-level sums
        h = 1 << ((n - 1).bit_length() - 1)
        acc = _tree_buffer(h, np.dtype(wide))
        np.add(x[:n - h], x[h:], out=acc[:n - h], dtype=wide)
        acc[n - h:] = x[n - h:h]  # carried unchanged (an exact widening)
        return _halve(acc, h, 1.0)

    def abs_tree_sum(self, x, scale=1.0):
        n = x.shape[0]
        if n <= 1:
            return self.tree_sum(np.abs(x), scale)
        # the first level straight from x: |x_i| (carried ones included), then + |x_{i+h}|
        h = 1 << ((n - 1).bit_length() - 1)
        if n >= _STREAMED_TREE_MIN:  # streamed: no h-element arrays
            far_abs = np.empty(min(_FUSED_BLOCK, h), x.dtype)

            def first_level(a: int, b: int, out: list[np.ndarray]) -> None:
                np.abs(x[a:b], out=out[0])
                far = max(0, min(b, n - h) - a)
                np.abs(x[a + h:a + h + far], out=far_abs[:far])
                out[0][:far] += far_abs[:far]

            return _streamed_tree_sums(h, min(_FUSED_BLOCK, h), first_level, x.dtype, 1, scale)[0]
        acc = _tree_buffer(h, x.dtype)
        np.abs(x[:h], out=acc)
        if h <= _TREE_WORKSPACE_MAX:  # |x_{i+h}| in the workspace's scratch half
            far = _tree_scratch(acc)[:n - h]
            np.abs(x[h:], out=far)
        else:
            far = np.abs(x[h:])
        np.add(acc[:n - h], far, out=acc[:n - h])
        return _halve(acc, h, scale)

    def sign_means(self, x):
        if x.ndim == 1 and x.shape[0] >= _STREAMED_SIGN_MEANS_MIN and x.dtype in (np.float32, np.float64):
            return self._sign_means_blocked(x)
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

    def _sign_means_blocked(self, x):
        """:meth:`sign_means` of a large ``x`` without full-size temporaries: each side's
        tree sum (:meth:`tree_sum`'s order) streamed a cache block at a time from ``x``
        (:func:`_streamed_tree_sums`), the same sums bit for bit."""
        n = x.shape[0]
        h = 1 << ((n - 1).bit_length() - 1)
        ints = np.dtype(f"i{x.dtype.itemsize}")
        bits = np.ascontiguousarray(x).view(ints)
        size = min(_FUSED_BLOCK, h)
        mask, keep = np.empty(size, np.bool_), np.empty(size, ints)
        far_pos, far_neg = np.empty(size, x.dtype), np.empty(size, x.dtype)
        positive = 0

        def split(a: int, b: int, pos: np.ndarray, neg: np.ndarray) -> None:
            # each side as x's bits anded with an all-ones or all-zeros word (np.where
            # branches per element); counts the non-negative side
            nonlocal positive
            m = mask[:b - a]
            np.greater_equal(x[a:b], 0, out=m)
            k = keep[:b - a]
            np.negative(m.view(np.uint8), dtype=ints, out=k)  # -1 where x >= 0, else 0
            np.bitwise_and(bits[a:b], k, out=pos.view(ints))
            np.bitwise_xor(bits[a:b], pos.view(ints), out=neg.view(ints))  # the other bits: x's or 0
            positive += int(np.count_nonzero(m))

        def first_level(a: int, b: int, out: list[np.ndarray]) -> None:
            split(a, b, out[0], out[1])
            far = min(b, n - h) - a  # elements i + h that exist (i < n - h)
            if far > 0:
                split(a + h, a + h + far, far_pos[:far], far_neg[:far])
                out[0][:far] += far_pos[:far]
                out[1][:far] += far_neg[:far]

        sums = np.concatenate(_streamed_tree_sums(h, size, first_level, x.dtype, 2))
        counts = np.array([max(positive, 1), max(n - positive, 1)], np.int64)
        return sums / counts.astype(x.dtype)

    def take_fields(self, words, n, bits, values):
        if bits < 8 and bits not in (1, 2, 4):  # 3, 5, 6, 7: fields unpacked to bytes
            fields = _unpack_groups_in_words(np.ascontiguousarray(words, dtype="<i4").view(np.uint8), int(n), bits)
            values = np.asarray(values)
            if fields.shape[0] >= _PAIR_TAKE_MIN and values.dtype.itemsize == 4:
                # two fields per lookup, as for 8-bit fields: the table padded to 256 entries
                full = np.zeros(256, values.dtype)
                full[:values.shape[0]] = values
                pairs = _pair_table(full)
                whole = fields.shape[0] // 2
                out = np.empty(fields.shape[0], values.dtype)
                np.take(pairs, fields[:2 * whole].view("<u2"), out=out[:2 * whole].view(pairs.dtype), mode="clip")
                if 2 * whole < fields.shape[0]:
                    out[-1] = values[fields[-1]]
                return out
            return np.take(values, fields)
        if bits not in (1, 2, 4, 8):
            return super().take_fields(words, n, bits, values)
        per = 8 // bits
        raw = np.ascontiguousarray(words, dtype="<i4").view(np.uint8)[: -(-int(n) // per)]
        if per == 1:
            values = np.asarray(values)
            if raw.shape[0] >= _PAIR_TAKE_MIN and values.dtype.itemsize == 4 and values.shape[0] == 256:
                # two fields per lookup, in a 65536-entry table of value pairs: half the
                # lookups (np.take's cost is per index, not per byte)
                pairs = _pair_table(values)
                whole = raw.shape[0] // 2
                out = np.empty(raw.shape[0], values.dtype)
                np.take(pairs, raw[:2 * whole].view("<u2"), out=out[:2 * whole].view(pairs.dtype), mode="clip")
                if whole * 2 < raw.shape[0]:
                    out[-1] = values[raw[-1]]
                return out
            if values.shape[0] == 256:  # uint8 indices of a 256-entry table: all in range
                return np.take(values, raw, mode="clip")
            return np.take(values, raw)
        # one row of `per` output values per byte, looked up in a 256-row table
        return np.take(np.take(values, _BYTE_FIELDS[bits]), raw, axis=0).reshape(-1)[: int(n)]

    def ternary_codes(self, x, bound, u):
        ratio = np.abs(x)
        np.divide(ratio, bound, out=ratio)
        keep = np.less(u, ratio).view(np.uint8)
        # 1 + keep - 2 (keep and x < 0), in bytes: no branch per element
        codes = np.add(keep, 1, dtype=np.uint8)
        negative = np.bitwise_and(keep, (x < 0).view(np.uint8))
        codes -= negative  # twice: NumPy's uint8 shift is ~10x slower than its subtraction
        codes -= negative
        return codes

    def power_of_two_codes(self, x, r):
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32)
        mag = bits & np.int32(0x7FFFFFFF)
        peak = int(mag.max()) if mag.shape[0] else 0
        if peak >= 254 << 23:  # an exponent field of 254 or more (or NaN): the general rule
            return self._power_of_two_codes_general(bits, mag, r)
        # every exponent field below 254: e + (r < m) is (|x|'s bits + 2**23 - 1 - r) >> 23
        # (the mantissa m carries into the exponent exactly when m > r), no cap needed
        e = np.subtract(np.int32(0x7FFFFF), r, dtype=np.int32)
        e += mag
        e >>= 23
        # the sign as bit 8 (bit 31 of x's bits, shifted down with its sign extension),
        # kept where e > 0: (e + 255) has bit 8 set exactly when 1 <= e <= 255
        np.right_shift(bits, 23, out=mag)
        mag &= e + np.int32(255)
        mag &= np.int32(256)
        e |= mag
        return e

    @staticmethod
    def _power_of_two_codes_general(bits, mag, r):
        e = mag >> 23
        up = (r < (mag & np.int32(0x7FFFFF))) & (e < 254)
        e += up
        # the sign adds 256 where e > 0; no branch per element
        e |= ((bits < 0) & (e > 0)).view(np.uint8).astype(np.int32) << 8
        np.copyto(e, np.int32(256), where=mag > 0x7F800000)  # NaN: rare, so cheap
        return e

    def power_of_two_values(self, codes):
        # code << 23 places the exponent field and, from bit 8, the sign (codes < 512);
        # only the NaN code 256 then needs a fix (it would read as -0.0)
        bits = np.asarray(codes).astype(np.uint32)
        bits <<= np.uint32(23)
        if bits.shape[0] and np.any(bits == np.uint32(0x80000000)):
            np.copyto(bits, np.uint32(0x7FC00000), where=bits == np.uint32(0x80000000))
        return bits.view(np.float32)

    def power_of_two_words(self, x, key, counter):
        x = np.asarray(x)
        if x.dtype != np.float32 or x.ndim != 1:
            return super().power_of_two_words(x, key, counter)
        # a block at a time (a multiple of 32 elements: whole words), while its draws and
        # codes are in the cache; the draws continue one Philox stream, so they are
        # uniform_ints's (a 32-bit word w gives w >> 9)
        n = x.shape[0]
        out = np.empty(-(-n * 9 // 32), np.int32)
        if out.shape[0]:
            out[-1] = 0  # the bits past the last code
        code_bytes = out.view(np.uint8)
        generator = _raw_stream(int(key), int(counter))
        compiled = jit.kernels()
        if compiled is not None:  # one compiled loop per block: round and pack
            bits = np.ascontiguousarray(x).view(np.int32)
            for a in range(0, n, _JIT_BLOCK):  # a multiple of 8: whole bytes per block
                m = min(_JIT_BLOCK, n - a)
                raw = generator.random_raw(-(-m // 2)).view("<u4")[:m]
                np.right_shift(raw, np.uint32(9), out=raw)
                compiled.natural_codes_packed(bits[a:a + m], raw, code_bytes[a * 9 // 8:])
            return out
        size = max(32, min(_FUSED_BLOCK, -(-n // 32) * 32))
        for a in range(0, n, size):
            m = min(size, n - a)
            raw = generator.random_raw(-(-m // 2)).view("<u4")[:m]
            r = np.right_shift(raw, np.uint32(9), out=raw).view(np.int32)
            codes = self.power_of_two_codes(x[a:a + m], r)
            whole = m // 8 * 8
            _pack_nine(codes[:whole], code_bytes[a * 9 // 8:(a + whole) * 9 // 8])
            if whole < m:  # the last few codes: the generic packing of their group
                tail = self.pack_uint(codes[whole:], 9).view(np.uint8)
                rest = code_bytes[(a + whole) * 9 // 8:]
                k = min(rest.shape[0], tail.shape[0])
                rest[:k] = tail[:k]
                rest[k:] = 0
        return out

    def power_of_two_from_words(self, words, n):
        n = int(n)
        raw = np.ascontiguousarray(words, dtype="<i4").view(np.uint8)
        bits = np.empty(n, np.uint32)
        compiled = jit.kernels()
        if compiled is not None:
            compiled.natural_values(raw, n, bits)
            return bits.view(np.float32)
        whole = n // 8 * 8
        for a in range(0, whole, _FUSED_BLOCK):  # a multiple of 8: whole 9-byte groups
            b = min(whole, a + _FUSED_BLOCK)
            _nine_bit_fields_high(raw[a * 9 // 8:b * 9 // 8], bits[a:b])
        if whole < n:  # the last group, its missing bytes zero
            group = np.zeros(10, np.uint8)
            rest = raw[whole * 9 // 8:whole * 9 // 8 + 9]
            group[:rest.shape[0]] = rest
            last = np.empty(8, np.uint32)
            _nine_bit_fields_high(group[:9], last)
            bits[whole:] = last[:n - whole]
        # code << 23 is the value's bits but for the NaN code 256, read as -0.0
        nan = bits == np.uint32(0x80000000)
        if nan.any():
            bits[nan] = np.uint32(0x7FC00000)
        return bits.view(np.float32)

    def bfloat16_words(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        n = x.shape[0]
        out = np.empty(-(-n // 2), np.int32)
        halves = out.view("<u2")
        if n % 2:
            halves[-1] = 0  # the half after an odd count
        u = x.view(np.uint32)
        size = max(1, min(_FUSED_BLOCK, n))
        t = np.empty(size, np.uint32)
        # a block at a time, while it is in the cache (five passes; unblocked, each pass
        # made a full-size temporary: 66 ms at 2.5e7 elements against ~20)
        for a in range(0, n, size):
            b = min(n, a + size)
            r, ub = t[:b - a], u[a:b]
            # round to nearest even on the dropped half (u + 0x7FFF + the kept half's last
            # bit); no finite value carries into the sign. The high halves of the sums
            # are the bfloat16 patterns (little-endian: every second uint16)
            np.right_shift(ub, np.uint32(16), out=r)
            np.bitwise_and(r, np.uint32(1), out=r)
            r += np.uint32(0x7FFF)
            r += ub
            np.copyto(halves[a:b], r.view("<u2")[1::2])
            peak = x[a:b].max()
            if peak != peak:  # a NaN in the block (max propagates it): the quiet NaN, x's sign
                nan = np.isnan(x[a:b])
                sign = (ub[nan] >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)
                halves[a:b][nan] = sign | np.uint16(0x7FC0)
        return out

    def dither_codes(self, y, u, levels):
        u = np.asarray(u)
        if y.dtype != np.float32 or u.dtype != np.float32:
            return super().dither_codes(y, u, levels)
        # in blocks that stay in the cache: the kernel makes about 25 passes
        out = np.empty(y.shape[0], np.int32)
        for start in range(0, y.shape[0], _CACHE_BLOCK):
            stop = start + _CACHE_BLOCK
            _dither_codes_block(y[start:stop], u[start:stop], levels, out[start:stop])
        return out

    def dither_values(self, codes, levels, dtype):
        if dtype != "float32":
            return super().dither_values(codes, levels, dtype)
        codes = np.asarray(codes)
        out = np.empty(codes.shape[0], np.int32)
        for start in range(0, codes.shape[0], _CACHE_BLOCK):
            stop = start + _CACHE_BLOCK
            _dither_values_block(codes[start:stop], levels, out[start:stop])
        return out.view(np.float32)

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
        # the protocol's arithmetic, in place, a block of rows at a time: two temporaries
        # of a block's size that stay in the cache (its dozen passes over a large grid
        # otherwise go to memory)
        buckets, d = grid.shape
        norms = np.empty(buckets, grid.dtype)
        codes = np.empty((buckets, d), np.int32)
        rows = max(1, (_CACHE_BLOCK << 2) // max(1, d))
        mag_block = np.empty((min(rows, buckets), d), grid.dtype)
        unit_block = np.empty_like(mag_block)
        for a in range(0, buckets, rows):
            b = min(buckets, a + rows)
            _bucket_levels_block(grid[a:b], noise[a:b], levels, norms[a:b], codes[a:b],
                                 mag_block[:b - a], unit_block[:b - a])
        return norms, codes.reshape(-1)

    def bucket_level_words(self, x, levels, bucket_size, key, counter):
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float64) or x.ndim != 1:
            return super().bucket_level_words(x, levels, bucket_size, key, counter)
        # a block of whole buckets at a time, a multiple of 32 elements (whole words of
        # codes): its draws, levels and packed codes are made while its temporaries are in
        # the cache, and the draws continue one Philox stream, so they are random_uniform's
        n, d, bits = x.shape[0], bucket_size, level_bits(levels)
        buckets = -(-n // d)
        out, norms, words, rows = _bucket_words_output(n, d, bits, x.dtype)
        if not rows:
            return out
        generator = _raw_stream(int(key), int(counter))
        noise = np.empty((rows, d), x.dtype)
        mag, unit = np.empty((rows, d), x.dtype), np.empty((rows, d), x.dtype)
        codes = None  # int32 codes: for a block with a NaN norm, or widths other than 8
        code_bytes = words.view(np.uint8)
        # float32 codes of a byte each: the levels and codes in one compiled loop
        compiled = jit.kernels() if x.dtype == np.float32 and bits == 8 else None
        for first in range(0, buckets, rows):
            r = min(rows, buckets - first)
            start, size = first * d, r * d
            valid = min(n - start, size)
            raw = generator.random_raw(-(-size // 2)).view("<u4")[:size]
            np.right_shift(raw, np.uint32(8), out=raw)
            if valid == size:
                grid = x[start:start + size].reshape(r, d)
            else:  # the short last bucket, zero-padded
                grid = np.zeros((r, d), x.dtype)
                grid.reshape(-1)[:valid] = x[start:]
            block_norms = norms[first:first + r]
            if compiled is not None:
                divisors = _bucket_norms_block(grid, block_norms, mag[:r], unit[:r])
                total = block_norms.sum()  # NaN exactly where a norm is (norms are >= 0)
                if total == total:
                    compiled.qsgd_codes(grid.reshape(-1), raw, divisors, d, levels, code_bytes[start:start + valid])
                    continue
            # the draws of random_uniform, exact in either dtype
            np.multiply(raw.view(np.int32), x.dtype.type(2.0 ** -24), out=noise.reshape(-1)[:size], dtype=x.dtype)
            _bucket_levels_block(grid, noise[:r], levels, block_norms, None, mag[:r], unit[:r])
            if bits == 8:
                total = block_norms.sum()  # NaN exactly where a norm is (norms are >= 0)
                if total == total:
                    # a code per byte, straight from the float codes (whole numbers in
                    # 0..254 unless a row's norm is NaN): pack_uint's bytes
                    np.copyto(code_bytes[start:start + valid], mag.reshape(-1)[:valid], casting="unsafe")
                    continue
            if codes is None:
                codes = np.empty((rows, d), np.int32)
                flat_codes = codes.reshape(-1)
            np.copyto(codes[:r], mag[:r], casting="unsafe")  # astype's conversion
            if bits == 8:  # a code per byte: pack_uint's conversion of the int32 codes
                np.copyto(code_bytes[start:start + valid], flat_codes[:valid], casting="unsafe")
            else:
                packed = self.pack_uint(flat_codes[:valid], bits)
                w = start * bits // 32
                words[w:w + packed.shape[0]] = packed
        return out

    def bucket_level_values(self, words, n, levels, bucket_size, dtype):
        if dtype not in ("float32", "float64"):
            return super().bucket_level_values(words, n, levels, bucket_size, dtype)
        n, d, s, bits = int(n), bucket_size, levels, level_bits(levels)
        real = np.dtype(dtype)
        buckets = -(-n // d)
        words = np.ascontiguousarray(words, dtype="<i4")
        norm_words = buckets * real.itemsize // 4
        scales = np.divide(words[:norm_words].view(real), real.type(s))
        codes = words[norm_words:]
        out = np.empty(n, real)
        # blocks of whole buckets and whole words: (c - s) * scale of the bucket, the
        # subtraction exact in the output dtype
        step = 32 // math.gcd(d, 32)
        rows = min(buckets, max(step, _FUSED_BLOCK // d // step * step))
        offset = real.type(s)
        code_bytes = codes.view(np.uint8)
        for first in range(0, buckets, max(rows, 1)):
            r = min(rows, buckets - first)
            start = first * d
            stop = min(n, start + r * d)
            block = out[start:stop]
            if bits == 8:
                np.subtract(code_bytes[start:stop], offset, out=block, dtype=real)
            else:
                w = start * bits // 32
                fields = self.unpack_uint(codes[w:w + -(-(stop - start) * bits // 32)], stop - start, bits)
                np.subtract(fields, offset, out=block, dtype=real)
            whole = (stop - start) // d
            if whole:
                grid = block[:whole * d].reshape(whole, d)
                np.multiply(grid, scales[first:first + whole, None], out=grid)
            if whole * d < stop - start:
                np.multiply(block[whole * d:], scales[first + whole], out=block[whole * d:])
        return out

    def dither_bucket_words(self, x, levels, bucket_size, key, counter):
        x = np.asarray(x)
        if x.dtype != np.float32 or x.ndim != 1:
            return super().dither_bucket_words(x, levels, bucket_size, key, counter)
        # a block of whole buckets at a time, a multiple of 32 elements (whole words of
        # codes), while its draws, ratios and codes are in the cache; the draws continue
        # one Philox stream, so they are random_uniform's
        n, d, bits = x.shape[0], bucket_size, level_bits(levels)
        buckets = -(-n // d)
        out, norms, words, rows = _bucket_words_output(n, d, bits, x.dtype)
        if not rows:
            return out
        generator = _raw_stream(int(key), int(counter))
        compiled = jit.kernels() if bits <= 8 else None
        if compiled is not None:  # norms, codes and packing in compiled loops, per block
            step = 32 // math.gcd(d, 32)  # buckets per whole words of codes
            rows = max(step, _JIT_BLOCK // d // step * step)
            codes, ratio = np.empty(min(n, rows * d), np.uint8), np.empty(min(n, rows * d), np.float32)
            code_bytes = words.view(np.uint8)
            for first in range(0, buckets, rows):
                start, size = first * d, min(rows, buckets - first) * d
                valid = min(n - start, size)
                raw = generator.random_raw(-(-size // 2)).view("<u4")[:size]
                compiled.dither_codes(x[start:start + valid], raw, d, levels, norms[first:first + rows],
                                      codes[:valid], ratio[:valid])
                compiled.pack_fields(codes[:valid], bits, code_bytes[start * bits // 8:])
            return out
        noise, ratio = np.empty(rows * d, np.float32), np.empty(rows * d, np.float32)
        # codes are packed a run of blocks at a time: packing costs per call, not per element
        run = max(rows, _PACK_RUN // (rows * d) * rows)
        codes = np.empty(min(buckets, run) * d, np.int32)
        for first_of_run in range(0, buckets, run):
            run_rows = min(run, buckets - first_of_run)
            run_start = first_of_run * d
            for first in range(first_of_run, first_of_run + run_rows, rows):
                r = min(rows, first_of_run + run_rows - first)
                start, size = first * d, r * d
                valid = min(n - start, size)
                raw = generator.random_raw(-(-size // 2)).view("<u4")[:size]
                np.right_shift(raw, np.uint32(8), out=raw)
                np.multiply(raw.view(np.int32), np.float32(2.0 ** -24), out=noise[:size], dtype=np.float32)
                if valid == size:
                    grid = x[start:start + size].reshape(r, d)
                else:  # the short last bucket, zero-padded
                    grid = np.zeros((r, d), np.float32)
                    grid.reshape(-1)[:valid] = x[start:]
                y = ratio[:size].reshape(r, d)
                np.abs(grid, out=y)
                block_norms = norms[first:first + r]
                np.max(y, axis=1, out=block_norms)  # NaN propagates; inf stays inf
                finite = np.isfinite(block_norms)
                if not finite.all():  # NaN or +-inf in the bucket: the positive quiet NaN
                    block_norms.view(np.int32)[~finite] = np.int32(0x7FC00000)
                safe = np.where(block_norms == 0, np.float32(1), block_norms)  # a NaN norm: NaN ratios
                np.divide(grid, safe[:, None], out=y)
                _dither_codes_block(ratio[:size], noise[:size], levels, codes[start - run_start:start - run_start + size])
            valid = min(n - run_start, run_rows * d)
            packed = self.pack_uint(codes[:valid], bits)
            w = run_start * bits // 32
            words[w:w + packed.shape[0]] = packed
        return out

    def dither_bucket_values(self, words, n, levels, bucket_size, dtype):
        bits = level_bits(levels)
        if dtype != "float32" or bits > 8:
            return super().dither_bucket_values(words, n, levels, bucket_size, dtype)
        n, d = int(n), bucket_size
        buckets = -(-n // d)
        words = np.ascontiguousarray(words, dtype="<i4")
        norms = words[:buckets].view(np.float32)
        table = self.dither_values(np.arange(1 << bits), levels, dtype)
        codes = words[buckets:]
        out = np.empty(n, np.float32)
        compiled = jit.kernels()
        if compiled is not None:
            compiled.dither_values(codes.view(np.uint8), n, bits, d, table, norms, out)
            return out
        # runs of whole buckets and whole words: the levels looked up, times the norms
        step = 32 // math.gcd(d, 32)
        rows = min(buckets, max(step, _PACK_RUN // d // step * step))
        for first in range(0, buckets, max(rows, 1)):
            r = min(rows, buckets - first)
            start = first * d
            stop = min(n, start + r * d)
            block = out[start:stop]
            w = start * bits // 32
            block[...] = self.take_fields(codes[w:w + -(-(stop - start) * bits // 32)], stop - start, bits, table)
            whole = (stop - start) // d
            if whole:
                grid = block[:whole * d].reshape(whole, d)
                np.multiply(grid, norms[first:first + whole, None], out=grid)
            if whole * d < stop - start:
                np.multiply(block[whole * d:], norms[first + whole], out=block[whole * d:])
        return out

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

    def clip_scales(self, stats, clip_sigma):
        if stats.dtype not in (np.float32, np.float64):
            return super().clip_scales(stats, clip_sigma)  # its error
        out = np.empty(3, stats.dtype)
        np.multiply(stats[1:2], clip_sigma, out=out[0:1])  # the protocol's rounding of clip_sigma
        np.minimum(stats[0:1], out[0:1], out=out[1:2])
        scale = out[1]
        if scale != scale:
            out[1:3] = np.nan  # NumPy's NaN is the positive quiet one
        else:
            out[2] = scale if scale > 0 else 1
        return out

    def peak_rms(self, x):
        # the protocol's arithmetic without a full-size temporary but the tree's first
        # level: max and min give the peak (and propagate NaN), squares are made a chunk
        # at a time straight into the first level of the fixed-order sum
        n = x.shape[0]
        if n == 0:
            return np.zeros(2, x.dtype)
        dtype = x.dtype.type
        high, low = x.max(), x.min()
        if not (np.isfinite(high) and np.isfinite(low)):
            return np.full(2, np.nan, x.dtype)  # the protocol's peak and rms are then NaN
        peak = max(abs(high), abs(low))
        safe = peak if peak > 0 else dtype(1)
        if n == 1:
            acc = x / safe
            np.multiply(acc, acc, out=acc)
        elif n >= _STREAMED_TREE_MIN:  # streamed (_streamed_tree_sums): no h-element array
            h = 1 << ((n - 1).bit_length() - 1)
            size = min(_FUSED_BLOCK, h)
            far_squares = np.empty(size, x.dtype)

            def first_level(a: int, b: int, out: list[np.ndarray]) -> None:
                first = out[0]
                np.divide(x[a:b], safe, out=first)
                np.multiply(first, first, out=first)
                far = max(0, min(b, n - h) - a)
                if far:
                    second = far_squares[:far]
                    np.divide(x[a + h:a + h + far], safe, out=second)
                    np.multiply(second, second, out=second)
                    first[:far] += second

            acc = _streamed_tree_sums(h, size, first_level, x.dtype, 1)[0]
        else:
            h = 1 << ((n - 1).bit_length() - 1)
            acc = np.empty(h, x.dtype)
            step = _SQUARES_CHUNK
            tmp = np.empty(min(step, n - h), x.dtype)
            for a in range(0, n - h, step):  # pairs (i, i + h): v_i + v_{i+h}
                b = min(n - h, a + step)
                first, second = acc[a:b], tmp[:b - a]
                np.divide(x[a:b], safe, out=first)
                np.multiply(first, first, out=first)
                np.divide(x[a + h:b + h], safe, out=second)
                np.multiply(second, second, out=second)
                first += second
            for a in range(n - h, h, step):  # carried unchanged to the next level
                b = min(h, a + step)
                first = acc[a:b]
                np.divide(x[a:b], safe, out=first)
                np.multiply(first, first, out=first)
            acc = _halve(acc, h, 1.0)
        rms = np.sqrt(acc[:1] * dtype(1.0 / n)) * peak
        return np.array([peak, rms[0]], x.dtype)

    def clipped_ternary_words(self, x, clip_sigma, key, counter):
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float64) or x.ndim != 1:
            return super().clipped_ternary_words(x, clip_sigma, key, counter)
        n = x.shape[0]
        scalars = self.clip_scales(self.peak_rms(x), clip_sigma)
        code_words = -(-n // 16)
        out = np.empty(code_words + x.dtype.itemsize // 4, np.int32)
        out[code_words:] = scalars[1:2].view(np.int32)
        c, bound = scalars[0], scalars[2]
        if c != c:  # x holds NaN or Inf (peak_rms's NaN): the general kernel, on all of x
            u = self.random_uniform(n, key, counter, None).astype(x.dtype, copy=False)
            out[:code_words] = self.pack_uint(self.clipped_ternary_codes(x, scalars[0:1], scalars[2:3], u), 2)
            return out
        # a block at a time (whole words: a multiple of 16 elements), while its draws and
        # temporaries are in the cache; the draws continue one Philox stream, so they are
        # random_uniform's. For finite x, |clip(x)| is min(|x|, c) and the clipped sign is
        # x's; the clip itself is not needed: the divisor q is min(max |x|, c) (or 1 for
        # a zero tensor), so where |x| > c, q = c and min(|x|, c) / q = 1 while |x| / q
        # >= 1, and both exceed every draw u < 1; elsewhere the two ratios are equal
        generator = _raw_stream(int(key), int(counter))
        size = max(16, min(_FUSED_BLOCK, -(-n // 16) * 16))
        ratio = np.empty(size, x.dtype)
        u = np.empty(size, x.dtype)
        keep = np.empty(size, np.bool_)
        negative = np.empty(size, np.bool_)
        codes = np.zeros(size, np.uint8)
        code_bytes = out[:code_words].view(np.uint8)
        for a in range(0, n, size):
            b = min(n, a + size)
            m = b - a
            r, k, neg, cb = ratio[:m], keep[:m], negative[:m], codes[:m]
            raw = generator.random_raw(-(-m // 2)).view("<u4")[:m]
            np.right_shift(raw, np.uint32(8), out=raw)
            np.multiply(raw.view(np.int32), x.dtype.type(2.0 ** -24), out=u[:m], dtype=x.dtype)  # exact
            np.abs(x[a:b], out=r)
            np.divide(r, bound, out=r)
            np.less(u[:m], r, out=k)
            np.add(k.view(np.uint8), 1, out=cb, dtype=np.uint8)
            np.less(x[a:b], 0, out=neg)
            neg &= k
            cb -= neg.view(np.uint8)  # twice: NumPy's uint8 shift is ~10x slower
            cb -= neg.view(np.uint8)
            whole = -(-m // 16) * 16
            if whole > m:
                codes[m:whole] = 0  # the fields past the last code
            # four 2-bit codes per byte, as pack_uint packs them: in each little-endian
            # word w of four codes, w | w >> 6 then t | t >> 12 gathers them in the low byte
            w = codes[:whole].view("<u4")
            t = np.right_shift(w, np.uint32(6))
            t |= w
            w = np.right_shift(t, np.uint32(12))
            w |= t
            np.copyto(code_bytes[a // 4:a // 4 + whole // 4], w, casting="unsafe")
        return out

    def ternary_values(self, words, n, dtype):
        if dtype not in ("float32", "float64"):
            return super().ternary_values(words, n, dtype)
        words = np.ascontiguousarray(words, dtype="<i4")
        code_words = -(-int(n) // 16)
        scale = words[code_words:].view(np.dtype(dtype))
        values = np.arange(-1, 3).astype(dtype) * scale  # (c - 1) * s
        return self.take_fields(words[:code_words], n, 2, values)

    @staticmethod
    def _order_keys_of(a: np.ndarray) -> np.ndarray:
        """order keys of float32/float64 ``a`` (or float bits of keys: the map is its own
        inverse) as int32/int64."""
        itype = np.int32 if a.dtype in (np.float32, np.int32) else np.int64
        bits = a.view(itype)
        return bits ^ ((bits >> (8 * a.dtype.itemsize - 1)) & np.iinfo(itype).max)

    def rotated_block_sum(self, x, width, shifts, negate):
        if width < _SKETCH_MIN_WIDTH or x.dtype not in (np.float32, np.float64):
            return super().rotated_block_sum(x, width, shifts, negate)
        return _rotated_block_sum(x, width, np.asarray(shifts).tolist(), np.asarray(negate).tolist())

    def rotated_block_median(self, rows, n, shifts, negate):
        if rows.shape[1] < _SKETCH_MIN_WIDTH or rows.dtype not in (np.float32, np.float64):
            return super().rotated_block_median(rows, n, shifts, negate)
        compiled = jit.kernels() if rows.dtype == np.float32 else None
        if compiled is not None:  # compiled loops over tiles of columns, the network's steps on keys
            steps, middle = median_network(rows.shape[0])
            out = np.empty(int(n), np.float32)
            compiled.sketch_median(np.ascontiguousarray(rows), int(n), np.ascontiguousarray(shifts, dtype=np.int64),
                                   np.ascontiguousarray(negate, dtype=np.bool_),
                                   np.array([(i, j) for i, j, _, _ in steps], np.int64).reshape(-1, 2),
                                   np.array(middle, np.int64), out)
            return out
        return _rotated_block_median(rows, n, np.asarray(shifts).tolist(), np.asarray(negate).tolist())

    def clipped_ternary_codes(self, x, clip, bound, u):
        c = np.asarray(clip).reshape(-1)[0]
        if c != c or (x.shape[0] and not (np.isfinite(x.min()) and np.isfinite(x.max()))):
            return self.ternary_codes(self.clip_magnitude(x, clip), bound, u)  # rare: NaN or Inf
        # |clip(x)| is min(|x|, clip) for finite x, and the clipped sign is x's; a block at
        # a time, so that the temporaries of its passes stay in the cache
        n = x.shape[0]
        codes = np.empty(n, np.uint8)
        ratio = np.empty(min(n, _CACHE_BLOCK), x.dtype)
        keep = np.empty(ratio.shape[0], np.bool_)
        negative = np.empty(ratio.shape[0], np.bool_)
        for a in range(0, n, _CACHE_BLOCK):
            b = min(n, a + _CACHE_BLOCK)
            r, k, neg, out = ratio[:b - a], keep[:b - a], negative[:b - a], codes[a:b]
            np.abs(x[a:b], out=r)
            np.copyto(r, c, where=r > c)  # min(|x|, clip): ~2.5x faster than np.minimum
            np.divide(r, bound, out=r)
            np.less(u[a:b], r, out=k)
            np.add(k.view(np.uint8), 1, out=out, dtype=np.uint8)
            np.less(x[a:b], 0, out=neg)
            neg &= k
            out -= neg.view(np.uint8)  # twice: NumPy's uint8 shift is ~10x slower
            out -= neg.view(np.uint8)
        return codes


#: elements per tile of the count-sketch kernels: a tile's handful of buffers (256 KiB
#: each for float32) stays in the cache while every block or row passes through it
_SKETCH_TILE = 1 << 16
#: the smallest tile: below it, calls cost more than the elements they process
_SKETCH_MIN_TILE = 1 << 12


def _sketch_tile(width: int, n: int) -> int:
    """Tile length for a tensor of ``n`` elements in blocks of ``width``: at most 1/64
    of the tensor, so that a tile's buffers stay a small part of the peak memory."""
    return min(width, _SKETCH_TILE, max(_SKETCH_MIN_TILE, n >> 6))


#: narrower blocks take the protocol's vectorised steps: tiles of a few elements would
#: cost a call each
_SKETCH_MIN_WIDTH = 256


def _rotated_into(out: np.ndarray, block: np.ndarray, width: int, start: int, negate: bool) -> None:
    """``out[i] = block[(start + i) mod width]`` (negated where ``negate``), ``block`` being
    the first ``len(block) <= width`` elements of a block padded with +0.0 to ``width``."""
    length, avail, pos = out.shape[0], block.shape[0], 0
    while pos < length:
        take = min(length - pos, width - start)
        real = max(0, min(start + take, avail) - start)
        if real:
            if negate:
                np.negative(block[start:start + real], out=out[pos:pos + real])
            else:
                out[pos:pos + real] = block[start:start + real]
        if real < take:
            out[pos + real:pos + take] = -0.0 if negate else 0.0
        pos += take
        start = 0


def _rotated_block_sum(x: np.ndarray, width: int, shifts: list, negate: list) -> np.ndarray:
    """:meth:`Ops.rotated_block_sum`, a tile of ``_SKETCH_TILE`` columns at a time: the
    pairwise order over the blocks is evaluated depth first, so a tile holds one buffer
    per level of it and the tensor is read once. A block's slice that needs no rotation
    within the tile is read in place and its sign applied by the addition it enters
    (``b - a`` for ``(-a) + b``: the same value, with a NaN's sign left unspecified)."""
    n, blocks = x.shape[0], len(shifts)
    levels = []  # (count, half) of each level of the pairwise order
    count = blocks
    while count > 1:
        levels.append((count, (count + 1) // 2))
        count = (count + 1) // 2
    out = np.empty(width, x.dtype)
    tile = _sketch_tile(width, n)
    pool: list = []

    def get(length: int) -> np.ndarray:
        return (pool.pop() if pool else np.empty(tile, x.dtype))[:length]

    def leaf(k: int, j0: int, length: int) -> tuple:
        base = k * width
        avail = min(width, n - base)
        start = (j0 - shifts[k]) % width
        if start + length <= avail:  # contiguous in the block: read in place, negate lazily
            return x[base + start:base + start + length], negate[k], False
        if start >= avail and start + length <= width:  # all padding
            return zeros[:length], negate[k], False
        buf = get(length)
        _rotated_into(buf, x[base:base + avail], width, start, negate[k])
        return buf, False, True

    def combine(a: tuple, b: tuple) -> tuple:
        (xa, na, oa), (xb, nb, ob) = a, b
        dst = xa if oa else (xb if ob else get(xa.shape[0]))
        if not (na or nb):
            np.add(xa, xb, out=dst)
        elif not nb:
            np.subtract(xb, xa, out=dst)
        elif not na:
            np.subtract(xa, xb, out=dst)
        elif dst is xb:  # (-b) - a
            np.negative(xb, out=dst)
            np.subtract(dst, xa, out=dst)
        else:  # (-a) - b
            np.negative(xa, out=dst)
            np.subtract(dst, xb, out=dst)
        if ob and dst is not xb:
            pool.append(xb.base)
        return dst, False, True

    def plus_zero(a: tuple) -> tuple:  # the appended +0.0 block (-0.0 becomes +0.0)
        xa, na, oa = a
        dst = xa if oa else get(xa.shape[0])
        if na:
            np.subtract(0.0, xa, out=dst)
        else:
            np.add(xa, 0.0, out=dst)
        return dst, False, True

    def value(level: int, k: int, j0: int, length: int) -> tuple:
        if level == 0:
            return leaf(k, j0, length)
        count, half = levels[level - 1]
        a = value(level - 1, k, j0, length)
        if k + half < count:
            return combine(a, value(level - 1, k + half, j0, length))
        return plus_zero(a)

    zeros = np.zeros(tile, x.dtype)
    for j0 in range(0, width, tile):
        j1 = min(width, j0 + tile)
        length = j1 - j0
        result, negated, owned = value(len(levels), 0, j0, length)
        if negated:
            np.negative(result, out=out[j0:j1])
        else:
            out[j0:j1] = result
        if owned:
            pool.append(result.base)
    return out


def _rotated_block_median(rows: np.ndarray, n: int, shifts: list, negate: list) -> np.ndarray:
    """:meth:`Ops.rotated_block_median`, a segment of a block at a time (cut where a
    tile ends or a row's rotation wraps, so that every row's values are one slice of
    ``rows`` or of its negation). Where the rows hold no NaN and no zero, float order
    is the total order and the network runs ``np.minimum`` / ``np.maximum`` on the
    floats; otherwise on the integer order keys (NaN made the positive quiet NaN)."""
    r, width = rows.shape
    itype = np.int32 if rows.dtype == np.float32 else np.int64
    sign_shift = 8 * rows.dtype.itemsize - 1
    top = itype(np.iinfo(itype).max)
    zeros = rows.size - np.count_nonzero(rows)
    blocks = len(shifts[0])
    # float order is the total order but for the sign of zero: with few zero buckets, the
    # elements that read one are selected again on keys afterwards
    fast = not np.isnan(rows.min()) and zeros * blocks <= n // 16
    if fast:
        plus, minus, work = rows, np.negative(rows), rows.dtype
    else:
        inf_key, nan_key = (0x7F800000, 0x7FC00000) if itype == np.int32 else (0x7FF << 52, 0x7FF8 << 48)
        bits = rows.view(itype)
        plus = bits >> sign_shift
        plus &= top
        plus ^= bits  # order keys: a negative float's magnitude bits inverted
        nan = (plus > inf_key) | (plus < -1 - inf_key)
        plus[nan] = nan_key
        minus = np.invert(plus)  # the key of -v, but a NaN stays the positive NaN
        minus[nan] = nan_key
        work = itype
    steps, middle = median_network(r)
    # the step that writes the (odd count's) median, and only it, if it is the last one
    last = len(steps) - 1 if len(middle) == 1 and steps and (
        (steps[-1][0] == middle[0] and not steps[-1][3]) or (steps[-1][1] == middle[0] and not steps[-1][2])) else None
    out = np.empty(n, rows.dtype)
    out_work = out.view(work)
    tile = _sketch_tile(width, n)
    pool: list = []

    def get(length: int) -> np.ndarray:
        return (pool.pop() if pool else np.empty(tile, work))[:length]

    def to_float_bits(key: np.ndarray, dest: np.ndarray) -> None:
        tmp = get(key.shape[0])
        np.right_shift(key, sign_shift, out=tmp)
        tmp &= top
        np.bitwise_xor(key, tmp, out=dest)
        pool.append(tmp.base)

    for q in range(len(shifts[0])):
        base = q * width
        avail = min(width, n - base)
        cuts = set(range(0, avail, tile)) | {avail}
        cuts |= {(width - shifts[j][q]) % width for j in range(r)}
        cuts = sorted(c for c in cuts if c <= avail)
        for c0, c1 in zip(cuts, cuts[1:]):
            length = c1 - c0
            v = []
            for j in range(r):
                start = (c0 + shifts[j][q]) % width
                v.append((minus if negate[j][q] else plus)[j, start:start + length])
            owned = [False] * r
            dest = out_work[base + c0:base + c1]
            for number, (i, j, low, high) in enumerate(steps):
                a, b, oa, ob = v[i], v[j], owned[i], owned[j]
                if number == last and work is not itype:  # the median itself: straight into the output
                    (np.minimum if low else np.maximum)(a, b, out=dest)
                    break
                if low and high:
                    lo = get(length)
                    np.minimum(a, b, out=lo)
                    hi = b if ob else (a if oa else get(length))
                    np.maximum(a, b, out=hi)
                    if oa and hi is not a:
                        pool.append(a.base)
                    v[i], v[j], owned[i], owned[j] = lo, hi, True, True
                elif low:
                    dst = a if oa else (b if ob else get(length))
                    np.minimum(a, b, out=dst)
                    if ob and dst is not b:
                        pool.append(b.base)
                    v[i], v[j], owned[i], owned[j] = dst, None, True, False
                else:
                    dst = b if ob else (a if oa else get(length))
                    np.maximum(a, b, out=dst)
                    if oa and dst is not a:
                        pool.append(a.base)
                    v[i], v[j], owned[i], owned[j] = None, dst, False, True
            if len(middle) == 1:
                if work is itype:
                    to_float_bits(v[middle[0]], dest)
                elif last is None:
                    dest[...] = v[middle[0]]
            else:
                halves = []
                for m in middle:
                    if work is itype:
                        f = get(length)
                        to_float_bits(v[m], f)
                        halves.append(f.view(rows.dtype))
                    else:
                        halves.append(v[m])
                d = dest.view(rows.dtype)
                np.add(halves[0], halves[1], out=d)
                d *= 0.5
                if work is itype:
                    pool.extend(h.view(itype).base for h in halves)
            for arr, own in zip(v, owned):
                if own:
                    pool.append(arr.base)
    if fast and zeros:
        shift_arr, negate_arr = np.array(shifts, np.int64), np.array(negate, np.bool_)
        zr, zj = np.divmod(np.flatnonzero(rows.reshape(-1) == 0), width)
        idx = (np.arange(blocks)[None, :] * width + (zj[:, None] - shift_arr[zr]) % width).reshape(-1)
        idx = np.unique(idx[idx < n])
        out[idx] = _rotated_median_at(rows, idx, shift_arr, negate_arr)
    return out


def _rotated_median_at(rows: np.ndarray, idx: np.ndarray, shifts: np.ndarray, negate: np.ndarray) -> np.ndarray:
    """:meth:`Ops.rotated_block_median` at the elements ``idx`` only (no NaN in ``rows``)."""
    r, width = rows.shape
    q, c = idx // width, idx % width
    values = []
    for j in range(r):
        v = rows[j, (c + shifts[j, q]) % width]
        values.append(NumpyOps._order_keys_of(np.where(negate[j, q], -v, v)))
    got = [NumpyOps._order_keys_of(v).view(rows.dtype)  # the map is an involution
           for v in run_median_network(values, np.minimum, np.maximum)]
    return got[0] if len(got) == 1 else (got[0] + got[1]) * rows.dtype.type(0.5)


#: elements up to which :meth:`NumpyOps.topk_magnitude_indices` selects on ``abs(x)``
#: (a temporary of 256 KiB of float32 at most)
_SMALL_TOPK = 1 << 16
#: sparse payloads of fewer elements are packed and scattered with plain fancy indexing
#: (their per-call work is most of the time; the large-payload paths save memory and
#: NumPy's slower int32 fancy assignment)
_SMALL_SPARSE = 1 << 12

#: draws per block of :meth:`NumpyOps.random_uniform` (even: whole 64-bit words)
_RANDOM_BLOCK = 1 << 20

#: elements per block of the kernels that make many passes, so that their temporaries
#: stay in the cache (2**15 float32: 128 KiB per temporary)
_CACHE_BLOCK = 1 << 15

#: elements per block of the fused kernels that draw, quantize and pack (their two
#: dozen NumPy calls per block cost about as much as a block's passes below this)
_FUSED_BLOCK = 1 << 15
#: tree_sum and abs_tree_sum stream their sums a cache block at a time from this many
#: elements on (_streamed_tree_sums); below it their one pass over an h-element array
#: is faster while it fits in the cache (abs_tree_sum: 1.09 against 1.35 ms at 4e6; 4.3
#: against 2.5 ms at 8e6)
_STREAMED_TREE_MIN = 1 << 23
#: where(mask, x, +0.0) takes the bitwise path from this many elements (below it the
#: call's own cost dominates either way)
_WHERE_MASK_MIN = 1 << 12
#: pack_magnitude_at_least works a block of this many elements at a time from
#: _PACK_AT_LEAST_BLOCKED_MIN elements on: below it nonzero_magnitude_at_least's int64
#: indices are small, and the one-pass version measured as fast or faster (threshold's
#: round trip at 1e6 on NumPy: 2.3 ms against 5.2-5.4 ms blocked, the difference in
#: which of the 8 MB buffers glibc hands back fresh pages; 2.1 against 1.9 on torch)
#: elements per call of a compiled kernel (grace_dl.ops.jit) that draws a block at a
#: time: a multiple of 32 (whole words), its draws ~1 MiB
_JIT_BLOCK = 1 << 18
#: from this many elements on, tail_sums and tail_codes run a cache block at a time
_STREAMED_TAILS_MIN = 1 << 21
#: elements per block of tail_codes
_TAIL_CODES_BLOCK = 1 << 16
_PACK_AT_LEAST_BLOCK = 1 << 16
_PACK_AT_LEAST_BLOCKED_MIN = 1 << 22
#: the same for sign_means, whose one-pass version makes four full-size temporaries
#: (0.69 against 0.77 ms at 1e6; 8.3 against 1.9 ms at 2.4e6)
_STREAMED_SIGN_MEANS_MIN = 1 << 21
#: codes packed per call by the fused kernels that pack a run of blocks (a pack costs ~30
#: NumPy calls: at 2**20 codes their overhead is below 0.05 ns per code)
_PACK_RUN = 1 << 20

#: field j of byte value b for fields of 1, 2 and 4 bits, as (256, 8 / bits) index tables
_BYTE_FIELDS = {bits: (np.arange(256)[:, None] >> (np.arange(8 // bits) * bits)) & ((1 << bits) - 1)
                for bits in (1, 2, 4)}

#: bit j of byte value b, as a (256, 8) bool table
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(np.bool_)

#: bit j of byte value b, as a (256, 8) index table into ``[off, on]``
_BYTE_BIT_INDEX = _BYTE_BITS.astype(np.intp)

#: +1 and -1 of each float dtype, for unpack_signs without a scale
_UNIT_SIGNS = {dtype: (np.ones(1, dtype), -np.ones(1, dtype)) for dtype in (np.float32, np.float64)}

#: recent (256, 8) tables of select_bits, by dtype and the bits of ``on`` and ``off``: the
#: sign methods' +-1 tables repeat every call
_BIT_TABLES: dict = {}


def _bit_table(on: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Row ``b``: ``on`` where bit ``j`` of byte value ``b`` is set, else ``off``."""
    key = (on.dtype.str, on.tobytes(), off.tobytes())
    table = _BIT_TABLES.get(key)
    if table is None:
        # ``off`` then ``on`` picked by each bit (a take copies the bits, as np.where
        # does, in a third of the time: a scaled sign method builds a table every call)
        table = np.concatenate([np.reshape(off, 1), np.reshape(on, 1)]).take(_BYTE_BIT_INDEX)
        table.flags.writeable = False
        if len(_BIT_TABLES) >= 8:
            _BIT_TABLES.clear()
        _BIT_TABLES[key] = table
    return table


#: fields from which :meth:`NumpyOps.take_fields` looks 8-bit fields up two at a time
_PAIR_TAKE_MIN = 1 << 16

#: recent 65536-entry tables of value pairs of take_fields, by the 256 values' bytes
_PAIR_TABLES: dict = {}

#: entry ``j`` of a pair table: the fields of the little-endian 16-bit value ``j``
_PAIR_FIELDS = np.stack([np.arange(1 << 16) & 0xFF, np.arange(1 << 16) >> 8], axis=1)


def _pair_table(values: np.ndarray) -> np.ndarray:
    """Entry ``j``: ``values[j & 255]`` then ``values[j >> 8]``, as one 8-byte item."""
    key = (values.dtype.str, values.tobytes())
    table = _PAIR_TABLES.get(key)
    if table is None:
        table = np.take(values, _PAIR_FIELDS).view(np.uint64).reshape(-1)
        table.flags.writeable = False
        if len(_PAIR_TABLES) >= 4:
            _PAIR_TABLES.clear()
        _PAIR_TABLES[key] = table
    return table


#: elements squared at a time by :meth:`NumpyOps.peak_rms` (256 KiB of float32)
_SQUARES_CHUNK = 1 << 16


def _dither_codes_block(y: np.ndarray, u: np.ndarray, levels: int, out: np.ndarray) -> None:
    """:meth:`NumpyOps.dither_codes` of float32 ``y`` and draws ``u`` into int32 ``out``,
    branch-free on the bits (np.where on data-dependent masks is 15x slower)."""
    a = y.view(np.int32) & np.int32(0x7FFFFFFF)  # |y|'s bits
    peak = int(a.max()) if a.shape[0] else 0  # one reduction spares the passes below
    special = None
    if peak >= 0x7F800000:  # -1 at NaN and +-inf
        special = np.negative((a >= np.int32(0x7F800000)).view(np.uint8), dtype=np.int32)
    if peak > 0x3F800000:
        np.minimum(a, np.int32(0x3F800000), out=a)  # |y| clamped to 1 (NaN and inf masked off below)
    keep = np.negative((a >= np.int32((128 - levels) << 23)).view(np.uint8), dtype=np.int32)  # -1: |y| >= 2**(1-s)
    # the probability of rounding up: the mantissa fraction at or above the lowest level,
    # |y| / 2**(1-s) below it (both exact), chosen by bits
    fraction = (a & np.int32(0x7FFFFF)).astype(np.float32)
    fraction *= np.float32(2.0 ** -23)
    low = a.view(np.float32) * np.float32(2.0 ** (levels - 1))
    bits = fraction.view(np.int32)
    bits &= keep
    low_bits = low.view(np.int32)
    low_bits &= ~keep
    bits |= low_bits
    k = np.right_shift(a, 23, out=a)
    k -= np.int32(127 - levels)
    k &= keep
    k += np.less(u, fraction).view(np.uint8)
    if special is not None:
        k &= ~special  # NaN and +-inf: level 0
    # levels + k, or levels - k where y's sign bit is set (then k = 0 for -0.0 and NaN)
    negative = np.right_shift(y.view(np.int32), 31, out=keep)  # -1 where the sign bit is set
    negative &= k << 1
    np.add(k, np.int32(levels), out=out)
    out -= negative


#: the sign bit of a float of 4 or 8 bytes, as the integer of its width
_SIGN_BIT = {4: np.int32(-2**31), 8: np.int64(-2**63)}


def _bucket_norms_block(grid: np.ndarray, norms: np.ndarray, mag: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """The norms of :meth:`NumpyOps.bucket_levels` of the rows ``grid`` into ``norms``,
    with ``mag`` and ``unit`` temporaries of the grid's shape (``|grid|`` is left in
    ``mag``); returns the divisors: the norms, 1 where a norm is 0."""
    np.abs(grid, out=mag)
    peak = mag.max(axis=1)
    # where(p > 0, p, p * 0 + 1) for p >= 0 or NaN: only a zero changes (NaN * 0 + 1 is
    # that NaN), so the zeros are set in place (where a row is all zero: rare, one
    # reduction finds out)
    all_rows_nonzero = peak.all()
    if not all_rows_nonzero:
        peak[peak == 0] = 1
    np.divide(grid, peak[:, None], out=unit)
    np.multiply(unit, unit, out=unit)
    np.sqrt(np.add.reduce(unit, axis=1, dtype=grid.dtype), out=norms)
    norms *= peak
    safe = norms
    # a norm is +0, positive or NaN: +0 only in a row whose peak was 0 (elsewhere the
    # peak element's square is 1, so the norm is at least the peak, or NaN), so the
    # check is needed only when a peak was
    if not all_rows_nonzero and not norms.all():
        safe = norms.copy()
        safe[norms == 0] = 1
    return safe


def _bucket_levels_block(grid: np.ndarray, noise: np.ndarray, levels: int, norms: np.ndarray,
                         codes: np.ndarray | None, mag: np.ndarray, unit: np.ndarray) -> None:
    """:meth:`NumpyOps.bucket_levels` of the rows ``grid`` into ``norms`` and int32
    ``codes``, with ``mag`` and ``unit`` temporaries of the grid's shape; the codes are
    left in ``mag`` as floats too (and only there if ``codes`` is None)."""
    dtype = grid.dtype.type
    safe = _bucket_norms_block(grid, norms, mag, unit)
    np.divide(mag, safe[:, None], out=mag)
    np.multiply(mag, levels, out=mag)
    np.add(mag, noise, out=mag)
    np.floor(mag, out=mag)
    # min(level, s): a masked copy is ~2.5x faster than np.minimum (NaN > s is false, so
    # a NaN stays); a level above s needs one element to outweigh its bucket's norm by
    # rounding, so one reduction (NaN too says "maybe") spares the compare nearly always
    if not mag.max() <= levels:
        np.copyto(mag, dtype(levels), where=mag > levels)
    # sign(g) * level as level (>= +0, or NaN) with g's sign bit or-ed in: level is 0
    # where g is +-0; a NaN level (whatever its sign) makes a NaN code, which converts
    # to the same int32 as any NaN
    sign = unit.view(f"i{grid.dtype.itemsize}")
    np.bitwise_and(grid.view(sign.dtype), _SIGN_BIT[grid.dtype.itemsize], out=sign)
    level = mag.view(sign.dtype)
    np.bitwise_or(level, sign, out=level)
    np.add(mag, levels, out=mag)
    if codes is not None:
        np.copyto(codes, mag, casting="unsafe")  # astype's conversion


def _dither_values_block(codes: np.ndarray, levels: int, out: np.ndarray) -> None:
    """:meth:`NumpyOps.dither_values` (float32) of ``codes`` as int32 bits into ``out``."""
    signed = np.subtract(codes, levels, dtype=np.int32, casting="unsafe")
    k = np.abs(signed)
    present = np.negative((k > 0).view(np.uint8), dtype=np.int32)
    k += np.int32(127 - levels)
    k <<= 23
    k &= present
    signed >>= 31  # the sign; a negative code always has k > 0
    signed <<= 31
    np.bitwise_or(k, signed, out=out)


#: first levels of at most this many sums use a per-thread workspace (see _tree_buffer)
_TREE_WORKSPACE_MAX = 1 << 16

_TREES = threading.local()
_NO_WORKSPACES: dict = {}


class _TreeWorkspace:
    """A thread's buffers for :meth:`Ops.tree_sum` of one first-level width ``h``: ``acc``
    (``h`` sums, added in place), ``scratch`` (``h`` more elements for a caller's
    temporary) and the ``(low, high)`` views of ``acc`` that each level adds, sliced
    once. A small tensor's sum is a dozen additions of a few elements, where slicing
    the two views of each level cost as much as the addition."""

    __slots__ = ("acc", "scratch", "levels")

    def __init__(self, h: int, dtype: np.dtype):
        both = np.empty(2 * h, dtype)
        self.acc, self.scratch = both[:h], both[h:]
        levels = []
        while h > 2:  # the last level adds into a fresh array: the result outlives the workspace's next use
            h >>= 1
            levels.append((self.acc[:h], self.acc[h:h + h]))
        self.levels = tuple(levels)


def _tree_buffer(h: int, dtype: np.dtype) -> np.ndarray:
    """An ``h``-element array for the first-level sums of a tree sum, handed to
    :func:`_halve`: this thread's workspace where ``h`` is small (its contents are
    overwritten by the next tree sum of the thread), else a fresh array."""
    if h > _TREE_WORKSPACE_MAX:
        return np.empty(h, dtype)
    cache = getattr(_TREES, "workspaces", None)
    if cache is None:
        cache = _TREES.workspaces = {}
    workspace = cache.get((h, dtype))
    if workspace is None:
        if len(cache) >= 40:  # 17 widths of two dtypes fit: only other dtypes get here
            cache.clear()
        workspace = cache[(h, dtype)] = _TreeWorkspace(h, dtype)
    return workspace.acc


def _tree_scratch(acc: np.ndarray) -> np.ndarray:
    """The scratch half of the workspace whose ``acc`` is ``acc`` (from :func:`_tree_buffer`)."""
    return _TREES.workspaces[(acc.shape[0], acc.dtype)].scratch


def _streamed_tree_sums(h: int, block: int, first_level: Callable[[int, int, list[np.ndarray]], None],
                        dtype: np.dtype, sides: int, scale: float = 1.0) -> list[np.ndarray]:
    """:meth:`NumpyOps.tree_sum` of ``sides`` arrays whose ``h`` first-level sums (``h``
    and ``block`` powers of two, ``block <= h``) ``first_level(a, b, outs)`` writes a
    block ``[a, b)`` at a time, never holding more than ``log2(h / block) + 2`` blocks.

    The halving levels add ``acc[j]`` and ``acc[j + h/2]``, then ``j`` and ``j + h/4``,
    ...: for blocks ``m`` of the first-level sums, the first levels pair blocks whose
    numbers differ in their top bit, the next in the bit below. Taken in bit-reversed
    order, those are neighbours, so a binary counter of partial sums (merge the top two
    while they are of one level) adds exactly the pairs the halving adds, in the cache;
    the last block then halves as usual. Returns a 1-element array per side, times
    ``scale`` (default 1.0) as :func:`_halve` scales."""
    count = h // block
    levels = count.bit_length() - 1
    pool = [[np.empty(block, dtype) for _ in range(sides)] for _ in range(levels + 2)]
    free = list(range(len(pool)))
    stack: list[tuple[int, int]] = []  # (level, pool slot)
    for r in range(count):
        m = int(format(r, f"0{levels}b")[::-1], 2) if levels else 0
        slot = free.pop()
        first_level(m * block, (m + 1) * block, pool[slot])
        level = 0
        while stack and stack[-1][0] == level:
            _, lower = stack.pop()
            for side in range(sides):
                np.add(pool[lower][side], pool[slot][side], out=pool[lower][side])
            free.append(slot)
            slot, level = lower, level + 1
        stack.append((level, slot))
    ((_, slot),) = stack
    return [_halve(pool[slot][side], block, scale) for side in range(sides)]


def _halve(acc: np.ndarray, h: int, scale: float) -> np.ndarray:
    """The rest of :meth:`Ops.tree_sum` on its ``h`` (a power of two) first-level sums,
    in place: halves added until one is left, times ``scale``. Returns a fresh
    1-element array (``acc`` may be a thread's workspace, see :func:`_tree_buffer`)."""
    add = np.add
    if h <= _TREE_WORKSPACE_MAX:
        workspace = getattr(_TREES, "workspaces", _NO_WORKSPACES).get((h, acc.dtype))
        if workspace is not None and workspace.acc is acc:
            for low, high in workspace.levels:
                add(low, high, out=low)
            out = add(acc[0:1], acc[1:2]) if h > 1 else acc[:1].copy()
            if scale != 1.0:
                np.multiply(out, acc.dtype.type(scale), out=out)
            return out
    while h > 1:  # one slice fewer per level: at 1e4 elements the 13 levels are most of the cost
        h >>= 1
        low = acc[:h]
        add(low, acc[h:h + h], out=low)
    if scale != 1.0:
        np.multiply(acc[:1], acc.dtype.type(scale), out=acc[:1])
    return acc[:1]


#: where field j of a 9-bit group goes in its group's 72 bits (below 64: fields 0-6
#: whole, field 7's lowest bit)
_NINE_SHIFTS = [np.uint64(9 * j) for j in range(8)]

#: left shifts that move field j of a group, read as the 16 bits from its first byte
#: (bit j on), to bits 23-31
_NINE_UNSHIFT = np.uint32(23) - np.arange(8, dtype=np.uint32)


def _pack_nine(codes: np.ndarray, out: np.ndarray) -> None:
    """:meth:`NumpyOps.pack_uint` at 9 bits of the int32 ``codes`` (each below 512, a
    multiple of 8 of them) into the bytes ``out`` (9 per 8 codes): each group of eight
    as the 64-bit word of fields 0-6 and field 7's lowest bit, then field 7 >> 1 as the
    ninth byte, the fields' columns transposed first so that the shifts run on
    contiguous rows."""
    groups = codes.shape[0] // 8
    if not groups:
        return
    rows = np.empty((8, groups), np.uint64)
    np.copyto(rows, codes.reshape(groups, 8).T, casting="unsafe")
    word = rows[0]
    for j in range(1, 8):
        row = rows[j]
        row <<= _NINE_SHIFTS[j]  # field 7: all but its lowest bit pass bit 63
        word |= row
    grid = out.reshape(groups, 9)
    grid[:, :8] = word.view(np.uint8).reshape(groups, 8)
    np.right_shift(codes[7::8], 1, out=grid[:, 8], casting="unsafe")


def _nine_bit_fields_high(raw: np.ndarray, out: np.ndarray) -> None:
    """The 9-bit fields of the groups of 9 bytes ``raw`` (8 fields each) into bits 23-31
    of uint32 ``out``, bits 0-22 zero. Field ``j`` of a group starts at bit ``j`` of its
    byte ``j``: the 16 bits read there (an unaligned strided view) hold it whole."""
    groups = out.shape[0] // 8
    if not groups:
        return
    # the view reads bytes 9 g + j and 9 g + j + 1, j <= 7: all within the group
    pairs = np.ndarray((groups, 8), dtype="<u2", buffer=raw, strides=(9, 1))
    grid = out.reshape(groups, 8)
    np.copyto(grid, pairs, casting="unsafe")
    grid <<= _NINE_UNSHIFT
    grid &= np.uint32(0xFF800000)


#: masks of the low half of each 16-, 32- and 64-bit lane of a 64-bit word, with the
#: lane widths
_LANE_MASKS = [(np.uint64(0x00FF00FF00FF00FF), 16), (np.uint64(0x0000FFFF0000FFFF), 32),
               (np.uint64(0x00000000FFFFFFFF), 64)]


def _lane_layout(bits: int) -> tuple[type, int]:
    """Fields of ``bits <= 16`` bits start one to a lane of a 64-bit word: the lane's
    type (uint8 up to 8 bits, else uint16) and the first merge level (0: bytes)."""
    return (np.uint8, 0) if bits <= 8 else (np.uint16, 1)


def _pack_groups_in_words(v: np.ndarray, bits: int) -> np.ndarray:
    """:meth:`NumpyOps.pack_uint` for ``bits <= 16``: the bit stream of the fields as the
    bytes of ``ceil(n * bits / 32)`` int32 words (the tail zero), in contiguous passes: the
    fields, one to a byte (up to 8 bits) or a 16-bit lane of a 64-bit word, are merged
    pairwise until the word holds one group of 8 (or 4) fields in its low bits, field
    ``j`` at bit ``bits * j`` (the group's stream), and the groups of 64 fields are
    shifted into ``bits`` 64-bit words, whose little-endian bytes are the stream.
    (Strided byte columns cost ~6x a contiguous pass.) Fields must be below
    ``2**bits``."""
    n = v.shape[0]
    lane, first = _lane_layout(bits)
    per_word = 8 // np.dtype(lane).itemsize  # fields per 64-bit word
    supers = -(-n // 64)  # 64 fields: `bits` whole 64-bit words
    words = -(-n * bits // 32)
    lanes = np.zeros(supers * 64, lane)
    np.copyto(lanes[:n], v, casting="unsafe")
    g = lanes.view("<u8")
    high = np.empty_like(g)
    field = bits
    for mask, width in _LANE_MASKS[first:]:
        # each lane of `width` bits holds two fields of `field` bits, in its halves: the
        # high one moves down next to the low one
        np.bitwise_and(g, ~mask, out=high)
        np.right_shift(high, np.uint64(width // 2 - field), out=high)
        g &= mask
        g |= high
        field *= 2
    group_bits = bits * per_word
    groups = g.reshape(supers, 64 // per_word)
    out = np.zeros((supers, bits), "<u8")
    for j in range(64 // per_word):  # group j of a super starts at stream bit group_bits j
        word, shift = divmod(group_bits * j, 64)
        out[:, word] |= groups[:, j] << np.uint64(shift)
        if shift + group_bits > 64:
            out[:, word + 1] |= groups[:, j] >> np.uint64(64 - shift)
    return out.reshape(-1).view(np.uint8)[:4 * words]


def _unpack_groups_in_words(raw: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_groups_in_words`: the ``n`` fields (``bits <= 16``) of the
    stream bytes ``raw`` (missing bytes read as zero), as uint8 (up to 8 bits) or uint16,
    in contiguous passes but for one strided pass over an eighth (a quarter) of them."""
    lane, first = _lane_layout(bits)
    per_word = 8 // np.dtype(lane).itemsize
    supers = -(-n // 64)
    stream = np.zeros((supers, bits), "<u8")
    have = min(raw.shape[0], supers * bits * 8)
    stream.reshape(-1).view(np.uint8)[:have] = raw[:have]
    group_bits = bits * per_word
    lanes = np.empty((supers, 64 // per_word), "<u8")
    group_mask = np.uint64((1 << group_bits) - 1) if group_bits < 64 else np.uint64(2**64 - 1)
    for j in range(64 // per_word):
        word, shift = divmod(group_bits * j, 64)
        g = lanes[:, j]
        np.right_shift(stream[:, word], np.uint64(shift), out=g)
        if shift + group_bits > 64:
            g |= stream[:, word + 1] << np.uint64(64 - shift)
        g &= group_mask
    g = lanes.reshape(-1)
    high = np.empty_like(g)
    levels = _LANE_MASKS[first:]
    field = bits << (len(levels) - 1)
    for _, width in reversed(levels):
        # each lane of `width` bits holds two fields of `field` bits side by side: the
        # high one moves up to the lane's upper half
        part = (1 << field) - 1
        low = np.uint64(sum(part << (width * i) for i in range(64 // width)))
        np.bitwise_and(g, low << np.uint64(field), out=high)
        np.left_shift(high, np.uint64(width // 2 - field), out=high)
        g &= low
        g |= high
        field //= 2
    return g.view(lane)[:n]


