"""QSGD: stochastic quantization to a few levels per bucket."""

from __future__ import annotations

import math

from ..core import Compressor, TensorContext
from ..ops import Array, Ops
from ..payload import Payload, from_words, layout_nbytes, to_words, words_for
from ..registry import register


#: elements per chunk of a large tensor, so that temporaries stay a few MiB whatever its size
CHUNK_ELEMENTS = 1 << 20


def chunk_bounds(n: int, multiple: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the chunks of ``n`` elements: about :data:`CHUNK_ELEMENTS`
    each, every start a multiple of ``multiple``; one empty chunk for ``n = 0``."""
    step = max(multiple, CHUNK_ELEMENTS // multiple * multiple)
    return [(a, min(n, a + step)) for a in range(0, n, step)] or [(0, 0)]


class BucketedLevels:
    """Wire layout shared by methods that send one norm per bucket of ``bucket_size``
    elements, then a signed level in ``-levels..levels`` per element as a bit stream of
    ``ceil(log2(2 levels + 1))`` bits (QSGD, natural dithering)."""

    levels: int
    bucket_size: int

    @property
    def bits(self) -> int:
        """Bits per element: ``ceil(log2(2 levels + 1))``."""
        return math.ceil(math.log2(2 * self.levels + 1))

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
        n, d = ctx.numel, self.bucket_size
        buckets = -(-n // d)
        noise = ops.random_uniform(buckets * d, ctx.worker_key, ctx.step, x)
        norm_parts, word_parts = [], []
        # whole buckets per chunk, an even number of them and a multiple of 32 elements, so
        # the concatenated parts are the words of the whole tensor
        for start, stop in chunk_bounds(n, math.lcm(2 * d, 32)):
            size = -(-(stop - start) // d) * d
            whole = stop - start == n  # one chunk: no slices to make
            norms, words = self._encode(ops, x if whole else x[start:stop],
                                        noise if whole else noise[start:start + size], ctx)
            norm_parts.append(to_words(ops, norms))
            word_parts.append(words)
        return Payload.of(ops, ops.concat(norm_parts + word_parts))

    def _encode(self, ops: Ops, x: Array, noise: Array, ctx: TensorContext) -> tuple[Array, Array]:
        """``(norms, code words)`` of whole buckets of ``x`` (the last one may be short),
        with ``noise`` the draws of the padded buckets."""
        n, d, s = ops.numel(x), self.bucket_size, self.levels
        buckets = -(-n // d)
        padded = ops.concat([x, ops.zeros(buckets * d - n, ctx.dtype, x)]) if buckets * d != n else x
        noise = ops.reshape(ops.cast(noise, ctx.dtype), (buckets, d))
        norms, code = ops.bucket_levels(ops.reshape(padded, (buckets, d)), noise, s)
        return norms, ops.pack_uint(code[:n] if buckets * d != n else code, self.bits)

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        n, d, s = ctx.numel, self.bucket_size, self.levels
        buckets = -(-n // d)
        norm_words = words_for(ctx.dtype, buckets)
        norms = from_words(ops, buffer[:norm_words], ctx.dtype, buckets)
        parts = []
        for start, stop in chunk_bounds(n, math.lcm(2 * d, 32)):
            first = norm_words + start * self.bits // 32
            words = buffer[first:first + words_for("bool", (stop - start) * self.bits)]
            parts.append(self._decode(ops, words, norms[start // d:-(-stop // d)], stop - start, ctx))
        return parts[0] if len(parts) == 1 else ops.concat(parts)

    def _decode(self, ops: Ops, words: Array, norms: Array, n: int, ctx: TensorContext) -> Array:
        d, s = self.bucket_size, self.levels
        if self.bits <= 8:  # code c decodes to c - s: a 2**bits-entry table
            table = ops.cast(ops.arange(1 << self.bits, norms) - s, ctx.dtype)
            code = ops.take_fields(words, n, self.bits, table)
        else:
            code = ops.cast(ops.unpack_uint(words, n, self.bits), ctx.dtype) - s
        return ops.scale_buckets(code, norms / s, d)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return layout_nbytes(self._layout(numel, dtype))
