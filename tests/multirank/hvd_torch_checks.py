"""Run under ``horovodrun -np 2``: horovod.torch collectives through grace-dl's transport,
every method against the simulator, and training with stock hvd.DistributedOptimizer."""

from __future__ import annotations

import os
import sys

import horovod.torch as hvd
import torch

sys.path.insert(0, os.path.dirname(__file__))
import grace_dl.torch as grace  # noqa: E402
from common import check_methods_against_simulator, stage_params  # noqa: E402
from grace_dl.torch import HorovodTorchTransport  # noqa: E402


def say(msg: str) -> None:
    print(f"rank {hvd.rank()}: {msg}", flush=True)


def check_collectives() -> None:
    t = HorovodTorchTransport()
    r, n = t.rank, t.size
    for dtype in (torch.float32, torch.float16, torch.float64, torch.int32, torch.int64):
        buf = (torch.arange(5) + 10 * r).to(dtype)
        got = t.wait(t.allreduce_async(buf, f"ar.{dtype}"))
        want = sum((torch.arange(5) + 10 * q).to(dtype) for q in range(n))
        assert torch.equal(got, want), (dtype, got, want)
    # allgather with a different length on every rank, then with equal lengths
    got = t.wait(t.allgather_async(torch.full((r + 2,), r, dtype=torch.int32), "ag.var"))
    assert [g.tolist() for g in got] == [[q] * (q + 2) for q in range(n)], got
    got = t.wait(t.allgather_async(torch.full((3,), float(r)), "ag.eq", equal_sizes=True))
    assert [g.tolist() for g in got] == [[float(q)] * 3 for q in range(n)], got
    root = n - 1
    buf = torch.arange(4, dtype=torch.float32) * (r + 1)
    got = t.wait(t.broadcast_async(buf, root, "bc"))
    assert torch.equal(got, torch.arange(4, dtype=torch.float32) * (root + 1)), got
    say("collectives ok (allreduce 5 dtypes, allgather variable and equal sizes, broadcast)")


def train(compression, steps: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), compression=compression)
    gen = torch.Generator().manual_seed(hvd.rank())
    for _ in range(steps):
        x = torch.randn(8, 12, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def check_training() -> None:
    cases = {"hvd.Compression.none": hvd.Compression.none, "hvd.Compression.fp16": hvd.Compression.fp16}
    cases.update({name: getattr(grace, name)() for name in grace.list_methods()})
    # 1-bit Adam's compressed stage (the lr suits Adam's update as well as the gradients)
    cases.update({f"{name}/frozen": getattr(grace, name)(**stage_params(name))
                  for name in grace.list_methods() if stage_params(name)})
    start = train(hvd.Compression.none, steps=0)
    for label, compression in cases.items():
        params = train(compression)
        for i, p in enumerate(params):
            gathered = hvd.allgather(p.reshape(1, -1), name=f"check.{label}.{i}")
            assert torch.equal(gathered[0], gathered[1]), f"{label}: parameters differ across ranks"
        assert any(not torch.equal(a, b) for a, b in zip(params, start)), f"{label}: training did not move"
    say(f"training ok: {len(cases)} compressions leave identical parameters on every rank")


def check_handshake() -> None:
    """Ranks configured differently fail at the first step on every rank, naming the tensor
    and the field, instead of an index error on one rank, a hang or silent divergence."""
    import time

    from grace_dl.handshake import HandshakeError

    rank = hvd.rank()
    cases = [  # (label, this rank's compression, the field named)
        ("topk vs qsgd", grace.topk(ratio=0.1) if rank == 0 else grace.qsgd(), "compressor"),
        ("topk ratios", grace.topk(ratio=0.1 * (rank + 1)), "compressor"),
        ("powersgd ranks", grace.powersgd(rank=1 + rank), "compressor"),
        ("randomk seeds", grace.randomk(ratio=0.3, seed=rank), "seed"),
    ]
    slowest = 0.0
    for label, compression, field in cases:
        start = time.perf_counter()
        try:
            train(compression, steps=1)
        except HandshakeError as err:
            assert f"its {field} differs" in str(err), (label, err)
        else:
            raise AssertionError(f"{label}: accepted")
        # the refused step left Horovod's own (empty) allreduces of these parameter names
        # unsynchronised; let them finish before the next case posts the same names
        hvd.barrier()
        assert compression.grace.stats.tensors == 0, f"{label}: tensors were exchanged"
        slowest = max(slowest, time.perf_counter() - start)
        assert slowest < 60, label
    # a different model on one rank: the first tensor's shape differs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16 + rank), torch.nn.ReLU(), torch.nn.Linear(16 + rank, 3))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), compression=grace.topk())
    torch.nn.functional.cross_entropy(model(torch.randn(8, 12)), torch.randint(0, 3, (8,))).backward()
    try:
        opt.step()
    except HandshakeError as err:
        assert "its shape differs" in str(err), err
    else:
        raise AssertionError("a different model was accepted")
    say(f"handshake ok: {len(cases) + 1} mismatched configurations refused on every rank at the first step "
        f"(slowest {slowest:.2f} s)")


def check_bfloat16() -> None:
    """A bfloat16 model under stock hvd.DistributedOptimizer: Horovod has no bfloat16
    allreduce, so grace-dl hands it a float32 placeholder; the aggregated gradients are
    bfloat16 and bit-identical to the simulator fed every rank's gradients."""
    import copy

    import grace_dl

    rank, size = hvd.rank(), hvd.size()
    methods = ("topk", "qsgd", "efsignsgd", "powersgd", "dgc")
    for method in methods:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 3)).to(torch.bfloat16)
        reference = copy.deepcopy(model)  # local gradients, without Horovod's hooks
        compression = getattr(grace, method)()
        sim = grace_dl.LocalSimulator(compression.grace.fresh_copy(), size)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(), compression=compression)
        gen = torch.Generator().manual_seed(rank)
        for step in range(3):
            x = torch.randn(8, 12, generator=gen).to(torch.bfloat16)
            y = torch.randint(0, 3, (8,), generator=gen)
            reference.load_state_dict(model.state_dict())
            reference.zero_grad()
            torch.nn.functional.cross_entropy(reference(x).float(), y).backward()
            grads: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
            for name, p in reference.named_parameters():
                bits = hvd.allgather(p.grad.reshape(1, -1).view(torch.int16), name=f"bf16.{method}.{step}.{name}")
                for r in range(size):
                    grads[r][name] = bits[r].view(torch.bfloat16).reshape(p.shape)
            want = sim.step(grads)[rank]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x).float(), y).backward()
            opt.synchronize()
            for name, p in model.named_parameters():
                assert p.grad.dtype == torch.bfloat16, (method, name, p.grad.dtype)
                assert torch.equal(p.grad, want[name]), f"bfloat16 {method} step {step} {name}: differs from the simulator"
            with opt.skip_synchronize():
                opt.step()
    say(f"bfloat16 ok: {len(methods)} methods ({', '.join(methods)}), 3 steps of a bfloat16 model under stock "
        f"hvd.DistributedOptimizer bit-identical to the simulator")


def check_empty_parameters() -> None:
    """Zero-size parameters ((0,), (0, 5), (3, 0, 4)) beside a normal layer under stock
    hvd.DistributedOptimizer: the methods that crashed on them (efsignsgd, stc, sbc with
    ZeroDivisionError, adaptive_threshold with IndexError) pass them through empty, and
    the normal layer's gradients agree on every rank."""
    rank = hvd.rank()
    methods = ("efsignsgd", "stc", "sbc", "adaptive_threshold")
    for method in methods:
        torch.manual_seed(0)
        layer = torch.nn.Linear(6, 3)
        empties = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((0,), (0, 5), (3, 0, 4))]
        named = [("layer.weight", layer.weight), ("layer.bias", layer.bias)]
        named += [(f"empty{i}", p) for i, p in enumerate(empties)]
        opt = hvd.DistributedOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1), named_parameters=named,
                                       compression=getattr(grace, method)())
        gen = torch.Generator().manual_seed(rank)
        for step in range(3):
            opt.zero_grad()
            loss = layer(torch.randn(4, 6, generator=gen)).pow(2).mean() + sum(p.sum() for p in empties)
            loss.backward()
            opt.step()
            for (name, p), shape in zip(named[2:], ((0,), (0, 5), (3, 0, 4))):
                assert p.grad is not None and tuple(p.grad.shape) == shape, (method, name, p.grad)
        every = hvd.allgather(layer.weight.detach().reshape(1, -1), name=f"empty.{method}")
        assert torch.equal(every[0], every[1]), f"{method}: ranks differ beside zero-size parameters"
    say(f"empty ok: {len(methods)} methods ({', '.join(methods)}) with zero-size parameters (0,), (0, 5), "
        f"(3, 0, 4), 3 steps under stock hvd.DistributedOptimizer, identical parameters on every rank")


def check_fusion() -> None:
    """A model of many small tensors under stock hvd.DistributedOptimizer with fusion on:
    each rank's gradients and its method state and bytes are bit-identical to the
    simulator's with the same fusion (fed every rank's gradients in ready order)."""
    import copy

    import grace_dl

    rank, size = hvd.rank(), hvd.size()
    methods = {"topk": {"ratio": 0.3}, "qsgd": {}, "efsignsgd": {}, "powersgd": {"rank": 2}, "randomk": {"ratio": 0.3}}
    buckets = 0
    for method, kwargs in methods.items():
        torch.manual_seed(0)
        layers = []
        for width_in, width_out in ((12, 16), (16, 16), (16, 16)):
            layers += [torch.nn.Linear(width_in, width_out), torch.nn.LayerNorm(width_out), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(16, 3))  # 14 tensors, 10 of them vectors
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        reference = copy.deepcopy(model)
        compression = getattr(grace, method)(policies={"fusion_bytes": 1 << 20}, **kwargs)
        sim = grace_dl.LocalSimulator(compression.grace.fresh_copy(), size)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(), compression=compression)
        gen = torch.Generator().manual_seed(rank)
        for step in range(3):
            x = torch.randn(8, 12, generator=gen)
            y = torch.randint(0, 3, (8,), generator=gen)
            reference.load_state_dict(model.state_dict())
            reference.zero_grad()
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            grads: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
            for name, p in list(reference.named_parameters())[::-1]:  # ready order: the adapter's plan
                every = hvd.allgather(p.grad.reshape(1, -1), name=f"fusion.{method}.{step}.{name}")
                for r in range(size):
                    grads[r][name] = every[r].reshape(p.shape)
            want = sim.step(grads)[rank]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.synchronize()
            for name, p in model.named_parameters():
                assert torch.equal(p.grad, want[name]), f"fusion {method} step {step} {name}: differs from the simulator"
            with opt.skip_synchronize():
                opt.step()
        mine, simulated = compression.grace, sim.workers[rank]
        assert mine.steps == simulated.steps, (method, sorted(mine.steps), sorted(simulated.steps))
        assert mine.stats.per_tensor == simulated.stats.per_tensor, f"fusion {method}: bytes differ from the simulator"
        fused = [n for n in mine.steps if n.startswith("fused[")]
        assert fused, f"fusion {method}: nothing was fused"
        buckets += len(fused)
    say(f"fusion ok: {len(methods)} methods on a 14-tensor model, {buckets} buckets, 3 steps under stock "
        f"hvd.DistributedOptimizer bit-identical to the simulator (gradients, steps, bytes)")


def main() -> None:
    hvd.init()
    torch.set_num_threads(1)
    check_collectives()
    count = check_methods_against_simulator(
        hvd.rank(), hvd.size(), HorovodTorchTransport, lambda a: torch.from_numpy(a.copy()),
        lambda t: t.numpy())
    say(f"methods ok: {count} method/communicator cases bit-identical to the simulator")
    check_training()
    check_handshake()
    check_bfloat16()
    check_empty_parameters()
    check_fusion()
    say("ALL OK")


if __name__ == "__main__":
    main()
