"""The quantization kernels of the ops protocol: each backend's fast kernel gives the bits
of the protocol's default, written in terms of the basic primitives."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grace_dl.ops.base import Ops
from grace_dl.ops.numpy_backend import NumpyOps

ops = NumpyOps()
SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -1e-40, 3e38, -3e38]


def _floats(draw_n, seed, dtype, specials):
    x = np.random.default_rng(seed).standard_normal(draw_n).astype(dtype)
    if specials and draw_n:
        idx = np.random.default_rng(seed + 1).integers(0, draw_n, size=min(draw_n, 4))
        x[idx] = np.array(SPECIAL, dtype)[idx % len(SPECIAL)]
    return x


def same_bits(a, b):
    """Bit-identical, except that any NaN matches any NaN: the sign of a NaN that
    arithmetic makes (inf - inf) depends on the CPU's kernel, not on grace-dl."""
    a, b = np.asarray(a), np.asarray(b)
    nan = np.isnan(a)
    return a.dtype == b.dtype and np.array_equal(nan, np.isnan(b)) and a[~nan].tobytes() == b[~nan].tobytes()


cases = st.tuples(st.integers(0, 2100), st.integers(0, 10**6), st.sampled_from(["float32", "float64"]), st.booleans())


@settings(max_examples=80, deadline=None)
@given(case=cases)
def test_numpy_kernels_equal_the_protocol_defaults(case):
    n, seed, dtype, specials = case
    x = _floats(n, seed, dtype, specials)
    assert ops.pack_signs(x).tobytes() == Ops.pack_signs(ops, x).tobytes()
    assert same_bits(ops.tree_sum(x), Ops.tree_sum(ops, x))
    assert same_bits(ops.tree_sum(np.abs(x), 1 / 3), Ops.tree_sum(ops, np.abs(x), 1 / 3))
    assert same_bits(ops.abs_tree_sum(x, 1 / 3), Ops.tree_sum(ops, np.abs(x), 1 / 3))
    assert same_bits(ops.abs_tree_sum(x), Ops.tree_sum(ops, np.abs(x)))
    if n:
        assert same_bits(ops.sign_means(x), Ops.sign_means(ops, x))
    words = ops.pack_signs(x)
    on, off = np.array([2.5], dtype), np.array([-0.0], dtype)
    got = ops.select_bits(words, n, on, off)
    assert got.dtype == np.dtype(dtype) and got.tobytes() == Ops.select_bits(ops, words, n, on, off).tobytes()
    assert got.tobytes() == np.where(x >= 0, on, off).tobytes()
    # the scales' words after the sign words, and the expansion reading only the signs
    scale = ops.abs_tree_sum(x, 1 / 3)
    buffer = ops.pack_signs(x, scale)
    assert buffer.dtype == np.int32 and buffer.tobytes() == Ops.pack_signs(ops, x, scale).tobytes()
    assert buffer.tobytes() == np.concatenate([words, scale.view(np.int32)]).tobytes()
    assert ops.select_bits(buffer, n, on, off).tobytes() == got.tobytes()
    for s in (None, scale):
        signs = ops.unpack_signs(buffer, n, dtype, s)
        assert signs.dtype == np.dtype(dtype) and signs.tobytes() == Ops.unpack_signs(ops, buffer, n, dtype, s).tobytes()
    assert ops.unpack_signs(words, n, dtype).tobytes() == np.where(x >= 0, 1.0, -1.0).astype(dtype).tobytes()


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 10001])
def test_scaled_sign_payload_kernels_equal_their_defaults(n):
    # EF-signSGD's fused primitives: the payload is pack_signs of the scaled L1 norm, and
    # the expansion reads its scale from the words after the signs (float64: two words)
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    for dtype in ("float32", "float64"):
        x = _floats(n, n + 5, dtype, True)
        want = Ops.pack_signs(ops, x, Ops.abs_tree_sum(ops, x, 1 / n))
        buffer = ops.pack_signs_abs_sum(x, 1 / n)
        assert buffer.dtype == np.int32 and buffer.tobytes() == want.tobytes()
        assert Ops.pack_signs_abs_sum(ops, x, 1 / n).tobytes() == want.tobytes()
        assert T.pack_signs_abs_sum(torch.from_numpy(x.copy()), 1 / n).numpy().tobytes() == want.tobytes()
        scale = ops.abs_tree_sum(x, 1 / n)
        expanded = np.where(x >= 0, scale, -scale).astype(dtype)
        for backend, words in ((ops, buffer), (T, torch.from_numpy(buffer.copy()))):
            got = backend.unpack_scaled_signs(words, n, dtype)
            assert np.asarray(got).tobytes() == expanded.tobytes()
            assert np.asarray(Ops.unpack_scaled_signs(backend, words, n, dtype)).tobytes() == expanded.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_signed_reference_draws_equal_the_default(dtype):
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    like = torch.zeros(1)
    want = (ops.random_uniform(301, 7, 3, None).astype(dtype) * 2.0 - 1.0).tobytes()
    assert ops.reference_uniform_signed(301, 7, 3, dtype, None).tobytes() == want
    assert Ops.reference_uniform_signed(ops, 301, 7, 3, dtype, None).tobytes() == want
    assert T.reference_uniform_signed(301, 7, 3, dtype, like).numpy().tobytes() == want
    assert Ops.reference_uniform_signed(T, 301, 7, 3, dtype, like).numpy().tobytes() == want
    assert T.reference_uniform(301, 7, 3, like).numpy().tobytes() == ops.random_uniform(301, 7, 3, None).tobytes()


@pytest.mark.parametrize("n", [2, 3, 4095, 4097, 65536, 65537, 131073])
def test_tree_sums_through_the_workspace_equal_the_default_and_stay_put(n):
    # tensors up to 2**17 elements sum in a per-thread workspace: the results are the
    # default's, and a later sum of the same size does not overwrite an earlier one
    x = _floats(n, n, "float32", False) * np.float32(1e3)
    y = x[::-1].copy()
    first, absolute, wide = ops.tree_sum(x, 0.5), ops.abs_tree_sum(x, 1 / 3), ops.tree_sum_in(x, "float64")
    kept = first.copy(), absolute.copy(), wide.copy()
    assert same_bits(ops.tree_sum(y), Ops.tree_sum(ops, y)) and same_bits(ops.abs_tree_sum(y), Ops.tree_sum(ops, np.abs(y)))
    ops.tree_sum_in(y, "float64")
    assert same_bits(first, Ops.tree_sum(ops, x, 0.5)) and same_bits(absolute, Ops.tree_sum(ops, np.abs(x), 1 / 3))
    assert same_bits(wide, Ops.tree_sum(ops, x.astype(np.float64)))
    assert all(a.tobytes() == b.tobytes() for a, b in zip((first, absolute, wide), kept))


def test_tree_sum_order_is_the_stated_tree():
    # 5 elements: h = 4, so x0 + x4 is added first, x1..x3 carried, then halves
    x = np.array([1e8, 1.0, -1e8, 1.0, 1.0], np.float32)
    a = np.float32(1e8) + np.float32(1.0)
    want = (a + np.float32(-1e8)) + (np.float32(1.0) + np.float32(1.0))
    assert ops.tree_sum(x)[0] == want == Ops.tree_sum(ops, x)[0]


@pytest.mark.parametrize("n", [2, 3, 16, 17, 33, 64, 100, 1000])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tree_sums_streamed_a_block_at_a_time_are_the_protocols_bits(monkeypatch, n, dtype):
    import grace_dl.ops.numpy_backend as numpy_backend

    x = _floats(n, n, dtype, True)
    x[n // 2] = -0.0  # counted with the non-negative side, as the protocol counts it
    finite = np.nan_to_num(x, nan=0.5, posinf=2.0, neginf=-3.0)
    want = [Ops.sign_means(ops, x), Ops.sign_means(ops, np.abs(x)), Ops.tree_sum(ops, x, 1 / 3),
            Ops.tree_sum(ops, np.abs(x)), Ops.tree_sum(ops, np.abs(x), 1 / 3), ops.peak_rms(finite)]
    monkeypatch.setattr(numpy_backend, "_STREAMED_TREE_MIN", 2)
    monkeypatch.setattr(numpy_backend, "_STREAMED_SIGN_MEANS_MIN", 2)
    monkeypatch.setattr(numpy_backend, "_FUSED_BLOCK", 16)  # several blocks, short last ones
    got = [ops.sign_means(x), ops.sign_means(np.abs(x)),  # one side empty
           ops.tree_sum(x, 1 / 3), ops.abs_tree_sum(x), ops.abs_tree_sum(x, 1 / 3),
           ops.peak_rms(finite)]  # TernGrad's peak and root mean square, one pass unstreamed
    for g, w in zip(got, want):
        assert g.shape == (1,) or g.shape == (2,)
        assert same_bits(g, w)
    # EF-signSGD's payload: the signs packed block by block beside the streamed sum
    packed = ops.pack_signs_abs_sum(x, 1 / n)
    assert packed.dtype == np.int32 and packed.tobytes() == Ops.pack_signs_abs_sum(ops, x, 1 / n).tobytes()


def test_sign_means_of_one_sided_and_empty_sides():
    x = np.array([1.0, 2.0, 3.0, -0.0], np.float32)
    assert ops.sign_means(x).tolist() == [1.5, 0.0]
    assert ops.sign_means(-np.abs(x) - 1).tolist() == [0.0, -2.5]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 20), n=st.integers(0, 300), seed=st.integers(0, 10**6))
def test_pack_uint_kernels_equal_the_generic_bit_stream(bits, n, seed):
    v = np.random.default_rng(seed).integers(0, 1 << bits, n)
    words = ops.pack_uint(v, bits)
    assert words.dtype == np.int32 and words.tobytes() == Ops.pack_uint(ops, v, bits).tobytes()
    back = ops.unpack_uint(words, n, bits)
    assert back.dtype == np.int64 and np.array_equal(back, v)
    assert np.array_equal(back, Ops.unpack_uint(ops, words, n, bits))


@pytest.mark.parametrize("n", [0, 1, 31, 33, 1000, 4097])
def test_torch_kernels_match_numpy_on_cpu_and_through_the_defaults(n):
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()

    class Generic(TorchOps):  # the protocol defaults, as a device without a kernel runs them
        pack_signs = Ops.pack_signs
        select_bits = Ops.select_bits
        unpack_signs = Ops.unpack_signs
        tree_sum = Ops.tree_sum
        abs_tree_sum = Ops.abs_tree_sum
        sign_means = Ops.sign_means

    G = Generic()
    for dtype in ("float32", "float64"):
        x = _floats(n, n, dtype, True)
        t = torch.from_numpy(x.copy())
        for backend in (T, G):
            assert backend.pack_signs(t).numpy().tobytes() == ops.pack_signs(x).tobytes()
            assert same_bits(backend.tree_sum(t).numpy(), ops.tree_sum(x))
            assert same_bits(backend.abs_tree_sum(t, 0.25).numpy(), ops.tree_sum(np.abs(x), 0.25))
            if n:
                assert same_bits(backend.sign_means(t).numpy(), ops.sign_means(x))
            w = torch.from_numpy(ops.pack_signs(x))
            on, off = torch.tensor([1.5], dtype=t.dtype), torch.tensor([-2.0], dtype=t.dtype)
            assert backend.select_bits(w, n, on, off).numpy().tobytes() == np.where(x >= 0, 1.5, -2.0).astype(dtype).tobytes()
            scale = ops.abs_tree_sum(x, 0.25)
            buffer = backend.pack_signs(t, torch.from_numpy(scale))
            assert buffer.dtype == torch.int32 and buffer.numpy().tobytes() == ops.pack_signs(x, scale).tobytes()
            assert backend.unpack_signs(buffer, n, dtype).numpy().tobytes() == ops.unpack_signs(w.numpy(), n, dtype).tobytes()
            assert (backend.unpack_signs(buffer, n, dtype, torch.from_numpy(scale)).numpy().tobytes()
                    == np.where(x >= 0, scale, -scale).astype(dtype).tobytes())


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 8]), n=st.integers(0, 300), seed=st.integers(0, 10**6))
def test_take_fields_decodes_each_field_through_the_table(bits, n, seed):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 1 << bits, n)
    table = rng.standard_normal(1 << bits).astype(np.float32)
    table[0] = -0.0
    words = ops.pack_uint(v, bits)
    got = ops.take_fields(words, n, bits, table)
    assert got.dtype == np.float32 and got.tobytes() == table[v].tobytes()
    assert got.tobytes() == Ops.take_fields(ops, words, n, bits, table).tobytes()


@settings(max_examples=60, deadline=None)
@given(case=cases, bound=st.sampled_from([0.5, 1.0, 3.0]))
def test_ternary_codes_equal_the_default(case, bound):
    n, seed, dtype, specials = case
    x = _floats(n, seed, dtype, specials)
    u = np.random.default_rng(seed + 7).random(n).astype(dtype)
    b = np.array([bound], dtype)
    got = ops.ternary_codes(x, b, u)
    assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1, 2}
    assert got.tobytes() == Ops.ternary_codes(ops, x, b, u).tobytes()
    keep = u < np.abs(x) / b
    assert np.array_equal(got, np.where(keep, np.where(x < 0, 0, 2), 1))


def test_torch_field_and_ternary_kernels_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    x = _floats(1001, 3, "float32", True)
    u = np.random.default_rng(4).random(1001).astype(np.float32)
    b = np.array([0.7], np.float32)
    want = ops.ternary_codes(x, b, u)
    got = T.ternary_codes(torch.from_numpy(x), torch.from_numpy(b), torch.from_numpy(u))
    assert got.numpy().tobytes() == want.tobytes()
    generic = Ops.ternary_codes(T, torch.from_numpy(x), torch.from_numpy(b), torch.from_numpy(u))
    assert generic.numpy().tobytes() == want.tobytes()
    words = ops.pack_uint(want, 2)
    table = np.array([-1.5, 0.0, 1.5, 3.0], np.float32)
    for backend_take in (T.take_fields, lambda *a: Ops.take_fields(T, *a)):
        out = backend_take(torch.from_numpy(words), 1001, 2, torch.from_numpy(table))
        assert out.numpy().tobytes() == table[want].tobytes()


@settings(max_examples=60, deadline=None)
@given(case=cases)
def test_power_of_two_kernels_equal_the_defaults(case):
    n, seed, _, specials = case
    x = _floats(n, seed, "float32", specials)
    r = np.random.default_rng(seed + 3).integers(0, 1 << 23, n).astype(np.int32)
    codes = ops.power_of_two_codes(x, r)
    assert codes.dtype == np.int32 and codes.tobytes() == Ops.power_of_two_codes(ops, x, r).tobytes()
    assert codes.min(initial=0) >= 0 and codes.max(initial=0) < 512
    values = ops.power_of_two_values(codes)
    assert values.tobytes() == Ops.power_of_two_values(ops, codes).tobytes()
    # every finite value lands on one of the two powers of two around it, with its sign
    finite = np.isfinite(x) & (x != 0) & (np.abs(x) >= np.finfo(np.float32).tiny)
    low = np.exp2(np.floor(np.log2(np.abs(x[finite].astype(np.float64)))))
    got = np.abs(values[finite].astype(np.float64))
    assert np.all((got == low) | (got == 2 * low))
    assert np.all(np.sign(values[finite]) == np.sign(x[finite]))
    assert np.isnan(values[np.isnan(x)]).all()


def test_torch_power_of_two_kernels_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    x = _floats(2000, 9, "float32", True)
    r = np.random.default_rng(2).integers(0, 1 << 23, 2000).astype(np.int32)
    want = ops.power_of_two_codes(x, r)
    for codes_of in (T.power_of_two_codes, lambda *a: Ops.power_of_two_codes(T, *a)):
        assert codes_of(torch.from_numpy(x), torch.from_numpy(r)).numpy().tobytes() == want.tobytes()
    for values_of in (T.power_of_two_values, lambda c: Ops.power_of_two_values(T, c)):
        got = values_of(torch.from_numpy(want.astype(np.int64)))
        assert got.numpy().tobytes() == ops.power_of_two_values(want).tobytes()


@pytest.mark.parametrize("name,kwargs", [("qsgd", {}), ("qsgd", {"levels": 3, "bucket_size": 7}),
                                         ("qsgd", {"levels": 300, "bucket_size": 100}), ("natural", {}),
                                         ("natural_dithering", {}),
                                         ("natural_dithering", {"levels": 3, "bucket_size": 2, "p": "2"})])
@pytest.mark.parametrize("n", [1, 31, 1000, 5000])
def test_chunked_processing_gives_the_payload_of_one_pass(monkeypatch, name, kwargs, n):
    import grace_dl
    import grace_dl.ops.base as chunking

    from helpers import make_ctx

    comp = grace_dl.make(name, **kwargs).compressor
    x = _floats(n, n, "float32", True)
    ctx = make_ctx(n)
    whole = comp.compress(ops, x, ctx).buffer
    out = comp.decompress(ops, whole, ctx)
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 64)
    assert len(chunking.chunk_bounds(n, 32)) == -(-n // 64)
    assert comp.compress(ops, x, ctx).buffer.tobytes() == whole.tobytes()
    assert comp.decompress(ops, whole, ctx).tobytes() == out.tobytes()


@settings(max_examples=60, deadline=None)
@given(case=cases)
def test_bfloat16_words_kernel_equals_the_bit_formulation(case):
    from grace_dl.compressors.fp16 import bfloat16_bits, bfloat16_words

    n, seed, _, specials = case
    x = _floats(n, seed, "float32", specials)
    x[: min(n, 2)] = np.array([np.float32(-np.nan), np.float32(3.3961776e38)])[: min(n, 2)]  # -NaN, rounds to inf
    want = bfloat16_words(ops, bfloat16_bits(ops, x))
    assert ops.bfloat16_words(x).tobytes() == want.tobytes()
    assert Ops.bfloat16_words(ops, x).tobytes() == want.tobytes()


@pytest.mark.parametrize("n", [1, 16, 17, 95, 1000])
def test_bfloat16_words_kernel_gives_one_passs_bits_in_small_blocks(monkeypatch, n):
    import grace_dl.ops.numpy_backend as numpy_backend
    from grace_dl.compressors.fp16 import bfloat16_bits, bfloat16_words

    x = _floats(n, n, "float32", True)
    x[n // 2] = np.float32(-np.nan)  # a NaN in a block of its own, away from the first
    want = bfloat16_words(ops, bfloat16_bits(ops, x))
    monkeypatch.setattr(numpy_backend, "_FUSED_BLOCK", 16)  # blocks, a short last one
    assert ops.bfloat16_words(x).tobytes() == want.tobytes()


def test_torch_bfloat16_words_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    x = _floats(1001, 5, "float32", True)
    want = ops.bfloat16_words(x)
    assert T.bfloat16_words(torch.from_numpy(x)).numpy().tobytes() == want.tobytes()
    assert Ops.bfloat16_words(T, torch.from_numpy(x)).numpy().tobytes() == want.tobytes()


@pytest.mark.parametrize("n", [1, 2, 17, 64, 1001, 40_001])
def test_torch_bfloat16_conversion_gives_the_protocols_bits_on_any_bit_pattern(n):
    # every float32 class, NaNs of both signs with payloads among them: torch's own
    # conversion (where this CPU's probe admits it) must give NumPy's bits
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    bits = np.random.default_rng(n).integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    bits[:: 7] |= np.uint32(0x7F800000)  # many infinities and NaNs
    x = bits.view(np.float32)
    assert TorchOps().bfloat16_words(torch.from_numpy(x)).numpy().tobytes() == ops.bfloat16_words(x).tobytes()


def test_torch_bfloat16_probe_rejects_a_conversion_that_flushes_subnormals(monkeypatch):
    # a CPU's bfloat16 instruction may flush subnormals: the probe must then send every
    # call to NumPy's kernel
    torch = pytest.importorskip("torch")
    import grace_dl.torch.ops as torch_ops

    native = torch_ops._torch_bfloat16_words

    def flushing(x):
        words = native(x)
        halves = words.view(torch.int16)[: x.numel()]
        halves[(halves & 0x7F80) == 0] &= -0x8000  # subnormals to signed zero
        return words

    probe = torch_ops._torch_bfloat16_rounds_as_protocol.__wrapped__
    subnormal = np.array([1e-40, 0.5], np.float32)
    assert flushing(torch.from_numpy(subnormal)).numpy().tobytes() != ops.bfloat16_words(subnormal).tobytes()
    monkeypatch.setattr(torch_ops, "_torch_bfloat16_words", flushing)
    assert probe() is False
    monkeypatch.setattr(torch_ops, "_torch_bfloat16_rounds_as_protocol", lambda: False)
    x = _floats(1001, 9, "float32", True)
    x[:2] = np.float32(1e-40), np.float32(-np.nan)
    got = torch_ops.TorchOps().bfloat16_words(torch.from_numpy(x)).numpy()
    assert got.tobytes() == ops.bfloat16_words(x).tobytes()


@settings(max_examples=80, deadline=None)
@given(case=cases, levels=st.sampled_from([1, 2, 3, 8, 30, 126]))
def test_dither_kernels_equal_the_defaults(case, levels):
    n, seed, dtype, specials = case
    x = _floats(n, seed, dtype, specials)
    y = x / np.abs(x[np.isfinite(x)]).max(initial=1.0).astype(dtype)
    y[: min(n, 1)] = np.array([1.0000001], dtype)[: min(n, 1)]  # above 1 by rounding: clamped
    u = np.random.default_rng(seed + 5).random(n).astype(dtype)
    codes = ops.dither_codes(y, u, levels)
    assert codes.tobytes() == Ops.dither_codes(ops, y, u, levels).astype(codes.dtype).tobytes()
    assert codes.min(initial=levels) >= 0 and codes.max(initial=levels) <= 2 * levels
    values = ops.dither_values(codes, levels, dtype)
    assert values.dtype == np.dtype(dtype)
    assert values.tobytes() == Ops.dither_values(ops, codes, levels, dtype).tobytes()


def test_torch_dither_kernels_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    y = _floats(3000, 2, "float32", True) / np.float32(4)
    u = np.random.default_rng(3).random(3000).astype(np.float32)
    want = ops.dither_codes(y, u, 8)
    for codes_of in (T.dither_codes, lambda *a: Ops.dither_codes(T, *a)):
        assert codes_of(torch.from_numpy(y), torch.from_numpy(u), 8).numpy().astype(np.int32).tobytes() == want.tobytes()
    for values_of in (T.dither_values, lambda *a: Ops.dither_values(T, *a)):
        got = values_of(torch.from_numpy(want.astype(np.int64)), 8, "float32")
        assert got.numpy().tobytes() == ops.dither_values(want, 8, "float32").tobytes()


@settings(max_examples=60, deadline=None)
@given(case=cases, bound=st.sampled_from([0.5, 1e-3, np.inf, np.nan]))
def test_clip_magnitude_equals_the_default(case, bound):
    n, seed, dtype, specials = case
    x = _floats(n, seed, dtype, specials)
    b = np.array([bound], dtype)
    got = ops.clip_magnitude(x, b)
    assert same_bits(got, Ops.clip_magnitude(ops, x, b))
    finite = np.isfinite(x)
    assert np.all(np.isnan(got[~finite]))  # NaN and +-inf come out NaN
    if bound == bound:
        assert np.all(np.abs(got[finite]) <= b[0])
    else:
        assert np.all(np.isnan(got))


@settings(max_examples=60, deadline=None)
@given(case=cases, levels=st.sampled_from([1, 7, 127]), width=st.sampled_from([1, 5, 64]))
def test_bucket_levels_equal_the_default(case, levels, width):
    n, seed, dtype, specials = case
    rows = -(-n // width)
    x = np.zeros(rows * width, dtype)
    x[:n] = _floats(n, seed, dtype, specials)
    grid = x.reshape(rows, width)
    noise = np.random.default_rng(seed).random(rows * width, dtype=np.float32).astype(dtype).reshape(rows, width)
    with np.errstate(all="ignore"):
        norms, codes = ops.bucket_levels(grid, noise, levels)
        want_norms, want_codes = Ops.bucket_levels(ops, grid, noise, levels)
    assert same_bits(norms, want_norms)
    assert codes.dtype == np.int32 and np.array_equal(codes, want_codes)
    finite = np.isfinite(grid).all(axis=1).repeat(width)
    assert np.all((codes[finite] >= 0) & (codes[finite] <= 2 * levels))


def test_torch_clip_and_bucket_kernels_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    x = _floats(3000, 5, "float32", True)
    b = np.array([0.7], np.float32)
    assert same_bits(T.clip_magnitude(torch.from_numpy(x), torch.from_numpy(b)).numpy(), ops.clip_magnitude(x, b))
    assert same_bits(Ops.clip_magnitude(T, torch.from_numpy(x), torch.from_numpy(b)).numpy(),
                     ops.clip_magnitude(x, b))
    grid = _floats(3072, 6, "float32", False).reshape(6, 512)
    noise = np.random.default_rng(7).random(3072, dtype=np.float32).reshape(6, 512)
    want = ops.bucket_levels(grid, noise, 127)
    got = T.bucket_levels(torch.from_numpy(grid), torch.from_numpy(noise), 127)  # NumPy's kernel on CPU
    assert same_bits(got[0].numpy(), want[0]) and np.array_equal(got[1].numpy(), want[1])
    # the default through torch's own row sums (another order of addition): same norms but
    # for rounding, and codes that differ by at most one level where a norm's last bit does
    norms, codes = Ops.bucket_levels(T, torch.from_numpy(grid), torch.from_numpy(noise), 127)
    np.testing.assert_allclose(norms.numpy(), want[0], rtol=1e-6)
    assert np.max(np.abs(codes.numpy().astype(np.int64) - want[1])) <= 1


@pytest.mark.parametrize("n", [0, 1, 5, 1000, 4097])
@pytest.mark.parametrize("specials", [False, True])
def test_peak_rms_on_numpy_and_torch(n, specials):
    x = _floats(n, n + 3, "float32", specials)
    with np.errstate(all="ignore"):
        got = ops.peak_rms(x)
    if n and not specials:
        peak = np.max(np.abs(x))
        assert got[0] == peak
        np.testing.assert_allclose(got[1], np.sqrt(np.mean(x.astype(np.float64) ** 2)), rtol=1e-5)
    if specials and n and not np.all(np.isfinite(x)):
        assert np.isnan(got[0])
    if n == 0:
        assert got.tolist() == [0.0, 0.0]
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    t = torch.from_numpy(x.copy())
    assert same_bits(T.peak_rms(t).numpy(), got)  # NumPy's steps on CPU
    assert same_bits(Ops.peak_rms(T, t).numpy(), got)  # torch's own: a fixed order, a correctly rounded sqrt


@pytest.mark.parametrize("n,bucket", [(0, 4), (1, 4), (12, 4), (13, 4), (1000, 512), (1025, 512)])
def test_scale_buckets_kernels_equal_the_default(n, bucket):
    x = _floats(n, n, "float32", True)
    scales = _floats(-(-n // bucket), n + 1, "float32", False)
    with np.errstate(all="ignore"):
        got = ops.scale_buckets(x, scales, bucket)
        want = Ops.scale_buckets(ops, x, scales, bucket)
    assert same_bits(got, want) and same_bits(got, x * np.repeat(scales, bucket)[:n])
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    for backend_got in (T.scale_buckets(torch.from_numpy(x), torch.from_numpy(scales), bucket),
                        Ops.scale_buckets(T, torch.from_numpy(x), torch.from_numpy(scales), bucket)):
        assert same_bits(backend_got.numpy(), got)


@settings(max_examples=60, deadline=None)
@given(case=cases, clip=st.sampled_from([0.5, 1e-3, np.inf, np.nan]), bound=st.sampled_from([0.4, 1.0]))
def test_clipped_ternary_codes_equal_the_default(case, clip, bound):
    n, seed, dtype, specials = case
    x = _floats(n, seed, dtype, specials)
    u = np.random.default_rng(seed + 7).random(n).astype(dtype)
    c, b = np.array([clip], dtype), np.array([bound], dtype)
    got = ops.clipped_ternary_codes(x, c, b, u)
    assert got.dtype == np.uint8
    assert got.tobytes() == Ops.clipped_ternary_codes(ops, x, c, b, u).tobytes()
    assert got.tobytes() == ops.ternary_codes(ops.clip_magnitude(x, c), b, u).tobytes()
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    t = [torch.from_numpy(a) for a in (x, c, b, u)]
    assert T.clipped_ternary_codes(*t).numpy().tobytes() == got.tobytes()
    assert Ops.clipped_ternary_codes(T, *t).numpy().tobytes() == got.tobytes()


@pytest.mark.parametrize("n", [2, 3, 64, (1 << 16) + 3, 3 * (1 << 16) + 7])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_peak_rms_kernel_equals_the_default_across_its_chunks(n, dtype):
    # NumPy's kernel squares a chunk at a time into the first level of the tree
    x = _floats(n, n, dtype, False) * np.asarray(1e3, dtype)
    got = ops.peak_rms(x)
    assert got.dtype == np.dtype(dtype) and got.tobytes() == Ops.peak_rms(ops, x).tobytes()
    assert np.all(np.isnan(ops.peak_rms(np.concatenate([x, np.array([np.inf], dtype)]))))


@pytest.mark.parametrize("key, counter", [(0, 0), (12345, 7), (2**64 + 5, 2**64 + 3), (2**128 - 1, 2**256 - 1), (3, 2**70)])
def test_random_uniform_reuses_one_philox_with_a_fresh_generators_draws(key, counter):
    # the backend sets the state of one Philox per thread instead of constructing one
    raw = np.random.Philox(key=key, counter=counter).random_raw(5)
    want = (raw.view("<u4") >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    for _ in range(2):
        assert ops.random_uniform(10, key, counter, None).tobytes() == want.tobytes()
    assert ops.random_uniform(9, key, counter, None).tobytes() == want[:9].tobytes()
    with pytest.raises((ValueError, OverflowError)):
        ops.random_uniform(4, -1, 0, None)


@pytest.mark.parametrize("n", [0, 1, 5, (1 << 20) + 3])
@pytest.mark.parametrize("bits", [1, 9, 23])
def test_uniform_ints_are_the_truncated_scaled_uniforms(n, bits):
    # NumPy makes them from the raw words (in blocks of 2**20 draws); the default from the
    # float32 draws: the same integers
    got = ops.uniform_ints(n, bits, 2**63 + 5, 11, None)
    assert got.dtype == np.int32 and got.tobytes() == Ops.uniform_ints(ops, n, bits, 2**63 + 5, 11, None).tobytes()
    assert got.min(initial=0) >= 0 and got.max(initial=0) < 1 << bits
    want = np.random.Generator(np.random.Philox(key=2**63 + 5, counter=11)).random(n, dtype=np.float32)
    assert ops.random_uniform(n, 2**63 + 5, 11, None).tobytes() == want.tobytes()


def test_torch_uniform_ints_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    like = torch.zeros(1)
    want = ops.uniform_ints(3001, 23, 7, 2, None)
    for draw in (T.uniform_ints, lambda *a: Ops.uniform_ints(T, *a)):
        got = draw(3001, 23, 7, 2, like)
        assert got.dtype == torch.int32 and got.numpy().tobytes() == want.tobytes()


@settings(max_examples=40, deadline=None)
@given(case=cases)
def test_tree_sum_in_a_wider_dtype_is_the_tree_sum_of_the_cast(case):
    n, seed, _, specials = case
    x = _floats(n, seed, "float32", specials)
    want = Ops.tree_sum_in(ops, x, "float64") if n else None
    if n:
        assert same_bits(ops.tree_sum_in(x, "float64"), want)
        assert same_bits(ops.tree_sum_in(x, "float64"), ops.tree_sum(x.astype(np.float64)))
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    if n:
        assert same_bits(TorchOps().tree_sum_in(torch.from_numpy(x), "float64").numpy(), want)


STATS = [(2.0, 0.5), (0.3, 0.5), (0.0, 0.0), (np.nan, np.nan), (3.0, np.nan), (np.inf, np.nan), (1e30, 1e30)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sigma", [2.5, 0.3])
def test_clip_scales_equal_the_default_with_a_canonical_nan(dtype, sigma):
    nan_bits = np.array([np.nan], dtype).tobytes()  # NumPy's NaN: the positive quiet one
    for p, r in STATS:
        stats = np.array([p, r], dtype)
        got = ops.clip_scales(stats, sigma)
        want = Ops.clip_scales(ops, stats, sigma)
        assert got.dtype == np.dtype(dtype) and got.tobytes() == want.tobytes(), (p, r)
        for value in got[1:]:
            if value != value:
                assert np.array([value], dtype).tobytes() == nan_bits  # never a negative NaN
    b, s, q = ops.clip_scales(np.array([2.0, 0.5], dtype), sigma)
    assert b == np.array(0.5, dtype) * np.array(sigma, dtype) and s == min(2.0, b) and q == s
    assert list(ops.clip_scales(np.array([0.0, 0.0], dtype), sigma)) == [0.0, 0.0, 1.0]
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.clip_scales(np.array([1.0, 1.0], np.float16), sigma)


def test_torch_and_tf_clip_scales_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    for dtype in ("float32", "float64"):
        for p, r in STATS:
            stats = np.array([p, r], dtype)
            want = ops.clip_scales(stats, 2.5).tobytes()
            assert T.clip_scales(torch.from_numpy(stats), 2.5).numpy().tobytes() == want  # NumPy's kernel
            assert Ops.clip_scales(T, torch.from_numpy(stats), 2.5).numpy().tobytes() == want  # torch's steps
    tf = pytest.importorskip("tensorflow")
    from grace_dl.tensorflow.ops import TFOps

    F = TFOps()
    scales = tf.function(lambda s: F.clip_scales(s, 2.5))  # the default, traced
    for p, r in STATS:
        stats = np.array([p, r], np.float32)
        assert scales(tf.constant(stats)).numpy().tobytes() == ops.clip_scales(stats, 2.5).tobytes()


def test_bucket_levels_kernel_across_its_row_blocks():
    # more rows than one block of the NumPy kernel holds, with NaN, Inf and zero rows
    x = _floats(700 * 512, 11, "float32", True)
    x[512 * 300:512 * 301] = 0.0
    grid = x.reshape(700, 512)
    noise = np.random.default_rng(12).random(grid.shape, dtype=np.float32)
    with np.errstate(all="ignore"):
        norms, codes = ops.bucket_levels(grid, noise, 127)
        want_norms, want_codes = Ops.bucket_levels(ops, grid, noise, 127)
    assert same_bits(norms, want_norms) and np.array_equal(codes, want_codes)


@pytest.mark.parametrize("n", [1 << 16, (1 << 16) + 1, 200_003])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bits", [8, 5, 7])
def test_take_fields_of_long_streams(n, dtype, bits):
    # NumPy looks float32 fields up two at a time from n = 2**16 on (fields narrower
    # than a byte through a table padded to 256 entries)
    fields = np.random.default_rng(n).integers(0, 1 << bits, n)
    values = np.random.default_rng(1).standard_normal(1 << bits).astype(dtype)
    values[3] = -0.0
    got = ops.take_fields(ops.pack_uint(fields, bits), n, bits, values)
    assert got.dtype == np.dtype(dtype) and got.tobytes() == values[fields].tobytes()


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
@pytest.mark.parametrize("n", [63, 64, 65, 4097])
def test_narrow_fields_pack_and_unpack_as_the_generic_bit_stream(bits, n):
    # NumPy packs 64 fields narrower than a byte into `bits` 64-bit words; garbage past
    # the stream must not reach the fields
    v = np.random.default_rng(bits * n).integers(0, 1 << bits, n)
    words = ops.pack_uint(v, bits)
    assert words.tobytes() == Ops.pack_uint(ops, v, bits).tobytes()
    padded = np.concatenate([words, np.array([-1, -1], np.int32)])
    assert np.array_equal(ops.unpack_uint(padded, n, bits), v)


@pytest.mark.parametrize("levels,bucket", [(8, 512), (3, 7), (1, 1), (126, 33), (15, 100), (7, 64)])
@pytest.mark.parametrize("n", [0, 1, 31, 1000, 70_001])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dither_bucket_words_and_values_equal_the_defaults(levels, bucket, n, dtype):
    # the NumPy kernel draws, takes the max-norms, dithers and packs a block at a time;
    # the default does the protocol's steps a chunk at a time
    x = _floats(n, n + levels, dtype, True)
    if n > 600:
        x[500:540] = 0.0  # a zero bucket (divided by 1), and subnormal ratios
        x[540:560] = 1e-42
    with np.errstate(all="ignore"):
        got = ops.dither_bucket_words(x, levels, bucket, 2**70 + 5, 3)
        want = Ops.dither_bucket_words(ops, x, levels, bucket, 2**70 + 5, 3)
        assert got.dtype == np.int32 and got.tobytes() == want.tobytes()
        values = ops.dither_bucket_values(want, n, levels, bucket, dtype)
        assert same_bits(values, Ops.dither_bucket_values(ops, want, n, levels, bucket, dtype))


def test_torch_dither_bucket_kernels_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    for n, dtype in [(0, "float32"), (5000, "float32"), (1023, "float64")]:
        x = _floats(n, 3, dtype, True)
        with np.errstate(all="ignore"):
            want = ops.dither_bucket_words(x, 8, 512, 9, 1)
            assert T.dither_bucket_words(torch.from_numpy(x), 8, 512, 9, 1).numpy().tobytes() == want.tobytes()
            via_default = Ops.dither_bucket_words(T, torch.from_numpy(x), 8, 512, 9, 1)
            assert via_default.numpy().tobytes() == want.tobytes()
            back = T.dither_bucket_values(torch.from_numpy(want), n, 8, 512, dtype)
            assert same_bits(back.numpy(), ops.dither_bucket_values(want, n, 8, 512, dtype))


@pytest.mark.parametrize("levels,bucket", [(127, 512), (3, 7), (300, 100), (15, 512), (1, 1), (127, 33)])
@pytest.mark.parametrize("n", [0, 1, 31, 1000, 70_001])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bucket_level_words_and_values_equal_the_defaults(levels, bucket, n, dtype):
    # the NumPy kernel draws, quantizes and packs a block at a time; the default does
    # the protocol's steps on the whole tensor (a chunk at a time)
    x = _floats(n, n + levels, dtype, True)
    with np.errstate(all="ignore"):
        got = ops.bucket_level_words(x, levels, bucket, 2**70 + 5, 3)
        want = Ops.bucket_level_words(ops, x, levels, bucket, 2**70 + 5, 3)
        assert got.dtype == np.int32 and got.tobytes() == want.tobytes()
        values = ops.bucket_level_values(want, n, levels, bucket, dtype)
        assert same_bits(values, Ops.bucket_level_values(ops, want, n, levels, bucket, dtype))


def test_torch_bucket_level_kernels_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    for n, dtype in [(0, "float32"), (5000, "float32"), (1023, "float64")]:
        x = _floats(n, 3, dtype, True)
        with np.errstate(all="ignore"):
            want = ops.bucket_level_words(x, 127, 512, 9, 1)
            got = T.bucket_level_words(torch.from_numpy(x), 127, 512, 9, 1)
            assert got.numpy().tobytes() == want.tobytes()
            back = T.bucket_level_values(torch.from_numpy(want), n, 127, 512, dtype)
            assert same_bits(back.numpy(), ops.bucket_level_values(want, n, 127, 512, dtype))


@pytest.mark.parametrize("n", [0, 1, 15, 17, 1000, 70_001])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("specials", [False, True])
def test_clipped_ternary_words_and_values_equal_the_defaults(n, dtype, specials):
    x = _floats(n, n + 7, dtype, specials)
    with np.errstate(all="ignore"):
        got = ops.clipped_ternary_words(x, 2.5, 2**80 + 1, 4)
        want = Ops.clipped_ternary_words(ops, x, 2.5, 2**80 + 1, 4)
        assert got.dtype == np.int32 and got.tobytes() == want.tobytes()
        assert same_bits(ops.ternary_values(want, n, dtype), Ops.ternary_values(ops, want, n, dtype))


def test_torch_ternary_word_kernels_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    for n, dtype, specials in [(0, "float32", False), (5000, "float32", False), (1023, "float64", True)]:
        x = _floats(n, 3, dtype, specials)
        with np.errstate(all="ignore"):
            want = ops.clipped_ternary_words(x, 2.5, 9, 1)
            assert T.clipped_ternary_words(torch.from_numpy(x), 2.5, 9, 1).numpy().tobytes() == want.tobytes()
            back = T.ternary_values(torch.from_numpy(want), n, dtype)
            assert same_bits(back.numpy(), ops.ternary_values(want, n, dtype))


@pytest.mark.parametrize("n", list(range(0, 90)) + [1000, 32_769, 70_001])
def test_power_of_two_words_and_values_equal_the_defaults(n):
    # every tail length of the 9-byte groups of eight codes, and more than one block
    x = _floats(n, n + 11, "float32", True)
    got = ops.power_of_two_words(x, 2**90 + 3, 7)
    want = Ops.power_of_two_words(ops, x, 2**90 + 3, 7)
    assert got.dtype == np.int32 and got.tobytes() == want.tobytes()
    values = ops.power_of_two_from_words(want, n)
    assert values.dtype == np.float32 and values.tobytes() == Ops.power_of_two_from_words(ops, want, n).tobytes()


def test_torch_power_of_two_word_kernels_match_numpy():
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    T = TorchOps()
    for n in (0, 25, 5000):
        x = _floats(n, 3, "float32", True)
        want = ops.power_of_two_words(x, 9, 1)
        assert T.power_of_two_words(torch.from_numpy(x), 9, 1).numpy().tobytes() == want.tobytes()
        back = T.power_of_two_from_words(torch.from_numpy(want), n)
        assert back.numpy().tobytes() == ops.power_of_two_from_words(want, n).tobytes()
