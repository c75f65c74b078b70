"""The end-to-end training benchmark (grace_dl/trainbench): its model, its arithmetic,
its writers, the path taken when links cannot be shaped, argument errors, and one small
two-rank run whose byte counts are checked against the method's formula (multirank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grace_dl import cli
from grace_dl.registry import ConfigError
from grace_dl.trainbench import netns, report, runner
from grace_dl.trainbench.spec import PRESETS, parse_method, parse_rate, rate_label, timed_schedule


# -- the model ----------------------------------------------------------------------------
@pytest.mark.parametrize("width, classes, params", [(64, 1000, 11_689_512), (16, 100, None), (8, 10, None)])
def test_model_has_resnet18s_62_gradient_tensors(width, classes, params):
    torch = pytest.importorskip("torch")
    from grace_dl.trainbench.model import ResNet18Like

    model = ResNet18Like(width, classes)
    tensors = [p for p in model.parameters() if p.requires_grad]
    assert len(tensors) == 62
    if params is not None:  # torchvision's resnet18() has exactly this many
        assert sum(p.numel() for p in tensors) == params
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, classes)
    out.sum().backward()
    assert all(p.grad is not None for p in tensors)


def test_presets_use_the_62_tensor_model_and_valid_specs():
    assert PRESETS["full"].width == 64 and PRESETS["full"].batch_size == 16 and PRESETS["full"].image_size == 128
    for preset in PRESETS.values():
        for text in preset.methods:
            assert parse_method(text).label == text
        assert [rate_label(parse_rate(link)) for link in preset.links][0] == "unshaped"


# -- arithmetic ------------------------------------------------------------------------------
def test_ideal_bound_is_compute_plus_link_bytes_over_rate():
    assert report.ideal_step_time(0.5, 12.5e6, 1e9) == pytest.approx(0.6)  # 100 Mbit in 0.1 s
    assert report.ideal_step_time(0.5, 12.5e6, 1e8) == pytest.approx(1.5)
    assert report.ideal_step_time(0.5, 12.5e6, None) == 0.5  # unshaped: the compute-only step
    assert report.fraction_of_ceiling(0.5, 2.0) == 0.25
    with pytest.raises(ValueError):
        report.fraction_of_ceiling(0.5, 0.0)
    assert report.summarize([3.0, 1.0, 2.0, 10.0]) == (2.5, 1.0, 10.0)


def test_result_from_rank0_counts_every_workers_bytes_on_the_shared_link():
    figures = {"size": 2, "step_times": [0.9, 1.1, 1.0], "sent_per_step": 5e6, "payload_per_step": 5e6}
    r = report.from_worker("hvd:none", 1e8, figures, ceiling_s=0.5)
    assert r.link == "100 Mbit/s" and r.link_bytes == 1e7
    assert (r.median, r.low, r.high) == (1.0, 0.9, 1.1)
    assert r.ideal == pytest.approx(0.5 + 8 * 1e7 / 1e8)  # 1.3 s
    assert r.fraction == pytest.approx(0.5) and r.ideal_fraction == pytest.approx(0.5 / 1.3)


# -- writers --------------------------------------------------------------------------------
def _results():
    ceiling = report.Result("compute-only (-np 1)", "unshaped", None, [0.5, 0.52, 0.48]).complete(None)
    rows = [report.from_worker("hvd:none", None, {"size": 2, "step_times": [0.8], "sent_per_step": 4e6}, 0.5),
            report.from_worker("hvd:none", 1e8, {"size": 2, "step_times": [1.25], "sent_per_step": 4e6}, 0.5),
            report.Result("ddp:allreduce", "100 Mbit/s", 1e8, error="timed out after 9 s")]
    return ceiling, rows


def test_markdown_table_has_every_method_link_and_figure():
    ceiling, rows = _results()
    text = report.markdown(rows, ceiling)
    assert "Compute-only ceiling (`-np 1`, no exchange): 0.5000 s/step (min 0.4800, max 0.5200, 3 repeats)" in text
    assert "| s/step (fraction of ceiling) | unshaped | 100 Mbit/s |" in text
    assert "| hvd:none | 0.8000 (62%) | 1.2500 (40%) |" in text
    assert "| ddp:allreduce |  | failed: timed out after 9 s |" in text
    # 8 MB on the link at 100 Mbit/s: 0.64 s over the 0.5 s ceiling
    assert "| hvd:none | 100 Mbit/s | 1.2500 | 1.2500 - 1.2500 | 40% | 4 MB | 8 MB | 1.1400 | 44% |" in text


def test_json_keeps_the_raw_figures(tmp_path):
    ceiling, rows = _results()
    path = tmp_path / "results.json"
    report.write_json(str(path), {"preset": "small"}, ceiling, rows)
    data = json.loads(path.read_text())
    assert data["meta"] == {"preset": "small"} and data["ceiling"]["step_times"] == [0.5, 0.52, 0.48]
    assert [(r["method"], r["link"], r["step_times"], r["error"]) for r in data["results"]] == [
        ("hvd:none", "unshaped", [0.8], None), ("hvd:none", "100 Mbit/s", [1.25], None),
        ("ddp:allreduce", "100 Mbit/s", [], "timed out after 9 s")]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    ceiling, rows = _results()
    report.plot(str(tmp_path / "p.png"), rows, ceiling)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- links that cannot be shaped ------------------------------------------------------------
def _fake_jobs(monkeypatch, seen):
    def fake_run_job(spec, preset, np, rate, link, out_dir, index, ceiling_s):
        seen.append((spec.label if spec else None, rate, link))
        label = spec.label if spec else "compute-only (-np 1)"
        return report.from_worker(label, rate, {"size": np, "step_times": [1.0], "sent_per_step": 10.0}, ceiling_s)

    monkeypatch.setattr(runner, "run_job", fake_run_job)


@pytest.mark.parametrize("cause, expected", [("tc", "tc not found (install iproute2)"),
                                             ("root", "not root (network namespaces and tc need root)")])
def test_without_tc_or_root_one_clear_line_and_unshaped_figures(monkeypatch, tmp_path, capsys, cause, expected):
    if cause == "tc":
        real_which = netns.shutil.which
        monkeypatch.setattr(netns.shutil, "which", lambda name, *a, **k: None if name == "tc" else real_which(name))
        monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    else:
        monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    seen = []
    _fake_jobs(monkeypatch, seen)
    rc = cli.main(["bench-train", "--method", "hvd:none", "--link", "100mbit", "--link", "1gbit",
                   "--output", str(tmp_path)])
    assert rc == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "cannot shape" in line]
    assert lines == [f"grace-dl bench-train: cannot shape links ({expected}); measuring unshaped only"]
    assert seen == [(None, None, None), ("hvd:none", None, None)]  # the ceiling, then unshaped only
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["links"] == ["unshaped"] and "cannot shape" in data["meta"]["shaping"]
    assert (tmp_path / "results.md").exists()


def test_namespace_is_deleted_also_on_error():
    if netns.why_cannot_shape() is not None:
        pytest.skip(f"cannot shape here: {netns.why_cannot_shape()}")

    def listed():
        return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout

    with pytest.raises(RuntimeError, match="inside"):
        with netns.ShapedLink(1e8) as link:
            assert link.name in listed()
            qdisc = subprocess.run(link.wrap(["tc", "qdisc", "show", "dev", "lo"]), capture_output=True, text=True)
            assert "tbf" in qdisc.stdout and "100Mbit" in qdisc.stdout
            raise RuntimeError("inside")
    assert link.name not in listed()


def test_every_launch_is_bounded_in_time(tmp_path):
    started = time.monotonic()
    why = runner.launch([([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))],
                        tmp_path / "log", timeout=1.0)
    assert why == "timed out after 1 s" and time.monotonic() - started < 15
    why = runner.launch([([sys.executable, "-c", "raise SystemExit('boom')"], dict(os.environ))],
                        tmp_path / "log", timeout=30)
    assert why.startswith("exit status 1:") and "boom" in why


# -- argument errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--method", "topk"], "expected LAUNCHER:NAME"),
    (["--method", "mpi:topk"], "LAUNCHER one of hvd, ddp"),
    (["--method", "hvd:nope"], "unknown method 'nope'"),
    (["--method", "hvd:topk,rate=0.1"], "topk has no parameter 'rate' (it takes ratio)"),
    (["--method", "hvd:topk,0.1"], "expected KEY=VALUE"),
    (["--method", "ddp:fp16_hook,rank=2"], "ddp:fp16_hook takes no parameters"),
    (["--method", "hvd:local_sgd,h=4"], "local_sgd has no parameter 'h' (it takes period, switch_step"),
    (["--method", "hvd:local_sgd,period=0"], "local_sgd: period must be an int >= 1, got 0"),
    (["--method", "hvd:local_sgd,period=2,min_period=4"], "min_period (4) must not exceed period (2)"),
    (["--method", "ddp:post_local_sgd,period=4"], "post_local_sgd needs switch_step=N >= 1"),
    (["--method", "hvd:onebit_adam"], "onebit_adam needs freeze_step=N"),
    (["--method", "hvd:onebit_adam,freeze_step=2,optimizer=adam"], "runs with optimizer=sgd"),
    (["--method", "hvd:onebit_adam,freeze_step=2,fusion=65536"], "onebit_adam takes no fusion"),
    (["--method", "hvd:none,optimizer=lamb"], "optimizer must be one of sgd, adam, got 'lamb'"),
    (["--method", "hvd:topk,background=2"], "background is 0 or 1, got 2"),
    (["--method", "ddp:topk,background=1"], "topk has no parameter 'background'"),
    (["--method", "hvd:topk,placeholders=2"], "placeholders is 0 or 1, got 2"),
    (["--method", "ddp:topk,placeholders=1"], "topk has no parameter 'placeholders'"),
    (["--method", "hvd:powersgd,round_batch=-1"], "round_batch is the round batch size in bytes, an int >= 0"),
    (["--method", "ddp:powersgd,round_batch=0"], "powersgd has no parameter 'round_batch'"),
    (["--method", "hvd:topk,tree=/nonexistent"], "tree is a directory holding another copy of grace_dl"),
    (["--link", "fast"], "link 'fast': expected 'unshaped' or a positive rate"),
    (["--link", "0mbit"], "positive rate"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--image-size", "8"], "--image-size must be >= 32"),
    (["--np", "1"], "--np must be >= 2"),
    (["--timeout", "-3"], "--timeout must be > 0"),
])
def test_argument_errors_are_one_line(capsys, tmp_path, argv, words):
    assert cli.main(["bench-train", "--output", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("grace-dl: error: ") and words in err, err
    assert not (tmp_path / "out").exists()


def test_rates_and_specs_parse():
    assert parse_rate("100mbit") == 1e8 and parse_rate("1Gbit") == 1e9 and parse_rate("2.5kbit") == 2500
    assert parse_rate("unshaped") is None
    assert rate_label(1e9) == "1 Gbit/s" and rate_label(1e8) == "100 Mbit/s"
    spec = parse_method("hvd:grace.fp16")
    assert spec.grace and spec.name == "fp16" and spec.label == "hvd:grace.fp16"
    assert not parse_method("hvd:fp16").grace
    assert parse_method("ddp:powersgd_hook,rank=4").params == (("rank", 4),)
    assert parse_method("hvd:topk,ratio=0.01,background=0").params == (("ratio", 0.01), ("background", 0))
    with pytest.raises(ConfigError):
        parse_method("ddp:allreduce,x=1")
    local = parse_method("hvd:local_sgd,period=4,adaptive=true")
    assert local.grace and local.params == (("period", 4), ("adaptive", True))
    assert local.label == "hvd:local_sgd,period=4,adaptive=True"
    assert parse_method("ddp:post_local_sgd,period=4,switch_step=3").params == (("period", 4), ("switch_step", 3))
    assert dict(parse_method("hvd:none,optimizer=adam").params) == {"optimizer": "adam"}
    assert parse_method("hvd:onebit_adam,freeze_step=5").grace
    assert dict(parse_method("hvd:powersgd,round_batch=0").params) == {"round_batch": 0}
    assert netns.tbf_burst_bytes(1e9) == 1_250_000 and netns.tbf_burst_bytes(1e6) == 2 * 65536


@pytest.mark.parametrize("text, expected", [
    ("hvd:topk,ratio=0.01", (2, 5)),
    ("ddp:powersgd_hook,rank=4,start_iter=7", (7, 5)),      # uncompressed before start_iter: untimed
    ("hvd:onebit_adam,freeze_step=9", (9, 5)),              # dense Adam during the warm-up: untimed
    ("hvd:local_sgd,period=4", (4, 8)),                     # the warm-up ends on an averaging step
    ("hvd:local_sgd,period=16", (16, 16)),                  # and each repeat holds whole periods
    ("ddp:post_local_sgd,period=4,switch_step=3", (3, 8)),  # the synchronous steps are untimed
    ("ddp:post_local_sgd,period=3,switch_step=1", (4, 6)),
])
def test_timed_steps_are_a_methods_steady_state(text, expected):
    assert timed_schedule(parse_method(text).as_dict(), 2, 5) == expected


# -- two ranks ----------------------------------------------------------------------------------
@pytest.mark.multirank
def test_two_rank_run_reports_the_methods_own_bytes(tmp_path):
    torch = pytest.importorskip("torch")
    import grace_dl
    from grace_dl.trainbench.model import ResNet18Like

    cmd = [sys.executable, "-m", "grace_dl.trainbench", "--width", "4", "--num-classes", "10", "--image-size", "32",
           "--batch-size", "2", "--warmup", "1", "--steps", "2", "--repeats", "2", "--timeout", "120",
           "--link", "unshaped", "--method", "ddp:topk,ratio=0.01", "--method", "ddp:allreduce",
           "--output", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(Path(grace_dl.__file__).parents[1]), TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in data["results"]}
    sizes = [p.numel() for p in ResNet18Like(4, 10).parameters()]
    topk = grace_dl.topk(ratio=0.01).compressor
    assert rows["ddp:topk,ratio=0.01"]["payload_bytes"] == sum(topk.payload_nbytes(n) for n in sizes)
    assert rows["ddp:allreduce"]["sent_bytes"] == 4 * sum(sizes)  # a 2-rank ring sends the dense bytes once
    for r in rows.values():
        assert len(r["step_times"]) == 2 and r["median"] > 0 and r["fraction"] > 0
    assert data["ceiling"]["median"] > 0
    assert (tmp_path / "step_time.png").exists()


def test_a_method_runs_on_the_copy_of_grace_dl_its_tree_names(tmp_path):
    root = runner.PACKAGE_ROOT
    spec = parse_method(f"hvd:powersgd,rank=4,tree={root}")
    assert spec.label.endswith(f",tree={root}")
    ((cmd, env),) = runner.job_commands(spec, {"launcher": "none"}, 2, None)
    config = json.loads(cmd[-1])
    assert "tree" not in config["method"]["params"], "another copy's worker must not see the key"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == root and env[runner.TREE_VAR] == root
    other = tmp_path / "copy"
    (other / "grace_dl" / "trainbench").mkdir(parents=True)
    (other / "grace_dl" / "trainbench" / "worker.py").write_text("")
    ((cmd, env),) = runner.job_commands(parse_method(f"hvd:topk,tree={other}"), {"launcher": "none"}, 2, None)
    # python -m imports from its working directory first: the launch runs there
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(other) and env[runner.TREE_VAR] == str(other)


def test_rank_0_writes_its_figures_to_an_absolute_path_whatever_the_output(tmp_path, monkeypatch):
    # a tree= launch runs in the other tree's directory: a relative --output must still
    # name the place the runner reads rank 0's figures from
    seen = []

    def launch(commands, log, timeout):
        seen.extend(json.loads(cmd[-1])["result"] for cmd, _ in commands)
        return "not launched"

    monkeypatch.setattr(runner, "launch", launch)
    monkeypatch.chdir(tmp_path)
    result = runner.run_job(parse_method("hvd:topk,ratio=0.01"), PRESETS["small"], 2, None, None, Path("out"), 1, None)
    assert result.error == "not launched"
    assert seen and all(os.path.isabs(p) and p.startswith(str(tmp_path / "out" / "logs")) for p in seen)


def test_cycle_ms_sets_horovods_cycle_time_for_that_launch_only():
    for text in ("hvd:none,cycle_ms=10", "hvd:topk,ratio=0.01,cycle_ms=2.5", "hvd:local_sgd,period=4,cycle_ms=10"):
        spec = parse_method(text)
        assert spec.label == text
        ((cmd, env),) = runner.job_commands(spec, {"launcher": "none"}, 2, None)
        assert env["HOROVOD_CYCLE_TIME"] == text.rpartition("=")[2]
        assert "cycle_ms" not in json.loads(cmd[-1])["method"]["params"], "the worker builds the method without it"
    ((cmd, env),) = runner.job_commands(parse_method("hvd:topk,ratio=0.01"), {"launcher": "none"}, 2, None)
    assert env.get("HOROVOD_CYCLE_TIME") == os.environ.get("HOROVOD_CYCLE_TIME"), "Horovod's default otherwise"
    with pytest.raises(ConfigError, match="for hvd methods only"):
        parse_method("ddp:allreduce,cycle_ms=10")
    for bad in ("0", "-1", "fast", "true"):
        with pytest.raises(ConfigError, match="cycle_ms is Horovod's cycle time in milliseconds"):
            parse_method(f"hvd:none,cycle_ms={bad}")
    with pytest.raises(ConfigError, match="has no parameter 'cycles'"):
        parse_method("hvd:topk,cycles=10")


@pytest.mark.multirank
def test_two_rank_post_local_sgd_reports_the_methods_own_bytes(tmp_path):
    pytest.importorskip("torch")
    from grace_dl.trainbench.model import ResNet18Like

    spec = parse_method("ddp:post_local_sgd,period=3,switch_step=2")
    result = tmp_path / "figures.json"
    config = {"launcher": "none", "width": 4, "num_classes": 10, "batch_size": 2, "image_size": 32, "warmup": 1,
              "steps": 2, "repeats": 2, "result": str(result), "watchdog": 110}
    commands = runner.job_commands(spec, config, 2, None)  # the worker from this checkout, as the runner starts it
    assert runner.launch(commands, tmp_path / "log", timeout=120) is None, (tmp_path / "log").read_text()[-3000:]
    figures = json.loads(result.read_text())
    sizes = [p.numel() for p in ResNet18Like(4, 10).parameters()]
    # timed: two repeats of 3 steps after the 2 synchronous ones, averaged at steps 5 and
    # 8 (a 2-rank ring sends the dense float32 parameters once): a third of the dense
    # bytes per step, and nothing of the hook's gradient allreduce, which ended at step 2
    assert (figures["warmup"], figures["steps"], len(figures["step_times"])) == (2, 3, 2)
    assert figures["sent_per_step"] == pytest.approx(4 * sum(sizes) / 3)
