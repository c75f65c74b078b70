"""Compare finished runs: a Markdown table and plots (matplotlib, PNG).

``grace-dl compare results/*`` reads each run directory's ``summary.json`` and
``metrics.jsonl`` (a sweep directory stands for the runs inside it), prints the table and
writes, into the first directory or ``--output``:

* ``comparison.md``: the table;
* ``loss.png``: loss against step and against megabytes sent per worker (the training
  loss, smoothed by a moving average over 5% of the steps, and the evaluated loss as
  markers);
* ``accuracy.png``: accuracy (or, for the synthetic task, the distance to the optimum)
  against step and against megabytes sent, at the evaluated steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..registry import ConfigError
from .metrics import read_jsonl


@dataclass
class Run:
    """A finished run: its directory, summary and step records."""

    path: str
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    name: str = ""

    @property
    def label(self) -> str:
        """The run's name (as in the table and legends): its config's name, or its
        directory where other runs compared with it have the same name."""
        return self.name or str(self.summary.get("name") or os.path.basename(self.path.rstrip(os.sep)))


def find_runs(paths: list[str]) -> list[Run]:
    """The runs in ``paths`` (run directories, or directories holding run directories);
    ConfigError when there are none."""
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "summary.json")):
            runs.append(_load(path))
        elif os.path.isdir(path):
            inner = [d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "summary.json"))]
            if not inner and len(paths) > 1:
                raise ConfigError(f"no finished runs in {path} (no summary.json in it or its sub-directories)")
            order = _sweep_order(path)
            inner.sort(key=lambda d: (order.index(d) if d in order else len(order), d))
            runs.extend(_load(os.path.join(path, d)) for d in inner)
        else:
            raise ConfigError(f"no finished runs in {path}: no such directory")
    if not runs:
        raise ConfigError(f"no finished runs (directories with summary.json) in {', '.join(paths) or '(nothing)'}")
    _distinct_labels(runs)
    return runs


def _distinct_labels(runs: list[Run]) -> None:
    """Runs that share a name (the same config run with other ``--output`` directories)
    are labelled by their directories instead, so that the table and legends tell them apart."""
    names = [r.label for r in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.name = os.path.basename(os.path.normpath(run.path))
    labels = [r.label for r in runs]
    for run in runs:  # directories of the same name too: the path relative to the common parent
        if labels.count(run.label) > 1:
            run.name = os.path.relpath(run.path, os.path.commonpath([r.path for r in runs]) or ".")


def _sweep_order(path: str) -> list[str]:
    """The run names of the sweep whose ``config.yaml`` is in ``path`` (its order), or []."""
    try:
        import yaml

        with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
            methods = (yaml.safe_load(f) or {}).get("sweep", {}).get("methods", [])
        return [m["name"] for m in methods if isinstance(m, dict) and "name" in m]
    except (OSError, AttributeError, yaml.YAMLError):
        return []


def _load(path: str) -> Run:
    file = os.path.join(path, "summary.json")
    try:
        with open(file, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{file}: not a readable summary ({err}); rerun that experiment or leave it out") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{file}: not a summary (a JSON object), got {type(summary).__name__}")
    metrics = os.path.join(path, "metrics.jsonl")
    try:
        records = read_jsonl(metrics) if os.path.exists(metrics) else []
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{metrics}: not readable ({err})") from None
    return Run(path, summary, records)


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(runs: list[Run]) -> str:
    """The Markdown comparison table."""
    synthetic = any(r.summary.get("opt_distance") is not None for r in runs)
    head = ["run", "method", "steps", "loss", "accuracy"] + (["dist. to optimum"] if synthetic else []) + \
        ["MB sent/worker", "ratio", "ms/step", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for run in runs:
        s = run.summary
        cells = [run.label, f"`{_method(s)}`", str(s.get("steps", "-")), _num(s.get("loss"), ".4f"),
                 _num(s.get("accuracy"), ".4f")]
        if synthetic:
            cells.append(_num(s.get("opt_distance"), ".4g"))
        sent = s.get("sent_bytes_per_worker")
        cells += [_num(None if sent is None else sent / 1e6, ".3f"), _num(s.get("compression_ratio"), ".1f"),
                  _num(None if s.get("time_per_step_s") is None else s["time_per_step_s"] * 1e3, ".2f"),
                  _num(s.get("train_time_s"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _method(summary: dict[str, Any]) -> str:
    comp = dict(summary.get("compression") or {})
    name = comp.pop("compressor", summary.get("method", "?"))
    comp.pop("seed", None)
    params = ", ".join(f"{k}={v}" for k, v in comp.items())
    return f"{name}({params})" if params else str(name)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc, queue = [], 0.0, []
    for v in values:
        queue.append(v)
        acc += v
        if len(queue) > window:
            acc -= queue.pop(0)
        out.append(acc / len(queue))
    return out


def plot(runs: list[Run], out_dir: str) -> list[str]:
    """Write ``loss.png`` and ``accuracy.png`` into ``out_dir``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # loss: smoothed training loss (lines) and evaluated loss (markers)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        recs = [r for r in run.records if r.get("loss") is not None]
        if not recs:
            continue
        window = max(1, len(recs) // 20)
        loss = _smooth([r["loss"] for r in recs], window)
        steps = [r["step"] for r in recs]
        mb = [r["cum_sent_bytes"] / 1e6 for r in recs]
        line, = axes[0].plot(steps, loss, label=run.label, linewidth=1.2)
        axes[1].plot(mb, loss, color=line.get_color(), linewidth=1.2)
        ev = [r for r in run.records if r.get("eval_loss") is not None]
        axes[0].plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o", color=line.get_color(), ms=3)
        axes[1].plot([r["cum_sent_bytes"] / 1e6 for r in ev], [r["eval_loss"] for r in ev], "o",
                     color=line.get_color(), ms=3)
    for ax, xlabel in zip(axes, ("step", "MB sent per worker")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (line: training, smoothed; dots: evaluated)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    _bytes_axis(axes[1], runs)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # accuracy, or distance to the optimum where there is no accuracy
    key = _evaluation_key(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        ev = [r for r in run.records if r.get(key) is not None]
        if not ev:
            continue
        line, = axes[0].plot([r["step"] for r in ev], [r[key] for r in ev], "o-", label=run.label, ms=3)
        axes[1].plot([r["cum_sent_bytes"] / 1e6 for r in ev], [r[key] for r in ev], "o-",
                     color=line.get_color(), ms=3)
    ylabel = "test accuracy" if key == "accuracy" else "distance to the optimum"
    for ax, xlabel in zip(axes, ("step", "MB sent per worker")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if key == "opt_distance":
            ax.set_yscale("log")
    _bytes_axis(axes[1], runs)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "accuracy.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def _evaluation_key(runs: list[Run]) -> str:
    """The metric of ``accuracy.png``: accuracy where any run has one, else the distance
    to the optimum (the synthetic task)."""
    return "accuracy" if any(r.get("accuracy") is not None for run in runs for r in run.records) else "opt_distance"


def left_out_of_plots(runs: list[Run]) -> str | None:
    """One line naming the runs that ``accuracy.png`` cannot show (runs of another task,
    without its metric, or never evaluated), or None when it shows every run."""
    key = _evaluation_key(runs)
    missing = [run for run in runs if not any(r.get(key) is not None for r in run.records)]
    if not missing:
        return None
    tasks = sorted({str(run.summary.get("task", "?")) for run in missing})
    metric = "accuracy" if key == "accuracy" else "distance to the optimum"
    return (f"note: accuracy.png leaves out {len(missing)} of {len(runs)} runs, which have no {metric} "
            f"(task {', '.join(tasks)}): {', '.join(run.label for run in missing)}")


def _bytes_axis(ax, runs: list[Run]) -> None:
    # bytes span orders of magnitude between methods: log scale, unless nothing was sent
    # (one worker)
    if all(r["cum_sent_bytes"] > 0 for run in runs for r in run.records):
        ax.set_xscale("log")


def compare(paths: list[str], out_dir: str | None = None) -> tuple[str, list[str]]:
    """Table and plots of the runs in ``paths``; written into ``out_dir`` (default: the
    first path). Returns (the table, followed by a line naming the runs a plot leaves out
    if any, and the files written)."""
    runs = find_runs(paths)
    out_dir = out_dir or paths[0]
    os.makedirs(out_dir, exist_ok=True)
    text = table(runs)
    note = left_out_of_plots(runs)
    if note:
        text += "\n\n" + note
    md = os.path.join(out_dir, "comparison.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text, [md] + plot(runs, out_dir)
