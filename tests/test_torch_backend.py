"""The torch ops backend against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

import grace_dl
from grace_dl.ops.numpy_backend import NumpyOps

from helpers import make_ctx, normal

torch = pytest.importorskip("torch")
from grace_dl.torch.ops import TorchOps  # noqa: E402

np_ops, t_ops = NumpyOps(), TorchOps()
SIZES = [1, 7, 32, 33, 100, 1000]


def same_bytes(a: np.ndarray, b) -> bool:
    b = t_ops.to_numpy(b) if isinstance(b, torch.Tensor) else b  # bfloat16 too
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("n", SIZES)
def test_primitives_match_numpy(n):
    x = normal(n, seed=n)
    x[: n // 2] = np.round(x[: n // 2], 1)  # plant ties in magnitude
    tx = torch.from_numpy(x.copy())
    mask = x > 0
    tmask = torch.from_numpy(mask)
    k = max(1, n // 3)
    assert same_bytes(np_ops.topk_indices(np.abs(x), k), t_ops.topk_indices(tx.abs(), k))
    assert same_bytes(np_ops.pack_bits(mask), t_ops.pack_bits(tmask))
    words = np_ops.pack_bits(mask)
    assert same_bytes(np_ops.unpack_bits(words, n), t_ops.unpack_bits(torch.from_numpy(words), n))
    v = (np.arange(n) % 13).astype(np.int64)
    assert same_bytes(np_ops.uint_to_bits(v, 4), t_ops.uint_to_bits(torch.from_numpy(v), 4))
    bits = np_ops.uint_to_bits(v, 4)
    assert same_bytes(np_ops.bits_to_uint(bits, 4), t_ops.bits_to_uint(torch.from_numpy(bits), 4))
    for b in (1, 3, 4, 8, 16):
        vb = (np.arange(n) * 7919 % (2**b)).astype(np.int64)
        words = np_ops.pack_uint(vb, b)
        assert same_bytes(words, t_ops.pack_uint(torch.from_numpy(vb), b))
        assert same_bytes(np_ops.unpack_uint(words, n, b), t_ops.unpack_uint(torch.from_numpy(words), n, b))
    for dtype in ("float16", "float32", "float64"):
        y = x.astype(dtype)
        if dtype == "float16" and n % 2:
            y = y[:-1]
        assert same_bytes(np_ops.bitcast(y, "int32"), t_ops.bitcast(torch.from_numpy(y), "int32"))
    idx = np_ops.topk_indices(np.abs(x), k)
    assert same_bytes(np_ops.scatter(n, idx, x[idx]), t_ops.scatter(n, torch.from_numpy(idx), tx[idx]))


@pytest.mark.parametrize("name", [m for m in grace_dl.list_methods() if grace_dl.make(m).compressor.deterministic])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", SIZES)
def test_deterministic_payloads_are_bit_identical_to_numpy(name, dtype, n):
    comp = grace_dl.make(name).compressor
    x = normal(n, seed=n, dtype=dtype)
    ctx, t_ctx = make_ctx(n, dtype=dtype), make_ctx(n, dtype=dtype)  # one pipeline each
    a = comp.compress(np_ops, x, ctx)
    b = comp.compress(t_ops, torch.from_numpy(x.copy()), t_ctx)
    out_a, out_b = comp.decompress(np_ops, a.buffer, ctx), comp.decompress(t_ops, b.buffer, t_ctx)
    assert a.nbytes == b.nbytes
    if comp.exact_across_backends:
        assert same_bytes(a.buffer, b.buffer) and same_bytes(out_a, out_b)
    else:  # framework kernels (matmul) add in their own order: equal to rounding
        assert np.allclose(out_b.numpy(), out_a, rtol=1e-5, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kth_largest_is_numpys_and_torchs_kthvalue(dtype):
    rng = np.random.default_rng(9)
    for n, zeros, special in [(1, 0, False), (100, 0, False), (5000, 0.9, False), (5000, 0.1, True)]:
        x = rng.standard_normal(n).astype(dtype)
        x[rng.random(n) < zeros] = 0
        x[: n // 10] = np.round(x[: n // 10])  # ties
        if special:
            x[[3, 7, 11]] = [np.nan, np.inf, -np.inf]
        t = torch.from_numpy(x.copy())
        for k in sorted(k for k in {1, 2, n // 3, n // 2, n - 1, n} if 1 <= k <= n):
            got = t_ops.kth_largest(t, k)
            assert got.dim() == 0 and got.dtype == t.dtype
            assert same_bytes(np.asarray(np_ops.kth_largest(x, k)), got.reshape(()).numpy().copy())
            if not special:  # torch's own kthvalue, as the CPU path used before
                assert float(got) == float(torch.kthvalue(t, n - k + 1).values)


def test_float64_narrowing_rounds_once_like_numpy():
    # values just above a float16 rounding midpoint: rounding via float32 lands on the
    # midpoint and then rounds to even, NumPy rounds once and goes up
    x = np.array([1 + 2**-11 + 2**-40, -(1 + 2**-11 + 2**-40), 1 + 2**-11, 1e300, -1e-300, np.nan],
                 dtype=np.float64)
    x = np.concatenate([x, np.random.default_rng(0).standard_normal(10000) * 1e3])
    for dtype in ("float16", "bfloat16"):
        want = np_ops.cast(x, dtype)
        got = t_ops.to_numpy(t_ops.cast(torch.from_numpy(x), dtype))
        if dtype == "float16":
            assert same_bytes(want, got)
        else:  # ml_dtypes itself narrows via float32: agree on everything but midpoints
            assert np.array_equal(np.isnan(want.astype(np.float32)), np.isnan(got.astype(np.float32)))


def test_topk_indices_with_nan_still_returns_k():
    x = np.array([0.5, np.nan, 2.0, -3.0, np.nan, 0.1], dtype=np.float32)
    for backend, arr in ((np_ops, x), (t_ops, torch.from_numpy(x))):
        idx = backend.topk_indices(backend.abs(arr), 3)
        assert list(np.asarray(t_ops.to_numpy(idx) if backend is t_ops else idx)) == [1, 3, 4]


def test_cpu_random_uniform_draws_numpys_values():
    # CPU tensors take NumPy's draws (zero copy): random methods agree bit for bit across
    # NumPy and torch CPU; CUDA tensors keep torch's own generator
    from grace_dl.ops.numpy_backend import NumpyOps

    got = t_ops.random_uniform(1001, 2**64 - 3, 9, torch.zeros(1))
    assert got.dtype == torch.float32
    assert got.numpy().tobytes() == NumpyOps().random_uniform(1001, 2**64 - 3, 9, None).tobytes()


def test_random_draws_never_touch_the_global_torch_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a = t_ops.random_uniform(100, 5, 1, torch.zeros(1))
    c = t_ops.random_choice(100, 10, 5, 1, torch.zeros(1))
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(a, t_ops.random_uniform(100, 5, 1, torch.zeros(1)))
    assert not torch.equal(a, t_ops.random_uniform(100, 5, 2, torch.zeros(1)))
    assert len(torch.unique(c)) == 10 and torch.all(c[1:] > c[:-1])


@pytest.fixture(params=[False, True], ids=["torch_pages", "numpy_pages"])
def large_results_from_numpy(request, monkeypatch):
    """Run a test twice: as it is, and with every result the torch backend allocates
    taken from NumPy's memory (the path of results of 4 MiB and more)."""
    if request.param:
        import grace_dl.torch.ops as torch_ops

        monkeypatch.setattr(torch_ops, "_HUGE_PAGE_MIN_BYTES", 0)
    return request.param


@pytest.mark.parametrize("method", grace_dl.list_methods())
def test_simulator_on_torch_matches_numpy_for_deterministic_methods(method, large_results_from_numpy):
    grads = [{"w": normal(300, seed=r).reshape(10, 30)} for r in range(3)]
    torch_grads = [{"w": torch.from_numpy(g["w"].copy())} for g in grads]
    ref = grace_dl.LocalSimulator(grace_dl.make(method), 3)
    sim = grace_dl.LocalSimulator(grace_dl.make(method), 3)
    for _ in range(3):
        a, b = ref.step(grads), sim.step(torch_grads)
        assert b[0]["w"].shape == (10, 30) and b[0]["w"].dtype == torch.float32
        comp = ref.workers[0].compressor
        if comp.deterministic and not comp.exact_across_backends:
            # framework matmuls add in their own order: rounding differences, a few float32
            # ulps per step, carried on by error feedback and warm start
            assert np.abs(a[0]["w"] - b[0]["w"].numpy()).max() <= 1e-4 * np.abs(grads[0]["w"]).max()
        elif comp.deterministic:
            assert same_bytes(a[0]["w"], b[0]["w"])
        else:
            assert np.abs(a[0]["w"] - b[0]["w"].numpy()).max() < 2 * np.abs(grads[0]["w"]).max() * 3


def test_large_results_in_numpy_memory_have_torchs_own_bits(monkeypatch):
    import grace_dl.torch.ops as torch_ops

    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.standard_normal(3000).astype(np.float32))
    a, b = torch.from_numpy(rng.standard_normal((60, 3))), torch.from_numpy(rng.standard_normal((3, 50)))
    idx = torch.tensor([0, 5, 2999], dtype=torch.int64)

    def results():
        return [t_ops.cast(x, "float16"), t_ops.cast(x, "bfloat16"), t_ops.cast(x, "float64"),
                t_ops.zeros(3000, "float32", x), t_ops.scatter(3000, idx, x[idx]), t_ops.matmul(a, b),
                t_ops.concat([x, x[:7]]), t_ops.index_update(x, idx, torch.ones(3))]

    before = x.clone()
    want = results()
    monkeypatch.setattr(torch_ops, "_HUGE_PAGE_MIN_BYTES", 0)
    got = results()
    assert torch.equal(x, before)  # index_update's result is a copy, not x
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous()
        assert same_bytes(t_ops.to_numpy(w), g)
        g.add_(1)  # writable, and its own memory
    assert torch.equal(x, before)


def test_state_restored_from_numpy_moves_to_torch():
    g = grace_dl.topk(ratio=0.1)
    sim = grace_dl.LocalSimulator(g, 1)
    sim.step([{"w": torch.randn(50)}])
    state = sim.workers[0].state_dict()
    assert isinstance(state["memory"]["w"]["residual"], np.ndarray)
    fresh = grace_dl.LocalSimulator(g, 1)
    fresh.workers[0].load_state_dict(state)
    fresh.step([{"w": torch.randn(50)}])
    assert isinstance(fresh.workers[0].memory.state["w"]["residual"], torch.Tensor)


def test_log_and_exp_are_close_to_numpy():
    # the frameworks' own kernels: not bit-identical to NumPy's (measured), but close
    for dtype in (np.float32, np.float64):
        x = np.abs(normal(1000, seed=3, dtype=dtype)) * 10 + dtype(1e-3)
        for np_f, t_f in ((np_ops.log, t_ops.log), (np_ops.exp, t_ops.exp)):
            want, got = np_f(x), t_f(torch.from_numpy(x.copy())).numpy()
            assert got.dtype == want.dtype
            assert (np.abs(got - want) / np.spacing(np.abs(want))).max() <= 4
    assert t_ops.length(torch.zeros(5)) == 5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matmul_and_transpose_match_numpy(dtype):
    rng = np.random.default_rng(5)
    for n, k, m in [(1, 1, 1), (7, 3, 33), (64, 2, 100)]:
        a, b = rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((k, m)).astype(dtype)
        ta, tb = torch.from_numpy(a.copy()), torch.from_numpy(b.copy())
        assert same_bytes(np_ops.transpose(a).copy(), t_ops.transpose(ta).contiguous())
        got, want = t_ops.matmul(ta, tb).numpy(), np_ops.matmul(a, b)
        assert got.dtype == want.dtype and got.shape == want.shape
        # each framework's kernel adds in its own order: equal to rounding only
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-6)
        # integer-valued inputs have exact sums in any order: bit-identical
        ai, bi = np.round(a * 8), np.round(b * 8)
        assert same_bytes(np_ops.matmul(ai, bi), t_ops.matmul(torch.from_numpy(ai), torch.from_numpy(bi)))


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_bitwise_primitives_match_numpy(dtype):
    width = np.dtype(dtype).itemsize * 8
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, 500, dtype=dtype, endpoint=True)
    b = rng.integers(info.min, info.max, 500, dtype=dtype, endpoint=True)
    k = rng.integers(0, width, 500).astype(dtype)
    ta, tb, tk = (torch.from_numpy(v.copy()) for v in (a, b, k))
    small = np_ops.shift_right(a, k)  # shifting back left by k stays in range
    for op, args, targs in (("bitwise_and", (a, b), (ta, tb)), ("bitwise_or", (a, b), (ta, tb)),
                            ("shift_right", (a, k), (ta, tk)), ("bitwise_and", (a, 0x7F0F), (ta, 0x7F0F)),
                            ("shift_left", (small, k), (torch.from_numpy(small.copy()), tk)),
                            ("shift_right", (a, 5), (ta, 5))):
        assert same_bytes(getattr(np_ops, op)(*args), getattr(t_ops, op)(*targs)), op


def test_float32_sqrt_is_correctly_rounded_like_numpy():
    rng = np.random.default_rng(3)
    x = (np.abs(rng.standard_normal(200_000)) * 10.0 ** rng.integers(-30, 30, 200_000)).astype(np.float32)
    assert same_bytes(np_ops.sqrt(x), t_ops.sqrt(torch.from_numpy(x)))
