"""The format-neutral engine: pass 1 measures norms, the clip factor follows, pass 2 scales."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np

from . import parallel, progress
from .formats import TensorFile, TensorInfo
from .formats.base import SelfMeasuring
from .norms import NormAccumulator, NormStats
from .rounding import ScaleFactor, ScratchBuffers, scale


def measure_tensors(
    tfile: TensorFile, norm_type: float, chunk_bytes: int, jobs: int = 1
) -> list[NormStats | None]:
    """Pass 1: NormStats of every gradient tensor of *tfile* (None for skipped tensors), the
    plain stored ones by *jobs* worker processes when that pays."""
    progress.begin(progress.MEASURING, gradient_bytes(tfile.tensors))
    pieces = parallel.measurable_pieces(tfile, jobs)
    measured, crcs = parallel.measure_pieces(tfile.path, pieces, norm_type, chunk_bytes, jobs)
    tfile.verify_checksums(crcs)
    return [
        None
        if not t.is_gradient
        else measured[t.name]
        if t.name in measured
        else _measure_tensor(tfile, t, norm_type, chunk_bytes)
        for t in tfile.tensors
    ]


def gradient_bytes(tensors: Sequence[TensorInfo]) -> int:
    """The bytes of values each pass reads or writes: those of the gradient tensors."""
    return sum(t.numel * t.dtype.itemsize for t in tensors if t.is_gradient)


def _measure_tensor(
    tfile: TensorFile, tensor: TensorInfo, norm_type: float, chunk_bytes: int
) -> NormStats:
    if isinstance(tfile, SelfMeasuring):
        stats = tfile.measure_tensor(tensor, norm_type, chunk_bytes)
        if stats is not None:
            return stats
    accumulator = NormAccumulator(norm_type)
    for chunk in tfile.read_chunks(tensor, chunk_bytes):
        accumulator.add(chunk)
        progress.advance(chunk.nbytes)
    return accumulator.finish()


def combine(stats: list[NormStats | None], norm_type: float) -> NormStats:
    """The statistics of all tensors taken as one vector (exact, so order does not matter)."""
    total = NormStats(norm_type)
    for part in stats:
        if part is not None:
            total.merge(part)
    return total


# The computed norms themselves are accurate to a few float64 rounding units: allow for that.
_NORM_SLACK = 2.0**-48


@dataclass(frozen=True)
class RoundingBound:
    """How far above max_norm rounding alone can leave the norm of correctly clipped values.

    Rounding v * alpha to nearest in v's dtype moves it by at most u * |v * alpha| (u: the
    dtype's unit roundoff) or, below the normal range, by half the smallest subnormal.
    """

    relative: float = 0.0
    absolute: float = 0.0

    def limit(self, max_norm: float) -> float:
        return max_norm * (1.0 + self.relative) + self.absolute


def clip_factor(
    global_norm: float, max_norm: float, eps: float = 0.0, bound: RoundingBound = RoundingBound()
) -> ScaleFactor:
    """q = max_norm / (global_norm + eps), exactly, when the norm exceeds max_norm, else 1.

    A norm above max_norm by no more than *bound* counts as within it: values rounded to their
    dtype can get no closer, and clipping such a file again would only re-round it.
    """
    if not global_norm > bound.limit(max_norm):
        return ScaleFactor.of(1.0)
    return ScaleFactor(Fraction(max_norm) / (Fraction(global_norm) + Fraction(eps)))


def rounding_bound(
    tensors: Sequence[TensorInfo], stats: Sequence[NormStats | None], total: NormStats
) -> RoundingBound:
    """The RoundingBound for clipping these tensors.

    Relative part: the power mean of (1 + u_i), weighted by each tensor's share of the norm,
    minus one.  Absolute part: the p-norm of half a subnormal step for every value.
    """
    p, global_norm = total.norm_type, total.finite_norm()
    weighted, worst, steps = 0.0, 0.0, []
    for tensor, part in zip(tensors, stats, strict=True):
        if part is None or part.finite_norm() == 0.0:
            continue
        info = ml_dtypes.finfo(tensor.dtype)
        u = float(info.eps) / 2
        worst = max(worst, u)
        steps.append((part.numel, float(info.smallest_subnormal) / 2))
        if not math.isinf(p):
            share = (part.finite_norm() / global_norm) ** p
            weighted += share * math.expm1(p * math.log1p(u))
    if math.isinf(p):
        relative = worst
        absolute = max((step for _, step in steps), default=0.0)
    else:
        relative = math.expm1(math.log1p(weighted) / p)
        absolute = _p_norm_of_steps(steps, p)
    return RoundingBound(relative + _NORM_SLACK, absolute)


def _p_norm_of_steps(steps: list[tuple[int, float]], p: float) -> float:
    """(sum of count * step**p) ** (1/p), scaled by the largest step so nothing underflows."""
    top = max((step for _, step in steps), default=0.0)
    if top == 0.0:  # float64's half step, 2**-1075, is 0 in float64 itself
        return 0.0
    return top * math.fsum(count * (step / top) ** p for count, step in steps) ** (1.0 / p)


class NonFinite(str, Enum):
    """What to do with NaN and Inf values."""

    ERROR = "error"  # refuse the file
    ZERO = "zero"  # count them as 0 in the norm and write 0 in their place
    KEEP = "keep"  # norm of the finite values; write NaN/Inf back exactly as they were


class Rewriter:
    """A pass-2 transform that measures what it writes, tensor by tensor.

    Chunks of one tensor must arrive one after another (every writer goes tensor by tensor).
    """

    def __init__(self, norm_type: float) -> None:
        self.norm_type = norm_type
        self.after: dict[str, NormStats] = {}
        self._current: tuple[str, NormAccumulator] | None = None

    def __call__(self, tensor: TensorInfo, src: np.ndarray, dst: np.ndarray) -> None:
        self.rewrite(tensor, src, dst)
        self._accumulator_for(tensor.name).add(dst)
        progress.advance(dst.nbytes)

    def rewrite(self, tensor: TensorInfo, src: np.ndarray, dst: np.ndarray) -> None:
        raise NotImplementedError

    def blank(self) -> Rewriter:
        """A rewriter like this one that has written nothing yet."""
        fresh = copy.copy(self)
        fresh.after, fresh._current = {}, None
        return fresh

    def merge(self, other: Rewriter) -> None:
        """Take in what *other* (a blank() copy that worked elsewhere) wrote."""
        for name, stats in other.finish().items():
            self.after.setdefault(name, NormStats(self.norm_type)).merge(stats)

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


class Scaler(Rewriter):
    """Multiplies each tensor by its factor, rounding once (see rounding.py).

    *with_nonfinite* names the tensors holding NaN/Inf, treated as *policy* says.
    """

    def __init__(
        self,
        factors: Mapping[str, ScaleFactor],
        norm_type: float,
        policy: NonFinite = NonFinite.ERROR,
        with_nonfinite: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(norm_type)
        self.factors = factors
        self.policy = policy
        self.with_nonfinite = with_nonfinite
        self._scratch = ScratchBuffers()

    def rewrite(self, tensor: TensorInfo, src: np.ndarray, dst: np.ndarray) -> None:
        factor = self.factors[tensor.name]
        if tensor.name in self.with_nonfinite:
            self._scale_around_nonfinite(src, dst, factor)
        else:
            scale(src, dst, factor, self._scratch)

    def _scale_around_nonfinite(
        self, src: np.ndarray, dst: np.ndarray, factor: ScaleFactor
    ) -> None:
        bad = ~np.isfinite(src)
        if self.policy is NonFinite.ZERO:
            np.copyto(dst, src)
            dst[bad] = 0
            scale(dst, dst, factor, self._scratch)
            return
        kept = src[bad]  # copied first: src and dst may be the same array
        with np.errstate(invalid="ignore", over="ignore"):
            scale(src, dst, factor, self._scratch)
        dst[bad] = kept  # exactly the original bits


class Clamper(Rewriter):
    """Clips every value to [-V, V], V rounded toward zero into each tensor's dtype, and counts
    the values it changed.  NaN/Inf: 0 with policy ZERO, untouched with KEEP."""

    def __init__(
        self, max_value: float, norm_type: float, policy: NonFinite = NonFinite.ERROR
    ) -> None:
        super().__init__(norm_type)
        self.max_value = max_value
        self.policy = policy
        self.clamped: dict[str, int] = {}

    def blank(self) -> Clamper:
        fresh = super().blank()
        fresh.clamped = {}
        return fresh

    def merge(self, other: Rewriter) -> None:
        super().merge(other)
        for name, count in other.clamped.items():
            self.clamped[name] = self.clamped.get(name, 0) + count

    def rewrite(self, tensor: TensorInfo, src: np.ndarray, dst: np.ndarray) -> None:
        bound = self.bound(src.dtype)
        finite = np.isfinite(src)
        changed = int(np.count_nonzero((np.abs(src) > bound) & finite))
        kept = src[~finite]  # copied first: src and dst may be the same array
        np.clip(src, -bound, bound, out=dst)
        dst[~finite] = 0 if self.policy is NonFinite.ZERO else kept
        self.clamped[tensor.name] = self.clamped.get(tensor.name, 0) + changed

    def bound(self, dtype: np.dtype) -> np.generic:
        """The largest value of *dtype* not above max_value."""
        value = dtype.type(self.max_value)
        if float(value) > self.max_value:
            value = np.nextafter(value, dtype.type(0))
        return value


def rewrite(
    tfile: TensorFile, out: Path, rewriter: Rewriter, chunk_bytes: int, jobs: int = 1
) -> list[NormStats | None]:
    """Pass 2: write *tfile* to *out*, every gradient chunk passed through *rewriter*; the
    plain stored tensors by *jobs* worker processes when that pays.

    Returns the NormStats of the written values per tensor (None for skipped tensors).
    """
    progress.begin(progress.WRITING, gradient_bytes(tfile.tensors))
    spans = parallel.parallel_spans(tfile, jobs)
    pieces = parallel.encodable_pieces(tfile, jobs)
    leave = {s.tensor.name for s in spans} | {p.tensor.name for p in pieces}
    tfile.write_transformed(out, rewriter, chunk_bytes, leave=leave)
    rewriter.finish()
    crcs = (
        parallel.rewrite_spans(tfile.path, out, spans, rewriter, chunk_bytes, jobs) if spans else {}
    )
    if pieces:
        parallel.encode_pieces(tfile.path, out, pieces, rewriter, jobs)
    tfile.finish_output(out, crcs)
    after = rewriter.after
    return [
        after.get(tensor.name, NormStats(rewriter.norm_type)) if tensor.is_gradient else None
        for tensor in tfile.tensors
    ]


def norm_share(part: NormStats, total_norm: float) -> float | None:
    """The tensor's finite values' share of the global sum of |x|**p (None when undefined)."""
    p = part.norm_type
    if math.isinf(p) or not math.isfinite(total_norm):
        return None
    if total_norm == 0.0:
        return 0.0
    return (part.finite_norm() / total_norm) ** p
