"""A rank that exits in the middle of training: the job must end, with a non-zero exit
status, within a bounded time, and leave no process behind.

    horovodrun -np 2 --gloo python tests/multirank/dead_rank.py hvd <token>
    python tests/multirank/dead_rank.py ddp <token> <rank> <port>   # one per rank

Rank 1 exits (status 3, without any goodbye to its peers) at step ``DIE_AT``; rank 0
goes on training. Under Horovod, the launcher sees the dead process and ends the job;
with the DDP hook, the surviving rank's next collective fails (Gloo reports the closed
connection, or the process group's timeout expires) and it exits non-zero. ``token`` is
only there so that the test can look for leftover processes by their command line.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import grace_dl.torch as grace  # noqa: E402

DIE_AT = 3
STEPS = 1000  # far more than are ever reached: the job must end because of the dead rank
TIMEOUT_S = 20  # the DDP process group's timeout


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def train(rank: int, step_fn) -> None:
    gen = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        if rank == 1 and step == DIE_AT:
            print(f"rank 1: exiting at step {step} at {time.time():.3f}", flush=True)
            os._exit(3)
        step_fn(torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    print(f"rank {rank}: finished {STEPS} steps although rank 1 died", flush=True)


def run_horovod() -> None:
    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)
    net = model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                   named_parameters=net.named_parameters(), compression=grace.topk(ratio=0.3))

    def step(x, y):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    train(hvd.rank(), step)


def run_ddp(rank: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    torch.set_num_threads(1)
    net = torch.nn.parallel.DistributedDataParallel(model())
    net.register_comm_hook(None, grace.ddp_hook(grace.topk(ratio=0.3)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(x, y):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    train(rank, step)


if __name__ == "__main__":
    if sys.argv[1] == "hvd":
        run_horovod()
    else:
        run_ddp(int(sys.argv[3]), int(sys.argv[4]))
