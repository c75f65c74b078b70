"""One rank of the training benchmark (run by :mod:`grace_dl.trainbench.runner`).

``python -m grace_dl.trainbench.worker CONFIG_JSON`` trains the benchmark model on one
fixed synthetic batch with one torch thread, alone (``launcher: none``, the compute-only
ceiling), under ``horovodrun`` (``hvd``) or as one of N torch.distributed Gloo processes
started with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (``ddp``).
Rank 0 writes its timings and byte counts as JSON to ``config["result"]``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from typing import Any, Callable

import torch
from torch.nn import functional as F

from .model import ResNet18Like


def ring_allreduce_sent(nbytes: int, size: int) -> int:
    """Bytes one worker sends in a ring allreduce of ``nbytes`` (grace-dl's byte model)."""
    from ..transport.base import allreduce_traffic

    return allreduce_traffic(nbytes, size)[0]


class AllreduceCounter:
    """Counts the bytes of every ``torch.distributed.all_reduce`` made from Python (torch's
    DDP hooks make theirs so), as a ring allreduce's bytes sent per worker."""

    def __init__(self, size: int):
        import torch.distributed as dist

        self.size = size
        self.sent = 0
        self._dist = dist
        self._original = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            self.sent += ring_allreduce_sent(tensor.numel() * tensor.element_size(), self.size)
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce

    def restore(self) -> None:
        """Put torch's own ``all_reduce`` back."""
        self._dist.all_reduce = self._original


def _grace_method(spec: dict[str, Any]):
    import grace_dl.torch as grace

    params = dict(spec["params"])
    fusion = params.pop("fusion", None)
    background = params.pop("background", None)
    if fusion is not None:
        params["policies"] = {"fusion_bytes": int(fusion)}
    method = getattr(grace, spec["name"])(**params)
    if background is not None:
        method.background = bool(background)
    return method


def setup(config: dict[str, Any]) -> tuple[Callable[[], None], Callable[[], dict[str, int]], int, int, Callable[[], None]]:
    """Build the model, data and exchange; returns (step, byte counters, rank, size, close)."""
    torch.manual_seed(config.get("seed", 0))
    model = ResNet18Like(config["width"], config["num_classes"])
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    images = torch.randn(config["batch_size"], 3, config["image_size"], config["image_size"])
    labels = torch.randint(0, config["num_classes"], (config["batch_size"],))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    spec = config.get("method")
    launcher = config["launcher"]
    close = lambda: None  # noqa: E731
    rank, size = 0, 1
    counters: Callable[[], dict[str, int]] = lambda: {}  # noqa: E731

    if launcher == "hvd":
        import horovod.torch as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        if spec["grace"]:
            compression = _grace_method(spec)
            stats = compression.grace.stats
            counters = lambda: {"sent": stats.sent, "payload": stats.payload}  # noqa: E731
        else:
            compression = getattr(hvd.Compression, spec["name"])
            wire = dense // 2 if spec["name"] == "fp16" else dense
            exchanged = [0]

            def counters() -> dict[str, int]:
                return {"sent": exchanged[0] * ring_allreduce_sent(wire, size), "payload": exchanged[0] * wire}
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=compression)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        close = hvd.shutdown
    elif launcher == "ddp":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
        named = list(model.named_parameters())
        buckets = {}
        if not spec["grace"] and spec["name"] == "powersgd_hook":
            # torch's PowerSGD hook posts its second allreduce from a future's callback; on
            # Gloo, with several buckets, the ranks can then enqueue collectives in different
            # orders (a size mismatch abort), so it gets one bucket unless told otherwise
            buckets = {"bucket_cap_mb": float(spec["params"].get("bucket_mb", 1024))}
        model = DistributedDataParallel(model, **buckets)
        exchanged = [0]
        if spec["grace"]:
            import grace_dl.torch as grace

            hook = grace.ddp_hook(_grace_method(spec), named_parameters=named)
            model.register_comm_hook(None, hook)
            counters = lambda: {"sent": hook.grace.stats.sent, "payload": hook.grace.stats.payload}  # noqa: E731
        elif spec["name"] == "allreduce":  # DDP's reducer allreduces in C++: count the dense buckets
            def counters() -> dict[str, int]:
                return {"sent": exchanged[0] * ring_allreduce_sent(dense, size), "payload": exchanged[0] * dense}
        else:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

            counter = AllreduceCounter(size)
            if spec["name"] == "fp16_hook":
                model.register_comm_hook(None, default_hooks.fp16_compress_hook)
            else:
                p = spec["params"]
                state = powerSGD_hook.PowerSGDState(
                    process_group=None, matrix_approximation_rank=int(p.get("rank", 1)),
                    start_powerSGD_iter=int(p.get("start_iter", 2)),
                    min_compression_rate=float(p.get("min_compression_rate", 2)),
                    use_error_feedback=bool(p.get("error_feedback", True)), warm_start=bool(p.get("warm_start", True)))
                model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
            # bytes sent per worker; the payload is what one worker contributes (ring: the same for N=2)
            counters = lambda: {"sent": counter.sent, "payload": counter.sent * size // max(2 * (size - 1), 1)}  # noqa: E731
        # no destroy_process_group: on a loaded machine it sometimes hangs or aborts in Gloo's
        # teardown ("Resource deadlock avoided"); the process ends with os._exit once the
        # figures are written, after the last step's collectives completed on every rank

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if spec is not None and not spec["grace"] and (launcher == "hvd" or spec["name"] == "allreduce"):
            exchanged[0] += 1

    return step, counters, rank, size, close


def run(config: dict[str, Any]) -> dict[str, Any] | None:
    """Warm up, time ``repeats`` runs of ``steps`` steps; rank 0's figures (None elsewhere)."""
    torch.set_num_threads(1)
    step, counters, rank, size, close = setup(config)
    warmup = config["warmup"]
    spec = config.get("method") or {}
    if spec.get("name") == "powersgd_hook" and not spec.get("grace"):
        # torch's hook allreduces uncompressed before its start_iter: keep those steps untimed
        warmup = max(warmup, int(spec["params"].get("start_iter", 2)))
    try:
        for _ in range(warmup):
            step()
        before = counters()
        times = []
        for _ in range(config["repeats"]):
            start = time.perf_counter()
            for _ in range(config["steps"]):
                step()
            times.append((time.perf_counter() - start) / config["steps"])
        after = counters()
    finally:
        close()  # Horovod's shutdown; nothing for DDP (see setup)
    timed = config["repeats"] * config["steps"]
    result = {"rank": rank, "size": size, "warmup": warmup, "step_times": times,
              "sent_per_step": (after.get("sent", 0) - before.get("sent", 0)) / timed if after else 0.0,
              "payload_per_step": (after.get("payload", 0) - before.get("payload", 0)) / timed if after else 0.0}
    return result if rank == 0 else None


def main(argv: list[str] | None = None) -> int:
    """``python -m grace_dl.trainbench.worker CONFIG_JSON``."""
    config = json.loads((argv if argv is not None else sys.argv[1:])[0])
    if config.get("watchdog"):  # a hung rank says where before the launcher's timeout kills it
        faulthandler.dump_traceback_later(config["watchdog"], exit=True)
    result = run(config)
    if result is not None:
        with open(config["result"], "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip the interpreter's teardown: Gloo's and the DDP hooks' threads sometimes abort
    # there ("Resource deadlock avoided") after every figure is written
    os._exit(code)
