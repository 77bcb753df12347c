"""The compiled kernels (``_kernels.c``) where the package was built with them.

They compute exactly what the numpy code beside their callers computes, in one pass over memory
instead of several; without a C compiler at install time, numpy does the same work more slowly.
``GCLIP_NUMPY_ONLY=1`` in the environment leaves them out, to compare the two.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def _load() -> ModuleType | None:
    if os.environ.get("GCLIP_NUMPY_ONLY"):
        return None
    try:
        from . import _kernels
    except ImportError:
        return None
    return _kernels


compiled = _load()


def handle(*arrays: np.ndarray) -> bool:
    """Whether the kernels are here and can work on *arrays*: native float32, contiguous (at
    any address)."""
    return compiled is not None and all(
        a.dtype.char == "f" and a.dtype.isnative and a.flags.c_contiguous for a in arrays
    )


def describe() -> str:
    """Which code computes norms and scales float32 values, for --version."""
    return "compiled float32 kernels" if compiled else "numpy only"
