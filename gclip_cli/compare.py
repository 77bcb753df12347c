"""Two dumps side by side: per-tensor L2 norms, their ratio and the cosine of the angle between
the tensors, to verify that a clipping kept each tensor's direction (cosine 1) and by how much
it shrank."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .formats import TensorFile, TensorInfo
from .norms import BLOCK, ExactSum, NormAccumulator, NormStats


@dataclass(frozen=True)
class TensorDiff:
    name: str
    status: str  # "compared", or why not: "only in A", "only in B", "shapes differ", ...
    dtype_a: str | None = None
    dtype_b: str | None = None
    norm_a: float | None = None
    norm_b: float | None = None
    ratio: float | None = None  # norm_b / norm_a
    cosine: float | None = None


@dataclass(frozen=True)
class Diff:
    file_a: str
    file_b: str
    tensors: tuple[TensorDiff, ...]
    global_norm_a: float
    global_norm_b: float
    ratio: float | None
    cosine: float | None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        from .report import SCHEMA_VERSION

        def clean(value: object) -> object:
            return None if isinstance(value, float) and not math.isfinite(value) else value

        data = {k: clean(v) for k, v in asdict(self).items() if k != "tensors"}
        data["tensors"] = [{k: clean(v) for k, v in asdict(t).items()} for t in self.tensors]
        return {"schema_version": SCHEMA_VERSION, **data}


def compare(a: TensorFile, b: TensorFile, chunk_bytes: int) -> Diff:
    """Compare every tensor of *a* with the tensor of the same name in *b*."""
    in_b = {t.name: t for t in b.tensors}
    rows, totals_a, totals_b, dots = [], NormStats(2.0), NormStats(2.0), ExactSum()
    for tensor in a.tensors:
        other = in_b.pop(tensor.name, None)
        problem = _incomparable(tensor, other)
        if problem:
            rows.append(
                TensorDiff(tensor.name, problem, tensor.dtype_name, other and other.dtype_name)
            )
            continue
        stats_a, stats_b, dot = _stream_pair(a, b, tensor, other, chunk_bytes)
        totals_a.merge(stats_a)
        totals_b.merge(stats_b)
        dots.add(dot)
        norm_a, norm_b = stats_a.norm(), stats_b.norm()
        rows.append(
            TensorDiff(
                tensor.name,
                "compared",
                tensor.dtype_name,
                other.dtype_name,
                norm_a,
                norm_b,
                _ratio(norm_b, norm_a),
                _cosine(dot, norm_a, norm_b),
            )
        )
    rows += [TensorDiff(t.name, "only in B", None, t.dtype_name) for t in in_b.values()]
    norm_a, norm_b = totals_a.norm(), totals_b.norm()
    return Diff(
        str(a.path),
        str(b.path),
        tuple(rows),
        norm_a,
        norm_b,
        _ratio(norm_b, norm_a),
        _cosine(dots.value, norm_a, norm_b),
    )


def _incomparable(a: TensorInfo, b: TensorInfo | None) -> str | None:
    if b is None:
        return "only in A"
    if not (a.is_gradient and b.is_gradient):
        return a.skip_reason or b.skip_reason
    if a.shape != b.shape:
        return "shapes differ"
    if a.fortran_order != b.fortran_order:
        return "layouts differ (Fortran and C order)"
    return None


def _stream_pair(
    a: TensorFile, b: TensorFile, ta: TensorInfo, tb: TensorInfo, chunk_bytes: int
) -> tuple[NormStats, NormStats, float]:
    acc_a, acc_b, dot = NormAccumulator(2.0), NormAccumulator(2.0), ExactSum()
    wide_a, wide_b = np.empty(BLOCK), np.empty(BLOCK)
    pairs = _lockstep(a.read_chunks(ta, chunk_bytes), b.read_chunks(tb, chunk_bytes))
    for piece_a, piece_b in pairs:
        acc_a.add(piece_a)
        acc_b.add(piece_b)
        for start in range(0, piece_a.size, BLOCK):
            n = min(BLOCK, piece_a.size - start)
            np.copyto(wide_a[:n], piece_a[start : start + n], casting="unsafe")
            np.copyto(wide_b[:n], piece_b[start : start + n], casting="unsafe")
            np.multiply(wide_a[:n], wide_b[:n], out=wide_a[:n])
            dot.add(float(np.add.reduce(wide_a[:n])))
    return acc_a.finish(), acc_b.finish(), dot.value


def _lockstep(
    chunks_a: Iterable[np.ndarray], chunks_b: Iterable[np.ndarray]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pieces of equal length from two streams of the same number of values.

    A stream's next chunk is asked for only once its current one is used up: readers may
    reuse a chunk's memory for the next one.
    """
    iter_a, iter_b = iter(chunks_a), iter(chunks_b)
    left_a = left_b = np.empty(0)
    while True:
        if not left_a.size:
            left_a = next(iter_a, None)
        if not left_b.size:
            left_b = next(iter_b, None)
        if left_a is None or left_b is None:
            return
        n = min(left_a.size, left_b.size)
        yield left_a[:n], left_b[:n]
        left_a, left_b = left_a[n:], left_b[n:]


def _ratio(b: float, a: float) -> float | None:
    return b / a if a and math.isfinite(a) and math.isfinite(b) else None


def _cosine(dot: float, norm_a: float, norm_b: float) -> float | None:
    if not (norm_a and norm_b) or not all(map(math.isfinite, (dot, norm_a, norm_b))):
        return None
    return max(-1.0, min(1.0, dot / (norm_a * norm_b)))
