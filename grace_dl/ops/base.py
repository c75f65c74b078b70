"""The array-ops protocol: the only primitives a compression method may use.

Every method in grace-dl is written once against :class:`Ops`. A backend (NumPy,
PyTorch, TensorFlow) implements these primitives for its own array type and nothing
else: no algorithm logic lives in a backend.

Conventions shared by every backend, so that deterministic methods give bit-identical
payloads on every backend:

* dtypes are named by strings: ``float16 bfloat16 float32 float64 int32 int64 uint8 bool``;
* arrays passed to compressors are 1-D (the pipeline flattens);
* index arrays are ``int64``;
* :meth:`Ops.pack_bits` puts element ``i`` into bit ``i % 32`` of int32 word ``i // 32``
  (little-endian bit order);
* :meth:`Ops.topk_indices` breaks ties towards the lower index and returns indices sorted
  ascending;
* random draws come from an explicit ``(key, counter)`` seed and never touch a
  framework's global random state (they are identical on every worker of one backend,
  not across backends).
"""

from __future__ import annotations

import abc
import math
from typing import Any, Sequence

Array = Any  # a backend's array type: numpy.ndarray, torch.Tensor or tf.Tensor

DTYPE_ITEMSIZE = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "bool": 1,
}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class Ops(abc.ABC):
    """Array primitives for one framework. Stateless; one instance per backend."""

    #: short backend name, e.g. ``"numpy"``
    name: str = ""

    # -- identity -------------------------------------------------------------------
    @staticmethod
    @abc.abstractmethod
    def owns(x: Any) -> bool:
        """Whether ``x`` is an array of this backend."""

    @abc.abstractmethod
    def dtype(self, x: Array) -> str:
        """The dtype name of ``x``."""

    @abc.abstractmethod
    def numel(self, x: Array) -> int:
        """Number of elements of ``x``."""

    @abc.abstractmethod
    def shape(self, x: Array) -> tuple[int, ...]:
        """Shape of ``x`` as a tuple of ints."""

    def length(self, x: Array) -> Any:
        """Element count of ``x`` for arithmetic and slicing: a Python int wherever it is
        known before running (NumPy, torch, eager TensorFlow, static shapes); inside
        ``tf.function``, a data-dependent length (a threshold method's payload) is a 0-d
        int64 tensor instead of an error."""
        return self.numel(x)

    # -- layout and conversion ----------------------------------------------------------
    @abc.abstractmethod
    def reshape(self, x: Array, shape: Sequence[int]) -> Array:
        """``x`` with a new shape (a view where the backend allows)."""

    def flatten(self, x: Array) -> Array:
        """``x`` as a 1-D array."""
        return self.reshape(x, (-1,))

    @abc.abstractmethod
    def cast(self, x: Array, dtype: str) -> Array:
        """Value conversion of ``x`` to ``dtype`` (round to nearest for floats)."""

    @abc.abstractmethod
    def bitcast(self, x: Array, dtype: str) -> Array:
        """Reinterpret the bytes of 1-D ``x`` as ``dtype``; the length scales by the
        itemsize ratio and must divide evenly."""

    @abc.abstractmethod
    def concat(self, xs: Sequence[Array]) -> Array:
        """Concatenation of 1-D arrays of one dtype."""

    @abc.abstractmethod
    def to_numpy(self, x: Array) -> Any:
        """A NumPy copy of ``x`` (synchronises with the device)."""

    @abc.abstractmethod
    def from_numpy(self, a: Any, like: Array) -> Array:
        """A backend array holding ``a``, on the same device as ``like``."""

    # -- creation -----------------------------------------------------------------------
    @abc.abstractmethod
    def zeros(self, n: int, dtype: str, like: Array) -> Array:
        """A 1-D zero array of length ``n`` on ``like``'s device."""

    @abc.abstractmethod
    def arange(self, n: int, like: Array) -> Array:
        """``[0, 1, ..., n-1]`` as int64 on ``like``'s device."""

    # -- elementwise ------------------------------------------------------------------
    @abc.abstractmethod
    def abs(self, x: Array) -> Array:
        """Elementwise absolute value."""

    @abc.abstractmethod
    def sign(self, x: Array) -> Array:
        """Elementwise sign (-1, 0, +1) in ``x``'s dtype."""

    @abc.abstractmethod
    def floor(self, x: Array) -> Array:
        """Elementwise floor."""

    @abc.abstractmethod
    def sqrt(self, x: Array) -> Array:
        """Elementwise square root."""

    @abc.abstractmethod
    def log(self, x: Array) -> Array:
        """Elementwise natural logarithm (the framework's own: results may differ from
        NumPy's in the last bit)."""

    @abc.abstractmethod
    def exp(self, x: Array) -> Array:
        """Elementwise exponential (the framework's own: results may differ from
        NumPy's in the last bit)."""

    @abc.abstractmethod
    def where(self, cond: Array, a: Array, b: Array) -> Array:
        """``a`` where ``cond`` else ``b``."""

    @abc.abstractmethod
    def minimum(self, a: Array, b: Array) -> Array:
        """Elementwise minimum."""

    @abc.abstractmethod
    def isfinite(self, x: Array) -> Array:
        """Elementwise finiteness mask (bool)."""

    # -- reductions ---------------------------------------------------------------------
    @abc.abstractmethod
    def sum(self, x: Array, axis: int | None = None) -> Array:
        """Sum of all elements (0-d array), or along ``axis``."""

    @abc.abstractmethod
    def max(self, x: Array, axis: int | None = None) -> Array:
        """Maximum of all elements (0-d array), or along ``axis``."""

    def norm(self, x: Array, axis: int | None = None) -> Array:
        """Euclidean norm of all elements (0-d array), or along ``axis``."""
        return self.sqrt(self.sum(x * x, axis=axis))

    @abc.abstractmethod
    def item(self, x: Array) -> float:
        """A 0-d array as a Python number (synchronises with the device)."""

    # -- selection ----------------------------------------------------------------------
    @abc.abstractmethod
    def kth_largest(self, x: Array, k: int) -> Array:
        """The ``k``-th largest value of 1-D ``x`` (0-d array), ``1 <= k <= len(x)``."""

    @abc.abstractmethod
    def nonzero(self, mask: Array) -> Array:
        """Ascending int64 indices where the bool ``mask`` is true."""

    @abc.abstractmethod
    def gather(self, x: Array, idx: Array) -> Array:
        """``x[idx]``."""

    @abc.abstractmethod
    def scatter(self, n: int, idx: Array, values: Array) -> Array:
        """A length-``n`` zero array of ``values``' dtype with ``values`` at ``idx``
        (indices are distinct)."""

    def topk_indices(self, x: Array, k: int) -> Array:
        """Ascending indices of the ``k`` largest elements of 1-D ``x``; ties at the
        boundary go to the lowest indices, so every backend selects the same set. NaN
        ranks as +inf, so exactly ``k`` indices come back whatever the data."""
        if k <= 0:
            return self.zeros(0, "int64", x)
        n = self.numel(x)
        if k >= n:
            return self.arange(n, x)
        if self.dtype(x) in FLOAT_DTYPES:
            x = self.where(x != x, self.zeros(n, self.dtype(x), x) + float("inf"), x)
        kth = self.kth_largest(x, k)
        above = self.nonzero(x > kth)
        ties = self.nonzero(x == kth)
        need = k - self.numel(above)
        if need == 0:
            return above
        merged = self.concat([above, ties[:need]])
        return self.sort(merged)

    @abc.abstractmethod
    def sort(self, x: Array) -> Array:
        """Ascending sort of 1-D ``x``."""

    # -- linear algebra -------------------------------------------------------------------
    @abc.abstractmethod
    def matmul(self, a: Array, b: Array) -> Array:
        """Matrix product of 2-D ``a`` (n, k) and 2-D ``b`` (k, m) of one float dtype: an
        (n, m) array. The framework's own kernel adds in its own order, so results may
        differ between backends and devices in the last bits (never between two calls
        on one backend and device with the same inputs)."""

    @abc.abstractmethod
    def transpose(self, x: Array) -> Array:
        """The transpose of 2-D ``x`` (a view where the backend allows)."""

    # -- bits ---------------------------------------------------------------------------
    # Integer bit operations, for methods that work on the bits of floats (bitcast to
    # int32/int64): they give the same bits on every backend, where float arithmetic may
    # not (TensorFlow flushes subnormals, casts may round twice). ``b`` is an array of
    # ``a``'s dtype or a Python int that fits it.
    @abc.abstractmethod
    def bitwise_and(self, a: Array, b: Array | int) -> Array:
        """Elementwise bitwise and of int32/int64 ``a`` and ``b``."""

    @abc.abstractmethod
    def bitwise_or(self, a: Array, b: Array | int) -> Array:
        """Elementwise bitwise or of int32/int64 ``a`` and ``b``."""

    @abc.abstractmethod
    def shift_left(self, a: Array, b: Array | int) -> Array:
        """``a << b`` elementwise for int32/int64 ``a``; shift counts in
        ``[0, bits - 1]``, and the caller keeps the result within the dtype's range."""

    @abc.abstractmethod
    def shift_right(self, a: Array, b: Array | int) -> Array:
        """``a >> b`` elementwise for int32/int64 ``a`` (arithmetic: negative values
        stay negative); shift counts in ``[0, bits - 1]``."""

    @abc.abstractmethod
    def pack_bits(self, mask: Array) -> Array:
        """Pack a 1-D bool array into int32 words: element ``i`` is bit ``i % 32`` of
        word ``i // 32``; the tail of the last word is zero. ``ceil(n / 32)`` words."""

    @abc.abstractmethod
    def unpack_bits(self, words: Array, n: int) -> Array:
        """Inverse of :meth:`pack_bits`: the first ``n`` bits as a bool array."""

    @abc.abstractmethod
    def uint_to_bits(self, v: Array, bits: int) -> Array:
        """Non-negative integers ``v`` (< 2**bits) as a flat bool array of
        ``len(v) * bits`` bits, least significant bit first per element."""

    @abc.abstractmethod
    def bits_to_uint(self, b: Array, bits: int) -> Array:
        """Inverse of :meth:`uint_to_bits`: int64 values from a flat bool array."""

    def pack_uint(self, v: Array, bits: int) -> Array:
        """Pack non-negative integers ``v`` (< 2**bits) into int32 words as one bit
        stream: element ``i`` occupies stream bits ``i*bits .. i*bits+bits-1``, least
        significant first; ``ceil(len(v) * bits / 32)`` words. Backends may override
        this with a faster path giving the same words."""
        return self.pack_bits(self.uint_to_bits(v, bits))

    def unpack_uint(self, words: Array, n: int, bits: int) -> Array:
        """Inverse of :meth:`pack_uint`: ``n`` int64 values."""
        return self.bits_to_uint(self.unpack_bits(words, n * bits), bits)

    # -- randomness ---------------------------------------------------------------------
    @abc.abstractmethod
    def random_uniform(self, n: int, key: int, counter: int, like: Array) -> Array:
        """``n`` float32 draws from U[0, 1), determined by ``(key, counter)`` alone."""

    @abc.abstractmethod
    def random_choice(self, n: int, k: int, key: int, counter: int, like: Array) -> Array:
        """``k`` distinct ascending int64 indices drawn uniformly from ``range(n)``,
        determined by ``(key, counter)`` alone."""

    # -- selection kernels
    # Primitives for the sparse methods' hot path. Each has a default in terms of the
    # primitives above; backends override them with one fused kernel where they can.

    def count_true(self, mask: Array) -> int:
        """Number of true elements of the bool ``mask``, as a Python int (a host sync
        on a device)."""
        return int(self.item(self.sum(self.cast(mask, "int64"))))

    def all_finite(self, x: Array) -> Array:
        """0-d bool array: whether float ``x`` holds no NaN and no Inf (on the device,
        no host sync)."""
        return self.sum(self.cast(~self.isfinite(x), "int64")) == 0

    def choose(self, cond: Array, a: Array, b: Array) -> Array:
        """``a`` if the 0-d bool ``cond`` holds, else ``b`` (whole arrays of one shape
        and dtype). Unlike :meth:`where`, a backend that may branch on the host returns
        one of the two arrays as is, without an elementwise pass."""
        return self.where(cond, a, b)

    def index_update(self, x: Array, idx: Array, values: Array) -> Array:
        """A copy of 1-D ``x`` with ``values`` at the distinct indices ``idx`` (``x``
        itself is left alone)."""
        n = self.numel(x)
        hit = self.scatter(n, idx, self.zeros(self.numel(idx), "int32", x) + 1) > 0
        return self.where(hit, self.scatter(n, idx, values), x)

    def nonzero_magnitude_at_least(self, x: Array, threshold: Any) -> Array:
        """Ascending int64 indices of the non-zero elements of 1-D float ``x`` whose
        magnitude is not below ``threshold`` (a Python number or a 0-d / one-element
        array of ``x``'s dtype): ``nonzero(~(abs(x) < threshold) & ~(abs(x) <= 0))``, so a
        NaN element is always selected. The selection of the threshold sparsifiers."""
        a = self.abs(x)
        return self.nonzero(~(a < threshold) & ~(a <= 0))

    #: below this many elements, :meth:`topk_magnitude_indices` selects directly
    SAMPLED_TOPK_MIN_NUMEL: int = 1 << 16
    #: expected number of sampled elements above the sampled threshold (the sample's
    #: size follows from it: larger is a tighter candidate set and a longer sample)
    SAMPLED_TOPK_HITS: int = 256

    def topk_magnitude_indices(self, x: Array, k: int) -> Array:
        """Ascending indices of the ``k`` elements of largest magnitude of 1-D float
        ``x``: the set of ``topk_indices(abs(x), k)`` (NaN ranks as +inf, ties go to
        the lowest indices), found without a selection over the whole tensor.

        A strided sample of ``|x|`` gives a threshold ``t`` that about ``k`` plus a
        margin of the elements reach; one pass collects the candidates ``|x| >= t``, and
        the exact top-k is selected among them. The candidates hold every element at or
        above the k-th largest magnitude whenever there are at least ``k`` of them, so
        the result is exact whatever the sample; where the sample misleads (fewer than
        ``k`` candidates), or ``x`` holds NaN or Inf, or ``k`` is a large fraction of
        the tensor, the selection runs on the whole tensor instead. Decides on the
        host (``item``), so backends that must not (TensorFlow inside ``tf.function``)
        override it with ``topk_indices(abs(x), k)``."""
        n = self.numel(x)
        if k <= 0 or k >= n or n < self.SAMPLED_TOPK_MIN_NUMEL or 8 * k > n or not self.item(self.all_finite(x)):
            return self.topk_indices(self.abs(x), k)
        stride = max(1, n // min(n, -(-self.SAMPLED_TOPK_HITS * n // k)))
        sample = self.abs(x[::stride])
        s = self.numel(sample)
        hits = k * s / n  # expected sampled elements at or above the k-th largest
        j = min(s, math.ceil(hits + 4.0 * math.sqrt(hits) + 8.0))
        t = float(self.item(self.kth_largest(sample, j)))
        if t > 0:
            candidates = self.nonzero((x >= t) | (x <= -t))
            if self.numel(candidates) >= k:
                chosen = self.topk_indices(self.abs(self.gather(x, candidates)), k)
                return self.gather(candidates, chosen)
        return self.topk_indices(self.abs(x), k)
