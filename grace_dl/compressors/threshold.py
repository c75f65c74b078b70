"""Threshold sparsification: send the elements whose magnitude reaches a threshold,
however many they are.

Four methods share this module's helpers: ``threshold`` (a fixed threshold),
``adaptive_threshold`` (separate positive and negative thresholds for a fixed
fraction), ``dgc`` (a threshold estimated on a sample, in :mod:`.dgc`) and ``sidco``
(a threshold from a fitted distribution, in :mod:`.sidco`).

Their payload size depends on the data, so :meth:`~grace_dl.core.Compressor.payload_nbytes`
returns None. Convention of this module: such a compressor also has
``payload_nbytes_for(count, numel, dtype)``, the exact size when ``count`` elements
were sent. Each of them sends only non-zero values, so ``count`` is the number of
non-zero elements of the local decompression (a NaN counts as non-zero).

Selection never branches in Python on tensor values: the selected indices are a
data-dependent :meth:`~grace_dl.ops.Ops.nonzero` (a host sync on torch, a run-time
length inside ``tf.function``), and every other size is known before running.

Non-finite elements: a NaN ranks as +inf, so NaN and Inf elements always pass a
threshold and reach the aggregate, where a loss scaler sees them; the residual memory
then keeps its previous state (see :class:`~grace_dl.memories.ResidualMemory`).
"""

from __future__ import annotations

import math

from ..core import Compressor, TensorContext
from ..ops import DTYPE_ITEMSIZE, Array, Ops
from ..payload import Payload, layout_nbytes, pack_words
from ..registry import register
from .topk import MAX_INT32_INDEX, check_ratio, sent_residual, sparse_compress, sparse_decompress_sum


#: from this many elements on, the fixed threshold packs its selection in one primitive
#: (Ops.pack_magnitude_at_least) rather than keeping int64 indices for the residual
#: memory: a dense selection's indices are then twice the tensor (peak extra memory at
#: 1e8 elements: 3.99x -> 2.01x). Below it, the noted indices spare the residual step
#: from reading them back out of the payload.
PACKED_SELECTION_MIN = 1 << 22


def magnitudes(ops: Ops, x: Array, dtype: str) -> Array:
    """``|x|`` with NaN as +inf, so that NaN and Inf elements pass any threshold."""
    return ops.where(x != x, ops.zeros(1, dtype, x) + math.inf, ops.abs(x))  # +inf broadcast


def at_least_one(ops: Ops, count: Array) -> Array:
    """``count`` with 0 replaced by 1 (a divisor for a mean over possibly no elements)."""
    return ops.where(count > 0, count, count * 0 + 1)


class ThresholdSparsifier(Compressor):
    """Shared wire format of the threshold sparsifiers: the ``count`` selected indices
    as int32, then their exact values in the compute dtype (the layout of
    :func:`~grace_dl.compressors.topk.sparse_payload`): ``count * (4 + itemsize)``
    bytes, ``count`` depending on the data.

    Subclasses implement :meth:`_select`, which returns the ascending int64 indices to
    send; a selected value must be non-zero (see the module's convention).
    """

    summable = False
    bias = "biased"
    memory = "residual"
    communicator = "allgather"
    deterministic = True

    def _select(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        raise NotImplementedError

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        return sparse_compress(ops, x, self._select(ops, x, ctx), ctx)

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        return ops.scatter_sparse(ctx.numel, buffer, ctx.dtype)

    def decompress_sum(self, ops: Ops, buffers: list[Array], sent: Array, ctx: TensorContext,
                       scale: float = 1.0) -> Array | None:
        return sparse_decompress_sum(ops, buffers, ctx, scale)

    def residual(self, ops: Ops, x: Array, payload: Payload, ctx: TensorContext) -> Array:
        return sent_residual(ops, x, payload, ctx)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> None:
        return None  # depends on the data: see payload_nbytes_for

    def payload_nbytes_for(self, count: int, numel: int, dtype: str = "float32") -> int:
        """The exact payload size when ``count`` of the ``numel`` elements are sent:
        ``count * (4 + itemsize)`` bytes."""
        return layout_nbytes([("int32", count), (dtype, count)])


@register("compressor", "threshold", paper="Strom 2015, Scalable Distributed DNN Training Using "
          "Commodity GPU Cloud Computing",
          summary="Send every element whose magnitude reaches a fixed threshold; residual memory, allgather.")
class Threshold(ThresholdSparsifier):
    """Send the elements with ``|x| >= threshold``, as int32 indices and their values;
    the residual memory carries the rest to the next step (Strom 2015).

    Strom quantizes each sent element to ``+-threshold`` (its sign and a 31-bit index
    in one 32-bit word); like GRACE, this sends the exact values instead, so that the
    residual holds only what was not sent.

    Wire size: ``count * (4 + itemsize)`` bytes, ``count`` the number of elements at or
    above the threshold (data-dependent: :meth:`payload_nbytes` is None and
    :meth:`payload_nbytes_for` gives the size for a count). NaN and Inf elements are
    always sent. Biased: ``||x - C(x)|| <= ||x||``, with nothing sent when every
    ``|x| < threshold``; residual memory, allgather.

    Args:
        threshold: the magnitude an element must reach, finite and > 0 (default 0.01),
            compared in the compute dtype.
    """

    def __init__(self, threshold: float = 0.01):
        if not 0.0 < threshold < math.inf:
            raise ValueError(f"threshold must be a finite number > 0, got {threshold}")
        self.threshold = float(threshold)

    def _select(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        level = ops.zeros(1, ctx.dtype, x) + self.threshold  # rounded to the compute dtype
        # "not below" is true for NaN: the set of magnitudes(x) >= level, without
        # building the NaN-safe magnitudes (level > 0, so no zero is selected)
        return ops.nonzero_magnitude_at_least(x, level)

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        if ctx.numel < PACKED_SELECTION_MIN:
            return super().compress(ops, x, ctx)
        if ctx.numel > MAX_INT32_INDEX:
            raise ValueError(f"tensor of {ctx.numel} elements: indices do not fit int32")
        # _select's elements packed in one primitive: at the default threshold a normal
        # tensor sends ~99% of its elements, and their int64 indices alone would be twice
        # its size (the residual memory reads the sent elements back from the payload)
        buffer = ops.pack_magnitude_at_least(x, ops.zeros(1, ctx.dtype, x) + self.threshold)
        return Payload(buffer, ops.length(buffer) * 4)


@register("compressor", "adaptive_threshold", paper="Dryden et al. 2016, Communication Quantization "
          "for Data-parallel Training of Deep Neural Networks",
          summary="A fixed fraction of the positive and of the negative elements, each side sent as "
                  "indices and rebuilt by its mean; residual memory, allgather.")
class AdaptiveThreshold(Compressor):
    """Adaptive quantization (Dryden et al. 2016): of the positive elements, the
    ``ratio`` fraction with the largest values is sent, and likewise, separately, of
    the negative elements with the largest magnitudes; each side is reconstructed as the
    mean of its sent values. The two thresholds thus adapt to the data so that a fixed
    proportion is sent, and what was not sent (or was rounded to the mean) goes to the
    residual memory.

    Reading of the paper (and of its LBANN implementation): the proportion applies to
    each sign separately, ``k+ = floor(ratio * #positives)`` and
    ``k- = floor(ratio * #negatives)``, about ``ratio * n`` in all; here each non-empty
    side keeps at least one element (the floor alone would send nothing from a tensor
    of fewer than ``1/ratio`` elements). Elements tied with a side's threshold are all
    sent and enter its mean. Zeros belong to neither side and are never sent; a NaN
    counts as a positive element of infinite value (always sent, its side's mean NaN).
    The thresholds come from one sort of the tensor, so no size depends on a host sync.

    Wire format: the two means in the compute dtype, then one int32 per sent element,
    its index ``i`` for a positive element and ``-i - 1`` for a negative one (the sign
    rides in the index, as in the paper's 32-bit words). Wire size:
    ``2 * itemsize + 4 * count`` bytes (data-dependent: :meth:`payload_nbytes` is None
    and :meth:`payload_nbytes_for` gives the size for a count).

    Biased: ``||x - C(x)||^2 = ||x||^2 - k+ mean+^2 - k- mean-^2``; residual memory,
    allgather.

    Args:
        ratio: fraction of each sign's elements sent, in (0, 1] (default 0.01).
    """

    summable = False
    bias = "biased"
    memory = "residual"
    communicator = "allgather"
    deterministic = True

    def __init__(self, ratio: float = 0.01):
        self.ratio = check_ratio(ratio)

    def _keep(self, ops: Ops, count: Array) -> Array:
        """How many of ``count`` elements of one side to send: ``floor(ratio * count)``,
        at least one when the side is not empty (int64, on the device)."""
        c = ops.cast(count, "float64")
        k = ops.floor(c * self.ratio)
        return ops.cast(ops.where((k < 1) & (c >= 1), k * 0 + 1, k), "int64")

    def _bounds(self, ops: Ops, x: Array, ctx: TensorContext) -> tuple[Array, Array]:
        """The tails to send: (top, bottom), the upper tail the elements not below top,
        the lower one those at or below bottom (see :meth:`Ops.tail_sums`)."""
        # a NaN ranks as +inf: it is positive ("not at most 0") and, sorted last, reads
        # as NaN where +inf would; "not below" a bound is true for it
        n = ctx.numel
        sides = ops.sign_counts(x)
        k_pos, k_neg = self._keep(ops, sides[0]), self._keep(ops, sides[1])
        # the k+-th largest value and the k--th smallest one of the sorted tensor
        # (negatives first, then zeros, then positives; an empty side reads a valid position)
        bounds = ops.sorted_values_at(x, ops.concat([ops.reshape(n - at_least_one(ops, k_pos), (1,)),
                                                      ops.reshape(at_least_one(ops, k_neg) - 1, (1,))]))
        inf = ops.zeros(1, ctx.dtype, x) + math.inf
        bounds = ops.where(bounds != bounds, inf, bounds)  # a NaN read is the rank of +inf
        # a non-empty side's bound has its sign, so "at or past the bound" implies the side;
        # an empty side gets a bound no element passes (it has no +-inf or NaN, being empty)
        return ops.where(k_pos > 0, bounds[0:1], inf), ops.where(k_neg > 0, bounds[1:2], -inf)

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        if ctx.numel > MAX_INT32_INDEX:
            raise ValueError(f"tensor of {ctx.numel} elements: indices do not fit int32")
        top, bottom = self._bounds(ops, x, ctx)
        # each side's mean: its sum in the fixed order over all positions, divided by its count
        sums, counts = ops.tail_sums(x, top, bottom)
        means = sums / at_least_one(ops, ops.cast(counts, ctx.dtype))
        codes = ops.tail_codes(x, top, bottom)
        return Payload.of(ops, pack_words(ops, [means, ops.cast(codes, "int32")]))

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        head = 2 * DTYPE_ITEMSIZE[ctx.dtype] // 4
        means = ops.bitcast(buffer[:head], ctx.dtype)
        codes = ops.cast(buffer[head:], "int64")
        positive = codes >= 0
        idx = ops.where(positive, codes, -codes - 1)
        return ops.scatter(ctx.numel, idx, ops.where(positive, means[0:1], means[1:2]))

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> None:
        return None  # depends on the data: see payload_nbytes_for

    def payload_nbytes_for(self, count: int, numel: int, dtype: str = "float32") -> int:
        """The exact payload size when ``count`` of the ``numel`` elements are sent:
        ``2 * itemsize + 4 * count`` bytes."""
        return layout_nbytes([(dtype, 2), ("int32", count)])
