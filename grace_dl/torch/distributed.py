"""grace-dl collectives over ``torch.distributed`` (Gloo, NCCL, MPI process groups).

Every collective is posted with ``async_op=True`` on the tensor's own device, so the
transport serves CPU tensors over Gloo and CUDA tensors over NCCL alike.
torch.distributed matches collectives by the order in which they are posted (names are
ignored), which the pipeline respects when every worker runs the same code.
"""

from __future__ import annotations

from typing import Any

import torch

from ..transport.base import Transport


class TorchDistributedTransport(Transport):
    """grace-dl's transport over a torch.distributed process group.

    Args:
        group: the process group (default None: the default group, which must be
            initialised with ``torch.distributed.init_process_group``).
    """

    def __init__(self, group: Any = None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group(...) first")
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def _global(self, rank: int) -> int:
        """The default group's rank of ``rank`` in this transport's group (what
        ``broadcast(src=...)`` expects)."""
        return rank if self.group is None else self.dist.get_global_rank(self.group, rank)

    def allreduce_async(self, buf, name):
        out = buf.reshape(-1).clone()  # all_reduce works in place; the caller's buffer stays
        work = self.dist.all_reduce(out, op=self.dist.ReduceOp.SUM, group=self.group, async_op=True)
        return ("one", work, out)

    def allgather_async(self, buf, name, equal_sizes=False):
        buf = buf.reshape(-1).contiguous()
        if equal_sizes:
            outs = [torch.empty_like(buf) for _ in range(self.size)]
            work = self.dist.all_gather(outs, buf, group=self.group, async_op=True)
            return ("list", work, outs)
        # all_gather needs equal lengths: exchange the lengths now, and gather the data,
        # padded to the longest, when waited on (every worker waits in the same order)
        count = torch.tensor([buf.numel()], dtype=torch.int64, device=buf.device)
        counts = [torch.empty_like(count) for _ in range(self.size)]
        work = self.dist.all_gather(counts, count, group=self.group, async_op=True)
        return ("sized", work, counts, buf)

    def broadcast_async(self, buf, root, name):
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} outside 0..{self.size - 1}")
        out = buf.reshape(-1).clone()
        work = self.dist.broadcast(out, src=self._global(root), group=self.group, async_op=True)
        return ("one", work, out)

    def wait(self, handle):
        kind, work = handle[0], handle[1]
        work.wait()
        if kind == "one":
            return handle[2]
        if kind == "list":
            return handle[2]
        counts = [int(c) for c in torch.cat(handle[2]).tolist()]  # host sync: sizes are data
        buf = handle[3]
        longest = max(counts)
        padded = buf
        if buf.numel() < longest:
            padded = torch.cat([buf, buf.new_zeros(longest - buf.numel())])
        outs = [torch.empty_like(padded) for _ in range(self.size)]
        self.dist.all_gather(outs, padded, group=self.group)
        return [o[:c] for o, c in zip(outs, counts)]
