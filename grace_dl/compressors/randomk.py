"""Random-k sparsification with shared randomness."""

from __future__ import annotations

from ..core import Compressor, TensorContext, is_fresh
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

    def _draw(self, ops: Ops, like: Array, ctx: TensorContext) -> Array:
        idx = ops.random_choice(ctx.numel, k_for(self.ratio, ctx.numel), ctx.shared_key, ctx.step, like)
        ctx.scratch["randomk_indices"] = ((ctx.numel, ctx.shared_key, ctx.step), idx)
        return idx

    def _indices(self, ops: Ops, like: Array, ctx: TensorContext) -> Array:
        # drawn once per step: decompression (of the local payload and of the sum) and
        # the residual reuse the draw of compression, noted in ctx.scratch
        noted = ctx.scratch.get("randomk_indices")
        if noted is not None and noted[0] == (ctx.numel, ctx.shared_key, ctx.step):
            return noted[1]
        return self._draw(ops, like, ctx)

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        values = ops.gather(x, self._draw(ops, x, ctx))
        if self.rescale:
            values = values * (ctx.numel / k_for(self.ratio, ctx.numel))
        return Payload.of(ops, values)

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        return ops.scatter(ctx.numel, self._indices(ops, buffer, ctx), buffer)

    def residual(self, ops: Ops, x: Array, payload: Payload, ctx: TensorContext) -> Array:
        # x - decompress(payload) bit for bit, touching only the k sent elements
        return ops.index_subtract(x, self._indices(ops, x, ctx), payload.buffer, consume=is_fresh(ctx, x))

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return k_for(self.ratio, numel) * DTYPE_ITEMSIZE[dtype]
