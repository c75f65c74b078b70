"""Policies: dense small tensors, dense warm-up steps, per-name overrides."""

from __future__ import annotations

import numpy as np
import pytest

import grace_dl
from grace_dl import ConfigError

from helpers import normal


def grads(step: int, workers: int = 2) -> list[dict[str, np.ndarray]]:
    return [{"big.weight": normal(400, seed=100 * step + r), "big.bias": normal(40, seed=7 + r),
             "emb": normal(300, seed=50 + r)} for r in range(workers)]


def run(method, steps: int, workers: int = 2):
    sim = grace_dl.LocalSimulator(method, workers)
    outs = [sim.step(grads(s, workers)) for s in range(steps)]
    return sim, outs


def test_small_tensors_go_dense_and_exact():
    sim, outs = run(grace_dl.topk(ratio=0.05, policies={"min_numel": 100}), 2)
    g = grads(1)
    exact = (g[0]["big.bias"] + g[1]["big.bias"]) * np.float32(0.5)
    assert np.array_equal(outs[1][0]["big.bias"], exact)
    assert np.count_nonzero(outs[1][0]["big.weight"]) <= 2 * 20
    per = sim.workers[0].stats.per_tensor
    assert per["big.bias"]["payload"] == per["big.bias"]["dense"]  # uncompressed
    assert per["big.weight"]["payload"] < per["big.weight"]["dense"] / 4


def test_warmup_steps_are_dense_then_the_method_runs():
    sim, outs = run(grace_dl.topk(ratio=0.05, policies={"warmup_steps": 2}), 4)
    per_step = sim.workers[0].stats.per_step
    dense_bytes = per_step[0]["dense"]
    assert per_step[0]["payload"] == per_step[1]["payload"] == dense_bytes
    assert per_step[2]["payload"] < dense_bytes / 4 and per_step[3]["payload"] == per_step[2]["payload"]
    # warm-up steps leave the residual untouched: the first compressed step starts fresh
    assert "big.weight" in sim.workers[0].memory.state
    fresh, fresh_outs = run(grace_dl.topk(ratio=0.05), 1)
    assert np.count_nonzero(outs[2][0]["big.weight"]) == np.count_nonzero(fresh_outs[0][0]["big.weight"])


def test_overrides_first_match_wins_partial_and_whole():
    method = grace_dl.topk(ratio=0.05, policies={"overrides": {
        "*.bias": {"compressor": "fp16"}, "big.*": {"ratio": 0.5}, "emb": {"ratio": 0.1}}})
    sim, outs = run(method, 1)
    per = sim.workers[0].stats.per_tensor
    assert per["big.bias"]["payload"] == 40 * 2  # fp16 wins over "big.*"
    assert per["big.weight"]["payload"] == 200 * 8  # topk 0.5: int32 index + float32 value
    assert per["emb"]["payload"] == 30 * 8


def test_override_memories_are_separate_per_worker_and_resume_identically():
    config = {"compressor": "topk", "ratio": 0.05, "policies": {"overrides": {"emb": {"ratio": 0.2}}}}
    straight, _ = run(grace_dl.from_config(config), 4)
    first, _ = run(grace_dl.from_config(config), 2)
    states = [w.state_dict() for w in first.workers]
    assert "emb" in states[0]["overrides"]["emb"] and "emb" not in states[0]["memory"]
    assert not np.array_equal(states[0]["overrides"]["emb"]["emb"]["residual"],
                              states[1]["overrides"]["emb"]["emb"]["residual"])
    resumed = grace_dl.LocalSimulator(grace_dl.from_config(config), 2)
    for w, s in zip(resumed.workers, states):
        w.load_state_dict(s)
    for step in (2, 3):
        got = resumed.step(grads(step))
    want_state = straight.workers[0].state_dict()
    np.testing.assert_array_equal(resumed.workers[0].state_dict()["overrides"]["emb"]["emb"]["residual"],
                                  want_state["overrides"]["emb"]["emb"]["residual"])
    assert got[0]["emb"].shape == (300,)


@pytest.mark.parametrize("policies,message", [
    ({"min_size": 3}, "policies has no key 'min_size'"),
    ({"warmup_steps": -1}, "policies.warmup_steps must be an int >= 0"),
    ({"min_numel": 1.5}, "policies.min_numel must be an int >= 0"),
    ([1, 2], "policies must be a mapping"),
    ({"overrides": ["a"]}, "policies.overrides must map name patterns"),
    ({"overrides": {"a*": {"ratio": 2.0}}}, "policies.overrides['a*']: compressor 'topk': ratio must be in (0, 1]"),
    ({"overrides": {"a*": {"compressor": "nope"}}}, "policies.overrides['a*']: unknown compressor 'nope'"),
])
def test_bad_policies_name_what_is_wrong(policies, message):
    with pytest.raises(ConfigError) as err:
        grace_dl.topk(ratio=0.1, policies=policies)
    assert message in str(err.value)


def test_state_of_a_method_with_other_overrides_is_refused():
    a = grace_dl.topk(ratio=0.1, policies={"overrides": {"x": {"ratio": 0.5}}})
    b = grace_dl.topk(ratio=0.1)
    sim = grace_dl.LocalSimulator(a, 1)
    sim.step([{"x": normal(50)}])
    with pytest.raises(KeyError, match="overrides"):
        b.load_state_dict(sim.workers[0].state_dict())
