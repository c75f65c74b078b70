"""GRACE's params dicts: every combination that GRACE's ``grace_from_params`` (its torch,
TensorFlow and torch.distributed helpers) accepts builds the same method here, with
GRACE's defaults, and trains; the ones GRACE accepted but could not run meaningfully,
and the methods left out, fail with one line saying what to change.

The expectations below are written from GRACE's helpers and classes (the compressor each
name builds, which payloads GRACE could allreduce, its defaults), not read from
grace-dl's alias table, so a wrong row in that table fails here.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

import grace_dl
from grace_dl import ConfigError

# GRACE's names (torch and TF helpers; *_cuda from the torch.distributed helper)
COMPRESSORS = ["none", "fp16", "topk", "randomk", "threshold", "dgc", "qsgd", "qsgd_cuda", "natural",
               "natural_cuda", "onebit", "signsgd", "signum", "efsignsgd", "terngrad", "powersgd"]
MEMORIES = ["none", "residual", "dgc", "efsignsgd", "powersgd"]
COMMUNICATORS = ["allreduce", "allgather", "broadcast"]

# the grace-dl class each GRACE name builds
COMPRESSOR_CLASS = {"none": "NoCompression", "fp16": "FP16", "topk": "TopK", "randomk": "RandomK",
                    "threshold": "Threshold", "dgc": "DGC", "qsgd": "QSGD", "qsgd_cuda": "QSGD",
                    "natural": "Natural", "natural_cuda": "Natural", "onebit": "OneBit", "signsgd": "SignSGD",
                    "signum": "Signum", "efsignsgd": "EFSignSGD", "terngrad": "TernGrad", "powersgd": "PowerSGD"}
MEMORY_CLASS = {"none": "NoMemory", "residual": "ResidualMemory", "dgc": "DGCMomentum",
                "efsignsgd": "ResidualMemory", "powersgd": "PowerSGDMemory"}
COMMUNICATOR_CLASS = {"allreduce": "Allreduce", "allgather": "Allgather", "broadcast": "Broadcast"}
# payloads GRACE's allreduce could add elementwise (randomk: shared indices; powersgd
# allreduced its factors inside compress and sent nothing through the communicator)
SUMMABLE = {"none", "fp16", "randomk", "powersgd"}
# GRACE's helper defaults, as grace-dl attributes: (component, attribute) -> value
GRACE_DEFAULTS = {"topk": {("compressor", "ratio"): 0.3}, "randomk": {("compressor", "ratio"): 0.3},
                  "dgc": {("compressor", "ratio"): 0.3}, "threshold": {("compressor", "threshold"): 0.01},
                  "qsgd": {("compressor", "levels"): 127}, "qsgd_cuda": {("compressor", "levels"): 127},
                  "signum": {("memory", "momentum"): 0.9}, "powersgd": {("compressor", "rank"): 1}}


def expected(comp: str, mem: str, comm: str) -> tuple[str, str, str] | str:
    """(compressor, memory, communicator) class names, or a fragment of the error."""
    if comp == "signum" and mem != "none":
        return "use 'memory': 'none'"
    # GRACE's powersgd compressor needs its memory, and its dgc and powersgd memories
    # read their own compressor's state (other pairs failed in GRACE)
    if comp == "powersgd" and mem != "powersgd":
        return "use 'memory': 'powersgd'"
    if mem in ("dgc", "powersgd") and comp != mem:
        return f"memory '{mem}' works only with compressor '{mem}'"
    if comm == "allreduce" and comp not in SUMMABLE:
        return "set 'communicator': 'allgather'"
    if comp == "signum":
        return "Signum", "SignumMomentum", COMMUNICATOR_CLASS[comm]
    communicator = "PowerSGDCommunicator" if comp == "powersgd" else COMMUNICATOR_CLASS[comm]
    return COMPRESSOR_CLASS[comp], MEMORY_CLASS[mem], communicator


TABLE = list(itertools.product(COMPRESSORS, MEMORIES, COMMUNICATORS))


def _classes(g: grace_dl.Grace) -> tuple[str, str, str]:
    return type(g.compressor).__name__, type(g.memory).__name__, type(g.communicator).__name__


# -- training in the simulator: softmax regression on digits, 4 workers --------------
WORKERS, STEPS, BATCH = 4, 30, 32


def _data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target


def _loss_and_grads(w, b, x, y):
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    return float(loss), (x.T @ p).astype(np.float32), p.sum(0).astype(np.float32)


def train(method: grace_dl.Grace, lr: float) -> tuple[float, float]:
    """(loss before, loss after) STEPS steps of SGD with ``method`` on 4 workers."""
    x, y = _data()
    shards = [(x[r::WORKERS], y[r::WORKERS]) for r in range(WORKERS)]
    w, b = np.zeros((64, 10), np.float32), np.zeros(10, np.float32)
    before = _loss_and_grads(w, b, x, y)[0]
    sim = grace_dl.LocalSimulator(method, WORKERS)
    for step in range(STEPS):
        grads = []
        for r, (xs, ys) in enumerate(shards):
            idx = np.random.default_rng(step * WORKERS + r).integers(0, len(ys), BATCH)
            _, gw, gb = _loss_and_grads(w, b, xs[idx], ys[idx])
            grads.append({"w": gw, "b": gb})
        out = sim.step(grads)
        for worker in out[1:]:  # every worker gets the same aggregate
            np.testing.assert_array_equal(worker["w"], out[0]["w"])
        w -= np.float32(lr) * out[0]["w"]
        b -= np.float32(lr) * out[0]["b"]
    return before, _loss_and_grads(w, b, x, y)[0]


@pytest.mark.parametrize("comp, mem, comm", TABLE, ids=["-".join(t) for t in TABLE])
def test_every_grace_combination_builds_the_same_method(comp, mem, comm):
    params = {"compressor": comp, "memory": mem, "communicator": comm}
    want = expected(comp, mem, comm)
    if isinstance(want, str):
        with pytest.raises(ConfigError, match=want) as err:
            grace_dl.grace_from_params(params)
        assert "\n" not in str(err.value)
        return
    g = grace_dl.grace_from_params(params)
    assert _classes(g) == want
    for (part, attr), value in GRACE_DEFAULTS.get(comp, {}).items():
        assert getattr(getattr(g, part), attr) == value, (part, attr)


# Each distinct method the table builds trains a few steps. Sign methods move every
# weight by lr per step, so they take a small lr (GRACE's majority vote of signs).
SIGN_LR = {"signsgd": 0.02, "signum": 0.02}
# Left out: rows that build the same grace-dl method as another row (memory efsignsgd is
# residual, *_cuda the same method), and unscaled signs with error feedback (signsgd with
# residual memory), which GRACE allowed but which does not train: the residual of a +-1
# code is about -sign(p), so the next step's sign flips.
BUILT = sorted({(c, m, k) for c, m, k in TABLE if not isinstance(expected(c, m, k), str)
                and not (m == "efsignsgd" or c.endswith("_cuda") or (c, m) == ("signsgd", "residual"))})


@pytest.mark.parametrize("comp, mem, comm", BUILT, ids=["-".join(t) for t in BUILT])
def test_every_built_combination_trains(comp, mem, comm):
    g = grace_dl.grace_from_params({"compressor": comp, "memory": mem, "communicator": comm})
    lr = SIGN_LR.get(comp, 0.5)
    if comp == "randomk" and mem == "none":
        # unscaled random-k without error feedback moves only GRACE's default 30% of the
        # coordinates per step: a step of lr / 0.3 gives it the others' progress per step
        lr /= 0.3
    before, after = train(g, lr)
    assert after < 0.75 * before, (before, after)


# explicit GRACE parameters -> grace-dl attributes
EXPLICIT = [
    ({"compressor": "topk", "communicator": "allgather", "compress_ratio": 0.05}, {("compressor", "ratio"): 0.05}),
    ({"compressor": "randomk", "compress_ratio": 0.1}, {("compressor", "ratio"): 0.1}),
    ({"compressor": "dgc", "memory": "dgc", "communicator": "allgather", "compress_ratio": 0.01, "momentum": 0.8,
      "gradient_clipping": False, "world_size": 2},
     {("compressor", "ratio"): 0.01, ("compressor", "momentum"): 0.8, ("memory", "momentum"): 0.8,
      ("memory", "clip_norm"): None}),
    ({"compressor": "qsgd", "communicator": "allgather", "quantum_num": 15, "bucket_size": 128},
     {("compressor", "levels"): 15, ("compressor", "bucket_size"): 128}),
    ({"compressor": "qsgd_cuda", "communicator": "allgather", "quantum_num": 31}, {("compressor", "levels"): 31}),
    ({"compressor": "powersgd", "memory": "powersgd", "compress_rank": 2, "momentum_factor": 0.9},
     {("compressor", "rank"): 2, ("memory", "error_feedback"): True}),
    ({"compressor": "signum", "communicator": "allgather", "momentum": 0.5}, {("memory", "momentum"): 0.5}),
    ({"compressor": "threshold", "memory": "residual", "communicator": "allgather", "threshold": 0.002},
     {("compressor", "threshold"): 0.002}),
    ({"compressor": "efsignsgd", "memory": "efsignsgd", "communicator": "allgather", "lr": 0.05},
     {("memory", "beta"): 1.0, ("memory", "gamma"): 1.0}),
    ({"compressor": "topk", "memory": "residual", "communicator": "allgather", "kernel": "rdxtopk_cuda"},
     {("compressor", "ratio"): 0.3}),
    # a GRACE key its helper reads only for other methods is ignored, as GRACE's helper did
    ({"compressor": "topk", "communicator": "allgather", "quantum_num": 3, "momentum": 0.5},
     {("compressor", "ratio"): 0.3}),
    # grace-dl's own names and parameters work in a GRACE dict
    ({"compressor": "powersgd", "memory": "powersgd", "warm_start": False}, {("compressor", "warm_start"): False}),
]


@pytest.mark.parametrize("params, attrs", EXPLICIT, ids=[str(i) for i in range(len(EXPLICIT))])
def test_grace_parameters_map_to_ours(params, attrs):
    g = grace_dl.grace_from_params(params)
    for (part, attr), value in attrs.items():
        assert getattr(getattr(g, part), attr) == value, (part, attr)


def test_keys_without_effect_are_noted_once(caplog):
    from grace_dl import registry

    registry._noted.discard("kernel")
    with caplog.at_level(logging.WARNING, logger="grace_dl"):
        for _ in range(3):
            grace_dl.grace_from_params({"compressor": "topk", "communicator": "allgather", "kernel": "cupy"})
    notes = [r.getMessage() for r in caplog.records if "'kernel'" in r.getMessage()]
    assert len(notes) == 1 and "no effect" in notes[0]


@pytest.mark.parametrize("params, message", [
    ({"compressor": "u8bit"}, r"docs/left-out.md.*'qsgd'"),
    ({"compressor": "adaq", "compress_ratio": 0.3}, r"docs/left-out.md.*'adaptive_threshold'"),
    ({"compressor": "inceptionn", "error_bound": 2e-10}, r"docs/left-out.md.*'fp16'"),
    ({"compressor": "sketch", "quantiles": 64}, r"SketchML.*docs/left-out.md.*'qsgd'"),
    ({"compressor": "qsgd", "communicator": "alltoall", "world_size": 2}, "'communicator': 'allgather'"),
    ({"compressor": "dgc", "memory": "dgc", "communicator": "allgather", "gradient_clipping": True}, "clip_norm"),
    ({"compressor": "topk", "communicator": "allgather", "compress_ration": 0.3}, "no parameter 'compress_ration'"),
    ({"compressor": "topkk"}, "unknown compressor 'topkk'"),
    ({"compressor": "topk", "memory": "dgc_memory", "communicator": "allgather"}, "unknown memory 'dgc_memory'"),
])
def test_refusals_are_one_line(params, message):
    with pytest.raises(ConfigError, match=message) as err:
        grace_dl.grace_from_params(params)
    assert "\n" not in str(err.value)


def test_from_config_and_yaml_take_grace_names(tmp_path):
    g = grace_dl.from_config({"compressor": "natural_cuda"})
    assert _classes(g) == ("Natural", "NoMemory", "Allgather")  # grace-dl's defaults for the method
    g = grace_dl.from_config({"compressor": "dgc", "memory": "dgc", "compress_ratio": 0.01})
    assert _classes(g) == ("DGC", "DGCMomentum", "Allgather") and g.compressor.ratio == 0.01
    g = grace_dl.from_config({"compressor": "topk"})
    assert g.compressor.ratio == 0.01  # the native default stays grace-dl's
    # a registered name keeps its grace-dl meaning: 'sketch' is the count sketch here
    assert type(grace_dl.from_config({"compressor": "sketch"}).compressor).__name__ == "Sketch"
    with pytest.raises(ConfigError, match="docs/left-out.md"):
        grace_dl.from_config({"compressor": "u8bit"})
    path = tmp_path / "m.yaml"
    path.write_text("compressor: qsgd_cuda\nquantum_num: 15\nmemory: efsignsgd\n")
    g = grace_dl.from_config(path)
    assert _classes(g) == ("QSGD", "ResidualMemory", "Allgather") and g.compressor.levels == 15


def test_experiment_config_takes_grace_names():
    from grace_dl.experiments.config import validate_compression

    raw = validate_compression({"method": "topk", "compress_ratio": 0.05, "memory": "residual"})
    assert raw["compressor"] == "topk" and raw["ratio"] == 0.05
    with pytest.raises(ConfigError, match="docs/left-out.md"):
        validate_compression({"method": "adaq"})


def test_unbiased_grace_methods_average_to_the_mean():
    # qsgd and natural as GRACE builds them (unbiased): the aggregate of many draws is the mean
    rng = np.random.default_rng(0)
    grads = [{"g": rng.standard_normal(256).astype(np.float32)} for _ in range(4)]
    mean = np.mean([g["g"] for g in grads], axis=0)
    for comp in ("qsgd", "natural_cuda"):
        sim = grace_dl.LocalSimulator(
            grace_dl.grace_from_params({"compressor": comp, "communicator": "allgather"}), 4)
        total = np.zeros(256)
        for _ in range(200):
            total += sim.step(grads)[0]["g"]
        err = np.abs(total / 200 - mean).max()
        assert err < 0.15 * np.abs(mean).max(), (comp, err)


def test_tf_grace_keyword_hands_the_method_to_horovod():
    pytest.importorskip("tensorflow")
    import grace_dl.tensorflow as grace_tf
    from grace_dl.tensorflow.helper import grace_from_params
    from grace_dl.tensorflow.hvd import method_or_compression

    grc = grace_dl.grace_from_params({"compressor": "topk", "communicator": "allgather"})
    assert isinstance(method_or_compression(grc, None), grace_tf.HorovodTFGrace)
    helper_grc = grace_from_params({"compressor": "topk", "communicator": "allgather"})
    assert isinstance(helper_grc, grace_tf.HorovodTFGrace) and helper_grc.compressor.ratio == 0.3
    with pytest.raises(ValueError, match="not both"):
        method_or_compression(grc, grc)
    with pytest.raises(TypeError, match="grace-dl method"):
        method_or_compression({"compressor": "topk"}, None)
