"""Per-step metrics (JSON Lines), timers around the compression pipeline, and the final
summary of a run.

Each line of ``metrics.jsonl`` is one training step (rank 0's view)::

    step, epoch, time_s, lr, loss,
    sent_bytes, received_bytes, payload_bytes, dense_bytes,   # this step, per worker
    cum_sent_bytes, cum_received_bytes,                        # since the start, per worker
    compression_ratio,                                         # dense / payload of this step
    compress_s, decompress_s, exchange_s, step_s,              # seconds in this step
    eval_loss, accuracy, opt_distance, suboptimality           # only on evaluated steps

``loss`` is the mean training loss of the step's batches over all workers. Bytes come
from the method's :class:`~grace_dl.core.TrafficStats` (exact payload sizes; ``sent`` and
``received`` follow the byte model of :mod:`grace_dl.transport.base`). ``compress_s``
and ``decompress_s`` are spent in the compressor's ``compress`` / ``decompress`` (the
latter includes the local decompression error feedback needs), ``exchange_s`` in the
transport (posting collectives and waiting for them), ``step_s`` is the whole step
(forward, backward, exchange, optimizer). Under the simulator, where one process plays
every worker, the pipeline times are per worker (the total over workers divided by N)
while ``step_s`` covers all workers. Times are host wall-clock times: under
``tf.function`` or on a GPU without synchronisation they measure tracing or kernel
launches only; under Horovod TF, where the pipeline of most methods is traced into the
graph (:mod:`grace_dl.tensorflow.graph`), the timers are off after tracing and the three
pipeline times read 0 (only ``step_s`` is measured).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

TIMER_KEYS = ("compress_s", "decompress_s", "exchange_s")
BYTE_KEYS = ("sent", "received", "payload", "dense")


class Timers:
    """Seconds spent in the pipeline's parts since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero every timer."""
        self.seconds = dict.fromkeys(TIMER_KEYS, 0.0)

    def wrap(self, fn: Callable, key: str, active: Callable[[], bool] | None = None) -> Callable:
        """``fn``, adding its run time to timer ``key`` (only when ``active()`` is true:
        under ``tf.function`` a call traces, it does no work)."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            if active is not None and not active():
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - t0

        timed.__wrapped__ = fn
        return timed


def instrument(grace: Any, timers: Timers, active: Callable[[], bool] | None = None) -> None:
    """Time ``grace``'s compressors (its own and its policies' routes) and transport
    (instance attributes wrap the bound methods; the classes are untouched). A method that overrides ``compress_rounds``
    (several exchanges while compressing) is timed while its generator runs, not while
    it waits for collectives. The transport is wrapped on the first
    :meth:`~grace_dl.core.Grace.start`, since adapters bind it lazily."""
    from ..core import Compressor

    for comp in _compressors(grace):
        if type(comp).compress_rounds is not Compressor.compress_rounds:
            comp.compress_rounds = _timed_rounds(comp.compress_rounds, timers, active)
        else:
            comp.compress = timers.wrap(comp.compress, "compress_s", active)
        comp.decompress = timers.wrap(comp.decompress, "decompress_s", active)
    start = grace.start
    wrapped: set[int] = set()

    def start_and_wrap_transport(tensor: Any, name: str) -> Any:
        transport = grace.transport
        if transport is not None and id(transport) not in wrapped:
            wrapped.add(id(transport))
            for method in ("allreduce_async", "allgather_async", "broadcast_async", "wait"):
                setattr(transport, method, timers.wrap(getattr(transport, method), "exchange_s", active))
        return start(tensor, name)

    grace.start = start_and_wrap_transport


def _compressors(grace: Any) -> list[Any]:
    """Every compressor ``grace`` may run: its own, and those of its policies' routes
    (the dense route of small or warm-up tensors, per-name overrides)."""
    found = [grace.compressor]
    policies = getattr(grace, "policies", None)
    routes = [getattr(grace, "_dense", None)] + [r for _, r in getattr(policies, "overrides", [])]
    found += [r.compressor for r in routes if r is not None]
    unique: dict[int, Any] = {}
    for comp in found:
        unique.setdefault(id(comp), comp)
    return list(unique.values())


def _timed_rounds(rounds: Callable, timers: Timers, active: Callable[[], bool] | None) -> Callable:
    def timed_rounds(*args: Any, **kwargs: Any) -> Any:
        return (yield from _timed_generator(rounds(*args, **kwargs), timers, "compress_s", active))

    return timed_rounds


def _timed_generator(gen: Any, timers: Timers, key: str, active: Callable[[], bool] | None) -> Any:
    """Drive ``gen``, adding the time spent inside it (not between its yields) to ``key``."""
    sent = None
    while True:
        counting = active is None or active()
        t0 = time.perf_counter()
        try:
            request = gen.send(sent)
        except StopIteration as done:
            if counting:
                timers.seconds[key] += time.perf_counter() - t0
            return done.value
        if counting:
            timers.seconds[key] += time.perf_counter() - t0
        sent = yield request


def traffic(stats: Any) -> dict[str, int]:
    """The byte totals of a :class:`~grace_dl.core.TrafficStats`."""
    return {k: int(getattr(stats, k)) for k in BYTE_KEYS}


class MetricsWriter:
    """Appends one JSON object per line to ``path`` (the file is truncated first)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = open(self.path, "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Write one record."""
        self._file.write(json.dumps(_finite(record)) + "\n")

    def flush(self) -> None:
        """Flush to disk (so that a crash loses little)."""
        self._file.flush()

    def close(self) -> None:
        """Flush and close."""
        self._file.close()


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no inf/nan: write them as null
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records: list[dict[str, Any]], per_worker: list[dict[str, int]], **extra: Any) -> dict[str, Any]:
    """The final summary of a run from its step records and every worker's byte totals.

    ``loss`` is the last evaluated loss (test set; the whole objective for ``synthetic``),
    ``train_loss`` the mean training loss over the last 10% of steps, bytes are per
    worker (rank 0's, with every worker's under ``per_worker``), ``time_per_step_s`` the
    median step time (robust to the first steps' warm-up).
    """
    if not records:
        raise ValueError("no steps were recorded")
    evaluated = [r for r in records if r.get("eval_loss") is not None]
    last_eval = evaluated[-1] if evaluated else {}
    tail = records[-max(1, len(records) // 10):]
    losses = [r["loss"] for r in tail if r.get("loss") is not None]
    step_times = sorted(r["step_s"] for r in records)
    rank0 = per_worker[0]
    summary = {
        **extra,
        "steps": records[-1]["step"],
        "epochs": records[-1]["epoch"] + 1,
        "loss": last_eval.get("eval_loss"),
        "accuracy": last_eval.get("accuracy"),
        "opt_distance": last_eval.get("opt_distance"),
        "suboptimality": last_eval.get("suboptimality"),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "sent_bytes_per_worker": rank0["sent"],
        "received_bytes_per_worker": rank0["received"],
        "payload_bytes_per_worker": rank0["payload"],
        "dense_bytes_per_worker": rank0["dense"],
        "compression_ratio": rank0["dense"] / rank0["payload"] if rank0["payload"] else None,
        "time_per_step_s": step_times[len(step_times) // 2],
        "train_time_s": records[-1]["time_s"],
        **{k: sum(r[k] for r in records) for k in TIMER_KEYS},
        "per_worker": per_worker,
    }
    return {k: v for k, v in _finite(summary).items() if v is not None or k in ("loss", "accuracy")}


def _mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.3f} MB"


def format_summary(summary: dict[str, Any]) -> str:
    """A few readable lines for the terminal."""
    acc = summary.get("accuracy")
    loss = summary.get("loss")
    lines = [
        f"{summary.get('name', '?')}: {summary.get('method', '?')} on {summary.get('task', '?')} "
        f"({summary.get('framework', '?')}, {summary.get('workers', '?')} workers, {summary.get('launcher', '?')}), "
        f"{summary['steps']} steps",
        f"  loss {loss:.4f}" if loss is not None else "  loss -",
    ]
    if acc is not None:
        lines[-1] += f"   accuracy {acc:.4f}"
    if summary.get("opt_distance") is not None:
        lines[-1] += f"   distance to optimum {summary['opt_distance']:.4g}"
    ratio = summary.get("compression_ratio")
    lines.append(f"  per worker: sent {_mb(summary['sent_bytes_per_worker'])}, received "
                 f"{_mb(summary['received_bytes_per_worker'])}, gradients {_mb(summary['dense_bytes_per_worker'])}, "
                 f"compression ratio {ratio:.1f}x" if ratio else "  per worker: nothing sent")
    lines.append(f"  time per step {summary['time_per_step_s'] * 1e3:.2f} ms (median); "
                 f"compress {summary['compress_s']:.2f} s, decompress {summary['decompress_s']:.2f} s, "
                 f"exchange {summary['exchange_s']:.2f} s, training {summary['train_time_s']:.1f} s in all")
    return "\n".join(lines)
