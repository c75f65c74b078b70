"""Checks of how a method is combined with the rest of a training setup, and of the state
it is given.

Momentum applied twice: a method whose memory keeps a momentum (DGC's momentum
correction, Signum's momentum) already sends a momentum-accumulated tensor; an optimizer
that applies its own momentum to the aggregate then applies momentum a second time, and
training diverges (DGC with ``SGD(momentum=0.9)``: loss 2.3 -> 383 in 150 steps on a
small MLP). The reference DGC implementation switches the optimizer's momentum off for
the compressed parameters; grace-dl leaves the optimizer alone and refuses the
combination instead, with a message saying what to change.

A memory declares that it keeps a momentum with the class attribute
``carries_momentum = True`` and its coefficient in the attribute ``momentum`` (a
memory built with ``momentum=0`` keeps none). A compressor may declare the same (1-bit
Adam keeps Adam's momentum; its parameter is named in ``momentum_param``). A method
whose compressor declares ``returns_update = True`` hands back an optimizer's update
direction (1-bit Adam's ``m_hat / (sqrt(v_hat) + eps)``): an adaptive optimizer (Adam)
on top of it is refused too (see :func:`adaptive_optimizer_message`).
"""

from __future__ import annotations

import warnings
from typing import Any


class NonFiniteWarning(RuntimeWarning):
    """A NaN or Inf gradient made a memory skip its state update for a step (said once
    per memory object; see :func:`announce_skipped_update`)."""


def announce_skipped_update(memory: Any, ctx: Any, fields: str) -> None:
    """Warn (:class:`NonFiniteWarning`) that ``memory`` kept its ``fields`` of tensor
    ``ctx.name`` from the step before, because this step's gradient held NaN or Inf.
    Called once per memory object: later skipped updates are silent, as AMP's
    ``GradScaler`` skips steps without a word (the non-finite aggregate is the signal)."""
    kind = getattr(type(memory), "registry_name", type(memory).__name__)
    warnings.warn(
        f"grace-dl: tensor {ctx.name!r} held NaN or Inf at step {ctx.step} on rank {ctx.rank}: the {kind} memory "
        f"kept its {fields} of the step before (the non-finite values still reach the aggregate, so that a loss "
        f"scaler skips the step). Said once per method object; later skipped updates are not announced",
        NonFiniteWarning, stacklevel=2)


def memory_momentum(memory: Any) -> float:
    """The momentum coefficient that ``memory`` applies to the gradients (0 for a memory
    that keeps no momentum)."""
    if not getattr(type(memory), "carries_momentum", False):
        return 0.0
    return float(getattr(memory, "momentum", 0.0) or 0.0)


def own_momenta(grace: Any) -> list[tuple[str, float]]:
    """``(memory name, momentum)`` of every memory of ``grace`` (the main one and those of
    per-name policy overrides) that applies a momentum > 0; a compressor that keeps a
    momentum itself (1-bit Adam) counts under its memory's name."""
    routes = [(grace.memory, grace.compressor)]
    routes += [(route.memory, route.compressor) for _, route in getattr(grace.policies, "overrides", ())]
    found = []
    for memory, compressor in routes:
        momentum = memory_momentum(memory) or memory_momentum(compressor)
        if momentum > 0:
            found.append((getattr(type(memory), "registry_name", type(memory).__name__), momentum))
    return found


def momentum_param(grace: Any) -> str:
    """The name of the method parameter that sets its own momentum (``momentum``, or
    what the compressor names in ``momentum_param``: 1-bit Adam's ``beta1``)."""
    return getattr(type(grace.compressor), "momentum_param", "momentum")


def adaptive_optimizer_message(grace: Any, optimizer: str = "the optimizer") -> str | None:
    """The error message when ``grace`` hands back an update direction (its compressor
    declares ``returns_update``) and ``optimizer`` (a description) is adaptive (Adam,
    RMSprop ...); None when ``grace`` hands back gradients."""
    if not getattr(type(grace.compressor), "returns_update", False):
        return None
    method = getattr(type(grace.compressor), "registry_name", type(grace.compressor).__name__)
    return (f"{method} hands back Adam's update direction, and {optimizer} is adaptive: it would apply Adam to "
            f"Adam's direction. Use plain SGD without momentum (torch.optim.SGD(params, lr), "
            f"tf.keras.optimizers.SGD(lr)); {method} takes Adam's betas and eps itself")


def double_momentum_message(grace: Any, optimizer_momentum: float, optimizer: str = "the optimizer") -> str | None:
    """The error message when ``grace`` keeps its own momentum and ``optimizer`` (a
    description, e.g. ``"SGD"``) has ``optimizer_momentum`` > 0; None when they combine
    safely."""
    if not optimizer_momentum > 0:
        return None
    momenta = own_momenta(grace)
    if not momenta:
        return None
    memory, momentum = momenta[0]
    method = getattr(type(grace.compressor), "registry_name", type(grace.compressor).__name__)
    return (f"{method} keeps its own momentum ({memory} memory, momentum={momentum:g}) and {optimizer} has "
            f"momentum={optimizer_momentum:g}: momentum would be applied twice and training diverges. "
            f"Set momentum=0 in {optimizer}; the method's momentum then takes its place (set it with "
            f"grace.{method}(..., {momentum_param(grace)}={momentum:g}))")


def check_optimizer_momentum(grace: Any, optimizer_momentum: float, optimizer: str = "the optimizer") -> None:
    """Raise ValueError when ``grace`` keeps its own momentum and the optimizer applies
    a momentum too (see :func:`double_momentum_message`)."""
    message = double_momentum_message(grace, optimizer_momentum, optimizer)
    if message is not None:
        raise ValueError(message)


def check_state(grace: Any, state: dict[str, Any]) -> None:
    """Refuse method state (:meth:`~grace_dl.core.Grace.state_dict`) that does not fit
    ``grace``: fields that its memory does not keep (state saved by another method; a
    memory declares its fields in ``state_fields``) and NaN or Inf values (which error
    feedback would add to every later gradient). Raises ValueError naming the tensor and
    field."""
    import numpy as np

    routes = [("", grace.memory, state.get("memory", {}))]
    for pattern, memory_state in (state.get("overrides") or {}).items():
        route = dict(grace.policies.overrides).get(pattern)
        if route is not None:
            routes.append((f" (override {pattern!r})", route.memory, memory_state))
    for where, memory, tensors in routes:
        expected = getattr(type(memory), "state_fields", None)
        for name, fields in (tensors or {}).items():
            for key, value in fields.items():
                if expected is not None and key not in expected:
                    kept = ", ".join(expected) or "nothing"
                    raise ValueError(f"state of tensor {name!r}{where} has a field {key!r}, but the "
                                     f"{getattr(type(memory), 'registry_name', type(memory).__name__)} memory keeps "
                                     f"{kept}: the state was saved by another method")
                array = np.asarray(value)
                if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
                    if not np.all(np.isfinite(array.astype(np.float64))):
                        raise ValueError(f"state of tensor {name!r}{where}, field {key!r}, holds NaN or Inf "
                                         f"values: error feedback would add them to every later gradient; "
                                         f"resume from an earlier checkpoint")
