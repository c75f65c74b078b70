"""Sign compressors: one bit per element, with zero, one or two scales.

All four methods share one wire format: the sign bits of the tensor, packed 32 to an
int32 word with :meth:`Ops.pack_bits` (bit set where ``x >= 0``), optionally followed
by a few scales in the compute dtype. They differ in the scales and in the memory they
are meant for.

Scales are reduced with :meth:`Ops.tree_sum`, a fixed pairwise tree of elementwise
additions, so that the payload is bit-identical on every backend and device (a
framework's own ``sum`` may add in any order). Signs are packed by :meth:`Ops.pack_signs`
(with the scales in the same buffer) and expanded by :meth:`Ops.unpack_signs` or
:meth:`Ops.select_bits`, which pick one of two values per bit.
"""

from __future__ import annotations

from ..core import Compressor, TensorContext
from ..ops import DTYPE_ITEMSIZE, Array, Ops
from ..payload import Payload, from_words, layout_nbytes
from ..registry import register


def pairwise_sum(ops: Ops, x: Array, dtype: str) -> Array:
    """The sum of 1-D ``x`` as a 1-element array of ``dtype``, added in the fixed order of
    :meth:`Ops.tree_sum`, so that it is bit-identical on every backend and device."""
    if ops.numel(x) == 0:
        return ops.zeros(1, dtype, x)
    return ops.tree_sum(x)


class _SignCompressor(Compressor):
    """Shared wire format: ``n`` sign bits, then ``scales`` values of the compute dtype.

    Subclasses set :attr:`scales` and implement :meth:`_scales` (compress side, a
    ``scales``-element array) and :meth:`_expand` (decompress side)."""

    summable = False
    bias = "biased"
    deterministic = True
    #: number of compute-dtype scales sent after the sign bits
    scales = 0

    def _layout(self, numel: int, dtype: str) -> list[tuple[str, int]]:
        layout = [("bool", numel)]
        if self.scales:
            layout.append((dtype, self.scales))
        return layout

    def _scales(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        raise NotImplementedError

    def _expand(self, ops: Ops, words: Array, scales: Array | None, ctx: TensorContext) -> Array:
        """The decompressed tensor from the packed sign ``words`` (the payload: the
        words of the scales may follow the sign words)."""
        raise NotImplementedError

    def _words(self, numel: int, dtype: str) -> int:
        """Words of the payload: the sign bits', then the scales' (the size of :meth:`_layout`)."""
        return -(-numel // 32) + (self.scales * DTYPE_ITEMSIZE[dtype] + 3) // 4

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        # one buffer: the sign words, then the scales' (no concatenation)
        words = ops.pack_signs(x, self._scales(ops, x, ctx) if self.scales else None)
        # the size follows from the context: no length or dtype query per call
        return Payload(words, 4 * self._words(ctx.numel, ctx.dtype))

    def _check_words(self, ops: Ops, buffer: Array, ctx: TensorContext) -> None:
        """ValueError unless ``buffer`` holds this payload's number of words."""
        expected = self._words(ctx.numel, ctx.dtype)
        if ops.numel(buffer) != expected:
            raise ValueError(f"payload has {ops.numel(buffer)} words, {type(self).__name__} of {ctx.numel} "
                             f"{ctx.dtype} elements expects {expected}")

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        self._check_words(ops, buffer, ctx)
        scales = (from_words(ops, buffer[-(-ctx.numel // 32):], ctx.dtype, self.scales) if self.scales
                  else None)
        # the whole buffer: the expansion reads the sign words and ignores the scales after them
        return self._expand(ops, buffer, scales, ctx)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        return layout_nbytes(self._layout(numel, dtype))


@register("compressor", "signsgd", paper="Bernstein et al. 2018, signSGD: Compressed Optimisation "
          "for Non-Convex Problems",
          summary="One sign bit per element; workers combine by majority vote.")
class SignSGD(_SignCompressor):
    """signSGD: each worker sends only the sign of every gradient element, one bit
    each, and the receivers take the elementwise majority of the workers' signs
    (Bernstein et al. 2018).

    A bit is set where ``x >= 0``: zero is sent as +1 (one bit cannot encode zero), so a
    zero tensor decompresses to all +1. A NaN element is sent as -1. Decompression gives
    +1/-1 in the compute dtype; the aggregate defaults to ``"majority"``. No scale is
    sent, so the update's magnitude is the optimiser's learning rate alone.

    Wire size: ``4 * ceil(n / 32)`` bytes. Biased; no memory, allgather.
    """

    memory = "none"
    communicator = "allgather"
    aggregate = "majority"
    zero_preserving = False

    def __init__(self) -> None:
        pass

    def _expand(self, ops, words, scales, ctx):
        return ops.unpack_signs(words, ctx.numel, ctx.dtype)


@register("compressor", "signum", paper="Bernstein et al. 2018, signSGD: Compressed Optimisation "
          "for Non-Convex Problems (Signum)",
          summary="Sign of the momentum, one bit per element; majority vote.")
class Signum(SignSGD):
    """Signum: signSGD applied to each worker's momentum rather than to its raw
    gradient (Bernstein et al. 2018). The momentum
    ``m = momentum * m_prev + (1 - momentum) * g`` lives in the ``signum_momentum``
    memory (parameter ``momentum``, default 0.9); this compressor sends its sign.

    Same wire format as signSGD: ``4 * ceil(n / 32)`` bytes, zero sent as +1, +1/-1 on
    decompression, majority vote by default. Biased; allgather.
    """

    memory = "signum_momentum"


@register("compressor", "efsignsgd", paper="Karimireddy et al. 2019, Error Feedback Fixes SignSGD "
          "and other Gradient Compression Schemes",
          summary="Signs scaled by the mean magnitude, with residual error feedback.")
class EFSignSGD(_SignCompressor):
    """EF-signSGD: the sign bits plus one scale, the mean magnitude
    ``||x||_1 / n``, so that ``C(x) = (||x||_1 / n) sign(x)``; what the scaled signs
    miss is fed back through the residual memory (Karimireddy et al. 2019).

    Zero is sent as +1, but the scale of a zero tensor is 0, so it decompresses to
    zero. The sum is taken in a fixed pairwise order (bit-identical on every backend)
    and multiplied by ``1/n``.

    Wire size: ``4 * ceil(n / 32) + itemsize`` bytes (sign bits, then the scale in the
    compute dtype). Biased (a scaled-sign contraction); residual memory, allgather mean.
    """

    memory = "residual"
    communicator = "allgather"
    scales = 1

    def __init__(self) -> None:
        pass

    # the scale and the signs packed, and expanded, each by one primitive: on a small
    # tensor the per-call work, not the elements, is most of the round trip
    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        return Payload(ops.pack_signs_abs_sum(x, 1.0 / ctx.numel), 4 * self._words(ctx.numel, ctx.dtype))

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        self._check_words(ops, buffer, ctx)
        return ops.unpack_scaled_signs(buffer, ctx.numel, ctx.dtype)


@register("compressor", "onebit", paper="Seide et al. 2014, 1-Bit Stochastic Gradient Descent and "
          "its Application to Data-Parallel Distributed Training of Speech DNNs",
          summary="Sign bits plus the mean of each sign's elements; residual error feedback.")
class OneBit(_SignCompressor):
    """1-bit SGD: each element is quantised to one bit, its sign, and reconstructed as
    the mean of the elements that share its sign; the quantisation error is carried to
    the next step by the residual memory (Seide et al. 2014).

    Two scales follow the bits: the mean of the non-negative elements (zero included,
    as it is sent as +1) and the mean of the negative ones. A side with no elements has
    mean 0 (the count is made 1 on the device, no host sync), so a zero tensor
    decompresses to zero. Sums are taken in a fixed pairwise order and counts in int64,
    so payloads are bit-identical on every backend.

    Wire size: ``4 * ceil(n / 32) + 2 * itemsize`` bytes. Biased; residual memory,
    allgather mean.
    """

    memory = "residual"
    communicator = "allgather"
    scales = 2

    def __init__(self) -> None:
        pass

    def _scales(self, ops, x, ctx):
        return ops.sign_means(x)

    def _expand(self, ops, words, scales, ctx):
        return ops.select_bits(words, ctx.numel, scales[0:1], scales[1:2])
