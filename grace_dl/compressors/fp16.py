"""Half-precision cast."""

from __future__ import annotations

from ..core import Compressor, TensorContext
from ..ops import Array, Ops
from ..payload import Payload
from ..registry import register


@register("compressor", "fp16", paper="Micikevicius et al. 2018, Mixed Precision Training (IEEE binary16)",
          summary="Cast to IEEE float16; summable over allreduce.")
class FP16(Compressor):
    """Cast to float16 for the wire and back to the compute dtype after.

    Wire size: ``2 n`` bytes. Summable (allreduce adds in float16, so a sum of
    ``world_size`` values beyond 65504 overflows to inf, as Horovod's own fp16
    compression does), deterministic. Biased only by rounding to nearest: relative error
    at most 2**-11 for normal float16 values, magnitudes beyond 65504 become inf.
    """

    summable = True
    bias = "biased"
    communicator = "allreduce"

    def __init__(self) -> None:
        pass

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        return Payload.of(ops, ops.cast(x, "float16"))

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        return ops.cast(buffer, ctx.dtype)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return 2 * numel
