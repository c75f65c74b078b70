"""Chunk-level coarse sparsification: whole chunks chosen by their allreduced L1 norms.

Also home of the exact encoding of shared indices in a summable payload
(:func:`encode_shared_ids` / :func:`decode_shared_ids`), which the sketch method reuses.
"""

from __future__ import annotations

from ..core import Collective, Compressor, Rounds, TensorContext, run_alone
from ..ops import DTYPE_ITEMSIZE, Array, Ops
from ..payload import Payload
from ..registry import register
from .topk import check_ratio

#: bits of an index carried by one float digit
DIGIT_BITS = 12
_BASE = float(1 << DIGIT_BITS)
#: float32 adds integers exactly below 2**24: N workers' digits (< 2**12 each) sum exactly
#: while N <= 2**12
MAX_FLOAT32_WORKERS = 1 << (24 - DIGIT_BITS)


def id_digits(bound: int) -> int:
    """Float digits that one index in ``[0, bound)`` takes: ``ceil(bits / 12)``, at least 1."""
    return max(1, -(-max(bound - 1, 0).bit_length() // DIGIT_BITS))


def encode_shared_ids(ops: Ops, ids: Array, bound: int, dtype: str) -> Array:
    """Indices that every worker knows (all workers pass the same ``ids``), as
    ``D * len(ids) + 1`` values of the float ``dtype`` that survive an allreduce.

    Each index is split into ``D = id_digits(bound)`` base-4096 digits, digit-major,
    followed by one count slot holding 1. Summed over ``N`` workers every slot is
    ``N`` times its value, an integer below ``2**24`` (exact in float32 while
    ``N <= 4096``), so :func:`decode_shared_ids` divides by the count and recovers the
    indices exactly, from one worker's buffer as from the sum of all.
    """
    f = ops.cast(ids, "float64")  # indices < 2**31: float64 arithmetic below is exact
    digits = []
    for j in range(id_digits(bound)):
        q = ops.floor(f * (1.0 / _BASE**j))
        digits.append(q - ops.floor(q * (1.0 / _BASE)) * _BASE)
    one = ops.zeros(1, "float64", f) + 1.0
    return ops.cast(ops.concat(digits + [one]), dtype)


def decode_shared_ids(ops: Ops, slots: Array, count: int, bound: int) -> Array:
    """int64 indices (``count`` of them) from the ``id_digits(bound) * count + 1`` slots
    made by :func:`encode_shared_ids`, or from the sum of several workers' slots."""
    d = id_digits(bound)
    f = ops.cast(slots, "float64")
    workers = f[d * count:d * count + 1]
    ids = ops.zeros(count, "float64", f)
    for j in range(d):
        digit = ops.floor(f[j * count:(j + 1) * count] / workers + 0.5)
        ids = ids + digit * _BASE**j
    ids = ops.where(ids > bound - 1, ids * 0 + (bound - 1), ids)  # guard a corrupt buffer
    return ops.cast(ops.where(ids < 0, ids * 0, ids), "int64")


def check_world_size(ctx: TensorContext) -> None:
    """ValueError when float32 digit sums would stop being exact."""
    if ctx.dtype == "float32" and ctx.world_size > MAX_FLOAT32_WORKERS:
        raise ValueError(f"world_size {ctx.world_size}: shared indices travel as float32 digits, exact for "
                         f"at most {MAX_FLOAT32_WORKERS} workers")


def blocked_pairwise_sum(ops: Ops, x: Array, block: int, dtype: str) -> Array:
    """The elementwise sum of the ``len(x) // block`` consecutive blocks of flat ``x``
    (a ``block``-element array), added in a fixed pairwise order (halves of the block
    list are added until one block is left; an odd count gets one zero block), so every
    backend rounds alike."""
    count = ops.numel(x) // block
    if count == 0:
        return ops.zeros(block, dtype, x)
    while count > 1:
        if count % 2:
            x = ops.concat([x, ops.zeros(block, dtype, x)])
            count += 1
        half = count // 2
        x = x[:half * block] + x[half * block:]
        count = half
    return x


def row_pairwise_sum(ops: Ops, x: Array, rows: int, width: int, dtype: str) -> Array:
    """Sums of the ``rows`` consecutive ``width``-element rows of flat ``x``, each added
    in a fixed pairwise order (rows are padded with zeros to a power-of-two width, then
    the column halves are added until one column is left)."""
    p = 1 << max(width - 1, 0).bit_length()
    y = ops.reshape(x, (rows, width))
    if p != width:
        # gather each row into a power-of-two width; the appended zero fills the gaps
        src = ops.concat([x, ops.zeros(1, dtype, x)])
        col = ops.reshape(ops.arange(p, x), (1, p))
        row = ops.reshape(ops.arange(rows, x), (rows, 1))
        flat = ops.where(col < width, row * width + col, col * 0 + rows * width)
        y = ops.reshape(ops.gather(src, ops.reshape(flat, (-1,))), (rows, p))
    while p > 1:
        p //= 2
        y = y[:, :p] + y[:, p:]
    return ops.reshape(y, (rows,))


@register("compressor", "chunk", paper="Sun et al. 2019, GradientFlow: Optimizing Network Performance for "
          "Large-Scale Distributed DNN Training (coarse-grained sparse communication); Chen et al., CSC",
          summary="Whole chunks chosen by their allreduced L1 norms, the same on every worker: values over "
                  "allreduce, residual error feedback.")
class Chunk(Compressor):
    """Chunk-level coarse sparsification (coarse-grained sparse communication of
    GradientFlow, Sun et al. 2019; CSC).

    The flat tensor is cut into ``C = ceil(n / w)`` chunks of ``w = min(chunk_size, n)``
    elements (the last one may be shorter; a tensor smaller than ``chunk_size`` is one
    chunk). Each worker computes the L1 norm of every chunk and the norms are summed
    with a first allreduce (tag ``"norms"``); every worker then holds the same summed
    norms and picks the same ``m = max(1, floor(ratio * C))`` chunks of largest summed
    norm (ties to the lower chunk id). Because all workers send the same chunks, their
    values add up elementwise: the payload is summable and goes over an allreduce.

    The payload is ``m * w`` values (the chosen chunks in ascending id order;
    the short tail chunk is padded with zeros, so the size never depends on which chunks
    were chosen), then the chunk ids and a count slot, encoded by
    :func:`encode_shared_ids`: each id as ``D = ceil(log2(C) / 12)`` (at least 1) float
    digits and one slot holding 1. Summed over ``N`` workers the id slots hold ``N``
    times the digits and the count slot ``N``, so decompression recovers the ids
    exactly from one worker's payload or from the sum (float32: at most 4096 workers).
    The ids cost ``D * m + 1`` values, under 1% of the values at ``w = 256``; no
    summation of raw ids is relied on and no state is kept between compress and
    decompress.

    Bytes per worker and step (itemsize ``s`` of the compute dtype)::

        norms (first allreduce)    C * s
        payload (second allreduce) (m * w + D * m + 1) * s

    :meth:`payload_nbytes` gives the payload; :meth:`rounds_nbytes` the norms. The
    L1 norms are summed in a fixed pairwise order, so payloads are bit-identical on every
    backend.

    A contraction for one worker (``||x - C(x)||^2 <= (1 - m / (C * w))
    ||x||^2``, as the kept chunks have the largest L1 norms); with several workers the
    chunks follow the summed norms, and what a worker does not send stays in its
    residual memory. NaN or Inf in a chunk makes its norm NaN/Inf, so that chunk is
    chosen and the non-finite values reach the aggregate; the residual memory keeps its
    previous state.

    Args:
        ratio: fraction of the chunks sent, in (0, 1] (default 0.01); at least one chunk.
        chunk_size: elements per chunk, >= 1 (default 256).
    """

    summable = True
    bias = "contraction"
    memory = "residual"
    communicator = "allreduce"
    deterministic = True

    def __init__(self, ratio: float = 0.01, chunk_size: int = 256):
        self.ratio = check_ratio(ratio)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def _sizes(self, numel: int) -> tuple[int, int, int, int]:
        """(chunk width w, chunks C, chosen m, id digits D); a tensor smaller than one
        chunk is one chunk of its own size, not padded."""
        width = max(1, min(self.chunk_size, numel))
        chunks = -(-numel // width)
        chosen = min(chunks, max(1, int(self.ratio * chunks))) if chunks else 0
        return width, chunks, chosen, id_digits(chunks)

    @staticmethod
    def _positions(ops: Ops, ids: Array, cs: int) -> Array:
        """Flat element positions of the chosen chunks (into the padded tensor)."""
        pos = ops.reshape(ids, (-1, 1)) * cs + ops.reshape(ops.arange(cs, ids), (1, cs))
        return ops.reshape(pos, (-1,))

    def compress_rounds(self, ops: Ops, x: Array, ctx: TensorContext) -> Rounds:
        check_world_size(ctx)
        width, chunks, chosen, _ = self._sizes(ctx.numel)
        pad = chunks * width - ctx.numel
        padded = ops.concat([x, ops.zeros(pad, ctx.dtype, x)]) if pad else x
        norms = row_pairwise_sum(ops, ops.abs(padded), chunks, width, ctx.dtype)
        (summed,) = yield [Collective("allreduce", norms, tag="norms")]
        ids = ops.topk_indices(summed, chosen)
        values = ops.gather(padded, self._positions(ops, ids, width))
        return Payload.of(ops, ops.concat([values, encode_shared_ids(ops, ids, chunks, ctx.dtype)]))

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        return run_alone(self.compress_rounds(ops, x, ctx))

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        width, chunks, chosen, _ = self._sizes(ctx.numel)
        nvalues = chosen * width
        ids = decode_shared_ids(ops, buffer[nvalues:], chosen, chunks)
        dense = ops.scatter(chunks * width, self._positions(ops, ids, width), buffer[:nvalues])
        return dense[:ctx.numel] if chunks * width != ctx.numel else dense

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        width, _, chosen, digits = self._sizes(numel)
        return (chosen * width + digits * chosen + 1) * DTYPE_ITEMSIZE[dtype]

    def rounds_nbytes(self, numel: int, dtype: str = "float32") -> int:
        """Bytes of the norms allreduce that precedes the payload: ``C * itemsize``."""
        return self._sizes(numel)[1] * DTYPE_ITEMSIZE[dtype]
