"""The format-neutral engine: pass 1 measures norms, the clip factor follows, pass 2 scales."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import ml_dtypes

from . import parallel
from .formats import (
    Checksummed,
    FinishesOutput,
    SelfMeasuring,
    TensorFile,
    TensorInfo,
    WritesInOrder,
)
from .norms import NormAccumulator, NormStats, p_norm_of
from .output import is_stream
from .progress import MEASURING, SILENT, WRITING, Progress
from .rewriters import Rewriter, counted
from .rounding import ScaleFactor


def measure_tensors(
    tfile: TensorFile,
    norm_type: float,
    chunk_size: int,
    jobs: int = 1,
    progress: Progress = SILENT,
) -> list[NormStats | None]:
    """Pass 1: NormStats of every gradient tensor of *tfile* (None for skipped tensors), the
    plain stored ones by *jobs* worker processes when that pays; told to *progress*."""
    progress.begin(MEASURING, gradient_bytes(tfile.tensors))
    pieces = parallel.measurable_pieces(tfile, jobs)
    measured, crcs = parallel.measure_pieces(
        tfile.path, pieces, norm_type, chunk_size, jobs, progress
    )
    if isinstance(tfile, Checksummed):
        tfile.verify_checksums(crcs)
    # asked once per file: isinstance() on a runtime-checkable protocol costs about 50 us, as
    # much as measuring a small tensor (60,000 tensors: 2.9 s of 9.2)
    itself = tfile if isinstance(tfile, SelfMeasuring) else None
    return [
        None
        if not t.is_gradient
        else measured[t.name]
        if t.name in measured
        else _measure_tensor(tfile, itself, t, norm_type, chunk_size, progress)
        for t in tfile.tensors
    ]


def gradient_bytes(tensors: Sequence[TensorInfo]) -> int:
    """The bytes of values each pass reads or writes: those of the gradient tensors."""
    return sum(t.numel * t.dtype.itemsize for t in tensors if t.is_gradient)


def _measure_tensor(
    tfile: TensorFile,
    itself: SelfMeasuring | None,
    tensor: TensorInfo,
    norm_type: float,
    chunk_size: int,
    progress: Progress,
) -> NormStats:
    """*tensor*'s statistics, from *itself* (the file, when it can measure some tensors
    without reading each value) or from its values."""
    if itself is not None:
        stats = itself.measure_tensor(tensor, norm_type, chunk_size, progress)
        if stats is not None:
            return stats
    accumulator = NormAccumulator.for_tensor(tensor, norm_type)
    for chunk in tfile.read_chunks(tensor, chunk_size):
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


# The computed norms themselves are accurate to a few float64 rounding units (for p < 1, that
# many divided by p: a p-th root magnifies the sum's rounding): allow for that.
_NORM_SLACK = 2.0**-48
# Below this p, a norm of two non-zero float64 values exceeds float64's range: the finite norms
# are single values, which are exact (norms.NormStats._single_value).
_SMALLEST_FINITE_P = 2.0**-12
# Beyond this p * log(1 + u), the weighted power mean of (1 + u_i) is taken as its largest term
# (it tends to it, and it bounds it): exp() of it would overflow.
_POWER_MEAN_LIMIT = 700.0


@dataclass(frozen=True)
class RoundingBound:
    """How far above max_norm rounding alone can leave the norm of correctly clipped values.

    Rounding v * alpha to nearest in v's dtype moves it by at most u * |v * alpha| (u: the
    dtype's unit roundoff) or, below the normal range, by half the smallest subnormal.  The two
    add up as norms do (Minkowski) for p >= 1; for p < 1, where the triangle inequality fails,
    their p-th powers add up instead.
    """

    relative: float = 0.0
    absolute: float = 0.0
    norm_type: float = 2.0

    def limit(self, max_norm: float) -> float:
        rounded = max_norm * (1.0 + self.relative)
        if self.norm_type >= 1:
            return rounded + self.absolute
        return p_norm_of([(1, rounded), (1, self.absolute)], self.norm_type)


def clip_factor(
    global_norm: float | Fraction,
    max_norm: float,
    eps: float = 0.0,
    bound: RoundingBound = RoundingBound(),
) -> ScaleFactor:
    """q = max_norm / (global_norm + eps), exactly, when the norm exceeds max_norm, else 1.

    *global_norm* may be a fraction: a norm beyond float64's range (see dividing_norm).  A norm
    above max_norm by no more than *bound* counts as within it: values rounded to their dtype
    can get no closer, and clipping such a file again would only re-round it.
    """
    if not global_norm > bound.limit(max_norm):
        return ScaleFactor.of(1.0)
    return ScaleFactor(Fraction(max_norm) / (Fraction(global_norm) + Fraction(eps)))


def dividing_norm(total: NormStats, norm: float) -> float | Fraction | None:
    """*norm* (of *total*) as a clip factor divides by it: itself, or its exact value where it
    is inf only because it exceeds float64's range; None where NaN/Inf values made it NaN/inf."""
    if math.isfinite(norm):
        return norm
    if math.isinf(norm) and math.isinf(total.finite_norm()):
        return total.finite_norm_exact()
    return None


def rounding_bound(
    tensors: Sequence[TensorInfo], stats: Sequence[NormStats | None], total: NormStats
) -> RoundingBound:
    """The RoundingBound for clipping these tensors.

    Relative part: the power mean of (1 + u_i), weighted by each tensor's share of the norm,
    minus one.  Absolute part: the p-norm of half a subnormal step for every value.
    """
    p = total.norm_type
    counted = [
        (ml_dtypes.finfo(tensor.dtype), part)
        for tensor, part in zip(tensors, stats, strict=True)
        if part is not None and part.max_abs > 0.0
    ]
    roundoffs = [(float(info.eps) / 2, part) for info, part in counted]
    steps = [(part.numel, float(info.smallest_subnormal) / 2) for info, part in counted]
    slack = _NORM_SLACK / max(min(p, 1.0), _SMALLEST_FINITE_P)
    return RoundingBound(_power_mean_roundoff(roundoffs, total) + slack, p_norm_of(steps, p), p)


def _power_mean_roundoff(roundoffs: list[tuple[float, NormStats]], total: NormStats) -> float:
    """(sum of share_i * (1 + u_i)**p) ** (1/p) - 1, share_i: each tensor's share of the sum
    of |x|**p; where p is inf, or so large that the powers overflow, the largest u_i of a
    share above 0 (which the mean tends to, and which bounds it)."""
    p = total.norm_type
    if math.isinf(p):
        return max((u for u, _ in roundoffs), default=0.0)
    weighted = [(part.power_sum_ratio(total), u) for u, part in roundoffs]
    worst = max((u for share, u in weighted if share > 0.0), default=0.0)
    if p * math.log1p(worst) > _POWER_MEAN_LIMIT:
        return worst
    mean = math.fsum(share * math.expm1(p * math.log1p(u)) for share, u in weighted)
    return math.expm1(math.log1p(mean) / p)


def rewrite(
    tfile: TensorFile,
    out: Path,
    rewriter: Rewriter,
    chunk_size: int,
    jobs: int = 1,
    progress: Progress = SILENT,
) -> list[NormStats | None]:
    """Pass 2: write *tfile* to *out*, every gradient chunk passed through *rewriter*; the
    plain stored tensors by *jobs* worker processes when that pays; told to *progress*.

    Returns the NormStats of the written values per tensor (None for skipped tensors).

    *out* may be a stream (the pipe of an upload): written front to back by one process if
    the file can write so, else into a temporary file first, then copied into it.
    """
    if is_stream(out):
        return _rewrite_in_order(tfile, out, rewriter, chunk_size, progress)
    progress.begin(WRITING, gradient_bytes(tfile.tensors))
    spans = parallel.parallel_spans(tfile, jobs)
    pieces = parallel.encodable_pieces(tfile, jobs)
    leave = {s.tensor.name for s in spans} | {p.tensor.name for p in pieces}
    tfile.write_transformed(out, counted(rewriter, progress), chunk_size, leave=leave)
    rewriter.finish()
    crcs = (
        parallel.rewrite_spans(tfile.path, out, spans, rewriter, chunk_size, jobs, progress)
        if spans
        else {}
    )
    if pieces:
        parallel.encode_pieces(tfile.path, out, pieces, rewriter, jobs, progress)
    if isinstance(tfile, FinishesOutput):
        tfile.finish_output(out, crcs)
    return _written_stats(tfile, rewriter)


def _written_stats(tfile: TensorFile, rewriter: Rewriter) -> list[NormStats | None]:
    """The NormStats of the values *rewriter* wrote, per tensor (None for skipped ones)."""
    after = rewriter.finish()
    return [
        after.get(tensor.name, NormStats(rewriter.norm_type)) if tensor.is_gradient else None
        for tensor in tfile.tensors
    ]


def _rewrite_in_order(
    tfile: TensorFile, out: Path, rewriter: Rewriter, chunk_size: int, progress: Progress
) -> list[NormStats | None]:
    """Pass 2 into the stream *out*, front to back by this process where the file can write
    so, else into a temporary file first, then copied into it."""
    if not (isinstance(tfile, WritesInOrder) and tfile.writes_in_order()):
        from .streams import staged_into

        with staged_into(out, tfile.path.stat().st_size, progress) as staged:
            return rewrite(tfile, staged, rewriter, chunk_size, 1, progress)
    progress.begin(WRITING, gradient_bytes(tfile.tensors))
    tfile.write_in_order(out, counted(rewriter, progress), rewriter.blank(), chunk_size)
    return _written_stats(tfile, rewriter)


def norm_share(part: NormStats, total: NormStats) -> float | None:
    """The tensor's finite values' share of the global sum of |x|**p (None for p = inf), from
    the sums themselves: no norm's rounding, overflow or p-th power on the way."""
    if math.isinf(part.norm_type):
        return None
    return part.power_sum_ratio(total)
