"""Momentum applied twice: methods whose memory keeps a momentum (DGC's momentum
correction, Signum) are refused with an optimizer that has its own momentum, by the
torch and Keras adapters and by the experiment configs; with the optimizer's momentum
off, DGC trains as well as top-k with the optimizer's momentum."""

from __future__ import annotations

import numpy as np
import pytest

import grace_dl
from grace_dl import ConfigError
from grace_dl.checks import check_optimizer_momentum, own_momenta
from grace_dl.experiments import config as cfg


def test_own_momenta_of_every_memory():
    assert own_momenta(grace_dl.dgc()) == [("dgc_momentum", 0.9)]
    assert own_momenta(grace_dl.signum(momentum=0.5)) == [("signum_momentum", 0.5)]
    assert own_momenta(grace_dl.dgc(momentum=0.0)) == []  # no momentum kept: nothing applied twice
    assert own_momenta(grace_dl.dgc(memory="residual")) == []
    for name in grace_dl.list_methods():
        carries = type(grace_dl.make(name).memory).__name__ in ("DGCMomentum", "SignumMomentum", "OnebitAdamMemory")
        assert bool(own_momenta(grace_dl.make(name))) == carries, name
    # a per-name override that uses a momentum memory counts too
    mixed = grace_dl.make("topk", policies={"overrides": {"fc.*": {"compressor": "dgc"}}})
    assert own_momenta(mixed) == [("dgc_momentum", 0.9)]


def test_check_optimizer_momentum_names_what_to_change():
    with pytest.raises(ValueError, match=r"dgc keeps its own momentum \(dgc_momentum memory, momentum=0.9\) and "
                                         r"SGD has momentum=0.9: .* Set momentum=0 in SGD"):
        check_optimizer_momentum(grace_dl.dgc(ratio=0.01), 0.9, "SGD")
    check_optimizer_momentum(grace_dl.dgc(ratio=0.01), 0.0, "SGD")
    check_optimizer_momentum(grace_dl.topk(ratio=0.01), 0.9, "SGD")


@pytest.mark.parametrize("compression, optimizer, error", [
    ({"compressor": "dgc"}, {"momentum": 0.9}, r"^optimizer.momentum: dgc keeps its own momentum"),
    ("signum", {"momentum": 0.5}, r"^optimizer.momentum: signum keeps its own momentum"),
    ({"compressor": "dgc", "momentum": 0.0}, {"momentum": 0.9}, None),
    ({"compressor": "dgc"}, {"momentum": 0.0}, None),
    ({"compressor": "dgc"}, {"name": "adam"}, None),
    ({"compressor": "topk"}, {"momentum": 0.9}, None),
])
def test_experiment_config_refuses_double_momentum(compression, optimizer, error):
    raw = {"compression": compression, "optimizer": optimizer}
    if error is None:
        cfg.validate(raw)
    else:
        with pytest.raises(ConfigError, match=error):
            cfg.validate(raw)


def test_sweep_refuses_double_momentum_per_method():
    base = {"optimizer": {"momentum": 0.9}}
    with pytest.raises(ConfigError, match=r"^sweep.methods\[1\].optimizer.momentum: dgc keeps"):
        cfg.validate({**base, "sweep": {"methods": ["topk", {"compressor": "dgc", "optimizer": {"lr": 0.2}}]}})
    with pytest.raises(ConfigError, match=r"^optimizer.momentum: dgc keeps"):
        cfg.validate({**base, "sweep": {"methods": [{"compressor": "dgc"}]}})
    cfg.validate({**base, "sweep": {"methods": ["topk", {"compressor": "dgc", "optimizer": {"momentum": 0.0}}]}})


# -- training: why the combination is refused, and what to use instead --------------------
WORKERS, STEPS, BATCH, LR = 4, 200, 32, 0.05


def _train(method: grace_dl.Grace, momentum: float) -> float:
    """Softmax regression on digits in the simulator; heavy-ball SGD (torch's form:
    ``buf = momentum * buf + g``, ``w -= lr * buf``) on the aggregate."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    params = {"w": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}
    bufs = {k: np.zeros_like(v) for k, v in params.items()}

    def loss_and_grads(xs, ys):
        logits = xs @ params["w"] + params["b"]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(len(ys)), ys] + 1e-12).mean()
        p[np.arange(len(ys)), ys] -= 1
        p /= len(ys)
        return float(loss), {"w": (xs.T @ p).astype(np.float32), "b": p.sum(0).astype(np.float32)}

    sim = grace_dl.LocalSimulator(method, WORKERS)
    for step in range(STEPS):
        grads = []
        for r in range(WORKERS):
            idx = np.random.default_rng(step * WORKERS + r).integers(0, len(y) // WORKERS, BATCH) * WORKERS + r
            grads.append(loss_and_grads(x[idx], y[idx])[1])
        out = sim.step(grads)[0]
        for k in params:
            bufs[k] = np.float32(momentum) * bufs[k] + out[k]
            params[k] -= np.float32(LR) * bufs[k]
    return loss_and_grads(x, y)[0]


def test_dgc_without_optimizer_momentum_trains_like_topk_with_it():
    # the card's ratio; measured: topk 0.25, dgc 0.30, momentum applied twice 9.7
    topk = _train(grace_dl.topk(ratio=0.01), momentum=0.9)
    dgc = _train(grace_dl.dgc(ratio=0.01), momentum=0.0)
    twice = _train(grace_dl.dgc(ratio=0.01), momentum=0.9)
    assert topk < 0.5, f"top-k with momentum did not converge: {topk:.3f}"
    assert dgc <= 1.25 * topk + 0.05, f"dgc {dgc:.3f}, topk {topk:.3f}"
    assert twice > 2 * dgc, f"momentum applied twice should be worse: {twice:.3f} vs {dgc:.3f}"


# -- torch -------------------------------------------------------------------------------
def test_torch_optimizer_with_momentum_is_refused():
    torch = pytest.importorskip("torch")
    import grace_dl.torch as grace
    from grace_dl.torch import horovod as adapter

    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"dgc keeps its own momentum .* the optimizer \(SGD\) has momentum=0.9"):
        adapter.refuse_double_momentum(torch.optim.SGD(params, lr=0.05, momentum=0.9), grace.dgc(ratio=0.01).grace)
    with pytest.raises(ValueError, match="signum keeps its own momentum"):
        adapter.refuse_double_momentum(torch.optim.SGD(params, lr=0.05, momentum=0.9), grace.signum().grace)
    # a second parameter group with momentum is enough
    groups = [{"params": params}, {"params": [torch.nn.Parameter(torch.zeros(2))], "momentum": 0.5}]
    with pytest.raises(ValueError, match="momentum=0.5"):
        adapter.refuse_double_momentum(torch.optim.SGD(groups, lr=0.05), grace.dgc().grace)
    for opt, method in ((torch.optim.SGD(params, lr=0.05), grace.dgc()),
                        (torch.optim.SGD(params, lr=0.05, momentum=0.9), grace.topk()),
                        (torch.optim.SGD(params, lr=0.05, momentum=0.9), grace.dgc(momentum=0.0)),
                        (torch.optim.Adam(params), grace.dgc())):
        adapter.refuse_double_momentum(opt, method.grace)


def test_torch_horovod_refuses_double_momentum():
    torch = pytest.importorskip("torch")
    hvd = pytest.importorskip("horovod.torch")
    import grace_dl.torch as grace

    hvd.init()
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"dgc keeps its own momentum .* Set momentum=0"):
        grace.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   named_parameters=model.named_parameters(), compression=grace.dgc(ratio=0.01))
    grace.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                               named_parameters=model.named_parameters(), compression=grace.dgc(ratio=0.01))

    # the card's line, stock hvd.DistributedOptimizer: Horovod hooks gradients only on more
    # than one worker, so its call of compress (from _allreduce_grad_async(self, p), where
    # the adapter finds the optimizer) is reproduced here
    class HorovodLike(torch.optim.SGD):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            self._parameter_names = {p: f"w{i}" for i, p in enumerate(self.param_groups[0]["params"])}

        def _allreduce_grad_async(self, p):
            return compression.compress(p.grad)

    compression = grace.dgc(ratio=0.01)
    opt = HorovodLike(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.ones(3, 4)).sum().backward()
    with pytest.raises(ValueError, match="dgc keeps its own momentum"):
        opt._allreduce_grad_async(model.weight)
    assert not compression.grace.steps, "refused before the pipeline ran"
    opt.param_groups[0]["momentum"] = 0.0
    compression.decompress(*opt._allreduce_grad_async(model.weight))
    assert compression.grace.steps == {"w0": 1}
