"""PowerSGD: rank-r gradient compression by one step of power iteration per exchange.

Vogels, Karimireddy and Jaggi 2019, "PowerSGD: Practical Low-Rank Gradient Compression
for Distributed Optimization". A gradient of shape ``(n, ...)`` is viewed as the matrix
``M`` of shape ``(n, m)``, ``m = numel / n`` (the first dimension against all others
flattened, row-major). Each step, with ``Q`` of shape ``(m, r)``:

1. ``P = M Q`` on every worker; allreduce ``P`` (the sum over workers);
2. orthonormalise the columns of ``P`` (Gram-Schmidt), giving ``P^``, the same on every
   worker;
3. ``Q = M^T P^`` on every worker; allreduce ``Q`` and average it;
4. the aggregate is ``P^ Q^T``, identical on every worker.

Three parts of the registry work together: the ``powersgd`` compressor (steps 1-2, the
``P`` round, and the local ``Q``, which is its payload), the ``powersgd`` communicator
(step 3's allreduce and step 4) and the ``powersgd`` memory (error feedback and the
warm-start ``Q``, both saved by ``Grace.state_dict``). Within one tensor's pipeline they
hand each other the agreed ``P^``, the warm-start ``Q`` and the averaged ``Q`` through
:func:`pipeline_scratch`: the pipeline's own arguments carry only flat tensors.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from ..core import Collective, Communicator, Compressor, Memory, TensorContext, mean_factor, run_alone
from ..ops import DTYPE_ITEMSIZE, Array, Ops
from ..payload import Payload
from ..registry import register

PAPER = ("Vogels et al. 2019, PowerSGD: Practical Low-Rank Gradient Compression for Distributed "
         "Optimization")

def pipeline_scratch(ctx: TensorContext) -> dict[str, Any]:
    """The dict private to one tensor's pipeline in one step (``ctx.scratch``), in which
    PowerSGD's compressor, communicator and memory leave each other what the pipeline's
    arguments cannot carry (the agreed ``P^``, the warm-start and averaged ``Q``, the
    compensated tensor). Never saved: what must survive a step lives in the memory."""
    return ctx.scratch


def orthonormalize_rows(ops: Ops, rows: Array, epsilon: float) -> Array:
    """Modified Gram-Schmidt on the rows of 2-D ``rows`` (r, n): each row in turn has
    its component along every earlier row removed, and is divided by ``norm +
    epsilon`` (:meth:`Ops.orthonormalize_rows`, where the details are stated)."""
    return ops.orthonormalize_rows(rows, epsilon)


@register("compressor", "powersgd", paper=PAPER,
          summary="Rank-r factors P, Q from one power-iteration step per exchange (two allreduces), "
                  "warm start and error feedback.")
class PowerSGD(Compressor):
    """PowerSGD (Vogels et al. 2019): each matrix-shaped gradient travels as two rank-r
    factors, ``P`` (n x r) and ``Q`` (m x r), found by one step of subspace (power)
    iteration per exchange; with the ``powersgd`` memory it reuses last step's ``Q``
    (warm start), so that over the steps the iteration converges to the gradients'
    dominant subspace, and it feeds back what the approximation missed.

    The matrix view of a tensor of shape ``(n, d1, d2, ...)`` is ``(n, m)`` with
    ``m = d1 * d2 * ...`` (``numel / n``), row-major. The rank used is
    ``r = min(rank, n, m)``. A tensor goes **dense** (its compensated values are
    allreduced and averaged, nothing is lost) when it has fewer than two dimensions,
    when ``step < start_iter``, or when its factors are not smaller than the matrix by
    the factor ``min_compression_rate``: ``(n + m) * r * min_compression_rate >= n * m``.

    Exchange of a low-rank tensor: ``P = M Q`` is allreduced during compression (its
    bytes count as payload), its columns are orthonormalised (modified Gram-Schmidt,
    ``column / (norm + epsilon)``, giving ``P^``), and the payload is this worker's
    ``Q_w^T = P^^T M``, which the ``powersgd`` communicator allreduces and averages;
    the aggregate is ``P^ Q^T`` with the averaged ``Q``. Payloads are summable (the
    decompression is linear in ``Q``), so the ``allreduce``, ``allgather`` and
    ``broadcast`` communicators give the same aggregate up to rounding (the memory then
    takes the warm-start ``Q`` as ``A^T P^`` from the aggregate ``A``, equal to the
    averaged ``Q`` in exact arithmetic). Decompression needs the ``P`` agreed in the
    same step's compression: it is kept for the length of the pipeline (see
    :func:`pipeline_scratch`), so a payload decompresses on a worker that compressed
    the same tensor in the same step.

    The initial ``Q`` (at the first low-rank step, and every step without warm start)
    is uniform in [-1, 1), drawn from the shared key and the step as the NumPy reference
    backend's ``random_uniform`` draws (:meth:`~grace_dl.ops.Ops.reference_uniform`:
    ``m * r`` values drawn on the host and copied to the tensor's device, on CUDA a
    synchronising copy, once per tensor with warm start; inside ``tf.function`` drawn in
    the graph from the step tensor), so that every worker and every backend starts from
    the same ``Q``.

    Wire size per worker and step: low rank ``(n + m) * r * itemsize`` bytes (``P``
    then ``Q``, in the compute dtype: float32, or float64 for float64 input), dense
    ``numel * itemsize``. The returned :class:`Payload` holds ``Q`` (``m * r *
    itemsize``); the pipeline counts the ``P`` allreduce made while compressing as
    payload too. :meth:`payload_nbytes` answers for a 1-D tensor of ``numel`` elements
    (dense); :meth:`payload_nbytes_for_shape` for any shape and step.

    Not bit-identical across backends: the matrix products are the frameworks' own
    kernels (``exact_across_backends`` is false); on one backend and device, every
    worker, the simulator and a real multi-process run agree bit for bit.
    Deterministic: the payload is a function of the input, the step, the shared seed
    and the warm-start ``Q``. Biased: on one worker the result is an orthogonal
    projection of the (compensated) gradient, ``P^ P^^T M``, never longer than it.

    NaN or Inf in a gradient spreads through the allreduced ``P`` to every worker's
    aggregate (a loss scaler sees it); the memory then keeps its previous error and
    ``Q``.

    Args:
        rank: the rank r of the factors, >= 1 (default 1).
        warm_start: start each step's power iteration from last step's averaged ``Q``,
            kept in the ``powersgd`` memory (default True); otherwise draw a new ``Q``
            every step.
        min_compression_rate: exchange a tensor dense unless its factors are smaller
            than the matrix by at least this factor, >= 0 (default 2.0; below 1 forces
            low rank even where the factors are larger, for experiments).
        start_iter: exchange every tensor dense before this step, >= 0 (default 0).
        epsilon: added to each column's norm in the orthonormalisation, > 0
            (default 1e-8).
    """

    summable = True
    bias = "biased"
    memory = "powersgd"
    communicator = "powersgd"
    deterministic = True
    exact_across_backends = False

    def __init__(self, rank: int = 1, warm_start: bool = True, min_compression_rate: float = 2.0,
                 start_iter: int = 0, epsilon: float = 1e-8):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if not 0.0 <= min_compression_rate < math.inf:
            raise ValueError(f"min_compression_rate must be in [0, inf), got {min_compression_rate}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be an int >= 0, got {start_iter!r}")
        if not 0.0 < epsilon < math.inf:
            raise ValueError(f"epsilon must be in (0, inf), got {epsilon}")
        self.rank = rank
        self.warm_start = bool(warm_start)
        self.min_compression_rate = float(min_compression_rate)
        self.start_iter = start_iter
        self.epsilon = float(epsilon)

    # -- the plan of one tensor -------------------------------------------------------------
    def plan(self, shape: tuple[int, ...], step: int | None = None) -> tuple[int, int, int] | None:
        """``(n, m, r)`` of the low-rank exchange of a tensor of ``shape`` at ``step``,
        or None where it goes dense (``step`` None: ignore ``start_iter``)."""
        # start_iter 0 is decided without comparing the step; a step that is not an integer
        # is the step tensor of TensorFlow's graph path, which traces the steps before
        # start_iter with int values and only the later ones with the tensor
        if step is not None and self.start_iter and isinstance(step, numbers.Integral) and step < self.start_iter:
            return None
        if len(shape) < 2:
            return None
        numel = math.prod(shape)
        if numel == 0:
            return None
        n = shape[0]
        m = numel // n
        r = min(self.rank, n, m)
        if (n + m) * r * self.min_compression_rate >= n * m:
            return None
        return n, m, r

    def fusable(self, shape: tuple[int, ...]) -> bool:
        """Only tensors sent dense at every step (fewer than two dimensions, or too small
        to factor) may share a fusion bucket: the others need their own matrix view."""
        return self.plan(tuple(shape)) is None

    def payload_nbytes_for_shape(self, shape: tuple[int, ...], dtype: str = "float32", step: int | None = None) -> int:
        """Exact bytes this worker sends for a tensor of ``shape`` at ``step``:
        ``(n + m) * r * itemsize`` low rank, ``numel * itemsize`` dense."""
        plan = self.plan(tuple(shape), step)
        if plan is None:
            return math.prod(shape) * DTYPE_ITEMSIZE[dtype]
        n, m, r = plan
        return (n + m) * r * DTYPE_ITEMSIZE[dtype]

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        """Bytes for a 1-D tensor of ``numel`` elements, which goes dense: ``numel *
        itemsize``. Matrices: :meth:`payload_nbytes_for_shape`."""
        return numel * DTYPE_ITEMSIZE[dtype]

    # -- compression ----------------------------------------------------------------------------
    def _initial_q(self, ops: Ops, like: Array, ctx: TensorContext, m: int, r: int) -> Array:
        # the reference backend's draws, so that every backend starts from the same Q (the
        # step may be TensorFlow's step tensor: drawn in the graph, see Ops.reference_uniform)
        # scaled to [-1, 1): exact (* 2) and one rounding (- 1), the same in every
        # backend's float arithmetic (a fused multiply-add included)
        return ops.reference_uniform_signed(r * m, ctx.shared_key, ctx.step, ctx.dtype, like)

    def compress_rounds(self, ops: Ops, x: Array, ctx: TensorContext):
        scratch = pipeline_scratch(ctx)
        plan = self.plan(ctx.shape, ctx.step)
        scratch["low_rank"] = plan is not None
        if plan is None:
            return Payload.of(ops, x)
        n, m, r = plan
        q = scratch.get("q") if self.warm_start else None
        if q is None:
            q = self._initial_q(ops, x, ctx, m, r)
        elif ops.numel(q) != r * m:
            raise ValueError(f"tensor {ctx.name!r}: its warm-start Q has {ops.numel(q)} values, rank {r} "
                             f"needs {r * m}: the rank changed, or two tensors share one name")
        scratch["q_used"] = q
        scratch["warm_start"] = self.warm_start
        matrix = ops.reshape(x, (n, m))
        # Q is kept as Q^T (r, m): every transpose below is of a small factor, never of M
        p = ops.matmul(matrix, ops.transpose(ops.reshape(q, (r, m))))
        (p_sum,) = yield [Collective("allreduce", ops.flatten(p), tag="p")]
        pt = orthonormalize_rows(ops, ops.transpose(ops.reshape(p_sum, (n, r))), self.epsilon)
        scratch["p"] = pt
        return Payload.of(ops, ops.flatten(ops.matmul(pt, matrix)))

    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        """The payload as the only worker (the ``P`` allreduce returns this worker's ``P``)."""
        return run_alone(self.compress_rounds(ops, x, ctx))

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        plan = self.plan(ctx.shape, ctx.step)
        if plan is None:
            return buffer
        n, m, r = plan
        pt = pipeline_scratch(ctx).get("p")
        if pt is None:
            raise RuntimeError(f"powersgd: tensor {ctx.name!r} step {ctx.step} was not compressed with this "
                               f"context, so the P agreed in its compression is unknown")
        return ops.flatten(ops.matmul(ops.transpose(pt), ops.reshape(buffer, (r, m))))


@register("communicator", "powersgd", paper=PAPER,
          summary="PowerSGD's second round: allreduce the Q factors (or a dense tensor), average, expand P Q^T.")
class PowerSGDCommunicator(Communicator):
    """PowerSGD's ``Q`` round: one allreduce of the payload (this worker's ``Q``, or
    its dense tensor), averaged (``aggregate="mean"``) or summed, then ``P Q^T``. The
    averaged ``Q`` becomes the next step's warm start (in the ``powersgd`` memory).
    Serves the ``powersgd`` compressor only.

    Args:
        aggregate: ``"mean"`` (default) or ``"sum"``.
    """

    requires_summable = True

    def __init__(self, aggregate: str = "mean"):
        if aggregate not in ("mean", "sum"):
            raise ValueError(f"aggregate must be 'mean' or 'sum' for the powersgd communicator, got {aggregate!r}")
        super().__init__(aggregate)

    def exchange(self, ops: Ops, payload: Payload, compressor: Compressor, ctx: TensorContext):
        if not isinstance(compressor, PowerSGD):
            raise TypeError(f"the powersgd communicator serves the powersgd compressor, not "
                            f"{type(compressor).__name__}; use communicator='allreduce'")
        (summed,) = yield [Collective("allreduce", payload.buffer, tag="q")]
        # the paper averages Q, then expands (decompression is linear either way)
        if self.aggregate == "mean":
            summed = summed * mean_factor(ctx.world_size)
        scratch = pipeline_scratch(ctx)
        if scratch.get("low_rank"):
            scratch["q_next"] = summed
        return compressor.decompress(ops, summed, ctx)


@register("memory", "powersgd", paper=PAPER,
          summary="PowerSGD's error feedback (local tensor minus the aggregated approximation) and warm-start Q.")
class PowerSGDMemory(Memory):
    """PowerSGD's per-tensor state, saved by ``Grace.state_dict``:

    * ``"error"``: the paper's error feedback, ``e = (g + e_prev) - A``, the compensated
      local tensor minus the aggregated approximation ``A`` (what all workers apply), so
      that the sum over steps of ``N * A`` plus the sum of the workers' errors equals
      the sum of all gradients. A tensor exchanged dense loses nothing: its error is
      dropped. Assumes the mean aggregate (the default).
    * ``"q"``: the warm-start ``Q^T`` (r x m, flat), the ``Q`` averaged over workers at
      the last low-rank step: the same on every worker. With a communicator other than
      ``powersgd``, ``A^T P^`` (the same in exact arithmetic).

    A step whose error holds NaN or Inf keeps the previous error whole; one whose
    averaged ``Q`` does (it is the same on every worker, so all decide alike) keeps the
    ``Q`` it started from. A column of the averaged ``Q`` that is exactly zero (a zero
    gradient gives ``P = 0`` and ``Q = 0``) would stay zero at every later step
    (``P = M 0``): it restarts from the column the step started from. The checks run on
    the device, without a host sync. Serves the ``powersgd`` compressor only.

    Args:
        error_feedback: feed back the error (default True); False keeps only the warm
            start (the paper's ablation).
    """

    needs_transmitted = False
    #: the fields of its per-tensor state (checked when a checkpoint is loaded)
    state_fields = ("error", "q")
    #: the fields with one element per tensor element (``q`` is a factor)
    tensor_sized_fields = ("error",)

    def __init__(self, error_feedback: bool = True):
        super().__init__()
        self.error_feedback = bool(error_feedback)

    def compensate(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        q = self._field(ops, ctx.name, "q", x)
        if q is not None:
            pipeline_scratch(ctx)["q"] = q
        error = self._field(ops, ctx.name, "error", x)
        if error is None or not self.error_feedback:
            return x
        if ops.numel(error) != ctx.numel:
            raise ValueError(f"tensor {ctx.name!r} has {ctx.numel} elements but its error has "
                             f"{ops.numel(error)}: two tensors share one name")
        return x + error

    def update(self, ops: Ops, compensated: Array, transmitted: Array | None, ctx: TensorContext) -> None:
        # the error needs the aggregate: kept until after_exchange
        pipeline_scratch(ctx)["compensated"] = compensated

    def after_exchange(self, ops: Ops, aggregated: Array, ctx: TensorContext) -> None:
        scratch = pipeline_scratch(ctx)
        compensated = scratch.pop("compensated", None)
        if "low_rank" not in scratch:
            raise TypeError(f"memory 'powersgd' serves the powersgd compressor (tensor {ctx.name!r}); "
                            f"use memory='residual' with other compressors")
        fields = self.state.setdefault(ctx.name, {})
        if not scratch["low_rank"]:
            fields.pop("error", None)  # exchanged dense: nothing was lost
        else:
            if self.error_feedback:
                error = compensated - aggregated
                previous = self._field(ops, ctx.name, "error", error)
                if previous is None:
                    previous = ops.zeros(ctx.numel, ctx.dtype, error)
                finite = ops.all_finite(error)
                keep = self._finite_update(ops, finite, ctx, "error")
                fields["error"] = self._pick(ops, finite, keep, error, previous)
            if scratch.get("warm_start"):
                fields["q"] = self._next_q(ops, aggregated, scratch, ctx)
        if not fields:
            del self.state[ctx.name]

    def _next_q(self, ops: Ops, aggregated: Array, scratch: dict[str, Any], ctx: TensorContext) -> Array:
        pt, used = scratch["p"], scratch["q_used"]
        r, n = ops.shape(pt)
        m = ctx.numel // n
        q_next = scratch.get("q_next")
        if q_next is None:  # another communicator: Q^T = P^^T A, as A = P^ Q^T, P^^T P^ = I
            q_next = ops.matmul(pt, ops.reshape(aggregated, (n, m)))
        q_next = ops.reshape(q_next, (r, m))
        used = ops.reshape(used, (r, m))
        # a factor that came back exactly zero (a zero gradient) would stay zero forever
        # (P = M 0): restart it from the Q this step started from
        dead = ops.reshape(ops.max(ops.abs(q_next), axis=1) == 0, (r, 1))
        q_next = ops.flatten(ops.where(dead, used, q_next))
        finite = ops.all_finite(q_next)
        return self._pick(ops, finite, self._finite_update(ops, finite, ctx, "Q"), q_next, ops.flatten(used))
