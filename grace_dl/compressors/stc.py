"""Sparse ternary and sparse binary compression (Sattler et al.): top-k positions with
one shared magnitude."""

from __future__ import annotations

from ..core import Compressor, TensorContext
from ..ops import Array, Ops
from ..payload import Payload, layout_nbytes, pack_words, unpack_words, words_for
from ..registry import register
from .sign import pairwise_sum
from .topk import MAX_INT32_INDEX, check_ratio, k_for


def position_bits(numel: int) -> int:
    """Bits of one position in ``[0, numel)``: ``ceil(log2 numel)``, at least 1."""
    return max(1, (numel - 1).bit_length())


def unpack_positions(ops: Ops, buffer: Array, k: int, numel: int) -> tuple[Array, Array]:
    """(int64 positions, the rest of the buffer) from a buffer that starts with ``k``
    positions packed by ``ops.pack_uint(idx, position_bits(numel))``."""
    bits = position_bits(numel)
    words = words_for("bool", k * bits)
    return ops.unpack_uint(buffer[:words], k, bits), buffer[words:]


def _check_numel(numel: int) -> None:
    if numel > MAX_INT32_INDEX:
        raise ValueError(f"tensor of {numel} elements: positions do not fit 31 bits")


@register("compressor", "stc", paper="Sattler et al. 2019, Robust and Communication-Efficient Federated "
          "Learning from Non-IID Data (sparse ternary compression)",
          summary="Top-k positions, each with a sign bit, and one mean magnitude: residual error feedback, "
                  "allgather.")
class STC(Compressor):
    """Sparse ternary compression (Sattler et al. 2019): keep the
    ``k = max(1, floor(ratio * n))`` elements of largest magnitude (ties to the lower
    index) and replace each by ``sign(x_i) * mu``, where ``mu`` is the mean magnitude
    of the kept elements; everything else is zero.

    Wire format: the ``k`` positions as ``b = ceil(log2 n)`` (at least 1) bit unsigned
    integers packed into one bit stream (:meth:`Ops.pack_uint`), then ``k`` sign bits
    (set where ``x_i >= 0``), then ``mu`` in the compute dtype::

        bytes = 4 * ceil(k * b / 32) + 4 * ceil(k / 32) + 4 * ceil(itemsize / 4)

    The paper encodes the gaps between positions with Golomb codes (about
    ``log2(1/ratio) + 1.5`` bits per position instead of ``b``); those have a
    data-dependent length and need a prefix sum to place, so positions are sent at the
    fixed width ``b``, which is already below int32 (20 bits at one million elements).

    A contraction: ``||x - C(x)||^2 = ||x||^2 - k * mu^2 <= (1 - 1/n) ||x||^2``. Meant for
    residual error feedback over allgather. A zero tensor decompresses to zero. NaN ranks
    as the largest magnitude, so it is kept, ``mu`` becomes NaN and every kept element
    decompresses to NaN (the residual memory then keeps its previous state). ``mu`` is
    summed in a fixed pairwise order, so payloads are bit-identical on every backend.

    Args:
        ratio: fraction of elements kept, in (0, 1] (default 0.01).
    """

    bias = "contraction"
    memory = "residual"
    communicator = "allgather"
    deterministic = True

    def __init__(self, ratio: float = 0.01):
        self.ratio = check_ratio(ratio)

    def _layout(self, numel: int, dtype: str) -> list[tuple[str, int]]:
        k = k_for(self.ratio, numel)
        return [("bool", k * position_bits(numel)), ("bool", k), (dtype, 1)]

    def _tail_layout(self, numel: int, dtype: str) -> list[tuple[str, int]]:
        return [("bool", k_for(self.ratio, numel)), (dtype, 1)]

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        _check_numel(ctx.numel)
        k = k_for(self.ratio, ctx.numel)
        idx = ops.topk_magnitude_indices(x, k)  # the set of topk_indices(abs(x), k)
        kept = ops.gather(x, idx)
        mu = pairwise_sum(ops, ops.abs(kept), ctx.dtype) * (1.0 / k)
        positions = ops.pack_uint(idx, position_bits(ctx.numel))
        return Payload.of(ops, ops.concat([positions, pack_words(ops, [kept >= 0, mu])]))

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        k = k_for(self.ratio, ctx.numel)
        idx, rest = unpack_positions(ops, buffer, k, ctx.numel)
        signs, mu = unpack_words(ops, rest, self._tail_layout(ctx.numel, ctx.dtype))
        zeros = ops.zeros(k, ctx.dtype, mu)
        return ops.scatter(ctx.numel, idx, ops.where(signs, zeros + mu, zeros - mu))

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return layout_nbytes(self._layout(numel, dtype))


@register("compressor", "sbc", paper="Sattler et al. 2018, Sparse Binary Compression: Towards Distributed "
          "Deep Learning with minimal Communication",
          summary="Top-k positives or top-k negatives, whichever has the larger mean: positions and one mean, "
                  "residual error feedback, allgather.")
class SBC(Compressor):
    """Sparse binary compression (Sattler et al. 2018): take the ``k`` largest elements
    (``k = max(1, floor(ratio * n))``) and the ``k`` smallest (most negative), with their
    means ``mu+`` and ``mu-``; if ``mu+ >= -mu-`` send the positions of the largest with
    ``mu+``, else those of the smallest with ``mu-``. Every sent position decompresses to
    that one mean, everything else to zero (ties in value go to the lower index).

    Wire format: ``k`` positions of ``b = ceil(log2 n)`` (at least 1) bits packed into
    one bit stream, then the signed mean in the compute dtype::

        bytes = 4 * ceil(k * b / 32) + 4 * ceil(itemsize / 4)

    (the paper adds Golomb coding of the position gaps; see ``stc`` for why the
    positions are sent at fixed width here).

    ``||x - C(x)||^2 = ||x||^2 - k * mu^2``: a contraction whenever ``k < n`` (then
    ``mu = 0`` only for a zero tensor), meant for residual error feedback over allgather.
    Where fewer than ``k`` elements have the chosen sign, the others among the ``k`` are
    sent with the mean as well; the residual carries the difference. NaN ranks as +inf
    on both sides, so it is sent and the mean becomes NaN (the residual memory keeps its
    previous state). Means are summed in a fixed pairwise order (bit-identical on every
    backend).

    Args:
        ratio: fraction of elements sent, in (0, 1] (default 0.01).
    """

    bias = "contraction"
    memory = "residual"
    communicator = "allgather"
    deterministic = True

    def __init__(self, ratio: float = 0.01):
        self.ratio = check_ratio(ratio)

    def _layout(self, numel: int, dtype: str) -> list[tuple[str, int]]:
        return [("bool", k_for(self.ratio, numel) * position_bits(numel)), (dtype, 1)]

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        _check_numel(ctx.numel)
        k = k_for(self.ratio, ctx.numel)
        top = ops.topk_indices(x, k)
        bottom = ops.topk_indices(-x, k)
        mu_pos = pairwise_sum(ops, ops.gather(x, top), ctx.dtype) * (1.0 / k)
        mu_neg = pairwise_sum(ops, ops.gather(x, bottom), ctx.dtype) * (1.0 / k)
        positive = mu_pos >= -mu_neg
        idx = ops.where(positive, top, bottom)
        mu = ops.where(positive, mu_pos, mu_neg)
        positions = ops.pack_uint(idx, position_bits(ctx.numel))
        return Payload.of(ops, ops.concat([positions, pack_words(ops, [mu])]))

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        k = k_for(self.ratio, ctx.numel)
        idx, rest = unpack_positions(ops, buffer, k, ctx.numel)
        (mu,) = unpack_words(ops, rest, [(ctx.dtype, 1)])
        return ops.scatter(ctx.numel, idx, ops.zeros(k, ctx.dtype, mu) + mu)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return layout_nbytes(self._layout(numel, dtype))
