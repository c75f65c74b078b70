"""Compiled loops for the NumPy backend's bit-level kernels, when numba is installed.

NumPy's ufuncs make one pass over memory per operation; a kernel that rounds, packs or
unpacks fields at odd widths takes a dozen such passes, or many per-block calls. Here
each such kernel is one loop, compiled by numba (https://numba.pydata.org) on first use
and cached on disk. Every loop computes exactly the integers the NumPy kernel it
replaces computes (they work on the bits of the floats, never with float arithmetic),
and the tests compare the two bit for bit.

numba is optional: :func:`kernels` returns None without it, or when the environment
variable ``GRACE_DL_JIT`` is ``0``, and the NumPy backend then runs its vectorised
kernels. The module is imported only when a kernel is first needed, so importing
grace_dl never imports numba.
"""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace
from typing import Optional

_LOCK = threading.Lock()
_LOADED: dict[str, Optional[SimpleNamespace]] = {}


def enabled_by_environment() -> bool:
    """False when ``GRACE_DL_JIT`` is set to ``0`` (the NumPy kernels are then used)."""
    return os.environ.get("GRACE_DL_JIT", "1").strip() != "0"


def kernels() -> Optional[SimpleNamespace]:
    """The compiled kernels, or None where numba is missing or ``GRACE_DL_JIT=0``.
    Loaded once per process (importing numba takes ~0.5 s; each kernel compiles on its
    first call, ~0.2-1 s, or loads from numba's on-disk cache)."""
    if "kernels" in _LOADED:
        return _LOADED["kernels"]
    with _LOCK:
        if "kernels" not in _LOADED:
            _LOADED["kernels"] = _build() if enabled_by_environment() else None
    return _LOADED["kernels"]


def describe() -> str:
    """One line: whether the compiled kernels are used, and numba's version."""
    if kernels() is None:
        why = "GRACE_DL_JIT=0" if not enabled_by_environment() else "numba is not installed"
        return f"compiled kernels: off ({why}; the NumPy kernels run)"
    import numba

    return f"compiled kernels: numba {numba.__version__} (GRACE_DL_JIT=0 turns them off)"


def _build() -> Optional[SimpleNamespace]:
    try:
        import numba
    except ImportError:
        return None
    import numpy as np
    from llvmlite import ir
    from numba import types, uint16, uint32, uint64
    from numba.extending import intrinsic

    @intrinsic
    def mulhilo64(typingctx, a, b):  # pragma: no cover - compiled
        """The high and low 64-bit words of the 128-bit product of two uint64 (one
        multiply instruction)."""
        signature = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

        def codegen(context, builder, sig, args):
            wide = ir.IntType(128)
            product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
            low = builder.trunc(product, ir.IntType(64))
            high = builder.trunc(builder.lshr(product, ir.Constant(wide, 64)), ir.IntType(64))
            return context.make_tuple(builder, sig.return_type, [high, low])

        return signature, codegen

    # nogil: the torch adapter compresses on a background thread while backward runs
    jit = numba.njit(nogil=True, cache=True)

    @jit
    def natural_codes_packed(bits, draws, out):  # pragma: no cover - compiled
        """Natural compression's 9-bit codes of the float32 ``bits`` (as int32), with
        the 23-bit ``draws`` (uint32), packed into the bytes ``out`` as pack_uint packs
        them (code ``i`` at bit ``9 i`` of a little-endian stream).

        The codes follow Ops.power_of_two_codes: ``e`` the exponent field, plus one
        where the draw is below the mantissa (and ``e < 254``), the sign as bit 8 where
        ``e > 0``, 256 for NaN; made without branches into a buffer first (a loop that
        vectorises), then packed: eight codes make nine bytes, a 64-bit word of codes
        0-6 and code 7's lowest bit, then code 7 shifted down. A short last group
        writes its ``ceil(9 m / 8)`` bytes."""
        n = bits.shape[0]
        codes = np.empty(n + 8, np.uint16)
        for i in range(n):
            b = bits[i]
            mag = uint32(b) & uint32(0x7FFFFFFF)
            e = mag >> uint32(23)
            e += uint32((draws[i] < (mag & uint32(0x7FFFFF))) & (e < uint32(254)))
            e |= uint32((b < 0) & (e > uint32(0))) << uint32(8)
            nan = uint32(mag > uint32(0x7F800000))
            codes[i] = uint16(e + nan * (uint32(256) - e))
        codes[n:] = 0  # the short last group's missing codes
        for g in range((n + 7) // 8):
            i = 8 * g
            word = uint64(0)
            for j in range(8):
                word |= uint64(codes[i + j]) << uint64(9 * j)
            o = 9 * g
            if i + 8 <= n:
                for j in range(8):
                    out[o + j] = (word >> uint64(8 * j)) & uint64(0xFF)
                out[o + 8] = codes[i + 7] >> uint16(1)
            else:
                for j in range((9 * (n - i) + 7) // 8):
                    out[o + j] = (word >> uint64(8 * j)) & uint64(0xFF)

    @jit
    def natural_values(raw, n, out):  # pragma: no cover - compiled
        """The float32 values (as uint32 bits) of the ``n`` 9-bit codes packed in the
        bytes ``raw`` (pack_uint's layout, at least ``ceil(9 n / 8)`` bytes): ``code <<
        23``, but 0x7FC00000 (NaN) for the code 256, as Ops.power_of_two_values. Code
        ``j`` of a group of eight starts at bit ``j`` of the group's byte ``j``."""
        groups = n // 8
        for g in range(groups):
            o = 9 * g
            for j in range(8):
                code = ((uint32(raw[o + j]) | (uint32(raw[o + j + 1]) << uint32(8))) >> uint32(j)) & uint32(0x1FF)
                out[8 * g + j] = uint32(0x7FC00000) if code == 256 else code << uint32(23)
        o = 9 * groups
        for j in range(n - 8 * groups):  # a short last group: its ceil(9 * rest / 8) = rest + 1 bytes
            code = ((uint32(raw[o + j]) | (uint32(raw[o + j + 1]) << uint32(8))) >> uint32(j)) & uint32(0x1FF)
            out[8 * groups + j] = uint32(0x7FC00000) if code == 256 else code << uint32(23)

    @jit
    def pack_fields(codes, bits, out):  # pragma: no cover - compiled
        """The integers ``codes`` (each below ``2**bits``, ``1 <= bits <= 8``) packed
        into the bytes ``out`` as pack_uint packs them (code ``i`` at bit ``bits * i`` of
        a little-endian stream): eight codes make ``bits`` bytes, from one 64-bit word.
        A short last group writes its ``ceil(bits * m / 8)`` bytes."""
        n = codes.shape[0]
        shift = uint64(bits)
        for g in range((n + 7) // 8):
            i = 8 * g
            count = min(8, n - i)
            word = uint64(0)
            for j in range(count):
                word |= uint64(codes[i + j]) << (shift * uint64(j))
            o = bits * g
            for j in range((bits * count + 7) // 8):
                out[o + j] = (word >> uint64(8 * j)) & uint64(0xFF)

    @jit
    def dither_codes(x, draws, d, levels, norms, codes, ratio):  # pragma: no cover - compiled
        """Natural dithering's norms and codes of float32 ``x`` (Ops.dither_bucket_words
        before packing) in buckets of ``d``, the last one short where ``x`` is: each
        bucket's norm (its largest magnitude, the positive quiet NaN where it holds NaN
        or +-inf) into the float32 ``norms``, and Ops.dither_codes of ``x / norm`` (1
        for a zero norm) with the draws ``(draws >> 8) / 2**24`` (``draws``: raw uint32
        words) into the uint8 ``codes``; ``ratio``: float32 scratch of ``x``'s length.
        Float operations are those of the NumPy kernel, each a single IEEE rounding."""
        m = x.shape[0]
        bits_in = x.view(np.int32)
        norm_bits = norms.view(np.int32)
        ratio_bits = ratio.view(np.int32)
        for q in range((m + d - 1) // d):
            start = q * d
            stop = min(m, start + d)
            peak = np.int32(0)
            for i in range(start, stop):
                peak = max(peak, bits_in[i] & np.int32(0x7FFFFFFF))
            norm_bits[q] = np.int32(0x7FC00000) if peak >= np.int32(0x7F800000) else peak
            divisor = np.float32(1.0) if norms[q] == np.float32(0.0) else norms[q]
            np.divide(x[start:stop], divisor, ratio[start:stop])  # as a ufunc: vectorised
        lowest = np.int32((128 - levels) << 23)
        exponent_offset = np.int32(127 - levels)
        middle = np.int32(levels)
        unit = np.float32(2.0 ** -23)
        draw_unit = np.float32(2.0 ** -24)
        low_scale = np.float32(2.0 ** (levels - 1))
        for i in range(m):  # without branches, so that the loop vectorises
            a = ratio_bits[i] & np.int32(0x7FFFFFFF)
            special = a >= np.int32(0x7F800000)
            a = min(a, np.int32(0x3F800000))  # |y| clamped to 1
            keep = a >= lowest
            # the mantissa fraction, or below the lowest level |y| / 2**(1 - s): exact
            # (|y| <= 1 there; a NaN's value is unused)
            fraction = np.float32(a & np.int32(0x7FFFFF)) * unit
            low = ratio[i] * low_scale
            low = -low if low < np.float32(0.0) else low
            p = fraction if keep else low
            k = ((a >> np.int32(23)) - exponent_offset) if keep else np.int32(0)
            k += np.int32(np.float32(np.int32(draws[i] >> uint32(8))) * draw_unit < p)
            k = np.int32(0) if special else k
            codes[i] = np.uint8(middle - k if bits_in[i] < 0 else middle + k)

    @jit
    def dither_values(raw, n, bits, d, table, norms, out):  # pragma: no cover - compiled
        """Ops.dither_bucket_values for float32: the ``n`` codes of ``bits <= 8`` packed
        in the bytes ``raw`` (pack_uint's layout), each looked up in ``table`` and
        multiplied by its bucket's norm (one rounding)."""
        mask = uint64((1 << bits) - 1)
        if n == 0:
            return
        # each level times the bucket's norm: the products of the values
        scaled = table * norms[0]
        bucket, boundary = 0, d
        for g in range((n + 7) // 8):  # eight codes from the group's bits bytes
            o = bits * g
            count = min(8, n - 8 * g)
            word = uint64(0)
            for j in range((bits * count + 7) // 8):
                word |= uint64(raw[o + j]) << uint64(8 * j)
            for j in range(count):
                i = 8 * g + j
                if i == boundary:
                    bucket += 1
                    boundary += d
                    scaled[:] = table * norms[bucket]
                out[i] = scaled[(word >> uint64(bits * j)) & mask]

    @jit
    def qsgd_codes(grid, draws, divisors, d, levels, codes):  # pragma: no cover - compiled
        """QSGD's byte codes (Ops.bucket_levels, then ``+ levels``) of the float32
        ``grid`` in buckets of ``d`` with their ``divisors`` (the norms, 1 for a zero
        norm; none NaN) and the draws ``(draws >> 8) / 2**24`` (``draws``: uint32 already
        shifted), into the uint8 ``codes`` (its length: the elements to code). Each
        float step is the NumPy kernel's, one IEEE rounding each: ``floor(|g| / norm *
        s + u)`` capped at ``s``, with ``g``'s sign, plus ``s`` (exact in integers)."""
        m = codes.shape[0]
        signs = grid.view(np.int32)
        s = np.float32(levels)
        top = np.int32(levels)
        draw_unit = np.float32(2.0 ** -24)
        ratio = np.abs(grid[:m])
        for q in range((m + d - 1) // d):
            start, stop = q * d, min(m, q * d + d)
            # as a ufunc, which vectorises (a loop's division does not here)
            np.divide(ratio[start:stop], divisors[q], ratio[start:stop])
        for i in range(m):
            level = ratio[i] * s
            level = level + np.float32(np.int32(draws[i])) * draw_unit
            # floor, as truncation (the level is >= 0 and below s + 2, as |g| <= norm),
            # capped at s; the sign of g (a level of 0 makes the code s either way)
            k = min(np.int32(level), top)
            k = -k if signs[i] < 0 else k
            codes[i] = np.uint8(k + top)

    @jit
    def _order_keys_into(source, flip, keys):  # pragma: no cover - compiled
        """The totalOrder keys of the float32 bits ``source`` into ``keys`` (every NaN
        the positive quiet NaN; the key of ``-v`` where ``flip``)."""
        top = np.int32(0x7FFFFFFF)
        inf_key = np.int32(0x7F800000)
        for t in range(source.shape[0]):
            b = source[t]
            k = b ^ ((b >> np.int32(31)) & top)  # sign-magnitude bits as an order key
            nan = (k > inf_key) | (k < -1 - inf_key)
            k = (-1 - k) if flip else k
            keys[t] = np.int32(0x7FC00000) if nan else k

    @jit
    def _compare_exchange(low, high):  # pragma: no cover - compiled
        for t in range(low.shape[0]):
            a, b = low[t], high[t]
            low[t] = min(a, b)
            high[t] = max(a, b)

    @jit
    def _float_bits_into(keys, bits):  # pragma: no cover - compiled
        """The float32 bits of the order ``keys`` into ``bits``."""
        for t in range(keys.shape[0]):
            k = keys[t]
            bits[t] = k ^ ((k >> np.int32(31)) & np.int32(0x7FFFFFFF))

    @jit
    def sketch_median(rows, n, shifts, negate, steps, middle, out):  # pragma: no cover - compiled
        """Ops.rotated_block_median of float32 ``rows`` ``(R, width)`` into the float32
        ``out`` (``n`` elements), ``shifts`` int64 and ``negate`` bool ``(R, blocks)``:
        element ``q * width + c`` reads ``rows[r, (c + shifts[r, q]) mod width]`` of
        every row, negated where ``negate[r, q]``, as IEEE 754 totalOrder keys (every NaN
        the positive quiet NaN), and takes their median with the comparator network
        ``steps`` (int64 ``(S, 2)``: min to the first position, max to the second) at
        the positions ``middle`` (one, or two whose values' mean ``(a + b) * 0.5`` it
        is). A tile of columns at a time, each pass a loop over contiguous slices."""
        count, width = rows.shape
        bits_in = rows.view(np.int32)
        out_bits = out.view(np.int32)
        tile = 4096
        keys = np.empty((count, tile), np.int32)
        pair = np.empty((2, tile), np.int32)
        pair_values = pair.view(np.float32)
        for q in range(shifts.shape[1]):
            base = q * width
            length = min(width, n - base)
            for c0 in range(0, length, tile):
                m = min(tile, length - c0)
                for r in range(count):
                    # the tile's sources: up to the row's end, then from its start
                    first = c0 + shifts[r, q]
                    if first >= width:
                        first -= width
                    run = min(m, width - first)
                    _order_keys_into(bits_in[r, first:first + run], negate[r, q], keys[r, :run])
                    if run < m:
                        _order_keys_into(bits_in[r, :m - run], negate[r, q], keys[r, run:m])
                for s in range(steps.shape[0]):
                    _compare_exchange(keys[steps[s, 0], :m], keys[steps[s, 1], :m])
                if middle.shape[0] == 1:
                    _float_bits_into(keys[middle[0], :m], out_bits[base + c0:base + c0 + m])
                else:
                    _float_bits_into(keys[middle[0], :m], pair[0, :m])
                    _float_bits_into(keys[middle[1], :m], pair[1, :m])
                    for t in range(m):
                        out[base + c0 + t] = (pair_values[0, t] + pair_values[1, t]) * np.float32(0.5)

    @jit
    def count_magnitude_at_least(bits, level):  # pragma: no cover - compiled
        """How many of the float32 ``bits`` (int32) have a magnitude's bits at least
        ``level``'s (the magnitudes order as their bits; NaN lies above +inf)."""
        count = 0
        for i in range(bits.shape[0]):
            count += (bits[i] & np.int32(0x7FFFFFFF)) >= level
        return count

    @jit
    def pack_magnitude_at_least(bits, level, indices, values):  # pragma: no cover - compiled
        """The int32 indices and the float32 bits (int32) of the elements of ``bits``
        counted by count_magnitude_at_least, in index order, into ``indices`` and
        ``values`` (each as long as that count)."""
        at = 0
        for i in range(bits.shape[0]):
            b = bits[i]
            if (b & np.int32(0x7FFFFFFF)) >= level:
                indices[at] = i
                values[at] = b
                at += 1

    @jit
    def indices_magnitude_at_least(bits, level, indices):  # pragma: no cover - compiled
        """The int64 indices of the elements of ``bits`` counted by
        count_magnitude_at_least, in order, into ``indices`` (as long as that count)."""
        at = 0
        for i in range(bits.shape[0]):
            if (bits[i] & np.int32(0x7FFFFFFF)) >= level:
                indices[at] = i
                at += 1

    @jit
    def pack_pairs(bits, indices, out_indices, out_values):  # pragma: no cover - compiled
        """The sparse payload's two halves: the int64 ``indices`` as int32, and the
        float32 bits (int32) at them. Returns False, the halves unfinished, at an index
        outside ``bits``."""
        n = bits.shape[0]
        for j in range(indices.shape[0]):
            i = indices[j]
            if i < 0 or i >= n:
                return False
            out_indices[j] = np.int32(i)
            out_values[j] = bits[i]
        return True

    @jit
    def scatter_ascending(indices, values, out):  # pragma: no cover - compiled
        """``out[indices] = values`` for ascending distinct ``indices`` within ``out``
        (zero-filled by the caller: fresh zero pages cost no pass): returns 0. Returns 1
        at the first index that is not above the one before it, 2 at one outside
        ``out`` (``out`` is then partly written: the caller scatters another way)."""
        n = out.shape[0]
        previous = -1
        for j in range(indices.shape[0]):
            i = indices[j]
            if i <= previous:
                return 1
            if i >= n:
                return 2
            out[i] = values[j]
            previous = i
        return 0

    # Philox-4x64-10 (Salmon et al. 2011): the round multipliers and the Weyl constants
    # that bump the key between rounds, as NumPy's np.random.Philox
    m0, m1 = uint64(0xD2E7470EE14C6C93), uint64(0xCA5A826395121157)
    w0, w1 = uint64(0x9E3779B97F4A7C15), uint64(0xBB67AE8584CAA73B)

    @jit
    def philox_block(counter, key, out, at):  # pragma: no cover - compiled
        """One block: increment the 256-bit ``counter`` (uint64[4], in place), then its
        four words (at most ``len(out) - at`` written) into ``out`` from ``at``."""
        counter[0] += uint64(1)
        if counter[0] == 0:
            counter[1] += uint64(1)
            if counter[1] == 0:
                counter[2] += uint64(1)
                if counter[2] == 0:
                    counter[3] += uint64(1)
        c0, c1, c2, c3 = counter[0], counter[1], counter[2], counter[3]
        k0, k1 = key[0], key[1]
        for _ in range(10):
            hi0, lo0 = mulhilo64(m0, c0)
            hi1, lo1 = mulhilo64(m1, c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 += w0
            k1 += w1
        words = (c0, c1, c2, c3)
        for t in range(min(4, out.shape[0] - at)):
            out[at + t] = words[t]

    @jit
    def philox_words(counter, key, out):  # pragma: no cover - compiled
        """The next ``len(out)`` uint64 words of NumPy's Philox-4x64-10 stream with the
        ``counter`` (uint64[4], advanced in place by one per block of four words) and the
        ``key`` (uint64[2]): NumPy's ``random_raw``, bit for bit, the last block's
        unwritten words dropped. Four blocks at a time where the counter's low word does
        not carry within them, their multiplies interleaved (one block's ten rounds are
        a chain of dependent multiplies)."""
        n = out.shape[0]
        at = 0
        while at < n:
            if n - at >= 16 and counter[0] <= uint64(0xFFFFFFFFFFFFFFFB):
                base = counter[0]
                a0, b0, d0, e0 = base + uint64(1), base + uint64(2), base + uint64(3), base + uint64(4)
                a1 = b1 = d1 = e1 = counter[1]
                a2 = b2 = d2 = e2 = counter[2]
                a3 = b3 = d3 = e3 = counter[3]
                k0, k1 = key[0], key[1]
                for _ in range(10):
                    ha0, la0 = mulhilo64(m0, a0)
                    ha1, la1 = mulhilo64(m1, a2)
                    hb0, lb0 = mulhilo64(m0, b0)
                    hb1, lb1 = mulhilo64(m1, b2)
                    hd0, ld0 = mulhilo64(m0, d0)
                    hd1, ld1 = mulhilo64(m1, d2)
                    he0, le0 = mulhilo64(m0, e0)
                    he1, le1 = mulhilo64(m1, e2)
                    a0, a1, a2, a3 = ha1 ^ a1 ^ k0, la1, ha0 ^ a3 ^ k1, la0
                    b0, b1, b2, b3 = hb1 ^ b1 ^ k0, lb1, hb0 ^ b3 ^ k1, lb0
                    d0, d1, d2, d3 = hd1 ^ d1 ^ k0, ld1, hd0 ^ d3 ^ k1, ld0
                    e0, e1, e2, e3 = he1 ^ e1 ^ k0, le1, he0 ^ e3 ^ k1, le0
                    k0 += w0
                    k1 += w1
                counter[0] = base + uint64(4)
                out[at], out[at + 1], out[at + 2], out[at + 3] = a0, a1, a2, a3
                out[at + 4], out[at + 5], out[at + 6], out[at + 7] = b0, b1, b2, b3
                out[at + 8], out[at + 9], out[at + 10], out[at + 11] = d0, d1, d2, d3
                out[at + 12], out[at + 13], out[at + 14], out[at + 15] = e0, e1, e2, e3
                at += 16
            else:
                philox_block(counter, key, out, at)
                at += 4

    return SimpleNamespace(natural_codes_packed=natural_codes_packed, natural_values=natural_values,
                           pack_fields=pack_fields, dither_codes=dither_codes, dither_values=dither_values,
                           qsgd_codes=qsgd_codes, sketch_median=sketch_median, philox_words=philox_words,
                           count_magnitude_at_least=count_magnitude_at_least,
                           pack_magnitude_at_least=pack_magnitude_at_least, scatter_ascending=scatter_ascending,
                           indices_magnitude_at_least=indices_magnitude_at_least, pack_pairs=pack_pairs)
