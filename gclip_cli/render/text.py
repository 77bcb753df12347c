"""How numbers and names are written for people, everywhere."""

from __future__ import annotations

import math
import unicodedata

BEYOND_FLOAT64 = "beyond float64's range; the values are finite"


def norm_label(norm_type: float) -> str:
    if math.isinf(norm_type):
        return "inf-norm"
    return f"L{norm_type:g} norm"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def printable(name: str) -> str:
    """*name* with control characters shown as escapes, so it cannot move the cursor or recolour."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch).startswith("C")
        else ch
        for ch in name
    )
