"""Plug grace-dl into stock, unpatched ``horovod.torch``.

``HorovodTorchTransport`` runs grace-dl's collectives on Horovod's torch ops.
``HorovodCompression`` is what ``hvd.DistributedOptimizer(..., compression=...)``
receives: Horovod calls ``compress(tensor)``, allreduces what it returns, and calls
``decompress(output, ctx)``. Our ``compress`` runs the whole grace pipeline up to the
start of the exchange (on our own, asynchronous, collective, so allgather methods work)
and hands Horovod an empty tensor, whose allreduce costs nothing; ``decompress`` waits
for our exchange and returns the aggregated gradient. The exchange therefore starts when
Horovod's gradient hook fires, overlapping the rest of the backward pass. By default
(``background``, see :class:`HorovodCompression`) the hook only hands the gradient to one
background thread, which runs the pipelines and posts the collectives while the autograd
thread goes on with backward; ``decompress`` (in the optimizer's ``step()``) waits for it.
From the second step on, Horovod no longer allreduces the placeholders either: see
:func:`skip_placeholder_allreduces`.
The allreduces of all pipelines of a step go to Horovod as one per round (PowerSGD:
one for every ``P``, then one for every ``Q``): see :class:`RoundBatcher`.

Stock Horovod's ``Compressor.compress`` receives no tensor name, but per-tensor state
(error feedback) needs one. It is read from Horovod's optimizer frame (``self`` and
``p`` in ``_allreduce_grad_async`` / ``_grouped_allreduce_grad_async`` of Horovod
0.28), where the name Horovod itself uses is ``self._parameter_names[p]``.

With the method's ``policies.fusion_bytes`` set, small gradients are fused
(:mod:`grace_dl.fusion`): the buckets are planned once from the optimizer's parameters
(reversed: the order Horovod's hooks fire in), each member's ``compress`` hands Horovod
its empty placeholder, and the last member to arrive starts the bucket's one pipeline.

:func:`DistributedOptimizer` is the explicit form: Horovod's own optimizer with a
grace-dl method, whose ``state_dict()`` also carries the method's state (see there).
"""

from __future__ import annotations

import hashlib
import math
import queue
import sys
import threading
import time
import weakref
from typing import Any, Iterable

import numpy as np
import torch

from ..checks import adaptive_optimizer_message, check_optimizer_momentum
from ..core import Grace
from ..fusion import Fuser
from ..ops import DTYPE_ITEMSIZE
from ..transport.base import Transport, horovod_membership
from .checks import claim_owner, explain_mixed_compression
from .ops import TorchOps

_OPS = TorchOps()
_CPU = torch.empty(0)

#: Whether :class:`HorovodCompression` runs its pipelines on a background thread by
#: default (see there; measured in docs/bench.md, "Compression off the backward thread").
DEFAULT_BACKGROUND = True

#: how often (seconds) the background thread looks for completed rounds while
#: pipelines are in flight and no gradient arrives
_POLL_S = 0.005

#: how often (seconds), at the most, a pipeline being finished looks for completed rounds
#: of the other pipelines in flight, whose next rounds it posts while it waits; 0 waits on
#: its own collectives only (then a later pipeline's second round waits for the earlier
#: ones)
_FINISH_POLL_S = 0.0004

#: the first wait (seconds) between those looks, doubled up to _FINISH_POLL_S while no
#: round completes and started again when one does: a collective that completes within a
#: fraction of a millisecond is seen then, and a long wait costs at most 2500 looks a
#: second (torch, 2 ranks, digits MLP, fused: with 1 ms looks PowerSGD's step took 6.3
#: ms, topk's 3.4; with these 3.5 and 2.2)
_FINISH_POLL_FIRST_S = 0.0001

#: how long (seconds) the step after a failed one waits for the collectives the failed
#: step had posted and never waited for, before saying that they never completed
_ABANDONED_WAIT_S = 60.0

#: The default of :class:`HorovodCompression`'s ``round_batch_bytes``: the allreduces of
#: every pipeline of a step travel as one Horovod allreduce per round (see
#: :class:`RoundBatcher`; measured in docs/bench.md, "One Horovod allreduce per round").
DEFAULT_ROUND_BATCH_BYTES = sys.maxsize

#: the key, in the first parameter group of an optimizer's ``state_dict()``, under which
#: :func:`DistributedOptimizer` keeps the method's state
STATE_KEY = "grace_dl"


class HorovodTorchTransport(Transport):
    """grace-dl collectives over ``horovod.torch`` (initialised by the caller).

    Horovod has no bfloat16 collectives: bfloat16 buffers travel as their int16 bits,
    and a bfloat16 allreduce becomes an allgather summed here in rank order (the
    simulator's order, so results stay bit-identical; the bytes counted are those of
    the allreduce the method asked for).
    """

    def __init__(self, process_set: Any = None):
        import horovod.torch as hvd

        self.hvd = hvd
        self._ps, self.rank, self.size = horovod_membership(hvd, process_set)
        #: hold allreduces (but bfloat16's) as :class:`_Deferred` handles until
        #: :meth:`post_batch` posts them together (set by :class:`HorovodCompression`)
        self.defer_allreduces = False

    def allreduce_async(self, buf, name):
        if buf.dtype == torch.bfloat16:
            return ("sum", self.allgather_async(buf, name, equal_sizes=True))
        if self.defer_allreduces:
            return ("deferred", _Deferred(buf, name))
        return ("reduce", self.hvd.allreduce_async(buf, name=name, op=self.hvd.Sum, **self._ps))

    def post_batch(self, deferred: list["_Deferred"], name: str) -> None:
        """Post the held allreduces ``deferred`` as one Horovod allreduce per dtype (their
        flat buffers concatenated in the given order, which every worker must share)
        under ``name``; each then reads its slice of the sum. The sum is elementwise, so
        every element gets the value its own allreduce would have given."""
        by_dtype: dict[torch.dtype, list[_Deferred]] = {}
        for item in deferred:
            by_dtype.setdefault(item.buf.dtype, []).append(item)
        for dtype, items in by_dtype.items():
            offset = 0
            for item in items:
                item.offset = offset
                offset += item.buf.numel()
            flat = torch.cat([item.buf.reshape(-1) for item in items]) if len(items) > 1 else items[0].buf.reshape(-1)
            label = name if len(by_dtype) == 1 else f"{name}.{str(dtype).rpartition('.')[2]}"
            batch = _Batch(self.hvd.allreduce_async(flat, name=label, op=self.hvd.Sum, **self._ps))
            for item in items:
                item.batch = batch

    def allgather_async(self, buf, name, equal_sizes=False):
        flat = buf.reshape(-1)
        if flat.dtype == torch.bfloat16:
            flat = flat.view(torch.int16)
        data = self.hvd.allgather_async(flat, name=name, **self._ps)
        sizes = None
        if not equal_sizes:
            count = torch.tensor([buf.numel()], dtype=torch.int64)
            sizes = self.hvd.allgather_async(count, name=name + ".sizes", **self._ps)
        return ("gather", data, sizes, buf.numel(), buf.dtype)

    def broadcast_async(self, buf, root, name):
        if buf.dtype == torch.bfloat16:
            return ("bits", self.hvd.broadcast_async(buf.view(torch.int16), root_rank=root, name=name, **self._ps))
        return ("reduce", self.hvd.broadcast_async(buf, root_rank=root, name=name, **self._ps))

    def ready(self, handle) -> bool:
        """Whether the collective of ``handle`` has completed (never blocks)."""
        kind = handle[0]
        if kind in ("reduce", "bits"):
            return self.hvd.poll(handle[1])
        if kind == "deferred":
            batch = handle[1].batch
            return batch is not None and (batch.result is not None or self.hvd.poll(batch.handle))
        if kind == "sum":
            return self.ready(handle[1])
        _, data, sizes, _, _ = handle
        return self.hvd.poll(data) and (sizes is None or self.hvd.poll(sizes))

    def wait(self, handle):
        if handle[0] == "reduce":
            return self.hvd.synchronize(handle[1])
        if handle[0] == "deferred":
            item = handle[1]
            if item.batch is None:
                raise RuntimeError(f"allreduce {item.name!r} is held for a batch that was never posted (a tensor "
                                   f"of its batch did not come in this step)")
            if item.batch.result is None:
                item.batch.result = self.hvd.synchronize(item.batch.handle)
            numel = item.buf.numel()
            return item.batch.result[item.offset:item.offset + numel]
        if handle[0] == "bits":
            return self.hvd.synchronize(handle[1]).view(torch.bfloat16)
        if handle[0] == "sum":
            parts = self.wait(handle[1])
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            return total
        _, data, sizes, mine, dtype = handle
        flat = self.hvd.synchronize(data)
        if flat.dtype != dtype:
            flat = flat.view(dtype)
        counts = [mine] * self.size if sizes is None else self.hvd.synchronize(sizes).tolist()
        return list(torch.split(flat, counts))


class _Deferred:
    """An allreduce a pipeline asked for, held until its round's batch is posted."""

    __slots__ = ("buf", "name", "batch", "offset")

    def __init__(self, buf: torch.Tensor, name: str):
        self.buf = buf
        self.name = name
        self.batch: _Batch | None = None
        self.offset = 0


class _Batch:
    """One Horovod allreduce carrying several held allreduces; its result once waited for."""

    __slots__ = ("handle", "result")

    def __init__(self, handle: Any):
        self.handle = handle
        self.result: torch.Tensor | None = None


def _posted(handle: Any) -> bool:
    """Whether the collective of ``handle`` went to Horovod (a held allreduce goes with its batch)."""
    return handle[0] != "deferred" or handle[1].batch is not None


def _unposted(pending: Any) -> list[_Deferred]:
    """The held allreduces of ``pending``'s current round not yet in a batch."""
    return [h[1] for h in pending.handles if h[0] == "deferred" and h[1].batch is None]


class RoundBatcher:
    """One Horovod allreduce per round for a group of pipelines, instead of one per
    pipeline and round.

    Each allreduce is a negotiation between the workers in Horovod's background thread,
    and a collective posted alone is often negotiated alone, one cycle after another:
    PowerSGD over the 21 matrices of a ResNet-18 made 42 of them per step, each with its
    own wait, where torch's ``powerSGD_hook`` makes two (all ``P`` factors in one
    allreduce, then all ``Q``). Here the pipelines of a step are split into groups of
    consecutive pipelines (in the order their gradients come, until adding the next would
    pass ``batch_bytes`` of gradient; one group for the whole step by default), and the
    allreduces a pipeline asks for are held (:class:`_Deferred`) until every unfinished
    pipeline of its group has asked for its next round; then they are posted as one
    allreduce per dtype (their buffers concatenated in group order), and every pipeline
    reads its slice of the result. The decision depends only on what the pipelines ask
    for, never on timing, so every worker batches the same collectives in the same order.
    The sum is elementwise, so results are those of separate allreduces, bit for bit.
    Allgathers, broadcasts and bfloat16 allreduces (allgathers on Horovod) are posted at
    once, as before; a pipeline that waits on one holds back its group's batch.

    Args:
        pipelines: ``(pipeline name, gradient bytes)`` of a step, in ready order (a
            bucket's name for fused tensors).
        batch_bytes: the largest group in gradient bytes; a pipeline of that many bytes or
            more is a group of its own.
    """

    def __init__(self, pipelines: list[tuple[str, int]], batch_bytes: int):
        self.batch_bytes = batch_bytes
        self.groups: list[list[str]] = []
        size = 0
        for name, nbytes in pipelines:
            if not self.groups or size + nbytes > batch_bytes:
                self.groups.append([])
                size = 0
            self.groups[-1].append(name)
            size += nbytes
        self._group_of = {name: i for i, group in enumerate(self.groups) for name in group}
        self._live: list[dict[str, Any]] = [{} for _ in self.groups]  # group -> name -> its pending this step
        #: a pipeline of this step failed: its group would wait for it forever, so every
        #: held allreduce goes out alone (as without batching) until :meth:`reset`
        self.broken = False

    def started(self, pending: Any) -> None:
        """Record a pipeline started in this step."""
        index = self._group_of.get(pending.ctx.name)
        if index is not None:
            live = self._live[index]
            if pending.ctx.name in live:  # a pipeline starts once per step: the others are a past step's
                live = self._live[index] = {}
            live[pending.ctx.name] = pending

    def post_ready(self, transport: HorovodTorchTransport, in_flight: list[Any]) -> None:
        """Post the round of every group whose unfinished pipelines have all asked for it,
        and at once the held allreduces of pipelines in ``in_flight`` outside every group
        (a tensor the plan did not list)."""
        if self.broken:
            for pending in in_flight:
                for item in _unposted(pending):
                    transport.post_batch([item], item.name)
            return
        for index, group in enumerate(self.groups):
            live = self._live[index]
            if len(live) < len(group):
                continue  # some pipelines have not started in this step
            waiting = [live[name] for name in group if not live[name].done]
            if not waiting:
                self._live[index] = {}  # the group is done for this step
                continue
            rounds = [_unposted(p) for p in waiting]
            if all(rounds):
                held = [item for items in rounds for item in items]
                names = [item.name for item in held]
                digest = hashlib.blake2b("\0".join(names).encode(), digest_size=4).hexdigest()
                transport.post_batch(held, f"grace.batch[{names[0]}..{names[-1]};{len(names)};{digest}]")
        for pending in in_flight:
            if pending.ctx.name not in self._group_of:
                for item in _unposted(pending):
                    transport.post_batch([item], item.name)

    def reset(self) -> None:
        """Forget this step's pipelines (after an error)."""
        self._live = [{} for _ in self.groups]
        self.broken = False


def _horovod_caller(tensor: torch.Tensor) -> tuple[str, Any]:
    """(name, optimizer) of the Horovod optimizer call that is compressing ``tensor``.

    The frames searched are Horovod's ``_allreduce_grad_async(self, p)`` and, for
    ``groups=``, the list comprehension inside ``_grouped_allreduce_grad_async`` (its own
    frame on Python 3.11, where ``self`` is a free variable and ``p`` the loop variable).
    """
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            break
        local = frame.f_locals
        opt, param = local.get("self"), local.get("p")
        names = getattr(opt, "_parameter_names", None)
        if isinstance(names, dict) and isinstance(param, torch.Tensor):
            name = names.get(param)
            if name is not None:
                return name, opt
        frame = frame.f_back
    raise RuntimeError(
        "grace-dl compression was called outside horovod.torch.DistributedOptimizer, so the "
        "tensor's name is unknown; call grace.step(tensor, name) yourself, or pass this object "
        "only as hvd.DistributedOptimizer(..., compression=...)"
    )


def _check_op(hvd: Any, optimizer: Any) -> Any:
    """Horovod's reduction op of ``optimizer``; Adasum is refused."""
    if hasattr(optimizer, "_starting_models") and not hasattr(optimizer, "op"):
        # Horovod's Adasum optimizer (op=hvd.Adasum on more than one worker)
        raise ValueError("grace-dl compression supports op=hvd.Average and op=hvd.Sum, not hvd.Adasum: "
                         "Adasum combines model deltas pairwise, which a compressed exchange cannot do")
    op = getattr(optimizer, "op", hvd.Average)
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("grace-dl compression supports op=hvd.Average and op=hvd.Sum, not hvd.Adasum")
    return op


def optimizer_momentum(optimizer: Any) -> float:
    """The largest ``momentum`` among the parameter groups of a torch optimizer (0 for
    optimizers without one, such as Adam)."""
    values = [group.get("momentum", 0.0) for group in getattr(optimizer, "param_groups", ())]
    return max((float(v) for v in values if isinstance(v, (int, float))), default=0.0)


def refuse_double_momentum(optimizer: Any, grace: Grace) -> None:
    """Raise ValueError when ``grace`` keeps its own momentum (DGC, Signum) and the torch
    ``optimizer`` applies a momentum too, which would apply momentum twice (see
    :mod:`grace_dl.checks`)."""
    check_optimizer_momentum(grace, optimizer_momentum(optimizer),
                             f"the optimizer ({type(optimizer).__name__})")
    if optimizer_is_adaptive(optimizer):
        message = adaptive_optimizer_message(grace, f"the optimizer ({type(optimizer).__name__})")
        if message is not None:
            raise ValueError(message)


def optimizer_is_adaptive(optimizer: Any) -> bool:
    """Whether a torch optimizer scales its steps by gradient statistics (Adam and its
    variants, which have ``betas``; Adagrad, Adadelta, RMSprop)."""
    if type(optimizer).__name__ in ("Adagrad", "Adadelta", "RMSprop"):
        return True
    return any("betas" in group for group in getattr(optimizer, "param_groups", ()))


#: id(method object) -> weak reference to the optimizer it serves (see :func:`claim_method`)
_SERVED: dict[int, "weakref.ref[Any]"] = {}


def claim_method(grace: Grace, optimizer: Any) -> None:
    """Record that ``grace`` serves ``optimizer``; raise ValueError if it already serves
    another optimizer that is still alive.

    A method keeps its per-tensor state (residuals, momenta, step counters) under the
    parameter names, so two optimizers whose parameters share names (two copies of one
    model, or Horovod's default ``allreduce.noname.<i>``) would silently share it: each
    step would advance the step counters twice and mix one model's residuals into the
    other's gradients. An optimizer that has been freed releases its method.

    Args:
        grace: the method object.
        optimizer: the (Horovod) optimizer that is about to use it; None only checks that
            ``grace`` serves no live optimizer yet.
    """
    claim_owner(_SERVED, grace, optimizer, "optimizer", "compression")


def placeholder_for(tensor: torch.Tensor) -> torch.Tensor:
    """The empty tensor handed to Horovod in place of ``tensor``'s gradient: of the
    same dtype and device, except that bfloat16 becomes float32, which Horovod can
    allreduce (it has no bfloat16 collectives; the result is ignored either way)."""
    dtype = torch.float32 if tensor.dtype == torch.bfloat16 else tensor.dtype
    return torch.empty(0, dtype=dtype, device=tensor.device)


def ready_order(optimizer: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of the parameters a Horovod optimizer exchanges, in the
    order their gradients are expected (the parameters' order reversed, as DDP assumes):
    the input of the fusion plan (:mod:`grace_dl.fusion`), the same on every worker."""
    names = getattr(optimizer, "_parameter_names", {})
    order = []
    for group in getattr(optimizer, "param_groups", ()):
        for p in group.get("params", ()):
            if p.requires_grad and p in names:
                order.append((names[p], tuple(p.shape), _OPS.dtype(p)))
    return order[::-1]


class _Job:
    """One gradient handed to the background thread: its pipeline's ticket, then its
    result or what its pipeline raised."""

    __slots__ = ("name", "ticket", "result", "error", "queued", "requested", "done")

    def __init__(self, name: str, queued: bool = False):
        self.name = name
        self.ticket: Any = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.queued = queued  # handed to the background thread
        self.requested = False  # its finish was queued
        self.done = threading.Event()


class _Background:
    """The thread that runs one :class:`HorovodCompression`'s pipelines, in the order the
    gradients were handed over, so that per-tensor state and random draws see the same
    sequence as without it. Every use of the method's state goes through it.

    Torch kernels release the GIL, so compression runs while the autograd thread goes on
    with the backward pass; Horovod's collectives are posted from here (Horovod matches
    them across workers by name, from any thread). Between gradients it polls the
    collectives in flight and posts later rounds (PowerSGD's second allreduce) as soon as
    the earlier ones complete.
    """

    def __init__(self, owner: "HorovodCompression"):
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        # the thread holds its owner weakly and ends once the owner is collected
        self._thread = threading.Thread(target=self._run, args=(weakref.ref(owner), self._queue),
                                        name="grace-dl-compression", daemon=True)
        self._thread.start()
        weakref.finalize(owner, self._queue.put, ("stop", None))
        _LIVE.add(self)
        self._threads = 0  # the torch thread count last handed to the thread

    def put(self, item: tuple) -> None:
        threads = torch.get_num_threads()  # the training thread's
        if threads != self._threads:
            # torch.set_num_threads reaches a thread's BLAS (OpenMP's per-thread setting)
            # only when called on that thread: without this, PowerSGD's products there
            # ran on every core while the training thread and the other ranks wanted
            # them (MLP, 2 ranks, one torch thread: 15-20 -> 8 ms per step)
            self._threads = threads
            self._queue.put(("threads", threads))
        self._queue.put(item)

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on the thread, after everything handed over before; its result
        (or its exception, raised here)."""
        job = _Job("a call on the method's state")
        self.put(("call", job, fn))
        self.wait(job)
        if job.error is not None:
            raise job.error
        return job.result

    def wait(self, job: _Job) -> None:
        """Wait for ``job``; raise RuntimeError if the thread died (it never should)."""
        while not job.done.wait(1.0):
            if not self._thread.is_alive():
                raise RuntimeError(f"grace-dl's compression thread ended unexpectedly before finishing "
                                   f"{job.name}")

    @staticmethod
    def _run(owner_ref: "weakref.ref[HorovodCompression]", jobs: "queue.SimpleQueue[Any]") -> None:
        torch.set_grad_enabled(False)  # thread-local; gradients need no graph
        polling = False
        while True:
            try:
                item = jobs.get(timeout=_POLL_S) if polling else jobs.get()
            except queue.Empty:
                item = ("poll", None)
            if item[0] == "stop":
                return
            if item[0] == "threads":
                torch.set_num_threads(item[1])
                continue
            owner = owner_ref()
            if owner is None:
                return
            _Background._serve(owner, item)
            polling = bool(owner._in_flight)
            del owner

    @staticmethod
    def _serve(owner: "HorovodCompression", item: tuple) -> None:
        kind, job = item[0], item[1]
        if kind == "poll":
            owner.progress()
        elif kind == "start":  # nobody waits for it: an error waits for its finish
            try:
                owner._start(job, *item[2:])
            except BaseException as err:  # noqa: BLE001  (raised by decompress, on the training thread)
                job.error = err
        elif kind == "finish":  # job: the jobs to finish, in order
            failed: BaseException | None = None
            for each in job:
                if failed is not None:  # never waited for: the training thread raises the first error
                    each.error = RuntimeError(f"{each.name} was not exchanged: the exchange of an earlier "
                                              f"tensor failed ({failed})")
                else:
                    try:
                        each.result = owner._finish(each)
                    except BaseException as err:  # noqa: BLE001
                        each.error = failed = err
                        owner._reset()
                each.done.set()
        else:  # "call"
            try:
                job.result = item[2]()
            except BaseException as err:  # noqa: BLE001
                job.error = err
            job.done.set()


#: the background threads still running, stopped before the interpreter exits
_LIVE: "weakref.WeakSet[_Background]" = weakref.WeakSet()


def _stop_background_threads() -> None:
    """Stop every idle background thread and wait a little for busy ones, so that none
    runs torch or Horovod code while the interpreter finalizes (a daemon thread caught
    in a C++ frame then aborts the process). A thread stuck in a collective whose peer
    died is left behind (it is a daemon)."""
    workers = list(_LIVE)
    for worker in workers:
        worker.put(("stop", None))
    for worker in workers:
        worker._thread.join(timeout=2.0)


# before the interpreter joins its threads and runs atexit (Horovod's shutdown among them)
getattr(threading, "_register_atexit", __import__("atexit").register)(_stop_background_threads)


class HorovodCompression:
    """A grace-dl method in the shape of Horovod's ``Compressor``.

    Horovod's options are honoured as Horovod defines them: ``op=hvd.Average`` gives the
    method's aggregate (the mean for most methods), ``op=hvd.Sum`` that times the number
    of workers, and ``gradient_predivide_factor=f`` scales the gradient by ``1/f``
    before compression and the aggregate by ``f`` after it (Horovod's prescale and
    postscale; the ``1/N`` of the average is the method's mean). Unlike Horovod, the
    factor is also applied with ``groups=``, whose grouped allreduce ignores it.

    With ``background`` (the default, :data:`DEFAULT_BACKGROUND`), Horovod's gradient
    hook only hands the gradient to a background thread and returns; that thread runs
    the pipelines (compensation, compression, memory update, the collectives and their
    later rounds) in the order the gradients arrived, while backward goes on, and
    ``decompress`` (Horovod's ``synchronize()``, called by ``step()``) waits for the
    results. What a pipeline raises is raised there, on the training thread, with its
    own message; the results and the method's state are those of the pipeline run in the
    hook, bit for bit. Without it, the pipeline runs inside the hook, on the autograd
    thread. Either way, the pipelines are finished in arrival order, and while one is
    waited for, the later rounds of the others (PowerSGD's second allreduce) are posted
    as soon as their first rounds complete, not one pipeline after another.

    One object serves one optimizer: a second optimizer using it raises ValueError at its
    first step (see :func:`claim_method`); :meth:`fresh_copy` gives each its own.

    From the optimizer's second step on, Horovod's own allreduce of the empty placeholder
    (one per gradient, each a negotiation round between the workers) is skipped, unless
    ``placeholder_allreduce`` (see :func:`skip_placeholder_allreduces`).

    The allreduces of a step's pipelines travel as one Horovod allreduce per round (all
    ``P`` factors of PowerSGD in one, then all ``Q``), unless ``round_batch_bytes`` says
    otherwise (see :class:`RoundBatcher`); results are bit for bit those of one allreduce
    per pipeline and round.

    Args:
        grace: the method (a :class:`~grace_dl.core.Grace`); bound to a
            :class:`HorovodTorchTransport` on first use.
        background: run the pipelines on a background thread (default None:
            :data:`DEFAULT_BACKGROUND`).
        placeholder_allreduce: let Horovod allreduce the placeholder of every gradient
            at every step, as before grace-dl skipped them (default False; for
            measurements).
        round_batch_bytes: batch the allreduces of groups of consecutive pipelines of up
            to this many gradient bytes into one Horovod allreduce per round; 0 posts each
            pipeline's own, as before (default None: :data:`DEFAULT_ROUND_BATCH_BYTES`, the
            whole step in one group). May be changed between steps.
    """

    def __init__(self, grace: Grace, background: bool | None = None, placeholder_allreduce: bool = False,
                 round_batch_bytes: int | None = None):
        self.grace = grace
        self.background = DEFAULT_BACKGROUND if background is None else bool(background)
        self.placeholder_allreduce = bool(placeholder_allreduce)
        if round_batch_bytes is None:
            round_batch_bytes = DEFAULT_ROUND_BATCH_BYTES
        if isinstance(round_batch_bytes, bool) or not isinstance(round_batch_bytes, int) or round_batch_bytes < 0:
            raise ValueError(f"round_batch_bytes must be an int >= 0, got {round_batch_bytes!r}")
        self.round_batch_bytes = round_batch_bytes
        self._plan: Any = None  # (name, shape, dtype) of the optimizer's gradients, in ready order
        self._batcher: RoundBatcher | None = None
        self._checked_optimizer: Any = None
        self._in_flight: list[Any] = []  # pipelines started and not finished, oldest first
        # id(pending) -> (pending, what its pipeline raised in progress()); holding the
        # pending keeps its id from being reused by a later one
        self._failed: dict[int, tuple[Any, Exception]] = {}
        # handles of collectives a failed step posted and never waited for (see _reset)
        self._abandoned: list[Any] = []
        self._fuser = Fuser(grace)
        self._planned_for: Any = None  # the optimizer whose parameters the buckets were planned from
        self._worker: _Background | None = None
        self._unrequested: list[_Job] = []  # jobs handed to the thread whose finish is not queued yet
        self._direct_for: Any = None  # weak reference to the optimizer that no longer allreduces placeholders

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start the grace pipeline for ``tensor`` (or hand it to the background thread);
        Horovod allreduces the returned empty tensor (in the first step only, see
        :func:`skip_placeholder_allreduces`)."""
        name, optimizer = _horovod_caller(tensor)
        return self.compress_named(tensor, name, optimizer)

    def compress_named(self, tensor: torch.Tensor, name: str, optimizer: Any) -> tuple[torch.Tensor, Any]:
        """:meth:`compress` for a gradient whose name and Horovod optimizer are known.

        Args:
            tensor: the gradient.
            name: its name (the optimizer's ``_parameter_names[p]``).
            optimizer: the Horovod ``DistributedOptimizer`` exchanging it.
        Returns:
            the placeholder for Horovod and the context :meth:`decompress` takes.
        """
        import horovod.torch as hvd

        op = _check_op(hvd, optimizer)
        if optimizer is not self._checked_optimizer:
            claim_method(self.grace, optimizer)
            refuse_double_momentum(optimizer, self.grace)
            explain_mixed_compression(optimizer)  # Horovod's shape error vs our placeholder, explained
            self._checked_optimizer = optimizer
        absorb_broadcast_state(optimizer, self)
        if self.grace.transport is None:
            self.grace.bind(HorovodTorchTransport(getattr(optimizer, "process_set", None)))
        factor = float(getattr(optimizer, "gradient_predivide_factor", 1.0)) if op == hvd.Average else 1.0
        plan = None
        if optimizer is not self._planned_for:
            plan = ready_order(optimizer)
            self._planned_for = optimizer
        post = self.grace.transport.size if op == hvd.Sum else factor
        if self.background:
            if self._worker is None:
                self._worker = _Background(self)
            job = _Job(f"tensor {name!r}", queued=True)
            self._unrequested.append(job)
            self._worker.put(("start", job, tensor, name, factor, plan))
            return placeholder_for(tensor), (job, post)
        job = _Job(f"tensor {name!r}")
        try:
            self._start(job, tensor, name, factor, plan)
        except BaseException:
            self._reset()  # raised out of backward: the step is over, and nothing finishes its pipelines
            raise
        return placeholder_for(tensor), (job, post)

    def _start(self, job: _Job, tensor: torch.Tensor, name: str, factor: float, plan: Any) -> None:
        """Start the pipeline of ``tensor`` (its bucket's, once complete); sets ``job.ticket``."""
        if plan is not None:
            self._fuser.plan(plan)
            self._plan, self._batcher = plan, None
        self._settle_abandoned()
        self._use_batcher()
        if factor != 1.0:
            tensor = tensor * (1.0 / factor)
        self.progress()
        try:
            ticket = self._fuser.start(tensor, name)
        except BaseException:
            if self._batcher is not None:  # its group will never be complete in this step
                self._batcher.broken = True
                self._batcher.post_ready(self.grace.transport, self._in_flight)
            raise
        pending = ticket.started
        if ticket.opened and not pending.done:
            self._in_flight.append(pending)
            if self._batcher is not None:
                self._batcher.started(pending)
                self._batcher.post_ready(self.grace.transport, self._in_flight)
        job.ticket = ticket

    def _use_batcher(self) -> None:
        """Group this step's pipelines for :class:`RoundBatcher` (once per plan and
        ``round_batch_bytes``; between steps, when no pipeline is in flight)."""
        transport = self.grace.transport
        wanted = self.round_batch_bytes if isinstance(transport, HorovodTorchTransport) and self._plan else 0
        current = 0 if self._batcher is None else self._batcher.batch_bytes
        if wanted == current or any(not p.done for p in self._in_flight):
            return
        self._batcher = None
        if wanted:
            pipelines, seen = [], set()
            for name, shape, dtype in self._plan:
                bucket = self._fuser.bucket_of(name)
                key = name if bucket is None else bucket.name
                if key not in seen:
                    seen.add(key)
                    numel = math.prod(shape) if bucket is None else bucket.numel
                    pipelines.append((key, numel * DTYPE_ITEMSIZE[dtype]))
            self._batcher = RoundBatcher(pipelines, wanted)
        if isinstance(transport, HorovodTorchTransport):
            transport.defer_allreduces = self._batcher is not None

    def progress(self) -> bool:
        """Move on every started pipeline whose collectives have completed: its next
        round (PowerSGD's second allreduce, the exchange after a handshake or a norm
        round) is posted now, while backward goes on, instead of when the optimizer
        waits for it. Never blocks; called for each gradient (and, on the background
        thread, whenever it is idle). Horovod matches collectives by name, so ranks may
        post these rounds at different moments. Returns whether any pipeline moved on."""
        transport = self.grace.transport
        still = []
        moved = False
        for pending in self._in_flight:
            try:
                while not pending.done and all(transport.ready(h) for h in pending.handles):
                    self.grace.advance(pending)
                    moved = True
            except Exception as err:  # noqa: BLE001  (re-raised by decompress)
                # raised where it always is, in the optimizer's step: from a gradient hook
                # it would stop backward at a different tensor on each rank and leave
                # Horovod's collectives of the others half posted
                self._failed[id(pending)] = (pending, err)
                if self._batcher is not None:
                    self._batcher.broken = True
                continue
            if not pending.done:
                still.append(pending)
        self._in_flight = still
        if self._batcher is not None:
            self._batcher.post_ready(transport, still)
        return moved

    def _reset(self) -> None:
        """Forget this step's pipelines after an error (the next step starts afresh);
        the collectives they had posted are waited for when the next pipeline starts
        (:meth:`_settle_abandoned`)."""
        self._abandoned.extend(h for p in self._in_flight if not p.done for h in p.handles if _posted(h))
        self._in_flight, self._failed = [], {}
        self._fuser.abandon()
        if self._batcher is not None:
            self._batcher.reset()

    def _settle_abandoned(self) -> None:
        """Wait for the collectives a failed step posted and never waited for, before a
        pipeline of the next step posts its own: they carry the same names, and Horovod
        refuses a collective named like one still in progress. Their results are
        dropped. RuntimeError if they do not complete within :data:`_ABANDONED_WAIT_S`
        (the other workers never posted them: their step did not fail alike)."""
        if not self._abandoned:
            return
        transport = self.grace.transport
        deadline = time.monotonic() + _ABANDONED_WAIT_S
        waiting, self._abandoned = self._abandoned, []
        while waiting:
            still = []
            for handle in waiting:
                if not transport.ready(handle):
                    still.append(handle)
                    continue
                try:
                    transport.wait(handle)
                except Exception:  # noqa: BLE001  (the step it belonged to has already failed)
                    pass
            waiting = still
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(waiting)} collective(s) posted by a step whose compression failed did not complete "
                    f"within {_ABANDONED_WAIT_S:g} s: the other workers did not post them (their step did not "
                    f"fail alike), so their collectives and ours no longer match; restart from a checkpoint")
            if waiting:
                time.sleep(0.001)

    def _finish(self, job: _Job) -> torch.Tensor:
        """The aggregated gradient of ``job`` (before Horovod's postscale)."""
        if job.error is not None:  # its start raised
            raise job.error
        ticket = job.ticket
        # post every round that became ready first, so that the rounds of all tensors go
        # to Horovod together rather than one tensor's round per wait
        self.progress()
        pending = ticket.started
        failed = self._failed.get(id(pending)) if pending is not None else None
        if failed is not None:
            raise failed[1]
        if pending is not None and (_FINISH_POLL_S > 0 or self._batcher is not None):
            # Waiting on this pipeline's collectives alone would leave the others' later
            # rounds (PowerSGD's second allreduce) unposted until their own turn, one round
            # trip after another: wait by posting every round that becomes ready instead
            longest = _FINISH_POLL_S or 0.001
            first = delay = min(_FINISH_POLL_FIRST_S, longest)
            while not pending.done and any(p is pending for p in self._in_flight):
                time.sleep(delay)
                delay = first if self.progress() else min(2 * delay, longest)
            failed = self._failed.get(id(pending))
            if failed is not None:
                raise failed[1]
        if pending is None:  # a bucket some of whose members never came: Fuser.finish says which
            self._fuser.abandon()
        elif not pending.done:
            self._in_flight = [p for p in self._in_flight if p is not pending]
        out = self._fuser.finish(ticket)
        batcher = self._batcher
        if batcher is not None and batcher.broken and all(p.done for p in self._in_flight):
            batcher.reset()  # the failed step's pipelines are over: the next step batches again
        return out

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Finish the exchange started by :meth:`compress` (waiting for the background
        thread); the aggregated gradient (of the gradient's dtype, whatever the
        placeholder Horovod allreduced)."""
        job, post = ctx
        optimizer = self._checked_optimizer
        if (optimizer is not None and not self.placeholder_allreduce
                and (self._direct_for is None or self._direct_for() is not optimizer)):
            # Horovod's synchronize() has posted every collective of this step by now, on
            # every worker: from the next step on, its placeholder allreduces are skipped
            skip_placeholder_allreduces(optimizer)
            self._direct_for = weakref.ref(optimizer)
        if not job.queued:  # started in the hook
            try:
                out = self._finish(job)
            except BaseException:
                self._reset()
                raise
        else:
            if not job.requested:
                # every gradient handed over so far: the thread finishes them in one go, in
                # the order they came (Horovod's synchronize() asks in that order too)
                batch, self._unrequested = self._unrequested, []
                for each in batch:
                    each.requested = True
                self._worker.put(("finish", batch))
            self._worker.wait(job)
            if job.error is not None:
                raise job.error
            out, job.result = job.result, None
        return out * post if post != 1.0 else out

    def _on_thread(self, fn: Any) -> Any:
        """``fn()`` where the method's state lives: on the background thread once it runs
        (after the gradients handed to it), else here."""
        return fn() if self._worker is None else self._worker.call(fn)

    def fresh_copy(self) -> "HorovodCompression":
        """A compression with the same method, configuration, ``background`` and
        ``placeholder_allreduce``, and empty
        state, for another optimizer (:meth:`grace_dl.core.Grace.fresh_copy`)."""
        return HorovodCompression(self.grace.fresh_copy(), background=self.background,
                                  placeholder_allreduce=self.placeholder_allreduce,
                                  round_batch_bytes=self.round_batch_bytes)

    def state_dict(self) -> dict[str, Any]:
        """The method's state (error feedback, step counters), as NumPy arrays and ints."""
        return self._on_thread(self.grace.state_dict)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._on_thread(lambda: self.grace.load_state_dict(state))

    def __repr__(self) -> str:
        return f"HorovodCompression({self.grace!r})"


# -- method state inside the optimizer's state_dict ------------------------------------
def _to_torch(value: Any) -> Any:
    """NumPy arrays -> CPU tensors (so ``torch.load(weights_only=True)`` reads them back)."""
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _OPS.from_numpy(value, _CPU)  # copies; handles bfloat16
    if isinstance(value, np.generic):
        return value.item()
    return value


def _to_numpy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return _OPS.to_numpy(value)
    return value


def absorb_broadcast_state(optimizer: Any, compression: HorovodCompression) -> None:
    """Load method state that sits in the live parameter groups of ``optimizer``.

    ``hvd.broadcast_optimizer_state`` broadcasts every option of every parameter group
    from the root (pickled) and assigns it to the live groups, so the method state of
    :func:`DistributedOptimizer`'s ``state_dict()`` lands in ``param_groups[0]``; it is
    taken from there before the next use.
    """
    for group in getattr(optimizer, "param_groups", ()):
        state = group.pop(STATE_KEY, None)
        if state is not None:
            compression.load_state_dict(_to_numpy(state))


def _attach_state(optimizer: Any, compression: HorovodCompression) -> None:
    def before_save(opt: Any) -> None:
        absorb_broadcast_state(opt, compression)

    def after_save(opt: Any, state_dict: dict[str, Any]) -> None:
        state_dict["param_groups"][0][STATE_KEY] = _to_torch(compression.state_dict())

    def before_load(opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        # state_dict is a shallow copy of the caller's: copy the groups we change
        groups = []
        for group in state_dict["param_groups"]:
            if STATE_KEY in group:
                group = dict(group)
                compression.load_state_dict(_to_numpy(group.pop(STATE_KEY)))
            groups.append(group)
        state_dict["param_groups"] = groups
        return state_dict

    optimizer.register_state_dict_pre_hook(before_save)
    optimizer.register_state_dict_post_hook(after_save)
    optimizer.register_load_state_dict_pre_hook(before_load)


def _horovod_allreduce_grad_async() -> Any:
    """Stock Horovod's ``_DistributedOptimizer._allreduce_grad_async`` when its
    ``synchronize()`` takes a callable handle (Horovod 0.28: ``handle()`` gives the
    output in place of ``hvd.synchronize(handle)``); None otherwise."""
    try:
        from horovod.torch.optimizer import _DistributedOptimizer
    except ImportError:
        return None
    if "callable" not in _DistributedOptimizer.synchronize.__code__.co_names:
        return None
    return _DistributedOptimizer.__dict__.get("_allreduce_grad_async")


def skip_placeholder_allreduces(optimizer: Any) -> bool:
    """Make stock Horovod's ``optimizer`` hand each gradient to grace-dl without
    allreducing grace-dl's empty placeholder; whether it now does.

    Stock Horovod's gradient hook (and ``synchronize()``, for gradients that never came)
    calls ``optimizer._allreduce_grad_async(p)``, which compresses and then posts one
    Horovod allreduce per gradient on what ``compress`` returned. grace-dl exchanges the
    gradient on its own collectives, so that allreduce carries nothing, yet each costs
    Horovod a negotiation round between the workers (62 per step for a ResNet-18). This
    sets an instance attribute that shadows the class's method: it does what Horovod's
    does (a zero gradient for a parameter without one; a sparse gradient densified or
    handed to ``_sparse_allreduce_grad_async``) and returns, as its handle, a callable
    that ``synchronize()`` calls instead of waiting on a Horovod handle (Horovod's own
    provision for handles that are functions); ``decompress`` then waits for grace-dl's
    exchange as before. Results are unchanged bit for bit.

    :meth:`HorovodCompression.decompress` calls it in the first step's
    ``synchronize()``, once every worker has posted that step's placeholder allreduces,
    so that all workers switch between the same two steps, and the first step still
    meets any worker whose ``compression=`` differs with Horovod's shape error (see
    :func:`grace_dl.torch.checks.explain_mixed_compression`). ``groups=`` keeps its
    grouped placeholder allreduce (one per group): Horovod's ``synchronize()`` takes no
    callable handle for a group. Does nothing (returns False) for an optimizer whose
    ``_allreduce_grad_async`` is not stock Horovod's, or a Horovod whose
    ``synchronize()`` takes no callable handle.

    Args:
        optimizer: a stock ``hvd.DistributedOptimizer`` whose compression is a
            :class:`HorovodCompression`.
    """
    stock = _horovod_allreduce_grad_async()
    if stock is None or type(optimizer).__dict__.get("_allreduce_grad_async") is not stock:
        return False
    if "_allreduce_grad_async" in vars(optimizer):
        return True
    # a weak reference: the optimizer holds this function, which must not keep it alive
    optimizer_ref = weakref.ref(optimizer)

    def allreduce_grad_async(p: torch.Tensor) -> tuple[Any, Any]:
        opt = optimizer_ref()
        if p.grad is None:  # as Horovod: another worker may have this gradient
            p.grad = p.data.new(p.size()).zero_()
        name = opt._parameter_names.get(p)
        tensor = p.grad
        if tensor.is_sparse:
            if not opt.sparse_as_dense:
                return opt._sparse_allreduce_grad_async(p, name)
            tensor = tensor.to_dense()
        placeholder, ctx = opt._compression.compress_named(tensor, name, opt)
        return (lambda: placeholder), ctx

    optimizer._allreduce_grad_async = allreduce_grad_async
    return True


def _refuse_sparse(optimizer: Any):
    def sparse_allreduce(p: torch.Tensor, name: str) -> Any:
        raise ValueError(f"parameter {name!r} has a sparse gradient, which Horovod would allreduce without "
                         f"grace-dl compression; pass sparse_as_dense=True")
    return sparse_allreduce


def as_compression(compression: Any) -> Any:
    """A :class:`HorovodCompression` from a Grace; others pass through unchanged."""
    if isinstance(compression, Grace):
        return HorovodCompression(compression)
    if compression is None:
        import horovod.torch as hvd

        return hvd.Compression.none
    if not (hasattr(compression, "compress") and hasattr(compression, "decompress")):
        raise TypeError(f"compression must be a grace-dl method (grace_dl.torch.topk(...), a Grace) or a "
                        f"Horovod compressor, got {compression!r}")
    return compression


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                         compression: Any = None, backward_passes_per_step: int = 1, op: Any = None,
                         gradient_predivide_factor: float = 1.0, groups: Any = None,
                         sparse_as_dense: bool = False, process_set: Any = None,
                         grace: Any = None) -> torch.optim.Optimizer:
    """Horovod's ``DistributedOptimizer`` running a grace-dl method.

    The returned object is stock ``hvd.DistributedOptimizer(...)`` (so every Horovod
    option behaves as Horovod documents it, see :class:`HorovodCompression` for ``op`` and
    ``gradient_predivide_factor``), with three additions:

    * ``state_dict()`` carries the method's state (error-feedback residuals, momenta,
      step counters) under ``state_dict()["param_groups"][0]["grace_dl"]``, as CPU
      tensors and ints, and ``load_state_dict()`` restores it: each worker saving and
      loading its own ``state_dict()`` resumes bit-identically. It sits among the
      group's options because ``hvd.broadcast_optimizer_state`` broadcasts exactly
      those from the root: the root's method state then replaces every worker's, like
      the rest of the optimizer state (residuals restart from the root's; step counters,
      and so shared random draws, agree again). Horovod broadcasts nothing at all for
      an optimizer without per-parameter state (SGD without momentum).
    * A sparse gradient without ``sparse_as_dense=True`` raises instead of being
      allreduced uncompressed.
    * ``op=hvd.Adasum`` raises: a compressed exchange cannot combine model deltas pairwise.
    * A method that keeps its own momentum (DGC, Signum) with an optimizer that has
      ``momentum > 0`` raises: momentum would be applied twice (stock
      ``hvd.DistributedOptimizer`` raises the same at the first step).
    * A method object already serving another live optimizer raises (see
      :func:`claim_method`; stock ``hvd.DistributedOptimizer`` raises at the first step).

    Args:
        optimizer: the torch optimizer to wrap.
        named_parameters: ``model.named_parameters()``; the names key the method's
            per-tensor state (default: Horovod's ``allreduce.noname.<group>.<index>``).
        compression: a grace-dl method (``grace_dl.torch.topk(ratio=0.01)``, or a
            :class:`~grace_dl.core.Grace`); Horovod's own compressors are accepted too
            (default None: ``hvd.Compression.none``).
        backward_passes_per_step: local accumulations before each exchange (default 1);
            the method compresses the accumulated (summed) gradient.
        op: ``hvd.Average`` (default, None) or ``hvd.Sum``.
        gradient_predivide_factor: Horovod's split of the average (default 1.0).
        groups: Horovod's explicit allreduce groups (default None).
        sparse_as_dense: densify sparse gradients (default False).
        process_set: the Horovod process set (default None: all workers).
        grace: the method under GRACE's keyword (``grace=grace_from_params(params)``),
            instead of ``compression`` (default None).
    """
    import horovod.torch as hvd

    if grace is not None:
        if compression is not None:
            raise ValueError("give the method as grace= or as compression=, not both")
        compression = grace
    if op is None:
        op = hvd.Average
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("grace_dl.torch.DistributedOptimizer supports op=hvd.Average and op=hvd.Sum, not "
                         "hvd.Adasum: Adasum combines model deltas pairwise, which a compressed exchange "
                         "cannot do")
    compression = as_compression(compression)
    if isinstance(compression, HorovodCompression):
        refuse_double_momentum(optimizer, compression.grace)
        claim_method(compression.grace, None)  # before Horovod registers its gradient hooks
    wrapped = hvd.DistributedOptimizer(
        optimizer, named_parameters=named_parameters, compression=compression,
        backward_passes_per_step=backward_passes_per_step, op=op,
        gradient_predivide_factor=gradient_predivide_factor, groups=groups, sparse_as_dense=sparse_as_dense,
        process_set=hvd.global_process_set if process_set is None else process_set)
    if isinstance(compression, HorovodCompression):
        claim_method(compression.grace, wrapped)
        compression._checked_optimizer = wrapped
        _attach_state(wrapped, compression)
        # an instance attribute shadows the class's method that Horovod's hook calls
        wrapped._sparse_allreduce_grad_async = _refuse_sparse(wrapped)
    return wrapped
