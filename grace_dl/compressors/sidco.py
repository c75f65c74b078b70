"""SIDCo (Abdelmoniem et al. 2021): a threshold from a distribution fitted to the
gradient's magnitudes, in one or several stages."""

from __future__ import annotations

import math

from ..core import TensorContext
from ..ops import Array, Ops
from ..registry import register
from .sign import pairwise_sum
from .threshold import ThresholdSparsifier, at_least_one
from .topk import check_ratio

DISTRIBUTIONS = ("exponential", "gamma", "gpareto")
#: the offset of the paper's gamma fit, relative to the mean magnitude, that keeps the
#: logarithm of an exact zero finite
_LOG_OFFSET = 2.0**-52
#: |shape| below which the generalized Pareto quantile takes its exponential limit
_GP_EXPONENTIAL = 1e-6
#: cap of the gamma shape (the fit diverges for nearly constant magnitudes)
_MAX_GAMMA_SHAPE = 1e6


def _log_gamma(ops: Ops, a: Array) -> Array:
    """``ln Gamma(a)`` for ``0 < a <= 1e6`` (float64): Stirling's series at ``a + 8``,
    shifted back with ``Gamma(a + 8) = a (a + 1) ... (a + 7) Gamma(a)``; error below
    1e-11."""
    w = a + 8.0
    product = a
    for i in range(1, 8):
        product = product * (a + float(i))
    w2 = w * w
    series = (1.0 / 12.0 - (1.0 / 360.0 - (1.0 / 1260.0 - (1.0 / 1680.0) / w2) / w2) / w2) / w
    return (w - 0.5) * ops.log(w) - w + 0.5 * math.log(2.0 * math.pi) + series - ops.log(product)


def _round_to_float32(ops: Ops, t: Array) -> Array:
    """``t`` (float64) rounded to float32 precision: a fitted threshold carries no
    information in its last bits, and the rounding absorbs the last-bit differences
    between backends' ``log`` and ``exp``."""
    return ops.cast(ops.cast(t, "float32"), "float64")


@register("compressor", "sidco", paper="Abdelmoniem et al. 2021, An Efficient Statistical-based "
          "Gradient Compression Technique for Distributed Training Systems (MLSys)",
          summary="Threshold from a distribution (exponential, gamma, generalized Pareto) fitted to the "
                  "magnitudes, multi-stage; residual memory, allgather.")
class SIDCo(ThresholdSparsifier):
    """SIDCo (Abdelmoniem et al. 2021): model the gradient's magnitudes ``|x|`` by a
    sparsity-inducing distribution, fit it in closed form, and send the elements above
    the fitted distribution's ``1 - ratio`` quantile, so that about ``ratio * n``
    elements go without any sort or top-k.

    Multi-stage fitting: with ``stages = m``, each stage has tail probability
    ``delta = ratio ** (1 / m)``. Stage 1 fits the model to every magnitude and sets the
    threshold ``t_1`` at its ``1 - delta`` quantile; stage ``j > 1`` fits the excesses
    ``|x| - t_{j-1}`` of the elements above ``t_{j-1}`` and sets ``t_j = t_{j-1}`` plus
    their ``1 - delta`` quantile. The product of the stages' tail probabilities is
    ``ratio``; later stages correct a model that fits the bulk but not the tail.

    Fits (closed forms; ``mean`` and ``var`` of the fitted values):

    * ``exponential``: maximum likelihood, scale ``b = mean``; quantile
      ``b * ln(1 / delta)``;
    * ``gamma`` (stage 1; later stages use the generalized Pareto fit, as the paper
      does for the tail): the paper's approximation of the maximum-likelihood shape,
      ``s = ln(mean) - mean(ln(|x| + eps))``,
      ``a = (3 - s + sqrt((s - 3)^2 + 24 s)) / (12 s)``, scale ``b = mean / a``
      (``eps = 2^-52 * mean`` keeps exact zeros finite), and the paper's tail
      approximation ``-b (ln delta + ln Gamma(a))``;
    * ``gpareto``: method of moments, ``r = mean^2 / var``, shape ``k = (r - 1) / 2``,
      scale ``sigma = mean (r + 1) / 2``; quantile ``sigma (1 - delta^k) / k`` (its
      exponential limit ``sigma ln(1 / delta)`` near ``k = 0``).

    Statistics are summed in float64 in a fixed order and every threshold is rounded to
    float32 precision. The exponential fit uses only arithmetic, so its payload is
    bit-identical on every backend; the gamma and generalized Pareto fits use the
    frameworks' own ``log``/``exp``, which differ from NumPy's in the last bit, and the
    rounding makes a difference in the payload require a float64 threshold within about
    one unit in the last place of a float32 rounding boundary (about 1 call in 2^28);
    such an instance states ``exact_across_backends = False``.

    Elements strictly above the threshold are sent, so a zero tensor sends nothing; the
    count is not bounded by ``ratio * n``: it is what the fit gives (none when the
    threshold exceeds every magnitude). Non-finite elements are left out of the fit and
    always sent. Wire size: ``count * (4 + itemsize)`` bytes (data-dependent:
    :meth:`payload_nbytes` is None and :meth:`payload_nbytes_for` gives the size for a
    count). Biased (``||x - C(x)|| <= ||x||``); residual memory, allgather.

    Args:
        ratio: target fraction of elements sent, in (0, 1) (default 0.01).
        distribution: ``"exponential"``, ``"gamma"`` or ``"gpareto"`` (default
            ``"exponential"``).
        stages: fitting stages, >= 1 (default 1).
    """

    def __init__(self, ratio: float = 0.01, distribution: str = "exponential", stages: int = 1):
        self.ratio = check_ratio(ratio)
        if self.ratio == 1.0:
            raise ValueError("ratio must be in (0, 1), got 1.0: a distribution's quantile cannot keep everything")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
        self.distribution = distribution
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an int >= 1, got {stages!r}")
        self.stages = stages

    @property
    def exact_across_backends(self) -> bool:  # type: ignore[override]
        """Only the exponential fit avoids the frameworks' own log/exp (see above)."""
        return self.distribution == "exponential"

    def thresholds(self, ops: Ops, x: Array, ctx: TensorContext) -> list[Array]:
        """The threshold after each stage, as 1-element float64 arrays (for tests and
        diagnostics; :meth:`compress` sends the elements above the last)."""
        return self._fit(ops, self._magnitudes(ops, x, ctx)[0], ctx)[1]

    @staticmethod
    def _magnitudes(ops: Ops, x: Array, ctx: TensorContext) -> tuple[Array, Array]:
        """(magnitudes in the compute dtype with non-finite elements as 0, the finite
        mask); the fits read them widened to float64, which is exact."""
        finite = ops.isfinite(x)
        return ops.where(finite, ops.abs(x), ops.zeros(1, ctx.dtype, x)), finite  # +0 broadcast

    def _fit(self, ops: Ops, mag: Array, ctx: TensorContext) -> tuple[Array, list[Array]]:
        log_delta = math.log(self.ratio) / self.stages  # ln of each stage's tail probability
        threshold = ops.zeros(1, "float64", mag)
        history = []
        a = zeros = None  # the float64 magnitudes, made only for the fits that need them
        for stage in range(self.stages):
            if stage == 0:
                excess, inside, count = None, None, float(ctx.numel)
                # summed widened, without a float64 copy of the tensor
                total = ops.tree_sum_in(mag, "float64") if ctx.numel else ops.zeros(1, "float64", mag)
                mean = total / count
            else:
                inside = a > threshold
                excess = ops.where(inside, a - threshold, zeros)
                count = at_least_one(ops, ops.cast(ops.count_true_array(inside), "float64"))
                mean = pairwise_sum(ops, excess, "float64") / count
            if self.distribution == "exponential":
                step = mean * -log_delta
            else:
                if a is None:
                    a = ops.cast(mag, "float64")
                    zeros = ops.zeros(ctx.numel, "float64", a)
                if self.distribution == "gamma" and stage == 0:
                    step = self._gamma_quantile(ops, a, mean, log_delta)
                else:
                    step = self._gpareto_quantile(ops, a if excess is None else excess, inside, mean, count,
                                                  log_delta, zeros)
            step = ops.where(step < 0, step * 0, step)  # a quantile below the location: send all above it
            threshold = _round_to_float32(ops, threshold + step)
            history.append(threshold)
            if a is None and stage + 1 < self.stages:
                a = ops.cast(mag, "float64")
                zeros = ops.zeros(ctx.numel, "float64", a)
        return threshold, history

    @staticmethod
    def _gamma_quantile(ops: Ops, a: Array, mean: Array, log_delta: float) -> Array:
        positive = mean > 0
        safe_mean = ops.where(positive, mean, mean * 0 + 1)
        mean_log = pairwise_sum(ops, ops.log(a + safe_mean * _LOG_OFFSET), "float64") * (1.0 / ops.numel(a))
        s = ops.log(safe_mean) - mean_log
        s = ops.where(s > 1e-12, s, s * 0 + 1e-12)  # s >= 0 in exact arithmetic
        shape = (3.0 - s + ops.sqrt((s - 3.0) * (s - 3.0) + 24.0 * s)) / (12.0 * s)
        shape = ops.minimum(shape, shape * 0 + _MAX_GAMMA_SHAPE)
        quantile = (safe_mean / shape) * -(_log_gamma(ops, shape) + log_delta)
        return ops.where(positive, quantile, mean * 0)

    @staticmethod
    def _gpareto_quantile(ops: Ops, excess: Array, inside: Array | None, mean: Array, count: Array,
                          log_delta: float, zeros: Array) -> Array:
        centered = excess - mean
        if inside is not None:
            centered = ops.where(inside, centered, zeros)
        var = pairwise_sum(ops, centered * centered, "float64") / count
        spread = var > 0
        r = mean * mean / ops.where(spread, var, var * 0 + 1)
        k = ops.where(spread, (r - 1.0) * 0.5, r * 0)  # no spread: the exponential limit
        sigma = ops.where(spread, mean * (r + 1.0) * 0.5, mean)
        near_zero = ops.abs(k) < _GP_EXPONENTIAL
        safe_k = ops.where(near_zero, k * 0 + 1, k)
        return ops.where(near_zero, sigma * -log_delta, sigma * (1.0 - ops.exp(safe_k * log_delta)) / safe_k)

    def _select(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        mag, finite = self._magnitudes(ops, x, ctx)
        threshold, _ = self._fit(ops, mag, ctx)
        # the threshold has float32 precision (and float32's range, or is inf), so the
        # comparison in the compute dtype is that of the widened magnitudes
        return ops.nonzero((mag > ops.cast(threshold, ctx.dtype)) | ~finite)
