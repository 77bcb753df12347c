"""Multiplying values by the clip factor with exactly one rounding into their own dtype.

Each value becomes the exact product v * q (q = max_norm / (norm + eps) as an exact fraction)
rounded once to nearest, ties to even, in v's dtype:

- float64 data: the product is computed in double-double arithmetic (q = hi + lo, Dekker's
  exact product v * hi), so the one final addition rounds the nearly exact value.
- float32 and float16 data (which numpy rounds float64 into correctly): v * q is bracketed by
  the float64 products of v with two factors just below and just above q.  Rounding is
  monotone, so where both products round to the same narrow value, v * q rounds to it too.
  The values whose bracket straddles a midpoint are recomputed exactly (see below).
- bfloat16 and float8 data (and factors so extreme that products could leave float64's normal
  range): v * hi in float64 is within two float64 units of v * q, so rounding it into the
  narrow type is right unless it lies within two units of a rounding boundary (a midpoint) of
  that type; those values are recomputed exactly.  (The bracket would cost half as much, but
  ml_dtypes converts from float64 through float32, rounding twice.)

Recomputing exactly, vectorised: the side of the midpoint comes from the double-double
product, or for a tie (common when q is a short fraction such as 3/4) from exact small-integer
products; only values that neither settles are rounded one by one from fractions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import ml_dtypes
import numpy as np

from . import kernels

_F64_MANTISSA_BITS = 52
_SPLITTER = float(2**27 + 1)  # Veltkamp: splits a float64 into two 26-bit halves
# Dekker's product v * hi - fl(v * hi) is exact while v * _SPLITTER does not overflow and no
# partial product (down to 2**-106 of |v * hi|) falls below float64's smallest subnormal; the
# final sum must not overflow either.  Values whose products lie outside these bounds, and all
# values for factors outside _SPLIT_FACTORS (where lo is no longer 53 bits), go through
# _scale_float64_wide, which works at unit scale.
_SPLIT_LIMIT = 2.0**995
_SPLIT_PRODUCTS = (2.0**-960, 2.0**1020)
_SPLIT_FACTORS = (2.0**-900, 2.0**900)
# The double-double product is within 2**-104 of v * q.  Rounding it is decided where it moves
# by no more than the rounding of its low part moved by this fraction of itself (see
# _round_decided): else the value is one of the very rare ones within 2**-96 of a midpoint,
# recomputed exactly.
_DECIDE_MARGIN = 2.0**-44
_SMALLEST_NORMAL = 2.0**-1022
_LARGEST = float(np.finfo(np.float64).max)
_FLOAT64 = np.dtype(np.float64)
_INF_BITS = 0x7FF0000000000000
_NEAR = 2  # float64 units around a midpoint that count as too close to call
_MAGNITUDE_BITS = (1 << 63) - 1  # all but the sign bit: the bits of |x|, ordered like |x|
# A float64 product of normal values is off by at most 2**-53 of itself: a factor 2**-50 away
# from q keeps its products on their side of v * q.
_BRACKET_MARGIN = Fraction(1, 2**50)
# For these factors every product of a float32 or float16 value is a normal float64 (their
# magnitudes lie within 2**-149 .. 2**128), where that bound holds.
_BRACKET_RANGE = (2.0**-800, 2.0**800)
_CORRECTLY_ROUNDED = (np.dtype(np.float32), np.dtype(np.float16))  # numpy's float64 casts
_UNDECIDED_ROOM = 4096  # values the compiled kernel notes before handing back (at least 256)


@dataclass(frozen=True)
class ScaleFactor:
    """The exact factor q, its double-double form hi + lo (hi = q rounded to nearest: 0.0 or
    inf where q lies beyond float64's range), the same at unit scale (*wide*: q = (mantissa_hi
    + mantissa_lo) * 2**exponent, 0.5 <= mantissa_hi < 1, whatever the size of q), whether q
    is *short* (53 significant bits at most: then float64 products are exact double-doubles,
    and a tie is a true tie) and the floats *below* and *above* that bracket it for the narrow
    types (see _scale_bracketed)."""

    exact: Fraction
    hi: float = field(init=False)
    lo: float = field(init=False)
    wide: tuple[float, float, int] = field(init=False)
    short: bool = field(init=False)
    below: float = field(init=False)
    above: float = field(init=False)

    def __post_init__(self) -> None:
        hi = _to_float(self.exact)  # Fraction -> float is correctly rounded
        lo = float(self.exact - Fraction(hi)) if math.isfinite(hi) else 0.0
        wide = _unit_scale(self.exact)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "wide", wide)
        object.__setattr__(self, "short", Fraction(wide[0]) * Fraction(2) ** wide[2] == self.exact)
        object.__setattr__(self, "below", _to_float(self.exact * (1 - _BRACKET_MARGIN)))
        object.__setattr__(self, "above", _to_float(self.exact * (1 + _BRACKET_MARGIN)))

    def brackets(self, dtype: np.dtype) -> bool:
        """Whether values of *dtype* can be scaled by bracketing (see _scale_bracketed)."""
        low, high = _BRACKET_RANGE
        return dtype.newbyteorder("=") in _CORRECTLY_ROUNDED and low <= self.hi <= high

    @property
    def splits(self) -> bool:
        """Whether hi and lo hold q to 106 bits and float64 values can be multiplied by them
        directly (see _scale_float64)."""
        low, high = _SPLIT_FACTORS
        return low <= self.hi <= high

    @classmethod
    def of(cls, value: float) -> ScaleFactor:
        return cls(Fraction(value))


def _to_float(exact: Fraction) -> float:
    """*exact* rounded to the nearest float64; inf beyond its range."""
    try:
        return float(exact)
    except OverflowError:
        return math.inf


def _unit_scale(exact: Fraction) -> tuple[float, float, int]:
    """(mantissa_hi, mantissa_lo, exponent): exact = (hi + lo) * 2**exponent to 106 bits,
    0.5 <= hi < 1 (or all 0 for 0)."""
    if not exact:
        return 0.0, 0.0, 0
    exponent = exact.numerator.bit_length() - exact.denominator.bit_length()
    unit = exact / Fraction(2) ** exponent
    if unit >= 1:
        unit, exponent = unit / 2, exponent + 1
    elif unit < Fraction(1, 2):
        unit, exponent = unit * 2, exponent - 1
    hi = float(unit)
    return hi, float(unit - Fraction(hi)), exponent


class ScratchBuffers:
    """Reused float64 work arrays of one block each, so scaling allocates nothing per chunk."""

    def __init__(self, size: int = 1 << 16) -> None:
        self.size = size
        self._arrays = [np.empty(size, dtype=np.float64) for _ in range(6)]
        self._flags = [np.empty(size, dtype=bool) for _ in range(2)]
        self._narrow = np.empty(size, dtype=np.uint32)
        self.undecided = np.empty(_UNDECIDED_ROOM, dtype=np.int64)
        self.originals = np.empty(_UNDECIDED_ROOM, dtype=np.float32)

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return type(self), (self.size,)  # scratch contents never need to travel

    def take(self, n: int) -> list[np.ndarray]:
        return [a[:n] for a in self._arrays]

    def flags(self, n: int) -> list[np.ndarray]:
        return [a[:n] for a in self._flags]

    def narrow(self, n: int, dtype: np.dtype) -> np.ndarray:
        """A work array of *n* values of *dtype* (at most 4 bytes each)."""
        return self._narrow.view(np.uint8)[: n * dtype.itemsize].view(dtype)


def scale(src: np.ndarray, dst: np.ndarray, factor: ScaleFactor, scratch: ScratchBuffers) -> None:
    """``dst = src * q``, each result the exact product rounded to nearest (ties to even).

    *src* and *dst* are 1-D arrays of the same dtype and size; they may be the same array.
    """
    wide = src.dtype.kind == "f" and src.dtype.itemsize == 8
    bracketed = factor.brackets(src.dtype)
    if bracketed and kernels.handle(src, dst):
        _scale_compiled(src, dst, factor, scratch)
        return
    for start in range(0, src.size, scratch.size):
        part = slice(start, start + scratch.size)
        buffers = scratch.take(src[part].size)
        n = len(buffers[0])
        if wide:
            _scale_float64(src[part], dst[part], factor, buffers, scratch.flags(n)[0])
        elif bracketed:
            narrow, differ = scratch.narrow(n, src.dtype), scratch.flags(n)[0]
            _scale_bracketed(src[part], dst[part], factor, *buffers[:2], narrow, differ)
        else:
            _scale_narrow(src[part], dst[part], factor, buffers[:2], scratch.flags(n))


def _scale_float64(
    v: np.ndarray,
    out: np.ndarray,
    factor: ScaleFactor,
    buffers: list[np.ndarray],
    undecided: np.ndarray,
) -> None:
    """Scale float64 *v* into *out*: the double-double product p + err, rounded once.  Values
    whose products leave the range where that is exact go through _scale_float64_wide, the
    very rare ones too close to a midpoint for either through fractions."""
    x, p, err, result, work, tmp = buffers
    if v.dtype.isnative and v.flags.aligned and not np.may_share_memory(v, out):
        x = v  # read as it is: out is written last, so v stays as it was throughout
    else:
        np.copyto(x, v)  # exact; also keeps v for recomputing when out is v
    outside = _outside_split_range(x, factor, tmp) if factor.splits else np.arange(x.size)
    with np.errstate(over="ignore", invalid="ignore"):  # values outside are redone below
        np.multiply(x, factor.hi, out=p)  # p = fl(v * hi)
        _product_error(x, factor.hi, p, err, result, work, tmp)
        err += np.multiply(x, factor.lo, out=tmp)  # the factor's own error, v * lo
        _round_decided(p, err, result, tmp, undecided, exact=factor.short)
    redo = np.flatnonzero(undecided) if undecided.any() else outside[:0]
    if outside.size:
        wide, unsure = _scale_float64_wide(x[outside], factor)
        result[outside] = wide
        redo = np.union1d(np.setdiff1d(redo, outside), outside[unsure])
    redo = redo[np.isfinite(x[redo])]  # NaN/Inf are their callers' to handle
    for index, value in zip(redo.tolist(), x[redo].tolist(), strict=True):
        result[index] = round_exact(Fraction(value) * factor.exact, _FLOAT64)
    np.copysign(result, x, out=out)  # v * q has v's sign (q > 0), zeros too


def _round_decided(
    p: np.ndarray,
    err: np.ndarray,
    result: np.ndarray,
    tmp: np.ndarray,
    undecided: np.ndarray,
    exact: bool,
) -> None:
    """result = fl(p + err), and which results v * q may round away from: those that moving
    err by _DECIDE_MARGIN of itself, either way, changes (v * q lies within that move).  None
    where p + err is *exact*ly v * q (then even a tie is one)."""
    if exact:
        np.add(p, err, out=result)
        undecided[...] = False
        return
    np.multiply(err, 1.0 + _DECIDE_MARGIN, out=tmp)
    np.add(p, tmp, out=result)
    np.multiply(err, 1.0 - _DECIDE_MARGIN, out=tmp)
    np.add(p, tmp, out=tmp)
    np.not_equal(result, tmp, out=undecided)


def _outside_split_range(x: np.ndarray, factor: ScaleFactor, work: np.ndarray) -> np.ndarray:
    """The indices of the finite, non-zero values whose products _scale_float64 cannot take
    directly (see _SPLIT_PRODUCTS); in the usual case found to be none from the block's
    largest and smallest non-zero magnitudes alone."""
    if not x.size:
        return np.arange(0)
    low, high = _SPLIT_PRODUCTS
    np.abs(x, out=work)
    top = float(np.maximum.reduce(work))
    smallest = float(np.minimum.reduce(work))
    if smallest == 0.0:  # the smallest non-zero one, then
        bits = work.view(np.uint64)
        bits -= np.uint64(1)  # 0 wraps around to the largest
        least = int(np.minimum.reduce(bits)) + 1  # 2**64 when every value is 0
        smallest = float(np.array(least % 2**64 or _INF_BITS, np.uint64).view(np.float64))
    if top <= _SPLIT_LIMIT and top * factor.hi <= high and smallest * factor.hi >= low:
        return np.arange(0)
    with np.errstate(invalid="ignore", over="ignore"):
        magnitude = np.abs(x)
        product = magnitude * factor.hi
        outside = (magnitude > _SPLIT_LIMIT) | (product > high) | (product < low)
    return np.flatnonzero(outside & np.isfinite(magnitude) & (magnitude > 0.0))


def _scale_float64_wide(x: np.ndarray, factor: ScaleFactor) -> tuple[np.ndarray, np.ndarray]:
    """x * q rounded to nearest for finite float64 *x* of any magnitude and a factor of any
    size, down to subnormal results (and inf beyond the largest float64); and which results
    are undecided (too close to a midpoint: to recompute exactly).

    Works at unit scale: x = m * 2**e, q = (hi + lo) * 2**shift, and m * (hi + lo) as a
    double-double within [0.25, 1), far from under- or overflow; then rounds that once, to
    53 bits where the result is normal, to the subnormal spacing where it is not.
    """
    hi, lo, shift = factor.wide
    exact = factor.short
    mantissa, exponent = np.frexp(x)
    p = mantissa * hi
    err = np.empty_like(p)
    _product_error(mantissa, hi, p, err, *(np.empty_like(p) for _ in range(3)))
    err += mantissa * lo
    result, undecided = np.empty_like(p), np.empty(p.size, dtype=bool)
    _round_decided(p, err, result, np.empty_like(p), undecided, exact)
    # beyond these every result is 0 or inf: clamping keeps the powers of two finite
    scale = np.clip(exponent.astype(np.int64) + shift, -1077, 1100)
    with np.errstate(over="ignore"):
        wide = np.ldexp(result, scale)
    small = np.flatnonzero(np.abs(wide) < _SMALLEST_NORMAL)
    if small.size:
        total = p[small] + err[small]
        low = err[small] - (total - p[small])  # p + err = total + low exactly (Fast2Sum)
        wide[small], undecided[small] = _round_to_subnormal(total, low, scale[small], exact)
    return wide, undecided


def _round_to_subnormal(
    total: np.ndarray, low: np.ndarray, scale: np.ndarray, exact: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(total + low) * 2**scale rounded to a multiple of float64's smallest subnormal, ties to
    even, for products below the normal range (|total| < 1, |low| at most half its last
    place); and which are undecided: on a midpoint, with a *low* too small to tell the side
    (unless total + low is *exact*)."""
    step = np.ldexp(1.0, -1074 - scale)  # the subnormal spacing at unit scale: >= 2 ulps
    magnitude = np.abs(total)
    lacking = np.where(total < 0, -low, low)  # what |total| lacks of the exact magnitude
    base = np.ldexp(1.0, 52) * step  # adding it rounds to a multiple of step, ties to even
    rounded = (magnitude + base) - base
    midpoint = np.abs(magnitude - rounded) == step / 2  # the difference is exact
    side = midpoint & (lacking != 0.0)
    rounded[side] = magnitude[side] + np.copysign(step[side] / 2, lacking[side])
    undecided = midpoint & ~exact & (np.abs(lacking) <= magnitude * 2.0**-100)
    return np.ldexp(rounded, scale), undecided


def _product_error(
    x: np.ndarray,
    hi: float,
    p: np.ndarray,
    err: np.ndarray,
    head: np.ndarray,
    tail: np.ndarray,
    tmp: np.ndarray,
) -> None:
    """err = x * hi - p exactly, for p = fl(x * hi) (Dekker), in the given buffers.

    Exact while no product overflows or falls below float64's normal range.
    """
    hi_head, hi_tail = _split_scalar(hi)
    np.multiply(x, _SPLITTER, out=head)  # Veltkamp: x = head + tail, 26 bits each
    np.subtract(head, x, out=tail)
    np.subtract(head, tail, out=head)
    np.subtract(x, head, out=tail)
    np.multiply(head, hi_head, out=err)
    err -= p
    err += np.multiply(head, hi_tail, out=tmp)
    err += np.multiply(tail, hi_head, out=tmp)
    err += np.multiply(tail, hi_tail, out=tmp)


def _split_scalar(x: float) -> tuple[float, float]:
    head = x * _SPLITTER
    head -= head - x
    return head, x - head


def _scale_bracketed(
    v: np.ndarray,
    out: np.ndarray,
    factor: ScaleFactor,
    x: np.ndarray,
    product: np.ndarray,
    other: np.ndarray,
    differ: np.ndarray,
) -> None:
    """Scale float32 or float16 *v* into *out*: fl(v * below) <= v * q <= fl(v * above) (for
    v >= 0; the other way round for v < 0), and rounding to nearest is monotone."""
    np.copyto(x, v)  # exact; also keeps v for the rare exact recomputation when out is v
    np.multiply(x, factor.above, out=product)
    np.copyto(other, product, casting="unsafe")
    np.multiply(x, factor.below, out=product)
    np.copyto(out, product, casting="unsafe")
    uint = f"u{v.dtype.itemsize}"  # compare bits: NaN stays NaN on both sides
    np.not_equal(out.view(uint), other.view(uint), out=differ)
    if differ.any():
        suspects = np.flatnonzero(differ)
        _recompute_exactly(out, suspects, x[suspects], factor)


def _scale_compiled(
    src: np.ndarray, dst: np.ndarray, factor: ScaleFactor, scratch: ScratchBuffers
) -> None:
    """_scale_bracketed in one compiled pass; it hands back the undecided values as it goes."""
    done = 0
    while done < src.size:
        count, found = kernels.compiled.scale_bracketed(
            src[done:], dst[done:], factor.below, factor.above, scratch.undecided, scratch.originals
        )
        originals = scratch.originals[:found].astype(np.float64)
        _recompute_exactly(dst[done:], scratch.undecided[:found], originals, factor)
        done += count


def _scale_narrow(
    v: np.ndarray,
    out: np.ndarray,
    factor: ScaleFactor,
    wide: list[np.ndarray],
    flags: list[np.ndarray],
) -> None:
    product, work = wide
    info = ml_dtypes.finfo(v.dtype)
    np.copyto(product, v, casting="unsafe")  # one plain cast: faster than casting inside *
    product *= min(factor.hi, _LARGEST)  # a factor beyond float64 overflows all but 0 * q
    suspects = np.flatnonzero(_near_midpoint(product, info, work, *flags))
    originals = v[suspects].astype(np.float64)  # before *out*, which may be *v*, is written
    _store_nearest(out, product)
    _recompute_exactly(out, suspects, originals, factor)


def _recompute_exactly(
    out: np.ndarray, indices: np.ndarray, originals: np.ndarray, factor: ScaleFactor
) -> None:
    """out[i] = the exact product of the float64 *originals* and q, rounded once, at *indices*
    (the values float64 arithmetic could not decide: their products lie near a midpoint)."""
    if not indices.size:
        return
    rounded, settled = _round_near_midpoints(originals, factor, out.dtype)
    out[indices[settled]] = rounded[settled]  # exact: each is a value of out's dtype
    unsettled = ~settled
    for index, value in zip(indices[unsettled], originals[unsettled], strict=True):
        out[index] = round_exact(Fraction(float(value)) * factor.exact, out.dtype)


def _round_near_midpoints(
    v: np.ndarray, factor: ScaleFactor, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """v * q rounded to *dtype* (as float64), for float64 *v* of that dtype whose products lie
    near the midpoint M between two neighbouring values of it; and which of them are settled.

    Left unsettled: factors beyond _BRACKET_RANGE, non-finite values, products outside the
    type's normal range or not near a midpoint, and the rare ones _beyond_midpoint cannot
    decide.
    """
    low, high = _BRACKET_RANGE
    if not low <= factor.hi <= high:
        return np.zeros(v.size), np.zeros(v.size, dtype=bool)
    info = ml_dtypes.finfo(dtype)
    shift = _F64_MANTISSA_BITS - info.nmant
    with np.errstate(invalid="ignore"):  # non-finite values stay unsettled
        p = v * factor.hi
        magnitude = np.abs(p)
        step = np.int64(1) << shift
        down_bits = magnitude.view(np.int64) & ~(step - 1)  # |p| truncated to the narrow type
        down, up = down_bits.view(np.float64), (down_bits + step).view(np.float64)
        midpoint = (down_bits | (step >> 1)).view(np.float64)
        settled = (
            (magnitude >= float(info.smallest_normal))
            & (up <= float(info.max))
            & (np.abs(magnitude - midpoint) <= magnitude * 2.0**-40)
        )
        side, decided = _beyond_midpoint(v, factor, p, midpoint)
    odd_below = (down_bits >> shift) & 1 == 1
    rounded = np.where((side > 0) | ((side == 0) & odd_below), up, down)
    return np.copysign(rounded, p), settled & decided


def _beyond_midpoint(
    v: np.ndarray, factor: ScaleFactor, p: np.ndarray, midpoint: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The sign of |v * q| - M (as a float64 of that sign, 0 for a tie), for p = fl(v * hi)
    within 2**-40 of M, and where it is certain.

    From the double-double product p + err + v * lo, within 2**-103 of v * q, where that lies
    far enough from M; else, for q = N / D with N and D small enough for both products to be
    exact in float64, from |v| * N against M * D.
    """
    err = np.empty_like(p)
    _product_error(v, factor.hi, p, err, *(np.empty_like(p) for _ in range(3)))
    # Sterbenz: |p| - M is exact this close to M; err + v * lo is off by at most 2**-104 |p|
    side = (np.abs(p) - midpoint) + np.sign(p) * (err + v * factor.lo)
    decided = np.abs(side) > np.abs(p) * 2.0**-100
    numerator, denominator = factor.exact.numerator, factor.exact.denominator
    if max(numerator, denominator) >= 2**28:  # 24-bit v times N or 25-bit M times D inexact
        return side, decided
    exact_side = np.abs(v) * float(numerator) - midpoint * float(denominator)
    return np.where(decided, side, exact_side), np.ones(v.size, dtype=bool)


def _near_midpoint(
    product: np.ndarray,
    info: ml_dtypes.finfo,
    work: np.ndarray,
    near: np.ndarray,
    small: np.ndarray,
) -> np.ndarray:
    """Which float64 *product* values lie within _NEAR float64 units of a midpoint between two
    neighbouring values of the narrow type (where v * q and v * hi may round apart).

    Works in the given buffers (*work* float64, *near* and *small* bool): no allocation.
    """
    shift = _F64_MANTISSA_BITS - info.nmant
    bits = work.view(np.int64)
    np.bitwise_and(product.view(np.int64), _MAGNITUDE_BITS, out=bits)
    np.less(bits, _float_bits(float(info.smallest_normal)), out=small)
    # the low bits lie within _NEAR of the midpoint pattern 100..0 (one add and mask, no abs)
    np.add(bits, _NEAR - (1 << (shift - 1)), out=bits)
    np.bitwise_and(bits, (1 << shift) - 1, out=bits)
    np.less_equal(bits, 2 * _NEAR, out=near)
    if small.any():
        # Below the narrow type's normal range its spacing is fixed: midpoints are the odd
        # multiples of half the smallest subnormal.
        index = np.flatnonzero(small)
        halves = product[index] / (float(info.smallest_subnormal) / 2)
        odd = 2.0 * np.floor(halves / 2.0) + 1.0
        near[index] = np.abs(halves - odd) <= _NEAR * np.spacing(np.abs(halves))
    return near


def _float_bits(value: float) -> int:
    return int(np.array(value, dtype=np.float64).view(np.int64))


def _store_nearest(part: np.ndarray, product: np.ndarray) -> None:
    """Round float64 *product* to nearest into *part*'s dtype."""
    if part.dtype.kind == "f":  # numpy converts float64 to float32/float16 correctly
        np.copyto(part, product, casting="unsafe")
    else:  # ml_dtypes converts via float32: round to odd first so that step cannot mislead
        np.copyto(part, round_to_odd_float32(product), casting="unsafe")


def round_to_odd_float32(wide: np.ndarray) -> np.ndarray:
    """Round float64 *wide* to float32 with round-to-odd.

    Rounding to odd and then to nearest into a format with at least two fewer significand bits
    (bfloat16, float8) equals rounding once to nearest.
    """
    narrow = wide.astype(np.float32)
    back = narrow.astype(np.float64)
    inexact = back != wide
    bits = narrow.view(np.uint32)
    bits[inexact & (np.abs(back) > np.abs(wide))] -= 1  # rounded away from zero: truncate instead
    bits[inexact] |= 1
    return narrow


def round_exact(exact: Fraction, dtype: np.dtype) -> np.generic:
    """The value of *dtype* nearest to *exact*, ties to the one with an even last bit (beyond
    the largest value and half its step, what *dtype* overflows to: inf, or NaN)."""
    with np.errstate(over="ignore"):
        guess = dtype.type(_to_float(exact))
    info = ml_dtypes.finfo(dtype)
    if not np.isfinite(float(guess)):
        return _overflowed(exact, dtype, guess)
    candidates = (
        np.nextafter(guess, dtype.type(info.min)),
        guess,
        np.nextafter(guess, dtype.type(info.max)),
    )
    uint = np.dtype(f"u{dtype.itemsize}")
    return min(
        candidates,
        key=lambda c: (abs(Fraction(float(c)) - exact), int(np.array(c).view(uint)) & 1),
    )


def _overflowed(exact: Fraction, dtype: np.dtype, guess: np.generic) -> np.generic:
    """*guess* (inf, or NaN for types without inf: *exact* converted through float64), or the
    largest value of *dtype* where *exact* lies below the midpoint beyond it (from there on
    IEEE rounds to infinity; through float64 a value just below can land on it)."""
    largest = dtype.type(ml_dtypes.finfo(dtype).max)
    uint = np.dtype(f"u{dtype.itemsize}")
    below = (np.array(largest, dtype=dtype).view(uint) - 1).astype(uint).view(dtype)[()]
    limit = Fraction(float(largest)) + (Fraction(float(largest)) - Fraction(float(below))) / 2
    if abs(exact) < limit:
        return largest if exact > 0 else -largest
    return guess
