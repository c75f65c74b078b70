"""Natural compression and natural dithering (Horvath et al. 2019): unbiased stochastic
rounding to powers of two.

Both work on the bits of the float (bitcast to an integer) rather than with logarithms,
so the rounding decisions are exact: a float ``(1 + f) 2**e`` (``f`` its mantissa
fraction) lies between the powers ``2**e`` and ``2**(e+1)``, and rounding up with
probability exactly ``f`` is unbiased.
"""

from __future__ import annotations

import math

from ..core import Compressor, TensorContext
from ..ops import DTYPE_ITEMSIZE, Array, Ops
from ..payload import Payload, from_words, layout_nbytes, to_words, words_for
from ..registry import register
from ..ops.base import chunk_bounds
from .qsgd import BucketedLevels

# compute dtype -> (integer dtype of its bits, mantissa bits, exponent bits)
_FORMATS = {"float32": ("int32", 23, 8), "float64": ("int64", 52, 11)}
_UNIFORM_BITS = 23  # every backend's float32 uniform draws are multiples of 2**-23 or finer


def _format(dtype: str) -> tuple[str, int, int]:
    try:
        return _FORMATS[dtype]
    except KeyError:
        raise TypeError(f"natural compression works on float32 or float64, got {dtype}") from None


def canonical_nan(ops: Ops, x: Array) -> Array:
    """``x`` (float32 or float64) with every NaN replaced by the positive quiet NaN: the
    sign of a NaN made by arithmetic (``0 * inf``) differs between CPUs, GPUs and
    TensorFlow's eager and graph modes, and payloads should not."""
    itype, mbits, ebits = _format(ops.dtype(x))
    bits = ops.zeros(ops.numel(x), itype, x) + (((1 << (ebits + 1)) - 1) << (mbits - 1))
    return ops.where(x != x, ops.bitcast(bits, ops.dtype(x)), x)


def _uniform_ints(ops: Ops, n: int, chunks: int, ctx: TensorContext, like: Array) -> list[Array]:
    """``chunks`` arrays of ``n`` independent int64 draws, uniform on ``[0, 2**23)``:
    ``floor(u * 2**23)`` of float32 uniforms, exact on every backend."""
    u = ops.random_uniform(n * chunks, ctx.worker_key, ctx.step, like)
    r = ops.cast(u * float(1 << _UNIFORM_BITS), "int64")
    return [r[j * n:(j + 1) * n] for j in range(chunks)]


def _draw_below(ops: Ops, mantissa: Array, mbits: int, ctx: TensorContext) -> Array:
    """Bool array, true with probability exactly ``mantissa / 2**mbits`` per element
    (``mantissa``: int64 in ``[0, 2**mbits)``). A uniform integer ``R`` of
    ``23 * chunks >= mbits`` bits, drawn 23 bits at a time, is compared with the mantissa
    aligned to the same width, most significant chunk first."""
    chunks = -(-mbits // _UNIFORM_BITS)
    draws = _uniform_ints(ops, ops.numel(mantissa), chunks, ctx, mantissa)
    mask = (1 << _UNIFORM_BITS) - 1
    below = mantissa < 0  # all false
    equal = mantissa >= 0  # all true
    for j, r in enumerate(draws):
        low = mbits - _UNIFORM_BITS * (j + 1)  # position of this chunk's lowest bit in the mantissa
        part = ops.shift_right(mantissa, low) if low >= 0 else ops.shift_left(mantissa, -low)
        part = ops.bitwise_and(part, mask)
        below = below | (equal & (r < part))
        equal = equal & (r == part)
    return below


@register("compressor", "natural", paper="Horvath et al. 2019, Natural Compression for Distributed "
          "Deep Learning", summary="Unbiased stochastic rounding to a power of two: sign + exponent, "
          "9 bits per float32 element.")
class Natural(Compressor):
    """Natural compression ``C_nat``: each element ``x = ±(1 + f) 2**e`` is rounded to
    ``±2**e`` with probability ``1 - f`` and to ``±2**(e+1)`` with probability ``f``, so
    ``E[C_nat(x)] = x`` and the second moment grows by at most 9/8 (Horvath et al.
    2019). Only the sign and the exponent travel: the mantissa is dropped.

    Computed on the float's bits (the exponent field and the mantissa as integers) with
    an exact integer comparison against uniform draws, so the probability is exactly
    ``f`` and, given the same draws, the payload is bit-identical on every backend.

    Codes: ``sign * 2**E + e_field`` with ``E`` exponent bits (8 for float32, 11 for
    float64), one code per element packed with :meth:`Ops.pack_uint`:

    * zero (either sign) is code 0, and decompresses to +0.0;
    * subnormals (exponent field 0) round to 0 or to the smallest normal ``2**-126``
      (float32) with the same rule, which is unbiased as well;
    * ``|x| >= 2**127`` (float32; ``2**1023`` for float64) never rounds up to inf: it is
      sent as ``2**127`` (biased for those magnitudes, which no gradient reaches);
    * ±inf is sent as ±inf; NaN takes the code of "negative zero" and decompresses to NaN.

    Wire size: ``4 * ceil(9 n / 32)`` bytes for float32 compute dtype (fp16, bf16 and
    float32 input), ``4 * ceil(12 n / 32)`` for float64. Unbiased, random (independent
    per worker, seeded by seed, name, rank and step); no memory, allgather.
    """

    memory = "none"
    communicator = "allgather"
    deterministic = False

    def __init__(self) -> None:
        pass

    @staticmethod
    def bits_for(dtype: str) -> int:
        """Bits per element: sign + exponent (9 for float32, 12 for float64)."""
        return 1 + _format(dtype)[2]

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        itype, mbits, ebits = _format(ctx.dtype)
        if ctx.dtype == "float32":  # one 23-bit draw per element decides, as below
            # floor(u * 2**23) of the float32 uniforms u, made without a float pass; draws,
            # rounding and packing in one primitive, which a backend does a block at a time
            return Payload.of(ops, ops.power_of_two_words(x, ctx.worker_key, ctx.step))
        bits = ops.bitcast(x, itype)
        negative = bits < 0
        mag = ops.bitwise_and(bits, (1 << (mbits + ebits)) - 1)
        e = ops.cast(ops.shift_right(mag, mbits), "int64")
        m = ops.cast(ops.bitwise_and(mag, (1 << mbits) - 1), "int64")
        e_inf = (1 << ebits) - 1
        # round up with probability m / 2**mbits, never past the largest finite power
        up = _draw_below(ops, m, mbits, ctx) & (e < e_inf - 1)
        e = e + ops.cast(up, "int64")
        sign_bit = 1 << ebits
        code = ops.where(negative & (e > 0), e + sign_bit, e)
        code = ops.where(ops.cast(mag, "int64") > (e_inf << mbits), e * 0 + sign_bit, code)
        return Payload.of(ops, ops.pack_uint(code, ebits + 1))

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        itype, mbits, ebits = _format(ctx.dtype)
        if ctx.dtype == "float32":
            return ops.power_of_two_from_words(buffer, ctx.numel)
        code = ops.unpack_uint(buffer, ctx.numel, ebits + 1)
        sign_bit = 1 << ebits
        negative = code >= sign_bit
        mag = ops.shift_left(ops.cast(ops.bitwise_and(code, sign_bit - 1), itype), mbits)
        width = 8 * DTYPE_ITEMSIZE[itype]
        bits = ops.where(negative, mag + (-(1 << (width - 1))), mag)
        quiet_nan = ((1 << (ebits + 1)) - 1) << (mbits - 1)
        bits = ops.where(code == sign_bit, mag * 0 + quiet_nan, bits)
        return ops.bitcast(bits, ctx.dtype)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return layout_nbytes([("bool", numel * self.bits_for(dtype))])


@register("compressor", "natural_dithering", paper="Horvath et al. 2019, Natural Compression for "
          "Distributed Deep Learning (natural dithering)",
          summary="Unbiased dithering to levels 1/2^(s-1) .. 1/2, 1 of each bucket's norm.")
class NaturalDithering(BucketedLevels, Compressor):
    """Natural dithering ``D_nat^{p,s}``: each bucket ``v`` of ``bucket_size`` elements is
    sent as its norm ``||v||_p`` and, per element, a sign and a level of the geometric
    grid ``0 < 2**(1-s) < ... < 1/2 < 1`` (``s = levels``). ``y = |v_i| / ||v||_p`` lies
    between two adjacent levels ``a <= y < b`` and is rounded up to ``b`` with
    probability ``(y - a) / (b - a)``, so ``E = y`` and the method is unbiased (Horvath
    et al. 2019; standard dithering, QSGD, uses the uniform grid ``k / s`` instead).

    Between two powers of two the rounding is natural compression of ``y`` (the
    probability is ``y``'s mantissa fraction); below ``2**(1-s)`` it is linear between 0
    and ``2**(1-s)``. The level of ``y`` comes from its exponent bits, not a logarithm.
    Draws are float32 uniforms, so the probability is exact above the lowest level and
    within 2**-24 below it. ``p = "2"`` sums the squares in a fixed pairwise order,
    scaled by the bucket's largest magnitude so squares cannot overflow; its square root
    is the framework's, and torch's vectorised CPU ``sqrt`` is not correctly rounded, so
    there a ``p = "2"`` norm may differ from NumPy's in its last bit (``p = "inf"``
    payloads are bit-identical on every backend given the same draws).

    A bucket holding NaN or Inf is sent with a NaN norm and decompresses to NaN
    throughout; an all-zero bucket decompresses to zero. TensorFlow's float arithmetic
    flushes subnormals (below 1.2e-38 in float32), so for such values TF may send zero
    where NumPy and torch send a level.

    Wire size: ``itemsize * ceil(n / bucket_size)`` bytes of norms plus
    ``4 * ceil(n * b / 32)`` bytes of codes, ``b = ceil(log2(2 s + 1))`` bits per element
    (sign and level in one offset code; 5 bits for the default ``s = 8``). Random
    (independent per worker); no memory, allgather.

    Args:
        levels: number of nonzero levels ``s``, in [1, 126] (default 8: levels
            2**-7 .. 1); the smallest level ``2**(1-s)`` stays a normal float32.
        bucket_size: elements sharing one norm, >= 1 (default 512).
        p: the norm, ``"inf"`` (default: the largest magnitude) or ``"2"`` (Euclidean).
    """

    memory = "none"
    communicator = "allgather"
    deterministic = False

    def __init__(self, levels: int = 8, bucket_size: int = 512, p: str = "inf"):
        if not 1 <= levels <= 126:
            raise ValueError(f"levels must be in [1, 126], got {levels}")
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        if p not in ("inf", "2"):
            raise ValueError(f"p must be 'inf' or '2', got {p!r}")
        self.levels = int(levels)
        self.bucket_size = int(bucket_size)
        self.p = p


    def _norms(self, ops: Ops, grid: Array, mag: Array, buckets: int) -> Array:
        peak = ops.max(mag, axis=1)
        if self.p == "inf":
            norms = peak
        else:
            safe_peak = ops.where(peak > 0, peak, peak * 0 + 1)
            scaled = mag / ops.reshape(safe_peak, (buckets, 1))
            norms = ops.sqrt(_row_sums(ops, scaled * scaled)) * peak
        # 0 * (NaN or inf) is NaN: a bucket holding either gets a NaN norm
        return canonical_nan(ops, norms + ops.sum(grid * 0, axis=1))

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        _format(ctx.dtype)  # float32 or float64
        if self.p == "inf":  # draws, norms, dithering and packing in one primitive, a block at a time
            return Payload.of(ops, ops.dither_bucket_words(x, self.levels, self.bucket_size, ctx.worker_key,
                                                           ctx.step))
        n, d = ctx.numel, self.bucket_size
        buckets = -(-n // d)
        u = ops.random_uniform(buckets * d, ctx.worker_key, ctx.step, x)
        norm_parts, word_parts = [], []
        # whole buckets and a multiple of 32 elements per chunk, so that the parts are the
        # norms and the code words of the whole tensor; temporaries stay chunk-sized
        for start, stop in chunk_bounds(n, math.lcm(d, 32)):
            size = -(-(stop - start) // d) * d
            norms, words = self._encode(ops, x[start:stop], u[start:start + size], ctx)
            norm_parts.append(norms)
            word_parts.append(words)
        norms = norm_parts[0] if len(norm_parts) == 1 else ops.concat(norm_parts)
        return Payload.of(ops, ops.concat([to_words(ops, norms)] + word_parts))

    def _encode(self, ops: Ops, x: Array, u: Array, ctx: TensorContext) -> tuple[Array, Array]:
        """``(norms, code words)`` of whole buckets of ``x`` (the last one may be short),
        with ``u`` the draws of the padded buckets."""
        n, d, s = ops.numel(x), self.bucket_size, self.levels
        buckets = -(-n // d)
        padded = ops.concat([x, ops.zeros(buckets * d - n, ctx.dtype, x)]) if buckets * d != n else x
        grid = ops.reshape(padded, (buckets, d))
        mag = ops.abs(grid)
        norms = self._norms(ops, grid, mag, buckets)
        safe = ops.where(norms > 0, norms, norms * 0 + 1)
        y = ops.flatten(grid / ops.reshape(safe, (buckets, 1)))
        code = ops.dither_codes(y, ops.cast(u, ctx.dtype), s)
        return norms, ops.pack_uint(code[:n] if buckets * d != n else code, self.bits)

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        _format(ctx.dtype)  # float32 or float64
        return ops.dither_bucket_values(buffer, ctx.numel, self.levels, self.bucket_size, ctx.dtype)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return layout_nbytes(self._layout(numel, dtype))


def _row_sums(ops: Ops, grid: Array) -> Array:
    """Row sums of a 2-D array added in a fixed order, so every backend rounds alike:
    the columns are halved pairwise until one is left; at an odd count the last column
    is set aside into a carry, added at the end."""
    rows, cols = ops.shape(grid)
    carry = None
    while cols > 1:
        if cols % 2:
            last = grid[:, cols - 1:cols]
            carry = last if carry is None else carry + last
            grid = grid[:, :cols - 1]
            cols -= 1
        half = cols // 2
        grid = grid[:, :half] + grid[:, half:]
        cols = half
    if carry is not None:
        grid = grid + carry
    return ops.reshape(grid, (rows,))
