"""Local SGD: workers take several optimizer steps on their own, then average their models.

Written once against the ops protocol, like the compression methods: the averaging of
each named parameter is a :class:`~grace_dl.core.Grace` pipeline applied to the model's
change since the last average (``param - anchor``), so it goes through the same
transports and byte accounting (:class:`~grace_dl.core.TrafficStats`), and any registered
compressor can compress that change, with error feedback through the method's memory
(compressed local SGD). The framework adapters (``grace_dl.torch.LocalSGD``,
``grace_dl.tensorflow.LocalSGD``, the torch.distributed optimizer and DDP hook) and the
in-process simulator (:class:`LocalSGDSimulator`) only hand parameters over and write
the averaged ones back.

One worker's life, with ``t`` counting its optimizer steps (1, 2, ...)::

    anchor z = x_0 (identical on every worker)
    after each local step t:
        if t is an averaging step:
            z <- z + mean_over_workers(C(x - z))      (C: the compression; none by default)
            x <- z
            next averaging step <- t + H

Every decision about when to average is the same on every worker: it depends only on
the step counter, the configuration and (adaptive H) the loss averaged over the workers
at the averaging steps, exchanged through the transport.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .core import Grace, Pending
from .ops import Array, Ops, get_ops
from .registry import ConfigError, register_algorithm
from .transport.base import Transport, allreduce_traffic

#: name of the collective (and of its row in the byte counts) that averages the loss
LOSS_NAME = "local_sgd.loss"
#: name of the collective that compares the workers' settings at their first averaging step
CHECK_NAME = "local_sgd.check"
#: what that check compares, in order (the first difference is reported)
CHECKED_FIELDS = ("period", "switch_step", "adaptive", "min_period", "overlap", "pull", "compression",
                  "averaging step", "current period", "parameter names")


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def adaptive_period(initial_period: int, loss: float, initial_loss: float, min_period: int = 1) -> int:
    """AdaComm's communication period (Wang & Joshi, SysML 2019, eq. for the fixed
    learning-rate case): ``H = ceil(sqrt(F(x_t) / F(x_0)) * H_0)``, kept within
    ``[min_period, initial_period]``.

    Args:
        initial_period: ``H_0``, the period at the start.
        loss: ``F(x_t)``, the loss averaged over the workers now.
        initial_loss: ``F(x_0)``, the loss averaged over the workers at the first averaging.
        min_period: the smallest period returned (default 1).
    """
    if not (initial_loss > 0 and math.isfinite(initial_loss)) or not math.isfinite(loss):
        return initial_period  # the rule needs a positive finite reference loss
    ratio = max(loss, 0.0) / initial_loss
    return max(min_period, min(initial_period, math.ceil(math.sqrt(ratio) * initial_period)))


@register_algorithm(
    "local_sgd",
    paper="Lin et al., Don't Use Large Mini-Batches, Use Local SGD, ICLR 2020 (local and post-local SGD); "
          "Wang & Joshi, Adaptive Communication Strategies to Achieve the Best Error-Runtime Trade-off in "
          "Local-Update SGD, SysML 2019 (adaptive H); Wang et al., Overlap Local-SGD, ICASSP 2020 (overlap); "
          "Basu et al., Qsparse-local-SGD, NeurIPS 2019 (compressed differences with error feedback)",
    summary="Workers take H local optimizer steps, then average their models (optionally compressed).")
class LocalSGD:
    """Local SGD and its variants, for one worker; averages parameters, not gradients.

    Every ``period`` (H) local optimizer steps the workers average their models. The
    averaging of each named parameter is a Grace pipeline on the parameter's change since
    the last average, ``x - z`` (``z``: the anchor, the last averaged model); its mean
    over the workers is added to the anchor, and the parameters are set to the new anchor,
    so right after an averaging step every worker holds the same parameters. With the
    default compression (``none`` over allreduce) a worker moves ``1/H`` of the bytes of
    synchronous SGD's dense gradient allreduce. With a compressor, what it drops stays in
    its memory (error feedback) and is sent in a later round (Basu et al. 2019).

    Variants (Lin et al. 2020; Wang & Joshi 2019; Wang et al. 2020):

    * post-local SGD, ``switch_step=S``: average after each of the first ``S`` steps
      (synchronous training; with plain SGD it equals gradient averaging up to rounding),
      then every H steps. The DDP path averages gradients instead during those steps.
    * adaptive H, ``adaptive=True`` (AdaComm): at each averaging step the workers' mean
      training loss since the previous one, ``F``, is averaged over the workers, and the
      next period is ``ceil(sqrt(F / F_0) * H)`` (``F_0``: that loss at the first
      averaging step), within ``[min_period, period]``: infrequent averaging while the
      loss is high, more frequent as it falls.
    * overlap local SGD, ``overlap=True`` (Overlap Local-SGD): at an averaging step the
      worker first takes the result of the averaging started at the previous one as its
      anchor, ``z <- z + mean(C(x' - z))`` (``x'``: the models sent then), pulls its model
      towards it, ``x <- x - pull * (x - z)``, and starts averaging the pulled model,
      whose result it takes one round later: communication runs behind the next H local
      steps. Workers' parameters then differ (by their local progress); their anchors are
      identical.

    Args:
        period: H, local steps between averaging steps (default 4; the initial and largest
            period with ``adaptive``).
        switch_step: post-local SGD: average after each of the first ``switch_step`` steps
            (default 0: local from the start).
        adaptive: adapt H from the loss (default False); ``step`` then needs the loss.
        min_period: the smallest adaptive period (default 1).
        overlap: overlap the averaging with the next round's local steps (default False).
        pull: overlap's pull towards the anchor, in (0, 1] (default 0.5).
        compression: what compresses the model differences: a
            :class:`~grace_dl.core.Grace`, a method mapping for
            :func:`grace_dl.from_config`, or None (default: ``none`` over allreduce). Its
            aggregate must be the mean.
    """

    def __init__(self, period: int = 4, switch_step: int = 0, adaptive: bool = False, min_period: int = 1,
                 overlap: bool = False, pull: float = 0.5, compression: Any = None):
        self.period = _check_int("period", period, 1)
        self.switch_step = _check_int("switch_step", switch_step, 0)
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be a bool, got {adaptive!r}")
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be a bool, got {overlap!r}")
        self.adaptive, self.overlap = adaptive, overlap
        self.min_period = _check_int("min_period", min_period, 1)
        if self.min_period > self.period:
            raise ValueError(f"min_period ({min_period}) must not exceed period ({period})")
        if isinstance(pull, bool) or not isinstance(pull, (int, float)) or not 0.0 < pull <= 1.0:
            raise ValueError(f"pull must be a float in (0, 1], got {pull!r}")
        self.pull = float(pull)
        self.grace = _compression(compression)
        #: during the first ``switch_step`` steps, gradients are averaged elsewhere (the
        #: DDP hook), so those steps send nothing here (set by that adapter)
        self.gradients_averaged_in_warmup = False
        self.transport: Transport | None = None
        self._reset_state()

    # -- configuration ------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.step_count = 0
        self.current_period = self.period
        self.next_sync = self._first_sync()
        self.rounds = 0
        self.initial_loss: float | None = None
        self._loss_sum = 0.0
        self._loss_count = 0
        self.anchor: dict[str, Array] = {}
        self._checked = False  # the settings check runs at the first averaging step (after a resume too)
        # overlap: the averaging in flight, {name: Pending}, and (after a checkpoint
        # completed it) its results
        self._in_flight: dict[str, Pending] = {}
        self._landed: dict[str, Array] = {}

    def _first_sync(self) -> int:
        return 1 if self.switch_step > 0 else self.period

    @property
    def stats(self):
        """The byte counts (:class:`~grace_dl.core.TrafficStats`) of the averaging."""
        return self.grace.stats

    def bind(self, transport: Transport) -> "LocalSGD":
        """Use ``transport`` for the averaging; returns self."""
        self.transport = transport
        self.grace.bind(transport)
        return self

    def fresh_copy(self) -> "LocalSGD":
        """An unbound copy with the same configuration and empty state (a simulated worker)."""
        clone = LocalSGD(self.period, self.switch_step, self.adaptive, self.min_period, self.overlap, self.pull,
                         self.grace.fresh_copy())
        clone.gradients_averaged_in_warmup = self.gradients_averaged_in_warmup
        return clone

    def config(self) -> dict[str, Any]:
        """The constructor's arguments but the compression."""
        return {"period": self.period, "switch_step": self.switch_step, "adaptive": self.adaptive,
                "min_period": self.min_period, "overlap": self.overlap, "pull": self.pull}

    # -- the schedule ---------------------------------------------------------------------
    def set_anchor(self, params: Mapping[str, Array]) -> None:
        """Take ``params`` (identical on every worker: broadcast them first) as the anchor,
        the model the first round's differences are taken from. The adapters call it
        before the first local step."""
        if not params:
            raise ValueError("local SGD needs at least one named parameter")
        self.anchor = {name: _copy(p) for name, p in params.items()}

    def is_sync_step(self, step: int) -> bool:
        """Whether local step ``step`` (1-based) ends with an averaging (exchanging data)."""
        if step <= self.switch_step:
            return not self.gradients_averaged_in_warmup
        return step == self.next_sync

    def begin(self, params: Mapping[str, Array], loss: float | None = None) -> "SyncRound | None":
        """Record one local optimizer step, taken; ``params`` are this worker's parameters
        after it (by name, the same names on every worker), ``loss`` its training loss
        (needed with ``adaptive``). At an averaging step, posts the exchanges and returns
        the :class:`SyncRound` to pass to :meth:`complete`; otherwise returns None."""
        if self.transport is None:
            raise RuntimeError("LocalSGD has no transport: call bind(transport) first")
        if not self.anchor:
            raise RuntimeError("LocalSGD has no anchor: call set_anchor(initial parameters) before the first step")
        if set(params) != set(self.anchor):
            missing = sorted(set(self.anchor) - set(params)) or sorted(set(params) - set(self.anchor))
            raise KeyError(f"parameters {missing} differ from those the anchor was taken from")
        if self.adaptive:
            if loss is None:
                raise ValueError("adaptive local SGD needs the training loss of each step: step(..., loss=...)")
            loss = float(loss)
            if not math.isfinite(loss):
                raise ValueError(f"the loss of step {self.step_count + 1} is {loss}; adaptive H needs finite losses")
            self._loss_sum += loss
            self._loss_count += 1
        self.step_count += 1
        step = self.step_count
        if step <= self.switch_step and self.gradients_averaged_in_warmup:
            self._loss_sum, self._loss_count = 0.0, 0  # the adaptive rule starts with the local phase
            if step == self.switch_step:  # the models were kept identical: they are the anchor
                self.set_anchor(params)
                self.next_sync = step + self.current_period
            return None
        if not self.is_sync_step(step):
            return None
        names = list(self.anchor)
        sync = SyncRound(step=step, names=names, params=dict(params))
        if not self._checked and self.transport.size > 1:
            sync.check = self._post_check(step, names, params[names[0]])
        if self.adaptive:
            sync.loss = self._post_loss(params[names[0]])
        if not self.overlap:
            for name in names:
                sync.pending[name] = self.grace.start(params[name] - self.anchor[name], name)
        return sync

    def in_flight(self, sync: "SyncRound | None" = None) -> list[Pending]:
        """The pipelines not yet finished: ``sync``'s, and the overlapped round's (for
        simulators, which advance every worker's multi-round exchanges in lockstep)."""
        return list(self._in_flight.values()) + (list(sync.pending.values()) if sync is not None else [])

    def complete(self, sync: "SyncRound") -> dict[str, Array]:
        """Finish the averaging step ``sync``; returns the new value of every parameter by
        name (write them into the model; they may be the anchor's own arrays, so copy
        rather than alias them where arrays are mutable)."""
        out: dict[str, Array] = {}
        if sync.check is not None:
            self._verify_check(sync.check)
        if self.overlap:
            self._land()
            for name in sync.names:
                x, z = sync.params[name], self.anchor[name]
                pulled = x - (x - z) * self.pull
                out[name] = pulled
                self._in_flight[name] = self.grace.start(pulled - z, name)
        else:
            for name in sync.names:
                self.anchor[name] = self.anchor[name] + self.grace.finish(sync.pending[name])
                out[name] = self.anchor[name]
        self.rounds += 1
        if sync.loss is not None:
            self._adapt(sync)
        if sync.step >= self.switch_step:
            self.next_sync = sync.step + self.current_period
        else:
            self.next_sync = sync.step + 1
        return out

    def step(self, params: Mapping[str, Array], loss: float | None = None) -> dict[str, Array] | None:
        """:meth:`begin` then, at an averaging step, :meth:`complete`: the new parameters
        by name, or None between averaging steps."""
        sync = self.begin(params, loss)
        return None if sync is None else self.complete(sync)

    def _land(self) -> None:
        """Overlap: take the averaging started one round ago as the new anchor."""
        for name, pending in self._in_flight.items():
            self._landed[name] = self.grace.finish(pending)
        self._in_flight = {}
        for name, mean_change in self._landed.items():
            z = self.anchor[name]
            if not get_ops(z).owns(mean_change):  # restored from a checkpoint as NumPy
                mean_change = get_ops(z).from_numpy(np.asarray(mean_change), z)
            self.anchor[name] = z + mean_change
        self._landed = {}

    def _fingerprint(self, step: int, names: list[str]) -> list[Any]:
        from .handshake import describe

        compression = " ".join(describe(c) for c in (self.grace.compressor, self.grace.memory, self.grace.communicator))
        return [*self.config().values(), f"{compression} seed={self.grace.seed}", step, self.current_period, names]

    def _post_check(self, step: int, names: list[str], like: Array) -> Any:
        """Post an allgather of hashes of this worker's settings, schedule position and
        parameter names (workers that disagree would otherwise average at different
        steps: a hang or silently different models). Not counted in the byte counts,
        like the compression's own first-use handshake."""
        from .core import derive_key

        keys = np.array([derive_key(v) for v in self._fingerprint(step, names)], dtype=np.uint64).view(np.int64)
        return self.transport.allgather_async(get_ops(like).from_numpy(keys, like), CHECK_NAME, equal_sizes=True)

    def _verify_check(self, handle: Any) -> None:
        rows = [np.asarray(get_ops(r).to_numpy(r)) for r in self.transport.wait(handle)]
        mine = rows[self.transport.rank]
        for rank, row in enumerate(rows):
            differ = np.nonzero(row != mine)[0]
            if differ.size:
                i = int(differ[0])
                value = self._fingerprint(self.step_count, list(self.anchor))[i]
                raise RuntimeError(f"local SGD differs between workers {self.transport.rank} and {rank} in its "
                                   f"{CHECKED_FIELDS[i]} (this worker: {value!r}); every worker must run the "
                                   f"same settings from the same step")
        self._checked = True

    def _post_loss(self, like: Array) -> Any:
        ops = get_ops(like)
        mean = self._loss_sum / self._loss_count
        buf = ops.from_numpy(np.array([mean], dtype=np.float64), like)
        return self.transport.allreduce_async(buf, LOSS_NAME)

    def _adapt(self, sync: "SyncRound") -> None:
        result = self.transport.wait(sync.loss)
        ops = get_ops(result)
        loss = float(ops.to_numpy(result)[0]) / self.transport.size
        sent, received = allreduce_traffic(8, self.transport.size)
        self.grace.stats.record(LOSS_NAME, 8, 8, sent, received, self.rounds - 1)
        self._loss_sum, self._loss_count = 0.0, 0
        if sync.step < self.switch_step:
            return  # the rule starts with the local phase
        if self.initial_loss is None:
            self.initial_loss = loss
        self.current_period = adaptive_period(self.period, loss, self.initial_loss, self.min_period)

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Anchor, step counter, current period, loss bookkeeping and the compression's
        state, as NumPy arrays and plain numbers. With ``overlap``, the averaging in flight
        is completed first and its result saved (so every worker must save at the same
        step when its compression makes several rounds of collectives)."""
        for name, pending in self._in_flight.items():
            self._landed[name] = self.grace.finish(pending)
        self._in_flight = {}
        return {
            "config": self.config(),
            "step": self.step_count, "period": self.current_period, "next_sync": self.next_sync,
            "rounds": self.rounds, "initial_loss": self.initial_loss,
            "loss_sum": self._loss_sum, "loss_count": self._loss_count,
            "anchor": {n: get_ops(a).to_numpy(a) for n, a in self.anchor.items()},
            "landed": {n: get_ops(a).to_numpy(a) for n, a in self._landed.items()},
            "grace": self.grace.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], like: Array | None = None) -> None:
        """Restore :meth:`state_dict` (saved by a LocalSGD of the same configuration).
        The anchor becomes arrays like ``like`` (default: NumPy; the adapters pass a
        parameter, so it lands on the parameters' backend and device)."""
        unknown = set(state) - {"config", "step", "period", "next_sync", "rounds", "initial_loss", "loss_sum",
                                "loss_count", "anchor", "landed", "grace"}
        if unknown:
            raise KeyError(f"unknown keys in LocalSGD state: {sorted(unknown)}")
        if dict(state["config"]) != self.config():
            raise ValueError(f"the state was saved by local SGD with {dict(state['config'])}, this one has "
                             f"{self.config()}")
        ops: Ops | None = get_ops(like) if like is not None else None

        def restore(a: Any) -> Array:
            a = np.array(a)  # a copy: the saved state stays untouched
            return a if ops is None else ops.from_numpy(a, like)

        self.grace.load_state_dict(state["grace"])
        self.step_count = int(state["step"])
        self.current_period = int(state["period"])
        self.next_sync = int(state["next_sync"])
        self.rounds = int(state["rounds"])
        self.initial_loss = None if state["initial_loss"] is None else float(state["initial_loss"])
        self._loss_sum = float(state["loss_sum"])
        self._loss_count = int(state["loss_count"])
        self.anchor = {n: restore(a) for n, a in state["anchor"].items()}
        self._landed = {n: restore(a) for n, a in state["landed"].items()}
        self._in_flight = {}
        self._checked = False

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"LocalSGD({params}, compression={self.grace!r})"


@dataclass
class SyncRound:
    """One averaging step in progress (see :meth:`LocalSGD.begin`)."""

    step: int
    names: list[str]
    params: dict[str, Array]
    pending: dict[str, Pending] = field(default_factory=dict)
    loss: Any = None
    check: Any = None


def _copy(x: Array) -> Array:
    """A copy of ``x`` that later in-place updates of ``x`` do not change."""
    ops = get_ops(x)
    if ops.name == "numpy":
        return np.array(x)
    return x * 1  # a new tensor (TensorFlow's are immutable anyway)


def _compression(compression: Any) -> Grace:
    from .registry import from_config, make

    if compression is None:
        grace = make("none")
    elif isinstance(compression, Grace):
        grace = compression
    elif hasattr(compression, "grace") and isinstance(compression.grace, Grace):  # a framework wrapper
        grace = compression.grace
    elif isinstance(compression, Mapping):
        grace = from_config(dict(compression))
    else:
        raise TypeError(f"compression must be a grace-dl method (grace_dl.topk(...)), a method mapping or None, "
                        f"got {type(compression).__name__}")
    if grace.communicator.aggregate != "mean":
        raise ValueError(f"local SGD averages models, so its compression must aggregate 'mean'; "
                         f"{grace!r} aggregates {grace.communicator.aggregate!r}")
    return grace


def local_sgd(period: int = 4, *, switch_step: int = 0, adaptive: bool = False, min_period: int = 1,
              overlap: bool = False, pull: float = 0.5, compression: Any = None) -> LocalSGD:
    """A :class:`LocalSGD` (see there for the parameters): ``grace_dl.local_sgd(period=4)``,
    ``grace_dl.local_sgd(period=4, compression=grace_dl.topk(ratio=0.1))``."""
    return LocalSGD(period, switch_step, adaptive, min_period, overlap, pull, compression)


def from_config(config: Mapping[str, Any]) -> LocalSGD:
    """A :class:`LocalSGD` from a mapping of its parameters (``compression`` a method
    mapping); unknown keys and bad values raise :class:`~grace_dl.ConfigError`."""
    from .registry import algorithms

    if not isinstance(config, Mapping):
        raise ConfigError(f"a local SGD config must be a mapping, got {type(config).__name__}")
    valid = list(algorithms()["local_sgd"].params)
    unknown = [k for k in config if k not in valid]
    if unknown:
        raise ConfigError(f"local_sgd has no parameter {unknown[0]!r}; valid: {', '.join(valid)}")
    try:
        return LocalSGD(**dict(config))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"local_sgd: {err}") from None


class LocalSGDSimulator:
    """``size`` simulated workers of local SGD in one process, each with its own copy of
    ``method`` (own anchor, memory and counters), over a
    :class:`~grace_dl.transport.local.LocalWorld`.

    Args:
        method: the :class:`LocalSGD`; each worker gets ``method.fresh_copy()``.
        size: number of workers (>= 1).
        params: the initial parameters by name (every worker starts from them).
    """

    def __init__(self, method: LocalSGD, size: int, params: Mapping[str, Array]):
        from .transport.local import LocalWorld

        self.world = LocalWorld(size)
        self.size = size
        self.workers = [method.fresh_copy().bind(t) for t in self.world.transports]
        for w in self.workers:
            w.set_anchor(params)

    def step(self, params: Sequence[Mapping[str, Array]],
             losses: Sequence[float] | None = None) -> list[dict[str, Array]] | None:
        """After each worker's local step: ``params[r]`` are worker ``r``'s parameters,
        ``losses[r]`` its loss. Returns each worker's new parameters at an averaging step
        (all workers average at the same steps), None otherwise."""
        if len(params) != self.size:
            raise ValueError(f"expected parameters of {self.size} workers, got {len(params)}")
        losses = [None] * self.size if losses is None else list(losses)
        syncs = [w.begin(p, loss) for w, p, loss in zip(self.workers, params, losses)]
        if syncs[0] is None:
            if any(s is not None for s in syncs):
                raise RuntimeError("simulated workers disagree on the averaging step")
            return None
        # multi-round compressions: every worker posts each round before any waits on it
        pendings = [w.in_flight(s) for w, s in zip(self.workers, syncs)]
        while not all(p.done for ps in pendings for p in ps):
            for w, ps in zip(self.workers, pendings):
                for p in ps:
                    w.grace.advance(p)
        return [w.complete(s) for w, s in zip(self.workers, syncs)]
