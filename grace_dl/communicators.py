"""Communicators: how payloads travel (allreduce, allgather, broadcast) and how the
decompressed tensors are aggregated (mean, sum or majority vote)."""

from __future__ import annotations

from .core import Collective, Communicator, Compressor, TensorContext, mean_factor
from .ops import Ops
from .payload import Payload
from .registry import register


@register("communicator", "allreduce",
          summary="Sum the payloads with one allreduce (summable compressors only), then decompress once.")
class Allreduce(Communicator):
    """Allreduce of summable payloads.

    Args:
        aggregate: ``"mean"`` (default), ``"sum"``, or ``"majority"`` (sign of the sum,
            for sign compressors).
    """

    requires_summable = True

    def exchange(self, ops: Ops, payload: Payload, compressor: Compressor, ctx: TensorContext):
        (summed,) = yield [Collective("allreduce", payload.buffer)]
        dense = compressor.decompress(ops, summed, ctx)
        if self.aggregate == "majority":
            return ops.sign(dense)
        if self.aggregate == "mean":
            return dense * mean_factor(ctx.world_size)
        return dense


def _fixed_size(compressor: Compressor, ctx: TensorContext) -> bool:
    """Whether every worker's payload has the same, known length."""
    return compressor.payload_nbytes(ctx.numel, ctx.dtype, ctx.in_dtype) is not None


@register("communicator", "allgather",
          summary="Gather every worker's payload (sizes may differ), decompress each and aggregate.")
class Allgather(Communicator):
    """Allgather of payloads of any size.

    Args:
        aggregate: ``"mean"`` (default), ``"sum"``, or ``"majority"`` (sign of the sum
            of the workers' signs: signSGD's majority vote).
    """

    def exchange(self, ops: Ops, payload: Payload, compressor: Compressor, ctx: TensorContext):
        equal = _fixed_size(compressor, ctx)
        (buffers,) = yield [Collective("allgather", payload.buffer, equal_sizes=equal)]
        return self._combine_buffers(ops, compressor, buffers, payload.buffer, ctx)


@register("communicator", "broadcast",
          summary="Each worker broadcasts its payload in turn (GRACE's broadcast communicator).")
class Broadcast(Communicator):
    """One broadcast per worker, rooted at that worker: the traffic of an allgather,
    for transports or networks where broadcasts are the better primitive.

    Args:
        aggregate: ``"mean"`` (default), ``"sum"``, or ``"majority"``.
    """

    def exchange(self, ops: Ops, payload: Payload, compressor: Compressor, ctx: TensorContext):
        if _fixed_size(compressor, ctx):
            lengths = [ops.numel(payload.buffer)] * ctx.world_size
        else:
            # receivers must know each root's length before posting their buffers; a length
            # is an int, or a symbolic tensor inside tf.function (known when the graph runs),
            # and a received one a 0-d array that ops.zeros reads
            mine = ops.zeros(1, "int64", payload.buffer) + ops.length(payload.buffer)
            (gathered,) = yield [Collective("allgather", mine, tag="sizes")]
            lengths = [g[0] for g in gathered]
        dtype = ops.dtype(payload.buffer)
        buffers = yield [
            Collective("broadcast", payload.buffer if root == ctx.rank else ops.zeros(lengths[root], dtype,
                                                                                      payload.buffer),
                       tag=f"root{root}", root=root)
            for root in range(ctx.world_size)
        ]
        return self._combine_buffers(ops, compressor, buffers, payload.buffer, ctx)
