"""Local SGD (grace_dl.localsgd): schedule, averaging arithmetic on NumPy/torch/TF, variants,
state, bytes, adapters and YAML."""

from __future__ import annotations

import gc
import math
import pickle

import numpy as np
import pytest

import grace_dl
from grace_dl import ConfigError, LocalSGDSimulator, local_sgd
from grace_dl.localsgd import LOSS_NAME, adaptive_period
from grace_dl.transport.base import allreduce_traffic

SHAPES = {"w": (5, 3), "b": (3,)}


def initial(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def updates(steps: int, size: int, seed: int = 1) -> list[list[dict[str, np.ndarray]]]:
    """Per step and worker, the change a local optimizer step makes (float32)."""
    rng = np.random.default_rng(seed)
    return [[{n: (0.05 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
             for _ in range(size)] for _ in range(steps)]


def run(method, steps: int = 12, size: int = 3, losses=None, convert=np.asarray, to_numpy=np.asarray,
        sim=None, params=None, start: int = 0):
    """Drive a LocalSGDSimulator with the updates of ``updates``; returns the averaging
    steps, every worker's parameters after each averaging step, and the simulator."""
    init = initial()
    sim = sim or LocalSGDSimulator(method, size, {n: convert(v) for n, v in init.items()})
    params = params or [{n: convert(v.copy()) for n, v in init.items()} for _ in range(size)]
    deltas = updates(start + steps, size)
    synced, outs = [], []
    for t in range(start, start + steps):
        params = [{n: p[n] - convert(deltas[t][r][n]) for n in p} for r, p in enumerate(params)]
        step_losses = None if losses is None else [losses(t, r) for r in range(size)]
        out = sim.step(params, step_losses)
        if out is not None:
            synced.append(t + 1)
            params = [dict(o) for o in out]
            outs.append([{n: np.array(to_numpy(v)) for n, v in o.items()} for o in out])
    return synced, outs, sim, params


# -- the schedule ------------------------------------------------------------------------
def test_averages_every_period_and_workers_agree_after_each_averaging():
    synced, outs, sim, _ = run(local_sgd(period=3, compression=grace_dl.topk(ratio=0.3)), steps=12)
    assert synced == [3, 6, 9, 12]
    for out in outs:
        for worker in out[1:]:
            for n in SHAPES:
                np.testing.assert_array_equal(worker[n], out[0][n])


def test_post_local_switch_averages_every_step_then_every_period():
    synced, _, sim, _ = run(local_sgd(period=4, switch_step=3), steps=15)
    assert synced == [1, 2, 3, 7, 11, 15]


def test_period_one_uncompressed_is_synchronous_averaging():
    """H=1: after every step each worker holds z + (sum of the workers' x - z) * 1/N,
    which for SGD is synchronous SGD (the same update up to rounding)."""
    size, init, deltas = 3, initial(), updates(6, 3)
    synced, outs, _, _ = run(local_sgd(period=1), steps=6, size=size)
    assert synced == [1, 2, 3, 4, 5, 6]
    z = {n: v.copy() for n, v in init.items()}
    sync_sgd = {n: v.copy() for n, v in init.items()}
    for t in range(6):
        for n in SHAPES:
            total = sum((z[n] - deltas[t][r][n]) - z[n] for r in range(size))
            z[n] = z[n] + total * np.float32(1.0 / size)
            sync_sgd[n] = sync_sgd[n] - sum(deltas[t][r][n] for r in range(size)) * np.float32(1.0 / size)
            np.testing.assert_array_equal(outs[t][0][n], z[n])  # the arithmetic, bit for bit
            np.testing.assert_allclose(outs[t][0][n], sync_sgd[n], rtol=1e-5, atol=1e-6)


def test_adaptive_rule_values():
    assert adaptive_period(16, 1.0, 1.0) == 16
    assert adaptive_period(16, 0.25, 1.0) == 8  # sqrt(1/4) * 16
    assert adaptive_period(16, 0.2, 1.0) == math.ceil(math.sqrt(0.2) * 16) == 8
    assert adaptive_period(16, 0.0001, 1.0, min_period=2) == 2
    assert adaptive_period(16, 4.0, 1.0) == 16  # never above the initial period
    assert adaptive_period(8, 1.0, 0.0) == 8  # no positive reference: unchanged


def test_adaptive_period_follows_the_workers_mean_loss():
    # workers report different losses; the rule sees their mean over the round and the workers
    def losses(t, r):
        return (1.0 + r) / (1 + t) ** 2

    size = 2
    synced, _, sim, _ = run(local_sgd(period=8, adaptive=True), steps=40, size=size, losses=losses)
    expected, t, f0, period = [], 0, None, 8
    while t + period <= 40:
        round_steps = range(t, t + period)
        mean = sum(sum(losses(s, r) for s in round_steps) / period for r in range(size)) / size
        t += period
        expected.append(t)
        f0 = mean if f0 is None else f0
        period = adaptive_period(8, mean, f0)
    assert synced == expected
    assert len(set(synced[i + 1] - synced[i] for i in range(len(synced) - 1))) > 1  # H changed
    assert {w.current_period for w in sim.workers} == {sim.workers[0].current_period}
    assert LOSS_NAME in sim.workers[0].stats.per_tensor


def test_overlap_applies_the_average_one_round_later_with_a_pull():
    size, pull, init, deltas = 2, 0.5, initial(), updates(8, 2)
    synced, outs, sim, _ = run(local_sgd(period=2, overlap=True, pull=pull), steps=8, size=size)
    assert synced == [2, 4, 6, 8]
    # reference: x <- x - pull (x - z) with z the average of the models pulled one round ago
    z = {n: v.copy() for n, v in init.items()}
    x = [{n: v.copy() for n, v in init.items()} for _ in range(size)]
    sent = None
    k = 0
    for t in range(8):
        x = [{n: x[r][n] - deltas[t][r][n] for n in SHAPES} for r in range(size)]
        if (t + 1) % 2:
            continue
        if sent is not None:
            z = {n: z[n] + sum(sent[r][n] - z[n] for r in range(size)) * np.float32(1.0 / size) for n in SHAPES}
        x = [{n: x[r][n] - (x[r][n] - z[n]) * np.float32(pull) for n in SHAPES} for r in range(size)]
        sent = [dict(p) for p in x]
        for r in range(size):
            for n in SHAPES:
                np.testing.assert_array_equal(outs[k][r][n], x[r][n])
        k += 1
    for w in sim.workers[1:]:  # anchors agree; parameters do not
        for n in SHAPES:
            np.testing.assert_array_equal(w.anchor[n], sim.workers[0].anchor[n])
    assert not np.array_equal(outs[-1][0]["w"], outs[-1][1]["w"])


# -- bytes -------------------------------------------------------------------------------
def test_uncompressed_bytes_are_a_period_th_of_synchronous_allreduce():
    size, steps, period = 4, 16, 4
    _, _, sim, _ = run(local_sgd(period=period), steps=steps, size=size)
    dense = {n: int(np.prod(s)) * 4 for n, s in SHAPES.items()}
    per_round = sum(allreduce_traffic(b, size)[0] for b in dense.values())
    stats = sim.workers[0].stats
    assert stats.sent == stats.received == (steps // period) * per_round
    # the same gradients, allreduced every step by the dense method
    dense_sim = grace_dl.LocalSimulator(grace_dl.none(), size)
    for _ in range(steps):
        dense_sim.step([initial() for _ in range(size)])
    assert stats.sent * period == dense_sim.workers[0].stats.sent


# -- backends ----------------------------------------------------------------------------
def _frameworks():
    out = [("numpy", np.asarray, np.asarray)]
    torch = pytest.importorskip("torch")
    import grace_dl.torch  # noqa: F401

    out.append(("torch", torch.from_numpy, lambda t: t.numpy()))
    tf = pytest.importorskip("tensorflow")
    import grace_dl.tensorflow  # noqa: F401

    out.append(("tensorflow", tf.constant, lambda t: t.numpy()))
    return out


@pytest.mark.parametrize("kwargs", [
    dict(period=3),
    dict(period=2, overlap=True, pull=0.6),
    dict(period=3, compression=grace_dl.topk(ratio=0.3)),
    dict(period=2, switch_step=2, compression=grace_dl.fp16()),
], ids=["plain", "overlap", "topk", "post-local-fp16"])
def test_averaging_is_bit_identical_on_numpy_torch_and_tensorflow(kwargs):
    results = {}
    for name, convert, to_numpy in _frameworks():
        method = local_sgd(**{k: (v.fresh_copy() if k == "compression" else v) for k, v in kwargs.items()})
        synced, outs, _, _ = run(method, steps=9, convert=convert, to_numpy=to_numpy)
        results[name] = (synced, outs)
    reference = results.pop("numpy")
    for name, (synced, outs) in results.items():
        assert synced == reference[0], name
        for out, ref in zip(outs, reference[1]):
            for worker, ref_worker in zip(out, ref):
                for n in SHAPES:
                    np.testing.assert_array_equal(worker[n], ref_worker[n], err_msg=name)


# -- state -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(period=3, compression=grace_dl.topk(ratio=0.3)),
    dict(period=8, adaptive=True, min_period=2),
    dict(period=2, overlap=True),
    dict(period=4, switch_step=3),
], ids=["topk-memory", "adaptive", "overlap", "post-local"])
@pytest.mark.parametrize("stop", [4, 5])
def test_resume_is_bit_identical(kwargs, stop):
    def losses(t, r):
        return 2.0 / (1 + t) + 0.1 * r

    steps = 14
    method = local_sgd(**kwargs)
    full_synced, full_outs, _, _ = run(method.fresh_copy(), steps=steps, losses=losses)
    synced, outs, sim, params = run(method.fresh_copy(), steps=stop, losses=losses)
    states = pickle.loads(pickle.dumps([w.state_dict() for w in sim.workers]))
    resumed = LocalSGDSimulator(method.fresh_copy(), sim.size, initial(99))  # a wrong anchor, replaced
    for w, state in zip(resumed.workers, states):
        w.load_state_dict(state)
    params = [{n: np.array(v) for n, v in p.items()} for p in params]
    more_synced, more_outs, _, _ = run(None, steps=steps - stop, losses=losses, sim=resumed, params=params,
                                       start=stop)
    assert synced + more_synced == full_synced
    for out, ref in zip(outs + more_outs, full_outs):
        for worker, ref_worker in zip(out, ref):
            for n in SHAPES:
                np.testing.assert_array_equal(worker[n], ref_worker[n])


def test_state_of_another_configuration_is_refused():
    _, _, sim, _ = run(local_sgd(period=2), steps=2, size=2)
    with pytest.raises(ValueError, match="saved by local SGD with .*'period': 2"):
        local_sgd(period=3).load_state_dict(sim.workers[0].state_dict())


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(period=0), "period must be an int >= 1, got 0"),
    (dict(period=2.0), "period must be an int >= 1"),
    (dict(switch_step=-1), "switch_step must be an int >= 0"),
    (dict(period=4, min_period=5), r"min_period \(5\) must not exceed period \(4\)"),
    (dict(pull=0.0), r"pull must be a float in \(0, 1\]"),
    (dict(adaptive="yes"), "adaptive must be a bool"),
    (dict(compression="topk"), "compression must be a grace-dl method"),
    (dict(compression=grace_dl.signsgd()), "must aggregate 'mean'"),
])
def test_bad_arguments_name_what_is_wrong(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        local_sgd(**kwargs)


def test_misuse_is_refused_clearly():
    method = local_sgd(period=2, adaptive=True)
    with pytest.raises(RuntimeError, match="no transport"):
        method.step(initial(), 1.0)
    method.bind(grace_dl.LocalWorld(1).transports[0])
    with pytest.raises(RuntimeError, match="no anchor"):
        method.step(initial(), 1.0)
    method.set_anchor(initial())
    with pytest.raises(ValueError, match="needs the training loss"):
        method.step(initial())
    with pytest.raises(ValueError, match="needs finite losses"):
        method.step(initial(), float("nan"))
    with pytest.raises(KeyError, match="differ from those the anchor"):
        method.step({"w": initial()["w"]}, 1.0)
    with pytest.raises(ConfigError, match="local_sgd has no parameter 'periode'; valid: period"):
        grace_dl.localsgd.from_config({"periode": 3})


def test_workers_with_different_settings_are_stopped_at_the_first_averaging():
    world = grace_dl.LocalWorld(2)
    workers = [local_sgd(period=2, overlap=True, pull=p).bind(t) for p, t in zip((0.5, 0.25), world.transports)]
    for w in workers:
        w.set_anchor(initial())
    assert [w.begin(initial()) for w in workers] == [None, None]
    syncs = [w.begin(initial()) for w in workers]
    with pytest.raises(RuntimeError, match="differs between workers 0 and 1 in its pull \\(this worker: 0.5\\)"):
        workers[0].complete(syncs[0])


def test_registered_and_listed_with_its_papers(capsys):
    from grace_dl.cli import main

    algo = grace_dl.algorithms()["local_sgd"]
    assert "Lin et al." in algo.paper and "Wang & Joshi" in algo.paper and "Overlap Local-SGD" in algo.paper
    assert list(algo.params)[:2] == ["period", "switch_step"]
    main(["list"])
    out = capsys.readouterr().out
    assert "local_sgd(period=4, switch_step=0" in out and "Lin et al." in out


# -- torch adapters ----------------------------------------------------------------------
def test_torch_wrapper_steps_averages_and_resumes():
    torch = pytest.importorskip("torch")
    import grace_dl.torch as gt

    def make(seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 2)
        opt = gt.LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                          method=gt.local_sgd(period=3, compression=gt.topk(ratio=0.5).grace),
                          transport=grace_dl.LocalWorld(1).transports[0])
        return model, opt

    def train(model, opt, steps, start=0):
        for t in range(start, start + steps):
            gen = torch.Generator().manual_seed(t)
            opt.zero_grad()
            loss = model(torch.randn(8, 4, generator=gen)).pow(2).mean()
            loss.backward()
            opt.step(loss=loss)

    model, opt = make()
    train(model, opt, 7)
    assert opt.method.step_count == 7 and opt.method.rounds == 2
    model_b, opt_b = make()
    train(model_b, opt_b, 4)
    state = pickle.loads(pickle.dumps((model_b.state_dict(), opt_b.state_dict())))
    model_c, opt_c = make(seed=5)
    model_c.load_state_dict(state[0])
    opt_c.load_state_dict(state[1])
    train(model_c, opt_c, 3, start=4)
    for (n, p), (_, q) in zip(model.named_parameters(), model_c.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="not in the optimizer's param_groups"):
        gt.LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.Linear(2, 2).named_parameters(),
                    transport=grace_dl.LocalWorld(1).transports[0])


def test_post_local_ddp_hook_averages_gradients_only_before_the_switch(tmp_path):
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    import grace_dl.torch as gt

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        method = gt.local_sgd(period=2, switch_step=2)
        ddp.register_comm_hook(None, gt.post_local_sgd_hook(method))
        opt = gt.PostLocalSGDOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), model.named_parameters(),
                                       method=method)
        rounds = []
        for t in range(6):
            opt.zero_grad()
            ddp(torch.ones(3, 4)).sum().backward()
            opt.step()
            rounds.append((method.stats.per_tensor.get("ddp.gradients", {}).get("count", 0), method.rounds))
        # gradients allreduced in steps 1-2 (no model averaging then), models averaged at 4 and 6
        assert rounds == [(1, 0), (2, 0), (2, 0), (2, 1), (2, 1), (2, 2)]
    finally:
        # the DDP module goes before the group: a reducer torn down at interpreter exit after
        # it can abort the process (torch 2.13)
        ddp = opt = None
        gc.collect()
        dist.destroy_process_group()


# -- YAML --------------------------------------------------------------------------------
@pytest.mark.parametrize("section, message", [
    ({"period": 0}, "local_sgd.period: must be int >= 1, got 0"),
    ({"periods": 4}, "local_sgd.periods: unknown key; valid: period, switch_step"),
    ({"period": 4, "min_period": 8}, "local_sgd.min_period: must be <= period \\(4\\), got 8"),
    ({"pull": 1.5}, "local_sgd.pull: must be float > 0 and <= 1, got 1.5"),
    ({"adaptive": "yes"}, "local_sgd.adaptive: must be true or false, got 'yes'"),
    ("fast", "local_sgd: must be a mapping, got 'fast'"),
])
def test_yaml_local_sgd_errors_are_one_line(section, message):
    from grace_dl.experiments.config import validate

    with pytest.raises(ConfigError, match=message) as err:
        validate({"local_sgd": section})
    assert "\n" not in str(err.value)


def test_yaml_local_sgd_compression_must_average():
    from grace_dl.experiments.config import validate

    with pytest.raises(ConfigError, match="local_sgd: local SGD averages models"):
        validate({"local_sgd": {"period": 2}, "compression": {"compressor": "signsgd"}})
    config = validate({"sweep": {"methods": [{"compressor": "none"},
                                             {"compressor": "none", "local_sgd": {"period": 2}}]}})
    assert [c.local_sgd for c in config.run_configs()] == [None, {"period": 2, "switch_step": 0, "adaptive": False,
                                                                  "min_period": 1, "overlap": False, "pull": 0.5}]


def test_yaml_simulator_run_sends_a_period_th_of_synchronous_bytes(tmp_path):
    pytest.importorskip("torch")
    from grace_dl.experiments.config import validate
    from grace_dl.experiments.train import run as run_experiment

    base = {"task": "digits", "model": {"arch": "mlp", "hidden": 8}, "workers": 2, "launcher": "simulator",
            "steps": 8, "batch_size": 16, "eval_every": 8}
    dense = run_experiment(validate({**base, "name": "dense", "output_dir": str(tmp_path / "d")}))
    local = run_experiment(validate({**base, "name": "local", "local_sgd": {"period": 4},
                                     "output_dir": str(tmp_path / "l")}))
    assert local["sent_bytes_per_worker"] * 4 == dense["sent_bytes_per_worker"] > 0
    assert local["replicas_identical"] and local["local_sgd"]["period"] == 4


def test_tensorflow_callable_averages_and_resumes():
    tf = pytest.importorskip("tensorflow")
    import grace_dl.tensorflow as gtf

    def make():
        variables = [tf.Variable(v) for v in initial().values()]
        local = gtf.LocalSGD(variables, gtf.local_sgd(period=2, compression=gtf.topk(ratio=0.3)),
                             transport=grace_dl.LocalWorld(1).transports[0], names=list(SHAPES))
        return variables, local

    def train(variables, local, steps, start=0):
        deltas, averaged = updates(start + steps, 1), []
        for t in range(start, start + steps):
            for n, v in zip(SHAPES, variables):
                v.assign_sub(deltas[t][0][n])
            averaged.append(local(1.0))
        return averaged

    variables, local = make()
    assert train(variables, local, 6) == [False, True] * 3
    resumed_vars, resumed = make()
    first_vars, first = make()
    train(first_vars, first, 3)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    for v, w in zip(resumed_vars, first_vars):
        v.assign(w)
    resumed.load_state_dict(state)
    train(resumed_vars, resumed, 3, start=3)
    for v, w in zip(variables, resumed_vars):
        np.testing.assert_array_equal(v.numpy(), w.numpy())
    assert isinstance(resumed.method.anchor["w"], tf.Tensor)

    @tf.function
    def inside():
        return local(1.0)

    with pytest.raises(RuntimeError, match="runs eagerly"):
        inside()
