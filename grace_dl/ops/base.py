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

import numpy as np

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

#: elements per chunk of a large tensor in the chunked defaults (and methods), so that
#: temporaries stay a few MiB whatever its size
CHUNK_ELEMENTS = 1 << 20


def chunk_bounds(n: int, multiple: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the chunks of ``n`` elements: about :data:`CHUNK_ELEMENTS`
    each, every start a multiple of ``multiple``; one empty chunk for ``n = 0``."""
    step = max(multiple, CHUNK_ELEMENTS // multiple * multiple)
    return [(a, min(n, a + step)) for a in range(0, n, step)] or [(0, 0)]


def level_bits(levels: int) -> int:
    """Bits of a signed level in ``-levels..levels`` sent as the offset code
    ``level + levels``: ``ceil(log2(2 levels + 1))``."""
    return math.ceil(math.log2(2 * levels + 1))


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
        """A 1-D zero array of length ``n`` on ``like``'s device. ``n`` is an int or a
        0-d int array (read as an int; on TensorFlow inside ``tf.function``, a
        symbolic length known when the graph runs)."""

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

    def orthonormalize_rows(self, rows: Array, epsilon: float) -> Array:
        """Modified Gram-Schmidt on the rows of 2-D float ``rows`` (r, n), PowerSGD's
        orthonormalisation (Vogels et al. 2019): each row in turn has its component along
        every earlier row removed, and is divided by ``norm + epsilon``. ``epsilon`` keeps
        a zero row zero (a zero gradient) and shortens a row of norm comparable to it; the
        components are removed along the exact unit directions, so a short row does not
        leave a trace of ``epsilon`` in the rows after it (which, for a nearly dependent
        row, would spoil its orthogonality). Sums are the backend's own (PowerSGD is not
        bit-identical across backends)."""
        r, n = self.shape(rows)
        out = [rows[i] for i in range(r)]
        for i in range(r):
            norm = self.norm(out[i])
            if i + 1 < r:
                direction = out[i] / self.where(norm > 0, norm, norm * 0 + 1)  # a zero row stays zero
                for j in range(i + 1, r):
                    out[j] = out[j] - self.sum(direction * out[j]) * direction
            out[i] = out[i] / (norm + epsilon)
        return self.reshape(self.concat(out), (r, n))

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

    def hold(self, x: Array) -> Array:
        """``x`` itself, computed as written: a graph compiler may not fold the
        arithmetic before it into the arithmetic after it (TensorFlow's Grappler turns
        ``(x * c1) * c2`` into ``x * (c1 * c2)``, another rounding than eagerly). For a
        product of products with constants that must round as on every backend.
        Default: ``x``."""
        return x

    def reference_uniform(self, n: int, key: int, counter: int, like: Array) -> Array:
        """``n`` float32 draws from U[0, 1): those of the NumPy backend's
        :meth:`random_uniform` (NumPy's Philox-4x64 stream of ``(key, counter)``) bit for
        bit on every backend, on ``like``'s device, for methods whose workers on
        different backends must draw alike (PowerSGD's initial ``Q``). Default: drawn by
        NumPy on the host and copied (a host-to-device copy on a GPU)."""
        from .numpy_backend import NumpyOps

        return self.from_numpy(NumpyOps().random_uniform(n, key, counter, None), like)

    def reference_uniform_signed(self, n: int, key: int, counter: int, dtype: str, like: Array) -> Array:
        """``cast(reference_uniform(n, key, counter, like), dtype) * 2 - 1``: the same
        draws scaled to [-1, 1) in float ``dtype`` (PowerSGD's initial ``Q``, Vogels et
        al. 2019). The product is exact and the difference rounds once, so the bits are
        the same on every backend, with or without a fused multiply-add. One call, so
        that a backend may do the arithmetic where the draws are made."""
        return self.cast(self.reference_uniform(n, key, counter, like), dtype) * 2.0 - 1.0

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

    def read_flag(self, cond: Array) -> bool | None:
        """The 0-d bool ``cond`` as a Python bool where reading it costs no device sync
        (NumPy, tensors in host memory, eager execution); None where it would (a GPU
        tensor) or cannot be read (a symbolic tensor inside ``tf.function``). Default:
        None."""
        return None

    def choose(self, cond: Array, a: Array, b: Array) -> Array:
        """``a`` if the 0-d bool ``cond`` holds, else ``b`` (whole arrays of one shape
        and dtype). Unlike :meth:`where`, a backend that may branch on the host returns
        one of the two arrays as is, without an elementwise pass."""
        return self.where(cond, a, b)

    def index_update(self, x: Array, idx: Array, values: Array, consume: bool = False) -> Array:
        """A copy of 1-D ``x`` with ``values`` at the distinct indices ``idx`` (``x``
        itself is left alone).

        Args:
            consume: the caller never uses ``x`` again, so the result may be ``x``
                updated in place (NumPy and torch do so: no full-size copy; default
                False)."""
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

    def index_subtract(self, x: Array, idx: Array, values: Array, consume: bool = False) -> Array:
        """A copy of 1-D ``x`` in which each element at the distinct indices ``idx``
        becomes itself minus the matching element of ``values``: ``index_update(x, idx,
        gather(x, idx) - values)`` (``x`` itself is left alone, unless ``consume``: see
        :meth:`index_update`). What error feedback keeps of a sparse payload."""
        return self.index_update(x, idx, self.gather(x, idx) - values, consume=consume)

    def pack_sparse(self, x: Array, idx: Array) -> Array:
        """The sparse wire format in one int32 buffer: the int64 ``idx`` (each below
        2**31) as int32, then the words of ``gather(x, idx)`` (``x`` of a 4- or 8-byte
        dtype). :meth:`scatter_sparse` reverses it."""
        return self.concat([self.cast(idx, "int32"), self.bitcast(self.gather(x, idx), "int32")])

    def pack_magnitude_at_least(self, x: Array, threshold: Any) -> Array:
        """:meth:`pack_sparse` of the elements :meth:`nonzero_magnitude_at_least` selects:
        the payload of a fixed-threshold sparsifier in one primitive, so that a backend
        can build it a block at a time without the int64 indices (twice the tensor's
        size when most elements pass)."""
        return self.pack_sparse(x, self.nonzero_magnitude_at_least(x, threshold))

    def scatter_sparse(self, n: int, buffer: Array, dtype: str) -> Array:
        """A length-``n`` zero array of ``dtype`` holding, at the indices of a
        :meth:`pack_sparse` buffer, its values (the count follows from the buffer's
        length, which inside ``tf.function`` may be known only at run time)."""
        k = self.length(buffer) // (1 + DTYPE_ITEMSIZE[dtype] // 4)
        return self.scatter(n, self.cast(buffer[:k], "int64"), self.bitcast(buffer[k:], dtype))

    def scatter_sparse_sum(self, n: int, buffers: list[Array], dtype: str, scale: float = 1.0) -> Array:
        """The sum of the :meth:`scatter_sparse` arrays of ``buffers`` (at least one),
        without building them, times ``scale``: a length-``n`` array of ``dtype``
        filled with +0.0 to which each buffer's values are added at its indices, buffer
        after buffer (``total[i] = total[i] + value``), then ``total * scale`` (the
        mean's factor; default 1.0: no multiplication). Indices are distinct within a
        buffer and may repeat across buffers.

        Bit for bit the element-wise sum ``d0 + d1 + ...`` of the dense arrays (absent
        elements +0.0), except for the sign of a zero: where every buffer holds the
        element and each holds -0.0, the dense sum is -0.0 and this one +0.0 (the start
        array's +0.0 is added in); everywhere else the two are equal: both add the same
        values in the same order, and the dense sum's extra +0.0 terms (for absent
        elements) change nothing but a -0.0 into +0.0 (NaN stays NaN, infinities add alike).
        Costs one ``n``-element fill plus ``k`` element updates per buffer, where the
        dense sum costs two ``n``-element passes per buffer; backends may scale only
        the elements that buffers hold (+0.0 times a positive ``scale`` is +0.0)."""
        words_per_pair = 1 + DTYPE_ITEMSIZE[dtype] // 4
        total = self.zeros(n, dtype, buffers[0])
        for buffer in buffers:
            k = self.length(buffer) // words_per_pair
            if isinstance(k, int) and k == 0:
                continue  # nothing to add (torch cannot view an empty slice as a wider dtype)
            idx = self.cast(buffer[:k], "int64")
            total = self.index_update(total, idx, self.gather(total, idx) + self.bitcast(buffer[k:], dtype))
        return total if scale == 1.0 else total * scale

    #: below this many elements, :meth:`topk_magnitude_indices` selects directly
    SAMPLED_TOPK_MIN_NUMEL: int = 1 << 12
    #: expected number of sampled elements above the sampled threshold (the sample's
    #: size follows from it: larger is a tighter candidate set and a longer sample);
    #: tensors below 2**22 elements aim at fewer, ``max(8, n >> 14)``: the sample's
    #: partition dominates a small tensor's selection (at 1e4 elements and k = 100, a
    #: sample of 800 takes 18 us in all where 256 hits sample the whole tensor, 70 us)
    SAMPLED_TOPK_HITS: int = 256

    def topk_sample_plan(self, n: int, k: int) -> tuple[int, int] | None:
        """The sample :meth:`topk_magnitude_indices` takes to find the top ``k`` of ``n``
        elements: ``(stride, j)``, the threshold being the ``j``-th largest magnitude of
        every ``stride``-th element; None where it selects on the whole tensor instead
        (``k`` outside ``(0, n)``, ``n`` below :attr:`SAMPLED_TOPK_MIN_NUMEL`, or ``k``
        above an eighth of ``n``)."""
        if k <= 0 or k >= n or n < self.SAMPLED_TOPK_MIN_NUMEL or 8 * k > n:
            return None
        aim = min(self.SAMPLED_TOPK_HITS, max(8, n >> 14))
        stride = max(1, n // min(n, -(-aim * n // k)))
        s = -(-n // stride)  # the sample's length
        hits = k * s / n  # expected sampled elements at or above the k-th largest
        return stride, min(s, math.ceil(hits + 4.0 * math.sqrt(hits) + 8.0))

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
        plan = self.topk_sample_plan(n, k)
        if plan is None or not self.item(self.all_finite(x)):
            return self.topk_indices(self.abs(x), k)
        stride, j = plan
        t = float(self.item(self.kth_largest(self.abs(x[::stride]), j)))
        if t > 0:
            candidates = self.nonzero((x >= t) | (x <= -t))
            if self.numel(candidates) >= k:
                chosen = self.topk_indices(self.abs(self.gather(x, candidates)), k)
                return self.gather(candidates, chosen)
        return self.topk_indices(self.abs(x), k)
    # -- quantization kernels
    # Coarse primitives of the sign and quantization methods. Each has a default in terms
    # of the primitives above, which fixes its result bit for bit; a backend may override
    # one with a faster kernel that gives the same bits.
    def pack_signs(self, x: Array, scales: Array | None = None) -> Array:
        """:meth:`pack_bits` of ``x >= 0`` for 1-D float ``x`` (zero and -0.0 set the
        bit, NaN clears it): ``ceil(n / 32)`` int32 words, followed, where ``scales``
        is given (a 1-D array of a 4- or 8-byte float dtype), by its bits as int32
        words: a sign method's whole payload in one buffer, without a concatenation."""
        words = self.pack_bits(x >= 0)
        if scales is None:
            return words
        return self.concat([words, self.bitcast(scales, "int32")])

    def unpack_signs(self, words: Array, n: int, dtype: str, scale: Array | None = None) -> Array:
        """``n`` elements of float ``dtype`` from the sign bits of :meth:`pack_signs`
        (the first ``ceil(n / 32)`` of ``words``; any words after them are ignored):
        +1 where a bit is set and -1 where it is clear, or, given ``scale`` (a
        1-element array of ``dtype``), ``scale`` and ``-scale``, copied bit for bit.
        :meth:`select_bits` with those two values."""
        if scale is None:
            return self.select_bits(words, n, self.full(1, 1.0, dtype, words), self.full(1, -1.0, dtype, words))
        return self.select_bits(words, n, scale, -scale)

    def pack_signs_abs_sum(self, x: Array, scale: float) -> Array:
        """``pack_signs(x, abs_tree_sum(x, scale))``: the sign words of 1-D float ``x``
        followed by the words of its L1 norm times ``scale`` in the fixed order (with
        ``scale = 1 / n``, EF-signSGD's payload, Karimireddy et al. 2019). One call, so
        that a backend running another's kernels crosses to them once."""
        return self.pack_signs(x, self.abs_tree_sum(x, scale))

    def unpack_scaled_signs(self, words: Array, n: int, dtype: str) -> Array:
        """Inverse of :meth:`pack_signs_abs_sum`: :meth:`unpack_signs` of ``words`` with
        the scale read from the words after the ``ceil(n / 32)`` sign words (one value
        of float ``dtype``, 4 or 8 bytes)."""
        scale = self.bitcast(words[-(-n // 32):], dtype)
        if self.numel(scale) != 1:
            scale = scale[:1]
        return self.unpack_signs(words, n, dtype, scale)

    def select_bits(self, words: Array, n: int, on: Array, off: Array) -> Array:
        """An ``n``-element array holding ``on`` where bit ``i`` of ``words`` (the layout
        of :meth:`pack_bits`; words after the first ``ceil(n / 32)`` are ignored) is set
        and ``off`` where it is clear; ``on`` and ``off`` are 1-element arrays of the
        output dtype, copied bit for bit (a -0.0 stays -0.0)."""
        return self.where(self.unpack_bits(words, n), on, off)

    def full(self, n: int, value: float, dtype: str, like: Array) -> Array:
        """A 1-D array of ``n`` copies of ``value`` in ``dtype`` on ``like``'s device."""
        return self.zeros(n, dtype, like) + value

    def tree_sum(self, x: Array, scale: float = 1.0) -> Array:
        """The sum of 1-D float ``x`` as a 1-element array, added in one fixed order so
        that every backend and device rounds alike: with ``h`` the largest power of two
        below ``n``, element ``i + h`` is added to element ``i`` (elements ``n - h ..
        h - 1`` are carried unchanged), then halves of the ``h`` partial sums are added
        elementwise until one is left. ``ceil(log2 n)`` elementwise additions, no host
        sync; an empty ``x`` sums to 0. A ``scale`` other than 1 multiplies the sum
        (one rounding) before it is returned."""
        n = self.numel(x)
        if n == 0:
            return self.zeros(1, self.dtype(x), x)
        if n > 1:
            h = 1 << ((n - 1).bit_length() - 1)
            head = x[:n - h] + x[h:]
            x = self.concat([head, x[n - h:h]]) if n - h < h else head
            while h > 1:
                h //= 2
                x = x[:h] + x[h:]
        return x * scale if scale != 1.0 else x

    def sign_means(self, x: Array) -> Array:
        """The 2-element array ``[mean of x where x >= 0, mean of x elsewhere]`` (NaN
        counts as negative) for 1-D float ``x``: each side's :meth:`tree_sum`, taken over
        all ``n`` positions with +0.0 in the other side's places, divided by its element
        count cast to ``x``'s dtype; an empty side has mean +0.0 (its sum divided by 1)."""
        mask = x >= 0
        n = self.numel(x)
        zeros = self.zeros(n, self.dtype(x), x)
        sums = self.concat([self.tree_sum(self.where(mask, x, zeros)), self.tree_sum(self.where(mask, zeros, x))])
        positive = self.reshape(self.sum(self.cast(mask, "int64")), (1,))
        counts = self.concat([positive, n - positive])
        counts = self.where(counts > 0, counts, counts * 0 + 1)
        return sums / self.cast(counts, self.dtype(x))

    def take_fields(self, words: Array, n: int, bits: int, values: Array) -> Array:
        """``n`` elements: element ``i`` is ``values[f_i]``, with ``f_i`` the ``i``-th
        ``bits``-wide field of ``words`` in the layout of :meth:`pack_uint`, and
        ``values`` a 1-D array of ``2**bits`` entries of the output dtype (a decoding
        table), copied bit for bit."""
        return self.gather(values, self.unpack_uint(words, n, bits))

    def ternary_codes(self, x: Array, bound: Array, u: Array) -> Array:
        """uint8 codes ``1 + t_i`` in {0, 1, 2} for 1-D float ``x``: ``t_i`` is -1 where
        ``x_i < 0`` and +1 elsewhere if ``u_i < |x_i| / bound``, and 0 otherwise (so NaN
        gives 1). ``bound``: a 1-element array of ``x``'s dtype; ``u``: draws in
        ``x``'s dtype."""
        keep = u < self.abs(x) / bound
        one = self.zeros(self.numel(x), "uint8", x) + 1
        return self.where(keep, self.where(x < 0, one - 1, one + 1), one)

    def clipped_ternary_codes(self, x: Array, clip: Array, bound: Array, u: Array) -> Array:
        """:meth:`ternary_codes` of ``clip_magnitude(x, clip)`` (TernGrad's clipping and
        ternarization, Wen et al. 2017) in one step: ``x`` is clipped to ``[-clip, clip]``
        (NaN where ``x`` is NaN or +-inf, throughout if ``clip`` is NaN) before
        ``u_i < |x_i| / bound`` is decided. ``clip``, ``bound``: 1-element arrays of
        ``x``'s dtype; ``u``: draws in ``x``'s dtype. A backend can do it without storing
        the clipped tensor."""
        return self.ternary_codes(self.clip_magnitude(x, clip), bound, u)

    def clipped_ternary_words(self, x: Array, clip_sigma: float, key: int, counter: int) -> Array:
        """TernGrad's payload (Wen et al. 2017) with clipping, for 1-D float32/float64
        ``x`` of ``n`` elements, as int32 words: :meth:`clipped_ternary_codes` of ``x``
        packed with :meth:`pack_uint` at 2 bits, then the scaler's bits (one word for
        float32, two for float64). The scalars are ``[b, s, q] =
        clip_scales(peak_rms(x), clip_sigma)`` (clipping bound, scaler, divisor), the
        draws the ``n`` of :meth:`random_uniform` with ``key`` and ``counter`` (cast to
        ``x``'s dtype). One call, so that a backend can draw, ternarize and pack a block
        at a time."""
        n, dtype = self.numel(x), self.dtype(x)
        scalars = self.clip_scales(self.peak_rms(x), clip_sigma)
        bound, scale, safe = scalars[0:1], scalars[1:2], scalars[2:3]
        u = self.random_uniform(n, key, counter, x)
        if dtype != "float32":
            u = self.cast(u, dtype)
        # a chunk at a time (16 codes to a word, so the chunks' words are the tensor's)
        parts = []
        for start, stop in chunk_bounds(n, 16):
            xs, us = (x, u) if stop - start == n else (x[start:stop], u[start:stop])
            parts.append(self.pack_uint(self.clipped_ternary_codes(xs, bound, safe, us), 2))
        return self.concat(parts + [self.bitcast(scale, "int32")])

    def ternary_values(self, words: Array, n: int, dtype: str) -> Array:
        """Inverse of :meth:`clipped_ternary_words` (any 2-bit ternary codes followed by
        the scaler ``s``'s words): the ``n`` values ``(c_i - 1) * s`` in ``dtype``, with
        ``c_i`` the ``i``-th 2-bit field."""
        code_words = -(-n // 16)
        scale = self.bitcast(words[code_words:], dtype)
        # code c decodes to (c - 1) * s: a 4-entry table
        values = self.cast(self.arange(4, scale) - 1, dtype) * scale
        return self.take_fields(words[:code_words], n, 2, values)

    def power_of_two_codes(self, x: Array, r: Array) -> Array:
        """int32 codes of float32 ``x`` rounded to a neighbouring power of two (natural
        compression), from its bits: with ``e`` the exponent field and ``m`` the 23-bit
        mantissa of ``|x|``, ``e`` is raised by one where ``r < m`` (``r``: int32 draws
        in ``[0, 2**23)``) and ``e < 254``; the code is ``e``, plus 256 for a negative
        ``x`` with ``e > 0``; NaN is code 256. :meth:`power_of_two_values` inverts it."""
        bits = self.bitcast(x, "int32")
        mag = self.bitwise_and(bits, 0x7FFFFFFF)
        e = self.shift_right(mag, 23)
        up = (r < self.bitwise_and(mag, 0x7FFFFF)) & (e < 254)
        e = e + self.cast(up, "int32")
        code = self.where((bits < 0) & (e > 0), e + 256, e)
        return self.where(mag > 0x7F800000, e * 0 + 256, code)

    def power_of_two_values(self, codes: Array) -> Array:
        """float32 values of :meth:`power_of_two_codes` (any integer dtype, each below
        512): ``+-2**(e - 127)`` from the exponent field ``e = code % 256`` (0 gives
        zero, 255 infinity), negative for codes from 256 on, code 256 the quiet NaN."""
        codes = self.cast(codes, "int32")
        mag = self.shift_left(self.bitwise_and(codes, 255), 23)
        bits = self.where(codes >= 256, mag + (-(1 << 31)), mag)
        return self.bitcast(self.where(codes == 256, mag * 0 + 0x7FC00000, bits), "float32")

    def power_of_two_words(self, x: Array, key: int, counter: int) -> Array:
        """Natural compression's payload (Horvath et al. 2019) of 1-D float32 ``x``: the
        :meth:`power_of_two_codes` of ``x`` packed with :meth:`pack_uint` at 9 bits, the
        draws being :meth:`uniform_ints` of ``n`` elements at 23 bits with ``key`` and
        ``counter``. One call, so that a backend can draw, round and pack a block at a
        time."""
        n = self.numel(x)
        r = self.uniform_ints(n, 23, key, counter, x)
        parts = []
        for start, stop in chunk_bounds(n, 32):  # whole words per chunk
            parts.append(self.pack_uint(self.power_of_two_codes(x[start:stop], r[start:stop]), 9))
        return parts[0] if len(parts) == 1 else self.concat(parts)

    def power_of_two_from_words(self, words: Array, n: int) -> Array:
        """Inverse of :meth:`power_of_two_words`: the ``n`` float32
        :meth:`power_of_two_values` of the 9-bit codes in ``words``."""
        parts = []
        for start, stop in chunk_bounds(n, 32):
            first = start * 9 // 32
            part = words[first:first + -(-(stop - start) * 9 // 32)]
            parts.append(self.power_of_two_values(self.unpack_uint(part, stop - start, 9)))
        return parts[0] if len(parts) == 1 else self.concat(parts)

    def bfloat16_words(self, x: Array) -> Array:
        """The bfloat16 bit patterns of 1-D float32 ``x``, two to a little-endian int32
        word (element ``2i`` in the low half of word ``i``, a zero half after an odd
        count): rounded once to nearest even on the 16 dropped bits, subnormals kept,
        overflow to inf, NaN as the quiet NaN ``0x7FC0`` with ``x``'s sign."""
        bits = self.cast(self.bitcast(x, "int32"), "int64")
        mag = self.bitwise_and(bits, 0x7FFFFFFF)
        rounded = self.shift_right(mag + 0x7FFF + self.bitwise_and(self.shift_right(mag, 16), 1), 16)
        rounded = self.where(mag > 0x7F800000, rounded * 0 + 0x7FC0, rounded)
        halves = self.where(bits < 0, rounded + 0x8000, rounded)
        if self.numel(halves) % 2:
            halves = self.concat([halves, self.zeros(1, "int64", halves)])
        pairs = self.reshape(halves, (-1, 2))
        words = pairs[:, 0] + pairs[:, 1] * 65536
        return self.cast(self.where(words >= 2**31, words - 2**32, words), "int32")

    def dither_codes(self, y: Array, u: Array, levels: int) -> Array:
        """int32 codes ``levels + sign(y_i) k_i`` of natural dithering (Horvath et al.
        2019) for 1-D float32/float64 ratios ``y = v / ||v||`` (magnitudes clamped to 1):
        with ``s = levels`` and ``a = |y_i|``, an ``a >= 2**(1-s)`` between the levels
        ``2**e <= a < 2**(e+1)`` gets ``k = e + s``, raised by one where ``u_i`` is below
        its mantissa fraction ``(a - 2**e) / 2**e``; a smaller ``a`` gets ``k = 1`` where
        ``u_i < a / 2**(1-s)`` and 0 otherwise; NaN gets ``k = 0``. ``u``: draws in ``y``'s
        dtype. :meth:`dither_values` inverts the codes to the levels."""
        dtype = self.dtype(y)
        itype, mbits = ("int32", 23) if dtype == "float32" else ("int64", 52)
        width_bits = 8 * DTYPE_ITEMSIZE[itype]
        mag = self.abs(y)
        mag = self.minimum(mag, mag * 0 + 1)
        lowest = 2.0 ** (1 - levels)
        top = mag >= lowest
        ybits = self.bitcast(mag, itype)
        exponent_mask = ((1 << (width_bits - 1)) - 1) ^ ((1 << mbits) - 1)
        floor_pow2 = self.bitcast(self.bitwise_and(ybits, exponent_mask), dtype)
        zero = mag * 0
        lower = self.where(top, floor_pow2, zero)
        width = self.where(top, floor_pow2, zero + lowest)
        up = u < (mag - lower) / width  # exact: a power-of-two division of an exact difference
        bias = (1 << (width_bits - mbits - 2)) - 1
        level = self.cast(self.shift_right(ybits, mbits), "int32") - bias + levels  # s for a = 1
        k = self.where(top, level, level * 0) + self.cast(up, "int32")
        return self.where(y < 0, levels - k, levels + k)

    def dither_values(self, codes: Array, levels: int, dtype: str) -> Array:
        """The levels of :meth:`dither_codes` in ``dtype`` (float32 or float64): code
        ``c`` with ``k = |c - levels| > 0`` gives ``+-2**(k - levels)``, signed as
        ``c - levels``; ``k = 0`` gives +0.0."""
        itype, mbits = ("int32", 23) if dtype == "float32" else ("int64", 52)
        signed = self.cast(codes, "int32") - levels
        k = self.where(signed < 0, -signed, signed)
        bias = (1 << (8 * DTYPE_ITEMSIZE[itype] - mbits - 2)) - 1
        # level k >= 1 is 2**(k - s): its exponent field is k - s + bias >= 1
        exponent = self.where(k > 0, k - levels + bias, k * 0 + bias)
        level = self.bitcast(self.shift_left(self.cast(exponent, itype), mbits), dtype)
        return self.where(k > 0, self.where(signed < 0, -level, level), level * 0)

    def clip_magnitude(self, x: Array, bound: Array) -> Array:
        """1-D float ``x`` clamped to ``[-bound, bound]`` (TernGrad's gradient clipping,
        Wen et al. 2017), with NaN wherever ``x`` is NaN or +-inf (NaN bits unspecified);
        signed zeros are kept. ``bound``: a 1-element array of ``x``'s dtype, > 0 or
        +inf; a NaN bound (that of a tensor holding NaN or Inf) gives NaN throughout."""
        open_bound = self.where(bound == bound, bound, bound * 0 + float("inf"))
        # x * 0 makes +-inf and NaN NaN, whatever minimum does with NaN on a backend
        return self.minimum(-self.minimum(-x, open_bound), open_bound) + x * 0

    def bucket_levels(self, grid: Array, noise: Array, levels: int) -> tuple[Array, Array]:
        """QSGD's stochastic levels (Alistarh et al. 2017) of the rows (buckets) of a 2-D
        float ``grid``: ``(norms, codes)``. ``norms``: each row's L2 norm, taken on the
        row divided by its largest magnitude (1 where that is not above 0) and multiplied
        back, so that squares cannot overflow. ``codes``: int32, row-major,
        ``s + sign(g) * min(floor(|g| / norm * s + u), s)`` with ``s = levels``, ``u`` the
        matching element of ``noise`` (draws of ``grid``'s dtype and shape) and a norm
        not above 0 taken as 1."""
        buckets = self.shape(grid)[0]
        dtype = self.dtype(grid)
        peak = self.max(self.abs(grid), axis=1)
        peak = self.where(peak > 0, peak, peak * 0 + 1)
        norms = self.norm(grid / self.reshape(peak, (buckets, 1)), axis=1) * peak
        safe = self.where(norms > 0, norms, norms * 0 + 1)
        scaled = self.abs(grid) / self.reshape(safe, (buckets, 1)) * levels
        level = self.minimum(self.floor(scaled + noise), self.full(1, levels, dtype, grid))
        return norms, self.cast(self.flatten(self.sign(grid) * level + levels), "int32")

    def bucket_level_words(self, x: Array, levels: int, bucket_size: int, key: int, counter: int) -> Array:
        """QSGD's payload (Alistarh et al. 2017) of 1-D float32/float64 ``x`` of ``n``
        elements, as int32 words: the ``ceil(n / bucket_size)`` norms of
        :meth:`bucket_levels` (their bits, one word per float32, two per float64), then its
        codes packed with :meth:`pack_uint` at :func:`level_bits` bits each. The grid is
        ``x`` zero-padded to whole buckets, the noise the first ``buckets * bucket_size``
        draws of :meth:`random_uniform` with ``key`` and ``counter`` (cast to ``x``'s
        dtype); the padding's codes are dropped. One call, so that a backend can draw,
        quantize and pack a block at a time."""
        n, d = self.numel(x), bucket_size
        dtype, bits = self.dtype(x), level_bits(levels)
        buckets = -(-n // d)
        noise = self.random_uniform(buckets * d, key, counter, x)
        norm_parts, word_parts = [], []
        # whole buckets per chunk, an even number of them and a multiple of 32 elements, so
        # that the parts are the norms and the words of the whole tensor
        for start, stop in chunk_bounds(n, math.lcm(2 * d, 32)):
            size = stop - start
            rows = -(-size // d)
            part = x if size == n else x[start:stop]
            if rows * d != size:
                part = self.concat([part, self.zeros(rows * d - size, dtype, x)])
            draws = noise if rows * d == buckets * d else noise[start:start + rows * d]
            draws = self.reshape(self.cast(draws, dtype), (rows, d))
            norms, codes = self.bucket_levels(self.reshape(part, (rows, d)), draws, levels)
            norm_parts.append(self.bitcast(norms, "int32"))
            word_parts.append(self.pack_uint(codes[:size] if rows * d != size else codes, bits))
        return self.concat(norm_parts + word_parts)

    #: QSGD's codes of up to this many bits decode through a table (:meth:`take_fields`),
    #: wider ones by arithmetic (``cast(c) - s``, the same bits: both are exact): a
    #: backend whose gathers are slow sets 0
    TABLE_DECODE_MAX_BITS: int = 8

    def bucket_level_values(self, words: Array, n: int, levels: int, bucket_size: int, dtype: str) -> Array:
        """Inverse of :meth:`bucket_level_words`: the ``n`` values ``(c_i - levels) *
        (norm / levels)`` in ``dtype`` (float32 or float64), with ``c_i`` the ``i``-th code
        and ``norm`` that of its bucket; ``c_i - levels`` and ``norm / levels`` are each
        rounded to ``dtype`` first, the product once."""
        d, s, bits = bucket_size, levels, level_bits(levels)
        buckets = -(-n // d)
        norm_words = buckets * DTYPE_ITEMSIZE[dtype] // 4
        norms = self.bitcast(words[:norm_words], dtype)
        parts = []
        for start, stop in chunk_bounds(n, math.lcm(2 * d, 32)):
            first = norm_words + start * bits // 32
            part = words[first:first + -(-(stop - start) * bits // 32)]
            scales = norms[start // d:-(-stop // d)] / s
            if bits <= self.TABLE_DECODE_MAX_BITS:  # code c decodes to c - s: a 2**bits-entry table
                table = self.cast(self.arange(1 << bits, norms) - s, dtype)
                code = self.take_fields(part, stop - start, bits, table)
            else:
                code = self.cast(self.unpack_uint(part, stop - start, bits), dtype) - s
            parts.append(self.scale_buckets(code, scales, d))
        return parts[0] if len(parts) == 1 else self.concat(parts)

    def dither_bucket_words(self, x: Array, levels: int, bucket_size: int, key: int, counter: int) -> Array:
        """Natural dithering's payload (Horvath et al. 2019) with max-norms, of 1-D
        float32/float64 ``x`` of ``n`` elements, as int32 words: the
        ``ceil(n / bucket_size)`` norms (their bits, one word per float32, two per
        float64), then the :meth:`dither_codes` of ``x / norm`` packed with
        :meth:`pack_uint` at :func:`level_bits` bits each. A bucket's norm is its largest
        magnitude, the positive quiet NaN where it holds NaN or +-inf; the divisor is the
        norm, 1 where the norm is 0 (a NaN norm makes every ratio of its bucket NaN). The
        grid is ``x`` zero-padded to whole buckets, the draws the first
        ``buckets * bucket_size`` of :meth:`random_uniform` with ``key`` and ``counter``
        (cast to ``x``'s dtype); the padding's codes are dropped. One call, so that a
        backend can draw, dither and pack a block at a time."""
        n, d = self.numel(x), bucket_size
        dtype, bits = self.dtype(x), level_bits(levels)
        itype, mbits, ebits = ("int32", 23, 8) if dtype == "float32" else ("int64", 52, 11)
        buckets = -(-n // d)
        u = self.random_uniform(buckets * d, key, counter, x)
        quiet_nan = ((1 << (ebits + 1)) - 1) << (mbits - 1)
        norm_parts, word_parts = [], []
        # whole buckets and a multiple of 32 elements per chunk, so that the parts are the
        # norms and the code words of the whole tensor
        for start, stop in chunk_bounds(n, math.lcm(d, 32)):
            size = stop - start
            rows = -(-size // d)
            part = x if size == n else x[start:stop]
            if rows * d != size:
                part = self.concat([part, self.zeros(rows * d - size, dtype, x)])
            grid = self.reshape(part, (rows, d))
            # 0 * (NaN or inf) is NaN: a bucket holding either gets a NaN norm
            norms = self.max(self.abs(grid), axis=1) + self.sum(grid * 0, axis=1)
            norms = self.where(norms != norms, self.bitcast(self.zeros(rows, itype, x) + quiet_nan, dtype), norms)
            safe = self.where(norms > 0, norms, norms * 0 + 1)
            y = self.flatten(grid / self.reshape(safe, (rows, 1)))
            code = self.dither_codes(y, self.cast(u[start:start + rows * d], dtype), levels)
            norm_parts.append(self.bitcast(norms, "int32"))
            word_parts.append(self.pack_uint(code[:size] if rows * d != size else code, bits))
        return self.concat(norm_parts + word_parts)

    def dither_bucket_values(self, words: Array, n: int, levels: int, bucket_size: int, dtype: str) -> Array:
        """Inverse of :meth:`dither_bucket_words` (any norms): the ``n`` values
        ``dither_values(c_i) * norm`` in ``dtype`` (float32 or float64), with ``c_i`` the
        ``i``-th code and ``norm`` that of its bucket, one rounding per element."""
        d, bits = bucket_size, level_bits(levels)
        buckets = -(-n // d)
        norm_words = buckets * DTYPE_ITEMSIZE[dtype] // 4
        norms = self.bitcast(words[:norm_words], dtype)
        # every code's level, looked up: dither_values of all 2**bits codes (a code past
        # 2 levels, from a corrupt buffer, too)
        table = self.dither_values(self.arange(1 << bits, norms), levels, dtype)
        parts = []
        for start, stop in chunk_bounds(n, math.lcm(d, 32)):
            first = norm_words + start * bits // 32
            part = words[first:first + -(-(stop - start) * bits // 32)]
            value = self.take_fields(part, stop - start, bits, table)
            parts.append(self.scale_buckets(value, norms[start // d:-(-stop // d)], d))
        return parts[0] if len(parts) == 1 else self.concat(parts)

    def clip_scales(self, stats: Array, clip_sigma: float) -> Array:
        """TernGrad's scalars (Wen et al. 2017) from :meth:`peak_rms`'s ``[p, r]`` of a
        float32 or float64 tensor: the 3-element array ``[b, s, q]`` of ``stats``' dtype,
        with ``b = r * clip_sigma`` the clipping bound, ``s = min(p, b)`` the scaler (NaN
        if either is, as the positive quiet NaN: the sign of a NaN made by arithmetic
        differs between devices) and ``q = s`` where ``s > 0``, else 1 (NaN stays NaN),
        the divisor. One call where the steps would be a dozen operations on
        1-element arrays."""
        dtype = self.dtype(stats)
        if dtype not in ("float32", "float64"):
            raise TypeError(f"clip_scales works on float32 or float64, got {dtype}")
        bound = stats[1:2] * clip_sigma
        scale = self.minimum(stats[0:1], bound)
        nan_bits = 0x7FC00000 if dtype == "float32" else 0x7FF8000000000000
        nan = self.bitcast(self.full(1, nan_bits, "int32" if dtype == "float32" else "int64", stats), dtype)
        scale = self.where(scale != scale, nan, scale)
        safe = self.where(scale > 0, scale, scale * 0 + 1)
        return self.concat([bound, scale, safe])

    def peak_rms(self, x: Array) -> Array:
        """``[p, r]``, a 2-element array of 1-D float ``x``'s dtype: the largest magnitude
        ``p = max |x|`` (NaN if ``x`` holds NaN or Inf) and the root mean square
        ``r = sqrt(s * (1 / n)) * q``, where ``s`` is the :meth:`tree_sum` of ``(x / q)**2``
        and ``q = p`` if ``p > 0``, else 1 (scaled so that squares cannot overflow). An
        empty ``x`` gives ``[0, 0]``."""
        n = self.numel(x)
        if n == 0:
            return self.zeros(2, self.dtype(x), x)
        peak = self.reshape(self.max(self.abs(x)), (1,))
        # the peak of a tensor holding NaN or Inf is NaN (two reductions, no temporary)
        peak = self.where(self.all_finite(x), peak, peak * 0 + float("nan"))
        safe = self.where(peak > 0, peak, peak * 0 + 1)
        scaled = x / safe
        rms = self.sqrt(self.tree_sum(scaled * scaled) * (1.0 / n)) * peak
        return self.concat([peak, rms])

    def scale_buckets(self, x: Array, scales: Array, bucket_size: int) -> Array:
        """``x[i] * scales[i // bucket_size]`` for 1-D float ``x`` and its
        ``ceil(n / bucket_size)`` per-bucket ``scales`` (same dtype): one rounding per
        element, the last bucket may be short."""
        n = self.numel(x)
        buckets = -(-n // bucket_size)
        pad = buckets * bucket_size - n
        if pad:
            x = self.concat([x, self.zeros(pad, self.dtype(x), x)])
        grid = self.reshape(x, (buckets, bucket_size)) * self.reshape(scales, (buckets, 1))
        return self.flatten(grid)[:n] if pad else self.flatten(grid)

    def abs_tree_sum(self, x: Array, scale: float = 1.0) -> Array:
        """:meth:`tree_sum` of ``abs(x)`` (with its ``scale``): the L1 norm of 1-D float
        ``x`` in the fixed order, without a backend having to store ``abs(x)``."""
        return self.tree_sum(self.abs(x), scale)

    def uniform_ints(self, n: int, bits: int, key: int, counter: int, like: Array) -> Array:
        """int32 draws uniform on ``[0, 2**bits)``, ``1 <= bits <= 23``: ``u * 2**bits``
        truncated, for the ``n`` draws ``u`` of :meth:`random_uniform` with the same
        ``key`` and ``counter`` (so a backend's values are those of its uniforms; a
        backend may make them from its raw random bits when that gives the same
        integers)."""
        return self.cast(self.random_uniform(n, key, counter, like) * float(1 << bits), "int32")

    def count_true_array(self, mask: Array) -> Array:
        """Number of true elements of the bool ``mask`` as a 0-d int64 array on the
        device (no host sync, unlike :meth:`count_true`)."""
        return self.sum(self.cast(mask, "int64"))

    def sorted_values_at(self, x: Array, positions: Array) -> Array:
        """``sort(x)[positions]``: the values at the int64 ``positions`` (a 1-D array on
        the device, each in ``[0, n)``) of 1-D ``x`` sorted ascending, NaN last. A
        backend may select them without sorting the whole array."""
        return self.gather(self.sort(x), positions)

    def sign_counts(self, x: Array) -> Array:
        """The 2-element int64 array of the elements of float ``x`` that are not at most
        0 (positive, and NaN) and of those below 0, on the device (no host sync)."""
        return self.concat([self.reshape(self.count_true_array(~(x <= 0)), (1,)),
                            self.reshape(self.count_true_array(x < 0), (1,))])

    def tail_sums(self, x: Array, top: Array, bottom: Array) -> tuple[Array, Array]:
        """The two tails of 1-D float ``x``: the upper one, the
        elements not below ``top`` (NaN among them), and the lower one, the elements at
        or below ``bottom`` (``top`` and ``bottom``: 1-element arrays of ``x``'s dtype).
        Returns the 2-element array of their :meth:`tree_sum` s, each taken over all
        ``n`` positions with +0.0 outside its tail, and the 2-element int64 array of
        their element counts, both on the device (no host sync)."""
        zero = self.zeros(1, self.dtype(x), x)  # broadcast
        upper, lower = ~(x < top), x <= bottom
        sums = self.concat([self.tree_sum(self.where(upper, x, zero)), self.tree_sum(self.where(lower, x, zero))])
        counts = self.concat([self.reshape(self.count_true_array(upper), (1,)),
                              self.reshape(self.count_true_array(lower), (1,))])
        return sums, counts

    def tail_codes(self, x: Array, top: Array, bottom: Array) -> Array:
        """The elements of 1-D float ``x`` in either tail of :meth:`tail_sums`, in
        ascending order of their index ``i``, as int64 codes: ``i`` for an element of the
        upper tail, ``-i - 1`` for one of the lower tail only."""
        upper = ~(x < top)
        idx = self.nonzero(upper | (x <= bottom))
        return self.where(self.gather(upper, idx), idx, -idx - 1)

    def tree_sum_in(self, x: Array, dtype: str) -> Array:
        """:meth:`tree_sum` of ``cast(x, dtype)`` (1-D float ``x``, a float ``dtype`` at
        least as wide): a float32 tensor's sum in float64 without a backend having to
        store its float64 copy."""
        return self.tree_sum(self.cast(x, dtype))

    # -- count-sketch kernels
    # The count sketch's hash puts element ``c`` of block ``q`` (blocks of ``width``
    # consecutive elements) in bucket ``(c + shift[q]) mod width``, negated where
    # ``negate[q]``: a rotation of each block. These two primitives are its sketch row and
    # its estimates; the defaults are vectorised (index arrays of the tensor's size), a
    # backend may work through them in cache-sized tiles.

    def mod(self, x: Array, m: int) -> Array:
        """``x mod m`` elementwise for a non-negative int32/int64 array ``x`` and a Python
        int ``m > 0`` (exact; the backend's own integer remainder)."""
        return x % m

    def rotated_block_sum(self, x: Array, width: int, shifts: Array, negate: Array) -> Array:
        """The ``width``-element signed sum of the rotated blocks of 1-D float ``x``.

        ``x`` is padded with +0.0 to ``B * width`` elements, ``B = len(shifts)`` (which
        must be ``ceil(n / width)``), and cut into ``B`` blocks; block ``q`` is rotated
        so that its element ``c`` lands at ``(c + shifts[q]) mod width``, and negated
        (sign bit flipped, padding included) where the bool ``negate[q]``. The blocks
        are added in a fixed pairwise order: while more than one is left, an odd count
        gets a +0.0 block appended, and block ``k`` of the first half is added to block
        ``k + half``. ``shifts``: int64 in ``[0, width)`` and ``negate``: bool, each a
        NumPy array (host values: the rotation is done with slices, no index arrays and
        no copy to a device) or, where they are computed inside ``tf.function``, an
        array of this backend. A NaN result's sign and
        payload are unspecified (a backend may add a negated block as a subtraction)."""
        n = self.numel(x)
        host = isinstance(shifts, np.ndarray)
        blocks = shifts.shape[0] if host else self.numel(shifts)
        if blocks * width > n:
            x = self.concat([x, self.zeros(blocks * width - n, self.dtype(x), x)])
        if host:  # slices: no index arrays, nothing copied to a device
            flipped = -x
            parts = []
            for q, (shift, neg) in enumerate(zip(shifts.tolist(), negate.tolist())):
                src, base = (flipped if neg else x), q * width
                if shift:  # the block's last `shift` elements come first
                    parts.append(src[base + width - shift:base + width])
                parts.append(src[base:base + width - shift])
            y = self.concat(parts)
        else:
            column = self.reshape(self.arange(width, x), (1, width))
            source = column - self.reshape(shifts, (blocks, 1))  # out[q, j] = block q at (j - shift) mod width
            source = self.where(source < 0, source + width, source)
            source = source + self.reshape(self.arange(blocks, x) * width, (blocks, 1))
            y = self.reshape(self.gather(x, self.reshape(source, (-1,))), (blocks, width))
            y = self.reshape(self.where(self.reshape(negate, (blocks, 1)), -y, y), (-1,))
        count = blocks
        while count > 1:
            if count % 2:
                y = self.concat([y, self.zeros(width, self.dtype(x), x)])
                count += 1
            count //= 2
            y = y[:count * width] + y[count * width:]
        return y

    def rotated_block_median(self, rows: Array, n: int, shifts: Array, negate: Array) -> Array:
        """Count-sketch estimates: ``n`` elements of ``rows``' float dtype, element
        ``i = q * width + c`` (block ``q``, offset ``c``) the median over the ``R`` rows
        ``r`` of ``rows[r, (c + shifts[r, q]) mod width]``, negated (sign bit flipped)
        where the bool ``negate[r, q]``: the inverse of :meth:`rotated_block_sum`'s
        placement, one row of ``shifts`` and ``negate`` (``(R, B)``, ``B = ceil(n /
        width)``; NumPy arrays or this backend's, as there) per row of the 2-D ``rows``
        ``(R, width)``.

        The median is selected by the comparator network of :func:`median_network` on
        the values ordered as IEEE 754's totalOrder (-inf < ... < -0.0 < +0.0 < ... <
        +inf: the bits as a sign-magnitude integer), with every NaN, negated or not,
        taken as the positive quiet NaN above +inf; so it is one of the values bit for
        bit (a NaN is that quiet NaN) whatever they hold. For an even ``R``, ``(a + b) *
        0.5`` of the two middle values."""
        r, width = self.shape(rows)
        host = isinstance(shifts, np.ndarray)
        blocks = shifts.shape[1] if host else self.shape(shifts)[1]
        dtype = self.dtype(rows)
        keys = order_keys(self, self.reshape(rows, (-1,)))
        inf_key, nan_key = (0x7F800000, 0x7FC00000) if dtype == "float32" else (0x7FF << 52, 0x7FF8 << 48)
        keys = self.where((keys > inf_key) | (keys < -1 - inf_key), keys * 0 + nan_key, keys)  # NaN: +qNaN
        flipped = self.where(keys > inf_key, keys, -1 - keys)  # the key of -v (-NaN is NaN too)
        column = self.reshape(self.arange(width, rows), (1, width))
        values = []
        for j in range(r):
            if host:  # slices: no index arrays, nothing copied to a device
                parts = []
                for shift, neg in zip(shifts[j].tolist(), negate[j].tolist()):
                    row = (flipped if neg else keys)[j * width:(j + 1) * width]
                    parts.append(row[shift:])  # element c reads (c + shift) mod width
                    if shift:
                        parts.append(row[:shift])
                values.append(self.concat(parts)[:n])
                continue
            source = column + self.reshape(shifts[j], (blocks, 1))
            source = self.where(source < width, source, source - width)
            source = self.reshape(source, (-1,))
            k = self.reshape(self.gather(keys[j * width:(j + 1) * width], source), (blocks, width))
            k_flipped = self.reshape(self.gather(flipped[j * width:(j + 1) * width], source), (blocks, width))
            values.append(self.reshape(self.where(self.reshape(negate[j], (blocks, 1)), k_flipped, k), (-1,))[:n])
        middle = run_median_network(values, self.minimum, lambda a, b: self.where(a < b, b, a))
        if len(middle) == 1:
            return from_order_keys(self, middle[0], dtype)
        return (from_order_keys(self, middle[0], dtype) + from_order_keys(self, middle[1], dtype)) * 0.5


def median_network(count: int) -> tuple[list[tuple[int, int, bool, bool]], tuple[int, ...]]:
    """The comparator network that :meth:`Ops.rotated_block_median` selects a median of
    ``count`` values with: ``(steps, middle)``. Each step ``(i, j, low, high)`` puts the
    lower of positions ``i < j`` at ``i`` (computed only if ``low``) and the higher at
    ``j`` (only if ``high``: outputs that no later step reads are skipped); ``middle``
    names the position of the median (two for an even count). Five values take
    Devillard's seven comparators (ten min/max, where a full sort takes twenty), three
    take three; other counts an odd-even transposition sort."""
    if count == 5:
        pairs = [(0, 1), (3, 4), (0, 3), (1, 4), (1, 2), (2, 3), (1, 2)]
        middle: tuple[int, ...] = (2,)
    elif count == 3:
        pairs, middle = [(0, 1), (1, 2), (0, 1)], (1,)
    else:
        pairs = [(i, i + 1) for rnd in range(count) for i in range(rnd % 2, count - 1, 2)]
        middle = (count // 2,) if count % 2 else (count // 2 - 1, count // 2)
    live = set(middle)
    steps = []
    for i, j in reversed(pairs):
        low, high = i in live, j in live
        if low or high:
            steps.append((i, j, low, high))
            live |= {i, j}
    return steps[::-1], middle


def run_median_network(values: list[Any], minimum: Any, maximum: Any) -> list[Any]:
    """The middle value(s) of :func:`median_network` run on ``values`` (a list, reordered
    in place), with ``minimum(a, b)`` and ``maximum(a, b)`` as its comparators: one
    value for an odd count, the two middle ones for an even count."""
    steps, middle = median_network(len(values))
    for i, j, low, high in steps:
        a, b = values[i], values[j]
        if low:
            values[i] = minimum(a, b)
        if high:
            values[j] = maximum(a, b)
    return [values[m] for m in middle]


def order_keys(ops: Ops, x: Array) -> Array:
    """Integers ordered as 1-D float32/float64 ``x`` is by IEEE 754's totalOrder (int32
    for float32, int64 for float64): the bits of a non-negative float, ``-1 - m`` for a
    negative one with magnitude bits ``m``. The key of ``-v`` is ``-1 - key(v)``."""
    itype, top = ("int32", 0x7FFFFFFF) if ops.dtype(x) == "float32" else ("int64", 0x7FFFFFFFFFFFFFFF)
    bits = ops.bitcast(x, itype)
    return ops.where(bits < 0, -1 - ops.bitwise_and(bits, top), bits)


def from_order_keys(ops: Ops, keys: Array, dtype: str) -> Array:
    """The floats of ``dtype`` (float32 or float64) whose :func:`order_keys` are ``keys``."""
    sign = -(1 << 31) if dtype == "float32" else -(1 << 63)
    return ops.bitcast(ops.where(keys < 0, ops.bitwise_or(-1 - keys, sign), keys), dtype)
