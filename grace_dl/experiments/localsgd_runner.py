"""Experiments with ``local_sgd``: each worker steps its own model, the models are averaged
every H steps (:class:`grace_dl.LocalSGD`; ``compression`` then compresses the model
differences).

Under ``horovodrun`` each rank wraps its plain optimizer in ``grace_dl.torch.LocalSGD``
(torch) or calls ``grace_dl.tensorflow.LocalSGD`` after each step (TensorFlow); no
gradient is allreduced. Under the ``simulator`` launcher one process keeps one model and
optimizer per worker (they differ between averaging steps) and
:class:`grace_dl.LocalSGDSimulator` averages them; right after each averaging step
(without ``overlap``) every worker's parameters are checked to be identical. Evaluation
uses worker 0's model.
"""

from __future__ import annotations

import copy

import numpy as np

from .config import ExperimentConfig, build_local_sgd
from .tasks import TaskData
from .torch_runner import TorchRunner, loss_fn, make_optimizer


def _method(config: ExperimentConfig):
    return build_local_sgd(config.local_sgd, config.compression)


class LocalSGDTorchRunner(TorchRunner):
    """:class:`~grace_dl.experiments.torch_runner.TorchRunner` for local SGD."""

    def __init__(self, config: ExperimentConfig, data: TaskData, horovod: bool):
        import grace_dl
        import grace_dl.torch as gt

        self._build_model(config, data, horovod)
        self.method = _method(config)
        if horovod:
            self._init_horovod()
            self.optimizer = gt.LocalSGD(make_optimizer(config, self.model.parameters()),
                                         self.model.named_parameters(), method=self.method)
            self.grace = self.method.grace
            self.graces = [self.grace]
            self.local_ranks = [self.rank]
        else:
            self.rank, self.size = 0, config.workers
            self.models = [self.model] + [copy.deepcopy(self.model) for _ in range(config.workers - 1)]
            self.optimizers = [make_optimizer(config, m.parameters()) for m in self.models]
            self.optimizer = self.optimizers[0]
            self.sim = grace_dl.LocalSGDSimulator(self.method, config.workers, self._params(self.model))
            self.graces = [w.grace for w in self.sim.workers]
            self.grace = self.graces[0]
            self.local_ranks = list(range(config.workers))

    @staticmethod
    def _params(model):
        return {n: p.detach() for n, p in model.named_parameters()}

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of the next step (every simulated worker's)."""
        for opt in ([self.optimizer] if self.horovod else self.optimizers):
            for group in opt.param_groups:
                group["lr"] = lr

    def train_step(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
        """One local step on each local worker's batch (and the averaging where due); the
        mean loss over all workers."""
        import torch

        if self.horovod:
            self.model.train()
            x, y = self._tensors(*batches[0])
            self.optimizer.zero_grad()
            loss = loss_fn(self.data, self.model, self.model(x), y)
            loss.backward()
            self.optimizer.step(loss=loss)
            return self.hvd.allreduce(loss.detach(), name="grace_dl.experiment.loss").item()
        losses = []
        for model, opt, batch in zip(self.models, self.optimizers, batches):
            model.train()
            x, y = self._tensors(*batch)
            opt.zero_grad()
            loss = loss_fn(self.data, model, model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        out = self.sim.step([self._params(m) for m in self.models], losses)
        if out is not None:
            if not self.method.overlap:
                self.check_replicas(out)
            with torch.no_grad():
                for model, new in zip(self.models, out):
                    for n, p in model.named_parameters():
                        p.copy_(new[n])
        return float(np.mean(losses))

    def replicas_identical(self) -> bool:
        """Whether every worker holds the same anchor (the last averaged model; the
        parameters themselves differ by the local steps since)."""
        import torch

        if not self.horovod:
            anchors = [w.anchor for w in self.sim.workers]
            return all(torch.equal(a[n], anchors[0][n]) for a in anchors[1:] for n in anchors[0])
        flat = torch.cat([a.reshape(-1) for a in self.method.anchor.values()])
        gathered = self.hvd.allgather(flat.reshape(1, -1), name="grace_dl.experiment.anchor")
        return bool(all(torch.equal(gathered[0], g) for g in gathered[1:]))

    def all_traffic(self, mine, keys):
        """Every worker's byte totals, in rank order."""
        if not self.horovod:
            return [{k: int(getattr(w.stats, k)) for k in keys} for w in self.sim.workers]
        return super().all_traffic(mine, keys)


def make_tf_runner(config: ExperimentConfig, data: TaskData, horovod: bool):
    """The TensorFlow runner for local SGD (under ``horovodrun``; the simulator launcher
    runs local SGD on torch)."""
    from ..registry import ConfigError
    from .tf_runner import TFRunner

    if not horovod:
        raise ConfigError("local_sgd: the simulator launcher runs local SGD with framework: torch; TensorFlow "
                          "local SGD runs under horovodrun")

    class LocalSGDTFRunner(TFRunner):
        """:class:`~grace_dl.experiments.tf_runner.TFRunner` for local SGD under Horovod."""

        def __init__(self, config: ExperimentConfig, data: TaskData, horovod: bool):
            super().__init__(config, data, horovod)
            import grace_dl.tensorflow as gtf

            self.method = _method(config)
            # Horovod's broadcast ran in TFRunner: the anchor is taken from identical weights
            self.local = gtf.LocalSGD([getattr(v, "value", v) for v in self.variables], method=self.method,
                                      names=self.names)
            self.grace = self.method.grace
            self.graces = [self.grace]
            self._grad_fn = self.tf.function(self._loss_and_grads)

        def train_step(self, batches):
            x, y = self._tensors(*batches[0])
            loss, grads = self._grad_fn(x, y)
            self._apply(grads)
            self.local(float(loss.numpy()))
            return float(self.hvd.allreduce(loss, name="grace_dl.experiment.loss").numpy())

        def replicas_identical(self) -> bool:
            """Whether every rank holds the same anchor (the last averaged model)."""
            tf = self.tf
            flat = tf.concat([tf.reshape(a, [-1]) for a in self.method.anchor.values()], 0)
            gathered = self.hvd.allgather(tf.reshape(flat, [1, -1]), name="grace_dl.experiment.anchor").numpy()
            return bool(all(np.array_equal(gathered[0], g) for g in gathered[1:]))

    return LocalSGDTFRunner(config, data, horovod)
