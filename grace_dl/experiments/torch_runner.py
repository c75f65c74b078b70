"""The experiments on PyTorch: models, losses and one training step.

Under ``horovodrun`` the gradients go through STOCK ``hvd.DistributedOptimizer`` with
``compression=grace_dl.torch.from_config(...)`` (a
:class:`~grace_dl.torch.HorovodCompression`, whose ``.grace`` keeps the byte counts).
Under the ``simulator`` launcher one process plays every worker: one model stands for the
N replicas, which stay identical because every worker receives the same aggregated
gradient (checked at every step). Each worker's gradient is
computed on its own batch, :class:`grace_dl.LocalSimulator` exchanges them, and the
optimizer applies the aggregate.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ExperimentConfig
from .tasks import TaskData


class CharRNN(nn.Module):
    """Embedding -> GRU/LSTM -> linear next-character logits."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, arch: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        rnn = nn.GRU if arch == "gru" else nn.LSTM
        self.rnn = rnn(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


def build_model(config: ExperimentConfig, data: TaskData) -> nn.Module:
    """The model of the task (see ``model`` in the YAML reference)."""
    m = config.model
    if data.name == "digits":
        if m["arch"] == "mlp":
            return nn.Sequential(nn.Linear(64, m["hidden"]), nn.ReLU(), nn.Linear(m["hidden"], 10))
        return nn.Sequential(  # cnn
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, m["hidden"]), nn.ReLU(), nn.Linear(m["hidden"], 10))
    if data.name == "charlm":
        return CharRNN(data.num_classes, m["embed"], m["hidden"], m["layers"], m["arch"])
    model = nn.Linear(data.input_dim, 1, bias=False)
    nn.init.zeros_(model.weight)  # start at w = 0: the initial distance to the optimum is |w*|
    return model


def loss_fn(data: TaskData, model: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task's training loss."""
    if data.kind == "classification":
        return nn.functional.cross_entropy(out, y)
    if data.kind == "sequence":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    z = out.reshape(-1)
    data_loss = (0.5 * (z - y) ** 2).mean() if data.kind == "least_squares" else \
        nn.functional.binary_cross_entropy_with_logits(z, y)
    return data_loss + 0.5 * data.l2 * (model.weight ** 2).sum()


def make_optimizer(config: ExperimentConfig, params) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam; weight decay is the L2 term added to the aggregated
    gradient (PyTorch's coupled weight decay)."""
    o = config.optimizer
    if o["name"] == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
    return torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])


class TorchRunner:
    """One worker of a Horovod launch (``horovod=True``), or every worker of the simulator.

    Attributes:
        rank, size: this process's rank and the number of workers.
        local_ranks: the workers whose batches :meth:`train_step` takes (one under
            Horovod, all under the simulator).
        grace: the method whose traffic is reported (rank 0's under the simulator).
        graces: every method instance this process runs (for timing).
    """

    def __init__(self, config: ExperimentConfig, data: TaskData, horovod: bool):
        self._build_model(config, data, horovod)
        if horovod:
            import grace_dl.torch

            hvd = self._init_horovod()
            compression = grace_dl.torch.from_config(config.compression)
            self.grace = compression.grace
            self.graces = [self.grace]
            self.optimizer = hvd.DistributedOptimizer(
                make_optimizer(config, self.model.parameters()),
                named_parameters=self.model.named_parameters(), compression=compression)
            self.local_ranks = [self.rank]
        else:
            import grace_dl
            import grace_dl.torch  # noqa: F401  (registers the torch ops backend)

            from .config import build_compression

            self.rank, self.size = 0, config.workers
            self.sim = grace_dl.LocalSimulator(build_compression(config.compression), config.workers)
            self.graces = self.sim.workers
            self.grace = self.sim.workers[0]
            self.optimizer = make_optimizer(config, self.model.parameters())
            self.local_ranks = list(range(config.workers))

    def _build_model(self, config: ExperimentConfig, data: TaskData, horovod: bool) -> None:
        """The model (seeded by the config) and the input and target dtypes of the task."""
        self.config, self.data, self.horovod = config, data, horovod
        torch.manual_seed(config.seed)
        self.model = build_model(config, data)
        self._x_dtype = torch.int64 if data.kind == "sequence" else torch.float32
        self._y_dtype = torch.int64 if data.kind in ("classification", "sequence") else torch.float32

    def _init_horovod(self) -> Any:
        """Initialise Horovod, share the CPU cores among the local ranks and start every
        rank from rank 0's parameters; returns ``horovod.torch``."""
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, hvd.local_size())))
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        return hvd

    @staticmethod
    def timing_active() -> bool:
        """Pipeline timers always measure real work on PyTorch (eager)."""
        return True

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.as_tensor(x, dtype=self._x_dtype), torch.as_tensor(y, dtype=self._y_dtype)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of the next step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
        """One step on each local worker's batch; the mean loss over all workers."""
        self.model.train()
        if self.horovod:
            x, y = self._tensors(*batches[0])
            self.optimizer.zero_grad()
            loss = loss_fn(self.data, self.model, self.model(x), y)
            loss.backward()
            self.optimizer.step()
            return self.hvd.allreduce(loss.detach(), name="grace_dl.experiment.loss").item()
        grads, losses = [], []
        params = list(self.model.named_parameters())
        for batch in batches:
            x, y = self._tensors(*batch)
            self.optimizer.zero_grad()
            loss = loss_fn(self.data, self.model, self.model(x), y)
            loss.backward()
            losses.append(loss.item())
            # in ready order (reversed), from which the Horovod adapter plans fusion buckets
            grads.append({n: p.grad.detach().clone() for n, p in reversed(params)})
        out = self.sim.step(grads)
        self.check_replicas(out)
        for n, p in params:
            p.grad = out[0][n]
        self.optimizer.step()
        return float(np.mean(losses))

    @staticmethod
    def check_replicas(out: list[dict[str, torch.Tensor]]) -> None:
        """Every simulated worker got the same aggregate (so one model stands for all)."""
        for r, agg in enumerate(out[1:], 1):
            for n, t in agg.items():
                if not torch.equal(t, out[0][n]):
                    raise RuntimeError(f"simulated worker {r} received a different aggregate for {n!r} "
                                       f"than worker 0; replicas would diverge")

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the test set (classification and sequence tasks)."""
        self.model.eval()
        x, y = self._tensors(self.data.x_test, self.data.y_test)
        with torch.no_grad():
            out = self.model(x)
            loss = loss_fn(self.data, self.model, out, y).item()
            accuracy = (out.argmax(-1) == y).float().mean().item()
        return {"eval_loss": loss, "accuracy": accuracy}

    def flat_weights(self) -> np.ndarray:
        """All parameters, flattened (the synthetic task's ``w``)."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).double().numpy()

    def replicas_identical(self) -> bool:
        """Under Horovod: whether every rank holds the same parameters (rank 0 is told)."""
        if not self.horovod:
            return True
        flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        gathered = self.hvd.allgather(flat.reshape(1, -1), name="grace_dl.experiment.params")
        return bool(all(torch.equal(gathered[0], g) for g in gathered[1:]))

    def all_traffic(self, mine: dict[str, int], keys: tuple[str, ...]) -> list[dict[str, int]]:
        """Every worker's byte totals, in rank order."""
        if not self.horovod:
            return [{k: int(getattr(w.stats, k)) for k in keys} for w in self.sim.workers]
        row = torch.tensor([[mine[k] for k in keys]], dtype=torch.int64)
        rows = self.hvd.allgather(row, name="grace_dl.experiment.traffic").tolist()
        return [dict(zip(keys, r)) for r in rows]
