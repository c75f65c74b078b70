"""The Python snippets of README.md and docs/*.md run as written, each in the mode stated
next to it, and do what the text says.

Every ```python block of those files (the generated docs/api.md and docs/methods.md
excepted) is preceded by a marker, ``<!-- snippet: NAME; mode: MODE -->``, or by
``<!-- snippet: NAME; skip: REASON -->``; a block without one fails
:func:`test_every_snippet_has_a_marker`, so a new snippet cannot go untested by accident.
Modes: ``keras3`` (TensorFlow's default Keras), ``tf-keras`` (``TF_USE_LEGACY_KERAS=1``),
``torch`` and ``numpy``. The snippets of one mode run in one subprocess (TensorFlow's
import is slow, and the Keras mode is chosen once per process), each in a fresh namespace
after a prelude that defines what the text says is given (a small model, its optimizer,
data), followed by a check of what it did. Horovod runs with one rank (``hvd.init()``
without ``horovodrun``): there Horovod skips the exchange at run time, but the grace-dl
method is still traced into the step for every gradient, which the checks assert; the
multi-rank tier (tests/test_multirank.py) runs the same calls on two ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in ("api.md", "methods.md"))
MARKER = re.compile(r"<!-- snippet: (?P<name>[\w-]+); (?P<kind>mode|skip): (?P<value>[^>]*?) -->\s*$")
MODES = ("keras3", "tf-keras", "torch", "numpy")


def snippets() -> list[dict]:
    """Every ```python block of the docs: file, line, marker (name, mode or skip) and code."""
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
                found.append({"file": path.relative_to(ROOT).as_posix(), "line": i + 1,
                              "name": marker["name"] if marker else None,
                              "mode": marker["value"] if marker and marker["kind"] == "mode" else None,
                              "skip": marker["value"] if marker and marker["kind"] == "skip" else None,
                              "code": "\n".join(lines[i + 1:end]) + "\n"})
                i = end
            i += 1
    return found


# -- what the text around each snippet says is given, and what the snippet must have done --------
_TF_GIVEN = """
import numpy as np
import tensorflow as tf
tf.get_logger().setLevel("ERROR")
tf.keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 8)).astype(np.float32)
y = (x @ rng.standard_normal((8, 1))).astype(np.float32)
model = tf.keras.Sequential([tf.keras.layers.Input((8,)), tf.keras.layers.Dense(16, activation="relu"),
                             tf.keras.layers.Dense(1)])
loss_fn = tf.keras.losses.MeanSquaredError()
optimizer = tf.keras.optimizers.SGD(0.05)
batches = [(tf.constant(x[i:i + 16]), tf.constant(y[i:i + 16])) for i in range(0, 64, 16)] * 5
initial_loss = float(loss_fn(y, model(x)))
"""

_TORCH_GIVEN = """
import os
import numpy as np
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
loss_fn = torch.nn.MSELoss()
X = torch.randn(64, 8)
Y = X @ torch.randn(8, 1)
batches = data = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 64, 16)] * 5
initial_loss = float(loss_fn(model(X), Y))

def full_loss(m):
    with torch.no_grad():
        return float(loss_fn(m(X), Y))

def train(m, o, steps=20):
    for i in range(steps):
        xb, yb = batches[i % len(batches)]
        o.zero_grad()
        loss_fn(m(xb), yb).backward()
        o.step()
"""

_HVD_TORCH = """
import horovod.torch as hvd
import grace_dl.torch as grace
hvd.init()
"""

_DDP = """
import torch.distributed as dist
import grace_dl.torch as grace
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["SNIPPET_PORT"], RANK="0", WORLD_SIZE="1")
"""

_GRACE_TRACED = """
steps = method.state_dict()["steps"]
assert len(steps) == len(model.trainable_variables), ("the method was not traced for every gradient", steps)
assert method.graph_path
"""

#: name -> (prelude, check); the prelude runs before the snippet, the check after it, in one namespace
CASES: dict[str, tuple[str, str]] = {
    "readme-tf-tape": (_TF_GIVEN, """
losses = [float(train_step(tf.constant(x), tf.constant(y))) for _ in range(30)]
assert losses[-1] < 0.5 * losses[0], losses
""" + _GRACE_TRACED + """
path = ckpt.write(os.path.join(os.getcwd(), "tf-tape"))
assert any(name.startswith("grace/") for name, _ in tf.train.list_variables(path)), tf.train.list_variables(path)
ckpt.read(path).assert_consumed()
"""),
    "readme-keras-fit": (_TF_GIVEN, """
assert type(model).__module__.startswith("tf_keras"), type(model).__module__
loss = model.history.history["loss"]
assert loss[-1] < loss[0], loss
""" + _GRACE_TRACED + """
ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, grace=method.checkpointable())
path = ckpt.write(os.path.join(os.getcwd(), "keras-fit"))
assert any(name.startswith("grace/") for name, _ in tf.train.list_variables(path))
"""),
    "guide-tf-tape": (_TF_GIVEN, """
final = float(loss_fn(y, model(x)))
assert final < 0.5 * initial_loss, (initial_loss, final)
""" + _GRACE_TRACED),
    "guide-keras3-fit": (_TF_GIVEN + """
import grace_dl.tensorflow as grace
method = grace.topk(ratio=0.5)
""", """
assert not type(model).__module__.startswith("tf_keras"), type(model).__module__
loss = trainer.history.history["loss"]
assert loss[-1] < loss[0], loss
""" + _GRACE_TRACED),
    "localsgd-tf": (_TF_GIVEN + """
import horovod.tensorflow as hvd
hvd.init()
data = [(x, y)] * 10

@tf.function
def train_step(x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    return loss
""", """
assert local.method.step_count == 10, local.method.step_count
assert float(loss_fn(y, model(x))) < 0.5 * initial_loss
"""),
    "readme-torch-hvd": (_TORCH_GIVEN, """
assert type(opt).__module__.startswith("horovod"), type(opt)
assert opt._compression.grace.compressor.ratio == 0.01
train(model, opt)
assert full_loss(model) < 0.5 * initial_loss
"""),
    "readme-torch-explicit": (_TORCH_GIVEN + _HVD_TORCH, """
assert "grace_dl" in opt.state_dict()["param_groups"][0], opt.state_dict()["param_groups"][0].keys()
assert os.path.exists(f"opt.{hvd.rank()}.pt")
train(model, opt)
assert full_loss(model) < 0.5 * initial_loss
"""),
    "readme-ddp-hook": (_TORCH_GIVEN + _DDP + """
import grace_dl.torch as grace
dist.init_process_group("gloo")
""", """
train(model, opt, steps=30)    # DDP calls the hook even with one process
assert full_loss(model) < 0.5 * initial_loss
del model, opt
import gc; gc.collect()        # the reducer goes before its process group
dist.destroy_process_group()
"""),
    "guide-torch-hvd": (_TORCH_GIVEN, """
assert full_loss(model) < 0.5 * initial_loss
assert compression.grace.compressor.ratio == 0.01
"""),
    "guide-ddp-hook": (_TORCH_GIVEN + _DDP, """
train(model, torch.optim.SGD(model.parameters(), lr=0.05), steps=30)
assert full_loss(model) < 0.5 * initial_loss
state = hook.state_dict()
assert state and os.path.exists(f"grace.{dist.get_rank()}.pt"), state
del model
import gc; gc.collect()
dist.destroy_process_group()
"""),
    "localsgd-torch": (_TORCH_GIVEN + _HVD_TORCH + """
X, Y = X / 4, Y / 4  # the page's lr=0.1 with momentum 0.9 diverges on unit-scale inputs
batches = data = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 64, 16)] * 5
initial_loss = full_loss(model)
""", """
assert full_loss(model) < 0.8 * initial_loss, (initial_loss, full_loss(model))
assert os.path.exists("ckpt.pt")
assert opt.method.step_count == len(data), opt.method.step_count
"""),
    "localsgd-postlocal-ddp": (_TORCH_GIVEN + _DDP + """
dist.init_process_group("gloo")
ddp = torch.nn.parallel.DistributedDataParallel(model)
""", """
train(ddp, opt, steps=30)
assert full_loss(model) < 0.5 * initial_loss
del ddp, model, opt
import gc; gc.collect()
dist.destroy_process_group()
"""),
    "onebit-adam-torch": (_TORCH_GIVEN + "import horovod.torch as hvd\nhvd.init()\n", """
assert opt._compression.grace.compressor.freeze_step == 2000
"""),
    "readme-numpy": ("", """
assert len(out) == 4 and out[0]["w"].shape == (1000,)
assert sim.workers[0].stats.as_dict()["payload_bytes"] > 0
"""),
    "guide-numpy": ("", """
exact = np.mean([g["w"] for g in grads], axis=0)
assert all(np.array_equal(o["w"], out[0]["w"]) for o in out)   # every worker gets the same aggregate
assert np.abs(out[0]["w"] - exact).mean() < 0.5 * np.abs(exact).mean() + 0.1
stats = sim.workers[0].stats.as_dict()
assert stats["payload_bytes"] < stats["dense_bytes"] / 4, stats
"""),
    "localsgd-simulator": ("""
import numpy as np
import grace_dl
initial = {"w": np.zeros(10, np.float32)}
params_of_each_worker = [{"w": np.full(10, r, np.float32)} for r in range(4)]
losses = [1.0] * 4
""", """
assert new is None   # the first of 4 local steps: no averaging yet
"""),
}

_RUNNER = textwrap.dedent("""
    import json, os, sys, traceback
    cases = json.load(open(sys.argv[1]))
    for case in cases:
        ns = {"__name__": "__snippet__", "os": os}
        try:
            exec(compile(case["prelude"], "<prelude of " + case["name"] + ">", "exec"), ns)
            exec(compile(case["code"], case["where"], "exec"), ns)
            exec(compile(case["check"], "<check of " + case["name"] + ">", "exec"), ns)
        except BaseException:
            print("SNIPPET-FAIL", case["name"], json.dumps(traceback.format_exc()), flush=True)
        else:
            print("SNIPPET-OK", case["name"], flush=True)
""")

_RESULTS: dict[str, dict[str, str]] = {}


def _run_modes(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Run the snippets of every mode whose packages are installed, one subprocess per
    mode, all at once; mode -> name -> "OK" or the traceback."""
    if _RESULTS:
        return _RESULTS
    running = {}
    for mode in MODES:
        if _missing(mode):
            continue
        cases = [{"name": s["name"], "where": f"{s['file']}:{s['line']}", "code": s["code"],
                  "prelude": CASES[s["name"]][0], "check": CASES[s["name"]][1]}
                 for s in snippets() if s["mode"] == mode]
        work = tmp_path_factory.mktemp(f"snippets-{mode}")
        (work / "cases.json").write_text(json.dumps(cases))
        (work / "runner.py").write_text(_RUNNER)
        env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", SNIPPET_PORT=str(_free_port()))
        env.pop("TF_USE_LEGACY_KERAS", None)
        if mode == "tf-keras":
            env["TF_USE_LEGACY_KERAS"] = "1"
        proc = subprocess.Popen([sys.executable, str(work / "runner.py"), str(work / "cases.json")], cwd=work,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running[mode] = (proc, cases)
    for mode, (proc, cases) in running.items():
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        results = {}
        for line in stdout.splitlines():
            if line.startswith("SNIPPET-OK "):
                results[line.split()[1]] = "OK"
            elif line.startswith("SNIPPET-FAIL "):
                _, name, trace = line.split(" ", 2)
                results[name] = json.loads(trace)
        for case in cases:
            results.setdefault(case["name"], f"no result (exit {proc.returncode}):\n{stderr[-3000:]}")
        _RESULTS[mode] = results
    return _RESULTS


def _free_port() -> int:
    """A TCP port free now, for the DDP snippets' one-process group."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _missing(mode: str) -> list[str]:
    wanted = {"keras3": ["tensorflow", "horovod"], "tf-keras": ["tensorflow", "tf_keras", "horovod"],
              "torch": ["torch", "horovod"], "numpy": []}[mode]
    return [m for m in wanted if importlib.util.find_spec(m) is None]


def test_every_snippet_has_a_marker():
    """Each Python block of the docs says its mode (or why it is not run), and each mode has a case here."""
    found = snippets()
    assert len(found) >= 15, found
    unmarked = [f"{s['file']}:{s['line']}" for s in found if s["name"] is None]
    assert not unmarked, f"Python blocks without a '<!-- snippet: NAME; mode: MODE -->' marker: {unmarked}"
    names = [s["name"] for s in found]
    assert len(names) == len(set(names)), names
    for s in found:
        if s["skip"] is None:
            assert s["mode"] in MODES, (s["name"], s["mode"])
            assert s["name"] in CASES, f"{s['name']}: no prelude and check in tests/test_doc_snippets.py"
    assert {s["name"] for s in found if s["mode"]} == set(CASES), "cases left without a snippet"


def test_keras_modes_are_stated_in_the_text():
    """The prose just before a TF snippet names the Keras mode it runs in."""
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"<!-- snippet: ([\w-]+); mode: (keras3|tf-keras) -->", text):
            before = text[max(0, match.start() - 700):match.start()]
            said = "Keras 3" if match[2] == "keras3" else "tf-keras"
            assert said in before, f"{path.name}: the text before snippet {match[1]} does not say {said!r}"


@pytest.mark.parametrize("snippet", [s["name"] for s in snippets() if s["mode"]])
def test_snippet_runs_as_written(snippet, tmp_path_factory):
    mode = next(s["mode"] for s in snippets() if s["name"] == snippet)
    if _missing(mode):
        pytest.skip(f"{mode} snippets need {', '.join(_missing(mode))}, not installed (scripts/setup.sh installs it)")
    results = _run_modes(tmp_path_factory)[mode]
    assert results[snippet] == "OK", f"{snippet}:\n{results[snippet]}"
