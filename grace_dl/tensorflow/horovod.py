"""grace-dl collectives over stock ``horovod.tensorflow``.

Horovod's TensorFlow ops have no asynchronous form: eagerly, each call returns once the
collective is done (inside ``tf.function`` the graph's executor overlaps them). The
``*_async`` methods therefore run the collective at once and the handle holds the
result. The consequence is that, eagerly, every worker must issue its collectives in the
same order (which :class:`~grace_dl.core.Grace` does when the workers run the same code),
since a worker blocked on one name cannot post the next.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import tensorflow as tf

from ..checks import adaptive_optimizer_message, check_optimizer_momentum
from ..core import Grace, derive_key
from ..transport.base import Transport, horovod_membership
from .checks import check_same_gradients, check_traced_gradients, gradient_sets


def _op_name(name: str) -> str:
    """A Horovod/TF-safe collective name for ``name``.

    Horovod replaces every character outside ``[A-Za-z0-9_]`` by ``_``, so distinct
    names (``a.b`` and ``a_b``) could collide; a short hash of the original keeps them
    apart, identically on every worker.
    """
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return f"{safe}_{derive_key(name) & 0xFFFFFFFF:08x}"


class HorovodTFTransport(Transport):
    """grace-dl collectives over ``horovod.tensorflow`` (initialised by the caller).

    Args:
        process_set: a Horovod process set to run the collectives in (default: all
            processes).
    """

    def __init__(self, process_set: Any = None):
        import horovod.tensorflow as hvd  # only when used: importing horovod is slow

        self.hvd = hvd
        self._ps, self.rank, self.size = horovod_membership(hvd, process_set)

    def allreduce_async(self, buf: Any, name: str) -> Any:
        """Sum ``buf`` over all workers; the handle is the result."""
        return ("done", self.hvd.allreduce(buf, op=self.hvd.Sum, name=_op_name(name), **self._ps))

    def allgather_async(self, buf: Any, name: str, equal_sizes: bool = False) -> Any:
        """Gather every worker's 1-D ``buf``; :meth:`wait` gives them in rank order."""
        flat = tf.reshape(buf, [-1])
        data = self.hvd.allgather(flat, name=_op_name(name), **self._ps)
        if equal_sizes:
            return ("split", data, None)
        # lengths may differ: exchange them, so that the concatenation can be cut apart
        count = tf.reshape(tf.size(flat, out_type=tf.int64), [1])
        if not tf.executing_eagerly():
            # make the count depend on the data: TF's shape inference runs a collective whose
            # inputs are constants while the graph is built, which blocks a rank that traces
            # alone (a retrace) until the others post it
            count += tf.cast(tf.logical_and(tf.reduce_any(tf.not_equal(flat[:1], flat[:1])), False), tf.int64)
        sizes = self.hvd.allgather(count, name=_op_name(name + ".sizes"), **self._ps)
        return ("split", data, sizes)

    def broadcast_async(self, buf: Any, root: int, name: str) -> Any:
        """Send root's ``buf`` to every worker; the handle is the result."""
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} outside 0..{self.size - 1}")
        return ("done", self.hvd.broadcast(buf, root_rank=root, name=_op_name(name), **self._ps))

    def wait(self, handle: Any) -> Any:
        """The result of a collective started by one of the ``*_async`` methods."""
        kind, result, *rest = handle
        if kind == "done":
            return result
        sizes = rest[0]
        if sizes is None:
            return tf.split(result, self.size, axis=0)
        return tf.split(result, tf.cast(sizes, tf.int64), num=self.size, axis=0)


def _external(tensor: Any) -> Any:
    """The tensor of the enclosing graph that ``tensor`` captures (Horovod compresses
    inside a ``tf.cond`` branch, where its gradient is a captured placeholder)."""
    for _ in range(16):
        captures = getattr(getattr(tensor, "graph", None), "captures", None)
        if not captures:
            return tensor
        for external, internal in captures:
            if internal is tensor:
                tensor = external
                break
        else:
            return tensor
    return tensor


def _variable_names(variables: list[Any]) -> list[str]:
    """Stable, distinct names for Horovod's list of variables (Keras 3 variables have a
    ``path``; duplicates get their position appended)."""
    names = [str(getattr(v, "path", None) or getattr(v, "name", None) or f"grad_{i}") for i, v in enumerate(variables)]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n}#{i}" if seen[n] > 1 else n for i, n in enumerate(names)]


def _allreduce_grads_locals(depth: int) -> tuple[list[Any], Any] | None:
    """``(grads, vars)`` of Horovod's ``allreduce_grads(grads, vars)`` (Horovod 0.28), which
    both ``DistributedGradientTape`` and the Keras ``DistributedOptimizer`` use, found on the
    stack above the caller's caller (``depth`` frames up); None when it is not there."""
    frame = sys._getframe(depth + 1)
    for _ in range(120):
        if frame is None:
            break
        # autograph renames Horovod's function to tf__allreduce_grads
        if frame.f_code.co_name.endswith("allreduce_grads"):
            return list(frame.f_locals.get("grads") or ()), frame.f_locals.get("vars")
        frame = frame.f_back
    return None


def _gradient_name(tensor: Any) -> str:
    """The name of the variable whose gradient Horovod is compressing, read from the
    frame of Horovod's ``allreduce_grads(grads, vars)``."""
    target = _external(tensor)
    found = _allreduce_grads_locals(2)
    if found is not None:
        grads, variables = found
        for i, g in enumerate(grads):
            if g is target or g is tensor:
                if variables is not None and i < len(variables):
                    return _variable_names(list(variables))[i]
                return f"grad_{i}"
    raise RuntimeError(
        "grace-dl compression was called outside Horovod's DistributedGradientTape or Keras "
        "DistributedOptimizer, so the gradient's name is unknown; call method.step(tensor, name) "
        "with a HorovodTFTransport yourself, or pass the method only as compression=..."
    )


_ORDER_TOKEN: list[Any] = []


def _order_token() -> Any:
    """The process-wide resource that orders every grace pipeline of a step.

    One variable for the whole process, created eagerly on first use: a variable per
    method object would be created again whenever a ``tf.function`` that builds its
    method is retraced, which TensorFlow refuses (only the first call of a
    ``tf.function`` may create variables). One token for all methods also keeps the
    pipelines of two methods used in one step in program order.
    """
    if not _ORDER_TOKEN:
        with tf.init_scope():  # created eagerly even while Horovod traces
            _ORDER_TOKEN.append(tf.Variable(0, dtype=tf.int64, trainable=False, name="grace_order"))
    return _ORDER_TOKEN[0]


def _horovod_op(hvd: Any) -> Any:
    """The ``op`` of Horovod's ``allreduce``/``grouped_allreduce`` that is compressing."""
    frame = sys._getframe(2)
    for _ in range(120):
        if frame is None:
            break
        if frame.f_code.co_name.endswith("allreduce") and "op" in frame.f_locals:
            return frame.f_locals["op"]
        frame = frame.f_back
    return hvd.Average


#: Keras optimizers that scale steps by gradient statistics (refused under 1-bit Adam)
_ADAPTIVE_KERAS = ("Adam", "AdamW", "Adamax", "Nadam", "Adagrad", "Adadelta", "RMSprop", "Adafactor", "Lion", "Ftrl")


def _keras_optimizer_momentum() -> tuple[str, float] | None:
    """(class name, momentum) of the Keras optimizer whose Horovod ``_allreduce`` is
    compressing (Horovod's Keras ``DistributedOptimizer``), or None under
    ``DistributedGradientTape`` (no optimizer)."""
    frame = sys._getframe(2)
    for _ in range(120):
        if frame is None:
            return None
        opt = frame.f_locals.get("self") if frame.f_code.co_name == "_allreduce" else None
        if opt is not None and hasattr(opt, "_allreduce_grads"):
            value = getattr(opt, "momentum", None)
            if value is None and hasattr(opt, "_get_hyper"):  # Keras 2 legacy optimizers
                try:
                    value = opt._get_hyper("momentum")
                except (KeyError, AttributeError, ValueError):
                    value = None
            if isinstance(value, tf.Variable):
                with tf.init_scope():
                    value = value.numpy()
            return type(opt).__name__, float(value or 0.0)
        frame = frame.f_back
    return None


class HorovodTFGrace(Grace):
    """A :class:`~grace_dl.core.Grace` that is also a Horovod TF ``Compressor``:
    ``hvd.DistributedGradientTape(tape, compression=grace.topk(ratio=0.01))`` and
    ``hvd.DistributedOptimizer(opt, compression=...)`` (Horovod's Keras wrapper) work
    with stock Horovod.

    Horovod calls :meth:`compress` on each gradient, allreduces what it returns and
    calls :meth:`decompress`. Horovod traces this inside a ``tf.function`` (even when
    called eagerly). Two paths (:attr:`graph_path` says which this method takes):

    * the graph path (every registered method, with any schedule:
      :mod:`grace_dl.tensorflow.graph`): the pipeline is traced into the graph with the
      TF ops backend, its collectives are Horovod graph ops and its state lives in
      ``tf.Variable`` objects;
    * the ``tf.py_function`` path (what :func:`~grace_dl.tensorflow.graph.graph_path_blocker`
      names: a compressor or memory from outside
      the registry, 1-bit Adam with a beta too close to 1 to tabulate its bias
      correction): each gradient's pipeline runs eagerly at every step, with its state
      kept as eager tensors. The pipelines of one step are ordered by a shared
      resource (automatic control dependencies chain them in program order), so every
      worker issues its collectives in the same order, which Horovod's blocking eager
      collectives need.

    With ``policies.fusion_bytes > 0``, small gradients share buckets on the graph path
    (:mod:`grace_dl.tensorflow.fusion`, the plan of :mod:`grace_dl.fusion`).

    Horovod itself allreduces an empty tensor. Save the state with
    ``tf.train.Checkpoint(..., grace=method.checkpointable())``.
    """

    @property
    def graph_path(self) -> bool:
        """Whether Horovod's traced ``compress`` runs this method's pipeline in the graph
        (True) or in a ``tf.py_function`` (False; see :func:`graph_path_blocker`)."""
        from .graph import graph_path_blocker

        return graph_path_blocker(self) is None

    @property
    def stats(self) -> Any:
        """Byte counts (:class:`~grace_dl.core.TrafficStats`) of both paths: totals, per
        tensor and per step. The graph path keeps the per-step counts of the last
        ``grace_dl.tensorflow.graph.STEP_HISTORY`` (1024) steps of each tensor until this is
        read; read it at least that often to keep every step."""
        from .graph import graph_stats

        return graph_stats(self, self.__dict__["stats"])

    @stats.setter
    def stats(self, value: Any) -> None:
        self.__dict__["stats"] = value

    def graph_step(self, tensor: Any, name: str) -> Any:
        """The aggregated ``tensor`` (mean over workers), with the pipeline traced into
        the ``tf.function`` being built (the graph path; see :mod:`grace_dl.tensorflow.graph`)."""
        from .graph import trace_step

        return trace_step(self, tensor, name)

    def fresh_copy(self) -> "Grace":
        """An unbound copy with the same configuration and empty state (no variables)."""
        clone = super().fresh_copy()
        clone.__dict__.pop("_graph_slots", None)
        clone.__dict__.pop("_graph_per_step", None)
        return clone

    def state_dict(self) -> dict[str, Any]:
        """Memory state and step counters (those of the graph path's variables included)."""
        from .graph import after_pull, pull

        pull(self)
        try:
            return super().state_dict()
        finally:
            after_pull(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (into the graph path's variables too)."""
        from .graph import push

        super().load_state_dict(state)
        push(self)

    @tf.autograph.experimental.do_not_convert
    def compress(self, tensor: Any) -> tuple[Any, Any]:
        """Run the pipeline of ``tensor`` (Horovod's Compressor protocol); the returned
        empty tensor is what Horovod allreduces."""
        import horovod.tensorflow as hvd

        if self.policies.fusion_bytes:  # fusion: grace_dl/tensorflow/fusion.py (graph path only)
            from .fusion import check_fusion_path

            check_fusion_path(self)
        name = _gradient_name(tensor)
        op = _horovod_op(hvd)
        if op not in (hvd.Average, hvd.Sum):
            raise ValueError("grace-dl compression supports op=hvd.Average and op=hvd.Sum, not Adasum")
        if self.transport is None:
            self.bind(HorovodTFTransport())
        if not getattr(self, "_momentum_checked", False):
            # DGC and Signum keep their own momentum: refuse an optimizer's on top of it
            found = _keras_optimizer_momentum()
            if found is not None:
                check_optimizer_momentum(self, found[1], f"the optimizer ({found[0]})")
                if found[0] in _ADAPTIVE_KERAS:
                    message = adaptive_optimizer_message(self, f"the optimizer ({found[0]})")
                    if message is not None:
                        raise ValueError(message)
            self._momentum_checked = True
        scale = self.transport.size if op == hvd.Sum else 1

        def run(t, *_ticket):
            out = self.step(t, name)
            return out * scale if scale != 1 else out

        sets = gradient_sets(self, tensor)  # the same variables on every rank; one model per method
        empty = tf.zeros([0], tensor.dtype)
        if tf.executing_eagerly():
            if sets is not None:
                check_same_gradients(self, *sets)
            return empty, run(tensor)
        if self.graph_path:
            if sets is not None:
                # which gradients are None is fixed when the step is traced: check then, eagerly
                # (a rank that retraces alone with new gradients, one turned None at a later
                # step, waits for the others a bounded time and raises: docs/reliability.md)
                with tf.init_scope():
                    check_traced_gradients(self, *sets)
            if self.policies.fusion_bytes:
                from .fusion import fused_compress

                out = fused_compress(self, tensor, name)
            else:
                out = self.graph_step(tensor, name)
            return empty, out * scale if scale != 1 else out

        def checked_run(*args):
            if sets is not None:
                check_same_gradients(self, *sets)
            return run(*args)

        ticket = _order_token().assign_add(1)
        out = tf.py_function(checked_run, [tensor, ticket], Tout=tensor.dtype, name="grace_pipeline")
        out.set_shape(tensor.shape)
        return empty, out

    @tf.autograph.experimental.do_not_convert
    def decompress(self, tensor: Any, ctx: Any) -> Any:
        """The aggregated gradient (Horovod's Compressor protocol): the mean over workers,
        or the sum under ``op=hvd.Sum``."""
        return ctx

    def checkpointable(self) -> Any:
        """A ``tf.train.Checkpoint`` dependency holding this method's state (residuals,
        momenta, step counters): ``tf.train.Checkpoint(model=..., grace=m.checkpointable())``."""
        return _GraceState(self)


class _GraceState(tf.train.experimental.PythonState):
    """The state of a Grace as one serialized string inside a TF checkpoint."""

    def __init__(self, grace: Grace):
        self._grace = grace

    def serialize(self) -> bytes:
        import io
        import json

        import numpy as np

        state = self._grace.state_dict()
        index, arrays = [], {}
        for name, fields in state["memory"].items():
            for key, value in fields.items():
                index.append([name, key])
                arrays[f"a{len(index) - 1}"] = value
        header = json.dumps({"steps": state["steps"], "index": index}).encode()
        buf = io.BytesIO()
        np.savez(buf, header=np.frombuffer(header, dtype=np.uint8), **arrays)
        return buf.getvalue()

    def deserialize(self, data: bytes) -> None:
        import io
        import json

        import numpy as np

        with np.load(io.BytesIO(data)) as f:
            header = json.loads(f["header"].tobytes().decode())
            memory: dict[str, dict[str, np.ndarray]] = {}
            for i, (name, key) in enumerate(header["index"]):
                memory.setdefault(name, {})[key] = f[f"a{i}"]
        self._grace.load_state_dict({"steps": header["steps"], "memory": memory})
