"""Random-k sparsification with shared randomness."""

from __future__ import annotations

from ..core import Compressor, TensorContext
from ..ops import DTYPE_ITEMSIZE, Array, Ops
from ..payload import Payload
from ..registry import register
from .topk import check_ratio, k_for


@register("compressor", "randomk", paper="Stich et al. 2018, Sparsified SGD with Memory; "
          "Wangni et al. 2018, Gradient Sparsification for Communication-Efficient Distributed Optimization",
          summary="k random elements, the same on every worker (shared seed); values only, over allreduce.")
class RandomK(Compressor):
    """Keep ``k = max(1, floor(ratio * n))`` elements chosen uniformly at random.

    Every worker draws the same indices from (seed, tensor name, step), so only the
    values travel and payloads are summable: one allreduce of ``k * itemsize`` bytes.

    Args:
        ratio: fraction of elements kept, in (0, 1] (default 0.01).
        rescale: multiply kept values by ``n / k`` so that the method is unbiased
            (default False: a contraction in expectation, for residual error feedback).
    """

    summable = True
    memory = "residual"
    communicator = "allreduce"
    deterministic = False

    def __init__(self, ratio: float = 0.01, rescale: bool = False):
        self.ratio = check_ratio(ratio)
        self.rescale = bool(rescale)
        self.bias = "unbiased" if self.rescale else "contraction"

    def _indices(self, ops: Ops, like: Array, ctx: TensorContext) -> Array:
        k = k_for(self.ratio, ctx.numel)
        return ops.random_choice(ctx.numel, k, ctx.shared_key, ctx.step, like)

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        values = ops.gather(x, self._indices(ops, x, ctx))
        if self.rescale:
            values = values * (ctx.numel / k_for(self.ratio, ctx.numel))
        return Payload.of(ops, values)

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        return ops.scatter(ctx.numel, self._indices(ops, buffer, ctx), buffer)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return k_for(self.ratio, numel) * DTYPE_ITEMSIZE[dtype]
