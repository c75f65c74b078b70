"""The sparse methods' selection kernels (ops primitives of the ``# -- selection kernels``
block) and the residual shortcut of sparse compressors, on NumPy and torch."""

from __future__ import annotations

import numpy as np
import pytest

import grace_dl
from grace_dl.core import TensorContext, derive_key
from grace_dl.ops import get_ops
from grace_dl.ops.base import Ops
from grace_dl.ops.numpy_backend import NumpyOps

torch = pytest.importorskip("torch")
from grace_dl.torch.ops import TorchOps  # noqa: E402

N, T = NumpyOps(), TorchOps()


def _as_np(a):
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _reference_topk_magnitude(x: np.ndarray, k: int) -> np.ndarray:
    """The protocol's generic top-k of |x| (NaN as +inf, ties to the lower index)."""
    return Ops.topk_indices(N, np.where(np.isnan(x), np.inf, np.abs(x)), k)


def _data(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "ties":  # many equal magnitudes, so ties straddle the k-th
        x = np.round(x * 2) / 2
    elif kind == "nonfinite":
        x[rng.integers(0, n, 3)] = np.nan
        x[rng.integers(0, n, 2)] = -np.inf
    elif kind == "mostly_zero":
        x[rng.random(n) < 0.995] = 0
    elif kind == "sorted":  # a strided sample sees a biased picture
        x = np.sort(np.abs(x))
    return x


@pytest.mark.parametrize("kind", ["normal", "ties", "nonfinite", "mostly_zero", "sorted"])
@pytest.mark.parametrize("n", [1, 7, 1000, 5000, 10_000, 70_000, 200_003])
def test_topk_magnitude_indices_is_the_protocols_topk_of_abs(kind, n):
    rng = np.random.default_rng(n)
    x = _data(kind, n, rng)
    for k in sorted({1, 2, n // 100, n // 9, n // 2, n - 1, n} - {0}):
        expected = _reference_topk_magnitude(x, k)
        got_np = N.topk_magnitude_indices(x, k)
        got_torch = T.topk_magnitude_indices(torch.from_numpy(x), k)
        assert got_np.dtype == np.int64 and got_torch.dtype == torch.int64
        np.testing.assert_array_equal(got_np, expected, err_msg=f"numpy k={k}")
        np.testing.assert_array_equal(got_torch.numpy(), expected, err_msg=f"torch k={k}")
        # topk_indices of magnitudes (the direct path) agrees too
        mag = np.abs(x)
        generic = Ops.topk_indices(N, np.where(np.isnan(mag), np.inf, mag), k)
        if kind != "nonfinite":
            np.testing.assert_array_equal(N.topk_indices(mag, k), generic)
        np.testing.assert_array_equal(T.topk_indices(torch.from_numpy(np.where(np.isnan(mag), np.inf, mag)), k).numpy(),
                                      generic)


@pytest.mark.parametrize("kind", ["normal", "ties", "nonfinite", "mostly_zero", "sorted"])
@pytest.mark.parametrize("n", [7, 5000, 70_000])
def test_tf_topk_magnitude_indices_in_the_graph_is_the_protocols_topk(kind, n):
    # TF decides between the sampled candidates and the whole tensor inside the graph
    # (tf.cond): eagerly and traced, each path must give the protocol's set
    tf = pytest.importorskip("tensorflow")
    from grace_dl.tensorflow.ops import TFOps

    F = TFOps()
    x = _data(kind, n, np.random.default_rng(n))
    for k in sorted({1, 2, n // 100, n // 9, n // 2, n - 1} - {0}):
        traced = tf.function(lambda v, k=k: F.topk_magnitude_indices(v, k), autograph=False)
        expected = _reference_topk_magnitude(x, k)  # NaN as +inf, also on the whole-tensor path
        np.testing.assert_array_equal(F.topk_magnitude_indices(tf.constant(x), k).numpy(), expected,
                                      err_msg=f"eager k={k}")
        np.testing.assert_array_equal(traced(tf.constant(x)).numpy(), expected, err_msg=f"traced k={k}")


def test_topk_indices_rank_nan_as_inf_on_every_backend():
    # the protocol's order: NaN ranks as +inf (ties to the lower index). TF's top_k does
    # not rank NaN as the largest, so TF maps it first, eagerly and traced
    tf = pytest.importorskip("tensorflow")
    from grace_dl.tensorflow.ops import TFOps

    F = TFOps()
    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(2, 3000))
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.integers(0, n, int(rng.integers(1, 4)))] = np.nan
        if trial % 3 == 0:
            x[rng.integers(0, n, 2)] = np.inf
        k = int(rng.integers(1, n))
        want = Ops.topk_indices(N, x, k)
        np.testing.assert_array_equal(N.topk_indices(x, k), want)
        np.testing.assert_array_equal(T.topk_indices(torch.from_numpy(x), k).numpy(), want)
        np.testing.assert_array_equal(F.topk_indices(tf.constant(x), k).numpy(), want, err_msg=f"tf n={n} k={k}")
    traced = tf.function(lambda v: F.topk_indices(v, 5), autograph=False)
    x = np.array([1.0, np.nan, 3.0, np.inf, np.nan, -2.0, 0.5], np.float32)
    np.testing.assert_array_equal(traced(tf.constant(x)).numpy(), Ops.topk_indices(N, x, 5))


@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
@pytest.mark.parametrize("n,k", [(1, 1), (10, 0), (10, 3), (1000, 10), (1000, 700), (1000, 999), (10**6, 10**4)])
def test_random_choice_draws_k_distinct_ascending_indices_from_the_key(backend, n, k):
    like = torch.zeros(1) if backend is T else None
    c = _as_np(backend.random_choice(n, k, 5, 3, like))
    assert c.dtype == np.int64 and c.shape == (k,)
    assert len(np.unique(c)) == k and np.all(np.diff(c) > 0)
    assert k == 0 or (c.min() >= 0 and c.max() < n)
    np.testing.assert_array_equal(c, _as_np(backend.random_choice(n, k, 5, 3, like)))
    if 0 < k < n and n >= 1000:
        assert not np.array_equal(c, _as_np(backend.random_choice(n, k, 5, 4, like)))
        assert not np.array_equal(c, _as_np(backend.random_choice(n, k, 6, 3, like)))


@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
@pytest.mark.parametrize("k", [5, 40])  # a subset, and the complement path (2k > n)
def test_random_choice_is_uniform(backend, k):
    like = torch.zeros(1) if backend is T else None
    n, draws = 50, 4000
    counts = np.zeros(n)
    for counter in range(draws):
        counts[_as_np(backend.random_choice(n, k, 9, counter, like))] += 1
    expected = draws * k / n
    sd = np.sqrt(draws * (k / n) * (1 - k / n))
    assert np.abs(counts - expected).max() < 5 * sd


@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
def test_finite_count_choose_and_index_update(backend):
    def arr(a):
        a = np.asarray(a, dtype=np.float32)
        return torch.from_numpy(a) if backend is T else a

    for values, finite in [([1.0, -2.0, 3.0], True), ([1.0, np.nan, 3.0], False), ([np.inf, 0.0], False),
                           ([-np.inf], False), ([], True), ([3e38, -3e38], True)]:
        assert bool(backend.all_finite(arr(values))) is finite, values
    big = np.zeros(100_000, np.float32)
    assert bool(backend.all_finite(arr(big)))
    big[77_777] = np.nan
    assert not bool(backend.all_finite(arr(big)))
    assert backend.count_true(arr([1.0, 0.0, 2.0]) != 0) == 2
    a, b = arr([1.0, 2.0]), arr([3.0, 4.0])
    assert _as_np(backend.choose(arr([1.0]).sum() > 0, a, b)).tolist() == [1.0, 2.0]
    assert _as_np(backend.choose(arr([1.0]).sum() < 0, a, b)).tolist() == [3.0, 4.0]
    x = arr([1.0, 2.0, 3.0, 4.0])
    idx = torch.tensor([0, 2]) if backend is T else np.array([0, 2])
    out = backend.index_update(x, idx, arr([-1.0, -3.0]))
    assert _as_np(out).tolist() == [-1.0, 2.0, -3.0, 4.0]
    assert _as_np(x).tolist() == [1.0, 2.0, 3.0, 4.0]  # the input is left alone
    # the default in terms of other primitives agrees
    assert _as_np(Ops.index_update(backend, x, idx, arr([-1.0, -3.0]))).tolist() == [-1.0, 2.0, -3.0, 4.0]


@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_magnitude_at_least_made_a_block_at_a_time_is_the_selections_payload(monkeypatch, backend, dtype):
    import grace_dl.ops.numpy_backend as numpy_backend

    rng = np.random.default_rng(7)
    x = rng.standard_normal(1000).astype(dtype)
    x[rng.random(1000) < 0.2] = 0
    x[[3, 10, 400, 999]] = [np.nan, -np.inf, np.inf, -0.0]
    x[11] = np.copysign(np.nan, -1.0)
    x[100:200] = 0  # blocks with nothing selected
    arr = torch.from_numpy(x) if backend is T else x
    monkeypatch.setattr(numpy_backend, "_PACK_AT_LEAST_BLOCK", 16)  # 63 blocks, a short last one
    monkeypatch.setattr(numpy_backend, "_PACK_AT_LEAST_BLOCKED_MIN", 1)
    for threshold in [0.5, 1e-30, 2.0, np.inf]:
        want = Ops.pack_magnitude_at_least(N, x, dtype(threshold))
        got = _as_np(backend.pack_magnitude_at_least(arr, np.full(1, threshold, dtype)))
        assert got.dtype == np.int32 and got.tobytes() == want.tobytes(), f"threshold {threshold}"


@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonzero_magnitude_at_least_is_the_reference_selection(backend, dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(5000).astype(dtype)
    x[rng.random(5000) < 0.2] = 0
    x[[3, 10, 4000]] = [np.nan, -np.inf, np.inf]
    x[11] = np.copysign(np.nan, -1.0)  # a NaN with its sign bit set passes too
    x[[20, 21]] = [dtype(0.5), dtype(-0.5)]  # ties at the threshold are selected
    arr = torch.from_numpy(x) if backend is T else x
    for threshold in [0.0, 0.5, 1e-30, 2.0, np.inf]:
        a = np.abs(x)
        expected = np.flatnonzero(~(a < dtype(threshold)) & ~(a <= 0))  # NaN passes, zeros never
        for t in (threshold, np.full(1, threshold, dtype)):  # a number or a one-element array
            t = torch.from_numpy(t) if backend is T and isinstance(t, np.ndarray) else t
            got = _as_np(backend.nonzero_magnitude_at_least(arr, t))
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, expected, err_msg=f"threshold {threshold}")
            # the default in terms of other primitives agrees
            np.testing.assert_array_equal(_as_np(Ops.nonzero_magnitude_at_least(backend, arr, t)), expected)


@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [5000, 3 * 65536 + 17])
def test_scatter_sparse_of_long_payloads_reverses_pack_sparse(backend, dtype, n):
    # torch CPU scatters payloads of 2**14 elements and more with scatter_, its int64
    # indices made a block of 2**16 at a time; float64 values at an odd word are copied
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(dtype)
    x[[3, 10, n - 1]] = [np.nan, -np.inf, -0.0]
    for threshold in [0.0, 0.5, 0.01]:
        idx = np.flatnonzero(~(np.abs(x) < dtype(threshold)) & (x != 0))
        if threshold == 0.01:
            idx = idx[:-1] if idx.shape[0] % 2 == 0 else idx  # an odd count: values at an odd word
        buffer = N.pack_sparse(x, idx)
        dense = np.zeros(n, dtype)
        dense[idx] = x[idx]
        arr = torch.from_numpy(buffer) if backend is T else buffer
        out = _as_np(backend.scatter_sparse(n, arr, np.dtype(dtype).name))
        assert out.dtype == dtype and out.tobytes() == dense.tobytes()


SPARSE = [("topk", {"ratio": 0.1}), ("randomk", {"ratio": 0.1}), ("randomk", {"ratio": 0.1, "rescale": True}),
          ("threshold", {"threshold": 0.5}), ("dgc", {"ratio": 0.1, "sample_ratio": 0.2}), ("sidco", {})]


def _ctx(n: int) -> TensorContext:
    return TensorContext(name="w", shape=(n,), numel=n, dtype="float32", in_dtype="float32", step=3,
                         shared_key=derive_key(0, "w"), worker_key=derive_key(0, "w", 0), rank=0, world_size=1)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("method,params", SPARSE)
def test_original_is_transmitted_plus_residual_bit_for_bit(backend, method, params):
    """The residual a sparse compressor hands the memory is exactly ``x - decompress``,
    with or without what compression noted in ``ctx.scratch``."""
    rng = np.random.default_rng(4)
    data = rng.standard_normal(3001).astype(np.float32)
    data[[5, 50]] = -0.0  # signed zeros keep their sign in the residual
    x = torch.from_numpy(data) if backend == "torch" else data
    ops = get_ops(x)
    comp = grace_dl.make(method, **params).compressor
    ctx = _ctx(3001)
    payload = comp.compress(ops, x, ctx)
    dense = comp.decompress(ops, payload.buffer, ctx)
    expected = _as_np(x - dense)
    for c in (ctx, _ctx(3001)):  # noted by compress, and recomputed from the payload
        got = _as_np(comp.residual(ops, x, payload, c))
        assert got.tobytes() == expected.tobytes()
    assert np.count_nonzero(expected) < 3001  # something was sent


@pytest.mark.parametrize("method,params", [("topk", {"ratio": 0.05}), ("threshold", {"threshold": 1.0}),
                                           ("dgc", {"ratio": 0.05, "sample_ratio": 0.5}),
                                           ("randomk", {"ratio": 0.05})])
def test_memory_state_matches_the_dense_update(method, params):
    """The memory's shortcut (update_from) leaves the same state, bit for bit, as its
    dense update with the local decompression, over several steps with a NaN step."""
    fast = grace_dl.make(method, **params)
    slow = grace_dl.make(method, **params)
    ops = get_ops(np.zeros(1, np.float32))
    rng = np.random.default_rng(9)
    for step in range(4):
        g = rng.standard_normal(500).astype(np.float32)
        if step == 2:
            g[7] = np.nan
        ctx_f, ctx_s = _ctx(500), _ctx(500)
        cf = fast.memory.compensate(ops, g, ctx_f)
        pf = fast.compressor.compress(ops, cf, ctx_f)
        fast.memory.update_from(ops, cf, pf, fast.compressor, ctx_f)
        cs = slow.memory.compensate(ops, g, ctx_s)
        ps = slow.compressor.compress(ops, cs, ctx_s)
        slow.memory.update(ops, cs, slow.compressor.decompress(ops, ps.buffer, ctx_s), ctx_s)
        for name, fields in slow.memory.state_dict().items():
            for key, value in fields.items():
                assert fast.memory.state_dict()[name][key].tobytes() == value.tobytes(), (step, key)


@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k", [0, 1, 7, 500])
def test_pack_sparse_is_the_sparse_layout_and_scatter_sparse_reverses_it(backend, dtype, k):
    from grace_dl.payload import pack_words

    rng = np.random.default_rng(k)
    n = 1000
    x_np = rng.standard_normal(n).astype(dtype)
    x_np[5] = np.nan
    idx_np = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    x, idx = (torch.from_numpy(x_np), torch.from_numpy(idx_np)) if backend is T else (x_np, idx_np)
    expected = pack_words(N, [idx_np.astype(np.int32), x_np[idx_np]])  # int32 indices, then the values' words
    for pack in (backend.pack_sparse, lambda a, i: Ops.pack_sparse(backend, a, i)):
        buffer = pack(x, idx)
        assert backend.dtype(buffer) == "int32"
        np.testing.assert_array_equal(_as_np(buffer), expected)
    dense = np.zeros(n, dtype)
    dense[idx_np] = x_np[idx_np]
    for scatter in (backend.scatter_sparse, lambda m, b, d: Ops.scatter_sparse(backend, m, b, d)):
        out = _as_np(scatter(n, buffer, dtype))
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out.view(np.int64 if dtype == "float64" else np.int32),
                                      dense.view(np.int64 if dtype == "float64" else np.int32))


@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
def test_index_subtract_touches_only_the_indices_and_leaves_x_alone(backend):
    x_np = np.array([1.0, 2.0, np.inf, 4.0, 5.0], np.float32)
    arr = (lambda a: torch.from_numpy(np.asarray(a))) if backend is T else np.asarray
    x, idx, values = arr(x_np.copy()), arr(np.array([0, 2, 3])), arr(np.array([0.5, 1.0, 4.0], np.float32))
    for f in (backend.index_subtract, lambda *a: Ops.index_subtract(backend, *a)):
        out = _as_np(f(x, idx, values))
        np.testing.assert_array_equal(out, np.array([0.5, 2.0, np.inf, 0.0, 5.0], np.float32))
        np.testing.assert_array_equal(_as_np(x), x_np)


@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
@pytest.mark.parametrize("op", ["index_subtract", "index_update"])
def test_consuming_index_updates_give_the_copys_values_in_xs_storage(backend, op):
    """``consume=True`` (x never used again, e.g. DGC's momentum and velocity of the step)
    writes into ``x`` instead of a full-size copy, with the same result."""
    rng = np.random.default_rng(3)
    x_np = rng.standard_normal(1000).astype(np.float32)
    arr = (lambda a: torch.from_numpy(np.asarray(a))) if backend is T else np.asarray
    idx = arr(np.sort(rng.choice(1000, 37, replace=False)).astype(np.int64))
    values = arr(rng.standard_normal(37).astype(np.float32))
    for f in (getattr(backend, op), lambda *a, **k: getattr(Ops, op)(backend, *a, **k)):
        expected = _as_np(f(arr(x_np.copy()), idx, values))
        x = arr(x_np.copy())
        out = f(x, idx, values, consume=True)
        np.testing.assert_array_equal(_as_np(out), expected)
    x = arr(x_np.copy())
    out = getattr(backend, op)(x, idx, values, consume=True)  # the backend's own kernel: in place
    np.testing.assert_array_equal(_as_np(x), _as_np(out))
    assert not np.array_equal(_as_np(x), x_np)


@pytest.mark.parametrize("zeros", [0.0, 0.3, 0.99, 1.0])
def test_kth_largest_with_many_zeros_is_the_partitions_answer(zeros):
    from grace_dl.ops.numpy_backend import kth_largest_value

    rng = np.random.default_rng(5)
    n = 3000
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.random(n) < zeros] = 0
    x[[7, 8]] = [np.nan, -np.inf]
    for k in sorted({1, 2, 5, 40, 1000, 1500, 2000, n - 1, n}):
        expected = np.partition(x, n - k)[n - k]
        got = kth_largest_value(x, k)
        assert (np.isnan(got) and np.isnan(expected)) or got == expected, k
        assert got.dtype == x.dtype
        ref = Ops.topk_indices(N, np.where(np.isnan(x), np.inf, x), k)
        np.testing.assert_array_equal(N.topk_indices(x, k), ref)


@pytest.mark.parametrize("backend", [N, T])
@pytest.mark.parametrize("kind", ["normal", "ties", "nan", "zeros"])
@pytest.mark.parametrize("n", [1, 100, 5000, 300000])
def test_sorted_values_at_reads_the_sorted_array(backend, kind, n):
    # near either end NumPy (and torch on the CPU) selects among sampled candidates;
    # the values must be those of the full sort, NaN last
    rng = np.random.default_rng(n)
    x = {"normal": lambda: rng.standard_normal(n).astype(np.float32),
         "ties": lambda: rng.integers(-2, 3, n).astype(np.float32),
         "nan": lambda: np.where(rng.random(n) < 0.2, np.nan, rng.standard_normal(n)),
         "zeros": lambda: np.where(rng.random(n) < 0.9, 0.0, rng.standard_normal(n)).astype(np.float32)}[kind]()
    positions = np.unique(np.array([0, 1, n // 100, n // 9, n // 2, n - 1 - n // 100, n - 2, n - 1]).clip(0, n - 1))
    positions = np.concatenate([positions, positions[::-1]])
    like = torch.from_numpy(x) if backend is T else x
    got = _as_np(backend.sorted_values_at(like, torch.from_numpy(positions) if backend is T else positions))
    want = np.sort(x)[positions]
    assert got.dtype == x.dtype and np.array_equal(got, want, equal_nan=True)
    mask = x > 0
    count = backend.count_true_array(torch.from_numpy(mask) if backend is T else mask)
    assert int(count) == int(np.count_nonzero(mask)) and _as_np(count).dtype == np.int64



@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
@pytest.mark.parametrize("k", [2, 4])  # a subset, and the complement path (2k > n)
def test_random_choice_draws_every_subset_equally_often(backend, k):
    # uniform marginals are not enough: each of the C(6, k) = 15 subsets must be as likely
    # (the subset is made of sorted draws with duplicates topped up, which a bias in the
    # top-up or in the spacing of the sorted draws would show)
    like = torch.zeros(1) if backend is T else None
    n, draws = 6, 3000
    seen: dict[tuple[int, ...], int] = {}
    for counter in range(draws):
        subset = tuple(_as_np(backend.random_choice(n, k, 4, counter, like)).tolist())
        seen[subset] = seen.get(subset, 0) + 1
    assert len(seen) == 15 and all(len(s) == k for s in seen)
    expected = draws / 15
    chi2 = sum((c - expected) ** 2 / expected for c in seen.values())
    assert chi2 < 36.1  # the 0.999 quantile of chi-square with 14 degrees of freedom


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical, but any NaN matches any NaN (inf - inf's sign is the CPU's)."""
    nan = np.isnan(a)
    return a.dtype == b.dtype and np.array_equal(nan, np.isnan(b)) and a[~nan].tobytes() == b[~nan].tobytes()


@pytest.mark.parametrize("backend", [N, T], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 17, 1000, 1029])
@pytest.mark.parametrize("blocked", [True, False])
def test_tails_made_a_block_at_a_time_are_the_protocols(monkeypatch, backend, dtype, n, blocked):
    # adaptive threshold's tails: sums in the fixed order, counts, codes and the sign
    # counts, streamed in small blocks (many, a short last one), against the defaults
    import grace_dl.ops.numpy_backend as numpy_backend

    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(dtype)
    if n > 20:
        x[rng.random(n) < 0.1] = 0
        x[[3, 10, 11, 12, 13]] = [np.nan, -np.inf, np.inf, -0.0, np.copysign(np.nan, -1.0)]
        x[100:200] = 0.25  # blocks with nothing in either tail
    arr = torch.from_numpy(x) if backend is T else x
    monkeypatch.setattr(numpy_backend, "_STREAMED_TAILS_MIN", 1 if blocked else 1 << 21)
    monkeypatch.setattr(numpy_backend, "_TAIL_CODES_BLOCK", 16)
    monkeypatch.setattr(numpy_backend, "_FUSED_BLOCK", 32)
    assert np.array_equal(_as_np(backend.sign_counts(arr)), Ops.sign_counts(N, x))
    assert _as_np(backend.sign_counts(arr)).tolist() == [int(np.sum(~(x <= 0))), int(np.sum(x < 0))]
    for top, bottom in [(1.0, -1.2), (np.inf, -np.inf), (0.0, 0.0), (-0.5, 0.5), (np.nan, np.nan)]:
        t, b = np.full(1, top, dtype), np.full(1, bottom, dtype)
        bounds = (torch.from_numpy(t), torch.from_numpy(b)) if backend is T else (t, b)
        sums, counts = backend.tail_sums(arr, *bounds)
        want_sums, want_counts = Ops.tail_sums(N, x, t, b)
        assert _same_bits(_as_np(sums), want_sums), (top, bottom)
        assert _as_np(counts).dtype == np.int64 and np.array_equal(_as_np(counts), want_counts)
        assert want_counts.tolist() == [int(np.sum(~(x < t))), int(np.sum(x <= b))]
        codes = _as_np(backend.tail_codes(arr, *bounds))
        upper = ~(x < t)
        want = [i if upper[i] else -i - 1 for i in np.flatnonzero(upper | (x <= b))]
        assert codes.dtype == np.int64 and codes.tolist() == want == Ops.tail_codes(N, x, t, b).tolist()
