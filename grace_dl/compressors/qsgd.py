"""QSGD: stochastic quantization to a few levels per bucket."""

from __future__ import annotations

from ..core import Compressor, TensorContext
from ..ops import Array, Ops
from ..ops.base import CHUNK_ELEMENTS, chunk_bounds, level_bits  # noqa: F401  (re-exported)
from ..payload import Payload, layout_nbytes
from ..registry import register


class BucketedLevels:
    """Wire layout shared by methods that send one norm per bucket of ``bucket_size``
    elements, then a signed level in ``-levels..levels`` per element as a bit stream of
    ``ceil(log2(2 levels + 1))`` bits (QSGD, natural dithering)."""

    levels: int
    bucket_size: int

    @property
    def bits(self) -> int:
        """Bits per element: ``ceil(log2(2 levels + 1))``."""
        return level_bits(self.levels)

    def _layout(self, numel: int, dtype: str) -> list[tuple[str, int]]:
        # the codes form a bit stream of numel * bits bits: the size of a bool part
        buckets = -(-numel // self.bucket_size)
        return [(dtype, buckets), ("bool", numel * self.bits)]


@register("compressor", "qsgd", paper="Alistarh et al. 2017, QSGD: Communication-Efficient SGD via "
          "Gradient Quantization and Encoding",
          summary="Unbiased stochastic rounding to `levels` levels of each bucket's L2 norm.")
class QSGD(BucketedLevels, Compressor):
    """Each bucket of ``bucket_size`` elements is sent as its L2 norm ``||v||`` and, per
    element, a sign and a level ``l in {0..s}`` (``s = levels``) drawn so that
    ``E[l] = s |v_i| / ||v||``; the receiver rebuilds ``||v|| sign(v_i) l / s``. Unbiased.

    Wire size: ``itemsize * ceil(n / bucket_size)`` bytes of norms plus
    ``4 * ceil(n * b / 32)`` bytes of codes, ``b = ceil(log2(2 s + 1))`` bits per
    element (sign and level in one offset code). Random draws are independent per
    worker, seeded by (seed, name, rank, step).

    Args:
        levels: quantization levels ``s`` per sign, >= 1 (default 127: 8 bits per
            element; GRACE's ``quantum_num``).
        bucket_size: elements sharing one norm, >= 1 (default 512, as in the paper's
            experiments).
    """

    memory = "none"
    communicator = "allgather"
    deterministic = False

    def __init__(self, levels: int = 127, bucket_size: int = 512):
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self.levels = int(levels)
        self.bucket_size = int(bucket_size)


    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        # draws, levels and packing in one primitive: a backend does them a block at a time
        return Payload.of(ops, ops.bucket_level_words(x, self.levels, self.bucket_size, ctx.worker_key, ctx.step))

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        return ops.bucket_level_values(buffer, ctx.numel, self.levels, self.bucket_size, ctx.dtype)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return layout_nbytes(self._layout(numel, dtype))
