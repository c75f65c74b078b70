"""Memories: per-tensor error feedback, keyed by tensor name."""

from __future__ import annotations

from .core import Compressor, Memory, TensorContext, note_fresh
from .ops import Array, Ops
from .payload import Payload
from .registry import register


@register("memory", "none", summary="No memory: what compression drops is lost.")
class NoMemory(Memory):
    """No error feedback."""

    needs_transmitted = False
    #: the fields of its per-tensor state (checked when a checkpoint is loaded)
    state_fields = ()

    def compensate(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        return x

    def update(self, ops, compensated, transmitted, ctx) -> None:
        return None


@register("memory", "residual",
          paper="Seide et al. 2014, 1-bit SGD (error feedback); Karimireddy et al. 2019, "
                "Error Feedback Fixes SignSGD",
          summary="Residual error feedback: add back what the last compression dropped.")
class ResidualMemory(Memory):
    """Residual error feedback: ``compensated = beta * residual + gamma * grad`` and
    ``residual = compensated - decompress(compress(compensated))``.

    A gradient with NaN or Inf values passes through to the aggregate (so that a loss
    scaler sees it and skips the step) but never reaches the residual: the previous
    residual is kept whole. The check runs on the device, without a host sync.

    Args:
        beta: weight of the stored residual (default 1.0).
        gamma: weight of the new gradient (default 1.0).
    """

    #: the fields of its per-tensor state (checked when a checkpoint is loaded)
    state_fields = ("residual",)

    def __init__(self, beta: float = 1.0, gamma: float = 1.0):
        super().__init__()
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.beta = float(beta)
        self.gamma = float(gamma)

    def compensate(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        residual = self._field(ops, ctx.name, "residual", x)
        if residual is None:
            return x * self.gamma if self.gamma != 1.0 else x
        if ops.numel(residual) != ctx.numel:
            raise ValueError(f"tensor {ctx.name!r} has {ctx.numel} elements but its residual has "
                             f"{ops.numel(residual)}: two tensors share one name")
        if self.beta == 1.0 and self.gamma == 1.0:
            return note_fresh(ctx, residual + x)
        return note_fresh(ctx, residual * self.beta + x * self.gamma)

    def update(self, ops: Ops, compensated: Array, transmitted: Array, ctx: TensorContext) -> None:
        self._keep(ops, compensated - transmitted, ctx)

    def update_from(self, ops: Ops, compensated: Array, payload: Payload, compressor: Compressor,
                    ctx: TensorContext) -> None:
        """Keep ``compressor.residual(compensated, payload)`` (the same bits as
        ``compensated`` minus the local decompression, which sparse compressors give
        without a dense decompression); a subclass that overrides :meth:`update` gets
        :meth:`update` instead."""
        if type(self).update is not ResidualMemory.update:  # a subclass with its own rule
            super().update_from(ops, compensated, payload, compressor, ctx)
            return
        # the compressor knows what it sent: sparse methods skip the dense decompression
        self._keep(ops, compressor.residual(ops, compensated, payload, ctx), ctx)

    def _keep(self, ops: Ops, residual: Array, ctx: TensorContext) -> None:
        previous = self._field(ops, ctx.name, "residual", residual)
        if previous is None:
            previous = ops.zeros(ctx.numel, ctx.dtype, residual)
        finite = ops.all_finite(residual)
        keep = self._finite_update(ops, finite, ctx, "residual")
        self.state.setdefault(ctx.name, {})["residual"] = self._pick(ops, finite, keep, residual, previous)


@register("memory", "signum_momentum",
          paper="Bernstein et al. 2018, signSGD: Compressed Optimisation for Non-Convex Problems (Signum)",
          summary="Per-tensor momentum for Signum: compress the momentum, not the gradient.")
class SignumMomentum(Memory):
    """Signum's momentum: ``compensated = m = momentum * m_prev + (1 - momentum) * grad``
    (``m_prev = 0`` at the first step), kept per tensor name under the field
    ``"momentum"``. Nothing else is stored: the compressor sends the sign of ``m``.

    A gradient with NaN or Inf values passes through to the compressor (and so to the
    aggregate) but never reaches the stored momentum: the previous momentum is kept
    whole. The check runs on the device, without a host sync.

    Args:
        momentum: weight of the previous momentum, in [0, 1) (default 0.9; 0 gives
            signSGD).
    """

    needs_transmitted = False
    #: keeps a momentum: refused with an optimizer's momentum (see :mod:`grace_dl.checks`)
    carries_momentum = True
    #: the fields of its per-tensor state (checked when a checkpoint is loaded)
    state_fields = ("momentum",)

    def __init__(self, momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def compensate(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        previous = self._field(ops, ctx.name, "momentum", x)
        fresh = x * (1.0 - self.momentum) if self.momentum else x
        if previous is None:
            return fresh
        if ops.numel(previous) != ctx.numel:
            raise ValueError(f"tensor {ctx.name!r} has {ctx.numel} elements but its momentum has "
                             f"{ops.numel(previous)}: two tensors share one name")
        return previous * self.momentum + fresh if self.momentum else fresh

    def update(self, ops: Ops, compensated: Array, transmitted: Array | None, ctx: TensorContext) -> None:
        previous = self._field(ops, ctx.name, "momentum", compensated)
        if previous is None:
            previous = ops.zeros(ctx.numel, ctx.dtype, compensated)
        finite = ops.all_finite(compensated)
        keep = self._finite_update(ops, finite, ctx, "momentum")
        self.state.setdefault(ctx.name, {})["momentum"] = self._pick(ops, finite, keep, compensated, previous)
