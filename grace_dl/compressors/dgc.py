"""Deep Gradient Compression (Lin et al. 2018): a sampled threshold adapted to a target
density, with its momentum-correction memory."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ..core import Compressor, Memory, TensorContext
from ..ops import Array, Ops
from ..payload import Payload
from ..registry import register
from .sign import pairwise_sum
from .threshold import ThresholdSparsifier, magnitudes
from .topk import check_ratio, k_for, sent_elements

#: density of the first warm-up step: the paper's 75% sparsity
WARMUP_START_DENSITY = 0.25


def _check_momentum(momentum: float) -> float:
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    return float(momentum)


def _check_clip_norm(clip_norm: float | None) -> float | None:
    if clip_norm is None:
        return None
    if not 0.0 < clip_norm < math.inf:
        raise ValueError(f"clip_norm must be None or a finite number > 0, got {clip_norm}")
    return float(clip_norm)


@register("compressor", "dgc", paper="Lin et al. 2018, Deep Gradient Compression: Reducing the "
          "Communication Bandwidth for Distributed Training",
          summary="Threshold estimated on a sample and cut to the target density; momentum correction "
                  "and factor masking, local clipping, warm-up of sparsity; allgather.")
class DGC(ThresholdSparsifier):
    """Deep Gradient Compression (Lin et al. 2018): send about ``ratio * n`` elements
    of the accumulated velocity, chosen by a threshold that is cheap to find.

    Selection, as the paper's implementation describes it:

    1. the target count is ``k = max(1, floor(density * n))``;
    2. the threshold is estimated on a sample of ``s = max(1, floor(sample_ratio * n))``
       elements: the ``ceil(density * s)``-th largest sampled magnitude;
    3. every non-zero element at or above the threshold is selected; when more than
       ``k`` are, the ``k`` largest of them are kept (a top-k over the selected ones
       only; ties go to the lower index). Fewer than ``k`` may be sent, never more, and
       the sent elements are always the largest ones, so ``C`` is a contraction:
       ``||x - C(x)||^2 <= (1 - count / n) ||x||^2`` with ``count >= 1`` for ``x != 0``.

    The sample is systematic rather than random: every ``n // s``-th element, starting
    at ``step mod (n // s)``, so successive steps sample different elements, no random
    generator is involved and the payload is bit-identical on every backend. The
    padded top-k of step 3 has a size known before running, so nothing syncs with the
    host but the selection's own data-dependent length.

    Warm-up of sparsity: over the first ``warmup_steps`` steps of a tensor the density
    decays exponentially from 0.25 to ``ratio``, ``density(t) = 0.25 *
    (ratio / 0.25) ** (t / warmup_steps)``, then stays at ``ratio`` (with
    ``warmup_steps=4`` and ``ratio=0.001`` this is the paper's 75%, 93.7%, 98.4%, 99.6%,
    99.9% sparsity; a ``ratio`` above 0.25 has no warm-up).

    Momentum correction, momentum factor masking and local gradient clipping (the
    clipping threshold scaled by ``world_size ** -0.5``) live in the ``dgc_momentum``
    memory, DGC's default: ``momentum`` and ``clip_norm`` given to ``grace_dl.dgc(...)``
    configure it (the factory passes every keyword to each component that takes it).
    This compressor only validates them; with another memory they have no effect.

    Wire size: ``count * (4 + itemsize)`` bytes with ``count <= k`` (data-dependent:
    :meth:`payload_nbytes` is None and :meth:`payload_nbytes_for` gives the size for a
    count). NaN and Inf elements rank above every finite one. Contraction; allgather.

    Args:
        ratio: target density after warm-up, in (0, 1] (default 0.001).
        sample_ratio: fraction of the elements sampled to estimate the threshold, in
            (0, 1] (default 0.01).
        momentum: momentum of the ``dgc_momentum`` memory, in [0, 1) (default 0.9).
        clip_norm: the memory's local gradient-clipping norm before scaling by
            ``world_size ** -0.5``, or None for no clipping (default None).
        warmup_steps: steps of exponential warm-up of sparsity, >= 0 (default 0).
    """

    bias = "contraction"
    memory = "dgc_momentum"
    communicator = "allgather"

    def __init__(self, ratio: float = 0.001, sample_ratio: float = 0.01, momentum: float = 0.9,
                 clip_norm: float | None = None, warmup_steps: int = 0):
        self.ratio = check_ratio(ratio)
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
        self.sample_ratio = float(sample_ratio)
        self.momentum = _check_momentum(momentum)
        self.clip_norm = _check_clip_norm(clip_norm)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps

    @property
    def warmup_horizon(self) -> int:
        """The first step at the final density: ``warmup_steps``, or 0 where there is no
        warm-up (``ratio`` at or above 0.25)."""
        return self.warmup_steps if self.ratio < WARMUP_START_DENSITY else 0

    def density(self, step: int) -> float:
        """The target density at a tensor's ``step`` (warm-up schedule)."""
        # no warm-up is decided without comparing the step; a step that is not an integer
        # is the step tensor of TensorFlow's graph path, which traces the warm-up steps
        # with their int values and only the later ones with the tensor
        if (not self.warmup_steps or self.ratio >= WARMUP_START_DENSITY or not isinstance(step, numbers.Integral)
                or step >= self.warmup_steps):
            return self.ratio
        return WARMUP_START_DENSITY * (self.ratio / WARMUP_START_DENSITY) ** (step / self.warmup_steps)

    def _counts(self, step: int, n: int, s: int) -> tuple[int, int]:
        """``(k, rank)`` at ``step``: the target count among ``n`` elements and the rank
        of the threshold among ``s`` sampled magnitudes."""
        density = self.density(step)
        return k_for(density, n), min(s, max(1, math.ceil(density * s)))

    def _counts_in_range(self, ops: Ops, x: Array, ctx: TensorContext, n: int, s: int) -> tuple[Any, Any, int]:
        """``(k, rank, most k)`` for a symbolic step that takes the warm-up steps of
        ``ctx.step_range``: ``k`` and ``rank`` looked up at the step in tables of every
        step's ints (so that they are those of the int steps bit for bit), and the
        largest ``k`` of the range (the padding of the selection)."""
        start, stop = ctx.step_range
        counts = np.array([self._counts(t, n, s) for t in range(start, stop)], np.int64)
        if counts[:, 0].max() >= n:
            raise ValueError(f"tensor {ctx.name!r}: steps {start}..{stop - 1} of DGC's warm-up keep every "
                             f"element at some step; trace those steps apart")
        table = ops.from_numpy(counts, x)
        row = ctx.step - start
        return table[row, 0], table[row, 1], int(counts[:, 0].max())

    def _select(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        n = ctx.numel
        s = min(n, max(1, int(self.sample_ratio * n)))
        if ctx.step_range is not None and ctx.step_range[0] < self.warmup_horizon:
            # a symbolic step within the warm-up (TensorFlow's graph path): k varies at run time
            k, rank, padding = self._counts_in_range(ops, x, ctx, n, s)
        else:
            k, rank = self._counts(ctx.step, n, s)
            padding = k
            # "not below" and "not at most" are true for NaN, so the selections below are
            # those of the NaN-safe magnitudes (NaN as +inf), which are built only for the
            # sample and the chosen elements
            if k >= n:
                return ops.nonzero_magnitude_at_least(x, 0.0)
        stride = n // s
        start = ctx.step % stride
        sample = magnitudes(ops, x[start:start + stride * s:stride], ctx.dtype)
        threshold = ops.kth_largest(sample, rank)
        chosen = ops.nonzero_magnitude_at_least(x, threshold)
        count = ops.length(chosen)
        if isinstance(count, int):  # the count is known on the host: no padding needed
            if count <= k:
                return chosen
            return ops.gather(chosen, ops.topk_indices(magnitudes(ops, ops.gather(x, chosen), ctx.dtype), k))
        # inside tf.function: keep the k largest of the chosen with padding entries
        # (magnitude -1, index -1, at least k of them) that make the candidates at least
        # k long whatever their count; the same selection as above
        candidates = ops.concat([magnitudes(ops, ops.gather(x, chosen), ctx.dtype),
                                 ops.zeros(padding, ctx.dtype, x) - 1])
        kept = ops.gather(ops.concat([chosen, ops.zeros(padding, "int64", x) - 1]), ops.topk_indices(candidates, k))
        return ops.gather(kept, ops.nonzero(kept >= 0))


def clip_by_norm(ops: Ops, g: Array, clip_norm: float, ctx: TensorContext) -> Array:
    """``g`` scaled down to L2 norm ``clip_norm / sqrt(world_size)`` if it is longer.
    The norm is summed in float64 in a fixed order, so that every backend scales alike;
    a ``g`` within the bound is returned unchanged (its scale is exactly 1)."""
    bound = clip_norm / math.sqrt(ctx.world_size)
    wide = ops.cast(g, "float64")
    norm = ops.sqrt(pairwise_sum(ops, wide * wide, "float64"))
    limit = ops.zeros(1, "float64", g) + bound
    return g * ops.cast(limit / ops.where(norm > limit, norm, limit), ctx.dtype)


@register("memory", "dgc_momentum",
          paper="Lin et al. 2018, Deep Gradient Compression (momentum correction, momentum factor masking)",
          summary="DGC's momentum correction: accumulate the local momentum into a velocity that is "
                  "compressed, and clear both where elements were sent.")
class DGCMomentum(Memory):
    """DGC's momentum correction and momentum factor masking (Lin et al. 2018).

    Per tensor it keeps the momentum ``u`` (field ``"momentum"``) and the velocity ``v``
    (field ``"velocity"``). For a gradient ``g`` (first clipped, see ``clip_norm``)::

        u = momentum * u + g            (nesterov: u = momentum * (u + g))
        v = v + u                       (nesterov: v = v + u + g)

    and ``v`` is what the compressor sends from. Afterwards ``v`` keeps what was not
    sent (``v - transmitted``) and ``u`` is zeroed where an element was sent (momentum
    factor masking), so that stale momentum does not push a sent element again.

    An element counts as sent where the local decompression is non-zero. DGC sends only
    non-zero values; with a compressor that sends an exact zero, that element's ``v`` is
    zero either way and only its ``u`` keeps accumulating, as for an element that was
    not selected, which is harmless.

    A gradient with NaN or Inf values passes through to the compressor (and so to the
    aggregate) but never reaches the state: ``u`` and ``v`` keep their previous values
    whole when either new one has a non-finite element. The check runs on the device,
    without a host sync.

    Args:
        momentum: momentum of the correction, in [0, 1) (default 0.9).
        nesterov: Nesterov momentum (default False).
        clip_norm: local gradient clipping: ``g`` is scaled to L2 norm at most
            ``clip_norm / sqrt(world_size)``, or None for no clipping (default None).
    """

    needs_transmitted = True
    #: keeps a momentum: refused with an optimizer's momentum (see :mod:`grace_dl.checks`)
    carries_momentum = True
    #: the fields of its per-tensor state (checked when a checkpoint is loaded)
    state_fields = ("momentum", "velocity")

    def __init__(self, momentum: float = 0.9, nesterov: bool = False, clip_norm: float | None = None):
        super().__init__()
        self.momentum = _check_momentum(momentum)
        self.nesterov = bool(nesterov)
        self.clip_norm = _check_clip_norm(clip_norm)
        # the momentum of the step in flight, between compensate and update
        self._pending: dict[str, Array] = {}

    def _previous(self, ops: Ops, key: str, like: Array, ctx: TensorContext) -> Array:
        value = self._field(ops, ctx.name, key, like)
        if value is None:
            return ops.zeros(ctx.numel, ctx.dtype, like)
        if ops.numel(value) != ctx.numel:
            raise ValueError(f"tensor {ctx.name!r} has {ctx.numel} elements but its {key} has "
                             f"{ops.numel(value)}: two tensors share one name")
        return value

    def compensate(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        g = clip_by_norm(ops, x, self.clip_norm, ctx) if self.clip_norm is not None else x
        u = self._previous(ops, "momentum", x, ctx)
        v = self._previous(ops, "velocity", x, ctx)
        if self.nesterov:
            u = (u + g) * self.momentum
            v = v + u + g
        else:
            u = u * self.momentum + g
            v = v + u
        self._pending[ctx.name] = u
        return v

    def update_from(self, ops: Ops, compensated: Array, payload: Payload, compressor: Compressor,
                    ctx: TensorContext) -> None:
        """:meth:`update`, bit for bit; for a threshold sparsifier's payload it touches
        only the sent elements of ``u`` and ``v`` instead of decompressing densely."""
        if not isinstance(compressor, ThresholdSparsifier) or type(self).update is not DGCMomentum.update:
            super().update_from(ops, compensated, payload, compressor, ctx)
            return
        # a sparse payload: touch only the sent elements (the result of update, bit for bit)
        u = self._pending.pop(ctx.name, None)
        if u is None:
            raise RuntimeError(f"update of tensor {ctx.name!r} without compensate first")
        idx, values = sent_elements(ops, compensated, payload, ctx)
        # u and the compensated velocity are this step's own arrays (compensate made
        # them), used no more after this: updated in place, no full-size copies
        v = ops.index_subtract(compensated, idx, values, consume=True)
        # u is cleared where the local decompression is non-zero
        u_sent = ops.gather(u, idx)
        masked_u = ops.index_update(u, idx, ops.where(values != 0, ops.zeros(1, ctx.dtype, u), u_sent),  # +0 broadcast
                                    consume=True)
        self._keep(ops, masked_u, masked_u, v, ctx)

    def update(self, ops: Ops, compensated: Array, transmitted: Array | None, ctx: TensorContext) -> None:
        u = self._pending.pop(ctx.name, None)
        if u is None:
            raise RuntimeError(f"update of tensor {ctx.name!r} without compensate first")
        if transmitted is None:
            raise ValueError("dgc_momentum needs the local decompression to mask what was sent")
        zeros = ops.zeros(ctx.numel, ctx.dtype, compensated)
        self._keep(ops, u, ops.where(transmitted != 0, zeros, u), compensated - transmitted, ctx)

    def _keep(self, ops: Ops, u: Array, masked_u: Array, v: Array, ctx: TensorContext) -> None:
        """Store the new momentum (``u`` masked) and velocity, or keep the previous ones
        whole when ``u`` or ``v`` holds a NaN or an Inf.

        Only ``v`` is checked: it covers ``u``. The stored velocity is always finite
        (zeros at first, a checkpoint's are checked, a non-finite update is never kept),
        so where ``u`` is NaN or infinite the compensated velocity (the stored one plus
        ``u``, and ``g``) is too, and so is what is kept of it, sent or not (``inf - inf``
        is NaN). One pass over the tensor fewer."""
        finite = ops.all_finite(v)
        state = self.state.setdefault(ctx.name, {})
        previous_u = self._previous(ops, "momentum", u, ctx)
        previous_v = self._previous(ops, "velocity", v, ctx)
        keep = self._finite_update(ops, finite, ctx, "momentum and velocity")
        state["momentum"] = self._pick(ops, finite, keep, masked_u, previous_u)
        state["velocity"] = self._pick(ops, finite, keep, v, previous_v)
