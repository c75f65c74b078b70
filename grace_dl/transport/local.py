"""A deterministic in-process simulator of N workers.

All workers live in one process and share a :class:`LocalWorld`. Each worker's
collective is posted under its name; it completes when every worker has posted the same
name. Results are computed in rank order, so a run is reproducible bit for bit. Waiting
on a collective that some worker never posted raises instead of hanging, which is what
a real job would do at that point.

The simulator moves arrays of any backend (NumPy, torch, TF), so it is also the
reference that the framework adapters are compared against.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..ops import Array, get_ops
from .base import Transport


class LocalWorld:
    """The shared state of ``size`` simulated workers."""

    def __init__(self, size: int):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"LocalWorld size must be a positive int, got {size!r}")
        self.size = size
        # (kind, name, occurrence) -> {rank: (buf, root)}
        self._posted: dict[tuple, dict[int, tuple[Array, int]]] = {}
        self._consumed: dict[tuple, set[int]] = defaultdict(set)
        self.transports = [LocalTransport(self, r) for r in range(size)]


class LocalTransport(Transport):
    """One simulated worker's view of a :class:`LocalWorld`."""

    def __init__(self, world: LocalWorld, rank: int):
        self.world = world
        self.rank = rank
        self.size = world.size
        self._occurrence: dict[tuple[str, str], int] = defaultdict(int)

    def _post(self, kind: str, name: str, buf: Array, root: int = 0) -> tuple:
        n = self._occurrence[(kind, name)]
        self._occurrence[(kind, name)] += 1
        key = (kind, name, n)
        slot = self.world._posted.setdefault(key, {})
        slot[self.rank] = (buf, root)
        return key

    def allreduce_async(self, buf, name):
        return self._post("allreduce", name, buf)

    def allgather_async(self, buf, name, equal_sizes=False):
        return self._post("allgather", name, buf)

    def broadcast_async(self, buf, root, name):
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} outside 0..{self.size - 1}")
        return self._post("broadcast", name, buf, root)

    def wait(self, handle: Any) -> Any:
        kind, name, _ = handle
        slot = self.world._posted.get(handle)
        if slot is None or len(slot) < self.size:
            got = sorted(slot) if slot else []
            raise RuntimeError(
                f"{kind} {name!r}: only workers {got} of {self.size} posted it; "
                f"a real job would hang here"
            )
        bufs = [slot[r][0] for r in range(self.size)]
        if kind == "allreduce":
            if self.size > 1:  # one worker's buffer always agrees with itself
                shapes = {tuple(get_ops(b).shape(b)) for b in bufs}
                if len(shapes) != 1:
                    raise ValueError(f"allreduce {name!r}: workers passed different shapes {sorted(shapes)}")
            result = bufs[0]
            for b in bufs[1:]:
                result = result + b
        elif kind == "allgather":
            result = list(bufs)
        else:
            roots = {slot[r][1] for r in range(self.size)}
            if len(roots) != 1:
                raise ValueError(f"broadcast {name!r}: workers disagree on the root {sorted(roots)}")
            result = bufs[roots.pop()]
        consumed = self.world._consumed[handle]
        consumed.add(self.rank)
        if len(consumed) == self.size:
            del self.world._posted[handle]
            del self.world._consumed[handle]
        return result
