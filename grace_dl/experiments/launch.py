"""Launchers: run an experiment in-process (simulator), or start ``horovodrun -np N`` on
:mod:`grace_dl.experiments.worker` (Gloo, or MPI), or act as a worker when already
inside a Horovod launch.

The launching process validates the configuration first (so a bad config fails in one
line before anything starts), writes the resolved configuration to
``<output_dir>/config.yaml``, launches the workers on that file, and reads back the
summary that rank 0 wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from ..registry import ConfigError
from .config import ExperimentConfig, dump

#: Variables that Horovod's launchers (Gloo) and MPI implementations set in each worker.
LAUNCHED_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")

MPI_ARGS_ROOT = "--allow-run-as-root --oversubscribe"
MPI_ARGS = "--oversubscribe"


def inside_launch() -> bool:
    """Whether this process is a worker started by horovodrun or mpirun."""
    return any(v in os.environ for v in LAUNCHED_ENV)


def venv_bin() -> str:
    """The directory of the running Python (its virtual environment's ``bin``)."""
    return os.path.dirname(os.path.abspath(sys.executable))


def horovodrun_command(config: ExperimentConfig, config_path: str) -> list[str]:
    """The ``horovodrun`` command line that starts the workers on ``config_path``."""
    horovodrun = os.path.join(venv_bin(), "horovodrun")
    if not os.path.exists(horovodrun):
        raise ConfigError(f"launcher: {config.launcher} needs horovodrun, which is not in {venv_bin()} "
                          f"(run scripts/setup.sh), or use launcher: simulator")
    cmd = [horovodrun, "-np", str(config.workers)]
    if config.launcher == "horovodrun-gloo":
        cmd += ["--gloo"]
    else:
        root = hasattr(os, "geteuid") and os.geteuid() == 0
        cmd += ["--mpi", f"--mpi-args={MPI_ARGS_ROOT if root else MPI_ARGS}"]
    return cmd + [sys.executable, "-m", "grace_dl.experiments.worker", config_path]


def worker_env(progress: bool, framework: str | None = None) -> dict[str, str]:
    """The workers' environment: the venv's bin first on PATH, quiet TensorFlow, and
    whether rank 0 draws a progress bar.

    Args:
        progress: whether rank 0 draws a progress bar.
        framework: the run's framework (default None: unknown). For ``"torch"``,
            ``TF_ENABLE_ONEDNN_OPTS=0`` unless set: horovodrun imports TensorFlow only to
            check how Horovod was built, and TensorFlow's oneDNN notice is logged before
            ``TF_CPP_MIN_LOG_LEVEL`` takes effect; with oneDNN off it prints nothing.
    """
    from .train import PROGRESS_ENV

    env = dict(os.environ)
    env["PATH"] = venv_bin() + os.pathsep + env.get("PATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if framework == "torch":
        env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env[PROGRESS_ENV] = "1" if progress else "0"
    return env


def run_one(config: ExperimentConfig, progress: bool | None = None) -> dict[str, Any] | None:
    """Run one experiment with its configured launcher; the summary (None on ranks > 0
    when this process is itself a worker)."""
    from . import train

    if inside_launch():
        if config.launcher == "simulator":
            raise ConfigError("launcher: simulator runs in one process; do not start it under horovodrun/mpirun")
        return train.run(config)
    os.makedirs(config.output_dir, exist_ok=True)
    config_path = os.path.join(config.output_dir, "config.yaml")
    dump(config, config_path)
    summary_path = os.path.join(config.output_dir, "summary.json")
    if os.path.exists(summary_path):
        os.remove(summary_path)  # a failed run must not show an old summary
    if progress is None:
        progress = sys.stderr.isatty()
    if config.launcher == "simulator":
        previous = os.environ.get(train.PROGRESS_ENV)
        os.environ[train.PROGRESS_ENV] = "1" if progress else "0"
        try:
            return train.run(config)
        finally:
            if previous is None:
                del os.environ[train.PROGRESS_ENV]
            else:
                os.environ[train.PROGRESS_ENV] = previous
    cmd = horovodrun_command(config, config_path)
    print(f"launching: {' '.join(cmd)}", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, env=worker_env(progress, config.framework))
    if result.returncode != 0:
        raise LaunchError(f"horovodrun exited with status {result.returncode} (see its output above)",
                          result.returncode)
    if not os.path.exists(summary_path):
        raise LaunchError(f"the workers finished but wrote no {summary_path}", 1)
    with open(summary_path, encoding="utf-8") as f:
        return json.load(f)


class LaunchError(RuntimeError):
    """The launched workers failed (their output says why)."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def run_experiment(config: ExperimentConfig, progress: bool | None = None) -> list[dict[str, Any]]:
    """Run an experiment, or each method of a sweep and then compare them (table in
    ``<output_dir>/comparison.md``, plots next to it); the summaries (an empty list on
    Horovod ranks > 0)."""
    summaries = []
    if config.sweep is not None and not inside_launch():
        os.makedirs(config.output_dir, exist_ok=True)
        dump(config, os.path.join(config.output_dir, "config.yaml"))
    for run_config in config.run_configs():
        summary = run_one(run_config, progress)
        # ranks > 0 of a launch get None, and go on to the next run with rank 0
        if summary is not None:
            summaries.append(summary)
    if summaries and config.sweep is not None:
        from .compare import compare

        compare([c.output_dir for c in config.run_configs()], config.output_dir)
    return summaries
