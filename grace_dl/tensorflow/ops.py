"""TensorFlow implementation of the ops protocol, for ``tf.Tensor`` and ``tf.Variable``.

Every primitive is written with TensorFlow ops on tensors of static or dynamic length, so
that it runs eagerly and also traces inside ``tf.function``. Python values are produced
only where the protocol returns them (``numel``, ``shape``, ``item``); those need a
static shape (always the case eagerly) or an eager tensor.

Where TensorFlow's own op differs from NumPy's reference semantics, this module adds
what is needed for bit-identical results:

* ``tf.cast`` from float64 to float16 rounds twice (through float32); NumPy rounds once.
  :func:`_float64_to_float16` rounds to float32 with round-to-odd first, which makes the
  second rounding exact.
* ``tf.cast`` from float32 to float64 flushes subnormals to zero (so do TF's float
  arithmetic and comparisons); :func:`_float32_to_float64` rebuilds them from their bits.
* ``tf.sort`` puts NaN first; NumPy puts it last.
* ``tf.bitcast`` changes the rank when item sizes differ and does not take bool.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Sequence

import numpy as np
import tensorflow as tf

from ..core import derive_key
from ..ops.base import DTYPE_ITEMSIZE, FLOAT_DTYPES, Ops

_TF_DTYPES: dict[str, tf.DType] = {
    "float16": tf.float16,
    "bfloat16": tf.bfloat16,
    "float32": tf.float32,
    "float64": tf.float64,
    "int32": tf.int32,
    "int64": tf.int64,
    "uint8": tf.uint8,
    "bool": tf.bool,
}
_NAMES: dict[tf.DType, str] = {v: k for k, v in _TF_DTYPES.items()}

_MASK63 = (1 << 63) - 1


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (tf.Tensor, tf.Variable))


def _eager(value: Any) -> bool:
    return hasattr(value, "numpy")  # an EagerTensor (or a variable) has a value now


def _tfd(name: str) -> tf.DType:
    try:
        return _TF_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_TF_DTYPES)}") from None


def _on(like: Any) -> ContextManager:
    """A device scope placing new tensors where ``like`` lives (a no-op when its device
    is unknown, as for most symbolic tensors inside ``tf.function``)."""
    device = getattr(like, "device", "") or ""
    return tf.device(device) if device else contextlib.nullcontext()


def _static_len(x: Any) -> int | None:
    """The element count of ``x`` if it is known without running anything."""
    return tf.TensorShape(x.shape).num_elements()


def _float64_to_float16(x: tf.Tensor) -> tf.Tensor:
    """float64 -> float16 with a single round-to-nearest-even, as NumPy does.

    ``tf.cast`` goes through float32, so a value just above a float16 midpoint can be
    rounded onto the midpoint first and then to even: a different result. Rounding to
    float32 *to odd* (truncate, then set the last bit if anything was dropped) keeps the
    information that the value was not exactly on the midpoint; with 24 >= 11 + 2 bits
    the following float32 -> float16 rounding is then the correctly rounded one.
    """
    f = tf.cast(x, tf.float32)
    bits = tf.bitcast(f, tf.int32)
    # float32 is sign-magnitude: decrementing the bits of a non-zero value moves it one
    # step towards zero (inf -> FLT_MAX), turning round-to-nearest into truncation
    rounded_away = tf.abs(tf.cast(f, tf.float64)) > tf.abs(x)
    bits = tf.where(rounded_away, bits - 1, bits)
    inexact = tf.cast(tf.bitcast(bits, tf.float32), tf.float64) != x
    inexact = tf.logical_and(inexact, tf.logical_not(tf.math.is_nan(x)))
    bits = tf.where(inexact, tf.bitwise.bitwise_or(bits, 1), bits)
    return tf.cast(tf.bitcast(bits, tf.float32), tf.float16)


def _float32_to_float64(x: tf.Tensor) -> tf.Tensor:
    """float32 -> float64, exact for subnormals too: TensorFlow's CPU cast flushes float32
    subnormals to zero. They are rebuilt from their bits as ``m * 2**-149``, a normal
    float64 (integer ops and a normal-range product, which nothing flushes)."""
    out = tf.cast(x, tf.float64)
    bits = tf.bitcast(x, tf.int32)
    mag = tf.bitwise.bitwise_and(bits, tf.constant(0x7FFFFFFF, tf.int32))
    subnormal = tf.logical_and(mag > 0, mag < 0x00800000)
    value = tf.cast(mag, tf.float64) * 2.0**-149
    return tf.where(subnormal, tf.where(bits < 0, -value, value), out)


class TFOps(Ops):
    """Ops over ``tf.Tensor`` (eager or symbolic) and ``tf.Variable``."""

    name = "tensorflow"

    @staticmethod
    def owns(x: Any) -> bool:
        return isinstance(x, (tf.Tensor, tf.Variable))

    # -- identity -------------------------------------------------------------------------
    def dtype(self, x: Any) -> str:
        try:
            return _NAMES[tf.as_dtype(x.dtype).base_dtype]
        except KeyError:
            raise TypeError(f"grace-dl does not handle TensorFlow dtype {x.dtype.name}") from None

    def numel(self, x: Any) -> int:
        n = _static_len(x)
        if n is None:
            raise ValueError(f"the element count of {x!r} is not known statically; grace-dl needs "
                             f"tensors of static shape inside tf.function")
        return int(n)

    def length(self, x: Any) -> Any:
        n = _static_len(x)
        # a data-dependent length inside tf.function: known only when the graph runs
        return int(n) if n is not None else tf.size(x, out_type=tf.int64)

    def shape(self, x: Any) -> tuple[int, ...]:
        dims = tf.TensorShape(x.shape).as_list()
        if dims is None or any(d is None for d in dims):
            raise ValueError(f"the shape of {x!r} is not known statically")
        return tuple(int(d) for d in dims)

    # -- layout and conversion ----------------------------------------------------------
    def reshape(self, x: Any, shape: Sequence[int]) -> tf.Tensor:
        return tf.reshape(x, [int(d) for d in shape])

    def cast(self, x: Any, dtype: str) -> tf.Tensor:
        target = _tfd(dtype)
        if x.dtype == tf.float64 and target == tf.float16:
            return _float64_to_float16(tf.convert_to_tensor(x))
        if x.dtype == tf.float32 and target == tf.float64:
            return _float32_to_float64(tf.convert_to_tensor(x))
        return tf.cast(x, target)

    def bitcast(self, x: Any, dtype: str) -> tf.Tensor:
        src, dst = self.dtype(x), dtype
        x = tf.reshape(x, [-1])
        if src == dst:
            return tf.identity(x)
        # tf.bitcast does not take bool; bool bytes are 0/1, the same as uint8's
        if src == "bool":
            x, src = tf.cast(x, tf.uint8), "uint8"
        out_dtype = "uint8" if dst == "bool" else dst
        s_in, s_out = DTYPE_ITEMSIZE[src], DTYPE_ITEMSIZE[out_dtype]
        n = _static_len(x)
        if n is not None and (n * s_in) % s_out:
            raise ValueError(f"cannot view {n} {src} elements ({n * s_in} bytes) as {dst} "
                             f"({s_out}-byte items)")
        if s_in < s_out:
            # smaller -> larger: TF wants the ratio as a trailing dimension and drops it
            x = tf.reshape(x, [-1, s_out // s_in])
        out = tf.reshape(tf.bitcast(x, _tfd(out_dtype)), [-1])  # larger -> smaller adds one
        return out != 0 if dst == "bool" else out

    def concat(self, xs: Sequence[Any]) -> tf.Tensor:
        return tf.concat([tf.reshape(x, [-1]) for x in xs], axis=0)

    def to_numpy(self, x: Any) -> np.ndarray:
        a = np.array(x.numpy(), copy=True)
        if self.dtype(x) == "bfloat16" and a.dtype.name != "bfloat16":
            import ml_dtypes  # ships with TensorFlow

            a = a.view(ml_dtypes.bfloat16)
        return a

    def from_numpy(self, a: Any, like: Any) -> tf.Tensor:
        with _on(like):
            return tf.constant(np.asarray(a))

    # -- creation -------------------------------------------------------------------------
    def zeros(self, n: Any, dtype: str, like: Any) -> tf.Tensor:
        # a symbolic n (inside tf.function): a length known when the graph runs
        length = tf.reshape(tf.cast(n, tf.int64), [1]) if _is_tensor(n) and not _eager(n) else [int(n)]
        with _on(like):
            return tf.zeros(length, dtype=_tfd(dtype))

    def arange(self, n: int, like: Any) -> tf.Tensor:
        with _on(like):
            return tf.range(int(n), dtype=tf.int64)

    # -- elementwise ------------------------------------------------------------------
    def abs(self, x: Any) -> tf.Tensor:
        return tf.abs(x)

    def sign(self, x: Any) -> tf.Tensor:
        return tf.sign(x)

    def floor(self, x: Any) -> tf.Tensor:
        return tf.floor(x)

    def sqrt(self, x: Any) -> tf.Tensor:
        return tf.sqrt(x)

    def log(self, x: Any) -> tf.Tensor:
        return tf.math.log(x)

    def exp(self, x: Any) -> tf.Tensor:
        return tf.math.exp(x)

    def where(self, cond: Any, a: Any, b: Any) -> tf.Tensor:
        return tf.where(cond, a, b)

    def minimum(self, a: Any, b: Any) -> tf.Tensor:
        return tf.minimum(a, b)

    def isfinite(self, x: Any) -> tf.Tensor:
        if self.dtype(x) in FLOAT_DTYPES:
            return tf.math.is_finite(x)
        return tf.ones_like(x, dtype=tf.bool)  # integers are always finite

    # -- reductions ---------------------------------------------------------------------
    def sum(self, x: Any, axis: int | None = None) -> tf.Tensor:
        # floats sum in their own dtype; integers and bools in int64, as NumPy does
        if self.dtype(x) not in FLOAT_DTYPES:
            x = tf.cast(x, tf.int64)
        return tf.reduce_sum(x, axis=axis)

    def max(self, x: Any, axis: int | None = None) -> tf.Tensor:
        if x.dtype == tf.bool:
            return tf.reduce_any(x, axis=axis)
        return tf.reduce_max(x, axis=axis)

    def item(self, x: Any) -> float:
        return np.asarray(x.numpy()).item()

    # -- selection ----------------------------------------------------------------------
    def kth_largest(self, x: Any, k: Any) -> tf.Tensor:
        """The ``k``-th largest element; ``k`` may be a 0-d int tensor (a count that
        varies at run time inside ``tf.function``, 1 <= k <= len(x))."""
        k = tf.cast(k, tf.int32) if _is_tensor(k) else int(k)
        return tf.math.top_k(x, k=k, sorted=True).values[k - 1]

    def nonzero(self, mask: Any) -> tf.Tensor:
        return tf.where(tf.reshape(mask, [-1]))[:, 0]  # int64, ascending

    def gather(self, x: Any, idx: Any) -> tf.Tensor:
        return tf.gather(x, idx)

    def scatter(self, n: int, idx: Any, values: Any) -> tf.Tensor:
        idx = tf.reshape(tf.cast(idx, tf.int64), [-1, 1])
        # an update, not scatter_nd's sum into zeros (0 + -0.0 = +0.0): -0.0 stays -0.0, as in NumPy
        with _on(values):
            zeros = tf.zeros([int(n)], dtype=values.dtype)
        return tf.tensor_scatter_nd_update(zeros, idx, values)

    def topk_indices(self, x: Any, k: int) -> tf.Tensor:
        """Ascending indices of the ``k`` largest elements; ties go to the lower index.

        ``tf.math.top_k`` orders equal values by ascending index, so its first ``k`` are
        exactly the protocol's set, without the data-dependent lengths of the generic
        version (which therefore would not trace in ``tf.function``). ``k`` may be a 0-d
        int tensor (a count that varies at run time inside ``tf.function``, 1 <= k <=
        len(x)). NaN ranks as +inf, as the protocol says: ``top_k`` alone does not rank
        it as the largest.
        """
        if tf.as_dtype(x.dtype).is_floating:
            x = tf.where(tf.math.is_nan(x), tf.constant(np.inf, x.dtype), x)
        if _is_tensor(k):  # a count that varies at run time (1 <= k <= len(x))
            return tf.sort(tf.math.top_k(x, k=tf.cast(k, tf.int32), sorted=True, index_type=tf.int64).indices)
        k = int(k)
        if k <= 0:
            return self.zeros(0, "int64", x)
        n = _static_len(x)
        if n is not None and k >= n:
            return self.arange(int(n), x)
        # a length known only at run time (inside tf.function) must then be at least k
        picked = tf.math.top_k(x, k=k, sorted=True, index_type=tf.int64).indices
        return tf.sort(picked)

    def sort(self, x: Any) -> tf.Tensor:
        dtype = self.dtype(x)
        if dtype == "bool":
            return tf.cast(tf.sort(tf.cast(x, tf.uint8)), tf.bool)
        if dtype not in FLOAT_DTYPES:
            return tf.sort(x)
        # NumPy sorts NaN last, tf.sort first: sort NaN as +inf, then put NaN in the tail
        nan = tf.math.is_nan(x)
        ordered = tf.sort(tf.where(nan, tf.constant(np.inf, x.dtype), x))
        n = tf.size(x, out_type=tf.int64)
        tail = tf.range(n, dtype=tf.int64) >= n - tf.reduce_sum(tf.cast(nan, tf.int64))
        return tf.where(tail, tf.constant(np.nan, x.dtype), ordered)

    # -- linear algebra -------------------------------------------------------------------
    def matmul(self, a: Any, b: Any) -> tf.Tensor:
        return tf.linalg.matmul(a, b)

    def orthonormalize_rows(self, rows: Any, epsilon: float) -> tf.Tensor:
        # the protocol's modified Gram-Schmidt with its arithmetic (the same bits), in
        # fewer graph ops: one unstack and one stack instead of a slice, a reshape and a
        # concat per row, and a zero norm's divisor 1 as a constant (the protocol's
        # ``norm * 0 + 1``: the same 1, and a NaN norm's NaN row either way)
        r = rows.shape[0]
        if r is None:
            return super().orthonormalize_rows(rows, epsilon)
        out = tf.unstack(rows)
        one = tf.constant(1, rows.dtype)
        for i in range(r):
            norm = self.norm(out[i])
            if i + 1 < r:
                direction = out[i] / tf.where(norm > 0, norm, one)
                for j in range(i + 1, r):
                    out[j] = out[j] - self.sum(direction * out[j]) * direction
            out[i] = out[i] / (norm + epsilon)
        return tf.stack(out)

    def transpose(self, x: Any) -> tf.Tensor:
        # Grappler folds a Transpose feeding a MatMul into the MatMul's transpose flag,
        # another kernel path with other last bits than eagerly: a Snapshot between
        # them keeps the traced pipeline bit-identical to the eager one
        return tf.raw_ops.Snapshot(input=tf.transpose(x))

    # -- bits ---------------------------------------------------------------------------
    @staticmethod
    def _int_operand(b: Any, a: Any) -> Any:
        return tf.constant(b, dtype=a.dtype) if isinstance(b, int) else b

    def bitwise_and(self, a: Any, b: Any) -> tf.Tensor:
        return tf.bitwise.bitwise_and(a, self._int_operand(b, a))

    def bitwise_or(self, a: Any, b: Any) -> tf.Tensor:
        return tf.bitwise.bitwise_or(a, self._int_operand(b, a))

    def shift_left(self, a: Any, b: Any) -> tf.Tensor:
        return tf.bitwise.left_shift(a, self._int_operand(b, a))

    def shift_right(self, a: Any, b: Any) -> tf.Tensor:
        return tf.bitwise.right_shift(a, self._int_operand(b, a))

    def pack_bits(self, mask: Any) -> tf.Tensor:
        bits = tf.cast(tf.reshape(mask, [-1]), tf.uint8)
        pad = tf.math.floormod(-tf.size(bits), 32)
        bits = tf.pad(bits, [[0, pad]])
        # eight bits -> one byte (weights sum to at most 255, so uint8 is exact), then
        # four bytes -> one int32 word in native (little-endian) order, as NumPy's '<i4'
        weights = tf.constant([1, 2, 4, 8, 16, 32, 64, 128], dtype=tf.uint8)
        packed = tf.reduce_sum(tf.reshape(bits, [-1, 8]) * weights, axis=1)
        return tf.bitcast(tf.reshape(packed, [-1, 4]), tf.int32)

    def unpack_bits(self, words: Any, n: int) -> tf.Tensor:
        raw = tf.reshape(tf.bitcast(tf.reshape(words, [-1]), tf.uint8), [-1, 1])
        shifts = tf.constant([0, 1, 2, 3, 4, 5, 6, 7], dtype=tf.uint8)
        bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(raw, shifts), 1)
        return tf.cast(tf.reshape(bits, [-1])[: int(n)], tf.bool)

    def uint_to_bits(self, v: Any, bits: int) -> tf.Tensor:
        shifts = tf.range(int(bits), dtype=tf.int64)
        v = tf.reshape(tf.cast(v, tf.int64), [-1, 1])
        return tf.cast(tf.reshape(tf.bitwise.bitwise_and(tf.bitwise.right_shift(v, shifts), 1), [-1]), tf.bool)

    def bits_to_uint(self, b: Any, bits: int) -> tf.Tensor:
        weights = tf.bitwise.left_shift(tf.ones([int(bits)], tf.int64), tf.range(int(bits), dtype=tf.int64))
        return tf.reduce_sum(tf.cast(tf.reshape(b, [-1, int(bits)]), tf.int64) * weights, axis=1)

    def pack_uint(self, v: Any, bits: int) -> tf.Tensor:
        """Widths that divide 16 pack without a bit stream: each value is cast to a
        byte (or a 16-bit half word), the values sharing a byte are or-ed together
        (disjoint fields, so a sum), and the bytes are viewed as little-endian int32
        words: the same words as the protocol's stream in a handful of ops."""
        bits = int(bits)
        if bits == 16:
            u = tf.cast(tf.reshape(v, [-1]), tf.uint16)
            u = tf.pad(u, [[0, tf.math.floormod(-tf.size(u), 2)]])
            return tf.bitcast(tf.reshape(u, [-1, 2]), tf.int32)
        if bits not in (1, 2, 4, 8):
            return super().pack_uint(v, bits)
        per = 8 // bits
        u = tf.cast(tf.reshape(v, [-1]), tf.uint8)
        u = tf.pad(u, [[0, tf.math.floormod(-tf.size(u), 4 * per)]])
        if per > 1:
            shifts = tf.constant([j * bits for j in range(per)], tf.uint8)
            u = tf.reduce_sum(tf.bitwise.left_shift(tf.reshape(u, [-1, per]), shifts), axis=1)
        return tf.bitcast(tf.reshape(u, [-1, 4]), tf.int32)

    def _fields(self, words: Any, n: int, bits: int) -> tf.Tensor:
        """The first ``n`` ``bits``-wide fields of ``words`` (a width dividing 8), as
        uint8: the inverse of :meth:`pack_uint`'s byte path."""
        raw = tf.reshape(tf.bitcast(tf.reshape(words, [-1]), tf.uint8), [-1])
        per = 8 // bits
        if per > 1:
            shifts = tf.constant([j * bits for j in range(per)], tf.uint8)
            fields = tf.bitwise.bitwise_and(tf.bitwise.right_shift(tf.reshape(raw, [-1, 1]), shifts),
                                            tf.constant((1 << bits) - 1, tf.uint8))
            raw = tf.reshape(fields, [-1])
        return raw[: int(n)]

    def unpack_uint(self, words: Any, n: int, bits: int) -> tf.Tensor:
        bits = int(bits)
        if bits == 16:
            halves = tf.reshape(tf.bitcast(tf.reshape(words, [-1]), tf.uint16), [-1])
            return tf.cast(halves[: int(n)], tf.int64)
        if bits not in (1, 2, 4, 8):
            return super().unpack_uint(words, n, bits)
        return tf.cast(self._fields(words, n, bits), tf.int64)

    def take_fields(self, words: Any, n: int, bits: int, values: Any) -> tf.Tensor:
        # a gather straight from the byte fields: no int64 codes in between
        if int(bits) not in (1, 2, 4, 8):
            return super().take_fields(words, n, bits, values)
        return tf.gather(values, tf.cast(self._fields(words, n, int(bits)), tf.int32))

    # -- randomness ---------------------------------------------------------------------
    @staticmethod
    def _seed(key: int, counter: Any) -> tf.Tensor:
        """A stateless-op seed from ``(key, counter)``: a hash of the key, then the
        counter itself. The counter may be an int64 tensor (the step counter inside
        ``tf.function``), which gives the same seed as the int of its value, so a traced
        pipeline draws what the eager one draws; ints are taken modulo 2**63."""
        hi = derive_key("tensorflow", int(key)) & _MASK63
        if isinstance(counter, (tf.Tensor, tf.Variable)):
            return tf.stack([tf.constant(hi, tf.int64), tf.cast(counter, tf.int64)])
        return tf.constant([hi, int(counter) & _MASK63], dtype=tf.int64)

    def random_uniform(self, n: int, key: int, counter: int, like: Any) -> tf.Tensor:
        with _on(like):
            return tf.random.stateless_uniform([int(n)], seed=self._seed(key, counter), dtype=tf.float32)

    def hold(self, x: Any) -> tf.Tensor:
        # a Snapshot: Grappler neither folds constants across it nor removes it (an
        # Identity would be removed first); eagerly nothing is folded, x is returned
        if tf.executing_eagerly():
            return x
        return tf.raw_ops.Snapshot(input=x)

    def reference_uniform(self, n: int, key: int, counter: Any, like: Any) -> tf.Tensor:
        """NumPy's draws (:meth:`Ops.reference_uniform`); a ``counter`` that is a tensor
        (the step counter inside ``tf.function``) computes NumPy's Philox-4x64 stream in
        the graph (:func:`philox4x64_uniform`), an int draws on the host as eagerly."""
        if isinstance(counter, (tf.Tensor, tf.Variable)):
            with _on(like):
                return philox4x64_uniform(int(n), int(key), counter)
        return super().reference_uniform(n, key, counter, like)

    def random_choice(self, n: int, k: int, key: int, counter: int, like: Any) -> tf.Tensor:
        # the k largest of n i.i.d. uniform keys form a uniform random k-subset
        with _on(like):
            u = tf.random.stateless_uniform([int(n)], seed=self._seed(key, counter), dtype=tf.float32)
            picked = tf.math.top_k(u, k=int(k), sorted=False, index_type=tf.int64).indices
            return tf.sort(picked)

    # -- selection kernels
    def count_true(self, mask: Any) -> int:
        return int(tf.math.count_nonzero(mask))

    def all_finite(self, x: Any) -> tf.Tensor:
        return tf.reduce_all(tf.math.is_finite(x))

    def read_flag(self, cond: Any) -> bool | None:
        # a symbolic tensor (inside tf.function) has no value; a GPU one would sync
        if not tf.executing_eagerly() or not hasattr(cond, "numpy") or "GPU" in (cond.device or "").upper():
            return None
        return bool(cond.numpy())

    def index_update(self, x: Any, idx: Any, values: Any, consume: bool = False) -> tf.Tensor:
        return tf.tensor_scatter_nd_update(x, tf.reshape(idx, [-1, 1]), values)

    def scatter_sparse_sum(self, n: int, buffers: list[Any], dtype: str, scale: float = 1.0) -> tf.Tensor:
        # one scatter-add per buffer, in order (indices distinct within one, so each
        # element gets total + value, as the protocol's gather, add and update would)
        words_per_pair = 1 + DTYPE_ITEMSIZE[dtype] // 4
        total = self.zeros(n, dtype, buffers[0])
        for buffer in buffers:
            k = self.length(buffer) // words_per_pair
            total = tf.tensor_scatter_nd_add(total, tf.reshape(buffer[:k], [-1, 1]), self.bitcast(buffer[k:], dtype))
        return total if scale == 1.0 else total * scale

    #: TF's CPU GatherV2 takes ~6 ns an element: QSGD's 8-bit codes decode faster by a
    #: cast and a subtraction (the same values) than through a 256-entry table (the
    #: keras CNN's step: 1.2 ms of gathers)
    TABLE_DECODE_MAX_BITS = 0

    def topk_magnitude_indices(self, x: Any, k: int) -> tf.Tensor:
        # the base's sampled selection with its host decisions made in the graph (a
        # tf.cond): a top_k over a strided sample sets a threshold, and the exact top k
        # is taken among the elements reaching it when there are at least k of them, x
        # is finite and the threshold positive, else over the whole tensor. The same
        # set either way; TopKV2 over the whole tensor was most of topk's cost (93k
        # elements: 848 -> 372 us, 1e6: 9.5 -> 3.3 ms)
        n = _static_len(x)
        plan = None if _is_tensor(k) or n is None else self.topk_sample_plan(n, int(k))
        magnitudes = tf.abs(x)
        if plan is None:
            return self.topk_indices(magnitudes, k)  # NaN ranks as +inf there
        (stride, j), k = plan, int(k)
        threshold = tf.math.top_k(magnitudes[::stride], k=j, sorted=True).values[j - 1]
        candidates = tf.where(magnitudes >= threshold)[:, 0]  # ascending int64
        usable = tf.logical_and(tf.logical_and(tf.size(candidates) >= k, threshold > 0),
                                tf.reduce_all(tf.math.is_finite(x)))

        def among_candidates() -> tf.Tensor:
            chosen = tf.math.top_k(tf.gather(magnitudes, candidates), k=k, sorted=True).indices
            return tf.sort(tf.gather(candidates, chosen))

        return tf.cond(usable, among_candidates, lambda: self.topk_indices(magnitudes, k))


# NumPy's Philox-4x64-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"):
# the round multipliers and the Weyl constants that bump the key between rounds
_PHILOX_M = (0xD2E7470EE14C6C93, 0xCA5A826395121157)
_PHILOX_W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)
_LOW32 = 0xFFFFFFFF


def _mulhilo64(a: int, b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The high and low 64-bit words of the 128-bit product ``a * b`` (uint64), from
    32-bit halves: TensorFlow has no 64x64 -> 128-bit multiply."""
    u64 = tf.uint64
    a0, a1 = tf.constant(a & _LOW32, u64), tf.constant(a >> 32, u64)
    low32, shift = tf.constant(_LOW32, u64), tf.constant(32, u64)
    b0, b1 = tf.bitwise.bitwise_and(b, low32), tf.bitwise.right_shift(b, shift)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    # the middle column: the carry out of the low word (each term < 2**32, their sum < 2**34)
    middle = (tf.bitwise.right_shift(p00, shift) + tf.bitwise.bitwise_and(p01, low32)
              + tf.bitwise.bitwise_and(p10, low32))
    high = p11 + tf.bitwise.right_shift(p01, shift) + tf.bitwise.right_shift(p10, shift) + tf.bitwise.right_shift(
        middle, shift)
    return high, tf.constant(a, u64) * b  # the low word: uint64 products wrap


def philox4x64_uniform(n: int, key: int, counter: tf.Tensor) -> tf.Tensor:
    """``n`` float32 draws of ``Generator(Philox(key=key, counter=counter)).random(n,
    dtype=float32)`` (the NumPy backend's ``random_uniform``), bit for bit, computed with
    TensorFlow ops, so that ``counter`` may be a tensor inside ``tf.function``.

    NumPy's Philox increments its 256-bit counter before each block of four 64-bit
    words (block ``i`` uses ``counter + 1 + i``, which stays below ``2**64`` for an int64
    counter); each word gives two draws, its low 32 bits first, and a draw ``w`` is
    ``(w >> 8) * 2**-24``. ``key`` is an int below ``2**128``."""
    if not 0 <= key < 1 << 128:
        raise ValueError(f"a Philox key must lie in [0, 2**128), got {key}")
    u64 = tf.uint64
    words = -(-n // 2)
    blocks = -(-words // 4)
    base = tf.cast(tf.cast(counter, tf.int64), u64)  # the counter's low word (a non-negative step)
    zero = tf.zeros([blocks], u64)
    c0 = base + tf.cast(tf.range(1, blocks + 1, dtype=tf.int64), u64)
    c1, c2, c3 = zero, zero, zero
    k0, k1 = key & (1 << 64) - 1, key >> 64
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + _PHILOX_W[0]) & (1 << 64) - 1, (k1 + _PHILOX_W[1]) & (1 << 64) - 1
        hi0, lo0 = _mulhilo64(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo64(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = (tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(hi1, c1), tf.constant(k0, u64)), lo1,
                          tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(hi0, c3), tf.constant(k1, u64)), lo0)
    stream = tf.reshape(tf.stack([c0, c1, c2, c3], axis=1), [-1])[:words]
    # each word: (low 32 bits) >> 8, then the high 32 bits >> 8, both below 2**24
    low = tf.bitwise.right_shift(tf.bitwise.bitwise_and(stream, tf.constant(_LOW32, u64)), tf.constant(8, u64))
    high = tf.bitwise.right_shift(stream, tf.constant(40, u64))
    draws = tf.reshape(tf.stack([low, high], axis=1), [-1])[:n]
    return tf.cast(draws, tf.float32) * tf.constant(2.0 ** -24, tf.float32)  # exact: below 2**24 times a power of 2
