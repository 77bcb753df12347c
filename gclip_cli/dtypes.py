"""Which element types are gradients, and how gclip names them."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# float8_e8m0fnu is an exponent-only scale format (no sign, no mantissa), not a gradient.
_ML_FLOAT_TYPES = frozenset(
    np.dtype(t).type
    for t in (
        ml_dtypes.bfloat16,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
        ml_dtypes.float8_e4m3fnuz,
        ml_dtypes.float8_e5m2fnuz,
        ml_dtypes.float8_e4m3b11fnuz,
        ml_dtypes.float8_e4m3,
        ml_dtypes.float8_e3m4,
    )
)
_IEEE_FLOAT_KINDS = frozenset({2, 4, 8})  # itemsizes of float16, float32, float64


def is_gradient_dtype(dtype: np.dtype) -> bool:
    """Whether values of *dtype* are scaled and counted (IEEE float16/32/64, bfloat16, float8)."""
    if dtype.type in _ML_FLOAT_TYPES:
        return True
    return dtype.kind == "f" and dtype.itemsize in _IEEE_FLOAT_KINDS


def describe_dtype(dtype: np.dtype) -> str:
    """A short human name: ``float32``, ``bfloat16``, ``float32 BE`` for big-endian data."""
    return f"{dtype.name} BE" if dtype.str.startswith(">") else dtype.name
