"""Contracts of every registered method on NumPy: wire size, bias, determinism, edge cases.

Tests are generated from the registry, so a newly registered method is tested without
editing a list here; methods whose contract needs more than these generic checks have
their own tests below.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grace_dl
from grace_dl.ops.numpy_backend import NumpyOps

from helpers import make_ctx, normal

ops = NumpyOps()
METHODS = grace_dl.list_methods()
# parameters that make each method compress noticeably on small tensors
SMALL = {"topk": {"ratio": 0.1}, "randomk": {"ratio": 0.1}, "qsgd": {"levels": 3, "bucket_size": 16}}
SMALL["natural_dithering"] = {"levels": 3, "bucket_size": 16}
SMALL["chunk"] = {"ratio": 0.1, "chunk_size": 16}
SMALL["stc"] = {"ratio": 0.1}
SMALL["sbc"] = {"ratio": 0.1}
SMALL["sketch"] = {"ratio": 0.1}
SMALL["threshold"] = {"threshold": 1.0}
SMALL["adaptive_threshold"] = {"ratio": 0.1}
SMALL["dgc"] = {"ratio": 0.1, "sample_ratio": 0.1}
SMALL["sidco"] = {"ratio": 0.1}
SMALL["gtopk"] = {"ratio": 0.1}


def compressor(name, **overrides):
    return grace_dl.make(name, **{**SMALL.get(name, {}), **overrides}).compressor


def round_trip(comp, x, **ctx_args):
    ctx = make_ctx(len(x), dtype=x.dtype.name, **ctx_args)
    payload = comp.compress(ops, x, ctx)
    return payload, comp.decompress(ops, payload.buffer, ctx)


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 1200), dtype=st.sampled_from(["float32", "float64"]))
def test_payload_size_matches_the_stated_formula(name, n, dtype):
    comp = compressor(name)
    x = normal(n, seed=n, dtype=dtype)
    payload, out = round_trip(comp, x)
    assert payload.nbytes == payload.buffer.nbytes
    expected = comp.payload_nbytes(n, dtype)
    if expected is None:
        # a data-dependent size (threshold methods): by their convention such a method
        # sends only non-zero values and states the size for the count it sent
        expected = comp.payload_nbytes_for(int(np.count_nonzero(out)), n, dtype)
    assert payload.nbytes == expected
    assert out.shape == (n,) and out.dtype == x.dtype


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_payload(name):
    comp = compressor(name)
    x = normal(1000)
    a, _ = round_trip(comp, x, seed=3, step=5)
    b, _ = round_trip(comp, x, seed=3, step=5)
    assert np.array_equal(a.buffer, b.buffer)
    if not comp.deterministic:
        c, _ = round_trip(comp, x, seed=3, step=6)
        assert not np.array_equal(a.buffer, c.buffer), "random draws ignore the step"


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("n", [1, 7, 9, 31, 33, 513])
def test_edge_sizes_and_zero_tensor(name, n):
    comp = compressor(name)
    _, out = round_trip(comp, np.zeros(n, np.float32))
    if comp.zero_preserving:
        assert np.array_equal(out, np.zeros(n, np.float32)), "zero tensor must decompress to zero"
    else:
        assert np.all(np.isfinite(out)) and out.shape == (n,)
    x = normal(n, seed=n)
    _, out = round_trip(comp, x)
    assert np.all(np.isfinite(out))
    # no method that encodes magnitudes invents mass (with default parameters): every
    # output element is bounded by the input's norm, up to float16 rounding; unscaled
    # signs (not zero-preserving) output +-1 whatever the norm; natural compression rounds
    # an element up to the next power of two, so at most twice its magnitude
    if comp.zero_preserving:
        gain = 2.0 if name == "natural" else 1.0
        assert np.abs(out).max() <= gain * np.linalg.norm(x.astype(np.float64)) * (1 + 2**-10)


UNBIASED = [m for m in METHODS if compressor(m).bias == "unbiased"] + ["randomk-rescaled"]


@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_methods_average_to_the_input(name):
    comp = compressor("randomk", rescale=True) if name == "randomk-rescaled" else compressor(name)
    x = normal(64, seed=1)
    if comp.deterministic:
        assert np.array_equal(round_trip(comp, x)[1], x)
        return
    trials = 4000
    outs = np.stack([round_trip(comp, x, step=t)[1] for t in range(trials)]).astype(np.float64)
    mean, std = outs.mean(0), outs.std(0)
    # z-test per element: 5 sigma over 64 elements essentially never fails by chance
    z = np.abs(mean - x) / (std / np.sqrt(trials) + 1e-12)
    assert z.max() < 5.0, f"max z-score {z.max():.1f}: the method is biased"
    assert std.max() > 0, "a random method produced no randomness"


def test_topk_is_a_contraction_and_keeps_the_largest():
    @settings(max_examples=60, deadline=None)
    @given(n=st.integers(1, 500), ratio=st.floats(0.001, 1.0), seed=st.integers(0, 99))
    def check(n, ratio, seed):
        comp = compressor("topk", ratio=ratio)
        x = normal(n, seed=seed)
        payload, out = round_trip(comp, x)
        k = max(1, int(ratio * n))
        assert np.count_nonzero(out) <= k
        err = np.sum((x - out) ** 2)
        assert err <= (1 - k / n) * np.sum(x ** 2) * (1 + 1e-6) + 1e-12
        kept = np.flatnonzero(out)
        dropped = np.setdiff1d(np.arange(n), kept)
        if len(kept) and len(dropped):
            assert np.abs(x[kept]).min() >= np.abs(x[dropped]).max()
    check()


def test_qsgd_bits_and_levels():
    comp = compressor("qsgd", levels=127, bucket_size=512)
    assert comp.bits == 8
    assert compressor("qsgd", levels=1).bits == 2
    assert compressor("qsgd", levels=7).bits == 4
    x = normal(2048)
    _, out = round_trip(comp, x)
    # every element lands on a multiple of its bucket norm / levels
    norms = np.linalg.norm(x.reshape(-1, 512), axis=1)
    q = out.reshape(-1, 512) / (norms[:, None] / 127)
    assert np.allclose(q, np.round(q), atol=1e-3)
    assert np.all(np.abs(q) <= 127 + 1e-3)


def test_qsgd_bucket_with_one_dominant_element_stays_in_range():
    x = np.zeros(40, np.float32)
    x[3] = 1e30
    _, out = round_trip(compressor("qsgd", levels=1, bucket_size=16), x)
    assert np.isfinite(out).all() and out[3] == np.float32(1e30)


def test_fp16_relative_error_is_bounded():
    x = normal(1000) * 100
    _, out = round_trip(compressor("fp16"), x)
    assert np.all(np.abs(out - x) <= np.abs(x) * 2**-11 + 6e-8)


def test_none_sends_the_input_dtype():
    comp = compressor("none")
    x = normal(10).astype(np.float16)
    ctx = make_ctx(10, dtype="float32", in_dtype="float16")
    payload = comp.compress(ops, x.astype(np.float32), ctx)
    assert payload.buffer.dtype == np.float16 and payload.nbytes == comp.payload_nbytes(10, "float32", "float16") == 20


def test_randomk_indices_come_from_the_shared_key_only():
    comp = compressor("randomk")
    x = normal(300)
    outs = [round_trip(comp, x, rank=r, world_size=4)[1] for r in range(4)]
    patterns = {tuple(np.flatnonzero(o)) for o in outs}
    assert len(patterns) == 1 and len(patterns.pop()) == 30
