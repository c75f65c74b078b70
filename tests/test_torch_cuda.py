"""The torch backend on CUDA: parity with NumPy and no host synchronisation in the
fixed-size paths. Skipped where no GPU is present (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest

import grace_dl
from grace_dl.ops.numpy_backend import NumpyOps

from helpers import make_ctx, normal

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

np_ops = NumpyOps()


def t_ops():
    from grace_dl.torch.ops import TorchOps

    return TorchOps()


@pytest.mark.parametrize("n", [1, 33, 1000, 1_000_003])
def test_primitives_on_cuda_match_numpy(n):
    ops = t_ops()
    x = normal(n, seed=n)
    x[: n // 2] = np.round(x[: n // 2], 1)  # ties
    tx = torch.from_numpy(x).cuda()
    k = max(1, n // 100)
    assert np.array_equal(np_ops.topk_indices(np.abs(x), k), ops.topk_indices(tx.abs(), k).cpu().numpy())
    mask = x > 0
    assert np.array_equal(np_ops.pack_bits(mask), ops.pack_bits(torch.from_numpy(mask).cuda()).cpu().numpy())
    v = (np.arange(n) % 255).astype(np.int64)
    assert np.array_equal(np_ops.pack_uint(v, 8), ops.pack_uint(torch.from_numpy(v).cuda(), 8).cpu().numpy())


@pytest.mark.parametrize("method", grace_dl.list_methods())
def test_payloads_on_cuda(method):
    ops = t_ops()
    comp = grace_dl.make(method).compressor
    n = 100_003
    x = normal(n, seed=1)
    ctx = make_ctx(n)
    gpu = comp.compress(ops, torch.from_numpy(x).cuda(), ctx)
    assert gpu.buffer.is_cuda
    out = comp.decompress(ops, gpu.buffer, ctx)
    assert out.is_cuda and out.shape == (n,)
    assert gpu.nbytes == comp.payload_nbytes(n, "float32", "float32")
    if comp.deterministic:
        cpu = comp.compress(np_ops, x, ctx)
        assert cpu.buffer.tobytes() == gpu.buffer.cpu().numpy().tobytes()


@pytest.mark.parametrize("method", grace_dl.list_methods())
def test_fixed_size_paths_never_sync_with_the_host(method):
    ops = t_ops()
    comp = grace_dl.make(method).compressor
    if comp.payload_nbytes(1000, "float32", "float32") is None:
        pytest.skip("data-dependent payload size needs the count on the host")
    n = 1 << 20
    x = torch.randn(n, device="cuda")
    ctx = make_ctx(n)
    grace = grace_dl.make(method)
    comp.decompress(ops, comp.compress(ops, x, ctx).buffer, ctx)  # warm-up (allocations, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        payload = comp.compress(ops, x, ctx)
        transmitted = comp.decompress(ops, payload.buffer, ctx)
        compensated = grace.memory.compensate(ops, x, ctx)
        grace.memory.update(ops, compensated, transmitted, ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_simulator_on_cuda_matches_cpu():
    grads = [{"w": normal(5000, seed=r)} for r in range(3)]
    for method in grace_dl.list_methods():
        cpu = grace_dl.LocalSimulator(grace_dl.make(method), 3)
        gpu = grace_dl.LocalSimulator(grace_dl.make(method), 3)
        a = cpu.step([{k: torch.from_numpy(v) for k, v in g.items()} for g in grads])
        b = gpu.step([{k: torch.from_numpy(v).cuda() for k, v in g.items()} for g in grads])
        assert b[0]["w"].is_cuda
        comp = cpu.workers[0].compressor
        if comp.deterministic and not comp.summable:
            assert torch.equal(a[0]["w"], b[0]["w"].cpu()), method
        elif comp.deterministic:
            # summable payloads are added in their wire dtype by each device's kernels;
            # float16 sums of 3 workers may differ by one float16 ulp between CPU and GPU
            tol = 3 * 2.0**-10 * float(a[0]["w"].abs().max())
            assert float((a[0]["w"] - b[0]["w"].cpu()).abs().max()) <= tol, method
