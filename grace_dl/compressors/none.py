"""No compression: the baseline."""

from __future__ import annotations

from ..core import Compressor, TensorContext
from ..ops import DTYPE_ITEMSIZE, Array, Ops
from ..payload import Payload
from ..registry import register


@register("compressor", "none", summary="No compression: the dense gradient in its own dtype.")
class NoCompression(Compressor):
    """Sends the gradient unchanged, in the dtype the framework produced it in.

    Wire size: ``itemsize(dtype) * n`` bytes. Summable, unbiased, deterministic.
    """

    summable = True
    bias = "unbiased"
    communicator = "allreduce"

    def __init__(self) -> None:
        pass

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        buf = ops.cast(x, ctx.in_dtype) if ctx.in_dtype != ctx.dtype else x
        return Payload.of(ops, buf)

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        return ops.cast(buffer, ctx.dtype) if ops.dtype(buffer) != ctx.dtype else buffer

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return numel * DTYPE_ITEMSIZE[in_dtype or dtype]
