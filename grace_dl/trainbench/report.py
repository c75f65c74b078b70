"""Figures of the training benchmark: summaries, the ideal bound, the Markdown table,
the JSON of raw figures and the plot (framework-free; matplotlib only for the plot)."""

from __future__ import annotations

import json
import statistics
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .spec import rate_label


def summarize(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-repeat step times."""
    if not times:
        raise ValueError("no step times to summarize")
    return statistics.median(times), min(times), max(times)


def ideal_step_time(compute_s: float, link_bytes_per_step: float, rate_bps: float | None) -> float:
    """The step time if the exchange cost only its bytes on the link and nothing
    overlapped: ``compute + 8 * bytes / rate`` (the compute-only step when unshaped)."""
    if rate_bps is None:
        return compute_s
    if rate_bps <= 0:
        raise ValueError(f"rate must be positive, got {rate_bps}")
    return compute_s + 8.0 * link_bytes_per_step / rate_bps


def fraction_of_ceiling(ceiling_s: float, step_s: float) -> float:
    """Speed as a fraction of the compute-only ceiling: ``ceiling / step`` (1.0 = no cost
    for the exchange)."""
    if step_s <= 0:
        raise ValueError(f"step time must be positive, got {step_s}")
    return ceiling_s / step_s


@dataclass
class Result:
    """One method on one link. Bytes are per step: ``sent`` by one worker,
    ``payload`` what one worker's compressor produced, ``link`` on the shared link (all
    workers' sent bytes, since every rank talks over the one shaped loopback)."""

    method: str
    link: str
    rate_bps: float | None
    step_times: list[float] = field(default_factory=list)
    sent_bytes: float = 0.0
    payload_bytes: float = 0.0
    link_bytes: float = 0.0
    median: float | None = None
    low: float | None = None
    high: float | None = None
    ideal: float | None = None
    fraction: float | None = None
    ideal_fraction: float | None = None
    error: str | None = None

    def complete(self, ceiling_s: float | None) -> "Result":
        """Fill in the summary, the bound and the fractions from the raw figures."""
        if self.step_times:
            self.median, self.low, self.high = summarize(self.step_times)
            if ceiling_s is not None:
                self.ideal = ideal_step_time(ceiling_s, self.link_bytes, self.rate_bps)
                self.fraction = fraction_of_ceiling(ceiling_s, self.median)
                self.ideal_fraction = fraction_of_ceiling(ceiling_s, self.ideal)
        return self


def from_worker(method: str, rate_bps: float | None, figures: dict[str, Any], ceiling_s: float | None) -> Result:
    """A :class:`Result` from rank 0's JSON (see :mod:`grace_dl.trainbench.worker`)."""
    size = int(figures.get("size", 1))
    sent = float(figures.get("sent_per_step", 0.0))
    return Result(method, rate_label(rate_bps), rate_bps, list(figures["step_times"]), sent_bytes=sent,
                  payload_bytes=float(figures.get("payload_per_step", 0.0)), link_bytes=size * sent).complete(ceiling_s)


def _bytes(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def markdown(results: Sequence[Result], ceiling: Result | None) -> str:
    """Two tables: s/step (fraction of the ceiling) per method and link, then every figure."""
    links = list(dict.fromkeys(r.link for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    by_key = {(r.method, r.link): r for r in results}
    lines = []
    if ceiling is not None and ceiling.median is not None:
        lines.append(f"Compute-only ceiling (`-np 1`, no exchange): {ceiling.median:.4f} s/step "
                     f"(min {ceiling.low:.4f}, max {ceiling.high:.4f}, {len(ceiling.step_times)} repeats)")
    elif ceiling is not None:
        lines.append(f"Compute-only ceiling: failed ({ceiling.error})")
    lines += ["", "| s/step (fraction of ceiling) | " + " | ".join(links) + " |",
              "|---|" + "---:|" * len(links)]
    for method in methods:
        cells = []
        for link in links:
            r = by_key.get((method, link))
            if r is None:
                cells.append("")
            elif r.median is None:
                cells.append(f"failed: {r.error}")
            else:
                frac = f" ({r.fraction:.0%})" if r.fraction is not None else ""
                cells.append(f"{r.median:.4f}{frac}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "| method | link | s/step median | min - max | of ceiling | sent/worker/step | "
                  "on link/step | ideal s/step | ideal of ceiling |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.median is None:
            lines.append(f"| {r.method} | {r.link} | failed: {r.error} | | | | | | |")
            continue
        opt = (lambda v, fmt: format(v, fmt) if v is not None else "")
        lines.append(f"| {r.method} | {r.link} | {r.median:.4f} | {r.low:.4f} - {r.high:.4f} | "
                     f"{opt(r.fraction, '.0%')} | {_bytes(r.sent_bytes)} | {_bytes(r.link_bytes)} | "
                     f"{opt(r.ideal, '.4f')} | {opt(r.ideal_fraction, '.0%')} |")
    return "\n".join(lines) + "\n"


def write_json(path: str, meta: dict[str, Any], ceiling: Result | None, results: Sequence[Result]) -> None:
    """The raw figures: settings and machine, the ceiling, and one record per method and link."""
    with open(path, "w") as f:
        json.dump({"meta": meta, "ceiling": asdict(ceiling) if ceiling else None,
                   "results": [asdict(r) for r in results]}, f, indent=1)


def plot(path: str, results: Sequence[Result], ceiling: Result | None, title: str = "") -> None:
    """Bars of the median s/step per method, one colour per link, whiskers from min to
    max, a dot at each ideal bound and a line at the compute-only ceiling (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(dict.fromkeys(r.link for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    by_key = {(r.method, r.link): r for r in results}
    width = 0.8 / max(len(links), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) + 2), 4.5))
    for j, link in enumerate(links):
        xs, ys, lo, hi, ideal_x, ideal_y = [], [], [], [], [], []
        for i, method in enumerate(methods):
            r = by_key.get((method, link))
            x = i + (j - (len(links) - 1) / 2) * width
            if r is not None and r.median is None:
                ax.annotate("failed", (x, 0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                            ha="center", va="bottom")
            if r is None or r.median is None:
                continue
            xs.append(x)
            ys.append(r.median)
            lo.append(r.median - r.low)
            hi.append(r.high - r.median)
            if r.ideal is not None:
                ideal_x.append(x)
                ideal_y.append(r.ideal)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=link)
        ax.plot(ideal_x, ideal_y, "k.", markersize=5)
    if ceiling is not None and ceiling.median is not None:
        ax.axhline(ceiling.median, color="k", linestyle="--", linewidth=0.8, label="compute-only ceiling")
    ax.plot([], [], "k.", label="ideal bound")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("seconds per step (median, min-max)")
    ax.set_yscale("log")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
