"""Checks of the torch adapters that need the framework: ranks that do not all run
grace-dl under stock ``hvd.DistributedOptimizer``, and one method object per DDP hook.

grace-dl on one rank and Horovod's own compression (``hvd.Compression.none``/``fp16``)
on another: grace-dl hands Horovod an empty placeholder for each gradient, so Horovod
pairs a tensor of shape ``[0]`` with the other rank's gradient and reports "Mismatched
ALLREDUCE tensor shapes: One rank sent a tensor of shape [0] ...", which names neither
cause. On the rank that runs grace-dl that error is re-raised as a
:class:`CompressionMismatchError` that says what is wrong; the other rank runs no
grace-dl code and shows Horovod's message.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from ..handshake import HandshakeError


class CompressionMismatchError(HandshakeError):
    """This rank runs grace-dl compression and another rank does not."""


def mixed_compression_message(horovod_message: str) -> str:
    """The explanation of Horovod's mismatch error when one side is grace-dl's empty
    placeholder."""
    return (f"Horovod reports: {horovod_message.strip()} The tensor of shape [0] is grace-dl's placeholder: this "
            f"rank runs a grace-dl method as compression=, and another rank does not (Horovod's own "
            f"hvd.Compression.none or fp16, or no compression=). Every rank must pass the same compression=")


def _is_placeholder_mismatch(err: BaseException) -> bool:
    text = str(err)
    return "Mismatched" in text and "shape [0]" in text


def explain_mixed_compression(optimizer: Any) -> None:
    """Make the stock Horovod ``optimizer``'s ``synchronize`` (which ``step`` calls)
    re-raise Horovod's shape mismatch against grace-dl's placeholder as a
    :class:`CompressionMismatchError` naming the likely cause (idempotent)."""
    current = getattr(optimizer, "synchronize", None)
    if current is None or getattr(current, "_grace_explains", False):
        return

    @functools.wraps(current)
    def synchronize(*args: Any, **kwargs: Any) -> Any:
        try:
            return current(*args, **kwargs)
        except Exception as err:  # noqa: BLE001  (only Horovod's mismatch is explained)
            if _is_placeholder_mismatch(err):
                raise CompressionMismatchError(mixed_compression_message(str(err))) from err
            raise

    synchronize._grace_explains = True  # type: ignore[attr-defined]
    optimizer.synchronize = synchronize


def claim_owner(table: dict[int, "weakref.ref[Any]"], grace: Any, owner: Any, what: str, fix: str) -> None:
    """Record in ``table`` that ``grace`` serves ``owner`` (an optimizer, a DDP comm hook);
    raise ValueError when it already serves another ``what`` that is still alive. A method
    keeps its per-tensor state (residuals, momenta, step counters) under tensor names, so
    two owners whose tensors share names would silently share it. A freed owner releases
    the method. ``owner=None`` only checks that ``grace`` serves no live owner yet."""
    key = id(grace)
    held = table.get(key)
    current = held() if held is not None else None
    if current is owner or (owner is None and current is None):
        return
    if current is not None:
        raise ValueError(
            f"this grace-dl method object ({grace!r}) already serves another {what} "
            f"({type(current).__name__}): its state (residuals, momenta, step counters) is kept per "
            f"parameter name, so the two would share it. Give each its own method object: "
            f"{fix}.fresh_copy() (or a second grace_dl.torch.<method>(...) call)")
    if held is None:
        weakref.finalize(grace, table.pop, key, None)
    table[key] = weakref.ref(owner)


# id(method object) -> weak reference to the DDP comm hook it serves
_HOOKED: dict[int, "weakref.ref[Any]"] = {}


def claim_for_hook(grace: Any, hook: Any) -> None:
    """Record that ``grace`` serves the DDP comm hook ``hook``; raise ValueError when it
    already serves another hook that is still alive: each hook names its parameters
    (``param<k>`` in the order DDP hands them over, or the model's names), so two hooks
    (two models) would share the method's per-name state. A freed hook releases it."""
    claim_owner(_HOOKED, grace, hook, "DDP comm hook (another model)", "method")
