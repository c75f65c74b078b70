"""Non-finite gradients, for every registered method with state (generated from the
registry): a NaN or Inf in one step's gradient never reaches a memory. The worker whose
gradient held it keeps its state of the step before, bit for bit; every worker's state
stays finite; and the next finite step updates the state again (training recovers)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

import grace_dl
from grace_dl.checks import NonFiniteWarning

# NumPy warns about the NaN arithmetic these steps are made of
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SHAPES = {"layer.weight": (16, 12), "layer.bias": (12,)}


def grads(step: int, workers: int = 2) -> list[dict[str, np.ndarray]]:
    out = []
    for r in range(workers):
        rng = np.random.default_rng(100 * step + r)
        out.append({k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()})
    return out


def as_backend(backend: str, batch: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    if backend == "numpy":
        return batch
    torch = pytest.importorskip("torch")
    import grace_dl.torch  # noqa: F401  (registers the torch backend)

    return [{k: torch.from_numpy(v.copy()) for k, v in g.items()} for g in batch]


def to_numpy(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.numpy()


def memory_state(worker: grace_dl.Grace) -> dict[str, Any]:
    state = worker.state_dict()
    return {"memory": state["memory"], "overrides": state.get("overrides", {})}


def arrays(state: Any):
    if isinstance(state, dict):
        for key, value in state.items():
            for path, array in arrays(value):
                yield (key,) + path, array
    else:
        yield (), state


def stateful_cases() -> list[tuple[str, dict[str, Any]]]:
    """Every method with its default memory, and every method whose default memory keeps
    nothing with the residual memory (error feedback is the usual add-on)."""
    cases = []
    for name in grace_dl.list_methods():
        method = grace_dl.make(name)
        if method.memory.state_fields:
            cases.append((name, {}))
        else:
            try:
                grace_dl.make(name, memory="residual")
            except Exception:  # a compressor that refuses error feedback
                continue
            cases.append((f"{name}+residual", {"memory": "residual"}))
    return cases


CASES = stateful_cases()


def test_the_registry_has_stateful_methods():
    names = {label for label, _ in CASES}
    assert {"topk", "dgc", "signum", "powersgd", "gtopk"} <= names, names


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("label,extra", CASES, ids=[c[0] for c in CASES])
def test_a_non_finite_gradient_leaves_memory_state_as_it_was(label, extra, bad, backend):
    name = label.split("+")[0]
    sim = grace_dl.LocalSimulator(grace_dl.make(name, **extra), 2)
    for step in range(2):
        sim.step(as_backend(backend, grads(step)))
    before = [memory_state(w) for w in sim.workers]
    assert any(a.size for a in (arr for _, arr in arrays(before[0]))), f"{label}: no state after two steps"
    poisoned = grads(2)
    poisoned[0]["layer.weight"][3, 4] = bad  # one element of one worker's gradient
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim.step(as_backend(backend, poisoned))
    # the skipped update is said once, naming the tensor, on the worker whose state kept it
    said = [str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)]
    on_rank0 = [m for m in said if "on rank 0" in m]
    assert len(on_rank0) == 1 and "tensor 'layer.weight'" in on_rank0[0], f"{label}: {said}"
    after = [memory_state(w) for w in sim.workers]
    for rank, state in enumerate(after):
        for path, array in arrays(state):
            assert np.all(np.isfinite(array.astype(np.float64))), f"{label}: rank {rank} {path} is not finite"
    # the worker that saw the NaN/Inf keeps the state of the step before, bit for bit
    old, new = dict(arrays(before[0])), dict(arrays(after[0]))
    assert old.keys() == new.keys()
    for path in old:
        if path[1] == "layer.weight":
            assert old[path].tobytes() == new[path].tobytes(), f"{label}: {path} changed on the poisoned step"
    # and recovers: the next finite step updates the state and gives a finite aggregate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sim.step(as_backend(backend, grads(3)))
        again = grads(4)
        again[0]["layer.bias"][1] = bad
        sim.step(as_backend(backend, again))  # a second skip by the same method
    assert not [w for w in caught if issubclass(w.category, NonFiniteWarning)], f"{label}: said more than once"
    assert all(np.all(np.isfinite(to_numpy(o["layer.weight"]))) for o in out), f"{label}: aggregate not finite after recovery"
    later = dict(arrays(memory_state(sim.workers[0])))
    assert all(np.all(np.isfinite(a.astype(np.float64))) for a in later.values())
    weight = [p for p in later if p[1] == "layer.weight"]
    # (a compressor that drops nothing here, such as none or chunk on so small a tensor,
    # leaves a zero residual: nothing to change)
    assert (any(later[p].tobytes() != new[p].tobytes() for p in weight)
            or not any(np.any(later[p]) for p in weight)), f"{label}: state frozen after the poisoned step"
