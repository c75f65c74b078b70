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
from .spec import LOCAL_SGD_NAMES, timed_schedule


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
    params.pop("optimizer", None)
    fusion = params.pop("fusion", None)
    background = params.pop("background", None)
    placeholders = params.pop("placeholders", None)
    round_batch = params.pop("round_batch", None)
    if fusion is not None:
        params["policies"] = {"fusion_bytes": int(fusion)}
    method = getattr(grace, spec["name"])(**params)
    if background is not None:
        method.background = bool(background)
    if placeholders is not None:
        method.placeholder_allreduce = bool(placeholders)
    if round_batch is not None:
        method.round_batch_bytes = int(round_batch)
    return method


def make_optimizer(model: torch.nn.Module, spec: dict[str, Any] | None) -> torch.optim.Optimizer:
    """The spec's ``optimizer``: SGD without momentum (default) or Adam, both at lr 0.01."""
    name = (spec or {}).get("params", {}).get("optimizer", "sgd")
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.01)


def setup_local_sgd(config: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    images: torch.Tensor, labels: torch.Tensor):
    """Local SGD (``local_sgd`` / ``post_local_sgd``): under ``hvd`` grace-dl's ``LocalSGD``
    wraps the plain optimizer (no gradient is allreduced); under ``ddp`` the model is
    wrapped in DDP with ``post_local_sgd_hook`` (gradients allreduced during the first
    ``switch_step`` steps, nothing afterwards) and ``PostLocalSGDOptimizer`` averages the
    models. Bytes are the method's own counts (the hook's gradients included). Returns
    what :func:`setup` does."""
    import grace_dl.torch as grace

    spec = config["method"]
    method = grace.local_sgd(**{k: v for k, v in spec["params"].items() if k != "optimizer"})
    close = lambda: None  # noqa: E731
    if config["launcher"] == "hvd":
        import horovod.torch as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        local = grace.LocalSGD(optimizer, model.named_parameters(), method=method)
        close = hvd.shutdown
    else:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
        named = list(model.named_parameters())
        model = DistributedDataParallel(model)  # broadcasts rank 0's parameters
        model.register_comm_hook(None, grace.post_local_sgd_hook(method))
        local = grace.PostLocalSGDOptimizer(optimizer, named, method=method)
        # no destroy_process_group (see setup)

    def step() -> None:
        local.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        local.step(loss=loss)  # the adaptive period needs the loss

    def counters() -> dict[str, int]:
        return {"sent": method.stats.sent, "payload": method.stats.payload}

    return step, counters, rank, size, close


def setup(config: dict[str, Any]) -> tuple[Callable[[], None], Callable[[], dict[str, int]], int, int, Callable[[], None]]:
    """Build the model, data and exchange; returns (step, byte counters, rank, size, close)."""
    torch.manual_seed(config.get("seed", 0))
    model = ResNet18Like(config["width"], config["num_classes"])
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    images = torch.randn(config["batch_size"], 3, config["image_size"], config["image_size"])
    labels = torch.randint(0, config["num_classes"], (config["batch_size"],))
    spec = config.get("method")
    optimizer = make_optimizer(model, spec)
    launcher = config["launcher"]
    if spec is not None and spec["name"] in LOCAL_SGD_NAMES:
        return setup_local_sgd(config, model, optimizer, images, labels)
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
    # untimed: torch's PowerSGD hook before its start_iter, 1-bit Adam's dense warm-up;
    # local SGD's repeats hold whole periods (see timed_schedule)
    warmup, steps = timed_schedule(config.get("method"), config["warmup"], config["steps"])
    try:
        for _ in range(warmup):
            step()
        before = counters()
        times = []
        for _ in range(config["repeats"]):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - start) / steps)
        after = counters()
    finally:
        close()  # Horovod's shutdown; nothing for DDP (see setup)
    timed = config["repeats"] * steps
    result = {"rank": rank, "size": size, "warmup": warmup, "steps": steps, "step_times": times,
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
