"""The experiments' tasks, as NumPy arrays; nothing is downloaded.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes),
  pixels scaled to [0, 1]; a fixed shuffle, then the last ``test_fraction`` is the test set.
* ``charlm``: next-character prediction on the concatenated sources of a fixed list of
  standard-library modules (read from the running Python's ``stdlib`` directory), cut to
  ``max_chars`` characters; non-overlapping windows of ``seq_len + 1`` characters; the
  last ``test_fraction`` of the text is the test set.
* ``synthetic``: a linear model with a planted solution, ``least_squares``
  (``y = X w0 + noise``) or ``logistic`` (labels drawn from ``sigmoid(X w0)``), with an
  L2 term ``l2/2 ||w||^2``. Its exact optimum ``w*`` over the whole training set is
  computed in float64 (closed form, or Newton's method), so runs report their distance
  to it.

Every worker trains on its own shard (``rank::size`` of the training set) and draws its
batches from one permutation per epoch seeded by ``(seed, epoch, rank)``, so the
simulator and a real launch see the same batches.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..registry import ConfigError


@dataclass
class TaskData:
    """A task's data and what the runners need to know about it.

    Attributes:
        name: ``digits``, ``charlm`` or ``synthetic``.
        kind: ``classification``, ``sequence`` (per-position classification),
            ``least_squares`` or ``logistic``.
        x_train, y_train, x_test, y_test: NumPy arrays (for ``synthetic`` the test set
            is the training set: the objective is the training loss).
        num_classes: classes (the vocabulary size for ``charlm``; 1 for regression).
        input_dim: features per example (sequence length for ``charlm``).
        optimum: ``w*`` of the synthetic objective (float64), else None.
        l2: the L2 coefficient in the synthetic objective (else 0).
        info: a few facts for the summary (sizes, vocabulary ...).
    """

    name: str
    kind: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_dim: int
    optimum: np.ndarray | None = None
    l2: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def objective(self, w: np.ndarray) -> float:
        """The synthetic objective at weights ``w`` (float64, whole training set)."""
        return _objective(self.kind, self.x_train.astype(np.float64), self.y_train.astype(np.float64),
                          np.asarray(w, np.float64).reshape(-1), self.l2)


def load_task(task: dict[str, Any], seed: int = 0) -> TaskData:
    """The data of a validated ``task`` section."""
    loader = {"digits": _digits, "charlm": _charlm, "synthetic": _synthetic}[task["name"]]
    return loader(task, seed)


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def _digits(task: dict[str, Any], seed: int) -> TaskData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is in requirements.txt
        raise ConfigError("task.name: digits needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    # the split is fixed (seed 0), whatever the experiment's seed, so runs compare
    train, test = _split(len(x), task["test_fraction"], 0)
    return TaskData("digits", "classification", x[train], y[train], x[test], y[test], 10, 64,
                    info={"train": len(train), "test": len(test)})


def stdlib_text(modules: tuple[str, ...] | list[str]) -> str:
    """The concatenated sources of standard-library ``modules`` (``a.b`` is ``a/b.py``
    or ``a/b/__init__.py`` under ``sysconfig.get_paths()['stdlib']``)."""
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for module in modules:
        rel = module.replace(".", os.sep)
        for candidate in (rel + ".py", os.path.join(rel, "__init__.py")):
            path = os.path.join(root, candidate)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    parts.append(f.read())
                break
        else:
            raise ConfigError(f"task.modules: no source of standard-library module {module!r} under {root}")
    return "\n".join(parts)


def _charlm(task: dict[str, Any], seed: int) -> TaskData:
    text = stdlib_text(task["modules"])[: task["max_chars"]]
    # printable ASCII plus newline; anything else (rare in the stdlib) becomes '?'
    vocab = ["\n"] + [chr(c) for c in range(32, 127)]
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index.get(c, index["?"]) for c in text], dtype=np.int64)
    window = task["seq_len"] + 1
    n_test_chars = max(window, int(len(ids) * task["test_fraction"]))
    train_ids, test_ids = ids[:-n_test_chars], ids[-n_test_chars:]
    if len(train_ids) < window:
        raise ConfigError(f"task.max_chars: {task['max_chars']} characters leave no training window "
                          f"of seq_len + 1 = {window}")

    def windows(a: np.ndarray) -> np.ndarray:
        n = len(a) // window
        return a[: n * window].reshape(n, window)

    train, test = windows(train_ids), windows(test_ids)
    return TaskData("charlm", "sequence", train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:],
                    len(vocab), task["seq_len"],
                    info={"chars": len(text), "vocab": len(vocab), "train_windows": len(train),
                          "test_windows": len(test)})


def _objective(kind: str, x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> float:
    z = x @ w
    if kind == "least_squares":
        data = 0.5 * np.mean((z - y) ** 2)
    else:  # mean binary cross-entropy with logits z: log(1 + e^z) - y z
        data = np.mean(np.logaddexp(0.0, z) - y * z)
    return float(data + 0.5 * l2 * w @ w)


def _synthetic(task: dict[str, Any], seed: int) -> TaskData:
    # the data depend on the experiment's seed: a different seed is a different problem
    rng = np.random.default_rng([seed, 1234])
    n, d, kind, l2 = task["samples"], task["dim"], task["kind"], task["l2"]
    x = rng.standard_normal((n, d))
    w0 = rng.standard_normal(d) / np.sqrt(d)
    if kind == "least_squares":
        y = x @ w0 + task["noise"] * rng.standard_normal(n)
        # minimiser of 1/2 mean (x w - y)^2 + l2/2 |w|^2
        optimum = np.linalg.solve(x.T @ x / n + l2 * np.eye(d), x.T @ y / n)
    else:
        logits = 3.0 * x @ w0 + task["noise"] * rng.standard_normal(n)
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
        optimum = _newton_logistic(x, y, l2)
    xf, yf = x.astype(np.float32), y.astype(np.float32)
    data = TaskData("synthetic", kind, xf, yf, xf, yf, 1, d, optimum=optimum, l2=l2)
    data.info = {"samples": n, "dim": d, "optimal_loss": data.objective(optimum),
                 "initial_distance": float(np.linalg.norm(optimum))}
    return data


def _newton_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """The minimiser of mean BCE(x w, y) + l2/2 |w|^2 (strictly convex when l2 > 0)."""
    n, d = x.shape
    w = np.zeros(d)
    ridge = max(l2, 1e-8)  # keeps the Hessian invertible on separable data with l2 = 0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) / n + l2 * w
        if np.linalg.norm(grad) < 1e-12:
            break
        hess = (x.T * (p * (1 - p))) @ x / n + ridge * np.eye(d)
        w = w - np.linalg.solve(hess, grad)
    return w


# -- sharding and batches -----------------------------------------------------------------

def shard(n: int, rank: int, size: int) -> np.ndarray:
    """Indices of worker ``rank``'s shard of ``n`` examples: ``rank::size``."""
    return np.arange(rank, n, size)


def steps_per_epoch(n: int, size: int, batch_size: int) -> int:
    """Full batches per epoch, the same on every worker (the smallest shard decides)."""
    smallest = n // size
    if smallest < batch_size:
        raise ConfigError(f"batch_size: {batch_size} is larger than a worker's shard of the training "
                          f"set ({smallest} examples with {size} workers)")
    return smallest // batch_size


def batch_indices(n: int, rank: int, size: int, batch_size: int, seed: int,
                  total_steps: int) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, example indices) of worker ``rank``'s batches for ``total_steps`` steps."""
    mine = shard(n, rank, size)
    per_epoch = steps_per_epoch(n, size, batch_size)
    step = 0
    epoch = 0
    while step < total_steps:
        order = mine[np.random.default_rng([seed, epoch, rank]).permutation(len(mine))]
        for i in range(per_epoch):
            if step == total_steps:
                return
            yield epoch, order[i * batch_size:(i + 1) * batch_size]
            step += 1
        epoch += 1
