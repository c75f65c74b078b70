"""Global top-k sparsification (gTop-k).

Shi, Wang, Chu, Tang, Li, Liu and Wu 2019, "A Distributed Synchronous SGD Algorithm with
Global Top-k Sparsification for Low Bandwidth Networks" (ICDCS 2019). Each worker
selects its local top-k; the aggregate is sparsified again, so that every worker applies
the k largest-magnitude elements of the sum, not the up to ``N * k`` elements of the
union; local values that did not make it into the global top-k go back into that
worker's residual.

The exchange is an allgather, not the paper's tree. The paper's gTopKAllReduce merges
pairs of workers' top-k sets over ``log2 N`` rounds of point-to-point messages (about
``2 k log2 N`` elements per worker). The transports here offer allreduce, allgather and
broadcast only; emulating one round of pairwise exchanges with them moves every
worker's set to every worker, ``(N - 1) k`` elements per round, more than one allgather
of all local sets costs in total. So every worker gathers all local top-k sets once,
sums them in rank order and selects the top-k of that sum itself: the same k elements on
every worker, and the exact top-k of the sum of the local top-k's (the tree, which
re-selects at every level, can drop an element whose partial sums were small).
"""

from __future__ import annotations

from ..core import Collective, Communicator, Compressor, TensorContext, mean_factor
from ..memories import ResidualMemory
from ..ops import Array, Ops
from ..payload import Payload
from ..registry import register
from .topk import TopK, k_for

PAPER = ("Shi et al. 2019, A Distributed Synchronous SGD Algorithm with Global Top-k Sparsification "
         "for Low Bandwidth Networks")


@register("compressor", "gtopk", paper=PAPER,
          summary="Local top-k, allgathered; every worker applies the top-k of their sum (k elements, "
                  "not N*k); local values left out go back to the residual.")
class GlobalTopK(TopK):
    """gTop-k (Shi et al. 2019): each worker sends its local top-k, ``k = max(1,
    floor(ratio * n))`` elements of largest magnitude (ties to the lowest index), as
    :class:`~grace_dl.compressors.topk.TopK` does; its ``gtopk`` communicator then keeps
    only the k largest-magnitude elements of the sum of all workers' sets, and its
    ``gtopk`` memory puts back into the residual the local values that the global
    selection dropped.

    Exchange (``gtopk`` communicator): one allgather of equal-sized payloads; every
    worker decompresses the N sets, adds them in rank order (identically everywhere),
    keeps the top-k of the sum by magnitude (NaN ranks first) and multiplies by ``1/N``
    (mean). Exactly k elements are selected; their values are nonzero unless the
    workers' values cancel exactly. Why an allgather rather than the paper's tree: see
    the module documentation.

    Wire size: payload ``k * (4 + itemsize)`` bytes (int32 indices, then values in the
    compute dtype); per worker and step the allgather sends ``(N - 1) * k * (4 +
    itemsize)`` bytes and receives as many. What is applied is k elements, not the up
    to ``N * k`` of plain top-k over allgather.

    A contraction locally (as top-k), meant for the ``gtopk`` memory and communicator;
    with the plain ``allgather``/``broadcast`` communicators it behaves as top-k with
    residual error feedback. Deterministic and bit-identical on every backend.

    Args:
        ratio: fraction of elements kept, in (0, 1] (default 0.01).
    """

    memory = "gtopk"
    communicator = "gtopk"

    def global_k(self, numel: int) -> int:
        """Elements the global selection keeps: the same k as the local one."""
        return k_for(self.ratio, numel)


@register("communicator", "gtopk", paper=PAPER,
          summary="Allgather the local top-k sets, sum them, keep the top-k of the sum on every worker.")
class GlobalTopKCommunicator(Communicator):
    """gTop-k's exchange: allgather every worker's local top-k, add the decompressed
    sets in rank order, keep the ``compressor.global_k(n)`` elements of largest
    magnitude of the sum (ties to the lowest index; NaN ranks first), then average
    (``aggregate="mean"``) or sum. Serves the ``gtopk`` compressor only.

    Args:
        aggregate: ``"mean"`` (default) or ``"sum"``.
    """

    def __init__(self, aggregate: str = "mean"):
        if aggregate not in ("mean", "sum"):
            raise ValueError(f"aggregate must be 'mean' or 'sum' for the gtopk communicator, got {aggregate!r}")
        super().__init__(aggregate)

    def exchange(self, ops: Ops, payload: Payload, compressor: Compressor, ctx: TensorContext):
        if not isinstance(compressor, GlobalTopK):
            raise TypeError(f"the gtopk communicator serves the gtopk compressor, not {type(compressor).__name__}; "
                            f"use communicator='allgather'")
        (buffers,) = yield [Collective("allgather", payload.buffer, equal_sizes=True)]
        total = compressor.decompress(ops, buffers[0], ctx)
        for b in buffers[1:]:
            total = total + compressor.decompress(ops, b, ctx)
        idx = ops.topk_indices(ops.abs(total), compressor.global_k(ctx.numel))
        kept = ops.scatter(ctx.numel, idx, ops.gather(total, idx))
        return kept * mean_factor(ctx.world_size) if self.aggregate == "mean" else kept


@register("memory", "gtopk", paper=PAPER,
          summary="Residual error feedback with gTop-k's rule: local values the global top-k dropped go back.")
class GlobalTopKMemory(ResidualMemory):
    """gTop-k's residual: ``compensated = beta * residual + gamma * grad`` (as the
    ``residual`` memory), and after the exchange ``residual = compensated - sent``,
    where ``sent`` is this worker's local top-k restricted to the elements the
    aggregate kept (nonzero in it). So a value selected locally but not globally goes
    back into the residual (the paper's rule), and the sum over steps of ``N *``
    aggregate plus the workers' residuals equals the sum of their gradients (beta =
    gamma = 1). An element whose workers' values cancel to exactly zero counts as not
    kept, so its values go back too, and no mass is lost.

    A residual that would hold NaN or Inf keeps the previous residual whole (checked
    on the device, no host sync); the aggregate still carries the NaN.

    Args:
        beta: weight of the stored residual (default 1.0).
        gamma: weight of the new gradient (default 1.0).
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0):
        super().__init__(beta, gamma)
        self._sent: dict[str, tuple[Array, Array]] = {}

    def update(self, ops: Ops, compensated: Array, transmitted: Array, ctx: TensorContext) -> None:
        # the residual depends on the global selection: kept until after_exchange
        self._sent[ctx.name] = (compensated, transmitted)

    def after_exchange(self, ops: Ops, aggregated: Array, ctx: TensorContext) -> None:
        compensated, transmitted = self._sent.pop(ctx.name)
        zeros = ops.zeros(ctx.numel, ctx.dtype, compensated)
        residual = compensated - ops.where(aggregated != 0, transmitted, zeros)
        previous = self._field(ops, ctx.name, "residual", compensated)
        if previous is None:
            previous = zeros
        finite = ops.all_finite(residual)
        keep = self._finite_update(ops, finite, ctx, "residual")
        self.state.setdefault(ctx.name, {})["residual"] = self._pick(ops, finite, keep, residual, previous)
