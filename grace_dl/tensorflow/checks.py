"""Checks of the Horovod TF adapter that see a whole step: which variables have a
gradient on each rank, and which model a method object serves.

A variable whose gradient is ``None`` on one rank only (its loss does not depend on the
variable there) breaks stock Horovod's TF path: Horovod allreduces only the gradients
that exist, so that rank posts fewer collectives than the others and the ranks pair
collectives of different tensors. With Horovod's own compression the job hangs; with
grace-dl it failed deep inside a collective (``UnknownError: Graph execution error``,
a ``TensorScatterUpdate`` or Horovod's "Mismatched data types"). So, before the first
pipeline of each call of Horovod's ``allreduce_grads`` (``DistributedGradientTape`` and the
Keras ``DistributedOptimizer``; on the graph path, where which gradients are None is fixed
per trace, when the step is traced with a gradient set not checked before), every rank
allgathers a 16-byte digest of the names of the variables it has gradients for; ranks that
differ exchange the names' hashes and raise :class:`GradientMismatchError` on every rank,
naming the variables. Cost: one allgather of 16 bytes per worker and step (per new trace on
the graph path; not counted in ``grace.stats``).

A method's first such allgather waits at most :data:`FIRST_STEP_TIMEOUT_S` seconds: a rank
that runs Horovod's own compression (or none) never posts grace-dl's collectives, and
Horovod's TF collectives have no time-out, so the job would hang; instead this rank raises
:class:`CompressionMismatchError` and its exit ends the job. So does the check of a step
traced again with new gradients (one turned None at a later step on one rank only, so that
rank alone retraces while the others run their old trace): that rank raises
:class:`GradientMismatchError` naming the variables.

One method object keeps state per tensor name; two live models trained with one object
(two tapes, or two Keras optimizers) would share it whenever their variables share names.
The first time a method sees a name it remembers that variable (weakly); the same name
from another live variable is refused.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import weakref
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from ..handshake import HandshakeError, _ordinal


class GradientMismatchError(HandshakeError):
    """Ranks have gradients for different variables in one step (see
    :mod:`grace_dl.tensorflow.checks`)."""


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def _captured(tensor: Any) -> Any:
    """The tensor of the enclosing graph that ``tensor`` captures (Horovod compresses
    inside a ``tf.cond`` branch, where its gradient is a captured placeholder)."""
    for _ in range(16):
        captures = getattr(getattr(tensor, "graph", None), "captures", None) or ()
        outer = next((external for external, internal in captures if internal is tensor), None)
        if outer is None:
            return tensor
        tensor = outer
    return tensor


def _allreduce_call(tensor: Any) -> tuple[list[Any], list[Any]] | None:
    """``(grads, vars)`` of the Horovod ``allreduce_grads`` call that is compressing
    ``tensor`` (read from its frame), or None outside one."""
    target = _captured(tensor)
    frame = sys._getframe(2)
    for _ in range(120):
        if frame is None:
            return None
        if frame.f_code.co_name.endswith("allreduce_grads"):
            grads, variables = frame.f_locals.get("grads"), frame.f_locals.get("vars")
            if grads is not None and any(g is target or g is tensor for g in grads):
                return list(grads), list(variables or [])
        frame = frame.f_back
    return None


def _labels(grads: list[Any], variables: list[Any]) -> list[str]:
    """The variables' names as the adapter names their tensors (Keras 3 variables have a
    ``path``; a name that occurs twice gets its position appended)."""
    names = [str(getattr(v, "path", None) or getattr(v, "name", None) or f"grad_{i}")
             for i, v in enumerate(variables[:len(grads)])]
    names += [f"grad_{i}" for i in range(len(names), len(grads))]
    counts = {n: names.count(n) for n in names}
    return [f"{n}#{i}" if counts[n] > 1 else n for i, n in enumerate(names)]


# per method object: tensor name -> weak reference to the variable it came from
_SERVED: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


def _check_one_model(grace: Any, name: str, variable: Any) -> None:
    """Refuse ``name`` from ``variable`` when ``grace`` already serves another live
    variable of that name (two models sharing one method object)."""
    if variable is None:
        return
    served = _SERVED.setdefault(grace, {})
    known = served.get(name)
    owner = known() if known is not None else None
    if owner is None:
        try:
            served[name] = weakref.ref(variable)
        except TypeError:  # a variable that takes no weak reference: not tracked
            pass
        return
    if owner is not variable:
        raise ValueError(
            f"this grace-dl method object ({grace!r}) already serves another variable named {name!r}: its state "
            f"(residuals, momenta, step counters) is kept per name, so two models (two tapes or two Keras "
            f"optimizers) would share it. Give each model its own method object: method.fresh_copy() (or a "
            f"second grace_dl.tensorflow.<method>(...) call)")


def gradient_sets(grace: Any, tensor: Any) -> tuple[list[str], list[str]] | None:
    """``(present, absent)``: the names of the variables with and without a gradient in
    the Horovod ``allreduce_grads`` call compressing ``tensor``, when ``tensor`` is the
    call's first gradient and the ranks' gradient sets are to be compared (None for the
    other gradients, outside Horovod's call, on one worker, or with ``grace.handshake =
    False``, which turns the first-step handshake off as well); checks at once that
    ``grace`` serves one model.

    Args:
        grace: the method object (a bound :class:`~grace_dl.tensorflow.HorovodTFGrace`).
        tensor: the gradient Horovod hands its ``compress``.
    """
    call = _allreduce_call(tensor)
    if call is None:
        return None
    grads, variables = call
    target = _captured(tensor)
    index = next(i for i, g in enumerate(grads) if g is target or g is tensor)
    names = _labels(grads, variables)
    _check_one_model(grace, names[index], variables[index] if index < len(variables) else None)
    first = next(i for i, g in enumerate(grads) if g is not None)
    if (index != first or grace.transport is None or grace.transport.size == 1
            or not getattr(grace, "handshake", True)):
        return None
    present = [n for n, g in zip(names, grads) if g is not None]
    absent = [n for n, g in zip(names, grads) if g is None]
    return present, absent


#: seconds that a method's first collective waits for the other ranks before it concludes
#: that they run no grace-dl (environment variable GRACE_DL_FIRST_STEP_TIMEOUT)
FIRST_STEP_TIMEOUT_S = float(os.environ.get("GRACE_DL_FIRST_STEP_TIMEOUT", "30"))

# method objects whose first check completed
_AGREED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _bounded_allgather(transport: Any, digest: np.ndarray, name: str,
                       timeout_error: Callable[[], BaseException]) -> list[Any]:
    """A digest allgather that waits at most :data:`FIRST_STEP_TIMEOUT_S` seconds for the
    other ranks, then raises ``timeout_error()``: Horovod's TF collectives wait for ever
    (they have no time-out), and the other ranks may never post this one (they run
    Horovod's own compression, or a step they traced before). The collective runs in a
    daemon thread, so that this rank can give up, raise, and end the job."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def gather() -> None:
        try:
            result.extend(transport.wait(transport.allgather_async(tf.constant(digest), name, equal_sizes=True)))
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
            failure.append(err)

    worker = threading.Thread(target=gather, name="grace-gradient-check", daemon=True)
    worker.start()
    worker.join(FIRST_STEP_TIMEOUT_S)
    if failure:
        raise failure[0]
    if worker.is_alive():
        raise timeout_error()
    return result


def _no_answer_at_first_step(rank: int) -> "CompressionMismatchError":
    return CompressionMismatchError(
        f"rank {rank}: no answer from the other ranks in grace-dl's first collective within "
        f"{FIRST_STEP_TIMEOUT_S:g} s. A rank that runs Horovod's own compression (hvd.Compression.none or "
        f"fp16) or no compression= posts none of grace-dl's collectives, and Horovod would wait for ever: every "
        f"rank must pass the same compression=. (If a rank is only slow to reach its first step, set "
        f"GRACE_DL_FIRST_STEP_TIMEOUT to more seconds.)")


def _no_answer_after_retrace(rank: int, present: list[str], absent: list[str],
                             before: tuple[str, ...]) -> "GradientMismatchError":
    gone = [n for n in before if n not in present]
    new = [n for n in present if n not in before]
    changes = []
    if gone:
        named = ", ".join(map(repr, gone[:5]))
        changes.append(f"rank {rank} has no gradient (None) for {named}, which it had when the step was last traced"
                       if set(gone) <= set(absent) else
                       f"rank {rank} has no gradient for {named}, which it had when the step was last traced")
    if new:
        changes.append(f"rank {rank} has a gradient for {', '.join(map(repr, new[:5]))}, which it had none for "
                       f"when the step was last traced")
    if not changes:
        changes.append(f"rank {rank} has gradients for the same variables as when the step was last traced, "
                       f"in another order")
    return GradientMismatchError(
        "ranks have gradients for different variables in this step: " + "; ".join(changes) + f". Rank {rank} "
        f"traced the step again for it, and the other ranks did not answer grace-dl's gradient check within "
        f"{FIRST_STEP_TIMEOUT_S:g} s: they did not trace the step again and run the one traced before, with "
        f"gradients for the variables of then. Horovod allreduces only the gradients that exist, so the ranks "
        f"would exchange different tensors and wait for ever. Make the loss depend on every trainable variable on "
        f"every rank and at every step (adding 0.0 * tf.reduce_sum(v) is enough). (If the other ranks are only "
        f"more than {FIRST_STEP_TIMEOUT_S:g} s behind, set GRACE_DL_FIRST_STEP_TIMEOUT to more seconds.)")


class CompressionMismatchError(HandshakeError):
    """This rank runs grace-dl compression and the other ranks never answered its first
    collective (they run Horovod's own compression, or none)."""


def check_same_gradients(grace: Any, present: list[str], absent: list[str],
                         traced_before: tuple[str, ...] | None = None) -> None:
    """Raise :class:`GradientMismatchError` on every rank unless every rank of
    ``grace.transport`` has gradients for the variables ``present`` (in that order).

    A method's first check waits at most :data:`FIRST_STEP_TIMEOUT_S` seconds for the
    other ranks (then :class:`CompressionMismatchError`), and so does a check made while
    the step is traced again with gradients other than ``traced_before`` (then
    :class:`GradientMismatchError`, since the other ranks run their old trace); later
    checks wait as long as the other ranks take.

    Args:
        grace: the bound method object.
        present: this rank's variables with a gradient, in Horovod's order.
        absent: this rank's variables whose gradient is None (used to name them).
        traced_before: on the graph path, the gradient set the ranks agreed on when the
            step was last traced (None: the first trace, or a check at every step).
    """
    transport = grace.transport
    hashes = np.array([_name_hash(n) for n in present], dtype=np.int64)
    digest = np.array([len(present), _name_hash("\n".join(present))], dtype=np.int64)
    name = f"grace.gradients.{_ordinal(grace)}"
    if grace not in _AGREED:
        gathered = _bounded_allgather(transport, digest, name, lambda: _no_answer_at_first_step(transport.rank))
        _AGREED.add(grace)
    elif traced_before is not None:
        gathered = _bounded_allgather(
            transport, digest, name,
            lambda: _no_answer_after_retrace(transport.rank, present, absent, traced_before))
    else:
        gathered = transport.wait(transport.allgather_async(tf.constant(digest), name, equal_sizes=True))
    digests = [np.asarray(g).reshape(-1) for g in gathered]
    if all(np.array_equal(d, digest) for d in digests):
        return
    # they differ (every rank sees it): exchange the names' hashes to say which variables
    everyone = transport.wait(transport.allgather_async(tf.constant(hashes), name + ".names"))
    raise GradientMismatchError(_describe(transport.rank, present, absent, [np.asarray(e).reshape(-1)
                                                                            for e in everyone]))


# per method object: the gradient sets (names in Horovod's order) that every rank agreed on
# when a step was traced
_TRACED: "weakref.WeakKeyDictionary[Any, list[tuple[str, ...]]]" = weakref.WeakKeyDictionary()


def check_traced_gradients(grace: Any, present: list[str], absent: list[str]) -> None:
    """The gradient check of the graph path, run eagerly while Horovod traces a step
    (which gradients are None is fixed per trace).

    A gradient set that the ranks agreed on at an earlier trace is not checked again, so
    that a rank may retrace alone with the same gradients (an input of another shape on
    that rank only) without posting a collective the others never post. A new set is
    checked with a bounded wait (:data:`FIRST_STEP_TIMEOUT_S`): a rank that retraces
    alone because a gradient turned None there (or came back) gets no answer, since the
    other ranks run the step they traced before, and raises
    :class:`GradientMismatchError` naming the variables; its exit ends the job.

    Args:
        grace: the bound method object.
        present: this rank's variables with a gradient, in Horovod's order.
        absent: this rank's variables whose gradient is None.
    """
    agreed = _TRACED.setdefault(grace, [])
    gradient_set = tuple(present)
    if gradient_set in agreed:
        return
    check_same_gradients(grace, present, absent, traced_before=agreed[-1] if agreed else None)
    agreed.append(gradient_set)


def _describe(rank: int, present: list[str], absent: list[str], everyone: list[np.ndarray]) -> str:
    mine = {_name_hash(n): n for n in present}
    by_hash = {_name_hash(n): n for n in absent}
    problems = []
    for other, theirs in enumerate(everyone):
        if other == rank:
            continue
        theirs_set = set(theirs.tolist())
        lacking = [n for h, n in mine.items() if h not in theirs_set]
        extra = [h for h in theirs_set if h not in mine]
        named = [by_hash[h] for h in extra if h in by_hash]
        if lacking:
            problems.append(f"rank {other} has no gradient (None) for {', '.join(map(repr, lacking[:5]))}, "
                            f"which rank {rank} has")
        if named:
            problems.append(f"rank {rank} has no gradient (None) for {', '.join(map(repr, named[:5]))}, "
                            f"which rank {other} has")
        if len(extra) > len(named):  # Keras leaves variables without a gradient out of the list
            problems.append(f"rank {rank} has no gradient for {len(extra) - len(named)} variable(s) that rank "
                            f"{other} has (see rank {other}'s message for their names)")
        if not lacking and not extra:
            problems.append(f"ranks {rank} and {other} have gradients for the same variables in another order")
    return ("ranks have gradients for different variables in this step: " + "; ".join(problems) + ". Horovod "
            "allreduces only the gradients that exist, so the ranks would exchange different tensors. Make the "
            "loss depend on every trainable variable on every rank (adding 0.0 * tf.reduce_sum(v) is enough), or "
            "pass the same variables on every rank")
