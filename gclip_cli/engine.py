"""The format-neutral engine: pass 1 measures norms, the clip factor follows, pass 2 scales."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np

from .formats import TensorFile, TensorInfo
from .norms import BLOCK, NormAccumulator, NormStats


def measure_tensors(
    tfile: TensorFile, norm_type: float, chunk_bytes: int
) -> list[NormStats | None]:
    """Pass 1: NormStats of every gradient tensor of *tfile* (None for skipped tensors)."""
    return [
        _measure_tensor(tfile, tensor, norm_type, chunk_bytes) if tensor.is_gradient else None
        for tensor in tfile.tensors
    ]


def _measure_tensor(
    tfile: TensorFile, tensor: TensorInfo, norm_type: float, chunk_bytes: int
) -> NormStats:
    accumulator = NormAccumulator(norm_type)
    for chunk in tfile.read_chunks(tensor, chunk_bytes):
        accumulator.add(chunk)
    return accumulator.finish()


def combine(stats: list[NormStats | None], norm_type: float) -> NormStats:
    """The statistics of all tensors taken as one vector (exact, so order does not matter)."""
    total = NormStats(norm_type)
    for part in stats:
        if part is not None:
            total.merge(part)
    return total


def clip_factor(global_norm: float, max_norm: float, eps: float = 0.0) -> float:
    """alpha = max_norm / (global_norm + eps) when global_norm > max_norm, else exactly 1.

    The quotient is rounded toward zero, so scaling never makes the norm larger than asked.
    """
    if not global_norm > max_norm:
        return 1.0
    return _round_toward_zero(Fraction(max_norm) / Fraction(global_norm + eps), np.float64)


def _round_toward_zero(exact: Fraction, dtype: type[np.floating]) -> float:
    value = dtype(float(exact))
    while Fraction(float(value)) > exact:
        value = np.nextafter(value, dtype(0))
    return float(value)


class Scaler:
    """The pass-2 transform: multiplies chunks by alpha and measures what it writes.

    Chunks of one tensor must arrive one after another (every writer goes tensor by tensor).
    """

    def __init__(self, alpha: float, norm_type: float) -> None:
        self.alpha64 = alpha
        self.alpha32 = _round_toward_zero(Fraction(alpha), np.float32)
        self.norm_type = norm_type
        self.after: dict[str, NormStats] = {}
        self._current: tuple[str, NormAccumulator] | None = None
        self._wide = np.empty(BLOCK, dtype=np.float64)

    def __call__(self, tensor: TensorInfo, chunk: np.ndarray) -> np.ndarray:
        kind = (chunk.dtype.kind, chunk.dtype.itemsize)
        if kind == ("f", 8):
            np.multiply(chunk, self.alpha64, out=chunk)  # one float64 rounding
        elif kind == ("f", 4):
            np.multiply(chunk, np.float32(self.alpha32), out=chunk)  # one float32 rounding
        else:
            self._scale_narrow(chunk)
        self._accumulator_for(tensor.name).add(chunk)
        return chunk

    def finish(self) -> dict[str, NormStats]:
        """The norms of the values written, per tensor name."""
        if self._current is not None:
            name, accumulator = self._current
            self.after[name] = accumulator.finish()
            self._current = None
        return self.after

    def _accumulator_for(self, name: str) -> NormAccumulator:
        if self._current is None or self._current[0] != name:
            self.finish()
            self._current = (name, NormAccumulator(self.norm_type))
        return self._current[1]

    def _scale_narrow(self, chunk: np.ndarray) -> None:
        """float16/bfloat16/float8: exact float64 product, then one rounding into the dtype.

        At most 11 + 24 significant bits (value times the float32 factor): exact in float64.
        """
        for start in range(0, chunk.size, BLOCK):
            part = chunk[start : start + BLOCK]
            wide = self._wide[: part.size]
            np.copyto(wide, part, casting="unsafe")
            np.multiply(wide, self.alpha32, out=wide)
            if part.dtype == np.float16:  # numpy rounds float64 -> float16 directly
                np.copyto(part, wide, casting="unsafe")
            else:  # ml_dtypes goes through float32: make that step exact-enough by rounding to odd
                np.copyto(part, _round_to_odd_float32(wide), casting="unsafe")


def _round_to_odd_float32(wide: np.ndarray) -> np.ndarray:
    """Round float64 *wide* to float32 with round-to-odd.

    Rounding to odd first and then to nearest into any format with at least two fewer
    significand bits (bfloat16, float8) equals rounding once to nearest: no double rounding.
    """
    narrow = wide.astype(np.float32)
    back = narrow.astype(np.float64)
    inexact = back != wide
    bits = narrow.view(np.uint32)
    bits[inexact & (np.abs(back) > np.abs(wide))] -= 1  # rounded away from zero: truncate instead
    bits[inexact] |= 1
    return narrow


def write_scaled(
    tfile: TensorFile, out: Path, alpha: float, norm_type: float, chunk_bytes: int
) -> list[NormStats | None]:
    """Pass 2: write *tfile* to *out* with every gradient value multiplied by *alpha*.

    Returns the NormStats of the written values per tensor (None for skipped tensors).
    """
    scaler = Scaler(alpha, norm_type)
    tfile.write_transformed(out, scaler, chunk_bytes)
    after = scaler.finish()
    return [
        after.get(tensor.name, NormStats(norm_type)) if tensor.is_gradient else None
        for tensor in tfile.tensors
    ]


def norm_share(part: NormStats, total_norm: float) -> float | None:
    """The tensor's share of the global sum of |x|**p (None when undefined)."""
    p = part.norm_type
    if math.isinf(p) or not math.isfinite(total_norm) or part.nonfinite:
        return None
    if total_norm == 0.0:
        return 0.0
    return (part.finite_norm() / total_norm) ** p
