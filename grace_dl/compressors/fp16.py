"""Casts to a 16-bit float: IEEE half precision (fp16) and bfloat16 (bf16).

Both send the tensor in the narrow dtype and widen it back after (:class:`_CastCompressor`).
The bfloat16 narrowing is done with integer operations on the float's bits
(:func:`bfloat16_bits`), because the frameworks disagree on it: NumPy's ``ml_dtypes``
narrows float64 through float32 (rounding twice), and the three give NaN three different
bit patterns. bfloat16 travels as int32 words by default, because not every transport
moves bfloat16 buffers.
"""

from __future__ import annotations

from typing import ClassVar

from ..core import Compressor, TensorContext
from ..ops import DTYPE_ITEMSIZE, Array, Ops
from ..payload import Payload
from ..registry import register


class _CastCompressor(Compressor):
    """Send the tensor cast to :attr:`wire_dtype`; widen back to the compute dtype.

    Summable over allreduce (the transport adds in the wire dtype), deterministic,
    biased only by rounding. Subclasses set :attr:`wire_dtype` and may override
    :meth:`_widen`.
    """

    summable = True
    bias = "biased"
    communicator = "allreduce"
    #: the dtype that travels
    wire_dtype: ClassVar[str] = ""

    def __init__(self) -> None:
        pass

    def _widen(self, ops: Ops, buffer: Array, dtype: str) -> Array:
        return ops.cast(buffer, dtype)

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        # the size is known from the context: a cast and nothing else on the tensor
        return Payload(ops.cast(x, self.wire_dtype), DTYPE_ITEMSIZE[self.wire_dtype] * ctx.numel)

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        return self._widen(ops, buffer, ctx.dtype)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return DTYPE_ITEMSIZE[self.wire_dtype] * numel


@register("compressor", "fp16", paper="Micikevicius et al. 2018, Mixed Precision Training (IEEE binary16)",
          summary="Cast to IEEE float16; summable over allreduce.")
class FP16(_CastCompressor):
    """Cast to float16 for the wire and back to the compute dtype after.

    Wire size: ``2 n`` bytes. Summable (allreduce adds in float16, so a sum of
    ``world_size`` values beyond 65504 overflows to inf, as Horovod's own fp16
    compression does), deterministic. Biased only by rounding to nearest: relative error
    at most 2**-11 for normal float16 values, magnitudes beyond 65504 become inf.
    """

    wire_dtype = "float16"


_F32_MAGNITUDE = 0x7FFFFFFF
_F64_MAGNITUDE = 0x7FFFFFFFFFFFFFFF
_F32_INF = 0x7F800000
_BF16_NAN = 0x7FC0  # the quiet NaN; the sign bit is kept


def _float64_to_float32_bits(ops: Ops, x: Array) -> tuple[Array, Array]:
    """``(magnitude bits, negative)`` of float64 ``x`` rounded to float32 *to odd*, as
    int64 (the float32 bit pattern without its sign), computed with integer operations.

    Rounding to odd (truncate, then set the last bit if anything was dropped) keeps
    enough information that a following round-to-nearest to bfloat16 (16 fewer bits) is
    the correctly rounded float64 -> bfloat16 result. Magnitudes of 2**128 and beyond,
    and inf, give float32 inf; NaN gives a NaN pattern.
    """
    bits = ops.bitcast(x, "int64")
    negative = bits < 0
    mag = ops.bitwise_and(bits, _F64_MAGNITUDE)
    e = ops.shift_right(mag, 52)
    m = ops.bitwise_and(mag, (1 << 52) - 1)
    zero = e * 0
    # float32 normal range: exponent field e - 896 in [1, 254]; 29 mantissa bits dropped
    normal = e >= 897
    dropped = ops.cast(ops.bitwise_and(m, (1 << 29) - 1) != 0, "int64")
    normal_bits = ops.shift_left(ops.where(normal, e - 896, zero), 23) + ops.shift_right(m, 29)
    normal_bits = ops.bitwise_or(normal_bits, dropped)
    # float32 subnormal range: the significand (with its implicit 1) shifted right by
    # 926 - e >= 30 places; shifts of 62 and more leave nothing (the significand has 53 bits)
    significand = ops.where(e > 0, m + (1 << 52), m)
    shift = ops.where(normal, zero + 62, ops.minimum(926 - e, zero + 62))
    kept = ops.shift_right(significand, shift)
    lost = ops.cast(ops.shift_left(kept, shift) != significand, "int64")
    sub_bits = ops.bitwise_or(kept, lost)
    f32 = ops.where(normal, normal_bits, sub_bits)
    f32 = ops.where(e > 1150, zero + _F32_INF, f32)
    nan = mag > 0x7FF0000000000000
    return ops.where(nan, zero + _F32_INF + 1, f32), negative


def bfloat16_bits(ops: Ops, x: Array) -> Array:
    """The bfloat16 bit patterns of float32 or float64 ``x`` as int64 values in
    ``[0, 65535]``: rounded once to nearest even, subnormals kept, overflow to inf, NaN
    as the quiet NaN ``0x7FC0`` with ``x``'s sign. Integer operations only, so every
    backend and device gives the same bits."""
    if ops.dtype(x) == "float64":
        mag, negative = _float64_to_float32_bits(ops, x)
    else:
        bits = ops.cast(ops.bitcast(x, "int32"), "int64")
        negative = bits < 0
        mag = ops.bitwise_and(bits, _F32_MAGNITUDE)
    nan = mag > _F32_INF
    # round to nearest even on the 16 dropped bits; inf + 0x7FFF stays inf, and the
    # largest finite values round up to inf, as IEEE rounding does
    odd = ops.bitwise_and(ops.shift_right(mag, 16), 1)
    rounded = ops.shift_right(mag + 0x7FFF + odd, 16)
    rounded = ops.where(nan, rounded * 0 + _BF16_NAN, rounded)
    return ops.where(negative, rounded + 0x8000, rounded)


def bfloat16_words(ops: Ops, bits: Array) -> Array:
    """The bfloat16 patterns ``bits`` (int64 values in ``[0, 65535]``) packed two to a
    little-endian int32 word (element ``2i`` in the low half of word ``i``, a zero half
    after an odd count): the memory layout of a bfloat16 array, as int32."""
    if ops.numel(bits) % 2:
        bits = ops.concat([bits, ops.zeros(1, "int64", bits)])
    pairs = ops.reshape(bits, (-1, 2))
    words = pairs[:, 0] + pairs[:, 1] * 65536
    # words above 2**31 - 1 are the int32 patterns of negative numbers
    words = ops.where(words >= 2**31, words - 2**32, words)
    return ops.cast(words, "int32")


@register("compressor", "bf16", paper="Kalamkar et al. 2019, A Study of BFLOAT16 for Deep Learning Training",
          summary="Cast to bfloat16 (float32's exponent range, 8-bit significand); optionally summable.")
class BF16(_CastCompressor):
    """Cast to bfloat16 for the wire and back to the compute dtype after.

    bfloat16 keeps float32's 8-bit exponent and a 7-bit stored significand, so it has
    float32's range (no overflow below 3.4e38) and a relative rounding error of at most
    2**-8 for normal values (8 significant bits).

    The narrowing is done on the integer bits (:func:`bfloat16_bits`): float32 and
    float64 input is rounded once to nearest even (float64 does not round twice through
    float32), subnormals are kept (not flushed), values beyond the largest bfloat16 become
    inf, and NaN becomes the quiet NaN ``0x7FC0`` with its sign. The payload is therefore
    bit-identical on NumPy, torch and TensorFlow, on every device. Widening back is exact
    on every backend. Remaining exception: TensorFlow's CPU float arithmetic flushes
    subnormals, so on TF a sum or mean of bfloat16 subnormals (below 1.2e-38) may come
    out as zero where NumPy and torch keep them.

    Two wire formats, because not every transport moves bfloat16:

    * default (``summable=False``): the bfloat16 bits packed two to an int32 word,
      ``4 * ceil(n / 2)`` bytes, which every transport moves; allgather, and each
      worker's values are widened before they are averaged;
    * ``summable=True``: a bfloat16 array of ``2 n`` bytes that an allreduce adds in
      bfloat16 (pass ``communicator="allreduce"``), for transports that sum bfloat16:
      the simulator and Horovod's torch ops do; Horovod's TensorFlow ops and the mpi4py
      transport reject bfloat16 buffers.

    Deterministic, biased only by rounding; no memory.

    Args:
        summable: send a bfloat16 array for allreduce rather than int32 words (default
            False).
    """

    communicator = "allgather"
    wire_dtype = "bfloat16"

    def __init__(self, summable: bool = False):
        self.summable = bool(summable)

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        if ops.dtype(x) == "float32":  # the same bits from the backend's kernel
            words = ops.bfloat16_words(x)
        else:
            words = bfloat16_words(ops, bfloat16_bits(ops, x))
        if not self.summable:
            return Payload.of(ops, words)
        out = ops.bitcast(words, "bfloat16")
        return Payload.of(ops, out[:ctx.numel] if ctx.numel % 2 else out)

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        if not self.summable:
            buffer = ops.bitcast(buffer, "bfloat16")
            buffer = buffer[:ctx.numel] if ctx.numel % 2 else buffer
        return self._widen(ops, buffer, ctx.dtype)

    def _widen(self, ops: Ops, buffer: Array, dtype: str) -> Array:
        # bfloat16 -> float32 is a 16-bit shift on every backend; float32 -> float64 is
        # exact (the TF backend rebuilds the subnormals its cast would flush)
        wide = ops.cast(buffer, "float32")
        return wide if dtype == "float32" else ops.cast(wide, dtype)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return 2 * numel if self.summable else 4 * -(-numel // 2)
