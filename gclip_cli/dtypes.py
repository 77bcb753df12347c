"""Which element types are gradients, and how gclip names them."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# float8_e8m0fnu is an exponent-only scale format (no sign, no mantissa), not a gradient.
_ML_FLOAT_DTYPES = {
    np.dtype(t).name: np.dtype(t)
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
}
_ML_FLOAT_TYPES = frozenset(d.type for d in _ML_FLOAT_DTYPES.values())
# The types raw 1- and 2-byte values (opaque_dtype) may be read as, by name.
OPAQUE_DTYPES: dict[str, np.dtype] = dict(_ML_FLOAT_DTYPES)
_IEEE_FLOAT_KINDS = frozenset({2, 4, 8})  # itemsizes of float16, float32, float64


def is_gradient_dtype(dtype: np.dtype) -> bool:
    """Whether values of *dtype* are scaled and counted (IEEE float16/32/64, bfloat16, float8)."""
    if dtype.type in _ML_FLOAT_TYPES:
        return True
    return dtype.kind == "f" and dtype.itemsize in _IEEE_FLOAT_KINDS


def is_opaque_dtype(dtype: np.dtype) -> bool:
    """Whether *dtype* is raw 1- or 2-byte values of unrecorded type (``|V1``, ``|V2``): how
    ``np.savez`` and h5py store ml_dtypes' bfloat16 and float8 arrays."""
    plain = dtype.kind == "V" and dtype.names is None and dtype.subdtype is None
    return plain and dtype.itemsize in (1, 2)


def describe_dtype(dtype: np.dtype) -> str:
    """A short human name: ``float32``, ``bfloat16``, ``float32 BE`` for big-endian data."""
    return f"{dtype.name} BE" if dtype.str.startswith(">") else dtype.name
