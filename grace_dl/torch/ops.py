"""PyTorch implementation of the ops protocol, for CPU and CUDA tensors.

Everything stays on the tensor's device. Host synchronisation happens only where the
protocol returns a Python value (``item``) or a data-dependent length (``nonzero``,
hence threshold selection), never in fixed-size paths such as casts, packing or top-k.

Uniform draws of CPU tensors are NumPy's (``NumpyOps.random_uniform``, wrapped without a
copy), so random methods give the same payloads on NumPy and torch CPU; CUDA tensors draw
with torch's own generator, seeded from the same key.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch

from ..core import derive_key
from ..ops import jit
from ..ops.base import Ops
from ..ops.numpy_backend import NumpyOps, draws_for_distinct, kth_largest_value

_TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


# NumPy's kernels run on a CPU tensor's own memory (``Tensor.numpy()`` shares it). The bit
# and quantization primitives use them there: this torch build's CPU comparisons, integer
# shifts and ``where`` run 15-30x slower than NumPy's (1.5 ns per element for ``x >= 0``,
# 13 ns for ``where``, against 0.05 ns and 1 ns).
_NUMPY = NumpyOps()
# what all_finite answers for a CPU tensor it checked on the host (read only, never written)
_TRUE, _FALSE = torch.tensor(True), torch.tensor(False)
_SHARES_WITH_NUMPY = {torch.float32, torch.float64, torch.float16, torch.int32, torch.int64, torch.uint8, torch.bool}


#: sparse payloads of at least this many elements scatter with torch's scatter_ (below
#: it NumPy's fancy assignment, with less per-call work, is faster), in blocks of
#: _TORCH_SCATTER_BLOCK indices: 2 MB of int64 indices a block, which still stay in the
#: cache; blocks of 2**16 cost a scatter_ call's setup 4x as often (a 1e6-element dense
#: payload: ~0.81 ms against ~1.0 ms)
_TORCH_SCATTER_MIN = 1 << 14
_TORCH_SCATTER_BLOCK = 1 << 18


#: CPU results of at least this many bytes are allocated by NumPy (see _empty_cpu)
_HUGE_PAGE_MIN_BYTES = 1 << 22
_NUMPY_OF = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
             torch.bfloat16: np.int16, torch.int32: np.int32, torch.int64: np.int64, torch.uint8: np.uint8,
             torch.bool: np.bool_}


#: the fewest elements a result of _HUGE_PAGE_MIN_BYTES can have (8-byte elements): a
#: cheap first test on hot paths, where most tensors are small
_LARGE_MIN_NUMEL = _HUGE_PAGE_MIN_BYTES >> 3


def _large_cpu(numel: int, dtype: torch.dtype, like: torch.Tensor) -> bool:
    """Whether a result of ``numel`` elements of ``dtype``, on ``like``'s device, goes to
    :func:`_empty_cpu`."""
    return (numel >= _LARGE_MIN_NUMEL and numel * dtype.itemsize >= _HUGE_PAGE_MIN_BYTES and like.is_cpu
            and dtype in _NUMPY_OF)


def _empty_cpu(shape: tuple[int, ...], dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    """A CPU tensor of a large result, uninitialised (or zeroed), in memory NumPy
    allocated. Above glibc's mmap threshold every allocation is fresh pages, and NumPy
    asks the kernel for transparent huge pages for buffers of 4 MiB and more
    (``madvise``), which torch's allocator does not: filling a 1e8-byte result then
    takes ~6-8 ms instead of ~34 ms of 4 KiB page faults, and a zeroed one costs no
    ``memset`` (``calloc``'s pages are zero). Callers use it for tensors of at least
    :data:`_HUGE_PAGE_MIN_BYTES`; the bits written are the same either way."""
    array = (np.zeros if zero else np.empty)(shape, _NUMPY_OF[dtype])
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _clone(x: torch.Tensor) -> torch.Tensor:
    """``x.clone()``, into huge pages when large (see :func:`_empty_cpu`)."""
    if _large_cpu(x.numel(), x.dtype, x) and x.is_contiguous():
        return _empty_cpu(tuple(x.shape), x.dtype).copy_(x)
    return x.clone()


def _torch_bfloat16_words(x: torch.Tensor) -> torch.Tensor:
    """:meth:`Ops.bfloat16_words` of 1-D float32 CPU ``x`` by torch's own conversion
    (3x faster than NumPy's integer kernel at 1e6 elements and more), with NaN made the
    protocol's signed quiet NaN: torch writes ``0xFFFF`` (vectorised) or ``0x7FC0``
    (scalar) for every NaN. Used only where :func:`_torch_bfloat16_rounds_as_protocol`
    found torch's finite rounding to be the protocol's."""
    x = x.detach()  # the words are data, never part of an autograd graph
    n = x.numel()
    shape = (-(-n // 2),)
    words = _empty_cpu(shape, torch.int32) if _large_cpu(shape[0], torch.int32, x) else torch.empty(shape, dtype=torch.int32)
    halves = words.view(torch.bfloat16)
    if n % 2:
        halves[-1:].view(torch.int16).zero_()  # the half after an odd count
        halves[:n].copy_(x)
    else:
        halves.copy_(x)
    # the sum of the halves is NaN where one is (or where +inf meets -inf, which the
    # exact pass below then finds harmless): one pass over the narrow result, 4x
    # cheaper than a NaN-propagating max of x
    if n and torch.isnan(halves.sum()):
        nan = torch.isnan(x)
        signs = torch.bitwise_right_shift(x[nan].view(torch.int32), 16).bitwise_and_(-0x8000)  # 0x8000 as int16
        halves[:n].view(torch.int16)[nan] = signs.bitwise_or_(0x7FC0).to(torch.int16)
    return words


@functools.cache
def _torch_bfloat16_rounds_as_protocol() -> bool:
    """Whether torch's float32 -> bfloat16 conversion gives the protocol's patterns
    (:meth:`Ops.bfloat16_words`: round to nearest even, subnormals kept, overflow to inf)
    on this CPU, in its vectorised and its scalar code: checked once per process against
    NumPy's kernel on probe values (ties both ways, subnormals, overflow, NaN), since a
    CPU's own bfloat16 instruction may flush subnormals."""
    probe = np.array([1.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-9, -(1.0 + 2.0**-8), 3.4e38, -3.4e38,
                      3.3961776e38, 1e-40, -1e-40, 2.0**-149, 1.2e-38, 0.0, -0.0, np.inf, -np.inf, np.nan,
                      65504.0, 0.1, -0.3], np.float32)
    bits = probe.view(np.uint32).copy()
    bits[-1] = 0xFFC00001  # a negative NaN with a payload
    rng = np.random.default_rng(0)
    randoms = rng.integers(0, 1 << 32, 4093, dtype=np.uint64).astype(np.uint32)  # every class, odd length
    values = np.concatenate([bits, randoms, bits]).view(np.float32)
    try:
        got = _torch_bfloat16_words(torch.from_numpy(values)).numpy()
    except (RuntimeError, TypeError):  # a torch build without a CPU bfloat16 conversion
        return False
    return bool(np.array_equal(got, _NUMPY.bfloat16_words(values)))


def _on_cpu(*xs: torch.Tensor) -> bool:
    """Whether NumPy can work on all of ``xs`` in place: CPU tensors of a dtype it has."""
    for x in xs:  # a loop and is_cpu: ~0.2 us a tensor, where all() over a generator took ~1-3 us
        if not x.is_cpu or x.layout is not torch.strided or x.dtype not in _SHARES_WITH_NUMPY:
            return False
    return True


def _np(x: torch.Tensor) -> np.ndarray:
    """A NumPy view of CPU tensor ``x`` (detached only where it needs to be: ~1 us less)."""
    if x.requires_grad:
        return x.detach().numpy()
    try:
        return x.numpy()
    except RuntimeError:  # a lazily negated or conjugated view
        return x.resolve_neg().resolve_conj().numpy()


def _td(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_TORCH_DTYPES)}") from None


def _narrow_float64(x: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """float64 -> float16/bfloat16 rounded once, as NumPy does. torch goes through
    float32 and rounds twice; rounding to float32 *to odd* first (an inexact result gets
    the neighbour with an odd last bit) keeps the second rounding correct."""
    f = x.to(torch.float32)
    inexact = f.to(torch.float64) != x
    bits = f.view(torch.int32)
    step = torch.where(f.abs().to(torch.float64) > x.abs(), -1, 1).to(torch.int32)
    odd = torch.where(inexact & ((bits & 1) == 0), bits + step, bits)
    return odd.view(torch.float32).to(target)


def _first_distinct(g: torch.Generator, n: int, k: int, device: torch.device) -> torch.Tensor:
    """The first ``k`` distinct values of a stream of uniform draws from ``range(n)``,
    ascending: a uniform random ``k``-subset (each new distinct value is uniform over
    those not yet drawn), in ``O(k log k)`` rather than a permutation of ``n``."""
    draws = torch.randint(0, n, (draws_for_distinct(n, k),), generator=g, device=device)
    while True:
        # a stable sort puts each value's first draw first among its copies
        ordered, position = torch.sort(draws, stable=True)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        values, drawn_at = ordered[first], position[first]
        if values.numel() >= k:
            break
        more = torch.randint(0, n, (draws_for_distinct(n, k, values.numel()),), generator=g, device=device)
        draws = torch.cat([draws, more])
    if values.numel() > k:  # keep the k drawn first
        values = values[drawn_at <= torch.kthvalue(drawn_at, k).values]
    return values


def _topk_indices_cpu(ops: Ops, x: torch.Tensor, k: int) -> torch.Tensor:
    """The protocol's top-k (``0 < k < n``) with torch's fastest CPU selection. Any
    selection is exact where exactly ``k`` elements are not below the k-th value (no tie
    straddles the boundary, no NaN at it): those ``k`` are the answer. Otherwise the
    generic tie-breaking path runs."""
    n = x.numel()
    if n >= NumpyOps.SAMPLED_TOPK_MIN_NUMEL and 8 * k <= n and x.dtype in (torch.float32, torch.float64):
        # NumPy's selection past a sampled threshold, on a view: torch.topk copies the
        # whole tensor into (value, int64 index) pairs, 4x its size in float32
        return torch.from_numpy(_NUMPY.topk_indices(_np(x), k))
    if 2 * k <= n:
        values, idx = torch.topk(x, k, sorted=False)
        kth = values.min()  # NaN if a NaN was selected: the check below then fails
        if n >= 2048 and x.dtype in (torch.float32, torch.float64):  # NumPy's comparison on a view: ~5x faster
            view = _np(x)
            below = int(np.count_nonzero(view < view.dtype.type(kth.item())))
        else:
            below = int(torch.count_nonzero(x < kth))
        if n - below == k:
            return torch.sort(idx).values
    else:
        if x.dtype in (torch.float32, torch.float64):  # NumPy's introselect (see TorchOps.kth_largest)
            kth = torch.from_numpy(np.asarray(kth_largest_value(_np(x), k)))
        else:
            kth = torch.kthvalue(x, n - k + 1).values
        idx = torch.nonzero(~(x < kth)).reshape(-1)
        if idx.numel() == k:
            return idx
    return Ops.topk_indices(ops, x, k)


class TorchOps(Ops):
    """Ops over ``torch.Tensor``."""

    name = "torch"

    @staticmethod
    def owns(x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def dtype(self, x):
        try:
            return _NAMES[x.dtype]
        except KeyError:
            raise TypeError(f"grace-dl does not handle torch dtype {x.dtype}") from None

    def numel(self, x):
        return x.numel()

    def shape(self, x):
        return tuple(x.shape)

    def reshape(self, x, shape):
        return x.reshape(tuple(shape))

    def cast(self, x, dtype):
        target = _TORCH_DTYPES.get(dtype) or _td(dtype)
        if x.dtype == target:
            return x
        if x.dtype == torch.float64 and target in (torch.float16, torch.bfloat16):
            return _narrow_float64(x, target)
        if x.numel() >= _LARGE_MIN_NUMEL and _large_cpu(x.numel(), target, x) and x.is_contiguous():
            return _empty_cpu(tuple(x.shape), target).copy_(x)  # copy_ converts as .to() does
        return x.type(target)  # the same cast as .to(), with ~0.7 us less argument parsing

    def bitcast(self, x, dtype):
        target = _td(dtype)
        x = x.contiguous()
        ratio = max(1, target.itemsize // x.element_size())
        if x.storage_offset() % ratio:  # a slice not aligned to the wider type: copy it
            x = x.clone()
        return x.view(target)

    def concat(self, xs: Sequence[Any]):
        flat = [x if x.dim() == 1 else x.reshape(-1) for x in xs]
        if flat and _large_cpu(sum(x.numel() for x in flat), flat[0].dtype, flat[0]) and all(
                x.dtype == flat[0].dtype and x.is_cpu and not x.requires_grad for x in flat):
            return torch.cat(flat, out=_empty_cpu((sum(x.numel() for x in flat),), flat[0].dtype))
        return torch.cat(flat)

    def to_numpy(self, x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return x.numpy().copy()

    def from_numpy(self, a, like):
        a = np.asarray(a)
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(like.device)
        return torch.from_numpy(a.copy()).to(like.device)

    def reference_uniform(self, n, key, counter, like):
        if like.device.type == "cpu":  # NumPy's fresh array as it is: no copy, no device move
            return torch.from_numpy(_NUMPY.random_uniform(n, key, counter, None))
        return super().reference_uniform(n, key, counter, like)

    def reference_uniform_signed(self, n, key, counter, dtype, like):
        if like.device.type == "cpu" and dtype in ("float32", "float64"):
            return torch.from_numpy(_NUMPY.reference_uniform_signed(n, key, counter, dtype, None))
        return super().reference_uniform_signed(n, key, counter, dtype, like)

    def zeros(self, n, dtype, like):
        n, target = int(n), _td(dtype)
        if n >= _LARGE_MIN_NUMEL and _large_cpu(n, target, like):
            return _empty_cpu((n,), target, zero=True)
        return torch.zeros(n, dtype=target, device=like.device)

    def arange(self, n, like):
        return torch.arange(int(n), dtype=torch.int64, device=like.device)

    def abs(self, x):
        return torch.abs(x)

    def sign(self, x):
        return torch.sign(x)

    def floor(self, x):
        return torch.floor(x)

    def sqrt(self, x):
        # torch's CPU sqrt is not correctly rounded (its float32 kernel misses in ~17% of
        # values here, float64 in ~1%); a float64 square root rounded to float32 is, since
        # 53 >= 2 * 24 + 2 bits, so float32 matches NumPy exactly. float64 on the CPU is NumPy's.
        if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return torch.sqrt(x.double()).to(x.dtype)
        if x.dtype == torch.float64 and x.device.type == "cpu":
            # NumPy's float64 square root is the IEEE (correctly rounded) one
            return torch.from_numpy(np.sqrt(x.detach().contiguous().numpy()))
        return torch.sqrt(x)

    def log(self, x):
        return torch.log(x)

    def exp(self, x):
        return torch.exp(x)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def minimum(self, a, b):
        return torch.minimum(a, b)

    def isfinite(self, x):
        return torch.isfinite(x)

    def sum(self, x, axis=None):
        return x.sum() if axis is None else x.sum(dim=axis)

    def max(self, x, axis=None):
        return x.max() if axis is None else x.amax(dim=axis)

    def item(self, x):
        return x.item()

    def kth_largest(self, x, k):
        if x.is_cuda:
            return torch.topk(x, k, sorted=True).values[k - 1]
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            # NumPy's introselect on a view: torch.kthvalue takes 2x as long at 1e4
            # elements and 16x at 1e5 (1.09 ms against 68 us); the same value
            return torch.from_numpy(np.asarray(kth_largest_value(_np(x), k)))
        return torch.kthvalue(x, x.numel() - k + 1).values

    def topk_indices(self, x, k):
        if k <= 0 or k >= x.numel():
            return super().topk_indices(x, k)
        if not x.is_cuda:
            return _topk_indices_cpu(self, x, k)
        # on the GPU, avoid nonzero's host sync: a stable descending sort keeps equal
        # values in index order, which is the protocol's tie rule (NaN sorts first, as +inf)
        key = torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x)
        order = torch.sort(key, descending=True, stable=True).indices[:k]
        return torch.sort(order).values

    def nonzero(self, mask):
        if mask.device.type == "cpu":  # NumPy's kernel on a zero-copy view: ~4x faster
            return torch.from_numpy(np.flatnonzero(mask.numpy()))
        return torch.nonzero(mask).reshape(-1)

    def gather(self, x, idx):
        if x.dim() == 1 and idx.dim() == 1 and idx.dtype == torch.int64:
            return torch.index_select(x, 0, idx)  # ~10x faster than advanced indexing on CPU
        return x[idx]

    def scatter(self, n, idx, values):
        out = self.zeros(n, _NAMES[values.dtype], values)
        if idx.dim() == 1 and idx.dtype == torch.int64 and values.shape == idx.shape:
            return out.scatter_(0, idx, values)  # ~10x faster than index_put on CPU
        out[idx] = values
        return out

    def sort(self, x):
        return torch.sort(x).values

    def matmul(self, a, b):
        if (a.dim() == 2 and b.dim() == 2 and a.dtype == b.dtype and not (a.requires_grad or b.requires_grad)
                and _large_cpu(a.shape[0] * b.shape[1], a.dtype, a)):
            # a large product (PowerSGD's decompression): into huge pages, same BLAS call
            return torch.matmul(a, b, out=_empty_cpu((a.shape[0], b.shape[1]), a.dtype))
        return torch.matmul(a, b)

    def transpose(self, x):
        return x.transpose(0, 1)

    def bitwise_and(self, a, b):
        return a & b

    def bitwise_or(self, a, b):
        return a | b

    def shift_left(self, a, b):
        return a << b

    def shift_right(self, a, b):
        return a >> b

    def pack_bits(self, mask):
        if _on_cpu(mask):
            return torch.from_numpy(_NUMPY.pack_bits(_np(mask)))
        n = mask.numel()
        pad = (-n) % 32
        bits = mask.to(torch.uint8)
        if pad:
            bits = torch.cat([bits, bits.new_zeros(pad)])
        # built on the device: copying a Python list there would sync with the host
        weights = torch.ones(8, dtype=torch.uint8, device=mask.device) << torch.arange(
            8, dtype=torch.uint8, device=mask.device)
        packed = (bits.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
        return packed.view(torch.int32)  # little-endian byte order, as NumPy's '<i4'

    def unpack_bits(self, words, n):
        if _on_cpu(words):
            return torch.from_numpy(_NUMPY.unpack_bits(_np(words), n))
        raw = words.contiguous().view(torch.uint8)
        shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
        return ((raw.reshape(-1, 1) >> shifts) & 1).reshape(-1)[: int(n)].to(torch.bool)

    def uint_to_bits(self, v, bits):
        shifts = torch.arange(bits, dtype=torch.int64, device=v.device)
        return ((v.to(torch.int64).reshape(-1, 1) >> shifts) & 1).reshape(-1).to(torch.bool)

    def bits_to_uint(self, b, bits):
        weights = torch.ones(1, dtype=torch.int64, device=b.device) << torch.arange(
            bits, dtype=torch.int64, device=b.device)
        return (b.reshape(-1, bits).to(torch.int64) * weights).sum(dim=1)

    def pack_uint(self, v, bits):
        if _on_cpu(v):
            return torch.from_numpy(_NUMPY.pack_uint(_np(v), bits))
        if 32 % bits:  # fields straddle words: use the generic bit stream
            return super().pack_uint(v, bits)
        per = 32 // bits
        pad = (-v.numel()) % per
        u = v.to(torch.int64)
        if pad:
            u = torch.cat([u, u.new_zeros(pad)])
        shifts = torch.arange(per, dtype=torch.int64, device=v.device) * bits
        # fields are disjoint, so the sum is their bitwise or; keep the low 32 bits
        words = (u.reshape(-1, per) << shifts).sum(dim=1)
        words = torch.where(words >= 2**31, words - 2**32, words)
        return words.to(torch.int32)

    def unpack_uint(self, words, n, bits):
        if _on_cpu(words):
            return torch.from_numpy(_NUMPY.unpack_uint(_np(words), n, bits))
        if 32 % bits:
            return super().unpack_uint(words, n, bits)
        per = 32 // bits
        u = words.to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
        return ((u.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[: int(n)]

    @staticmethod
    def _generator(key: int, counter: int, device: torch.device) -> torch.Generator:
        # a private generator: the global torch RNG is never touched
        g = torch.Generator(device=device)
        g.manual_seed(derive_key(key, counter) & (2**63 - 1))
        return g

    def random_uniform(self, n, key, counter, like):
        if like.device.type == "cpu":
            # NumPy's draws, wrapped without a copy: torch CPU and NumPy then draw the same
            # values bit for bit (and faster than torch.rand with a freshly seeded generator)
            return torch.from_numpy(_NUMPY.random_uniform(n, key, counter, None))
        g = self._generator(key, counter, like.device)
        return torch.rand(int(n), generator=g, device=like.device, dtype=torch.float32)

    def random_choice(self, n, k, key, counter, like):
        n, k, device = int(n), int(k), like.device
        if k <= 0:
            return torch.zeros(0, dtype=torch.int64, device=device)
        if k >= n:
            return torch.arange(n, dtype=torch.int64, device=device)
        if device.type == "cpu":
            # NumPy's draws, wrapped without a copy: the same indices as the NumPy backend,
            # made in O(k) without a sort (torch's sort and dedup took ~3x as long)
            return torch.from_numpy(_NUMPY.random_choice(n, k, key, counter, None))
        g = self._generator(key, counter, device)
        if 2 * k > n:  # draw the n - k left out: fewer draws, then one pass over n
            keep = torch.ones(n, dtype=torch.bool, device=device)
            keep[_first_distinct(g, n, n - k, device)] = False
            return torch.nonzero(keep).reshape(-1)
        return _first_distinct(g, n, k, device)

    def orthonormalize_rows(self, rows, epsilon):
        if _on_cpu(rows) and rows.dtype in (torch.float32, torch.float64):
            # the protocol's steps as NumPy calls on a view: PowerSGD's factors are small,
            # and each torch call on them costs several times NumPy's
            return torch.from_numpy(_NUMPY.orthonormalize_rows(_np(rows), epsilon))
        return super().orthonormalize_rows(rows, epsilon)

    # -- selection kernels
    def count_true(self, mask):
        return int(torch.count_nonzero(mask))

    def all_finite(self, x):
        if x.numel() == 0:
            return torch.ones((), dtype=torch.bool, device=x.device)
        if x.numel() <= 1 << 16:
            if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
                # NumPy's fused pass on a view: ~10x faster than torch's single thread
                return _TRUE if np.isfinite(_np(x)).all() else _FALSE
            return torch.isfinite(x).all()  # fewer kernel launches for a small tensor
        # min and max propagate NaN and show an Inf: one pass, no temporary array
        low, high = torch.aminmax(x)
        return torch.isfinite(low) & torch.isfinite(high)

    def read_flag(self, cond):
        return None if cond.is_cuda else bool(cond)

    def choose(self, cond, a, b):
        if cond.is_cuda:  # branching would sync with the host
            return torch.where(cond, a, b)
        return a if bool(cond) else b

    def index_update(self, x, idx, values, consume=False):
        if x.dim() == 1 and idx.dim() == 1 and idx.dtype == torch.int64 and values.shape == idx.shape:
            return (x if consume else _clone(x)).scatter_(0, idx, values)
        return x.index_put_((idx,), values) if consume else x.index_put((idx,), values)

    def index_subtract(self, x, idx, values, consume=False):
        if _on_cpu(x, idx, values) and x.dtype in (torch.float32, torch.float64) and values.dtype == x.dtype:
            # NumPy on views: torch's single-threaded index_select is ~3x slower
            return torch.from_numpy(_NUMPY.index_subtract(_np(x), _np(idx), _np(values), consume=consume))
        return super().index_subtract(x, idx, values, consume=consume)

    def pack_sparse(self, x, idx):
        if _on_cpu(x, idx) and x.dtype in (torch.float32, torch.float64):
            # NumPy's gather and int32 conversion on views: torch's single-threaded
            # index_select, cast and cat take ~4x as long at 2.5e7 elements
            return torch.from_numpy(_NUMPY.pack_sparse(_np(x), _np(idx)))
        return super().pack_sparse(x, idx)

    def scatter_sparse(self, n, buffer, dtype):
        if _on_cpu(buffer) and dtype in ("float32", "float64"):
            raw = _np(buffer)
            k = raw.shape[0] // (1 + _TORCH_DTYPES[dtype].itemsize // 4)
            if k < _TORCH_SCATTER_MIN or (dtype == "float32" and jit.kernels() is not None):
                # few indices, or NumPy's compiled one-pass scatter
                return torch.from_numpy(_NUMPY.scatter_sparse(n, raw, dtype))
            # torch's scatter_ writes ~2x as fast as NumPy's fancy assignment; the int64
            # indices it needs are made a block at a time (a dense payload's would be
            # twice the tensor's size)
            out = self.zeros(n, dtype, buffer)
            values = self.bitcast(buffer[k:], dtype)  # float64 at an odd word: a copy
            for start in range(0, k, _TORCH_SCATTER_BLOCK):
                stop = min(k, start + _TORCH_SCATTER_BLOCK)
                out.scatter_(0, torch.from_numpy(raw[start:stop].astype(np.int64)), values[start:stop])
            return out
        return super().scatter_sparse(n, buffer, dtype)

    def scatter_sparse_sum(self, n, buffers, dtype, scale=1.0):
        if dtype in ("float32", "float64") and all(_on_cpu(b) for b in buffers):
            # NumPy adds in place on views of the buffers; elsewhere the protocol's
            # gather, add and update (deterministic, unlike index_add_ on CUDA)
            return torch.from_numpy(_NUMPY.scatter_sparse_sum(n, [_np(b) for b in buffers], dtype, scale))
        return super().scatter_sparse_sum(n, buffers, dtype, scale)

    def nonzero_magnitude_at_least(self, x, threshold):
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            # NumPy's comparisons and compaction on a view: ~3x faster than torch's
            if isinstance(threshold, torch.Tensor):
                threshold = threshold.reshape(-1)[0].item()
            return torch.from_numpy(_NUMPY.nonzero_magnitude_at_least(_np(x), float(threshold)))
        return super().nonzero_magnitude_at_least(x, threshold)

    def pack_magnitude_at_least(self, x, threshold):
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            # NumPy's two passes on a view, no int64 indices (see NumpyOps)
            if isinstance(threshold, torch.Tensor):
                threshold = threshold.reshape(-1)[0].item()
            return torch.from_numpy(_NUMPY.pack_magnitude_at_least(_np(x), threshold))
        return super().pack_magnitude_at_least(x, threshold)

    def topk_magnitude_indices(self, x, k):
        if x.is_cuda:  # the sampled path decides on the host: sort on the device instead
            return self.topk_indices(torch.abs(x), k)
        if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and x.numel() >= self.SAMPLED_TOPK_MIN_NUMEL):
            # the same exact selection run by NumPy on a zero-copy view: torch's
            # single-threaded CPU comparisons and compaction are several times slower
            return torch.from_numpy(_NUMPY.topk_magnitude_indices(_np(x), k))
        return super().topk_magnitude_indices(x, k)

    # -- quantization kernels
    def pack_signs(self, x, scales=None):
        if scales is None:
            if _on_cpu(x):
                return torch.from_numpy(_NUMPY.pack_signs(_np(x)))
        elif _on_cpu(x, scales):
            return torch.from_numpy(_NUMPY.pack_signs(_np(x), _np(scales)))
        return super().pack_signs(x, scales)

    def select_bits(self, words, n, on, off):
        if _on_cpu(words, on, off):
            return torch.from_numpy(_NUMPY.select_bits(_np(words), n, _np(on), _np(off)))
        return super().select_bits(words, n, on, off)

    def unpack_signs(self, words, n, dtype, scale=None):
        if dtype in ("float32", "float64"):
            if scale is None:
                if _on_cpu(words):
                    return torch.from_numpy(_NUMPY.unpack_signs(_np(words), n, dtype))
            elif _on_cpu(words, scale):
                return torch.from_numpy(_NUMPY.unpack_signs(_np(words), n, dtype, _np(scale)))
        return super().unpack_signs(words, n, dtype, scale)

    def pack_signs_abs_sum(self, x, scale):
        if _on_cpu(x):  # one crossing: the scale stays a NumPy array between its two kernels
            return torch.from_numpy(_NUMPY.pack_signs_abs_sum(_np(x), scale))
        return super().pack_signs_abs_sum(x, scale)

    def unpack_scaled_signs(self, words, n, dtype):
        if dtype in ("float32", "float64") and _on_cpu(words):
            return torch.from_numpy(_NUMPY.unpack_scaled_signs(_np(words), n, dtype))
        return super().unpack_scaled_signs(words, n, dtype)

    def full(self, n, value, dtype, like):
        return torch.full((int(n),), value, dtype=_td(dtype), device=like.device)

    def tree_sum(self, x, scale=1.0):
        if _on_cpu(x):
            return torch.from_numpy(_NUMPY.tree_sum(_np(x), scale))
        return super().tree_sum(x, scale)

    def sign_means(self, x):
        if _on_cpu(x):
            return torch.from_numpy(_NUMPY.sign_means(_np(x)))
        return super().sign_means(x)

    def take_fields(self, words, n, bits, values):
        if _on_cpu(words, values):
            return torch.from_numpy(_NUMPY.take_fields(_np(words), n, bits, _np(values)))
        return super().take_fields(words, n, bits, values)

    def ternary_codes(self, x, bound, u):
        if _on_cpu(x, bound, u):
            return torch.from_numpy(_NUMPY.ternary_codes(_np(x), _np(bound), _np(u)))
        return super().ternary_codes(x, bound, u)

    def clipped_ternary_codes(self, x, clip, bound, u):
        if _on_cpu(x, clip, bound, u):
            return torch.from_numpy(_NUMPY.clipped_ternary_codes(_np(x), _np(clip), _np(bound), _np(u)))
        return super().clipped_ternary_codes(x, clip, bound, u)

    def clipped_ternary_words(self, x, clip_sigma, key, counter):
        if _on_cpu(x):  # NumPy's draws and kernel on a view, as random_uniform draws NumPy's
            return torch.from_numpy(_NUMPY.clipped_ternary_words(_np(x), clip_sigma, key, counter))
        return super().clipped_ternary_words(x, clip_sigma, key, counter)

    def ternary_values(self, words, n, dtype):
        if _on_cpu(words):
            return torch.from_numpy(_NUMPY.ternary_values(_np(words), n, dtype))
        return super().ternary_values(words, n, dtype)

    def power_of_two_codes(self, x, r):
        if _on_cpu(x, r):
            return torch.from_numpy(_NUMPY.power_of_two_codes(_np(x), _np(r)))
        return super().power_of_two_codes(x, r)

    def power_of_two_values(self, codes):
        if _on_cpu(codes):
            return torch.from_numpy(_NUMPY.power_of_two_values(_np(codes)))
        return super().power_of_two_values(codes)

    def power_of_two_words(self, x, key, counter):
        if _on_cpu(x):  # NumPy's draws and kernel on a view, as uniform_ints draws NumPy's
            return torch.from_numpy(_NUMPY.power_of_two_words(_np(x), key, counter))
        return super().power_of_two_words(x, key, counter)

    def power_of_two_from_words(self, words, n):
        if _on_cpu(words):
            return torch.from_numpy(_NUMPY.power_of_two_from_words(_np(words), n))
        return super().power_of_two_from_words(words, n)

    def bfloat16_words(self, x):
        if _on_cpu(x):
            if x.dtype == torch.float32 and x.dim() == 1 and _torch_bfloat16_rounds_as_protocol():
                return _torch_bfloat16_words(x)
            return torch.from_numpy(_NUMPY.bfloat16_words(_np(x)))
        return super().bfloat16_words(x)

    def dither_codes(self, y, u, levels):
        if _on_cpu(y, u):
            return torch.from_numpy(_NUMPY.dither_codes(_np(y), _np(u), levels))
        return super().dither_codes(y, u, levels)

    def dither_values(self, codes, levels, dtype):
        if _on_cpu(codes):
            return torch.from_numpy(_NUMPY.dither_values(_np(codes), levels, dtype))
        return super().dither_values(codes, levels, dtype)

    def clip_magnitude(self, x, bound):
        if _on_cpu(x, bound):
            return torch.from_numpy(_NUMPY.clip_magnitude(_np(x), _np(bound)))
        return super().clip_magnitude(x, bound)

    def bucket_levels(self, grid, noise, levels):
        if _on_cpu(grid, noise):
            norms, codes = _NUMPY.bucket_levels(_np(grid), _np(noise), levels)
            return torch.from_numpy(norms), torch.from_numpy(codes)
        return super().bucket_levels(grid, noise, levels)

    def bucket_level_words(self, x, levels, bucket_size, key, counter):
        if _on_cpu(x):  # NumPy's draws and kernel on a view, as random_uniform draws NumPy's
            return torch.from_numpy(_NUMPY.bucket_level_words(_np(x), levels, bucket_size, key, counter))
        return super().bucket_level_words(x, levels, bucket_size, key, counter)

    def dither_bucket_words(self, x, levels, bucket_size, key, counter):
        if _on_cpu(x):  # NumPy's draws and kernel on a view, as random_uniform draws NumPy's
            return torch.from_numpy(_NUMPY.dither_bucket_words(_np(x), levels, bucket_size, key, counter))
        return super().dither_bucket_words(x, levels, bucket_size, key, counter)

    def dither_bucket_values(self, words, n, levels, bucket_size, dtype):
        if _on_cpu(words):
            return torch.from_numpy(_NUMPY.dither_bucket_values(_np(words), n, levels, bucket_size, dtype))
        return super().dither_bucket_values(words, n, levels, bucket_size, dtype)

    def bucket_level_values(self, words, n, levels, bucket_size, dtype):
        if _on_cpu(words):
            return torch.from_numpy(_NUMPY.bucket_level_values(_np(words), n, levels, bucket_size, dtype))
        return super().bucket_level_values(words, n, levels, bucket_size, dtype)

    def peak_rms(self, x):
        if _on_cpu(x):  # NumPy's kernel: the protocol's steps without full-size temporaries
            return torch.from_numpy(_NUMPY.peak_rms(_np(x)))
        return super().peak_rms(x)

    def clip_scales(self, stats, clip_sigma):
        if _on_cpu(stats):  # NumPy on a view: one call instead of a dozen 1-element torch ops
            return torch.from_numpy(_NUMPY.clip_scales(_np(stats), clip_sigma))
        return super().clip_scales(stats, clip_sigma)

    def scale_buckets(self, x, scales, bucket_size):
        if _on_cpu(x, scales):
            return torch.from_numpy(_NUMPY.scale_buckets(_np(x), _np(scales), bucket_size))
        return super().scale_buckets(x, scales, bucket_size)

    def abs_tree_sum(self, x, scale=1.0):
        if _on_cpu(x):
            return torch.from_numpy(_NUMPY.abs_tree_sum(_np(x), scale))
        return super().abs_tree_sum(x, scale)

    def rotated_block_sum(self, x, width, shifts, negate):
        if _on_cpu(x) and isinstance(shifts, np.ndarray):  # NumPy's tiles on a view
            return torch.from_numpy(_NUMPY.rotated_block_sum(_np(x), width, shifts, negate))
        return super().rotated_block_sum(x, width, shifts, negate)

    def rotated_block_median(self, rows, n, shifts, negate):
        if _on_cpu(rows) and isinstance(shifts, np.ndarray):
            return torch.from_numpy(_NUMPY.rotated_block_median(_np(rows), n, shifts, negate))
        return super().rotated_block_median(rows, n, shifts, negate)

    def count_true_array(self, mask):
        return torch.count_nonzero(mask)

    def sorted_values_at(self, x, positions):
        if _on_cpu(x, positions):  # NumPy selects instead of sorting
            return torch.from_numpy(_NUMPY.sorted_values_at(_np(x), _np(positions)))
        return super().sorted_values_at(x, positions)

    def sign_counts(self, x):
        if _on_cpu(x):
            return torch.from_numpy(_NUMPY.sign_counts(_np(x)))
        return super().sign_counts(x)

    def tail_sums(self, x, top, bottom):
        if _on_cpu(x, top, bottom):
            sums, counts = _NUMPY.tail_sums(_np(x), _np(top), _np(bottom))
            return torch.from_numpy(sums), torch.from_numpy(counts)
        return super().tail_sums(x, top, bottom)

    def tail_codes(self, x, top, bottom):
        if _on_cpu(x, top, bottom):
            return torch.from_numpy(_NUMPY.tail_codes(_np(x), _np(top), _np(bottom)))
        return super().tail_codes(x, top, bottom)

    def tree_sum_in(self, x, dtype):
        if _on_cpu(x):
            return torch.from_numpy(_NUMPY.tree_sum_in(_np(x), dtype))
        return super().tree_sum_in(x, dtype)

    def uniform_ints(self, n, bits, key, counter, like):
        if like.device.type == "cpu":  # NumPy's integers, as random_uniform takes NumPy's draws
            return torch.from_numpy(_NUMPY.uniform_ints(n, bits, key, counter, None))
        return super().uniform_ints(n, bits, key, counter, like)
