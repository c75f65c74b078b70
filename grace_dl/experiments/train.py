"""The training loop shared by both frameworks and every launcher: schedule, batches,
evaluation, metrics, progress and the final summary."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from . import metrics
from .config import ExperimentConfig, dump
from .tasks import TaskData, batch_indices, load_task, steps_per_epoch

#: Environment variable that turns the rank-0 progress bar on ("1") or off ("0"); by
#: default it is on when stderr is a terminal (``grace-dl run`` passes its own choice to
#: the workers it launches, whose stderr is a pipe).
PROGRESS_ENV = "GRACE_DL_PROGRESS"


def learning_rate(step: int, total: int, optimizer: dict[str, Any], schedule: dict[str, Any]) -> float:
    """The learning rate of (0-based) ``step`` of ``total``: linear warm-up over
    ``warmup_steps``, then constant, cosine decay to ``min_lr``, or times ``gamma`` every
    ``step_size`` steps."""
    lr, warm = optimizer["lr"], schedule["warmup_steps"]
    if step < warm:
        return lr * (step + 1) / warm
    name = schedule["name"]
    if name == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return schedule["min_lr"] + (lr - schedule["min_lr"]) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        return lr * schedule["gamma"] ** ((step - warm) // schedule["step_size"])
    return lr


def total_steps(config: ExperimentConfig, data: TaskData, size: int) -> int:
    """``steps``, or ``epochs`` times the full batches in a worker's shard."""
    per_epoch = steps_per_epoch(len(data.x_train), size, config.batch_size)
    return config.steps if config.steps is not None else config.epochs * per_epoch


def make_runner(config: ExperimentConfig, data: TaskData):
    """The framework's runner: one Horovod worker, or the whole simulated job."""
    horovod = config.launcher != "simulator"
    if config.local_sgd is not None:
        from . import localsgd_runner

        if config.framework == "torch":
            return localsgd_runner.LocalSGDTorchRunner(config, data, horovod)
        return localsgd_runner.make_tf_runner(config, data, horovod)
    if config.framework == "torch":
        from .torch_runner import TorchRunner

        return TorchRunner(config, data, horovod)
    from .tf_runner import TFRunner

    return TFRunner(config, data, horovod)


def _evaluate(runner: Any, data: TaskData) -> dict[str, float]:
    if data.optimum is None:
        return runner.evaluate()
    w = runner.flat_weights()
    out = {"eval_loss": data.objective(w), "opt_distance": float(np.linalg.norm(w - data.optimum)),
           "suboptimality": data.objective(w) - data.objective(data.optimum)}
    if data.kind == "logistic":
        out["accuracy"] = float(np.mean((data.x_train @ w > 0) == (data.y_train > 0.5)))
    return out


def _progress_wanted() -> bool:
    value = os.environ.get(PROGRESS_ENV)
    if value is not None:
        return value not in ("0", "", "false", "no")
    return sys.stderr.isatty()


def progress_bar(total: int, desc: str, stream: Any = None) -> Any:
    """rank 0's tqdm bar over ``total`` steps, written to ``stream`` (default stderr).

    On a terminal it redraws in place. Elsewhere (a worker under ``horovodrun``, whose
    output the launcher forwards line by line with a rank prefix, or a log file) every
    redraw would become a line of its own, so it redraws only about 10 times in all, at
    a fixed width.
    """
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=stream)
    return tqdm(total=total, desc=desc, unit="step", file=stream, ncols=80, mininterval=0,
                miniters=max(1, total // 10))


def run(config: ExperimentConfig) -> dict[str, Any] | None:
    """Train one experiment in this process (a Horovod worker, or the whole simulated
    job). Rank 0 writes ``metrics.jsonl`` and ``summary.json`` into ``output_dir`` and
    returns the summary; other ranks return None."""
    wall0 = time.perf_counter()
    data = load_task(config.task, config.seed)
    runner = make_runner(config, data)
    rank, size = runner.rank, runner.size
    steps = total_steps(config, data, size)
    eval_every = config.eval_every or max(1, steps // 20)
    timers = metrics.Timers()
    for grace in runner.graces:
        metrics.instrument(grace, timers, runner.timing_active)
    # simulated workers run one after the other: report the pipeline time per worker
    timer_scale = 1.0 / len(runner.local_ranks)
    batches = [batch_indices(len(data.x_train), r, size, config.batch_size, config.seed, steps)
               for r in runner.local_ranks]

    writer = bar = None
    if rank == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        # the launcher wrote it already, but not when started by hand under horovodrun
        dump(config, os.path.join(config.output_dir, "config.yaml"))
        writer = metrics.MetricsWriter(os.path.join(config.output_dir, "metrics.jsonl"))
        if _progress_wanted():
            bar = progress_bar(steps, config.name)
    records: list[dict[str, Any]] = []
    prev = metrics.traffic(runner.grace.stats)
    cum_sent = cum_received = 0
    t_start = time.perf_counter()
    for step in range(1, steps + 1):
        items = [next(b) for b in batches]
        epoch = items[0][0]
        lr = learning_rate(step - 1, steps, config.optimizer, config.schedule)
        runner.set_lr(lr)
        timers.reset()
        t0 = time.perf_counter()
        loss = runner.train_step([(data.x_train[idx], data.y_train[idx]) for _, idx in items])
        step_s = time.perf_counter() - t0
        now = metrics.traffic(runner.grace.stats)
        delta = {k: now[k] - prev[k] for k in metrics.BYTE_KEYS}
        prev = now
        cum_sent += delta["sent"]
        cum_received += delta["received"]
        if rank != 0:
            continue
        record = {
            "step": step, "epoch": epoch, "time_s": time.perf_counter() - t_start, "lr": lr, "loss": loss,
            "sent_bytes": delta["sent"], "received_bytes": delta["received"],
            "payload_bytes": delta["payload"], "dense_bytes": delta["dense"],
            "cum_sent_bytes": cum_sent, "cum_received_bytes": cum_received,
            "compression_ratio": delta["dense"] / delta["payload"] if delta["payload"] else None,
            **{k: v * timer_scale for k, v in timers.seconds.items()}, "step_s": step_s,
        }
        evaluated = step % eval_every == 0 or step == steps
        if evaluated:
            record.update(_evaluate(runner, data))
        records.append(record)
        writer.write(record)
        if bar is not None:
            bar.update(1)
            if evaluated:
                bar.set_postfix_str(_short(record), refresh=False)
        elif evaluated:
            print(f"[{config.name}] step {step}/{steps}  {_short(record)}", flush=True)
        if evaluated:
            writer.flush()

    if bar is not None:
        bar.close()
    per_worker = runner.all_traffic(prev, metrics.BYTE_KEYS)
    identical = runner.replicas_identical()
    if rank != 0:
        return None
    writer.close()
    if not identical:
        print(f"[{config.name}] warning: the workers' parameters differ at the end", file=sys.stderr)
    method = config.compression["compressor"]
    summary = metrics.summarize(
        records, per_worker, name=config.name, framework=config.framework, task=config.task["name"],
        model=config.model.get("arch"), method=method, compression=config.compression,
        **({"local_sgd": config.local_sgd} if config.local_sgd is not None else {}),
        grace=repr(runner.grace), workers=size, launcher=config.launcher, seed=config.seed,
        replicas_identical=identical, tensors=sorted(runner.grace.stats.per_tensor),
        output_dir=os.path.abspath(config.output_dir),
        wall_s=time.perf_counter() - wall0)
    with open(os.path.join(config.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary


def _short(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.4f}" if record.get("loss") is not None else "loss nan"]
    if record.get("eval_loss") is not None:
        parts.append(f"eval {record['eval_loss']:.4f}")
    if record.get("accuracy") is not None:
        parts.append(f"acc {record['accuracy']:.3f}")
    if record.get("opt_distance") is not None:
        parts.append(f"dist {record['opt_distance']:.3g}")
    parts.append(f"sent {record['cum_sent_bytes'] / 1e6:.2f} MB")
    return "  ".join(parts)
