"""Multi-process runs on localhost: horovodrun -np 2 (Gloo and MPI) for torch and TF,
mpirun -np 2 for the mpi4py transport, and 2 spawned torch.distributed (Gloo) processes
for the DDP hook. Each launch checks many things (see the scripts in
tests/multirank/), because starting a job costs seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multirank

HERE = Path(__file__).parent / "multirank"
BIN = Path(sys.executable).parent
MPI_ARGS = "--allow-run-as-root --oversubscribe"  # CI runs as root on 2 cores


def launch(cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a session of its own; past ``timeout``, end the whole session: killing
    horovodrun alone left mpirun and both workers running (orphaned, for minutes)."""
    env = env or dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                      TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=HERE.parent.parent, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end_session(proc.pid)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"{' '.join(cmd)} ran past {timeout} s:\n{(out + err)[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _end_session(sid: int) -> None:
    """End every process of session ``sid`` (a launch started with start_new_session):
    SIGTERM first (mpirun then ends its workers, which run in process groups of their
    own), SIGKILL for what is left after 10 s."""
    import signal
    import time

    def members() -> list[int]:
        rows = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout.splitlines()
        return [int(row.split()[0]) for row in rows
                if int(row.split()[1]) == sid and not row.split()[2].startswith("Z")]  # not the dead

    for sig, pause in ((signal.SIGTERM, 10), (signal.SIGKILL, 0)):
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + pause
        while time.time() < deadline and members():
            time.sleep(0.5)


def run(cmd: list[str], expect_ok_lines: int, timeout: int = 420) -> str:
    result = launch(cmd, timeout)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    assert out.count("ALL OK") == expect_ok_lines, out[-6000:]
    return out


def horovodrun(controller: str) -> list[str]:
    if shutil.which("horovodrun", path=str(BIN)) is None:
        pytest.skip("horovod is not installed (run scripts/setup.sh)")
    cmd = [str(BIN / "horovodrun"), "-np", "2", f"--{controller}"]
    if controller == "mpi":
        cmd += ["--mpi-args", MPI_ARGS]
    return cmd


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovod_torch(controller):
    out = run(horovodrun(controller) + [sys.executable, str(HERE / "hvd_torch_checks.py")], expect_ok_lines=2)
    assert "bit-identical to the simulator" in out and "training ok" in out and "handshake ok" in out
    assert "bfloat16 ok" in out and "fusion ok" in out and "empty ok" in out


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovod_torch_optimizer(controller):
    # every method and Horovod option against the simulator, broadcasts, resume; the
    # digits convergence runs (about 90 s) once, under Gloo
    extra = [] if controller == "gloo" else ["--no-convergence"]
    out = run(horovodrun(controller) + [sys.executable, str(HERE / "hvd_torch_training.py"), *extra],
              expect_ok_lines=2, timeout=900)
    for check in ("every method ok", "options ok", "errors ok", "broadcasts ok", "resume ok"):
        assert check in out, check
    assert controller != "gloo" or "convergence ok" in out


def test_ddp_hook():
    out = run([sys.executable, str(HERE / "ddp_checks.py")], expect_ok_lines=2)
    for check in ("collectives ok", "methods ok", "ddp hook ok", "ddp hook options ok", "ddp fusion ok",
                  "ddp resume ok"):
        assert check in out, check


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovod_tensorflow(controller):
    # every method is traced per mode (gtopk's memory twice: its first step and the steady
    # one): minutes on a busy machine
    out = run(horovodrun(controller) + [sys.executable, str(HERE / "hvd_tf_checks.py")], expect_ok_lines=2,
              timeout=900)
    assert "bit-identical to the simulator" in out
    assert "DistributedGradientTape ok" in out and "identical to an uninterrupted run" in out
    assert "op=hvd.Sum gives N x the mean" in out and "lone retrace ok" in out
    assert out.count("fused DistributedGradientTape ok") == 2, out[-3000:]


def test_horovod_keras_training():
    out = run(horovodrun("gloo") + [sys.executable, str(HERE / "hvd_keras_training.py")], expect_ok_lines=2,
              timeout=900)
    assert out.count("keras ") >= 7, out[-3000:]
    assert out.count("keras fit resumed bit-identically") == 8, out[-3000:]  # 3 methods and fused topk x 2 ranks
    assert out.count("keras fused DistributedOptimizer bit-identical") == 2, out[-3000:]
    assert out.count("keras metrics averaged over the ranks") == 2, out[-3000:]
    assert out.count("methods built inside a retraced tf.function step ok") == 2, out[-3000:]


def test_mpi4py_transport():
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("Open MPI is not installed (run scripts/setup.sh)")
    cmd = [mpirun, *MPI_ARGS.split(), "-np", "2", sys.executable, str(HERE / "mpi4py_checks.py")]
    out = run(cmd, expect_ok_lines=2)
    assert "bit-identical to the simulator" in out


MIGRATION_EXAMPLES = ["migrate_torch_mnist.py", "migrate_tf2_mnist.py", "migrate_tf2_keras_mnist.py"]


@pytest.mark.parametrize("script", MIGRATION_EXAMPLES)
def test_migration_guide_examples(script):
    # docs/migrating-from-grace.md's three examples, each in one Gloo launch: they train,
    # and every rank ends with bit-identical parameters (each asserts it over an allgather
    # and prints its digest, which must be the same on both ranks)
    import re

    cmd = horovodrun("gloo") + [sys.executable, str(HERE.parent.parent / "examples" / script)]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
               OMP_NUM_THREADS="1", TF_USE_LEGACY_KERAS="1")
    result = launch(cmd, 420, env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} failed:\n{out[-6000:]}"
    digests = re.findall(r"rank (\d): parameters identical on every rank \((\w+)\)", out)
    assert sorted(r for r, _ in digests) == ["0", "1"], out[-3000:]
    assert len({d for _, d in digests}) == 1, digests
    # and they learn: the torch example reports its test accuracy (10 classes: chance is 0.1)
    accuracies = [float(a) for a in re.findall(r"test accuracy (\d\.\d+)", out)]
    assert all(a > 0.5 for a in accuracies), accuracies


# -- a rank that dies mid-training ----------------------------------------------------------
DEAD_RANK_LIMIT_S = 60


def _dead_rank_launch(cmds: list[list[str]], token: str) -> tuple[list[int], str, float]:
    """Start ``cmds`` together; (exit statuses, output, seconds from rank 1's exit to the
    end of the last process). Asserts that they end within DEAD_RANK_LIMIT_S and leave no
    process whose command line holds ``token``."""
    import re
    import time

    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=HERE.parent.parent, start_new_session=True) for cmd in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=DEAD_RANK_LIMIT_S + 60)[0])
    finally:
        for p in procs:
            if p.poll() is None:  # only on failure: end what this test started, by its group
                os.killpg(p.pid, 9)
    ended = time.time()
    out = "\n".join(outs)
    died = re.search(r"rank 1: exiting at step \d+ at (\d+\.\d+)", out)
    assert died, out[-3000:]
    after = ended - float(died.group(1))
    assert after < DEAD_RANK_LIMIT_S, f"the job ended {after:.1f} s after rank 1 died"
    left = subprocess.run(["pgrep", "-f", token], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"
    assert "although rank 1 died" not in out
    return [p.returncode for p in procs], out, after


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_dead_rank_ends_horovod_job(controller):
    token = f"deadrank{os.getpid()}{controller}"
    (code,), out, after = _dead_rank_launch(
        [horovodrun(controller) + [sys.executable, str(HERE / "dead_rank.py"), "hvd", token]], token)
    assert code != 0, out[-3000:]
    launcher = "Horovod detected" if controller == "gloo" else "mpirun detected"
    assert f"{launcher} that one or more processes exited with non-zero status" in out, out[-3000:]
    print(f"horovodrun --{controller}: job ended {after:.1f} s after rank 1 exited")


def test_dead_rank_ends_ddp_hook_job():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = f"deadrank{os.getpid()}ddp"
    cmds = [[sys.executable, str(HERE / "dead_rank.py"), "ddp", token, str(rank), str(port)] for rank in (0, 1)]
    codes, out, after = _dead_rank_launch(cmds, token)
    assert codes[1] == 3 and codes[0] != 0, (codes, out[-3000:])
    # the survivor names the cause: Gloo's closed connection (or the group's timeout)
    # (closed or reset: Gloo's wording depends on where the survivor was when the peer left)
    assert any(m in out for m in ("Connection closed by peer", "Connection reset by peer", "Timed out")), out[-3000:]
    print(f"DDP hook (Gloo): surviving rank ended {after:.1f} s after rank 1 exited")


# -- grace-dl on one rank, Horovod's own compression on the other ------------------------------
@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_mixed_compression_ends_with_a_clear_error(framework):
    import re

    cmd = horovodrun("gloo") + [sys.executable, str(HERE / "mixed_compression.py"), framework]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
               OMP_NUM_THREADS="1")
    result = launch(cmd, 300, env)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "trained although" not in out, out[-3000:]
    said = re.search(r"rank 0: .*?CompressionMismatchError: (.*) after (\d+\.\d) s", out)
    assert said, out[-3000:]
    assert "compression=" in said.group(1) and "Horovod's own" in said.group(1), said.group(1)
    after = float(said.group(2))
    assert after < 60, f"the error came {after} s after the first step"
    if framework == "torch":  # rank 1 runs no grace-dl: Horovod's own message
        assert re.search(r"rank 1: HorovodInternalError: Mismatched ALLREDUCE tensor shapes", out), out[-3000:]
    print(f"{framework}: rank 0 refused {after:.1f} s after the first step")


# -- a gradient that turns None at a later step on one rank only (TF graph path) ----------------
def test_late_none_gradient_ends_with_a_clear_error():
    # rank 1 alone traces the step again; its gradient check waits GRACE_DL_FIRST_STEP_TIMEOUT
    # (30 s) for ranks that never answer, then names the variable, and its exit ends the job
    import re
    import time

    cmd = horovodrun("gloo") + [sys.executable, str(HERE / "late_none_gradient.py")]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
               OMP_NUM_THREADS="1")
    env.pop("GRACE_DL_FIRST_STEP_TIMEOUT", None)
    result = launch(cmd, 300, env)
    ended = time.time()
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "trained although" not in out, out[-3000:]
    said = re.search(r"rank 1: \w+: GradientMismatchError: (.*) after (\d+\.\d) s", out)
    assert said, out[-3000:]
    assert "rank 1 has no gradient (None) for 'late_b:0'" in said.group(1), said.group(1)
    assert "did not trace the step again" in said.group(1), said.group(1)
    assert 25 < float(said.group(2)) < 60, said.group(2)  # the 30 s wait, not a failure of another kind
    started = float(re.findall(r"rank 1: step 2 starts at (\d+\.\d+)", out)[-1])
    assert ended - started < 60, f"the job ended {ended - started:.1f} s after the step that turned None began"
    print(f"rank 1 refused after {said.group(2)} s; the job ended {ended - started:.1f} s after the step began")
