"""Shared test helpers."""

from __future__ import annotations

import numpy as np

from grace_dl.core import TensorContext, derive_key


def make_ctx(numel: int, *, dtype: str = "float32", in_dtype: str | None = None, step: int = 0,
             name: str = "t", seed: int = 0, rank: int = 0, world_size: int = 1) -> TensorContext:
    """A TensorContext for calling a compressor directly."""
    return TensorContext(name=name, shape=(numel,), numel=numel, dtype=dtype, in_dtype=in_dtype or dtype,
                         step=step, shared_key=derive_key(seed, name), worker_key=derive_key(seed, name, rank),
                         rank=rank, world_size=world_size)


def normal(n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Standard normal test data."""
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


def run_horovod_tf_script(script: str, timeout: int = 600) -> str:
    """Run ``script`` with ``python -c`` in a fresh process (Horovod TF and the
    repository importable; TF's logs off), skip when Horovod is not installed, assert
    that it exits with 0 (showing the end of its stderr otherwise) and return its
    stdout."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    if importlib.util.find_spec("horovod") is None:
        pytest.skip("horovod is not installed (run scripts/setup.sh)")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
