"""The threshold sparsifiers: threshold, adaptive_threshold, dgc (with its dgc_momentum
memory) and sidco, on NumPy, in the 4-worker simulator, on torch and inside tf.function."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grace_dl
from grace_dl.compressors.dgc import DGC, DGCMomentum
from grace_dl.compressors.sidco import _log_gamma
from grace_dl.ops.numpy_backend import NumpyOps

from helpers import make_ctx, normal

ops = NumpyOps()
METHODS = ["threshold", "adaptive_threshold", "dgc", "sidco"]
# parameters that send a noticeable part of small tensors
SMALL = {"threshold": {"threshold": 1.0}, "adaptive_threshold": {"ratio": 0.1},
         "dgc": {"ratio": 0.1, "sample_ratio": 0.1}, "sidco": {"ratio": 0.1}}
CONFIGS = [("threshold", {"threshold": 1.0}), ("threshold", {"threshold": 0.3}),
           ("adaptive_threshold", {"ratio": 0.1}), ("adaptive_threshold", {"ratio": 0.5}),
           ("dgc", {"ratio": 0.1, "sample_ratio": 0.1}), ("dgc", {"ratio": 0.01, "warmup_steps": 3}),
           ("sidco", {"ratio": 0.1}), ("sidco", {"ratio": 0.05, "stages": 3}),
           ("sidco", {"ratio": 0.1, "distribution": "gamma", "stages": 2}),
           ("sidco", {"ratio": 0.1, "distribution": "gpareto"}),
           ("sidco", {"ratio": 0.02, "distribution": "gpareto", "stages": 2})]
CONFIG_IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for m, kw in CONFIGS]


def compressor(name, **overrides):
    return grace_dl.make(name, **{**SMALL[name], **overrides}).compressor


def round_trip(comp, x, **ctx_args):
    ctx = make_ctx(len(x), dtype=x.dtype.name, **ctx_args)
    payload = comp.compress(ops, x, ctx)
    return payload, comp.decompress(ops, payload.buffer, ctx)


def sent_count(out):
    return int(np.count_nonzero(out))


# -- contracts and wire size ----------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_registered_with_their_contract(name):
    entry = grace_dl.entries("compressor")[name]
    comp = entry.cls()
    assert not comp.summable and comp.deterministic and comp.zero_preserving
    assert comp.payload_nbytes(1000, "float32") is None  # data-dependent
    assert entry.cls.communicator == "allgather"
    assert entry.cls.memory == ("dgc_momentum" if name == "dgc" else "residual")
    assert comp.bias == ("contraction" if name == "dgc" else "biased")
    assert entry.paper and entry.cls.__doc__ and "Wire size" in entry.cls.__doc__
    assert isinstance(grace_dl.make(name).memory, DGCMomentum if name == "dgc" else grace_dl.memories.ResidualMemory)


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 700), seed=st.integers(0, 10**6), dtype=st.sampled_from(["float32", "float64"]))
def test_wire_size_is_the_stated_formula_of_the_sent_count(name, kwargs, n, seed, dtype):
    comp = grace_dl.make(name, **kwargs).compressor
    x = normal(n, seed=seed, dtype=dtype)
    payload, out = round_trip(comp, x)
    count, itemsize = sent_count(out), np.dtype(dtype).itemsize
    formula = 2 * itemsize + 4 * count if name == "adaptive_threshold" else count * (4 + itemsize)
    assert payload.nbytes == payload.buffer.nbytes == formula == comp.payload_nbytes_for(count, n, dtype)
    assert payload.buffer.dtype == np.int32 and out.dtype == np.dtype(dtype) and out.shape == (n,)
    # what is sent is exact (adaptive_threshold: the side means)
    if name != "adaptive_threshold":
        assert np.array_equal(out[out != 0], x[out != 0])


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_same_input_same_payload_and_deterministic(name, kwargs):
    comp = grace_dl.make(name, **kwargs).compressor
    x = normal(2000, seed=4)
    a, _ = round_trip(comp, x, step=7, seed=1)
    b, _ = round_trip(comp, x, step=7, seed=2, rank=3, world_size=4)  # no draw depends on keys
    assert np.array_equal(a.buffer, b.buffer)


# -- threshold ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), seed=st.integers(0, 10**6), level=st.floats(0.01, 3.0))
def test_threshold_sends_exactly_the_elements_at_or_above_it(n, seed, level):
    x = normal(n, seed=seed)
    x[: n // 4] = np.float32(level)  # elements exactly at the threshold are sent
    _, out = round_trip(compressor("threshold", threshold=level), x)
    keep = np.abs(x) >= np.float32(level)
    assert np.array_equal(out, np.where(keep, x, 0))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_threshold_packed_in_one_primitive_trains_to_the_same_bits(monkeypatch, backend):
    # the large-tensor path (no noted int64 indices: the residual reads the payload)
    # against the noted path, through the simulator's pipeline with its residual memory
    import grace_dl.compressors.threshold as threshold

    convert = (lambda a: a) if backend == "numpy" else pytest.importorskip("torch").from_numpy
    grads = [[{"w": convert(normal(3000, seed=10 * s + r) * 0.02)} for r in range(2)] for s in range(3)]
    for step in grads:  # NaN, Inf and elements at the threshold on some steps and ranks
        step[0]["w"][[5, 6, 7]] = convert(np.array([np.nan, -np.inf, 0.01], np.float32))

    def run():
        sim = grace_dl.LocalSimulator(grace_dl.threshold(threshold=0.01), 2)
        outs = [sim.step(step) for step in grads]
        state = sim.workers[0].memory.state["w"]["residual"]
        return [np.asarray(o[0]["w"]).tobytes() for o in outs], np.asarray(state).tobytes()

    want = run()
    monkeypatch.setattr(threshold, "PACKED_SELECTION_MIN", 0)
    assert run() == want


def test_threshold_compares_in_the_compute_dtype():
    level = 0.7  # not a float32: the threshold is rounded to the compute dtype, like the data
    x = np.array([np.float32(0.7), np.nextafter(np.float32(0.7), np.float32(0))], np.float32)
    _, out = round_trip(compressor("threshold", threshold=level), x)
    assert np.array_equal(out, [x[0], 0])
    _, out = round_trip(compressor("threshold", threshold=level), x.astype(np.float64))
    assert sent_count(out) == 0  # in float64, float32(0.7) is below 0.7


# -- adaptive_threshold ----------------------------------------------------------------------------
def expected_adaptive(x, ratio):
    """The reference: per sign, the floor(ratio * count) (at least one) largest magnitudes,
    ties at the threshold included, each side rebuilt by the mean of what it sends."""
    out = np.zeros(len(x), np.float64)
    for side in (x > 0, x < 0):
        values = np.abs(x[side]).astype(np.float64)
        if len(values) == 0:
            continue
        k = max(1, int(np.floor(ratio * len(values))))
        level = np.sort(values)[-k]
        mask = side & (np.abs(x) >= level)
        out[mask] = x[mask].astype(np.float64).mean()
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 600), seed=st.integers(0, 10**6), ratio=st.floats(0.001, 1.0),
       zeros=st.integers(0, 20), ties=st.booleans())
def test_adaptive_threshold_keeps_a_fraction_of_each_sign_rebuilt_by_its_mean(n, seed, ratio, zeros, ties):
    x = normal(n, seed=seed) * 3
    if ties:
        x = np.round(x)  # heavy ties at the thresholds
    x[: min(zeros, n)] = 0
    payload, out = round_trip(compressor("adaptive_threshold", ratio=ratio), x)
    want = expected_adaptive(x, ratio)
    assert np.array_equal(out != 0, want != 0)
    np.testing.assert_allclose(out, want, rtol=1e-5)
    assert np.all(out[x == 0] == 0)  # zeros belong to no side
    # one value per side, of that side's sign; the error identity of mean reconstruction
    assert len(np.unique(out[out > 0])) <= 1 and len(np.unique(out[out < 0])) <= 1
    assert np.all((out == 0) | (np.sign(out) == np.sign(x)))
    x64, o64 = x.astype(np.float64), out.astype(np.float64)
    err = np.sum((x64 - o64) ** 2)
    assert err == pytest.approx(np.sum(x64 ** 2) - np.sum(o64 ** 2), rel=1e-4, abs=1e-6)
    assert err <= np.sum(x64 ** 2) * (1 + 1e-6)


def test_adaptive_threshold_wire_format():
    x = np.array([0.5, -3.0, 2.0, 0.0, -1.0, 4.0, -2.0, 1.0], np.float32)
    payload, out = round_trip(compressor("adaptive_threshold", ratio=0.5), x)
    # positives 0.5, 2, 4, 1: keep 2 (4 and 2); negatives -3, -1, -2: keep 1 (-3)
    means = payload.buffer[:2].view(np.float32)
    codes = payload.buffer[2:]
    assert means.tolist() == [3.0, -3.0]
    assert codes.tolist() == [-1 - 1, 2, 5]  # index i, or -i - 1 for a negative element
    assert out.tolist() == [0, -3, 3, 0, 0, 3, 0, 0]


def test_adaptive_threshold_of_one_sign_only():
    x = np.abs(normal(300, seed=2)) + 0.1
    payload, out = round_trip(compressor("adaptive_threshold", ratio=0.1), x)
    assert sent_count(out) == 30 and np.all(out >= 0)
    assert payload.buffer[:2].view(np.float32)[1] == 0  # the empty side's mean


# -- dgc ------------------------------------------------------------------------------------------------
def test_dgc_warm_up_is_the_papers_exponential_schedule():
    comp = DGC(ratio=0.001, warmup_steps=4)
    sparsity = [1 - comp.density(t) for t in range(6)]
    # 75%, 93.75%, 98.4375%, 99.6%, then 99.9% (the paper's schedule, to 1%)
    np.testing.assert_allclose(sparsity[:4], [0.75, 0.9375, 0.984375, 0.99609375], rtol=1e-3)
    assert comp.density(4) == comp.density(5) == 0.001
    assert DGC(ratio=0.5, warmup_steps=10).density(0) == 0.5  # a ratio above 0.25: no warm-up
    assert DGC(ratio=0.01).density(0) == 0.01
    densities = [DGC(ratio=0.001, warmup_steps=100).density(t) for t in range(101)]
    assert densities[0] == 0.25 and densities[-1] == 0.001 and np.all(np.diff(densities) < 0)
    # ... and the payload follows it
    x = normal(10000, seed=1)
    comp = DGC(ratio=0.001, sample_ratio=1.0, warmup_steps=4)
    counts = [sent_count(round_trip(comp, x, step=t)[1]) for t in range(5)]
    assert counts == [int(comp.density(t) * 10000) for t in range(5)] and counts[0] == 2500 and counts[4] == 10


def dgc_reference(x, ratio, sample_ratio, step):
    """DGC's selection written plainly: the threshold from the systematic sample, then the
    k largest of what passes it (ties to the lower index)."""
    n = len(x)
    k = min(n, max(1, int(ratio * n)))
    mag = np.where(np.isnan(x), np.inf, np.abs(x))
    if k >= n:
        return np.flatnonzero(mag > 0)
    s = min(n, max(1, int(sample_ratio * n)))
    stride = n // s
    sample = mag[step % stride::stride][:s]
    level = np.sort(sample)[::-1][min(s, max(1, math.ceil(ratio * s))) - 1]
    chosen = np.flatnonzero((mag >= level) & (mag > 0))
    order = sorted(chosen, key=lambda i: (-mag[i], i))[:k]
    return np.sort(np.array(order, dtype=np.int64))


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 800), seed=st.integers(0, 10**6), ratio=st.floats(0.001, 1.0),
       sample_ratio=st.floats(0.001, 1.0), step=st.integers(0, 50), ties=st.booleans())
def test_dgc_selects_as_the_paper_describes(n, seed, ratio, sample_ratio, step, ties):
    x = normal(n, seed=seed)
    if ties:
        x = np.round(x * 2) / 2
    comp = compressor("dgc", ratio=ratio, sample_ratio=sample_ratio)
    _, out = round_trip(comp, x, step=step)
    want = dgc_reference(x, ratio, sample_ratio, step)
    assert np.array_equal(np.flatnonzero(out), want)
    k = min(n, max(1, int(ratio * n)))
    count = sent_count(out)
    assert count <= k and (count >= 1 or not np.any(x))
    # the sent elements are the largest: a contraction with delta = count / n
    kept, dropped = np.abs(x[out != 0]), np.abs(x[out == 0])
    if len(kept) and len(dropped):
        assert kept.min() >= dropped.max()
    x64 = x.astype(np.float64)
    assert np.sum((x64 - out) ** 2) <= (1 - count / n) * np.sum(x64 ** 2) * (1 + 1e-6) + 1e-12


def test_dgc_cuts_an_overfull_selection_to_exactly_k():
    x = np.ones(1000, np.float32)  # every element ties with the sampled threshold
    x[::7] = 2.0
    _, out = round_trip(compressor("dgc", ratio=0.01, sample_ratio=0.01), x)
    assert np.array_equal(np.flatnonzero(out), np.arange(0, 70, 7))  # the 10 largest, lowest indices
    x = normal(100000, seed=3)
    counts = [sent_count(round_trip(compressor("dgc", ratio=0.01, sample_ratio=0.1), x, step=t)[1])
              for t in range(20)]
    # about the target, never above it (a sampled threshold may let fewer through)
    assert max(counts) == 1000 and min(counts) > 700 and np.mean(counts) > 900


def test_dgc_samples_different_elements_at_each_step():
    comp = compressor("dgc", ratio=0.001, sample_ratio=0.01)
    x = normal(50000, seed=5)
    counts = {sent_count(round_trip(comp, x, step=t)[1]) for t in range(10)}
    assert len(counts) > 1  # a rotating sample estimates a different threshold


# -- dgc_momentum ------------------------------------------------------------------------------------
def run_memory(memory, comp, grads, world_size=1):
    """Steps of memory + compressor on one worker: (sent, momentum, velocity) per step."""
    history = []
    for step, g in enumerate(grads):
        ctx = make_ctx(len(g), step=step, world_size=world_size)
        v = memory.compensate(ops, g, ctx)
        sent = comp.decompress(ops, comp.compress(ops, v, ctx).buffer, ctx)
        memory.update(ops, v, sent, ctx)
        state = memory.state["t"]
        history.append((sent, state["momentum"].copy(), state["velocity"].copy()))
    return history


@pytest.mark.parametrize("nesterov", [False, True])
def test_dgc_momentum_correction_and_factor_masking(nesterov):
    m = 0.9
    grads = [normal(500, seed=s) for s in range(6)]
    comp = compressor("dgc", ratio=0.05, sample_ratio=0.2)
    history = run_memory(DGCMomentum(momentum=m, nesterov=nesterov), comp, grads)
    u = np.zeros(500, np.float32)
    v = np.zeros(500, np.float32)
    for g, (sent, got_u, got_v) in zip(grads, history):
        if nesterov:
            u = (u + g) * np.float32(m)
            v = v + u + g
        else:
            u = u * np.float32(m) + g
            v = v + u
        mask = sent != 0
        assert np.array_equal(sent[mask], v[mask]) and 0 < mask.sum() <= 25
        u, v = np.where(mask, 0, u), v - sent
        assert np.array_equal(got_u, u) and np.array_equal(got_v, v)
        assert np.all(got_u[mask] == 0) and np.all(got_v[mask] == 0)


def test_dgc_momentum_zero_is_residual_error_feedback():
    grads = [normal(300, seed=s) for s in range(5)]
    comp = compressor("dgc", ratio=0.05)
    history = run_memory(DGCMomentum(momentum=0.0), comp, grads)
    total_sent = sum(h[0].astype(np.float64) for h in history)
    # nothing is lost: what was sent plus what waits equals what came in
    np.testing.assert_allclose(total_sent + history[-1][2], sum(g.astype(np.float64) for g in grads), atol=1e-5)


@pytest.mark.parametrize("world_size", [1, 4])
def test_dgc_momentum_local_clipping_scaled_by_world_size(world_size):
    memory = DGCMomentum(momentum=0.0, clip_norm=2.0)
    g = normal(400, seed=1)  # norm about 20
    v = memory.compensate(ops, g, make_ctx(400, world_size=world_size))
    np.testing.assert_allclose(np.linalg.norm(v.astype(np.float64)), 2.0 / math.sqrt(world_size), rtol=1e-6)
    np.testing.assert_allclose(v / np.linalg.norm(v), g / np.linalg.norm(g), rtol=1e-5, atol=1e-7)
    small = g * np.float32(1e-3)  # within the bound: untouched, bit for bit
    memory = DGCMomentum(momentum=0.0, clip_norm=2.0)
    assert np.array_equal(memory.compensate(ops, small, make_ctx(400, world_size=world_size)), small)


def test_dgc_parameters_reach_the_memory_through_the_factory():
    g = grace_dl.dgc(ratio=0.01, momentum=0.5, clip_norm=3.0, nesterov=True)
    assert (g.memory.momentum, g.memory.clip_norm, g.memory.nesterov) == (0.5, 3.0, True)
    assert (g.compressor.momentum, g.compressor.clip_norm) == (0.5, 3.0)
    assert grace_dl.dgc().memory.momentum == 0.9 and grace_dl.dgc().memory.clip_norm is None


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dgc_momentum_keeps_its_state_on_non_finite_input(bad):
    memory, comp = DGCMomentum(), compressor("dgc", ratio=0.05)
    run_memory(memory, comp, [normal(200, seed=1), normal(200, seed=2)])
    before = {k: v.copy() for k, v in memory.state["t"].items()}
    g = normal(200, seed=3)
    g[17] = bad
    ctx = make_ctx(200, step=2)
    v = memory.compensate(ops, g, ctx)
    sent = comp.decompress(ops, comp.compress(ops, v, ctx).buffer, ctx)
    assert not np.isfinite(sent[17])  # the non-finite element reaches the aggregate
    memory.update(ops, v, sent, ctx)
    for key in ("momentum", "velocity"):
        assert np.array_equal(memory.state["t"][key], before[key])
    run_memory(memory, comp, [normal(200, seed=4)])  # and the next step is finite again
    assert all(np.isfinite(a).all() for a in memory.state["t"].values())


def test_dgc_momentum_state_round_trips_and_checks_names():
    grads = [normal(100, seed=s) for s in range(4)]
    comp = compressor("dgc", ratio=0.1)
    a = DGCMomentum()
    run_memory(a, comp, grads[:2])
    b = DGCMomentum()
    b.load_state_dict(a.state_dict())
    assert sorted(a.state_dict()["t"]) == ["momentum", "velocity"]
    ha = run_memory(a, comp, grads[2:])
    hb = run_memory(b, comp, grads[2:])
    assert all(np.array_equal(x, y) for p, q in zip(ha, hb) for x, y in zip(p, q))
    with pytest.raises(ValueError, match="share one name"):
        a.compensate(ops, normal(7), make_ctx(7))


# -- sidco ----------------------------------------------------------------------------------------------
def test_log_gamma_is_accurate():
    for a in [1e-3, 0.05, 0.3, 0.5, 1.0, 1.7, 2.0, 7.5, 100.0, 1e4, 1e6]:
        assert float(_log_gamma(ops, np.array([a]))[0]) == pytest.approx(math.lgamma(a), abs=1e-10, rel=1e-12)


def f32(t):
    return float(np.float32(t))


def sidco_reference(x, ratio, distribution, stages):
    """SIDCo's thresholds written plainly in float64 (NumPy's summation order)."""
    a = np.abs(x.astype(np.float64))
    log_delta = math.log(ratio) / stages
    t, out = 0.0, []
    for stage in range(stages):
        e = a if stage == 0 else a[a > t] - t
        mean = e.mean() if len(e) else 0.0
        if distribution == "exponential":
            step = -mean * log_delta
        elif distribution == "gamma" and stage == 0:
            s = math.log(mean) - np.log(a + mean * 2.0**-52).mean()
            shape = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
            step = -(mean / shape) * (log_delta + math.lgamma(shape))
        else:
            var = e.var() if len(e) else 0.0
            r = mean * mean / var if var > 0 else 1.0
            k, sigma = (r - 1) / 2, mean * (r + 1) / 2
            step = -sigma * log_delta if abs(k) < 1e-6 else sigma * (1 - math.exp(k * log_delta)) / k
        t = f32(t + max(step, 0.0))
        out.append(t)
    return out


@pytest.mark.parametrize("distribution", ["exponential", "gamma", "gpareto"])
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_sidco_thresholds_are_the_closed_form_fits(distribution, stages):
    for seed in range(3):
        x = (np.random.default_rng(seed).laplace(size=3000) * 0.01).astype(np.float32)
        comp = compressor("sidco", ratio=0.01, distribution=distribution, stages=stages)
        got = [float(t[0]) for t in comp.thresholds(ops, x, make_ctx(3000))]
        want = sidco_reference(x, 0.01, distribution, stages)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert got == [f32(t) for t in got]  # rounded to float32
        _, out = round_trip(comp, x)
        assert np.array_equal(out != 0, np.abs(x) > np.float32(got[-1]))  # strictly above the last


def gpareto_sample(rng, n, shape, scale):
    """Generalized Pareto magnitudes by inverse CDF: (U^-shape - 1) * scale / shape."""
    return (rng.random(n) ** -shape - 1) * scale / shape


@pytest.mark.parametrize("distribution,stages,tolerance,gamma_shape", [
    ("exponential", 1, 0.1, None), ("exponential", 3, 0.1, None), ("gpareto", 1, 0.15, None),
    ("gpareto", 2, 0.15, None), ("gamma", 1, 0.1, 1.0), ("gamma", 6, 0.15, 0.6)])
def test_sidco_sends_the_target_fraction_of_data_from_its_model(distribution, stages, tolerance, gamma_shape):
    """The paper's claim: on gradients that follow the fitted distribution, the threshold
    sends about ratio * n elements, without sorting. The paper's gamma tail approximation
    is exact for shape 1 only; for a peaked gamma (shape 0.6) one stage sends half the
    target (0.49%) and the generalized Pareto stages that follow correct it."""
    rng = np.random.default_rng(7)
    n, ratio = 200_000, 0.01
    if distribution == "exponential":
        mag = rng.exponential(0.01, n)
    elif distribution == "gpareto":
        mag = gpareto_sample(rng, n, 0.2, 0.01)
    else:
        mag = rng.gamma(gamma_shape, 0.01, n)
    x = (mag * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    _, out = round_trip(compressor("sidco", ratio=ratio, distribution=distribution, stages=stages), x)
    assert abs(sent_count(out) / n - ratio) <= tolerance * ratio


def test_sidco_more_stages_fix_a_poor_tail_fit():
    x = normal(200_000, seed=3)  # half-normal magnitudes: lighter-tailed than exponential
    fractions = [sent_count(round_trip(compressor("sidco", ratio=0.01, stages=s), x)[1]) / 200_000 for s in (1, 3)]
    assert fractions[0] < 0.001  # one exponential stage badly overestimates the tail
    assert abs(fractions[1] - 0.01) < 0.002


# -- edge cases: sizes, zeros, one element, non-finite values, other dtypes ----------------------
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("n", [1, 2, 7, 9, 31, 33, 257, 1023])
def test_edge_sizes_and_zero_tensor(name, kwargs, n):
    comp = grace_dl.make(name, **kwargs).compressor
    payload, out = round_trip(comp, np.zeros(n, np.float32))
    assert np.array_equal(out, np.zeros(n, np.float32))
    assert payload.nbytes == comp.payload_nbytes_for(0, n, "float32")  # nothing but a header
    x = normal(n, seed=n)
    payload, out = round_trip(comp, x)
    assert np.all(np.isfinite(out)) and np.abs(out).max() <= np.abs(x).max()
    if name == "dgc":
        assert sent_count(out) >= 1
    one = np.array([-2.5], np.float32)
    _, out = round_trip(comp, one)
    if name == "sidco":  # sent if above the fitted threshold (a one-element fit may not allow it)
        sent = 2.5 > float(comp.thresholds(ops, one, make_ctx(1))[-1][0])
        assert out.tolist() == ([-2.5] if sent else [0.0])
    else:
        assert out.tolist() == [-2.5]


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_elements_are_sent_and_never_reach_the_memory(name, kwargs, bad):
    sim = grace_dl.LocalSimulator(grace_dl.make(name, **kwargs), 2)
    grads = [{"w": normal(300, seed=r)} for r in range(2)]
    sim.step(grads)
    before = [{k: v.copy() for k, v in w.memory.state["w"].items()} for w in sim.workers]
    poisoned = [{"w": normal(300, seed=10 + r)} for r in range(2)]
    poisoned[0]["w"][5] = bad
    out = sim.step(poisoned)
    assert not np.all(np.isfinite(out[0]["w"]))  # a loss scaler downstream sees it
    for key, value in sim.workers[0].memory.state["w"].items():  # the poisoned worker's
        assert np.array_equal(value, before[0][key]), f"{key} changed"
    for key, value in sim.workers[1].memory.state["w"].items():  # the other goes on
        assert np.all(np.isfinite(value)) and not np.array_equal(value, before[1][key])
    out = sim.step([{"w": normal(300, seed=20 + r)} for r in range(2)])
    assert np.all(np.isfinite(out[0]["w"]))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("in_dtype", ["float16", "float64"])
def test_narrow_and_wide_inputs_through_the_pipeline(name, in_dtype):
    sim = grace_dl.LocalSimulator(grace_dl.make(name, **SMALL[name]), 4)
    grads = [{"w": normal(999, seed=r).astype(in_dtype).reshape(27, 37)} for r in range(4)]
    out = sim.step(grads)
    assert out[0]["w"].dtype == np.dtype(in_dtype) and out[0]["w"].shape == (27, 37)
    assert np.all(np.isfinite(out[0]["w"])) and np.any(out[0]["w"])
    itemsize = 8 if in_dtype == "float64" else 4  # float16 is compressed in float32
    stats = sim.workers[0].stats
    assert stats.dense == 999 * np.dtype(in_dtype).itemsize
    assert stats.payload % 4 == 0 and stats.payload < 999 * (4 + itemsize)


@pytest.mark.parametrize("name,kwargs,match", [
    ("threshold", {"threshold": 0.0}, "threshold"), ("threshold", {"threshold": math.inf}, "threshold"),
    ("adaptive_threshold", {"ratio": 0.0}, "ratio"), ("adaptive_threshold", {"ratio": 1.5}, "ratio"),
    ("dgc", {"ratio": -1.0}, "ratio"), ("dgc", {"sample_ratio": 0.0}, "sample_ratio"),
    ("dgc", {"momentum": 1.0}, "momentum"), ("dgc", {"clip_norm": 0.0}, "clip_norm"),
    ("dgc", {"warmup_steps": -1}, "warmup_steps"), ("sidco", {"ratio": 1.0}, "ratio"),
    ("sidco", {"distribution": "normal"}, "distribution"), ("sidco", {"stages": 0}, "stages"),
])
def test_bad_parameters_name_themselves(name, kwargs, match):
    with pytest.raises(grace_dl.ConfigError, match=match):
        grace_dl.make(name, **kwargs)


# -- 4 workers in the simulator --------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_four_workers_aggregate_the_mean_of_what_each_sent(name, kwargs):
    sim = grace_dl.LocalSimulator(grace_dl.make(name, memory="none", **kwargs), 4)
    comp = grace_dl.make(name, **kwargs).compressor
    payload_bytes = [0] * 4
    for step in range(3):
        grads = [{"w": normal(500, seed=10 * step + r)} for r in range(4)]
        out = sim.step(grads)
        sent = [round_trip(comp, g["w"], step=step, name="w", rank=r, world_size=4)[1] for r, g in enumerate(grads)]
        want = (sent[0] + sent[1] + sent[2] + sent[3]) * np.float32(0.25)
        for r in range(4):
            assert np.array_equal(out[r]["w"], want)
            payload_bytes[r] += comp.payload_nbytes_for(sent_count(sent[r]), 500, "float32")
    # the byte accounting counts each worker's own, data-dependent payload
    assert [w.stats.payload for w in sim.workers] == payload_bytes


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_four_workers_with_error_feedback_lose_nothing(name, kwargs):
    kwargs = {**kwargs, "momentum": 0.0} if name == "dgc" else kwargs  # dgc_momentum(0) is error feedback
    sim = grace_dl.LocalSimulator(grace_dl.make(name, **kwargs), 4)
    total_in = np.zeros(400)
    total_out = np.zeros(400)
    for step in range(6):
        grads = [{"w": normal(400, seed=100 * step + r)} for r in range(4)]
        out = sim.step(grads)
        total_in += sum(g["w"].astype(np.float64) for g in grads)
        total_out += 4 * out[0]["w"].astype(np.float64)
        assert all(np.array_equal(out[0]["w"], o["w"]) for o in out)
    key = "velocity" if name == "dgc" else "residual"
    waiting = sum(w.memory.state["w"][key].astype(np.float64) for w in sim.workers)
    np.testing.assert_allclose(total_out + waiting, total_in, atol=1e-4)
    assert np.abs(waiting).max() > 0  # something was held back


def test_dgc_in_the_simulator_matches_the_algorithm_written_out():
    m, n, workers = 0.9, 600, 4
    sim = grace_dl.LocalSimulator(grace_dl.dgc(ratio=0.02, sample_ratio=0.1, momentum=m, clip_norm=5.0), workers)
    comp = DGC(ratio=0.02, sample_ratio=0.1)
    u = [np.zeros(n, np.float32) for _ in range(workers)]
    v = [np.zeros(n, np.float32) for _ in range(workers)]
    for step in range(5):
        grads = [normal(n, seed=7 * step + r) for r in range(workers)]
        out = sim.step([{"w": g} for g in grads])
        sent = []
        for r, g in enumerate(grads):
            norm = np.linalg.norm(g.astype(np.float64))
            g = g * np.float32(min(1.0, 5.0 / math.sqrt(workers) / norm))  # local clipping
            u[r] = u[r] * np.float32(m) + g
            v[r] = v[r] + u[r]
            s = round_trip(comp, v[r], step=step, name="w", rank=r, world_size=workers)[1]
            u[r], v[r] = np.where(s != 0, 0, u[r]), v[r] - s
            sent.append(s)
        want = (sent[0] + sent[1] + sent[2] + sent[3]) * np.float32(0.25)
        np.testing.assert_allclose(out[0]["w"], want, rtol=1e-6, atol=1e-7)


def test_logistic_regression_trains_with_each_method():
    """A 4-worker logistic regression on a fixed dataset: every method, compressing at
    least 3x, reaches a loss within 0.05 of uncompressed training thanks to its memory;
    without error feedback the same sparsifiers end far above it (the literature's reason
    for pairing them with error feedback)."""
    rng = np.random.default_rng(0)
    d, per_worker = 50, 64
    w_true = rng.standard_normal(d)
    xs = [rng.standard_normal((per_worker, d)).astype(np.float32) for _ in range(4)]
    ys = [(x @ w_true + 0.5 * rng.standard_normal(per_worker) > 0).astype(np.float32) for x in xs]

    def loss(w):
        z = np.concatenate([x @ w for x in xs])
        y = np.concatenate(ys)
        return float(np.mean(np.logaddexp(0, z) - y * z))

    def train(method):
        sim = grace_dl.LocalSimulator(method, 4)
        w = np.zeros(d, np.float32)
        for _ in range(150):
            grads = [{"w": (x.T @ (1 / (1 + np.exp(-(x @ w))) - y) / per_worker).astype(np.float32)}
                     for x, y in zip(xs, ys)]
            w = w - np.float32(0.5) * sim.step(grads)[0]["w"]
        return loss(w), sim.workers[0].stats.compression_ratio

    baseline, _ = train(grace_dl.none())
    for name, kwargs in [("threshold", {"threshold": 0.2}), ("adaptive_threshold", {"ratio": 0.1}),
                         ("dgc", {"ratio": 0.1}), ("dgc", {"ratio": 0.1, "momentum": 0.0}),
                         ("sidco", {"ratio": 0.1, "stages": 2}), ("sidco", {"ratio": 0.1, "distribution": "gpareto"})]:
        final, ratio = train(grace_dl.make(name, **kwargs))
        assert ratio > 3 and final < baseline + 0.05, (name, kwargs, final, ratio)
        if name != "adaptive_threshold":  # its means keep mass; the others drop what they do not send
            final, _ = train(grace_dl.make(name, memory="none", **kwargs))
            assert final > baseline + 0.05, (name, kwargs, "without error feedback", final)


# -- other backends ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_payloads_are_bit_identical_to_numpy(name, kwargs, dtype):
    torch = pytest.importorskip("torch")
    from grace_dl.torch.ops import TorchOps

    t_ops = TorchOps()
    comp = grace_dl.make(name, **kwargs).compressor
    for n, seed in [(1, 0), (33, 1), (1000, 2), (4097, 3)]:
        x = normal(n, seed=seed, dtype=dtype)
        x[::11] = np.round(x[::11], 1)  # ties
        for step in (0, 5):
            ctx = make_ctx(n, dtype=dtype, step=step)
            a = comp.compress(ops, x, ctx)
            b = comp.compress(t_ops, torch.from_numpy(x.copy()), ctx)
            assert a.nbytes == b.nbytes and a.buffer.tobytes() == b.buffer.numpy().tobytes()
            out = comp.decompress(t_ops, b.buffer, ctx).numpy()
            assert out.tobytes() == comp.decompress(ops, a.buffer, ctx).tobytes()


def _traced(tf, t_ops, comp, ctx, dtype):
    """compress then decompress in one tf.function of a fixed input length."""
    @tf.function(input_signature=[tf.TensorSpec([ctx.numel], getattr(tf, dtype))])
    def graph(x):
        payload = comp.compress(t_ops, x, ctx)
        return payload.buffer, comp.decompress(t_ops, payload.buffer, ctx), payload.nbytes

    return graph


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_in_tf_function_with_variable_size_payloads(name, kwargs):
    tf = pytest.importorskip("tensorflow")
    from grace_dl.tensorflow import TFOps

    t_ops, n = TFOps(), 517
    comp = grace_dl.make(name, **kwargs).compressor
    # float64 too for the first configuration of each method, and for every sidco fit
    first = [c for c in CONFIGS if c[0] == name][0] == (name, kwargs)
    for dtype in ("float32", "float64") if first or name == "sidco" else ("float32",):
        ctx = make_ctx(n, dtype=dtype, step=2)
        graph = _traced(tf, t_ops, comp, ctx, dtype)
        sizes = set()
        for seed, nonzero in [(0, n), (1, 20), (2, 0)]:  # the last: nothing to send
            x = normal(n, seed=seed, dtype=dtype) * 2
            x[nonzero:] = 0
            buffer, out, nbytes = graph(tf.constant(x))
            want = comp.compress(ops, x, ctx)
            assert buffer.numpy().tobytes() == want.buffer.tobytes(), (dtype, seed)
            assert out.numpy().tobytes() == comp.decompress(ops, want.buffer, ctx).tobytes()
            assert int(nbytes) == want.nbytes
            sizes.add(want.nbytes)
        assert len(sizes) == 3  # one trace served three payload sizes
        assert graph.experimental_get_tracing_count() == 1
