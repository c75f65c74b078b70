"""What travels on the wire for one tensor, and how several arrays share one buffer.

A :class:`Payload` is one flat array that one collective moves. Methods that send
several arrays (indices and values, signs and a scale) pack them into 32-bit words with
:func:`pack_words` so that a single allgather carries them, in a dtype that every
transport supports (Horovod's torch ops move int32/int64/float16/float32/float64 but not
int8/uint8). Bit-level data (signs, quantization levels) is packed with
:meth:`Ops.pack_bits` before it joins the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .ops import DTYPE_ITEMSIZE, Array, Ops

WORD_BYTES = 4


@dataclass
class Payload:
    """One tensor's compressed form.

    Attributes:
        buffer: the flat array moved by one collective.
        nbytes: its exact size in bytes (``len(buffer) * itemsize``).
    """

    buffer: Array
    nbytes: int

    @classmethod
    def of(cls, ops: Ops, buffer: Array) -> "Payload":
        """A payload around ``buffer``, sized from its dtype and length (inside
        ``tf.function``, a data-dependent length makes ``nbytes`` a 0-d tensor)."""
        return cls(buffer, ops.length(buffer) * DTYPE_ITEMSIZE[ops.dtype(buffer)])


def words_for(dtype: str, count: int) -> int:
    """Number of 32-bit words that ``count`` elements of ``dtype`` occupy once packed
    (bool elements take one bit each)."""
    if dtype == "bool":
        return -(-count // 32)
    return -(-count * DTYPE_ITEMSIZE[dtype] // WORD_BYTES)


def layout_nbytes(layout: Sequence[tuple[str, int]]) -> int:
    """Bytes on the wire of a packed buffer with this ``[(dtype, count), ...]`` layout."""
    return WORD_BYTES * sum(words_for(d, c) for d, c in layout)


def to_words(ops: Ops, x: Array) -> Array:
    """A 1-D array of any supported dtype as int32 words (bools one bit each; 2-byte
    dtypes padded with one zero element when the count is odd)."""
    dtype = ops.dtype(x)
    if dtype == "bool":
        return ops.pack_bits(x)
    size = DTYPE_ITEMSIZE[dtype]
    if size == 2 and ops.numel(x) % 2:
        x = ops.concat([x, ops.zeros(1, dtype, x)])
    if size not in (2, 4, 8):
        raise TypeError(f"cannot pack dtype {dtype} into 32-bit words")
    return ops.bitcast(x, "int32")


def from_words(ops: Ops, words: Array, dtype: str, count: int) -> Array:
    """Inverse of :func:`to_words` for ``count`` elements of ``dtype``."""
    if dtype == "bool":
        return ops.unpack_bits(words, count)
    out = ops.bitcast(words, dtype)
    if ops.numel(out) != count:
        out = out[:count]
    return out


def pack_words(ops: Ops, parts: Sequence[Array]) -> Array:
    """Concatenate 1-D arrays of mixed dtypes into one int32 buffer."""
    return ops.concat([to_words(ops, p) for p in parts])


def unpack_words(ops: Ops, buffer: Array, layout: Sequence[tuple[str, int]]) -> list[Any]:
    """Split an int32 buffer made by :func:`pack_words` back into arrays, given the
    ``[(dtype, count), ...]`` layout the parts were packed with."""
    out, offset = [], 0
    for dtype, count in layout:
        n = words_for(dtype, count)
        out.append(from_words(ops, buffer[offset:offset + n], dtype, count))
        offset += n
    if offset != ops.numel(buffer):
        raise ValueError(f"payload has {ops.numel(buffer)} words, layout {list(layout)} expects {offset}")
    return out
