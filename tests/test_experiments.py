"""The YAML experiment layer: config errors (one line, non-zero exit, naming the key),
tasks, schedules, a simulator run's metrics, sweeps and comparisons, the API docs'
freshness, and real horovodrun launches (multirank)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import grace_dl
from grace_dl import ConfigError
from grace_dl.experiments import config as cfg
from grace_dl.experiments import launch, metrics, tasks, train

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

STEP_FIELDS = {"step", "epoch", "time_s", "lr", "loss", "sent_bytes", "received_bytes", "payload_bytes",
               "dense_bytes", "cum_sent_bytes", "cum_received_bytes", "compression_ratio", "compress_s",
               "decompress_s", "exchange_s", "step_s"}
EVAL_FIELDS = {"eval_loss", "accuracy"}
SUMMARY_FIELDS = {"name", "framework", "task", "method", "compression", "workers", "launcher", "steps", "loss",
                  "accuracy", "train_loss", "sent_bytes_per_worker", "received_bytes_per_worker",
                  "payload_bytes_per_worker", "dense_bytes_per_worker", "compression_ratio", "time_per_step_s",
                  "train_time_s", "compress_s", "decompress_s", "exchange_s", "per_worker"}


def cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "grace_dl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or ROOT)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


TINY = """
name: tiny
framework: torch
task: digits
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
compression: {compressor: topk, ratio: 0.05}
workers: 2
launcher: simulator
steps: 24
eval_every: 8
"""


# -- configuration errors ------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("compression: {compressor: nosuchmethod}", "compression.compressor: unknown method 'nosuchmethod'; registered: "),
    ("compression: nosuchmethod", "compression.compressor: unknown method 'nosuchmethod'"),
    ("compression: {method: topk, ration: 0.1}", "compression.ration: 'topk' has no parameter 'ration'; valid: "),
    ("compression: {compressor: topk, ratio: abc}", "compression.ratio: must be float, got 'abc'"),
    ("compression: {compressor: topk, ratio: 2.0}", "compression.ratio: must be in (0, 1], got 2.0"),
    ("compression: {compressor: topk, memory: nope}", "compression.memory: unknown memory 'nope'; valid: "),
    ("optimizer: {lr: abc}", "optimizer.lr: must be float > 0, got 'abc'"),
    ("optimizer: {lr: -1}", "optimizer.lr: must be float > 0, got -1"),
    ("optimizer: {name: adam, momentum: 0.9}", "optimizer.momentum: unknown key; valid: name, lr, weight_decay"),
    ("optimizer: rmsprop", "optimizer.name: must be one of sgd, adam, got 'rmsprop'"),
    ("schedule: {name: cosine, gamma: 0.5}", "schedule.gamma: unknown key; valid: name, warmup_steps, min_lr"),
    ("lr: 0.1", "lr: unknown key; valid: name, framework, task"),
    ("workers: two", "workers: must be int >= 1 and <= 64, got 'two'"),
    ("workers: 2.5", "workers: must be int >= 1 and <= 64, got 2.5"),
    ("workers: true", "workers: must be int"),
    ("launcher: slurm", "launcher: must be one of horovodrun-gloo, horovodrun-mpi, simulator, got 'slurm'"),
    ("framework: jax", "framework: must be one of torch, tensorflow, got 'jax'"),
    ("task: {name: digits, seq_len: 5}", "task.seq_len: unknown key; valid: name, test_fraction"),
    ("task: {name: charlm, modules: [no_such_module_x]}", None),  # checked when the task loads
    ("task: mnist", "task.name: must be one of digits, charlm, synthetic, got 'mnist'"),
    ("model: {arch: resnet}", "model.arch: must be one of mlp, cnn, got 'resnet'"),
    ("task: synthetic\nmodel: {hidden: 3}", "model.hidden: unknown key; valid: arch"),
    ("steps: 10\nepochs: 2", "steps: give steps or epochs, not both"),
    ("steps: 0", "steps: must be int >= 1, got 0"),
    ("batch_size: [32]", "batch_size: must be int >= 1, got [32]"),
    ("sweep: {methods: []}", "sweep.methods: must be a non-empty list"),
    ("sweep: {methods: [{compressor: topk}, {compressor: nosuch}]}",
     "sweep.methods[1].compressor: unknown method 'nosuch'"),
    ("sweep: {methods: [topk]}\ncompression: none", "compression: a sweep takes its methods from sweep.methods"),
    ("sweep: {methods: [topk], grid: 1}", "sweep.grid: unknown key; valid: methods"),
    ("- a\n- b", "an experiment must be a mapping of keys, got list"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    if message is None:
        config = cfg.load(path)
        with pytest.raises(ConfigError, match="task.modules: no source of standard-library module 'no_such_module_x'"):
            tasks.load_task(config.task)
        return
    with pytest.raises(ConfigError) as err:
        cfg.load(path)
    text = str(err.value)
    assert "\n" not in text
    assert message in text, text


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: no such config file"):
        cfg.load(tmp_path / "nope.yaml")
    bad = write(tmp_path / "bad.yaml", "name: x\noptimizer: {lr: 0.1\nworkers: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML \(line \d+, column \d+\): "):
        cfg.load(bad)


@pytest.mark.parametrize("text, key", [
    ("compression: {compressor: nosuchmethod}", "compression.compressor: unknown method 'nosuchmethod'"),
    ("compression: topk\nbatchsize: 3", "batchsize: unknown key"),
    ("optimizer: {name: sgd, lr: abc}", "optimizer.lr: must be float > 0, got 'abc'"),
    (None, "no such config file"),
    ("task: {name: digits\nsteps: 3", "malformed YAML"),
])
def test_cli_bad_config_one_line_and_nonzero_exit(tmp_path, text, key):
    path = tmp_path / "missing.yaml" if text is None else write(tmp_path / "bad.yaml", text)
    result = cli("run", str(path), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grace-dl: error: "), result.stderr
    assert key in lines[0], lines[0]
    assert result.stdout == ""
    assert not (tmp_path / "results").exists()  # nothing started


def test_policies_pass_through_and_errors_name_their_path():
    pol = {"min_numel": 100, "warmup_steps": 5, "overrides": {"0.*": {"ratio": 0.5}}}
    config = cfg.validate({"compression": {"compressor": "topk", "policies": pol}})
    assert config.compression["policies"] == pol
    grace = cfg.build_compression(config.compression)
    assert grace.policies.min_numel == 100 and grace.policies.warmup_steps == 5
    for bad, message in [
        (3, "compression.policies: must be a mapping, got 3"),
        ({"min_numel": -1}, "compression.policies.min_numel: must be an int >= 0, got -1"),
        ({"bogus": 1}, "compression.policies: has no key 'bogus'; valid: "),
        ({"overrides": {"0.*": {"ratoi": 0.5}}}, "compression.policies.overrides['0.*']: 'topk' has no parameter"),
    ]:
        with pytest.raises(ConfigError) as err:
            cfg.validate({"compression": {"compressor": "topk", "policies": bad}})
        assert str(err.value).startswith(message), str(err.value)


def test_defaults_shorthands_overrides_and_round_trip(tmp_path):
    c = cfg.validate({}, default_name="x")
    assert (c.framework, c.task["name"], c.model["arch"], c.optimizer["name"], c.schedule["name"]) == \
        ("torch", "digits", "mlp", "sgd", "constant")
    assert (c.compression, c.workers, c.launcher, c.epochs, c.steps) == \
        ({"compressor": "none", "seed": 0}, 2, "horovodrun-gloo", 1, None)
    assert c.output_dir == os.path.join("results", "x")
    path = write(tmp_path / "my exp.yaml", "task: charlm\noptimizer: adam\ncompression: {method: qsgd, levels: 3}\n")
    c = cfg.load(path, {"optimizer.lr": 0.05, "task.seq_len": 16, "steps": 3, "seed": 4})
    assert c.name == "my_exp" and c.task["seq_len"] == 16 and c.optimizer == {"name": "adam", "lr": 0.05,
                                                                             "weight_decay": 0.0}
    assert c.model["arch"] == "gru" and c.compression == {"compressor": "qsgd", "levels": 3, "seed": 4}
    assert c.optimizer["lr"] == 0.05 and isinstance(c.optimizer["lr"], float)
    assert (c.steps, c.epochs) == (3, None)
    assert cfg.load(write(tmp_path / "e.yaml", "epochs: 2\n"), {"steps": 5}).steps == 5
    assert cfg.load(write(tmp_path / "s.yaml", "steps: 2\n"), {"epochs": 5}).epochs == 5
    cfg.dump(c, tmp_path / "again.yaml")
    assert cfg.load(tmp_path / "again.yaml") == c
    assert cfg.validate({"optimizer": {"lr": "1e-3"}}).optimizer["lr"] == 1e-3  # YAML reads 1e-3 as a string


def test_every_shipped_config_validates():
    registered = set(grace_dl.list_methods())
    names = set()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        try:
            c = cfg.load(path)
        except ConfigError as err:
            # methods being added by other changes (powersgd) may not be registered yet
            assert "unknown method" in str(err) and not any(f"'{m}'" in str(err) for m in registered), err
            continue
        names.add(c.name)
    assert {"quickstart", "tensorflow", "charlm", "synthetic", "sign", "quantization"} <= names
    quick = cfg.load(ROOT / "configs" / "quickstart.yaml")
    assert (quick.framework, quick.task["name"], quick.workers, quick.launcher) == \
        ("torch", "digits", 2, "horovodrun-gloo")
    sweep_text = (ROOT / "configs" / "sweep-digits.yaml").read_text()
    for method in ("none", "fp16", "topk", "dgc", "powersgd", "qsgd", "efsignsgd"):
        assert f"compressor: {method}" in sweep_text


def test_sweep_labels_and_run_configs():
    c = cfg.validate({"name": "s", "output_dir": "out", "optimizer": {"lr": 0.2, "momentum": 0.9}, "sweep": {
        "methods": ["topk", {"compressor": "topk", "ratio": 0.1}, {"compressor": "none", "name": "dense",
                                                                    "optimizer": {"momentum": 0.0}}]}})
    runs = c.run_configs()
    assert [r.optimizer for r in runs] == [{"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 0.0}] * 2 \
        + [{"name": "sgd", "lr": 0.2, "momentum": 0.0, "weight_decay": 0.0}]
    assert cfg.validate(c.to_dict()) == c
    with pytest.raises(ConfigError, match=r"^sweep.methods\[0\].optimizer.momentum: must be float >= 0 and < 1"):
        cfg.validate({"sweep": {"methods": [{"compressor": "none", "optimizer": {"momentum": 2}}]}})
    assert [r.name for r in runs] == ["topk", "topk-2", "dense"]
    assert [r.output_dir for r in runs] == [os.path.join("out", n) for n in ("topk", "topk-2", "dense")]
    assert runs[1].compression == {"compressor": "topk", "ratio": 0.1, "seed": 0}
    assert all(r.sweep is None for r in runs)


# -- tasks and schedules -------------------------------------------------------------------

def test_tasks_are_fixed_and_sharded():
    digits = tasks.load_task(cfg.validate({}).task)
    assert digits.x_train.shape == (1438, 64) and digits.x_test.shape == (359, 64)
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    again = tasks.load_task(cfg.validate({"seed": 9}).task, seed=9)
    assert np.array_equal(digits.x_test, again.x_test)  # the split does not depend on the seed

    lm = tasks.load_task(cfg.validate({"task": {"name": "charlm", "max_chars": 5000, "seq_len": 20}}).task)
    assert lm.x_train.shape[1] == 20 and np.array_equal(lm.x_train[:, 1:], lm.y_train[:, :-1])
    text = tasks.stdlib_text(cfg.CHARLM_MODULES)
    assert text.startswith('"""Text wrapping and filling.') and len(text) > 60_000
    assert lm.x_train.max() < lm.num_classes == 96

    n = 103
    shards = [tasks.shard(n, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    per = tasks.steps_per_epoch(n, 3, 8)
    batches = list(tasks.batch_indices(n, 1, 3, 8, seed=0, total_steps=2 * per + 1))
    assert [e for e, _ in batches] == [0] * per + [1] * per + [2]
    assert all(set(b.tolist()) <= set(shards[1].tolist()) and len(b) == 8 for _, b in batches)
    assert len(set(np.concatenate([b for _, b in batches[:per]]).tolist())) == 8 * per  # no repeats in an epoch
    again = list(tasks.batch_indices(n, 1, 3, 8, seed=0, total_steps=3))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(again, batches))
    with pytest.raises(ConfigError, match="batch_size: 64 is larger than a worker's shard"):
        tasks.steps_per_epoch(100, 2, 64)


@pytest.mark.parametrize("kind", ["least_squares", "logistic"])
def test_synthetic_optimum_is_the_minimiser(kind):
    data = tasks.load_task(cfg.validate({"task": {"name": "synthetic", "kind": kind, "samples": 500,
                                                  "dim": 8}}).task)
    w = data.optimum
    f0 = data.objective(w)
    rng = np.random.default_rng(0)
    for _ in range(20):  # every nearby point is worse
        assert data.objective(w + 1e-3 * rng.standard_normal(w.shape)) > f0


def test_learning_rate_schedules():
    opt = {"lr": 1.0}
    assert [train.learning_rate(s, 10, opt, {"name": "constant", "warmup_steps": 4}) for s in range(5)] == \
        [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = {"name": "cosine", "warmup_steps": 0, "min_lr": 0.1}
    assert train.learning_rate(0, 100, opt, cosine) == 1.0
    assert math.isclose(train.learning_rate(50, 100, opt, cosine), 0.55)
    assert math.isclose(train.learning_rate(100, 100, opt, cosine), 0.1)
    step = {"name": "step", "warmup_steps": 0, "step_size": 10, "gamma": 0.5}
    assert [train.learning_rate(s, 100, opt, step) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]


# -- runs ----------------------------------------------------------------------------------

def check_run(out: Path, method: str, workers: int = 2, timed: bool = True) -> tuple[list[dict], dict]:
    """``timed=False``: a TF run under Horovod, whose pipeline runs in the graph (its
    compress/decompress/exchange times read 0: only the step is timed)."""
    records = metrics.read_jsonl(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    for r in records:
        assert STEP_FIELDS <= set(r), STEP_FIELDS - set(r)
        assert r["sent_bytes"] > 0 and r["received_bytes"] > 0 and r["dense_bytes"] > 0
        assert r["step_s"] > 0 and r["decompress_s"] >= 0 and r["exchange_s"] >= 0
        assert r["compress_s"] > 0 if timed else r["compress_s"] == r["decompress_s"] == r["exchange_s"] == 0
        assert r["compress_s"] + r["decompress_s"] <= r["step_s"] * workers
    evaluated = [r for r in records if "eval_loss" in r]
    assert evaluated and evaluated[-1]["step"] == len(records)
    assert all(EVAL_FIELDS <= set(r) and 0.0 <= r["accuracy"] <= 1.0 for r in evaluated)
    assert SUMMARY_FIELDS <= set(summary), SUMMARY_FIELDS - set(summary)
    assert summary["method"] == method and summary["workers"] == workers
    assert summary["sent_bytes_per_worker"] == records[-1]["cum_sent_bytes"] == sum(r["sent_bytes"] for r in records)
    assert summary["per_worker"][0]["sent"] == summary["sent_bytes_per_worker"]
    assert len(summary["per_worker"]) == workers
    assert summary["loss"] == evaluated[-1]["eval_loss"] and summary["accuracy"] == evaluated[-1]["accuracy"]
    return records, summary


def test_simulator_run_metrics(tmp_path):
    path = write(tmp_path / "tiny.yaml", TINY)
    config = cfg.load(path, {"output_dir": str(tmp_path / "out")})
    (summary,) = launch.run_experiment(config, progress=False)
    records, on_disk = check_run(tmp_path / "out", "topk")
    assert summary == on_disk
    assert len(records) == 24 and [r["step"] for r in records if "eval_loss" in r] == [8, 16, 24]
    # top-k 5% of float32: 8 bytes per kept element of 4 dense bytes per element -> ratio ~ 10
    assert all(9.0 < r["compression_ratio"] < 10.5 for r in records)
    assert 9.0 < summary["compression_ratio"] < 10.5
    # fixed-size allgather between 2 workers: each sends and receives its payload once
    assert all(r["sent_bytes"] == r["received_bytes"] == r["payload_bytes"] for r in records)
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.3
    assert summary["accuracy"] > 0.5 and summary["replicas_identical"]
    assert (tmp_path / "out" / "config.yaml").exists()


def test_simulator_synthetic_reaches_the_optimum(tmp_path):
    config = cfg.validate({"name": "syn", "task": {"name": "synthetic", "samples": 512, "dim": 8},
                           "optimizer": {"lr": 0.3}, "compression": "efsignsgd", "workers": 4,
                           "launcher": "simulator", "steps": 150, "batch_size": 16, "eval_every": 50,
                           "output_dir": str(tmp_path / "syn")})
    (summary,) = launch.run_experiment(config, progress=False)
    records = metrics.read_jsonl(tmp_path / "syn" / "metrics.jsonl")
    distances = [r["opt_distance"] for r in records if "opt_distance" in r]
    assert len(distances) == 3 and distances[-1] < 0.1 * float(np.linalg.norm(
        tasks.load_task(config.task).optimum))
    # 8 float32 elements (32 bytes) -> one 32-bit word of signs and a float32 scale
    assert summary["suboptimality"] >= 0 and summary["compression_ratio"] == 4.0


def test_multi_round_compressors_are_timed_while_computing_only():
    from grace_dl.core import Collective, Compressor
    from grace_dl.payload import Payload

    class TwoRounds(Compressor):
        summable = True
        communicator = "allreduce"

        def compress(self, ops, x, ctx):
            return Payload.of(ops, x)

        def compress_rounds(self, ops, x, ctx):
            (total,) = yield [Collective("allreduce", x, "norm")]
            return Payload.of(ops, x + 0.0 * total)

        def decompress(self, ops, buffer, ctx):
            return buffer

    from grace_dl.communicators import Allreduce

    grace = grace_dl.Grace(TwoRounds(), communicator=Allreduce())
    sim = grace_dl.LocalSimulator(grace, 2)
    timers = metrics.Timers()
    for w in sim.workers:
        metrics.instrument(w, timers)
    x = np.arange(4, dtype=np.float32)
    out = sim.step([{"w": x}, {"w": 2 * x}])
    assert np.allclose(out[0]["w"], 1.5 * x)
    assert timers.seconds["compress_s"] > 0 and timers.seconds["exchange_s"] > 0
    assert timers.seconds["decompress_s"] > 0


def test_tensorflow_simulator_run(tmp_path):
    """The char LM on TF: the embedding's IndexedSlices gradient is compressed like the rest."""
    pytest.importorskip("tensorflow")
    config = cfg.validate({"name": "tf", "framework": "tensorflow",
                           "task": {"name": "charlm", "max_chars": 4000, "seq_len": 16},
                           "model": {"embed": 8, "hidden": 16}, "optimizer": {"name": "adam", "lr": 0.01},
                           "compression": {"compressor": "topk", "ratio": 0.05},
                           "launcher": "simulator", "steps": 12, "batch_size": 8, "eval_every": 6,
                           "output_dir": str(tmp_path / "tf")})
    launch.run_experiment(config, progress=False)
    records, summary = check_run(tmp_path / "tf", "topk")
    assert summary["framework"] == "tensorflow" and 9.0 < summary["compression_ratio"] < 10.5
    assert "sequential/embedding/embeddings:0" in summary["tensors"] and len(summary["tensors"]) == 6
    assert records[-1]["loss"] < records[0]["loss"]


def test_sweep_then_compare_via_cli(tmp_path):
    write(tmp_path / "sweep.yaml", TINY.replace("steps: 24", "steps: 10").replace("eval_every: 8", "eval_every: 5")
          .replace("compression: {compressor: topk, ratio: 0.05}\n", "")
          + "output_dir: sw\nsweep:\n  methods:\n    - none\n    - {compressor: topk, ratio: 0.05, name: sparse}\n")
    result = cli("run", "sweep.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for label, method in (("none", "none"), ("sparse", "topk")):
        check_run(tmp_path / "sw" / label, method)
    assert "| run | method | steps | loss | accuracy | MB sent/worker | ratio | ms/step | train s |" in result.stdout
    assert "| none | `none` | 10 |" in result.stdout and "| sparse | `topk(ratio=0.05)` | 10 |" in result.stdout
    for name in ("comparison.md", "loss.png", "accuracy.png"):
        assert (tmp_path / "sw" / name).stat().st_size > 1000 or name == "comparison.md"
    assert (tmp_path / "sw" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = cli("compare", "sw/none", "sw/sparse", "--output", "cmp", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[1].startswith("| none |") and rows[2].startswith("| sparse |")
    none_mb = float(rows[1].split("|")[6])
    topk_mb = float(rows[2].split("|")[6])
    assert topk_mb < none_mb / 3  # top-k 5% sends far less than dense allreduce
    assert sorted(os.listdir(tmp_path / "cmp")) == ["accuracy.png", "comparison.md", "loss.png"]

    result = cli("compare", "nothing-here", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "no finished runs" in result.stderr


def test_launcher_commands(monkeypatch):
    c = cfg.validate({"launcher": "horovodrun-mpi", "workers": 3})
    cmd = launch.horovodrun_command(c, "/x/config.yaml")
    assert cmd[0] == str(BIN / "horovodrun") if (BIN / "horovodrun").exists() else True
    assert cmd[1:4] == ["-np", "3", "--mpi"] and cmd[-4:] == [sys.executable, "-m", "grace_dl.experiments.worker",
                                                             "/x/config.yaml"]
    assert "--oversubscribe" in cmd[4] and (("--allow-run-as-root" in cmd[4]) == (os.geteuid() == 0))
    c = cfg.validate({"launcher": "horovodrun-gloo"})
    assert launch.horovodrun_command(c, "f")[3] == "--gloo"
    env = launch.worker_env(progress=False)
    assert env["PATH"].split(os.pathsep)[0] == str(BIN) and env[train.PROGRESS_ENV] == "0"
    # torch runs: TensorFlow, imported by horovodrun's build check only, stays quiet
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert launch.worker_env(False, "torch")["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert "TF_ENABLE_ONEDNN_OPTS" not in launch.worker_env(False, "tensorflow")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")  # the user's choice is kept
    assert launch.worker_env(False, "torch")["TF_ENABLE_ONEDNN_OPTS"] == "1"
    for var in launch.LAUNCHED_ENV:
        monkeypatch.delenv(var, raising=False)
    assert not launch.inside_launch()
    monkeypatch.setenv("HOROVOD_RANK", "1")
    assert launch.inside_launch()


def test_api_doc_is_fresh():
    from grace_dl.apidoc import api_markdown

    on_disk = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert on_disk == api_markdown(), "docs/api.md is stale: python -m grace_dl.apidoc > docs/api.md"


def test_new_method_walkthrough_runs(tmp_path):
    """The complete example of docs/new-method.md registers, runs on NumPy and torch
    (bit-identical) and prints what the page says."""
    pytest.importorskip("torch")
    doc = (ROOT / "docs" / "new-method.md").read_text(encoding="utf-8")
    blocks = doc.split("```python\n")[1:]
    code = next(b.split("```")[0] for b in blocks if b.startswith('"""maxabs8:'))
    script = write(tmp_path / "maxabs8_example.py", code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = doc.split("Run as a script it prints:\n\n```\n")[1].split("```")[0]
    assert result.stdout == shown


def test_cli_list_and_bench_still_work():
    result = cli("list", timeout=60)
    assert result.returncode == 0 and "topk(ratio=0.01)" in result.stdout
    result = cli("bench", "--method", "topk", "--size", "1000", "--repeats", "1", timeout=120)
    assert result.returncode == 0 and "topk" in result.stdout


# -- real launches -------------------------------------------------------------------------

def _horovodrun_or_skip() -> None:
    if shutil.which("horovodrun", path=str(BIN)) is None:
        pytest.skip("horovod is not installed (run scripts/setup.sh)")


@pytest.mark.multirank
def test_grace_dl_run_horovodrun_gloo_matches_the_simulator(tmp_path):
    """A real 2-worker horovodrun (Gloo) through stock hvd.DistributedOptimizer: same bytes
    as the simulator, same losses up to float32 rounding of the loss average."""
    _horovodrun_or_skip()
    write(tmp_path / "tiny.yaml", TINY.replace("steps: 24", "steps: 12").replace("eval_every: 8", "eval_every: 6"))
    result = cli("run", "tiny.yaml", "--set", "launcher=horovodrun-gloo", "--output", "hvd", cwd=tmp_path, timeout=420)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "horovodrun -np 2 --gloo" in result.stderr
    assert "loss" in result.stdout and "accuracy" in result.stdout and "compression ratio 10.0x" in result.stdout
    assert f"results in {tmp_path / 'hvd'}/" in result.stdout
    hvd_records, hvd_summary = check_run(tmp_path / "hvd", "topk")
    assert hvd_summary["launcher"] == "horovodrun-gloo" and hvd_summary["replicas_identical"]
    assert hvd_summary["per_worker"][0] == hvd_summary["per_worker"][1]  # fixed-size top-k: same bytes

    result = cli("run", "tiny.yaml", "--set", "steps=12", "--set", "eval_every=6", "--output", "sim", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sim_records = metrics.read_jsonl(tmp_path / "sim" / "metrics.jsonl")
    for a, b in zip(hvd_records, sim_records):
        assert a["sent_bytes"] == b["sent_bytes"] and a["payload_bytes"] == b["payload_bytes"]
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["step"], a["loss"], b["loss"])
    sim_summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert math.isclose(hvd_summary["accuracy"], sim_summary["accuracy"])


@pytest.mark.multirank
def test_grace_dl_run_tensorflow_horovodrun_gloo(tmp_path):
    """TF under horovodrun: stock hvd.DistributedGradientTape with a grace-dl method."""
    _horovodrun_or_skip()
    pytest.importorskip("tensorflow")
    write(tmp_path / "tf.yaml", TINY.replace("framework: torch", "framework: tensorflow")
          .replace("steps: 24", "steps: 6").replace("eval_every: 8", "eval_every: 3")
          .replace("launcher: simulator", "launcher: horovodrun-gloo"))
    result = cli("run", "tf.yaml", "--output", "tf", cwd=tmp_path, timeout=420)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    _, summary = check_run(tmp_path / "tf", "topk", timed=False)  # topk runs on the graph path
    assert summary["framework"] == "tensorflow" and summary["replicas_identical"]


def test_progress_bar_off_a_terminal_redraws_about_ten_times():
    # under horovodrun each redraw reaches the console as a prefixed line of its own
    import io
    import itertools
    import time

    clock = itertools.count(int(time.time()) + 1)  # one second between updates: a slow run
    stream = io.StringIO()
    bar = train.progress_bar(200, "run", stream)
    bar._time = lambda: float(next(clock))
    for _ in range(200):
        bar.update(1)
    bar.close()
    redraws = stream.getvalue().count("\r")
    assert 2 <= redraws <= 13, redraws
