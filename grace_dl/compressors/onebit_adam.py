"""1-bit Adam: Adam whose momentum travels as one bit per element once its variance is frozen.

Tang, Gan, Awan, Rajbhandari, Li, Lian, Liu, Zhang and He 2021, "1-bit Adam: Communication
Efficient Large-Scale Training with Adam's Convergence Speed" (DeepSpeed's ``OnebitAdam``).
Plain error feedback does not fix Adam: its variance ``v`` is a non-linear function of the
gradients, so compressing the gradients biases ``v``. 1-bit Adam runs plain Adam for a
warm-up, then freezes ``v``, which leaves the momentum ``m`` as the only state that moves
with the gradients; ``m`` is linear in them, so it can be compressed with error feedback.

Three parts of the registry work together, as PowerSGD's do: the ``onebit_adam``
compressor (Adam's hyperparameters; the warm-up's dense payload or the worker's 1-bit
momentum), the ``onebit_adam`` communicator (the exchange, the server-side compression and
Adam's update direction) and the ``onebit_adam`` memory (``m``, ``v`` and both error
feedbacks, saved by ``Grace.state_dict``). Within one tensor's pipeline they hand each
other the state through ``ctx.scratch``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import numpy as np

from ..core import Collective, Communicator, Compressor, Memory, TensorContext, mean_factor
from ..ops import DTYPE_ITEMSIZE, Array, Ops
from ..payload import Payload, from_words, layout_nbytes, to_words, words_for
from ..registry import register

PAPER = ("Tang et al. 2021, 1-bit Adam: Communication Efficient Large-Scale Training with Adam's "
         "Convergence Speed")

#: the key of this method's entry in ``ctx.scratch``
_SCRATCH = "onebit_adam"
#: the per-tensor state the memory keeps
STATE_FIELDS = ("m", "v", "worker_error", "server_error")
#: the longest table of bias corrections for a symbolic step (TensorFlow's graph path)
MAX_CORRECTION_TABLE = 1 << 20


def _scratch(ctx: TensorContext) -> dict[str, Any]:
    return ctx.scratch.setdefault(_SCRATCH, {})


def sign_layout(numel: int, dtype: str) -> list[tuple[str, int]]:
    """The 1-bit wire layout: ``numel`` sign bits, then one scale in ``dtype``."""
    return [("bool", numel), (dtype, 1)]


def compress_signs(ops: Ops, x: Array) -> tuple[Array, Array]:
    """``(buffer, decompressed)`` of 1-D float ``x`` under 1-bit Adam's compression
    ``C(x) = (||x||_2 / sqrt(n)) sign(x)``: the sign bits (set where ``x >= 0``, so zero
    is sent as +1) packed 32 to an int32 word, then the scale. The scale is
    ``sqrt(tree_sum(x * x) / n)``, added in the fixed order of :meth:`Ops.tree_sum`,
    so that the buffer is bit-identical on every backend; a zero ``x`` has scale 0 and
    decompresses to zero."""
    buffer, words, scale = _sign_payload(ops, x)
    return buffer, ops.select_bits(words, ops.numel(x), scale, -scale)


def _sign_payload(ops: Ops, x: Array) -> tuple[Array, Array, Array]:
    """``(buffer, sign words, scale)`` of :func:`compress_signs`, without its
    decompression (a full-size array the worker's compression does not need)."""
    scale = ops.sqrt(ops.tree_sum(x * x, 1.0 / ops.numel(x)))
    words = ops.pack_signs(x)
    return ops.concat([words, to_words(ops, scale)]), words, scale


def expand_signs(ops: Ops, buffer: Array, numel: int, dtype: str) -> Array:
    """The decompression of a :func:`compress_signs` buffer of ``numel`` elements."""
    n_words = words_for("bool", numel)
    expected = layout_nbytes(sign_layout(numel, dtype)) // 4
    if ops.numel(buffer) != expected:
        raise ValueError(f"payload has {ops.numel(buffer)} words, 1-bit Adam's momentum of {numel} {dtype} "
                         f"elements takes {expected}")
    scale = from_words(ops, buffer[n_words:], dtype, 1)
    return ops.select_bits(buffer[:n_words], numel, scale, -scale)


@register("compressor", "onebit_adam", paper=PAPER,
          summary="Adam with dense warm-up, then frozen variance and the momentum sent as 1 bit per element "
                  "with worker- and server-side error feedback; returns Adam's update (use SGD without momentum).")
class OnebitAdam(Compressor):
    """1-bit Adam (Tang et al. 2021; DeepSpeed's ``OnebitAdam``). The method *is* the
    optimizer's Adam: what it hands back for each tensor is Adam's update direction
    ``m_hat / (sqrt(v_hat) + eps)``, so pair it with plain SGD **without momentum**
    (``torch.optim.SGD(params, lr)``, ``tf.keras.optimizers.SGD(lr)``); the learning rate,
    its schedule and decoupled weight decay come from that optimizer. An optimizer with
    momentum is refused (Adam's momentum would be applied twice), and so is an adaptive
    one (Adam on top of Adam's direction).

    **Warm-up** (the first ``freeze_step`` steps of each tensor): the gradients are
    allreduced dense and averaged, and ``m`` and ``v`` follow Adam exactly:
    ``m = beta1 m + (1 - beta1) g``, ``v = beta2 v + (1 - beta2) g^2``.

    **Compression stage** (from step ``freeze_step`` on): ``v`` stays frozen. Each worker
    updates its momentum with its own gradient, ``m_w = beta1 m + (1 - beta1) g_w``, adds
    its worker error ``e_w`` and sends ``C(m_w + e_w)``, one sign bit per element and the
    scale ``||x||_2 / sqrt(n)`` (as DeepSpeed); ``e_w`` keeps what the compression missed.
    The workers' messages are allgathered and averaged; the server-side compression of
    the paper, ``m = C(avg + e_s)`` with the server error ``e_s`` keeping what it missed,
    is computed by every worker on the whole tensor (the same bits everywhere, so no
    second round is needed), and ``m`` becomes the shared momentum of the next step.

    The direction uses Adam's bias correction when ``bias_correction`` is true (the
    default, so that the warm-up is exactly ``torch.optim.Adam``'s and Keras' Adam):
    ``m_hat = m / (1 - beta1^t)``, ``v_hat = v / (1 - beta2^min(t, freeze_step))`` with
    ``t`` the 1-based step; false gives DeepSpeed's ``m / (sqrt(v) + eps)``. Elements
    whose ``v`` is exactly zero (their gradient was zero at every step so far: an input
    feature that is always zero, an unused embedding row) get direction 0: one bit cannot
    send zero, and the 1-bit momentum's ``+-scale`` divided by ``eps`` would throw such a
    weight away (DeepSpeed asks the user for a mask, ``exp_avg_mask``, instead).

    Wire size per worker and step: warm-up ``numel * itemsize`` (the gradient in its own
    dtype, allreduced); compression stage ``4 * ceil(n / 32) + itemsize`` bytes (compute
    dtype scale), allgathered: 1 bit per element plus a scale, 1/32 of float32.
    :meth:`payload_nbytes` answers for the warm-up, :meth:`payload_nbytes_after_warmup`
    for the compression stage. Bit-identical on every backend (sums in a fixed pairwise
    order, elementwise arithmetic only). Biased (a scaled sign). A gradient with NaN or
    Inf reaches the direction; the memory then keeps its previous state.

    Args:
        freeze_step: the number of dense warm-up steps before ``v`` is frozen, >= 1
            (default 100000, DeepSpeed's default; the paper warms up for about 15-25% of
            training: set it for your run).
        beta1: Adam's momentum coefficient, in [0, 1) (default 0.9).
        beta2: Adam's variance coefficient, in [0, 1) (default 0.999).
        eps: added to ``sqrt(v_hat)``, > 0 (default 1e-8).
        bias_correction: divide ``m`` and ``v`` by ``1 - beta^t`` as Adam does (default
            True; DeepSpeed's 1-bit Adam does not).
    """

    summable = False
    bias = "biased"
    memory = "onebit_adam"
    communicator = "onebit_adam"
    aggregate = "mean"
    deterministic = True
    zero_preserving = True
    exact_across_backends = True
    #: keeps Adam's momentum: refused with an optimizer's momentum (see :mod:`grace_dl.checks`)
    carries_momentum = True
    #: the name of the parameter that sets that momentum
    momentum_param = "beta1"
    #: hands back an optimizer update direction, not an averaged gradient
    returns_update = True

    def __init__(self, freeze_step: int = 100000, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 bias_correction: bool = True):
        if isinstance(freeze_step, bool) or not isinstance(freeze_step, int) or freeze_step < 1:
            raise ValueError(f"freeze_step must be an int >= 1 (the variance needs a warm-up), got {freeze_step!r}")
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value}")
        if not 0.0 < eps < math.inf:
            raise ValueError(f"eps must be in (0, inf), got {eps}")
        self.freeze_step = freeze_step
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.bias_correction = bool(bias_correction)

    @property
    def momentum(self) -> float:
        """Adam's momentum coefficient ``beta1`` (read by :mod:`grace_dl.checks`)."""
        return self.beta1

    def frozen(self, step: int) -> bool:
        """Whether ``step`` (0-based) is in the compression stage (``v`` frozen)."""
        return step >= self.freeze_step

    def frozen_at(self, ctx: TensorContext) -> bool:
        """:meth:`frozen` at ``ctx.step``. A symbolic step (TensorFlow's graph path) is
        traced apart for the warm-up (its ``ctx.step_range`` lies before
        ``freeze_step``) and from ``freeze_step`` on (no range, or one after it)."""
        if isinstance(ctx.step, numbers.Integral):
            return self.frozen(ctx.step)
        return ctx.step_range is None or ctx.step_range[0] >= self.freeze_step

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def correction_table(beta: float, cap: int | None, dtype: str) -> np.ndarray:
        """Adam's bias correction ``1 / (1 - beta ** min(t, cap))`` for ``t = 0, 1, ...``
        as :meth:`direction` computes it (Python floats; entry 0 unused), up to the
        first ``t`` from which it is constant in ``dtype`` (it decreases to 1, or stops
        at ``cap``): the last entry holds for every later ``t``. ValueError beyond
        ``MAX_CORRECTION_TABLE`` entries (``beta`` too close to 1)."""
        rounded = np.float32 if dtype == "float32" else np.float64
        values = [1.0]
        while True:
            t = len(values)
            value = 1.0 / (1.0 - beta ** (t if cap is None else min(t, cap)))
            values.append(value)
            if (cap is not None and t >= cap) or rounded(value) == 1.0:
                table = np.array(values, np.float64)
                table.flags.writeable = False  # cached: shared by every caller
                return table
            if len(values) >= MAX_CORRECTION_TABLE:
                raise ValueError(f"1-bit Adam's bias correction with beta={beta} reaches its limit after more "
                                 f"than {MAX_CORRECTION_TABLE} steps: too many to tabulate for a symbolic step")

    # -- Adam's arithmetic, one order of operations for every backend ---------------------------
    def moments(self, ops: Ops, m: Array, v: Array, g: Array) -> tuple[Array, Array]:
        """Adam's ``(beta1 m + (1 - beta1) g, beta2 v + (1 - beta2) g^2)`` (``g^2``
        rounded before it is scaled, inside a graph too: :meth:`Ops.hold`)."""
        return m * self.beta1 + g * (1.0 - self.beta1), v * self.beta2 + ops.hold(g * g) * (1.0 - self.beta2)

    def direction(self, ops: Ops, m: Array, v: Array, step: int) -> Array:
        """Adam's update direction at 0-based ``step``: ``m_hat / (sqrt(v_hat) + eps)``
        (see the class docstring for the bias correction). Divisions by a scalar are
        multiplications by its reciprocal, which every backend and device rounds alike."""
        if self.bias_correction and not isinstance(step, numbers.Integral):
            # a symbolic step (TensorFlow's graph path): the factors below, looked up in
            # tables of their Python values (so that they round alike)
            m = m * self._symbolic_correction(ops, m, self.beta1, step + 1, None)
            v = v * self._symbolic_correction(ops, v, self.beta2, step + 1, self.freeze_step)
        elif self.bias_correction:
            t = step + 1
            m = m * (1.0 / (1.0 - self.beta1 ** t))
            v = v * (1.0 / (1.0 - self.beta2 ** min(t, self.freeze_step)))
        direction = m / (ops.sqrt(v) + self.eps)
        # v == 0: the gradient was exactly zero in every step so far (an input feature that
        # is always zero, an unused embedding row). A sign cannot send zero, so the 1-bit
        # momentum is +-scale there, and +-scale / eps would throw the weight away; such
        # elements do not move (DeepSpeed leaves this to a user-given exp_avg_mask). NaN in
        # v is not zero: it still reaches the direction.
        return ops.where(v == 0, ops.zeros(ops.numel(v), ops.dtype(direction), direction), direction)

    def _symbolic_correction(self, ops: Ops, like: Array, beta: float, t: Any, cap: int | None) -> Array:
        """The 0-d factor ``1 / (1 - beta ** min(t, cap))`` in ``like``'s dtype at a
        symbolic 1-based step ``t`` (:meth:`correction_table`)."""
        dtype = ops.dtype(like)
        values = self.correction_table(beta, cap, dtype)
        return ops.cast(ops.from_numpy(values, like)[ops.minimum(t, len(values) - 1)], dtype)

    # -- the worker's message --------------------------------------------------------------------
    def compress(self, ops: Ops, x: Array, ctx: TensorContext) -> Payload:
        """Warm-up: the gradient ``x`` (in the input dtype). Compression stage: the 1-bit
        form of this worker's ``beta1 m + (1 - beta1) x`` plus its worker error (state
        left in ``ctx.scratch`` by the ``onebit_adam`` memory; zero without it)."""
        if not self.frozen_at(ctx):
            return Payload.of(ops, ops.cast(x, ctx.in_dtype) if ctx.in_dtype != ctx.dtype else x)
        state = _scratch(ctx)
        # a missing field is a zero one, used all the same (x + 0 turns -0.0 into +0.0):
        # TensorFlow's graph path keeps every field from the start, zero until written;
        # eagerly, the scalar 0.0 below is added as it is written
        m = state.get("m")
        # held: Grappler would otherwise add a chain of sums in its own order (AddN), and
        # subtract C(buffer) from another rounding of the buffer
        error = state.get("worker_error")
        # one expression, so that NumPy adds the error into the momentum's temporary
        buffer = ops.hold(ops.hold(self._worker_momentum(ops, m, x)) + (0.0 if error is None else error))
        words, _, _ = _sign_payload(ops, buffer)
        state["worker_buffer"] = buffer
        return Payload.of(ops, words)

    def _worker_momentum(self, ops: Ops, m: Array | None, x: Array) -> Array:
        # a missing m adds as the scalar 0.0: the rounding of a zero field (-0.0 becomes
        # +0.0) without a full-size array of zeros
        return (x * (1.0 - self.beta1) + 0.0) if m is None else m * self.beta1 + x * (1.0 - self.beta1)

    def decompress(self, ops: Ops, buffer: Array, ctx: TensorContext) -> Array:
        if not self.frozen_at(ctx):
            return ops.cast(buffer, ctx.dtype) if ops.dtype(buffer) != ctx.dtype else buffer
        return expand_signs(ops, buffer, ctx.numel, ctx.dtype)

    def payload_nbytes(self, numel: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        """Bytes of a warm-up payload (the dense gradient in ``in_dtype``); the compression
        stage: :meth:`payload_nbytes_after_warmup`."""
        return numel * DTYPE_ITEMSIZE[in_dtype or dtype]

    def payload_nbytes_after_warmup(self, numel: int, dtype: str = "float32") -> int:
        """Bytes of a compression-stage payload: ``4 * ceil(numel / 32) + itemsize(dtype)``."""
        return layout_nbytes(sign_layout(numel, dtype))

    def payload_nbytes_at(self, numel: int, step: int, dtype: str = "float32", in_dtype: str | None = None) -> int:
        """Bytes of the payload at 0-based ``step``."""
        if self.frozen(step):
            return self.payload_nbytes_after_warmup(numel, dtype)
        return self.payload_nbytes(numel, dtype, in_dtype)


@register("communicator", "onebit_adam", paper=PAPER,
          summary="1-bit Adam's exchange: dense allreduce in the warm-up, then an allgather of 1-bit momenta, "
                  "server-side compression with error feedback; returns Adam's update direction.")
class OnebitAdamCommunicator(Communicator):
    """1-bit Adam's exchange and update (see :class:`OnebitAdam`). Warm-up: one
    allreduce of the dense gradients, averaged, then Adam's ``m`` and ``v``. Compression
    stage: one allgather of the workers' 1-bit momenta (equal sizes), their average in
    rank order, and the server-side compression with the server error, computed alike by
    every worker. Returns Adam's update direction; the new state goes to the
    ``onebit_adam`` memory. Serves the ``onebit_adam`` compressor and memory only.

    Args:
        aggregate: ``"mean"`` (default; the only one: Adam averages the workers).
    """

    def __init__(self, aggregate: str = "mean"):
        if aggregate != "mean":
            raise ValueError(f"aggregate must be 'mean' for the onebit_adam communicator, got {aggregate!r}")
        super().__init__(aggregate)

    def exchange(self, ops: Ops, payload: Payload, compressor: Compressor, ctx: TensorContext):
        if not isinstance(compressor, OnebitAdam):
            raise TypeError(f"the onebit_adam communicator serves the onebit_adam compressor, not "
                            f"{type(compressor).__name__}; use communicator='allgather'")
        state = ctx.scratch.get(_SCRATCH)
        if state is None or "v" not in state:
            raise TypeError(f"the onebit_adam communicator needs the onebit_adam memory (tensor {ctx.name!r}), "
                            f"which keeps Adam's m and v; use memory='onebit_adam'")
        m = state["m"] if state["m"] is not None else ops.zeros(ctx.numel, ctx.dtype, payload.buffer)
        v = state["v"] if state["v"] is not None else ops.zeros(ctx.numel, ctx.dtype, payload.buffer)
        if not compressor.frozen_at(ctx):
            (summed,) = yield [Collective("allreduce", payload.buffer)]
            # held: the mean rounds before Adam scales it, inside a graph too
            g = ops.hold(compressor.decompress(ops, summed, ctx) * mean_factor(ctx.world_size))
            m, v = compressor.moments(ops, m, v, g)
            state["v_next"] = v
        else:
            (buffers,) = yield [Collective("allgather", payload.buffer, equal_sizes=True)]
            total = expand_signs(ops, buffers[0], ctx.numel, ctx.dtype)
            for b in buffers[1:]:  # in rank order, inside a graph too (ops.hold)
                total = ops.hold(total + expand_signs(ops, b, ctx.numel, ctx.dtype))
            average = total * mean_factor(ctx.world_size)
            error = state.get("server_error")  # a missing one is zero, added all the same (see compress)
            server_buffer = ops.hold(average + (ops.zeros(ctx.numel, ctx.dtype, average) if error is None else error))
            _, m = compress_signs(ops, server_buffer)
            state["server_error_next"] = server_buffer - m
        state["m_next"] = m
        return compressor.direction(ops, m, v, ctx.step)


@register("memory", "onebit_adam", paper=PAPER,
          summary="1-bit Adam's state: Adam's m and v, the worker error and the server error.")
class OnebitAdamMemory(Memory):
    """1-bit Adam's per-tensor state, saved by ``Grace.state_dict`` (step counts are
    Grace's own):

    * ``"m"``: Adam's momentum, the same on every worker (the averaged one in the
      warm-up, the server-compressed one afterwards);
    * ``"v"``: Adam's variance, updated in the warm-up and frozen afterwards;
    * ``"worker_error"``: this worker's error feedback, ``x - C(x)`` of the momentum it
      sent (compression stage only);
    * ``"server_error"``: the server-side error feedback, ``y - C(y)`` of the averaged
      momentum (compression stage only; the same on every worker).

    The gradient itself passes through :meth:`compensate` unchanged (the compressor
    forms the momentum). A step whose new value of a field holds NaN or Inf keeps that
    field's previous value (zeros where it had none). Serves the ``onebit_adam``
    compressor and communicator only.
    """

    needs_transmitted = False
    #: the fields of its per-tensor state (checked when a checkpoint is loaded)
    state_fields = STATE_FIELDS
    #: every field has one element per tensor element
    tensor_sized_fields = STATE_FIELDS
    #: a field not written yet reads as zeros (the errors in the warm-up): TensorFlow's
    #: graph path keeps every field in a variable from the start
    missing_fields_are_zero = True

    def __init__(self) -> None:
        super().__init__()

    def compensate(self, ops: Ops, x: Array, ctx: TensorContext) -> Array:
        state = _scratch(ctx)
        for key in STATE_FIELDS:
            value = self._field(ops, ctx.name, key, x)
            if value is not None and ops.numel(value) != ctx.numel:
                raise ValueError(f"tensor {ctx.name!r} has {ctx.numel} elements but its {key} has "
                                 f"{ops.numel(value)}: two tensors share one name")
            state[key] = value
        return x

    def update(self, ops: Ops, compensated: Array, transmitted: Array | None, ctx: TensorContext) -> None:
        return None

    def update_from(self, ops: Ops, compensated: Array, payload: Payload, compressor: Compressor,
                    ctx: TensorContext) -> None:
        """Keep the worker error ``x - C(x)`` of the momentum the compressor sent."""
        state = _scratch(ctx)
        buffer = state.pop("worker_buffer", None)
        if buffer is not None:
            state["worker_error_next"] = buffer - compressor.decompress(ops, payload.buffer, ctx)

    def after_exchange(self, ops: Ops, aggregated: Array, ctx: TensorContext) -> None:
        state = ctx.scratch.get(_SCRATCH, {})
        if "m_next" not in state:
            raise TypeError(f"memory 'onebit_adam' serves the onebit_adam compressor and communicator (tensor "
                            f"{ctx.name!r}); use communicator='onebit_adam'")
        fields = self.state.setdefault(ctx.name, {})
        for key in STATE_FIELDS:
            new = state.get(f"{key}_next")
            if new is None:
                continue
            previous = state.get(key)
            if previous is None:
                previous = ops.zeros(ctx.numel, ctx.dtype, new)
            finite = ops.all_finite(new)
            fields[key] = self._pick(ops, finite, self._finite_update(ops, finite, ctx, key), new, previous)
