"""``grace-dl bench-train``: orchestrate the end-to-end training benchmark.

One invocation measures the compute-only ceiling (one process, no exchange), then every
method on every link: Horovod methods under ``horovodrun -np N --gloo``, DDP methods as N
spawned torch.distributed Gloo processes, each rank with one torch thread, and shaped
links inside a network namespace (:mod:`grace_dl.trainbench.netns`). Every launch is
bounded by a timeout; a launch that fails or times out is reported as such and the
benchmark goes on. Writes ``results.md``, ``results.json`` and ``step_time.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from ..registry import ConfigError
from . import netns, report
from .spec import PRESETS, MethodSpec, Preset, parse_method, parse_rate, rate_label

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds grace_dl/
#: the environment variable naming the copy of grace_dl a launch runs (see :func:`_env`)
TREE_VAR = "GRACE_DL_BENCH_TREE"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``grace-dl bench-train``."""
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS),
                        help="small: a 62-tensor ResNet-18-shaped model at 1/16 of its weights, a few minutes; "
                             "full: ResNet-18 size, batch 16 at 128x128, 3 links, 12 methods (default small)")
    parser.add_argument("--method", action="append", metavar="SPEC",
                        help="LAUNCHER:NAME[,KEY=VALUE...], e.g. hvd:topk,ratio=0.01, hvd:none, hvd:fp16, "
                             "ddp:allreduce, ddp:fp16_hook, ddp:powersgd_hook,rank=4, ddp:powersgd,rank=4, "
                             "hvd:local_sgd,period=4, ddp:post_local_sgd,period=4,switch_step=2, "
                             "hvd:onebit_adam,freeze_step=2, hvd:none,optimizer=adam "
                             "(repeatable; default: the preset's)")
    parser.add_argument("--link", action="append", metavar="RATE",
                        help="unshaped or a tc rate such as 1gbit, 100mbit (repeatable; default: the preset's)")
    parser.add_argument("--np", type=int, default=2, help="ranks per job (default 2)")
    for name, help_text in (("width", "channels of the model's first stage (64 = ResNet-18)"),
                            ("num-classes", "classifier outputs"), ("batch-size", "images per rank and step"),
                            ("image-size", "image height and width"), ("warmup", "untimed steps"),
                            ("steps", "steps per timed repeat"), ("repeats", "timed repeats (noise = their spread)")):
        parser.add_argument(f"--{name}", type=int, help=f"{help_text} (default: the preset's)")
    parser.add_argument("--timeout", type=float, help="seconds allowed per launch (default: the preset's)")
    parser.add_argument("--output", help="directory for results.md, results.json, step_time.png and logs/ "
                                         "(default bench-train-<preset>)")


def settings(args: argparse.Namespace) -> tuple[Preset, list[MethodSpec], list[float | None]]:
    """The preset with the command line's overrides, parsed methods and link rates;
    bad values raise :class:`~grace_dl.registry.ConfigError`."""
    preset = replace(PRESETS[args.preset])
    for key in ("width", "num_classes", "batch_size", "image_size", "warmup", "steps", "repeats"):
        value = getattr(args, key, None)
        if value is not None:
            minimum = 0 if key == "warmup" else (32 if key == "image_size" else 1)
            if value < minimum:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= {minimum}, got {value}")
            setattr(preset, key, value)
    if args.timeout is not None:
        if args.timeout <= 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {args.timeout}")
        preset.timeout = args.timeout
    if args.np < 2:
        raise ConfigError(f"--np must be >= 2 (the ceiling is measured with one process anyway), got {args.np}")
    methods = list({m.label: m for m in (parse_method(text) for text in (args.method or preset.methods))}.values())
    rates = list(dict.fromkeys(parse_rate(link) for link in (args.link or preset.links)))
    return preset, methods, rates


def _env(extra: dict[str, str] | None = None, tree: str | None = None) -> dict[str, str]:
    """The environment of a launched process: grace_dl imported from this copy (or from
    ``tree``, a method's ``tree=``), one thread per rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tree or PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env[TREE_VAR] = tree or PACKAGE_ROOT  # the launch's working directory: ``python -m`` imports from there first
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra or {})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """Terminate the sessions of our launched processes (each was started in its own)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + 5
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(deadline - time.monotonic(), 0.01))


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [t for t in path.read_text(errors="replace").splitlines() if t.strip()]
    except OSError:
        return ""
    return " / ".join(text[-lines:])[-400:]


def launch(commands: list[tuple[list[str], dict[str, str]]], log: Path, timeout: float) -> str | None:
    """Run the processes of one job (each in its own session, output to ``log``) until
    all exit or ``timeout`` seconds pass; None when all succeeded, else why not. A
    process that fails ends the others (their peer is gone)."""
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout
    with open(log, "w") as out:
        try:
            for cmd, env in commands:
                out.write("$ " + " ".join(cmd) + "\n")
                out.flush()
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True, cwd=env.get(TREE_VAR, PACKAGE_ROOT)))
            while True:
                codes = [p.poll() for p in procs]
                failed = [c for c in codes if c not in (None, 0)]
                if failed:
                    _stop(procs)
                    return f"exit status {failed[0]}: {_tail(log)}"
                if all(c == 0 for c in codes):
                    return None
                if time.monotonic() > deadline:
                    _stop(procs)
                    return f"timed out after {timeout:g} s"
                time.sleep(0.1)
        finally:  # also on Ctrl-C
            _stop(procs)


def job_commands(spec: MethodSpec | None, config: dict[str, Any], np: int,
                 link: netns.ShapedLink | None) -> list[tuple[list[str], dict[str, str]]]:
    """The processes of one job: the ceiling's single process, a horovodrun, or N DDP ranks."""
    wrap = link.wrap if link is not None else list
    worker = [sys.executable, "-m", "grace_dl.trainbench.worker"]
    if spec is None:
        return [(wrap(worker + [json.dumps(config)]), _env())]
    method = spec.as_dict()
    tree = method["params"].pop("tree", None)  # another copy of grace_dl: its worker never sees the key
    cycle_ms = method["params"].pop("cycle_ms", None)  # Horovod's, read from its environment
    config = dict(config, launcher=spec.launcher, method=method)
    if spec.launcher == "hvd":
        horovodrun = shutil.which("horovodrun", path=_env()["PATH"])
        if horovodrun is None:
            raise FileNotFoundError("horovodrun not found (install Horovod: scripts/setup.sh)")
        extra = {"HOROVOD_CYCLE_TIME": f"{cycle_ms:g}"} if cycle_ms is not None else None
        return [(wrap([horovodrun, "-np", str(np), "--gloo", *worker, json.dumps(config)]), _env(extra, tree=tree))]
    port = str(_free_port())
    return [(wrap(worker + [json.dumps(config)]),
             _env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(np), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": "lo"}, tree=tree)) for r in range(np)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def run_job(spec: MethodSpec | None, preset: Preset, np: int, rate: float | None, link: netns.ShapedLink | None,
            out_dir: Path, index: int, ceiling_s: float | None) -> report.Result:
    """Launch one job and read rank 0's figures."""
    label = spec.label if spec is not None else "compute-only (-np 1)"
    # absolute: a method's tree= launch runs in that tree's directory, where a relative
    # --output would send rank 0's figures elsewhere
    result_path = (out_dir / "logs" / f"{index:02d}-{_slug(label)}-{_slug(rate_label(rate))}.json").absolute()
    config = {"launcher": "none", "width": preset.width, "num_classes": preset.num_classes,
              "batch_size": preset.batch_size, "image_size": preset.image_size, "warmup": preset.warmup,
              "steps": preset.steps, "repeats": preset.repeats, "result": str(result_path),
              "watchdog": max(preset.timeout - 10, preset.timeout * 0.9)}
    started = time.monotonic()
    try:
        error = launch(job_commands(spec, config, np, link), result_path.with_suffix(".log"), preset.timeout)
    except FileNotFoundError as err:
        error = str(err)
    if error is None:
        try:
            figures = json.loads(result_path.read_text())
        except (OSError, ValueError) as err:
            error = f"no figures from rank 0 ({err})"
    if error is not None:
        result = report.Result(label, rate_label(rate), rate, error=error)
    else:
        result = report.from_worker(label, rate, figures, ceiling_s)
    took = time.monotonic() - started
    shown = f"{result.median:.4f} s/step" if result.median is not None else f"FAILED: {result.error}"
    print(f"  {label} @ {rate_label(rate)}: {shown} ({took:.0f} s)", file=sys.stderr, flush=True)
    return result


def machine() -> dict[str, Any]:
    """Where and when: for the JSON and the docs."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": version("torch"), "horovod": version("horovod")}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`)."""
    preset, methods, rates = settings(args)
    out_dir = Path(args.output or f"bench-train-{args.preset}")
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    shaped = [r for r in rates if r is not None]
    shaping_note = None
    if shaped:
        reason = netns.why_cannot_shape()
        if reason is None:
            netns.remove_stale()
            reason = netns.probe()
        if reason is not None:
            shaping_note = f"cannot shape links ({reason}); measuring unshaped only"
            print(f"grace-dl bench-train: {shaping_note}", file=sys.stderr)
            rates = [None]
    meta = {"machine_before": machine(), "preset": args.preset, "np": args.np, "settings": asdict(preset),
            "methods": [m.label for m in methods], "links": [rate_label(r) for r in rates],
            "shaping": shaping_note or ("tc tbf on the loopback of a network namespace" if shaped else "none")}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # so namespaces are deleted on kill too
    results: list[report.Result] = []
    try:
        ceiling = _run_all(preset, methods, rates, args.np, out_dir, results)
    except KeyboardInterrupt as err:
        print(f"grace-dl bench-train: interrupted ({err or 'Ctrl-C'}); launched jobs stopped, namespaces deleted",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    meta["machine_after"] = machine()
    return _write(args, preset, args.np, ceiling, results, meta, out_dir)


def _run_all(preset: Preset, methods: list[MethodSpec], rates: list[float | None], np: int, out_dir: Path,
             results: list[report.Result]) -> report.Result:
    """The ceiling, then every method on every link (appended to ``results``); returns the ceiling."""
    print(f"grace-dl bench-train: {len(methods)} methods x {len(rates)} links, {np} ranks", file=sys.stderr, flush=True)
    # one process starts fast: more repeats make the reference of every fraction steadier
    ceiling = run_job(None, replace(preset, repeats=max(2 * preset.repeats, 5)), 1, None, None, out_dir, 0, None)
    index = 1
    for rate in rates:
        with netns.ShapedLink(rate) if rate is not None else contextlib.nullcontext() as link:
            for spec in methods:
                results.append(run_job(spec, preset, np, rate, link, out_dir, index, ceiling.median))
                index += 1
    return ceiling


def _write(args: argparse.Namespace, preset: Preset, np: int, ceiling: report.Result, results: list[report.Result],
           meta: dict[str, Any], out_dir: Path) -> int:
    """Write results.md, results.json and step_time.png; print the tables."""
    text = report.markdown(results, ceiling)
    model = (f"ResNet-18-shaped model (62 tensors, width {preset.width}, {preset.num_classes} classes), batch "
             f"{preset.batch_size} per rank at {preset.image_size}x{preset.image_size}, {np} ranks, "
             f"{preset.repeats} repeats of {preset.steps} steps after {preset.warmup} warm-up steps")
    (out_dir / "results.md").write_text(model + "\n\n" + text)
    report.write_json(str(out_dir / "results.json"), meta, ceiling, results)
    written = [str(out_dir / "results.md"), str(out_dir / "results.json")]
    try:
        report.plot(str(out_dir / "step_time.png"), results, ceiling, title=model)
        written.append(str(out_dir / "step_time.png"))
    except ImportError:
        print("grace-dl bench-train: matplotlib is not installed; no plot", file=sys.stderr)
    print(model + "\n\n" + text)
    print("wrote " + ", ".join(written))
    return 0 if ceiling.median is not None and all(r.error is None for r in results) else 1
