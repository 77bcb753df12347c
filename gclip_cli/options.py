"""How to read and measure: the options every command shares, made once (at the CLI's edge, or
by a Python caller) and passed whole; validated when made."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import numpy as np

    from .norms import NormStats

DEFAULT_CHUNK_SIZE = 64 << 20  # bytes read per chunk


class NonFinite(str, Enum):
    """What to do with NaN and Inf values."""

    ERROR = "error"  # refuse them: commands exit 4, rewriting commands write nothing
    ZERO = "zero"  # count them as 0 in the norm and write 0 in their place
    KEEP = "keep"  # norm of the finite values; write NaN/Inf back exactly as they were


@dataclass(frozen=True)
class Options:
    """How to read and measure the inputs.

    *norm_type*: the p of the p-norm (> 0, or inf); *chunk_size*: bytes read at a time;
    *jobs*: processes for one file, and shards at once with several (None: every core);
    *nonfinite*: what NaN/Inf values count as; *include*/*exclude*: globs on tensor names
    (``.`` and ``/`` alike); *opaque_dtypes*: what raw 2- or 1-byte values are (e.g.
    ``("bfloat16",)``); *file_format*: the inputs' format, instead of detecting it;
    *storage_options*: ``KEY=VALUE`` strings for the file systems of URLs (urls.py), kept
    out of repr() (they may hold secrets).
    """

    norm_type: float = 2.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    jobs: int | None = None
    nonfinite: NonFinite = NonFinite.ERROR
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    opaque_dtypes: tuple[str, ...] = ()
    file_format: str | None = None
    storage_options: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        try:  # the enum from its value too ("error"), as a caller may give it
            object.__setattr__(self, "nonfinite", NonFinite(self.nonfinite))
        except ValueError:
            raise UsageError(
                None, f"nonfinite must be error, zero or keep, not {self.nonfinite!r}"
            ) from None
        # a lone string is one glob (one option)
        for name in ("include", "exclude", "opaque_dtypes", "storage_options"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not (self.norm_type > 0):
            raise UsageError(None, f"norm type must be a number > 0 or inf, not {self.norm_type}")
        if self.chunk_size < 1:
            raise UsageError(None, f"chunk size must be at least 1 byte, not {self.chunk_size}")
        if self.jobs is not None and self.jobs < 1:
            raise UsageError(None, f"jobs must be at least 1, not {self.jobs}")
        opaque_types(self.opaque_dtypes)
        self.storage  # noqa: B018 - refuses a malformed KEY=VALUE now
        if self.file_format is not None:
            from .formats import FORMAT_NAMES

            if self.file_format not in FORMAT_NAMES:
                known = ", ".join(FORMAT_NAMES)
                raise UsageError(None, f"file format {self.file_format!r} is not one of {known}")

    @property
    def opaque(self) -> dict[int, np.dtype]:
        """The types raw values are read as, by item size."""
        return opaque_types(self.opaque_dtypes)

    @property
    def storage(self) -> dict[str, object]:
        """The storage options, as fsspec takes them."""
        from .urls import parse_storage_options

        return parse_storage_options(self.storage_options)

    @property
    def processes(self) -> int:
        """Worker processes for one file."""
        return self.jobs or available_cores()

    def norm(self, stats: NormStats) -> float:
        """The norm that counts: NaN/Inf propagate unless a policy says how to treat them."""
        return stats.norm() if self.nonfinite is NonFinite.ERROR else stats.finite_norm()


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def opaque_types(names: tuple[str, ...]) -> dict[int, np.dtype]:
    """The dtypes *names* give raw values, by item size (one per size)."""
    from .dtypes import OPAQUE_DTYPES

    types: dict[int, np.dtype] = {}
    for name in names:
        if name not in OPAQUE_DTYPES:
            raise UsageError(
                None, f"opaque dtype {name!r} is not one of {', '.join(OPAQUE_DTYPES)}"
            )
        dtype = OPAQUE_DTYPES[name]
        if types.setdefault(dtype.itemsize, dtype) != dtype:
            raise UsageError(None, f"two opaque dtypes of {dtype.itemsize} byte(s) given")
    return types


def require_positive(what: str, value: float) -> None:
    """A threshold is a finite number > 0."""
    if not 0 < value < math.inf:
        raise UsageError(None, f"{what} must be a finite number > 0, not {value}")


def require_eps(eps: float) -> None:
    if not (0 <= eps < math.inf):
        raise UsageError(None, f"eps must be a finite number >= 0, not {eps}")
