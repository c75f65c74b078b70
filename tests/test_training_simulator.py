"""Training in the N-worker simulator: every registered method trains softmax regression
on scikit-learn's digits with 4 workers and must end within a stated margin of the loss
of uncompressed training; methods that the literature says need error feedback are also
run without it, which must be worse.

The model has a 64x10 weight matrix (compressible) and a 10-element bias. Each worker
draws its own batches from its own shard. Margin: final full-data loss at most
``1.25 * dense + 0.1`` after ``STEPS`` steps of plain SGD (dense reaches about 0.25).
"""

from __future__ import annotations

import numpy as np
import pytest

import grace_dl

WORKERS, STEPS, BATCH = 4, 200, 32
# per-method settings: (parameters, learning rate). Sign methods that send unscaled
# signs move every weight by lr per step, so they take a small lr; sparsifiers keep a
# fraction large enough for a 640-element tensor.
SETTINGS: dict[str, tuple[dict, float]] = {
    "signsgd": ({}, 0.01), "signum": ({}, 0.003),
    "topk": ({"ratio": 0.05}, 0.5), "randomk": ({"ratio": 0.25, "rescale": False}, 0.5),
    "gtopk": ({"ratio": 0.05}, 0.5), "dgc": ({"ratio": 0.05}, 0.5), "threshold": ({"threshold": 0.005}, 0.5),
    "adaptive_threshold": ({"ratio": 0.05}, 0.5), "sidco": ({"ratio": 0.05}, 0.5), "stc": ({"ratio": 0.05}, 0.5),
    "chunk": ({"ratio": 0.2, "chunk_size": 16}, 0.5), "sketch": ({"ratio": 0.1}, 0.5),
    "powersgd": ({"rank": 2}, 0.5),
    # returns Adam's update direction (about 1 per element): an Adam-sized lr
    "onebit_adam": ({"freeze_step": 50}, 0.01),
}
DEFAULT = ({}, 0.5)
# methods whose papers pair them with error feedback: (method, memory that turns it off)
NEEDS_EF = {"topk": "none", "efsignsgd": "none", "onebit": "none"}


def _data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    return x, y


def _loss_and_grads(w, b, x, y):
    logits = x @ w + b
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    return float(loss), (x.T @ p).astype(np.float32), p.sum(0).astype(np.float32)


def train(method: grace_dl.Grace, lr: float) -> float:
    x, y = _data()
    shards = [(x[r::WORKERS], y[r::WORKERS]) for r in range(WORKERS)]
    w, b = np.zeros((64, 10), np.float32), np.zeros(10, np.float32)
    sim = grace_dl.LocalSimulator(method, WORKERS)
    for step in range(STEPS):
        grads = []
        for r, (xs, ys) in enumerate(shards):
            idx = np.random.default_rng(step * WORKERS + r).integers(0, len(ys), BATCH)
            _, gw, gb = _loss_and_grads(w, b, xs[idx], ys[idx])
            grads.append({"w": gw, "b": gb})
        out = sim.step(grads)[0]
        w -= np.float32(lr) * out["w"]
        b -= np.float32(lr) * out["b"]
    return _loss_and_grads(w, b, x, y)[0]


@pytest.fixture(scope="module")
def dense_loss() -> float:
    return train(grace_dl.none(), DEFAULT[1])


@pytest.mark.parametrize("name", grace_dl.list_methods())
def test_method_trains_within_margin_of_dense(name, dense_loss):
    params, lr = SETTINGS.get(name, DEFAULT)
    loss = train(grace_dl.make(name, **params), lr)
    assert dense_loss < 0.4, f"dense training did not converge: {dense_loss:.3f}"
    assert loss <= 1.25 * dense_loss + 0.1, f"{name}: loss {loss:.3f}, dense {dense_loss:.3f}"


@pytest.mark.parametrize("name", sorted(NEEDS_EF))
def test_error_feedback_helps_where_the_paper_says_it_is_needed(name):
    params, lr = SETTINGS.get(name, DEFAULT)
    with_ef = train(grace_dl.make(name, **params), lr)
    without = train(grace_dl.make(name, memory=NEEDS_EF[name], **params), lr)
    assert with_ef < without, f"{name}: loss with error feedback {with_ef:.3f}, without {without:.3f}"
