"""Run N workers of one method in-process over a :class:`~grace_dl.transport.local.LocalWorld`."""

from __future__ import annotations

from typing import Mapping, Sequence

from .core import Grace
from .ops import Array
from .transport.local import LocalWorld


class LocalSimulator:
    """``size`` simulated workers, each with its own copy of ``grace`` (own memory and
    step counters), exchanging through a deterministic in-process transport.

    Args:
        grace: the method; each worker gets ``grace.fresh_copy()``.
        size: number of workers (>= 1).
    """

    def __init__(self, grace: Grace, size: int):
        self.world = LocalWorld(size)
        self.size = size
        self.workers = [grace.fresh_copy().bind(t) for t in self.world.transports]

    def step(self, grads: Sequence[Mapping[str, Array]]) -> list[dict[str, Array]]:
        """One exchange of every named tensor: ``grads[r]`` maps names to worker ``r``'s
        gradients. All exchanges are started before any is finished, as in a real
        backward pass. Returns each worker's aggregated tensors by name."""
        if len(grads) != self.size:
            raise ValueError(f"expected gradients of {self.size} workers, got {len(grads)}")
        names = list(grads[0])
        for r, g in enumerate(grads):
            if list(g) != names:
                raise ValueError(f"worker {r} has tensors {list(g)}, worker 0 has {names}")
        pending = [[(n, w.start(g[n], n)) for n in names] for w, g in zip(self.workers, grads)]
        # multi-round methods: advance every worker one round at a time, so that each
        # round's collectives are posted by all workers before any waits on them
        while not all(p.done for ps in pending for _, p in ps):
            for w, ps in zip(self.workers, pending):
                for _, p in ps:
                    w.advance(p)
        return [{n: w.finish(p) for n, p in ps} for w, ps in zip(self.workers, pending)]
