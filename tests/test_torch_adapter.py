"""The torch adapters in one process: the optimizer's state_dict hooks, the
torch.distributed transport and DDP hook on a one-process Gloo group, and their errors.
The two-process checks are in tests/multirank/ (hvd_torch_training.py, ddp_checks.py)."""

from __future__ import annotations

import copy
import gc
import io
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import grace_dl  # noqa: E402
import grace_dl.torch as grace  # noqa: E402
from grace_dl.torch import horovod as adapter  # noqa: E402


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def populate(compression: grace.HorovodCompression, model: torch.nn.Module, steps: int = 2) -> None:
    """Give the method state (residuals, step counters) as a one-worker run would."""
    compression.grace.bind(grace_dl.LocalWorld(1).transports[0])
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for name, p in model.named_parameters():
            compression.grace.step(torch.randn(p.shape, generator=gen), name)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"]
    assert a["memory"].keys() == b["memory"].keys()
    for name in a["memory"]:
        for key, value in a["memory"][name].items():
            other = b["memory"][name][key]
            assert value.dtype == other.dtype and np.array_equal(value, other), (name, key)


def with_state_hooks(model: torch.nn.Module, compression: grace.HorovodCompression) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adapter._attach_state(opt, compression)
    return opt


def test_state_dict_carries_method_state_and_loads_back():
    model = mlp()
    compression = grace.topk(ratio=0.3)
    populate(compression, model)
    opt = with_state_hooks(model, compression)
    saved = opt.state_dict()
    state = saved["param_groups"][0][adapter.STATE_KEY]
    assert state["steps"] == {n: 2 for n, _ in model.named_parameters()}
    assert isinstance(state["memory"]["0.weight"]["residual"], torch.Tensor)
    assert adapter.STATE_KEY not in opt.param_groups[0], "state_dict() must not leave the state in the live group"

    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)  # only tensors, ints and strings inside
    fresh = grace.topk(ratio=0.3)
    opt2 = with_state_hooks(mlp(1), fresh)
    opt2.load_state_dict(checkpoint)
    assert_same_state(compression.state_dict(), fresh.state_dict())
    assert adapter.STATE_KEY in checkpoint["param_groups"][0], "load_state_dict must not change its argument"
    assert adapter.STATE_KEY not in opt2.param_groups[0]
    # the saved arrays are copies: more steps of the original do not change the checkpoint
    residual = state["memory"]["0.weight"]["residual"].clone()
    populate(compression, model, steps=1)
    assert torch.equal(state["memory"]["0.weight"]["residual"], residual)


def test_broadcast_state_in_live_group_is_absorbed():
    # hvd.broadcast_optimizer_state assigns the root's group options to the live groups
    model = mlp()
    root = grace.efsignsgd()
    populate(root, model)
    root_state = with_state_hooks(model, root).state_dict()["param_groups"][0][adapter.STATE_KEY]
    mine = grace.efsignsgd()
    opt = with_state_hooks(mlp(), mine)
    opt.param_groups[0][adapter.STATE_KEY] = copy.deepcopy(root_state)
    after = opt.state_dict()  # absorbs first, then saves
    assert adapter.STATE_KEY not in opt.param_groups[0]
    assert_same_state(root.state_dict(), mine.state_dict())
    assert after["param_groups"][0][adapter.STATE_KEY]["steps"] == root_state["steps"]


def test_compression_outside_horovod_names_the_problem():
    with pytest.raises(RuntimeError, match="outside horovod.torch.DistributedOptimizer"):
        grace.topk().compress(torch.zeros(3))


def test_as_compression():
    g = grace_dl.topk(ratio=0.1)
    assert adapter.as_compression(g).grace is g
    c = grace.qsgd()
    assert adapter.as_compression(c) is c
    with pytest.raises(TypeError, match="compression must be"):
        adapter.as_compression("topk")


def test_explicit_optimizer_single_worker():
    hvd = pytest.importorskip("horovod.torch")
    hvd.init()
    model = mlp()
    compression = grace.topk(ratio=0.3)
    opt = grace.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters(), compression=compression)
    assert adapter.STATE_KEY in opt.state_dict()["param_groups"][0]
    with pytest.raises(ValueError, match="Adasum"):
        grace.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), compression=compression,
                                   op=hvd.Adasum)
    plain = grace.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), compression=None)
    assert adapter.STATE_KEY not in plain.state_dict()["param_groups"][0]


# -- torch.distributed in one process --------------------------------------------------------
def test_transport_needs_init():  # before the fixture below initialises a group
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        grace.TorchDistributedTransport()


@pytest.fixture(scope="module")
def gloo_group():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with Gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    # DDP modules of the tests sit in reference cycles: collected before the group goes, since
    # a reducer torn down at interpreter exit after it can abort the process (torch 2.13)
    gc.collect()
    dist.destroy_process_group()


def test_transport_one_worker(gloo_group):
    t = grace.TorchDistributedTransport()
    assert (t.rank, t.size) == (0, 1)
    buf = torch.arange(4, dtype=torch.float32)
    assert torch.equal(t.wait(t.allreduce_async(buf, "a")), buf)
    got = t.wait(t.allgather_async(torch.arange(3, dtype=torch.int32), "g"))
    assert len(got) == 1 and torch.equal(got[0], torch.arange(3, dtype=torch.int32))
    assert torch.equal(t.wait(t.broadcast_async(buf, 0, "b")), buf)
    with pytest.raises(ValueError, match="root"):
        t.broadcast_async(buf, 1, "b")


@pytest.mark.parametrize("method", ["topk", "qsgd", "efsignsgd", "fp16"])
def test_ddp_hook_one_worker_matches_simulator(gloo_group, method):
    kwargs = {"ratio": 0.3} if method == "topk" else {}
    local = mlp()
    reference = copy.deepcopy(local)
    model = torch.nn.parallel.DistributedDataParallel(local)
    hook = grace.ddp_hook(getattr(grace, method)(**kwargs))
    model.register_comm_hook(None, hook)
    sim = grace_dl.LocalSimulator(getattr(grace_dl, method)(**kwargs), 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        names = [hook.name_of(p) for p in local.parameters()]
        out = sim.step([{n: p.grad for n, p in zip(names, reference.parameters())}])[0]
        for n, p in zip(names, reference.parameters()):
            p.grad = out[n]
        ref_opt.step()
    for a, b in zip(local.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert sorted(hook.grace.steps) == [f"param{k}" for k in range(4)]
    assert set(hook.grace.steps.values()) == {3}


def _fused_reference_run(train_step, method, fusion: int, steps: int = 3):
    """Train mlp() with ``train_step(model, x, y)`` and, alongside, a reference
    whose gradients go through the simulator (one worker, the same fusion, gradients in
    reversed parameter order: the ready order the adapters plan from); returns both."""
    local, reference = mlp(), mlp()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    sim = grace_dl.LocalSimulator(method(fusion).grace, 1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
        train_step(local, x, y)
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        named = list(reference.named_parameters())[::-1]
        out = sim.step([{n: p.grad for n, p in named}])[0]
        for n, p in named:
            p.grad = out[n]
        ref_opt.step()
    return local, reference, sim


@pytest.mark.parametrize("fusion", [0, 1 << 20])
def test_ddp_hook_fused_matches_the_fused_simulator(gloo_group, fusion):
    method = lambda f: grace.topk(ratio=0.3, policies={"fusion_bytes": f})  # noqa: E731
    state = {}

    def train_step(local, x, y):
        if "model" not in state:
            model = torch.nn.parallel.DistributedDataParallel(local)
            state["hook"] = grace.ddp_hook(method(fusion), named_parameters=local.named_parameters())
            model.register_comm_hook(None, state["hook"])
            state["model"], state["opt"] = model, torch.optim.SGD(model.parameters(), lr=0.1)
        state["opt"].zero_grad()
        F.cross_entropy(state["model"](x), y).backward()
        state["opt"].step()

    local, reference, sim = _fused_reference_run(train_step, method, fusion)
    for a, b in zip(local.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    steps = state["hook"].grace.steps
    assert steps == sim.workers[0].steps
    assert len(steps) == (1 if fusion else 4) and set(steps.values()) == {3}


def test_ddp_hook_errors(gloo_group):
    with pytest.raises(TypeError, match="grace-dl method"):
        grace.ddp_hook("topk")
    hook = grace.ddp_hook(grace.topk(), named_parameters=mlp().named_parameters())
    with pytest.raises(KeyError, match="named_parameters"):
        hook.name_of(torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(TypeError, match="process group"):
        hook._group(object())


def test_ddp_hook_refuses_a_method_object_of_another_live_hook(gloo_group):
    import gc

    method = grace.topk(ratio=0.3)
    first = grace.ddp_hook(method)
    with pytest.raises(ValueError, match="already serves another DDP comm hook.*fresh_copy"):
        grace.ddp_hook(method)
    grace.ddp_hook(method.fresh_copy())  # a copy is another object
    del first  # a freed hook releases its method
    gc.collect()
    grace.ddp_hook(method)


def test_ddp_hook_checks_the_optimizer_momentum(gloo_group):
    model = mlp()
    hook = grace.ddp_hook(grace.dgc(ratio=0.1))
    with pytest.raises(ValueError, match="momentum would be applied twice"):
        hook.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    hook.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))  # no momentum: fine
    grace.ddp_hook(grace.topk(ratio=0.1)).check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def test_horovod_shape_mismatch_against_the_placeholder_is_explained():
    from grace_dl.torch.checks import CompressionMismatchError, explain_mixed_compression

    class Optimizer:
        def __init__(self, message):
            self.message = message

        def synchronize(self):
            raise RuntimeError(self.message)

    mixed = Optimizer("Mismatched ALLREDUCE tensor shapes: One rank sent a tensor of shape [0], but another "
                      "rank sent a tensor of shape [3].")
    explain_mixed_compression(mixed)
    explain_mixed_compression(mixed)  # idempotent: wrapped once
    with pytest.raises(CompressionMismatchError, match=r"shape \[0\] is grace-dl's placeholder.*same compression="):
        mixed.synchronize()
    other = Optimizer("Mismatched ALLREDUCE tensor shapes: One rank sent a tensor of shape [2], but another "
                      "rank sent a tensor of shape [3].")
    explain_mixed_compression(other)
    with pytest.raises(RuntimeError) as caught:  # not about the placeholder: Horovod's own error
        other.synchronize()
    assert type(caught.value) is RuntimeError


# -- one method object, one optimizer ----------------------------------------------------------
class _FakeOptimizer:
    pass


def test_claim_method_refuses_a_second_live_optimizer():
    method = grace_dl.topk(ratio=0.3)
    first, second = _FakeOptimizer(), _FakeOptimizer()
    adapter.claim_method(method, first)
    adapter.claim_method(method, first)  # the same optimizer again: its every step
    with pytest.raises(ValueError, match=r"already serves another optimizer \(_FakeOptimizer\).*fresh_copy"):
        adapter.claim_method(method, second)
    with pytest.raises(ValueError, match="already serves"):
        adapter.claim_method(method, None)
    adapter.claim_method(method.fresh_copy(), second)  # a copy is another object
    del first  # a freed optimizer releases its method
    import gc

    gc.collect()
    adapter.claim_method(method, second)


def _two_step(opt: torch.optim.Optimizer, model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 6, generator=gen)), torch.randint(0, 3, (4,), generator=gen)).backward()
    opt.step()


def test_one_compression_two_optimizers_is_refused():
    hvd = pytest.importorskip("horovod.torch")
    hvd.init()
    a, b = mlp(0), mlp(1)  # the same parameter names
    compression = grace.topk(ratio=0.3)
    # the explicit form: at construction
    opt_a = grace.DistributedOptimizer(torch.optim.SGD(a.parameters(), lr=0.1),
                                       named_parameters=a.named_parameters(), compression=compression)
    with pytest.raises(ValueError, match="already serves another optimizer.*fresh_copy"):
        grace.DistributedOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), named_parameters=b.named_parameters(),
                                   compression=compression)
    _two_step(opt_a, a, 0)
    # stock hvd.DistributedOptimizer: at the first step of the second optimizer (Horovod
    # calls compress only with more than one worker, so its call is imitated here)
    shared = grace.topk(ratio=0.3)
    stock_a, stock_b = _HorovodLike(a, shared), _HorovodLike(b, shared)
    stock_a.step(0)
    with pytest.raises(ValueError, match="already serves another optimizer.*fresh_copy"):
        stock_b.step(0)
    assert set(shared.grace.steps.values()) == {1}, "the refused step must not advance the counters"
    # the remedy: a fresh copy per optimizer keeps the states apart
    own = shared.fresh_copy()
    assert isinstance(own, grace.HorovodCompression) and own.grace is not shared.grace and not own.grace.steps
    _HorovodLike(b, own).step(0)
    assert set(own.grace.steps.values()) == {1} and set(shared.grace.steps.values()) == {1}


class _HorovodLike:
    """What stock Horovod's optimizer does with a compression, in the frame shape that
    grace-dl reads the tensor's name from (``self._parameter_names[p]``)."""

    def __init__(self, model: torch.nn.Module, compression: grace.HorovodCompression):
        self.model = model
        self._parameter_names = {p: n for n, p in model.named_parameters()}
        self._compression = compression
        self.param_groups = [{"momentum": 0.0}]

    def _allreduce_grad_async(self, p: torch.Tensor):
        return self._compression.compress(p.grad)

    def step(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.model.zero_grad()
        F.cross_entropy(self.model(torch.randn(4, 6, generator=gen)),
                        torch.randint(0, 3, (4,), generator=gen)).backward()
        for p in self.model.parameters():
            placeholder, ctx = self._allreduce_grad_async(p)
            p.grad.set_(self._compression.decompress(placeholder, ctx))


def test_bfloat16_placeholder_is_one_horovod_accepts():
    grad = torch.ones(5, dtype=torch.bfloat16)
    placeholder = adapter.placeholder_for(grad)
    assert placeholder.numel() == 0 and placeholder.dtype == torch.float32
    assert adapter.placeholder_for(torch.ones(3, dtype=torch.float16)).dtype == torch.float16
    # through the compression: a bfloat16 model gets bfloat16 gradients back
    hvd = pytest.importorskip("horovod.torch")
    hvd.init()
    model = mlp().to(torch.bfloat16)
    model(torch.ones(2, 6, dtype=torch.bfloat16)).sum().backward()
    compression = grace.topk(ratio=0.3)
    like = _HorovodLike(model, compression)
    for p in model.parameters():
        placeholder, ctx = like._allreduce_grad_async(p)
        assert placeholder.dtype == torch.float32
        out = compression.decompress(placeholder, ctx)
        assert out.dtype == torch.bfloat16 and out.shape == p.shape


# -- the background thread ---------------------------------------------------------------------
def _step_like_horovod(like: _HorovodLike, seed: int) -> None:
    """Horovod's order: every gradient handed over during backward, then synchronize()."""
    gen = torch.Generator().manual_seed(seed)
    like.model.zero_grad()
    F.cross_entropy(like.model(torch.randn(4, 6, generator=gen)),
                    torch.randint(0, 3, (4,), generator=gen)).backward()
    params = list(like.model.parameters())[::-1]  # the order the hooks fire in
    started = [(p, like._allreduce_grad_async(p)) for p in params]
    for p, (placeholder, ctx) in started:
        p.grad.set_(like._compression.decompress(placeholder, ctx))


@pytest.mark.parametrize("name,kwargs", [("topk", {"ratio": 0.3}), ("powersgd", {"rank": 1}),
                                         ("efsignsgd", {})])
def test_background_thread_gives_the_hook_pipelines_results(name, kwargs):
    hvd = pytest.importorskip("horovod.torch")
    hvd.init()
    # a bucket of three tensors (140 bytes) and 0.weight (192 bytes) alone
    kwargs = dict(kwargs, policies={"fusion_bytes": 256})
    runs = {}
    for background in (False, True):
        compression = getattr(grace, name)(**kwargs)
        compression.background = background
        model = mlp()
        like = _HorovodLike(model, compression)
        like.param_groups[0]["params"] = list(model.parameters())  # the fusion plan's input
        grads = []
        for step in range(3):
            _step_like_horovod(like, step)
            grads.append([p.grad.clone() for p in model.parameters()])
        assert (compression._worker is not None) == background
        runs[background] = grads, compression.state_dict()
    (sync_grads, sync_state), (bg_grads, bg_state) = runs[False], runs[True]
    for a, b in zip(sync_grads, bg_grads):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert_same_state(sync_state, bg_state)
    assert any(n.startswith("fused[") for n in bg_state["steps"]), "nothing was fused"


def test_background_thread_uses_the_training_threads_torch_thread_count():
    # torch.set_num_threads on the training thread does not reach a new thread's BLAS
    # (OpenMP's per-thread setting): PowerSGD's products on the compression thread ran on
    # every core. The thread must apply torch's count to itself
    import ctypes
    import os

    hvd = pytest.importorskip("horovod.torch")
    hvd.init()
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if not os.path.exists(path):
        pytest.skip("torch is not built with GNU OpenMP here")
    omp_max_threads = ctypes.CDLL(path).omp_get_max_threads
    if os.cpu_count() < 2:
        pytest.skip("one core: every thread's default is one thread")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        compression = grace.topk(ratio=0.3)
        like = _HorovodLike(mlp(), compression)
        _step_like_horovod(like, 0)
        assert compression._worker.call(omp_max_threads) == 1
        torch.set_num_threads(2)  # a later change reaches the thread too
        assert compression._worker.call(omp_max_threads) == 2
    finally:
        torch.set_num_threads(before)


def test_background_thread_error_is_raised_on_the_training_thread():
    hvd = pytest.importorskip("horovod.torch")
    hvd.init()
    compression = grace.topk(ratio=0.3)
    assert compression.background, "the default (DEFAULT_BACKGROUND)"
    like = _HorovodLike(mlp(), compression)
    _step_like_horovod(like, 0)
    compressor = compression.grace.compressor
    original = compressor.compress

    def failing(ops, x, ctx):
        if ctx.name == "0.bias":
            raise FloatingPointError("boom in 0.bias")
        return original(ops, x, ctx)

    compressor.compress = failing
    with pytest.raises(FloatingPointError, match="boom in 0.bias"):
        _step_like_horovod(like, 1)
    assert compression._worker._thread.is_alive()
    # the thread goes on: the next step completes (nothing hangs on the failed step)
    del compressor.compress
    _step_like_horovod(like, 2)
    assert compression.grace.steps["2.weight"] == 3


# -- no placeholder allreduce after the first step ----------------------------------------------
def _step_like_horovod_hooks(opt, model: torch.nn.Module, seed: int) -> None:
    """A step of a real ``hvd.DistributedOptimizer`` as its gradient hooks drive it with
    several workers (with one, Horovod registers no hooks): ``_allreduce_grad_async`` per
    gradient in hook order, then ``step()`` (``synchronize()``)."""
    gen = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 6, generator=gen)), torch.randint(0, 3, (4,), generator=gen)).backward()
    for p in list(model.parameters())[::-1]:
        opt._handles[p] = opt._allreduce_grad_async(p)
    opt.step()


@pytest.mark.parametrize("spelling", ["grace.DistributedOptimizer", "hvd.DistributedOptimizer"])
@pytest.mark.parametrize("background", [False, True])
def test_horovod_placeholder_allreduces_stop_after_the_first_step(monkeypatch, spelling, background):
    hvd = pytest.importorskip("horovod.torch")
    import horovod.torch.optimizer as horovod_optimizer

    hvd.init()
    posted: list[str] = []
    stock_allreduce = horovod_optimizer.allreduce_async_

    def counting_allreduce(tensor, *args, **kwargs):
        posted.append(kwargs["name"])
        return stock_allreduce(tensor, *args, **kwargs)

    monkeypatch.setattr(horovod_optimizer, "allreduce_async_", counting_allreduce)
    factory = grace.DistributedOptimizer if spelling == "grace.DistributedOptimizer" else hvd.DistributedOptimizer
    runs = {}
    for skip in (False, True):  # the reference (not skipping) allreduces the placeholders at every step
        compression = grace.powersgd(rank=1, policies={"fusion_bytes": 256})
        compression.background = background
        compression.placeholder_allreduce = not skip
        assert compression.fresh_copy().placeholder_allreduce is (not skip)
        model = mlp()
        opt = factory(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
                      compression=compression)
        counts, weights = [], []
        for step in range(3):
            before = len(posted)
            _step_like_horovod_hooks(opt, model, step)
            counts.append(len(posted) - before)
            weights.append([p.detach().clone() for p in model.parameters()])
        runs[skip] = counts, weights, compression.state_dict()
    tensors = len(list(mlp().parameters()))
    assert runs[False][0] == [tensors] * 3
    # the first step still allreduces them (a worker with another compression= then gets
    # Horovod's shape error), later ones none
    assert runs[True][0] == [tensors, 0, 0]
    for a, b in zip(runs[False][1], runs[True][1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert_same_state(runs[False][2], runs[True][2])


def test_skip_placeholder_allreduces_leaves_other_optimizers_alone():
    pytest.importorskip("horovod.torch")
    like = _HorovodLike(mlp(), grace.topk(ratio=0.3))
    assert not adapter.skip_placeholder_allreduces(like)
    assert "_allreduce_grad_async" not in vars(like)


# -- one Horovod allreduce per round ------------------------------------------------------------
@pytest.mark.parametrize("background", [False, True])
def test_round_batching_posts_one_allreduce_per_round_with_the_same_results(monkeypatch, background):
    hvd = pytest.importorskip("horovod.torch")
    hvd.init()
    posted: list[str] = []
    stock_allreduce = hvd.allreduce_async

    def counting_allreduce(tensor, *args, **kwargs):
        posted.append(kwargs["name"])
        return stock_allreduce(tensor, *args, **kwargs)

    monkeypatch.setattr(hvd, "allreduce_async", counting_allreduce)
    runs = {}
    # 0: one allreduce per pipeline and round (the reference); 150 bytes: two groups (the
    # biases' bucket, 44 bytes, with 2.weight, 96, then 0.weight, 192); the default: the whole step
    for batch_bytes in (0, 150, None):
        compression = grace.powersgd(rank=1, policies={"fusion_bytes": 256})
        if batch_bytes is not None:
            compression.round_batch_bytes = batch_bytes
        compression.background = background
        assert compression.fresh_copy().round_batch_bytes == compression.round_batch_bytes
        model = mlp()
        opt = grace.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         named_parameters=model.named_parameters(), compression=compression)
        counts, weights = [], []
        for step in range(3):
            before = len(posted)
            _step_like_horovod_hooks(opt, model, step)
            counts.append(len(posted) - before)
            weights.append([p.detach().clone() for p in model.parameters()])
        runs[batch_bytes] = counts, weights, compression.state_dict(), compression.grace.stats.sent
    # switched between steps, it takes effect at the next one
    for batch_bytes, allreduces in ((0, 5), (150, 4), (compression.round_batch_bytes, 2)):
        compression.round_batch_bytes = batch_bytes
        before = len(posted)
        _step_like_horovod_hooks(opt, model, 3)
        assert len(posted) - before == allreduces, batch_bytes
    # two low-rank matrices (a P and a Q round each) and one fused bucket of the biases (one
    # round): five allreduces per step alone, two batched (P with the bucket, then Q)
    assert runs[0][0][1:] == [5, 5]
    assert runs[None][0][1:] == [2, 2]
    assert runs[150][0][1:] == [4, 4]
    for batch_bytes in (150, None):
        for a, b in zip(runs[0][1], runs[batch_bytes][1]):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), batch_bytes
        assert_same_state(runs[0][2], runs[batch_bytes][2])
        assert runs[0][3] == runs[batch_bytes][3], "bytes are counted per collective the method asked for"


def test_round_batch_bytes_is_checked():
    with pytest.raises(ValueError, match="round_batch_bytes must be an int >= 0"):
        grace.HorovodCompression(grace.powersgd(rank=1).grace, round_batch_bytes=-1)


@pytest.mark.parametrize("background", [False, True])
def test_round_batching_raises_a_pipelines_error_without_waiting_for_it(background):
    hvd = pytest.importorskip("horovod.torch")
    hvd.init()
    compression = grace.powersgd(rank=1)
    compression.background = background
    model = mlp()
    opt = grace.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters(), compression=compression)
    _step_like_horovod_hooks(opt, model, 0)
    assert compression._batcher is not None
    compressor = compression.grace.compressor
    original = compressor.compress_rounds

    def failing(ops, x, ctx):  # 0.weight's gradient comes last: the others' batch waits for it
        if ctx.name == "0.weight":
            raise FloatingPointError("boom in 0.weight")
        return original(ops, x, ctx)

    compressor.compress_rounds = failing
    with pytest.raises(FloatingPointError, match="boom in 0.weight"):
        _step_like_horovod_hooks(opt, model, 1)
    del compressor.compress_rounds
    opt._handles.clear()  # Horovod's own record of the failed step
    _step_like_horovod_hooks(opt, model, 2)  # the next step batches again and completes
    assert not compression._batcher.broken and compression.grace.steps["2.weight"] == 3


def test_a_failed_steps_collectives_are_waited_for_before_the_next_step_posts(monkeypatch):
    """Horovod refuses a collective named like one in progress: the next step waits for what
    the failed step posted (and says so when the other workers never match it)."""
    hvd = pytest.importorskip("horovod.torch")
    import grace_dl.torch.horovod as adapter

    hvd.init()
    compression = grace.powersgd(rank=1)
    compression.background = False
    model = mlp()
    opt = grace.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters(), compression=compression)
    _step_like_horovod_hooks(opt, model, 0)
    compressor = compression.grace.compressor
    original = compressor.compress_rounds

    def failing(ops, x, ctx):
        if ctx.name == "0.weight":
            raise FloatingPointError("boom in 0.weight")
        return original(ops, x, ctx)

    compressor.compress_rounds = failing
    with pytest.raises(FloatingPointError, match="boom in 0.weight"):
        _step_like_horovod_hooks(opt, model, 1)
    del compressor.compress_rounds
    opt._handles.clear()
    abandoned = list(compression._abandoned)
    assert abandoned, "the failed step had posted 2.weight's P alone; it is kept to be waited for"
    transport = compression.grace.transport
    monkeypatch.setattr(adapter, "_ABANDONED_WAIT_S", 0.05)
    monkeypatch.setattr(transport, "ready", lambda handle: False)  # as if no other worker ever posts them
    with pytest.raises(RuntimeError, match=r"collective\(s\) posted by a step whose compression failed"):
        _step_like_horovod_hooks(opt, model, 2)
