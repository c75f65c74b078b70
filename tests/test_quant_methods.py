"""bf16, terngrad, natural and natural_dithering: the papers' claims (unbiasedness,
variance), exact wire sizes, edge cases (zero, subnormals, NaN/Inf, sizes off the
bucket), bit-identical payloads on NumPy, torch and TensorFlow given the same random
draws, and the N-worker simulator (including TernGrad's shared, summable scale)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grace_dl
from grace_dl.compressors.fp16 import bfloat16_bits
from grace_dl.compressors.natural import _draw_below
from grace_dl.compressors.terngrad import MAX_SHARED_WORKERS, lane_bits, shared_payload_nbytes
from grace_dl.ops.numpy_backend import NumpyOps
from grace_dl.registry import ConfigError

from helpers import make_ctx, normal

try:  # NumPy's bfloat16 dtype; ships with TensorFlow and JAX
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

ops = NumpyOps()
needs_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 NumPy arrays need ml_dtypes")
MINE = ["bf16", "natural", "natural_dithering", "terngrad"]


def compressor(name, **kwargs):
    if name == "bf16" and ml_dtypes is None:
        pytest.skip("bfloat16 NumPy arrays need ml_dtypes")
    return grace_dl.make(name, **kwargs).compressor


def round_trip(comp, x, **ctx_args):
    ctx = make_ctx(len(x), dtype=x.dtype.name, **ctx_args)
    payload = comp.compress(ops, x, ctx)
    return payload, comp.decompress(ops, payload.buffer, ctx)


def outputs(comp, x, trials, **ctx_args):
    """Decompressed outputs of ``trials`` independent compressions (steps 0..trials-1), float64."""
    return np.stack([round_trip(comp, x, step=t, **ctx_args)[1] for t in range(trials)]).astype(np.float64)


def assert_unbiased(outs, target):
    """z-test per element: 5 sigma over at most a few hundred elements essentially never
    fails by chance, while a bias of a few standard errors does."""
    trials = len(outs)
    mean, std = outs.mean(0), outs.std(0)
    # (elements sent exactly have std 0 up to the rounding of the float64 mean)
    z = np.abs(mean - target) / (std / np.sqrt(trials) + 1e-9 * np.abs(target) + 1e-30)
    assert z.max() < 5.0, f"max z-score {z.max():.1f}: biased"
    assert std.max() > 0, "no randomness"


def wild(n, seed, dtype="float32"):
    """Normal values spread over the whole exponent range of ``dtype``, with zeros."""
    rng = np.random.default_rng(seed)
    lo, hi = (-44, 37) if dtype == "float32" else (-300, 300)
    x = rng.standard_normal(n) * 10.0 ** rng.integers(lo, hi, n)
    x[rng.random(n) < 0.05] = 0
    return x.astype(dtype)


def powers_of_two_or_zero(a):
    a = np.abs(a[np.isfinite(a)].astype(np.float64))
    a = a[a > 0]
    mantissa, _ = np.frexp(a)
    return np.all(mantissa == 0.5)


# -- bf16 -------------------------------------------------------------------------------------
def bf16_value(bits: int) -> float:
    return float(np.array([bits], np.uint16).view(ml_dtypes.bfloat16)[0])


def bf16_reference(v: float) -> int:
    """The correctly rounded (nearest, ties to even) bfloat16 pattern of float ``v``,
    by exact rational arithmetic."""
    sign = 0x8000 if math.copysign(1.0, v) < 0 else 0
    if math.isinf(v):
        return sign | 0x7F80
    target = abs(Fraction(v))
    largest = Fraction(bf16_value(0x7F7F))
    if target >= largest + Fraction(2) ** (127 - 8):  # past the midpoint to 2**128: inf
        return sign | 0x7F80
    lo, hi = 0, 0x7F7F  # the largest pattern whose value is <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if Fraction(bf16_value(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0x7F7F:  # below the midpoint to inf
        return sign | lo
    down, up = lo, lo + 1
    d_down, d_up = target - Fraction(bf16_value(down)), Fraction(bf16_value(up)) - target
    best = down if d_down < d_up or (d_down == d_up and down % 2 == 0) else up
    return sign | best


@needs_ml_dtypes
def test_bf16_bits_of_float32_match_ml_dtypes_and_keep_subnormals():
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    subnormals = np.arange(1, 2**23, 97, dtype=np.uint32)
    patterns = np.concatenate([patterns, subnormals, subnormals | 0x80000000])
    x = patterns.view(np.float32)
    got = bfloat16_bits(ops, x)
    finite_or_inf = ~np.isnan(x)
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.int64)
    assert np.array_equal(got[finite_or_inf], want[finite_or_inf])
    # subnormal inputs are not flushed: those above half the smallest bf16 subnormal stay nonzero
    positive, negative = got[-2 * len(subnormals):-len(subnormals)], got[-len(subnormals):]
    assert np.all(positive[subnormals > 0x8000] > 0) and np.all(negative[subnormals > 0x8000] > 0x8000)
    # NaN: the quiet NaN with the input's sign
    nan_bits = got[np.isnan(x)]
    assert set(nan_bits.tolist()) == {0x7FC0, 0xFFC0}


@needs_ml_dtypes
def test_bf16_bits_of_float64_round_once():
    rng = np.random.default_rng(1)
    b = rng.integers(0, 0x7F7F, 400).astype(np.uint16)
    lo = b.view(ml_dtypes.bfloat16).astype(np.float64)
    hi = (b + 1).view(ml_dtypes.bfloat16).astype(np.float64)
    mid = (lo + hi) / 2  # exact in float64
    special = [1e-40, 3e-41, 2**-133 * 1.5, 2**-134, 2**-134 * (1 + 2**-40), 2**-149, 2**-150,
               2**-150 * (1 + 2**-30), 2**-151, 1e-300, 3.3961e38, 3.3962e38, 3.4e38, 1e300, 0.0, -0.0,
               np.inf, -np.inf]
    values = np.concatenate([mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf), -mid * (1 + 2**-35),
                             special, np.negative(special), wild(300, 2, "float64")])
    got = bfloat16_bits(ops, values)
    want = np.array([bf16_reference(float(v)) for v in values])
    assert np.array_equal(got, want)
    # the double rounding this avoids does happen through float32 (ml_dtypes' path)
    assert np.any(values.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16) != got)


@needs_ml_dtypes
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 1000])
@pytest.mark.parametrize("summable", [False, True])
def test_bf16_round_trip(dtype, n, summable):
    comp = compressor("bf16", summable=summable)
    x = normal(n, seed=n, dtype=dtype) * 1e3
    payload, out = round_trip(comp, x)
    assert payload.nbytes == payload.buffer.nbytes == comp.payload_nbytes(n, dtype)
    if summable:
        assert payload.buffer.dtype == ml_dtypes.bfloat16 and payload.nbytes == 2 * n
    else:  # the same bits as int32 words, two elements each
        assert payload.buffer.dtype == np.int32 and payload.nbytes == 4 * math.ceil(n / 2)
        summed = compressor("bf16", summable=True).compress(ops, x, make_ctx(n, dtype=dtype)).buffer
        assert payload.buffer.view(np.uint16)[:n].tobytes() == summed.tobytes()
    assert out.dtype == np.dtype(dtype)
    assert np.all(np.abs(out - x) <= np.abs(x) * 2.0**-8)  # 8 significant bits
    assert np.array_equal(out, out.astype(ml_dtypes.bfloat16).astype(dtype))  # on the bf16 grid
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.4e38], dtype)
    _, out = round_trip(comp, special)
    assert out[:4].tolist() == [0.0, 0.0, np.inf, -np.inf] and np.signbit(out[1]) and np.isnan(out[4])
    assert out[5] > 0 and out[6] < 0 and np.isinf(out[7])  # subnormals kept; 3.4e38 rounds past the max


@needs_ml_dtypes
@pytest.mark.parametrize("summable", [False, True])
def test_bf16_in_the_simulator(summable):
    grads = [{"w": normal(101, seed=r) * (r + 1)} for r in range(4)]
    method = grace_dl.bf16(summable=True, communicator="allreduce") if summable else grace_dl.bf16()
    sim = grace_dl.LocalSimulator(method, 4)
    out = sim.step(grads)
    narrow = [g["w"].astype(ml_dtypes.bfloat16) for g in grads]
    # summable: the transport adds bfloat16 buffers in rank order; otherwise each worker's
    # values are widened to float32 and added in rank order
    total = narrow[0] if summable else narrow[0].astype(np.float32)
    for b in narrow[1:]:
        total = total + (b if summable else b.astype(np.float32))
    want = total.astype(np.float32) * np.float32(0.25)
    for o in out:
        assert np.array_equal(o["w"], want)
    stats = sim.workers[0].stats
    assert stats.payload == (202 if summable else 204) and stats.dense == 404


# -- natural compression ---------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 1500), dtype=st.sampled_from(["float32", "float64"]))
def test_natural_wire_size(n, dtype):
    comp = compressor("natural")
    payload, out = round_trip(comp, normal(n, seed=n, dtype=dtype))
    bits = 9 if dtype == "float32" else 12
    assert payload.nbytes == payload.buffer.nbytes == 4 * math.ceil(bits * n / 32) == comp.payload_nbytes(n, dtype)
    assert out.shape == (n,) and out.dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_natural_rounds_to_a_neighbouring_power_of_two(dtype):
    x = wild(5000, 3, dtype)
    if dtype == "float32":
        x[:50] = np.float32(2.0**-149) * np.arange(1, 51, dtype=np.float32) * 997  # subnormals
    for step in range(3):
        _, out = round_trip(compressor("natural"), x, step=step)
        assert powers_of_two_or_zero(out)
        nz = x != 0
        assert np.all(np.sign(out[nz & (out != 0)]) == np.sign(x[nz & (out != 0)]))
        a, c = np.abs(x.astype(np.float64)), np.abs(out.astype(np.float64))
        tiny = np.finfo(dtype).tiny
        floor_pow2 = np.where(a >= tiny, 2.0 ** np.floor(np.log2(np.where(a > 0, a, 1))), 0.0)
        ceil_pow2 = np.where(a >= tiny, floor_pow2 * 2, tiny)  # subnormals: 0 or the smallest normal
        assert np.all((c == floor_pow2) | (c == ceil_pow2))
        exact = a == floor_pow2  # powers of two are sent exactly
        assert np.array_equal(c[exact], a[exact])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_natural_rounds_up_with_probability_equal_to_the_mantissa(dtype):
    n = 40_000
    for value, p in ((1.25, 0.25), (-1.75, 0.75), (3.0, 0.5), (1.0 + 2.0**-7, 2.0**-7)):
        _, out = round_trip(compressor("natural"), np.full(n, value, dtype))
        up = np.mean(np.abs(out) > abs(value))
        assert abs(up - p) < 5 * math.sqrt(p * (1 - p) / n), (value, up)
    # a subnormal halfway to the smallest normal: 0 or 2**-126 with probability 1/2 each
    if dtype == "float32":
        _, out = round_trip(compressor("natural"), np.full(n, 2.0**-127, np.float32))
        assert set(np.unique(out).tolist()) == {0.0, 2.0**-126}
        assert abs(np.mean(out > 0) - 0.5) < 5 * math.sqrt(0.25 / n)


class _FixedDraws(NumpyOps):
    """NumPy ops whose uniform draws are given: ``r / 2**23`` for integers ``r``."""

    def __init__(self, r):
        self.r = np.asarray(r, np.int64)

    def random_uniform(self, n, key, counter, like):
        assert n == len(self.r)
        return (self.r / 2.0**23).astype(np.float32)


@settings(max_examples=200, deadline=None)
@given(mantissa=st.integers(0, 2**52 - 1), r=st.lists(st.integers(0, 2**23 - 1), min_size=3, max_size=3),
       tie=st.integers(0, 3))
def test_natural_float64_comparison_is_exact(mantissa, r, tie):
    # three 23-bit draws form R of 69 bits; "below" must be exactly R < mantissa * 2**17
    aligned = mantissa << 17
    chunks = [(aligned >> 46) & (2**23 - 1), (aligned >> 23) & (2**23 - 1), aligned & (2**23 - 1)]
    r = list(r)
    for j in range(min(tie, 3)):  # make leading chunks equal, to exercise the tie-breaking
        r[j] = chunks[j]
    fake = _FixedDraws(r)
    below = _draw_below(fake, np.array([mantissa], np.int64), 52, make_ctx(1, dtype="float64"))
    big_r = (r[0] << 46) | (r[1] << 23) | r[2]
    assert bool(below[0]) == (big_r < aligned)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_natural_is_unbiased_with_second_moment_at_most_nine_eighths(dtype):
    x = normal(64, seed=4, dtype=dtype)
    x[:4] = [3e-39, -2e-39, 1e-30, 2.0] if dtype == "float32" else [1e-310, -3e-309, 1e-300, 2.0]
    outs = outputs(compressor("natural"), x, 3000)
    assert_unbiased(outs, x.astype(np.float64))
    second = (outs**2).mean(0).sum() / (x.astype(np.float64) ** 2).sum()
    assert 1.0 < second < 9 / 8 * 1.02


def test_natural_special_values():
    comp = compressor("natural")
    for dtype, big in (("float32", np.float32(3.3e38)), ("float64", 1.7e308)):
        x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, big, -big, np.finfo(dtype).max], dtype)
        for step in range(20):
            _, out = round_trip(comp, x, step=step)
            assert out[0] == 0 and out[1] == 0 and not np.signbit(out[1])
            assert out[2] == np.inf and out[3] == -np.inf and np.isnan(out[4])
            top = 2.0**127 if dtype == "float32" else 2.0**1023
            assert out[5] == top and out[6] == -top and out[7] == top  # never rounded up to inf


# -- natural dithering ------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 1200), levels=st.integers(1, 126), bucket=st.integers(1, 700),
       dtype=st.sampled_from(["float32", "float64"]), p=st.sampled_from(["inf", "2"]))
def test_natural_dithering_wire_size(n, levels, bucket, dtype, p):
    comp = compressor("natural_dithering", levels=levels, bucket_size=bucket, p=p)
    payload, out = round_trip(comp, normal(n, seed=n, dtype=dtype))
    bits = math.ceil(math.log2(2 * levels + 1))
    formula = np.dtype(dtype).itemsize * math.ceil(n / bucket) + 4 * math.ceil(n * bits / 32)
    assert payload.nbytes == payload.buffer.nbytes == formula == comp.payload_nbytes(n, dtype)
    assert comp.bits == bits and out.shape == (n,) and np.isfinite(out).all()


def bucket_norms(x, bucket, p):
    pad = -len(x) % bucket
    grid = np.concatenate([x.astype(np.float64), np.zeros(pad)]).reshape(-1, bucket)
    norms = np.abs(grid).max(1) if p == "inf" else np.linalg.norm(grid, axis=1)
    return np.repeat(norms, bucket)[:len(x)]


@pytest.mark.parametrize("p", ["inf", "2"])
@pytest.mark.parametrize("levels", [1, 3, 8])
def test_natural_dithering_lands_on_adjacent_levels(p, levels):
    bucket = 50
    comp = compressor("natural_dithering", levels=levels, bucket_size=bucket, p=p)
    x = normal(333, seed=levels) * np.exp(normal(333, seed=9))  # heavy tails: many levels used
    norms = bucket_norms(x, bucket, p)
    y = np.abs(x) / norms
    grid = np.concatenate([[0.0], 2.0 ** np.arange(1 - levels, 1)])
    below = grid[np.searchsorted(grid, y, side="right") - 1]
    above = grid[np.minimum(np.searchsorted(grid, y, side="right"), levels)]
    for step in range(5):
        _, out = round_trip(comp, x, step=step)
        level = np.abs(out) / norms
        nearest = grid[np.abs(level[:, None] - grid[None, :]).argmin(1)]
        np.testing.assert_allclose(level, nearest, rtol=1e-5, atol=1e-12)  # on the grid
        assert np.all(np.isclose(level, below, rtol=1e-5, atol=0) | np.isclose(level, above, rtol=1e-5, atol=0))
        assert np.all((out == 0) | (np.sign(out) == np.sign(x)))


@pytest.mark.parametrize("p,dtype", [("inf", "float32"), ("2", "float32"), ("inf", "float64"), ("2", "float64")])
def test_natural_dithering_is_unbiased_with_dithering_variance(p, dtype):
    levels, bucket = 3, 24
    comp = compressor("natural_dithering", levels=levels, bucket_size=bucket, p=p)
    x = normal(60, seed=5, dtype=dtype)
    x[:3] = [1e-3, -2e-3, 0.0]  # below the lowest level: linear dithering between 0 and 2**(1-s)
    trials = 3000 if dtype == "float32" else 1500
    outs = outputs(comp, x, trials)
    keep = np.arange(60) != 2
    assert_unbiased(outs[:, keep], x.astype(np.float64)[keep])
    assert np.all(outs[:, 2] == 0)
    # variance of dithering between adjacent levels a <= y < b: (b - y)(y - a) <= (b - a)**2 / 4
    norms = bucket_norms(x, bucket, p)
    y = np.abs(x.astype(np.float64)) / norms
    grid = np.concatenate([[0.0], 2.0 ** np.arange(1 - levels, 1)])
    i = np.searchsorted(grid, y, side="right") - 1
    a, b = grid[i], grid[np.minimum(i + 1, levels)]
    expected = (b - y) * (y - a) * norms**2
    # summed over the elements: per-element estimates of rare roundings are too noisy
    np.testing.assert_allclose(outs.var(0).sum(), expected.sum(), rtol=0.05)
    assert expected.sum() > 0


def test_natural_dithering_buckets_with_zero_nan_or_inf():
    comp = compressor("natural_dithering", bucket_size=4)
    x = np.array([0, 0, 0, 0, 1, np.nan, 2, 3, -1, np.inf, 5, 6, 7, 0.5, -0.25, 1e-3, 2], np.float32)
    _, out = round_trip(comp, x)
    assert np.array_equal(out[:4], np.zeros(4))
    assert np.isnan(out[4:12]).all()  # the two buckets holding NaN and Inf
    assert np.isfinite(out[12:]).all() and out[12] == 7 and out[16] == 2  # each bucket's max is sent exactly


def test_natural_dithering_parameter_errors():
    for kwargs in ({"levels": 0}, {"levels": 127}, {"bucket_size": 0}, {"p": "1"}, {"p": 2}):
        with pytest.raises(ConfigError):
            grace_dl.make("natural_dithering", **kwargs)


# -- terngrad -------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 1500), dtype=st.sampled_from(["float32", "float64"]))
def test_terngrad_wire_size(n, dtype):
    comp = compressor("terngrad")
    payload, out = round_trip(comp, normal(n, seed=n, dtype=dtype))
    formula = 4 * math.ceil(2 * n / 32) + np.dtype(dtype).itemsize
    assert payload.nbytes == payload.buffer.nbytes == formula == comp.payload_nbytes(n, dtype)
    assert out.shape == (n,) and out.dtype == np.dtype(dtype)


def rms_clip(x, c):
    x = x.astype(np.float64)
    bound = c * np.sqrt(np.mean(x**2))
    return np.clip(x, -bound, bound), min(np.abs(x).max(), bound)


@pytest.mark.parametrize("clip_sigma", [2.5, 1.0, None])
def test_terngrad_values_and_scaler(clip_sigma):
    comp = compressor("terngrad", clip_sigma=clip_sigma)
    x = normal(500, seed=6)
    x[17] = 40.0  # an outlier the clipping cuts
    clipped, scale = rms_clip(x, clip_sigma) if clip_sigma else (x.astype(np.float64), 40.0)
    for step in range(3):
        _, out = round_trip(comp, x, step=step)
        magnitudes = np.unique(np.abs(out))
        assert len(magnitudes) == 2 and magnitudes[0] == 0  # {-s, 0, s}
        np.testing.assert_allclose(magnitudes[1], scale, rtol=1e-6)
        assert np.all((out == 0) | (np.sign(out) == np.sign(x)))
    if clip_sigma:
        assert scale < 40.0


@pytest.mark.parametrize("clip_sigma", [2.5, None])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_terngrad_is_unbiased_for_the_clipped_tensor(clip_sigma, dtype):
    comp = compressor("terngrad", clip_sigma=clip_sigma)
    assert comp.bias == ("unbiased" if clip_sigma is None else "biased")
    x = normal(64, seed=7, dtype=dtype)
    x[5] = 9.0  # clipped by 2.5 sigma
    clipped = comp.clip(ops, x, make_ctx(64, dtype=dtype))[0].astype(np.float64)
    if clip_sigma:
        np.testing.assert_allclose(clipped, rms_clip(x, clip_sigma)[0], rtol=1e-6)
    else:
        assert np.array_equal(clipped, x.astype(np.float64))
    assert_unbiased(outputs(comp, x, 3000), clipped)
    if clip_sigma:  # ... and not for x itself, at the clipped element
        outs = outputs(comp, x, 300)
        assert outs[:, 5].max() < 9.0


@pytest.mark.parametrize("x", [[5.0] * 10, [-3.0], [0.5, 0.5]])
def test_terngrad_constant_tensors_are_not_clipped_to_zero(x):
    x = np.array(x, np.float32)
    outs = outputs(compressor("terngrad"), x, 50)
    assert np.all(outs == x.astype(np.float64))  # |x| = scale: kept with probability 1


def test_terngrad_zero_nan_and_inf():
    comp = compressor("terngrad")
    assert np.array_equal(round_trip(comp, np.zeros(37, np.float32))[1], np.zeros(37, np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        x = normal(37, seed=1)
        x[4] = bad
        assert np.isnan(round_trip(comp, x)[1]).all()


def test_terngrad_parameter_errors():
    for kwargs in ({"clip_sigma": 0}, {"clip_sigma": -1.0}, {"shared_scale": 1}):
        with pytest.raises(ConfigError):
            grace_dl.make("terngrad", **kwargs)
    assert not compressor("terngrad").summable and compressor("terngrad", shared_scale=True).summable


def test_terngrad_shared_format_size():
    assert [lane_bits(n) for n in (1, 2, 4, 8, 16, 1000)] == [2, 3, 4, 5, 6, 11]
    # 4 workers: 7 lanes of 4 bits per word, a count word, the float32 scale as two halves
    assert shared_payload_nbytes(1000, "float32", 4) == 4 * (math.ceil(1000 / 7) + 1 + 2)
    assert shared_payload_nbytes(10, "float64", 16) == 4 * (2 + 1 + 4)
    comp = compressor("terngrad", shared_scale=True)
    assert comp.payload_nbytes(100) is None
    with pytest.raises(ValueError, match="at most"):
        comp.compress(ops, normal(5), make_ctx(5, world_size=MAX_SHARED_WORKERS + 1))


def _shared_sim(workers, communicator, **kwargs):
    return grace_dl.LocalSimulator(grace_dl.make("terngrad", shared_scale=True, communicator=communicator,
                                                 **kwargs), workers)


@pytest.mark.parametrize("workers", [1, 2, 4, 7])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_terngrad_shared_scale_in_the_simulator(workers, dtype):
    n = 101
    grads = [{"w": normal(n, seed=r, dtype=dtype) * (r + 1), "b": normal(3, seed=50 + r, dtype=dtype)}
             for r in range(workers)]
    reduced = _shared_sim(workers, "allreduce")
    gathered = _shared_sim(workers, "allgather")
    comp = reduced.workers[0].compressor
    for _step in range(3):
        out = reduced.step(grads)
        out_g = gathered.step(grads)
        for name in ("w", "b"):
            # every worker agrees on S = the largest clipped scaler, and on the result
            scales = [comp.clip(ops, g[name], make_ctx(len(g[name]), dtype=dtype))[1][0] for g in grads]
            shared = max(scales)
            for r in range(workers):
                assert np.array_equal(out[r][name], out[0][name])
                assert np.array_equal(out_g[r][name], out_g[0][name])
            # allgather adds the workers' s * t one by one, allreduce rounds (sum t) * s once
            np.testing.assert_allclose(out_g[0][name], out[0][name], rtol=1e-6, atol=0)
            counts = out[0][name].astype(np.float64) * workers / shared
            np.testing.assert_allclose(counts, np.round(counts), atol=1e-6)
            assert np.abs(np.round(counts)).max() <= workers
    # bytes: the one-scalar allgather plus the summable payload, per tensor and step
    itemsize = np.dtype(dtype).itemsize
    per_step = sum(shared_payload_nbytes(k, dtype, workers) + itemsize for k in (n, 3))
    for sim in (reduced, gathered):
        assert sim.workers[0].stats.payload == 3 * per_step


def test_terngrad_shared_scale_is_unbiased_for_the_mean_of_clipped_gradients():
    workers, n, trials = 4, 24, 1000
    grads = [normal(n, seed=10 + r) * (1 + r) for r in range(workers)]
    sim = _shared_sim(workers, "allreduce")
    outs = np.stack([sim.step([{"w": g} for g in grads])[0]["w"] for _ in range(trials)]).astype(np.float64)
    target = np.mean([rms_clip(g, 2.5)[0] for g in grads], axis=0)
    assert_unbiased(outs, target)


def test_terngrad_shared_payloads_sum_exactly():
    # decompressing the sum of the workers' payloads gives the sum of their decompressions
    workers, n = 5, 77
    comp = compressor("terngrad", shared_scale=True)
    xs = [normal(n, seed=r) for r in range(workers)]
    ctxs = [make_ctx(n, rank=r, world_size=workers) for r in range(workers)]
    rounds = [comp.compress_rounds(ops, x, c) for x, c in zip(xs, ctxs)]
    scales = [next(g)[0].buf for g in rounds]
    payloads = []
    for g in rounds:
        try:
            g.send([scales])
        except StopIteration as done:
            payloads.append(done.value.buffer)
    total = np.sum(payloads, axis=0, dtype=np.int32)
    summed = comp.decompress(ops, total, ctxs[0])
    separately = np.sum([comp.decompress(ops, p, ctxs[0]).astype(np.float64) for p in payloads], axis=0)
    assert np.array_equal(summed.astype(np.float64), separately)
    assert total.max() < 2**31 - 1 and total.min() >= 0


# -- every method of this file: simulator, backends ---------------------------------------------------
@pytest.mark.parametrize("name,kwargs", [("bf16", {}), ("bf16", {"summable": True, "communicator": "allreduce"}),
                                         ("natural", {}), ("natural_dithering", {}),
                                         ("natural_dithering", {"p": "2", "levels": 4, "bucket_size": 16}),
                                         ("terngrad", {}), ("terngrad", {"clip_sigma": None})])
def test_four_workers_in_the_simulator(name, kwargs):
    method = grace_dl.make(name, **kwargs)
    sim = grace_dl.LocalSimulator(method, 4)
    comp = method.compressor
    shapes = {"w": (16, 33), "b": (33,), "odd": (7,)}
    total = None
    steps = 200 if not comp.deterministic else 1
    for _step in range(steps):
        grads = [{k: normal(int(np.prod(s)), seed=10 * r + i).reshape(s) for i, (k, s) in enumerate(shapes.items())}
                 for r in range(4)]
        out = sim.step(grads)
        for r in range(1, 4):
            for k in shapes:
                assert np.array_equal(out[r][k], out[0][k])
        got = np.concatenate([out[0][k].reshape(-1) for k in shapes]).astype(np.float64)
        total = got if total is None else total + got
    mean = np.mean([np.concatenate([g[k].reshape(-1) for k in shapes]) for g in grads], axis=0).astype(np.float64)
    avg = total / steps
    if comp.bias == "unbiased" or comp.deterministic:
        # the time average of an unbiased method (or a cast) approaches the mean
        assert np.linalg.norm(avg - mean) < 0.15 * np.linalg.norm(mean)
    else:  # terngrad with clipping: unbiased for the clipped gradients
        assert np.linalg.norm(avg - mean) < 0.3 * np.linalg.norm(mean)
    stats = sim.workers[0].stats
    expected = sum(comp.payload_nbytes(int(np.prod(s))) for s in shapes.values()) * steps
    assert stats.payload == expected
    assert stats.dense == sum(4 * int(np.prod(s)) for s in shapes.values()) * steps


SPECIAL = np.array([0.0, -0.0, 1e-40, -1e-40, 1.4e-45, np.inf, -np.inf, np.nan, 3.3e38, -3.3e38, 1.0, 1.5, -0.75])
CROSS_CASES = [("bf16", {}), ("bf16", {"summable": True}), ("natural", {}), ("natural_dithering", {}),
               ("natural_dithering", {"p": "2", "levels": 3, "bucket_size": 7}), ("terngrad", {}),
               ("terngrad", {"clip_sigma": None}), ("terngrad", {"shared_scale": True})]


def _cross_inputs(dtype):
    return [normal(1000, seed=5, dtype=dtype), SPECIAL.astype(dtype),
            np.concatenate([SPECIAL, normal(50, seed=1)]).astype(dtype)]


def _check_same_payloads(backend, to_backend, name, kwargs):
    comp = compressor(name, **kwargs)
    for dtype in ("float32", "float64"):
        for x in _cross_inputs(dtype):
            ctx = make_ctx(len(x), dtype=dtype, world_size=3 if kwargs.get("shared_scale") else 1)
            want = comp.compress(ops, x, ctx).buffer
            got = backend.to_numpy(comp.compress(backend, to_backend(x), ctx).buffer)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (name, kwargs, dtype, len(x))
            out = backend.to_numpy(comp.decompress(backend, backend.from_numpy(want, to_backend(x)), ctx))
            assert out.tobytes() == comp.decompress(ops, want, ctx).tobytes(), (name, kwargs, dtype, len(x))


@pytest.mark.parametrize("name,kwargs", CROSS_CASES)
def test_payloads_bit_identical_on_torch_given_the_same_draws(name, kwargs):
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    # p='2' norms included: TorchOps.sqrt is correctly rounded on the CPU (float64 via NumPy)
    class NumpyDraws(TorchOps):
        def random_uniform(self, n, key, counter, like):
            return torch.from_numpy(ops.random_uniform(n, key, counter, None))

    _check_same_payloads(NumpyDraws(), lambda a: torch.from_numpy(a.copy()), name, kwargs)


@pytest.mark.parametrize("name,kwargs", CROSS_CASES)
def test_payloads_bit_identical_on_tensorflow_given_the_same_draws(name, kwargs):
    tf = pytest.importorskip("tensorflow")
    from grace_dl.tensorflow.ops import TFOps

    class NumpyDraws(TFOps):
        def random_uniform(self, n, key, counter, like):
            return tf.constant(ops.random_uniform(n, key, counter, None))

    _check_same_payloads(NumpyDraws(), tf.constant, name, kwargs)


@pytest.mark.parametrize("name,kwargs", [("bf16", {}), ("natural", {}), ("natural_dithering", {"p": "2"}),
                                         ("terngrad", {})])
def test_methods_trace_in_tf_function(name, kwargs):
    tf = pytest.importorskip("tensorflow")
    from grace_dl.tensorflow.ops import TFOps

    T = TFOps()
    comp = compressor(name, **kwargs)
    n = 77
    ctx = make_ctx(n)

    def body(x):
        buffer = comp.compress(T, x, ctx).buffer
        return buffer, comp.decompress(T, buffer, ctx)

    graph = tf.function(body, input_signature=[tf.TensorSpec([n], tf.float32)])
    x = tf.constant(np.concatenate([SPECIAL[:10], normal(n - 10, seed=3)]).astype(np.float32))
    (buf_e, out_e), (buf_t, out_t) = body(x), graph(x)
    assert T.to_numpy(buf_e).tobytes() == T.to_numpy(buf_t).tobytes()
    # NaN made by arithmetic may differ in its sign bit between eager and graph kernels
    assert np.array_equal(T.to_numpy(out_e), T.to_numpy(out_t), equal_nan=True)
