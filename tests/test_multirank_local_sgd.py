"""Local SGD across real processes (tests/multirank/local_sgd_checks.py): horovodrun -np 2
(Gloo) for torch and TensorFlow, and 2 spawned torch.distributed processes for the
post-local DDP hook; parameters identical on every rank at each averaging step and
bit-identical to the simulator."""

from __future__ import annotations

import sys

import pytest

from test_multirank import HERE, horovodrun, run

pytestmark = pytest.mark.multirank

SCRIPT = str(HERE / "local_sgd_checks.py")
CASES = ("topk-h3", "post-local", "adaptive", "overlap")


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_horovod_local_sgd(framework):
    out = run(horovodrun("gloo") + [sys.executable, SCRIPT, framework], expect_ok_lines=2)
    for case in CASES:
        assert out.count(f"{framework} {case}: ") == 2, case
        assert "identical on every rank and to the simulator" in out


def test_ddp_post_local_sgd():
    out = run([sys.executable, SCRIPT, "ddp"], expect_ok_lines=2)
    assert out.count("ddp post-local sgd ok") == 2
