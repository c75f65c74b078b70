"""Run N workers of one method in-process over a :class:`~grace_dl.transport.local.LocalWorld`."""

from __future__ import annotations

from typing import Mapping, Sequence

from .core import Grace
from .fusion import Fuser
from .ops import Array, get_ops
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
        self.fusers = [Fuser(w) for w in self.workers]

    def step(self, grads: Sequence[Mapping[str, Array]]) -> list[dict[str, Array]]:
        """One exchange of every named tensor: ``grads[r]`` maps names to worker ``r``'s
        gradients, in the order they become ready (which decides the fusion buckets,
        see :mod:`grace_dl.fusion`: the method's ``policies.fusion_bytes``). All
        exchanges are started before any is finished, as in a real backward pass.
        Returns each worker's aggregated tensors by name."""
        if len(grads) != self.size:
            raise ValueError(f"expected gradients of {self.size} workers, got {len(grads)}")
        names = list(grads[0])
        for r, g in enumerate(grads):
            if list(g) != names:
                raise ValueError(f"worker {r} has tensors {list(g)}, worker 0 has {names}")
        if len(self.fusers) != len(self.workers) or any(f.grace is not w for f, w in zip(self.fusers, self.workers)):
            self.fusers = [Fuser(w) for w in self.workers]  # workers replaced by the caller
        tickets = []
        for fuser, g in zip(self.fusers, grads):
            fuser.plan([(n, tuple(get_ops(t).shape(t)), get_ops(t).dtype(t)) for n, t in g.items()])
            tickets.append([(n, fuser.start(g[n], n)) for n in names])
        # the pipelines started (a bucket's once, when its last member arrived), in order
        pending = []
        for ts in tickets:
            seen, ps = set(), []
            for _, t in ts:
                p = t.started
                if id(p) not in seen:
                    seen.add(id(p))
                    ps.append(p)
            pending.append(ps)
        # multi-round methods: advance every worker one round at a time, so that each
        # round's collectives are posted by all workers before any waits on them
        while not all(p.done for ps in pending for p in ps):
            for w, ps in zip(self.workers, pending):
                for p in ps:
                    w.advance(p)
        return [{n: f.finish(t) for n, t in ts} for f, ts in zip(self.fusers, tickets)]
