"""TernGrad: stochastic ternary gradients with one scaler per tensor (Wen et al. 2017)."""

from __future__ import annotations

from ..core import Collective, Compressor, Rounds, TensorContext, run_alone
from ..ops import Array, Ops
from ..payload import Payload, from_words, layout_nbytes, to_words, words_for
from ..registry import register
from .natural import canonical_nan
from ..ops.base import chunk_bounds

#: most workers the summable (shared-scale) format supports: 16-bit halves of the scale
#: summed over N workers stay below 2**31
MAX_SHARED_WORKERS = 2**15


def lane_bits(world_size: int) -> int:
    """Bits per element in the summable format: a lane holds the sum over ``world_size``
    workers of codes in {0, 1, 2}, so values up to ``2 N``."""
    return (2 * world_size).bit_length()


def shared_layout(numel: int, dtype: str, world_size: int) -> tuple[int, int, int]:
    """``(lanes per word, lane words, scale words)`` of the summable format."""
    per = 31 // lane_bits(world_size)
    return per, -(-numel // per), 2 * words_for(dtype, 1)


def shared_payload_nbytes(numel: int, dtype: str, world_size: int) -> int:
    """Bytes of one worker's summable payload: ``4 * (ceil(n / floor(31 / L)) + 1 +
    2 * itemsize / 4)`` with ``L = bit_length(2 N)`` (lane words, the count word, the
    scale as 16-bit halves)."""
    _, lane_words, scale_words = shared_layout(numel, dtype, world_size)
    return 4 * (lane_words + 1 + scale_words)


@register("compressor", "terngrad", paper="Wen et al. 2017, TernGrad: Ternary Gradients to Reduce "
          "Communication in Distributed Deep Learning",
          summary="Stochastic ternary {-1, 0, 1} times one scaler per tensor, 2 bits per element; "
                  "optional clipping and a scaler shared across workers (summable).")
class TernGrad(Compressor):
    """TernGrad (Wen et al. 2017): with the scaler ``s = max |x|``, each element is sent
    as ``t_i = sign(x_i) b_i`` where ``b_i ~ Bernoulli(|x_i| / s)``, and rebuilt as
    ``s t_i``, so ``E[s t_i] = x_i``.

    Gradient clipping (the paper's Sec. 3.3, on by default): before ternarizing,
    elements are clipped to ``[-c sigma, c sigma]`` with ``c = clip_sigma``. ``sigma`` is
    the root mean square ``sqrt(mean(x**2))``: the standard deviation of the tensor under
    the paper's model of zero-mean gradients (the deviation around the sample mean would
    be 0 for a constant tensor and clip it to zero). The method is then unbiased with
    respect to the *clipped* tensor, not ``x``: ``bias`` is ``"biased"`` unless
    ``clip_sigma=None``, which gives an unbiased method. Sums are taken in a fixed
    pairwise order, scaled by ``max |x|`` so squares cannot overflow (the square root is
    the framework's; torch's vectorised CPU ``sqrt`` may differ from NumPy's in the last
    bit).

    ``shared_scale=True``: the workers first agree on ``S = max`` of their scalers (an
    allgather of one scalar per worker, ``itemsize`` bytes each, counted in the payload),
    then ternarize with ``S``; the payloads then share one scale and can be summed
    (``summable``; pass ``communicator="allreduce"``). A sum of N ternary values needs
    more than 2 bits, so the summable format packs each code ``t + 1`` in a lane of
    ``L = bit_length(2 N)`` bits, ``floor(31 / L)`` lanes per int32 word (the sign bit is
    never used, so no integer sum can overflow), then one count word (1 per worker) and
    the scale's bits as 16-bit halves (each worker sends the same ``S``, so the halves sum
    to ``N`` times theirs and the count recovers them exactly). Size:
    ``4 * (ceil(n / floor(31 / L)) + 1 + itemsize / 2)`` bytes, e.g. 4.6 bits per element
    for 4 workers and 6.4 for 16: allreduce then beats allgathering 2-bit payloads, whose
    received bytes grow as ``N - 1``, from about 5 workers on. The size depends on N, so
    :meth:`payload_nbytes` is None in this mode (see :func:`shared_payload_nbytes`). At
    most :data:`MAX_SHARED_WORKERS` workers.

    Wire size (default): ``4 * ceil(2 n / 32) + itemsize`` bytes (2-bit codes packed with
    :meth:`Ops.pack_uint`, then the scaler in the compute dtype). Zero tensor: scaler 0,
    decompresses to zero. A tensor holding NaN or Inf gets a NaN scaler and decompresses
    to NaN throughout. Random draws are independent per worker; no memory, allgather.

    Args:
        clip_sigma: clip to ``clip_sigma`` times the root mean square before
            ternarizing, > 0, or None for no clipping (default 2.5, the paper's choice).
        shared_scale: agree on the largest scaler across workers first, making payloads
            summable (default False).
    """

    memory = "none"
    communicator = "allgather"
    deterministic = False

    def __init__(self, clip_sigma: float | None = 2.5, shared_scale: bool = False):
        if clip_sigma is not None and not clip_sigma > 0:
            raise ValueError(f"clip_sigma must be > 0 or None, got {clip_sigma}")
        self.clip_sigma = None if clip_sigma is None else float(clip_sigma)
        self.shared_scale = bool(shared_scale)
        self.summable = self.shared_scale
        self.bias = "unbiased" if self.clip_sigma is None else "biased"

    # -- compress -------------------------------------------------------------------------
    def clip(self, ops: Ops, x: Array, ctx: TensorContext) -> tuple[Array, Array]:
        """``(clipped x, scaler)``: the tensor the ternary values are unbiased for, and its
        largest magnitude (a 1-element array; NaN if ``x`` holds NaN or Inf)."""
        bound, scale = self._bound_and_scale(ops, x, ctx)
        return (x if bound is None else ops.clip_magnitude(x, bound)), scale

    def _bound_and_scale(self, ops: Ops, x: Array, ctx: TensorContext) -> tuple[Array | None, Array]:
        """``(clipping bound, scaler)``: ``clip_sigma`` times the root mean square (None
        without clipping) and the largest magnitude of the clipped tensor, 1-element
        arrays; compression clips a chunk at a time, never storing the clipped tensor."""
        if self.clip_sigma is None:
            peak = ops.reshape(ops.max(ops.abs(x)), (1,)) if ctx.numel else ops.zeros(1, ctx.dtype, x)
            # the scaler of a tensor holding NaN or Inf is NaN (two reductions, no temporary)
            return None, ops.where(ops.all_finite(x), peak, peak * 0 + float("nan"))
        stats = ops.peak_rms(x)
        peak = stats[0:1]
        bound = stats[1:2] * self.clip_sigma
        return bound, ops.minimum(peak, bound)  # both NaN if either is

    def compress_rounds(self, ops: Ops, x: Array, ctx: TensorContext) -> Rounds:
        if self.clip_sigma is not None and not self.shared_scale and ctx.dtype in ("float32", "float64"):
            # scalars, draws, codes and packing in one primitive: a backend does them a
            # block at a time
            return Payload.of(ops, ops.clipped_ternary_words(x, self.clip_sigma, ctx.worker_key, ctx.step))
        bound, scale = self._bound_and_scale(ops, x, ctx)
        if self.shared_scale:
            if ctx.world_size > MAX_SHARED_WORKERS:
                raise ValueError(f"terngrad with shared_scale supports at most {MAX_SHARED_WORKERS} "
                                 f"workers, got {ctx.world_size}")
            (scales,) = yield [Collective("allgather", scale, tag="scale")]
            scale = _largest(ops, scales)
        scale = canonical_nan(ops, scale)
        safe = ops.where(scale > 0, scale, scale * 0 + 1)
        u = ops.random_uniform(ctx.numel, ctx.worker_key, ctx.step, x)
        if ctx.dtype != "float32":
            u = ops.cast(u, ctx.dtype)
        # a chunk at a time (16 codes to a word, so the chunks' words are the tensor's):
        # the temporaries of clipping and ternarizing stay a few MiB at any size
        parts = []
        for start, stop in chunk_bounds(ctx.numel, 16):
            xs, us = (x, u) if stop - start == ctx.numel else (x[start:stop], u[start:stop])
            if bound is None:
                code = ops.ternary_codes(xs, safe, us)
            else:
                code = ops.clipped_ternary_codes(xs, bound, safe, us)
            parts.append(code if self.shared_scale else ops.pack_uint(code, 2))
        if self.shared_scale:
            code = parts[0] if len(parts) == 1 else ops.concat(parts)
            return Payload.of(ops, _pack_shared(ops, code, scale, ctx))
        return Payload.of(ops, ops.concat(parts + [to_words(ops, scale)]))

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        return run_alone(self.compress_rounds(ops, x, ctx))

    # -- decompress -----------------------------------------------------------------------
    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        n = ctx.numel
        if self.shared_scale:
            total, scale = _unpack_shared(ops, buffer, ctx)
            return ops.cast(total, ctx.dtype) * scale
        return ops.ternary_values(buffer, n, ctx.dtype)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int | None:
        if self.shared_scale:
            return None  # depends on the number of workers: shared_payload_nbytes
        return layout_nbytes([("bool", 2 * numel), (dtype, 1)])


def _largest(ops: Ops, scales: list[Array]) -> Array:
    """The largest of the workers' 1-element scalers, NaN if any is NaN; every worker
    gets the same bits (the list is in rank order everywhere)."""
    top = scales[0]
    nan = scales[0] * 0
    for s in scales[1:]:
        top = ops.where(s > top, s, top)
        nan = nan + s * 0
    return top + nan


def _pack_shared(ops: Ops, code: Array, scale: Array, ctx: TensorContext) -> Array:
    """The summable format: lane words, a count word (1), the scale as 16-bit halves."""
    bits = lane_bits(ctx.world_size)
    per, lane_words, _ = shared_layout(ctx.numel, ctx.dtype, ctx.world_size)
    code = ops.cast(code, "int64")
    pad = lane_words * per - ctx.numel
    if pad:
        code = ops.concat([code, ops.zeros(pad, "int64", code)])
    steps = ops.arange(per, code)
    weights = ops.shift_left(steps * 0 + 1, steps * bits)
    lanes = ops.sum(ops.reshape(code, (lane_words, per)) * weights, axis=1)  # < 2**31
    scale_words = ops.cast(to_words(ops, scale), "int64")
    halves = ops.concat([ops.bitwise_and(scale_words, 0xFFFF),
                         ops.bitwise_and(ops.shift_right(scale_words, 16), 0xFFFF)])
    count = ops.zeros(1, "int64", code) + 1
    return ops.cast(ops.concat([lanes, count, halves]), "int32")


def _unpack_shared(ops: Ops, buffer: Array, ctx: TensorContext) -> tuple[Array, Array]:
    """``(sum of the workers' ternary values as int64, the shared scale)`` from the sum
    of ``count`` workers' summable payloads."""
    bits = lane_bits(ctx.world_size)
    per, lane_words, scale_words = shared_layout(ctx.numel, ctx.dtype, ctx.world_size)
    words = ops.cast(buffer, "int64")
    lanes = ops.reshape(words[:lane_words], (lane_words, 1))
    count = words[lane_words:lane_words + 1]
    halves = words[lane_words + 1:]
    steps = ops.arange(per, words)
    codes = ops.bitwise_and(ops.shift_right(lanes, steps * bits), (1 << bits) - 1)
    total = ops.flatten(codes)[:ctx.numel] - count
    # every worker sent the same halves: their sum divided by the count is exact in float64
    halves = ops.cast(ops.cast(halves, "float64") / ops.cast(count, "float64"), "int64")
    half = scale_words // 2
    scale_bits = halves[:half] + halves[half:] * 65536
    scale_bits = ops.where(scale_bits >= 2**31, scale_bits - 2**32, scale_bits)
    scale = from_words(ops, ops.cast(scale_bits, "int32"), ctx.dtype, 1)
    return total, scale
