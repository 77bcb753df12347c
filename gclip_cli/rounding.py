"""Multiplying values by the clip factor with exactly one rounding into their own dtype.

float64 data: one IEEE multiplication.  Narrower data (float32, float16, bfloat16, float8) is
multiplied in float64 and then converted, which rounds twice.  Rounding twice differs from
rounding the exact product once only when the float64 product lies exactly on a midpoint of the
narrow type, so those (rare) values are detected and recomputed exactly with fractions.
"""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np

_F64_MANTISSA_BITS = 52


def scale_in_place(values: np.ndarray, alpha: float, wide: np.ndarray) -> None:
    """``values *= alpha``, each result the exact product rounded to nearest (ties to even).

    *values* is 1-D; *wide* is a float64 scratch buffer (its size sets the block size).
    """
    if values.dtype.kind == "f" and values.dtype.itemsize == 8:
        np.multiply(values, alpha, out=values)
        return
    info = ml_dtypes.finfo(values.dtype)
    for start in range(0, values.size, wide.size):
        part = values[start : start + wide.size]
        product = wide[: part.size]
        np.copyto(product, part, casting="unsafe")
        np.multiply(product, alpha, out=product)
        suspects = np.flatnonzero(_on_midpoint(product, info))
        originals = part[suspects].astype(np.float64)
        _store_nearest(part, product)
        for index, value in zip(suspects, originals, strict=True):
            part[index] = _round_exact(Fraction(float(value)) * Fraction(alpha), part.dtype)


def _on_midpoint(product: np.ndarray, info: ml_dtypes.finfo) -> np.ndarray:
    """Which float64 *product* values lie exactly halfway between two values of the narrow type."""
    shift = _F64_MANTISSA_BITS - info.nmant
    low_bits = product.view(np.uint64) & np.uint64((1 << shift) - 1)
    midpoint = low_bits == np.uint64(1 << (shift - 1))
    # Below the narrow type's normal range its spacing is fixed: halfway = an odd multiple of
    # half the smallest subnormal.
    small = np.flatnonzero(np.abs(product) < float(info.smallest_normal))
    if small.size:
        halves = product[small] / (float(info.smallest_subnormal) / 2)
        midpoint[small] = np.mod(halves, 2.0) == 1.0
    return midpoint


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


def _round_exact(exact: Fraction, dtype: np.dtype) -> np.generic:
    """The value of *dtype* nearest to *exact*, ties to the one with an even last bit."""
    guess = dtype.type(float(exact))
    info = ml_dtypes.finfo(dtype)
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
