"""Checks shared by the multi-rank scripts: one launch checks many methods.

Each rank builds the gradients of every rank from fixed seeds, so it can run the
in-process simulator for the whole job and compare its own result with the simulator's
result for its rank.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import grace_dl

def stage_params(name: str) -> dict[str, Any]:
    """Parameters that make a method leave its warm-up at once (1-bit Adam's
    ``freeze_step=1``), so that a few steps run its compressed stage; {} for the others."""
    return {"freeze_step": 1} if "freeze_step" in grace_dl.entries("compressor")[name].params else {}


# (label, factory kwargs): every registered method with its default memory and
# communicator, plus the other communicators where the method allows them
def method_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for name in grace_dl.list_methods():
        cases.append((name, {"compressor": name}))
        if getattr(grace_dl.entries("compressor")[name].cls, "returns_update", False):
            # 1-bit Adam: its own communicator only; a short warm-up, so the 1-bit stage runs too
            cases.append((f"{name}/frozen", {"compressor": name, **stage_params(name)}))
            continue
        summable = grace_dl.make(name).compressor.summable
        for comm in ("allgather", "broadcast") + (("allreduce",) if summable else ()):
            if comm != grace_dl.make(name).communicator.registry_name:
                cases.append((f"{name}/{comm}", {"compressor": name, "communicator": comm}))
    return cases


def rank_grads(rank: int, step: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s gradients at ``step``: tensors of several shapes and sizes."""
    rng = np.random.default_rng(1000 * step + rank)
    return {"layer.weight": rng.standard_normal((16, 33)).astype(np.float32),
            "layer.bias": rng.standard_normal(33).astype(np.float32),
            "odd": rng.standard_normal(7).astype(np.float32)}


def check_methods_against_simulator(rank: int, size: int, make_transport: Callable[[], Any],
                                    to_array: Callable[[np.ndarray], Any],
                                    to_numpy: Callable[[Any], np.ndarray], steps: int = 3) -> int:
    """Run every method case over the real transport and over the simulator; the
    results must be bit-identical. Returns the number of cases checked."""
    transport = make_transport()
    checked = 0
    for label, config in method_cases():
        real = grace_dl.from_config(dict(config)).bind(transport)
        sim = grace_dl.LocalSimulator(grace_dl.from_config(dict(config)), size)
        for step in range(steps):
            grads = [{k: to_array(v) for k, v in rank_grads(r, step).items()} for r in range(size)]
            expected = sim.step(grads)[rank]
            pending = [(name, real.start(t, name)) for name, t in grads[rank].items()]
            for name, p in pending:
                got = to_numpy(real.finish(p))
                want = to_numpy(expected[name])
                if got.shape != want.shape or got.tobytes() != want.tobytes():
                    raise AssertionError(f"{label} step {step} tensor {name}: real transport differs from "
                                         f"the simulator by {np.abs(got - want).max()}")
        stats, sim_stats = real.stats, sim.workers[rank].stats
        if (stats.payload, stats.sent, stats.received) != (sim_stats.payload, sim_stats.sent, sim_stats.received):
            raise AssertionError(f"{label}: byte accounting differs from the simulator")
        checked += 1
    return checked
