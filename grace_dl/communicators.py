"""Communicators: how payloads travel (allreduce, allgather, broadcast) and how the
decompressed tensors are aggregated (mean, sum or majority vote)."""

from __future__ import annotations

import numpy as np

from .core import Communicator, Compressor, Exchange, TensorContext, mean_factor, traffic_for
from .ops import DTYPE_ITEMSIZE, Ops
from .payload import Payload
from .registry import register
from .transport.base import Transport


def _nbytes(ops: Ops, buf) -> int:
    return ops.numel(buf) * DTYPE_ITEMSIZE[ops.dtype(buf)]


def _collective_name(ctx: TensorContext) -> str:
    return f"grace.{ctx.name}"


@register("communicator", "allreduce",
          summary="Sum the payloads with one allreduce (summable compressors only), then decompress once.")
class Allreduce(Communicator):
    """Allreduce of summable payloads.

    Args:
        aggregate: ``"mean"`` (default), ``"sum"``, or ``"majority"`` (sign of the sum,
            for sign compressors).
    """

    requires_summable = True

    def start(self, ops, transport, payload: Payload, compressor, ctx) -> Exchange:
        handle = transport.allreduce_async(payload.buffer, _collective_name(ctx))
        return Exchange(handle, payload.nbytes, "allreduce")

    def finish(self, ops, transport, exchange, compressor, ctx):
        summed = transport.wait(exchange.handle)
        dense = compressor.decompress(ops, summed, ctx)
        if self.aggregate == "majority":
            dense = ops.sign(dense)
        elif self.aggregate == "mean":
            dense = dense * mean_factor(ctx.world_size)
        sent, received = traffic_for("allreduce", exchange.payload_nbytes, None, ctx.rank, ctx.world_size, True)
        return dense, sent, received


@register("communicator", "allgather",
          summary="Gather every worker's payload (sizes may differ), decompress each and aggregate.")
class Allgather(Communicator):
    """Allgather of payloads of any size.

    Args:
        aggregate: ``"mean"`` (default), ``"sum"``, or ``"majority"`` (sign of the sum
            of the workers' signs: signSGD's majority vote).
    """

    def start(self, ops, transport, payload, compressor, ctx) -> Exchange:
        equal = compressor.payload_nbytes(ctx.numel, ctx.dtype, ctx.in_dtype) is not None
        handle = transport.allgather_async(payload.buffer, _collective_name(ctx), equal_sizes=equal)
        return Exchange((handle, equal), payload.nbytes, "allgather")

    def finish(self, ops, transport, exchange, compressor, ctx):
        handle, equal = exchange.handle
        buffers = transport.wait(handle)
        dense = [compressor.decompress(ops, b, ctx) for b in buffers]
        sizes = [_nbytes(ops, b) for b in buffers]
        sent, received = traffic_for("allgather", exchange.payload_nbytes, sizes, ctx.rank, ctx.world_size, equal)
        return self._combine(ops, dense, ctx.world_size), sent, received


@register("communicator", "broadcast",
          summary="Each worker broadcasts its payload in turn (GRACE's broadcast communicator).")
class Broadcast(Communicator):
    """One broadcast per worker, rooted at that worker: the traffic of an allgather,
    for transports or networks where broadcasts are the better primitive.

    Args:
        aggregate: ``"mean"`` (default), ``"sum"``, or ``"majority"``.
    """

    def start(self, ops, transport: Transport, payload, compressor: Compressor, ctx) -> Exchange:
        name = _collective_name(ctx)
        equal = compressor.payload_nbytes(ctx.numel, ctx.dtype, ctx.in_dtype) is not None
        n = ops.numel(payload.buffer)
        if equal:
            lengths = [n] * ctx.world_size
        else:
            # receivers must know each root's length before posting their buffers
            mine = ops.from_numpy(np.array([n], dtype=np.int64), payload.buffer)
            gathered = transport.wait(transport.allgather_async(mine, name + ".sizes", equal_sizes=True))
            lengths = [int(ops.item(g[0])) for g in gathered]
        dtype = ops.dtype(payload.buffer)
        handles = []
        for root in range(ctx.world_size):
            buf = payload.buffer if root == ctx.rank else ops.zeros(lengths[root], dtype, payload.buffer)
            handles.append(transport.broadcast_async(buf, root, f"{name}.root{root}"))
        return Exchange((handles, equal), payload.nbytes, "broadcast")

    def finish(self, ops, transport, exchange, compressor, ctx):
        handles, equal = exchange.handle
        buffers = [transport.wait(h) for h in handles]
        dense = [compressor.decompress(ops, b, ctx) for b in buffers]
        sizes = [_nbytes(ops, b) for b in buffers]
        sent, received = traffic_for("broadcast", exchange.payload_nbytes, sizes, ctx.rank, ctx.world_size, equal)
        return self._combine(ops, dense, ctx.world_size), sent, received
