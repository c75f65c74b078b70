"""Top-k sparsification."""

from __future__ import annotations

from ..core import Compressor, TensorContext, is_fresh
from ..ops import DTYPE_ITEMSIZE, Array, Ops
from ..payload import Payload, layout_nbytes, pack_words
from ..registry import register

MAX_INT32_INDEX = 2**31 - 1


def k_for(ratio: float, numel: int) -> int:
    """Elements kept for ``ratio``: ``max(1, floor(ratio * numel))`` (0 for an empty tensor)."""
    return min(numel, max(1, int(ratio * numel))) if numel else 0


def check_ratio(ratio: float) -> float:
    """``ratio`` if it lies in (0, 1], else ValueError."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return float(ratio)


def sparse_payload(ops: Ops, idx: Array, values: Array, numel: int) -> Payload:
    """Pack int32 indices followed by values into one buffer."""
    if numel > MAX_INT32_INDEX:
        raise ValueError(f"tensor of {numel} elements: indices do not fit int32")
    if DTYPE_ITEMSIZE[ops.dtype(values)] == 2:  # padded to whole words by pack_words
        return Payload.of(ops, pack_words(ops, [ops.cast(idx, "int32"), values]))
    # pack_words' layout for 4- and 8-byte values (whole words), without its per-part dispatch
    buffer = ops.concat([ops.cast(idx, "int32"), ops.bitcast(values, "int32")])
    return Payload(buffer, ops.length(buffer) * 4)


def sparse_unpack(ops: Ops, buffer: Array, dtype: str) -> tuple[Array, Array]:
    """(int64 indices, values) from a buffer made by :func:`sparse_payload`; the count
    follows from the buffer length (which may be known only at run time, inside
    ``tf.function``, for methods whose count depends on the data)."""
    words_per_pair = 1 + DTYPE_ITEMSIZE[dtype] // 4
    k = ops.length(buffer) // words_per_pair
    return ops.cast(buffer[:k], "int64"), ops.bitcast(buffer[k:], dtype)


def sparse_compress(ops: Ops, x: Array, idx: Array, ctx: TensorContext) -> Payload:
    """The payload sending the elements ``idx`` (ascending int64) of ``x``: the layout of
    :func:`sparse_payload`, packed by :meth:`~grace_dl.ops.Ops.pack_sparse` in one pass
    (no separate gather, cast and concatenation); the sent elements are noted with
    :func:`remember_sent`."""
    if ctx.numel > MAX_INT32_INDEX:
        raise ValueError(f"tensor of {ctx.numel} elements: indices do not fit int32")
    buffer = ops.pack_sparse(x, idx)
    k = ops.length(idx)
    # the values: a view of the buffer (torch cannot view an empty slice as a wider dtype)
    values = ops.zeros(0, ctx.dtype, x) if isinstance(k, int) and k == 0 else ops.bitcast(buffer[k:], ctx.dtype)
    remember_sent(ctx, x, idx, values)
    return Payload(buffer, ops.length(buffer) * 4)


def sent_elements(ops: Ops, x: Array, payload: Payload, ctx: TensorContext) -> tuple[Array, Array]:
    """(int64 indices, values) that ``payload``, compressed from ``x`` in this step,
    sends: what :func:`remember_sent` noted, else unpacked from the buffer."""
    noted = ctx.scratch.get("sparse_sent")
    if noted is not None and noted[0] is x:
        return noted[1], noted[2]
    return sparse_unpack(ops, payload.buffer, ctx.dtype)


def remember_sent(ctx: TensorContext, x: Array, idx: Array, values: Array) -> None:
    """Note in ``ctx.scratch`` which elements of ``x`` this step's payload sends (int64
    indices) and the values it sends for them, for :func:`sent_residual`."""
    ctx.scratch["sparse_sent"] = (x, idx, values)


def sent_residual(ops: Ops, x: Array, payload: Payload, ctx: TensorContext) -> Array:
    """``x - decompress(payload)`` bit for bit, for a sparse payload compressed from
    ``x`` (int32 indices and values, :func:`sparse_payload`, or what
    :func:`remember_sent` noted): a copy of ``x`` in which each sent element becomes
    itself minus the sent value (``x`` itself where the memory made it in this step,
    :func:`~grace_dl.core.is_fresh`). Touches ``k`` elements instead of building the
    dense decompression and subtracting it."""
    idx, values = sent_elements(ops, x, payload, ctx)
    return ops.index_subtract(x, idx, values, consume=is_fresh(ctx, x))


def sparse_decompress_sum(ops: Ops, buffers: list[Array], ctx: TensorContext, scale: float = 1.0) -> Array | None:
    """:meth:`~grace_dl.core.Compressor.decompress_sum` for sparse payloads (int32
    indices and values, :func:`sparse_payload`): one +0.0 array to which each worker's
    values are added at its indices in rank order, then times ``scale``
    (:meth:`~grace_dl.ops.Ops.scatter_sparse_sum`),
    instead of a dense decompression per worker and the sum of those. Equal to the dense
    sum bit for bit except that an element every worker sent as -0.0 sums to +0.0
    (-0.0 in the dense sum). None for a single buffer, where there is nothing to add
    (the dense path then keeps every bit)."""
    if len(buffers) < 2:
        return None
    return ops.scatter_sparse_sum(ctx.numel, buffers, ctx.dtype, scale)


@register("compressor", "topk", paper="Aji & Heafield 2017, Sparse Communication for Distributed "
          "Gradient Descent; Stich et al. 2018, Sparsified SGD with Memory",
          summary="Keep the k largest-magnitude elements; residual error feedback, allgather.")
class TopK(Compressor):
    """Keep the ``k = max(1, floor(ratio * n))`` elements of largest magnitude.

    Ties at the k-th magnitude go to the lowest indices, so every backend keeps the same
    set. Wire size: ``k * (4 + itemsize)`` bytes (int32 indices, then values in the
    compute dtype). A contraction (``||x - C(x)||^2 <= (1 - k/n) ||x||^2``), meant for
    residual error feedback over allgather.

    Args:
        ratio: fraction of elements kept, in (0, 1] (default 0.01).
    """

    bias = "contraction"
    memory = "residual"
    communicator = "allgather"

    def __init__(self, ratio: float = 0.01):
        self.ratio = check_ratio(ratio)

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        k = k_for(self.ratio, ctx.numel)
        return sparse_compress(ops, x, ops.topk_magnitude_indices(x, k), ctx)

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        return ops.scatter_sparse(ctx.numel, buffer, ctx.dtype)

    def decompress_sum(self, ops: Ops, buffers: list[Array], sent: Array, ctx: TensorContext,
                       scale: float = 1.0) -> Array | None:
        return sparse_decompress_sum(ops, buffers, ctx, scale)

    def residual(self, ops: Ops, x: Array, payload: Payload, ctx: TensorContext) -> Array:
        return sent_residual(ops, x, payload, ctx)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        k = k_for(self.ratio, numel)
        return layout_nbytes([("int32", k), (dtype, k)])
