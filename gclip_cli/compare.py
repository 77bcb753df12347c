"""Two dumps side by side: whether they hold the same tensors with the same values, each file's
own global norm, and per tensor the L2 norms, their ratio and the cosine of the angle between
them, to verify that a clipping kept each tensor's direction (cosine 1) and by how much it
shrank.

Tensors are paired by name, ``.`` and ``/`` alike (an HDF5 path and a safetensors key).
Floating-point values are compared as numbers (-0.0 and 0.0 alike, a float32 and a float64 of
the same number alike, but their dtypes differ); NaN/Inf as the policy says: "zero" compares
them as 0, otherwise a NaN matches a NaN and an Inf the Inf of the same sign.  Other tensors
(integers, booleans) are compared by their bytes when each fits in one chunk, else listed as
not compared.  A Tolerance (rtol, atol) lets finite values differ as numpy.allclose does, B
being the reference: a value a of A matches b of B when |a - b| <= atol + rtol * |b|,
computed in float64 on the values widened exactly (the default, 0 and 0, is equality).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import UsageError
from .formats import TensorFile, TensorInfo, WholeArrays, detect_format
from .norms import BLOCK, ExactSum, NormAccumulator, NormStats
from .options import NonFinite, Options
from .progress import SILENT, Progress
from .selection import matches, name_key

SAME, DIFFERS, ONLY_A, ONLY_B, NOT_COMPARED = (
    "same",
    "differs",
    "only in A",
    "only in B",
    "not compared",
)
_PLAIN_NUMBERS = "biufc"  # numpy kinds compared by their bytes: bool, integers, floats, complex


@dataclass(frozen=True)
class Tolerance:
    """How far finite values may differ and still match: |a - b| <= atol + rtol * |b|."""

    rtol: float = 0.0
    atol: float = 0.0

    def __post_init__(self) -> None:
        for name, value in (("rtol", self.rtol), ("atol", self.atol)):
            if not 0 <= value < math.inf:
                raise UsageError(None, f"--{name} must be a finite number >= 0, not {value}")

    @property
    def exact(self) -> bool:
        return self.rtol == 0 and self.atol == 0

    def mismatched(self, a: np.ndarray, b: np.ndarray) -> int:
        """How many of the finite float64 values *a* do not match *b*'s (as numpy.isclose
        computes it for float64 arrays)."""
        if self.exact:
            return int(np.count_nonzero(a != b))
        with np.errstate(over="ignore"):  # a difference beyond float64's range: inf, differs
            apart = np.abs(a - b)
            return int(np.count_nonzero(~(apart <= self.atol + self.rtol * np.abs(b))))


EXACT = Tolerance()


@dataclass(frozen=True)
class TensorDiff:
    name: str
    status: str  # SAME, DIFFERS, ONLY_A, ONLY_B or NOT_COMPARED
    note: str | None = None  # how it differs, or why it was not compared
    dtype_a: str | None = None
    dtype_b: str | None = None
    norm_a: float | None = None
    norm_b: float | None = None
    ratio: float | None = None  # norm_b / norm_a
    cosine: float | None = None
    values_differ: int | None = None  # floating-point values compared that differ
    name_b: str | None = None  # B's name, when it is spelled otherwise ('/' for '.')


@dataclass(frozen=True)
class Diff:
    file_a: str
    file_b: str
    tensors: tuple[TensorDiff, ...]
    global_norm_a: float  # over every tensor of A counted (shared or not)
    global_norm_b: float
    shared_norm_a: float  # over the floating-point tensors of both compared as numbers
    shared_norm_b: float
    ratio: float | None  # shared_norm_b / shared_norm_a
    cosine: float | None  # over the shared tensors, as one vector
    nonfinite_a: int = 0  # NaN/Inf values among those counted
    nonfinite_b: int = 0
    nonfinite_policy: NonFinite = NonFinite.ERROR
    rtol: float = 0.0  # the tolerance finite values were compared with (0 and 0: equality)
    atol: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        statuses = [t.status for t in self.tensors]
        return {
            "compared": statuses.count(SAME) + statuses.count(DIFFERS),
            "same": statuses.count(SAME),
            "differ": statuses.count(DIFFERS),
            "only_in_a": statuses.count(ONLY_A),
            "only_in_b": statuses.count(ONLY_B),
            "not_compared": statuses.count(NOT_COMPARED),
            # of those compared, the floating-point ones (the shared norms and cosine)
            "shared": sum(t.values_differ is not None for t in self.tensors),
        }

    @property
    def same(self) -> bool:
        """Whether the files hold the same tensors with the same values (of those compared)."""
        return all(t.status in (SAME, NOT_COMPARED) for t in self.tensors)

    @property
    def nonfinite(self) -> int:
        return self.nonfinite_a + self.nonfinite_b

    def shown_as(self, names: Mapping[str, str]) -> Diff:
        """This diff with the files in *names* shown by those names (``<stdin>``)."""
        a, b = self.file_a, self.file_b
        return replace(self, file_a=names.get(a, a), file_b=names.get(b, b))

    def to_dict(self, view: object = None) -> dict:
        """The comparison as one JSON-ready object (*view*: none applies to it)."""
        from .reports import SCHEMA_VERSION

        data = {k: _clean(v) for k, v in asdict(self).items() if k != "tensors"}
        data["nonfinite_policy"] = NonFinite(self.nonfinite_policy).value
        data["same"] = self.same
        data["counts"] = self.counts
        data["tensors"] = self.rows()[1]
        return {"schema_version": SCHEMA_VERSION, **data}

    def rows(self, view: object = None) -> tuple[str, list[dict]]:
        """One row per tensor, for JSON Lines and CSV."""
        return "tensor", [{k: _clean(v) for k, v in asdict(t).items()} for t in self.tensors]


def _clean(value: object) -> object:
    """JSON has no NaN or infinity."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class _Totals:
    """What the tensors add up to, as they are compared."""

    own_a: NormStats = field(default_factory=lambda: NormStats(2.0))
    own_b: NormStats = field(default_factory=lambda: NormStats(2.0))
    shared_a: NormStats = field(default_factory=lambda: NormStats(2.0))
    shared_b: NormStats = field(default_factory=lambda: NormStats(2.0))
    dot: ExactSum = field(default_factory=ExactSum)


@dataclass(frozen=True)
class _Streamed:
    """Two tensors of one shape read side by side."""

    stats_a: NormStats
    stats_b: NormStats
    dot: float  # over the values counted (NaN/Inf as 0)
    differing: int  # values that differ


def diff(path_a: Path, path_b: Path, options: Options, tolerance: Tolerance = EXACT) -> Diff:
    """Compare the files *path_a* and *path_b* (api.diff_files), both opened in one child."""
    from .pipeline import in_child

    format_b = options.file_format or detect_format(path_b)
    return in_child(path_a, options, SILENT, _diff, path_b, format_b, tolerance)


def _diff(
    file_a: TensorFile,
    options: Options,
    progress: Progress,
    b: Path,
    format_b: str,
    tolerance: Tolerance,
) -> Diff:
    """A opened (by in_child), then B beside it."""
    del progress  # comparing reports none
    from .pipeline import opened

    with opened(b, format_b, options) as file_b:
        return compare(
            file_a,
            file_b,
            options.chunk_size,
            options.nonfinite,
            options.include,
            options.exclude,
            tolerance,
        )


def compare(
    a: TensorFile,
    b: TensorFile,
    chunk_size: int,
    nonfinite: NonFinite = NonFinite.ERROR,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    tolerance: Tolerance = EXACT,
) -> Diff:
    """Compare every tensor of *a* with the tensor of the same name in *b*.

    *nonfinite* says how NaN/Inf values compare and count: with ERROR the norms that hold them
    are NaN/inf.  Tensors *include*/*exclude* leave out are
    not compared.  Finite values match within *tolerance*.
    """
    totals, rows = _Totals(), []
    for ta, tb in pair_by_name(a.tensors, b.tensors):
        left_out = _left_out((ta or tb).name, include, exclude)
        if left_out:
            rows.append(_row((ta, tb), NOT_COMPARED, left_out))
        elif ta is None or tb is None:
            rows.append(_one_side(a, b, ta, tb, chunk_size, totals, nonfinite))
        else:
            rows.append(_pair(a, b, (ta, tb), chunk_size, totals, nonfinite, tolerance))
    shared_a = _norm(totals.shared_a, nonfinite)
    shared_b = _norm(totals.shared_b, nonfinite)
    return Diff(
        str(a.path),
        str(b.path),
        tuple(rows),
        _norm(totals.own_a, nonfinite),
        _norm(totals.own_b, nonfinite),
        shared_a,
        shared_b,
        _ratio(shared_b, shared_a),
        _cosine(totals.dot.value, shared_a, shared_b),
        totals.own_a.nonfinite,
        totals.own_b.nonfinite,
        nonfinite,
        tolerance.rtol,
        tolerance.atol,
    )


def pair_by_name(
    tensors_a: Sequence[TensorInfo], tensors_b: Sequence[TensorInfo]
) -> list[tuple[TensorInfo | None, TensorInfo | None]]:
    """(A's, B's) for each name, in A's order, then those only in B: names that are equal
    first, then those equal with ``/`` read as ``.``."""
    names_a = {t.name for t in tensors_a}
    by_name = {t.name: t for t in tensors_b}
    by_key: dict[str, list[TensorInfo]] = {}
    for tb in tensors_b:
        if tb.name not in names_a:
            by_key.setdefault(name_key(tb.name), []).append(tb)
    pairs: list[tuple[TensorInfo | None, TensorInfo | None]] = []
    for ta in tensors_a:
        if ta.name in by_name:
            pairs.append((ta, by_name[ta.name]))
        else:
            alike = by_key.get(name_key(ta.name))
            pairs.append((ta, alike.pop(0) if alike else None))
    paired = {tb.name for _, tb in pairs if tb is not None}
    return pairs + [(None, tb) for tb in tensors_b if tb.name not in paired]


def _left_out(name: str, include: Sequence[str], exclude: Sequence[str]) -> str | None:
    """Why --include/--exclude leave the tensor *name* out, if they do (for tensors of every
    type: selection.select marks only the gradients)."""
    if include and not any(matches(name, glob) for glob in include):
        return "not matched by --include"
    matched = next((glob for glob in exclude if matches(name, glob)), None)
    return None if matched is None else f"excluded by --exclude {matched}"


def _row(
    pair: tuple[TensorInfo | None, TensorInfo | None], status: str, note: str | None, **numbers
) -> TensorDiff:
    ta, tb = pair
    name_b = tb.name if tb is not None and ta is not None and tb.name != ta.name else None
    return TensorDiff(
        (ta or tb).name,
        status,
        note,
        ta and ta.dtype_name,
        tb and tb.dtype_name,
        name_b=name_b,
        **numbers,
    )


def _one_side(
    a: TensorFile,
    b: TensorFile,
    ta: TensorInfo | None,
    tb: TensorInfo | None,
    chunk_size: int,
    totals: _Totals,
    nonfinite: NonFinite,
) -> TensorDiff:
    if ta is not None:
        stats = _measure_alone(a, ta, chunk_size, totals.own_a)
        return _row((ta, None), ONLY_A, None, norm_a=_norm_or_none(stats, nonfinite))
    stats = _measure_alone(b, tb, chunk_size, totals.own_b)
    return _row((None, tb), ONLY_B, None, norm_b=_norm_or_none(stats, nonfinite))


def _pair(
    a: TensorFile,
    b: TensorFile,
    pair: tuple[TensorInfo, TensorInfo],
    chunk_size: int,
    totals: _Totals,
    nonfinite: NonFinite,
    tolerance: Tolerance,
) -> TensorDiff:
    ta, tb = pair
    mismatch = _mismatch(ta, tb)
    if mismatch:  # each still counts in its file's own norm
        stats_a = _measure_alone(a, ta, chunk_size, totals.own_a)
        stats_b = _measure_alone(b, tb, chunk_size, totals.own_b)
        norm_a, norm_b = _norm_or_none(stats_a, nonfinite), _norm_or_none(stats_b, nonfinite)
        return _row((ta, tb), DIFFERS, mismatch, norm_a=norm_a, norm_b=norm_b)
    if not ta.is_gradient:
        return _compare_bytes(a, b, ta, tb, chunk_size)
    streamed = _stream_pair(a, b, pair, chunk_size, nonfinite is NonFinite.ZERO, tolerance)
    for own, shared, stats in (
        (totals.own_a, totals.shared_a, streamed.stats_a),
        (totals.own_b, totals.shared_b, streamed.stats_b),
    ):
        own.merge(stats)
        shared.merge(stats)
    totals.dot.add(streamed.dot)
    norm_a, norm_b = _norm(streamed.stats_a, nonfinite), _norm(streamed.stats_b, nonfinite)
    if _type_of(ta) != _type_of(tb):
        status, note = DIFFERS, f"dtypes differ ({ta.dtype_name}, {tb.dtype_name})"
    elif streamed.differing:
        beyond = "" if tolerance.exact else " beyond the tolerance"
        status, note = DIFFERS, f"{streamed.differing:,} values differ{beyond}"
    else:
        status, note = SAME, None
    return _row(
        (ta, tb),
        status,
        note,
        norm_a=norm_a,
        norm_b=norm_b,
        ratio=_ratio(norm_b, norm_a),
        cosine=_cosine(streamed.dot, norm_a, norm_b),
        values_differ=streamed.differing,
    )


def _mismatch(a: TensorInfo, b: TensorInfo) -> str | None:
    """How two tensors of one name differ before any value is read."""
    if a.shape != b.shape:
        return f"shapes differ ({_shape(a)}, {_shape(b)})"
    if a.fortran_order != b.fortran_order:
        return "layouts differ (Fortran and C order)"
    if a.is_gradient != b.is_gradient:
        return f"dtypes differ ({a.dtype_name}, {b.dtype_name})"
    return None


def _shape(tensor: TensorInfo) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def _type_of(tensor: TensorInfo) -> str:
    """The element type, whatever the byte order: both hold the same values."""
    return tensor.dtype_name.removesuffix(" BE")


def _compare_bytes(
    a: TensorFile, b: TensorFile, ta: TensorInfo, tb: TensorInfo, chunk_size: int
) -> TensorDiff:
    """Two tensors of a type gclip does not stream (integers, booleans), read whole when each
    fits in one chunk."""
    if _type_of(ta) != _type_of(tb):
        return _row((ta, tb), DIFFERS, f"dtypes differ ({ta.dtype_name}, {tb.dtype_name})")
    if max(ta.nbytes, tb.nbytes) > chunk_size:
        return _row((ta, tb), NOT_COMPARED, f"{ta.dtype_name}: larger than --chunk-size")
    if not (isinstance(a, WholeArrays) and isinstance(b, WholeArrays)):
        return _row((ta, tb), NOT_COMPARED, f"{ta.dtype_name}: its format reads no whole arrays")
    values_a, values_b = a.read_array(ta), b.read_array(tb)
    kinds = {v.dtype.kind if v is not None else "" for v in (values_a, values_b)}
    if not kinds <= set(_PLAIN_NUMBERS):
        return _row((ta, tb), NOT_COMPARED, f"{ta.dtype_name}: not plain numbers")
    if _native_bytes(values_a) == _native_bytes(values_b):
        return _row((ta, tb), SAME, None)
    return _row((ta, tb), DIFFERS, f"{ta.dtype_name} values differ")


def _native_bytes(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("=")).tobytes()


def _measure_alone(
    tfile: TensorFile, tensor: TensorInfo, chunk_size: int, total: NormStats
) -> NormStats | None:
    """The statistics of a gradient *tensor* (None for others), added to *total*."""
    if not tensor.is_gradient:
        return None
    accumulator = NormAccumulator(2.0)
    for chunk in tfile.read_chunks(tensor, chunk_size):
        accumulator.add(chunk)
    stats = accumulator.finish()
    total.merge(stats)
    return stats


def _stream_pair(
    a: TensorFile,
    b: TensorFile,
    pair: tuple[TensorInfo, TensorInfo],
    chunk_size: int,
    zero_nonfinite: bool,
    tolerance: Tolerance,
) -> _Streamed:
    ta, tb = pair
    acc_a, acc_b, dot = NormAccumulator(2.0), NormAccumulator(2.0), ExactSum()
    wide_a, wide_b = np.empty(BLOCK), np.empty(BLOCK)
    differing = 0
    pairs = _lockstep(a.read_chunks(ta, chunk_size), b.read_chunks(tb, chunk_size))
    for piece_a, piece_b in pairs:
        acc_a.add(piece_a)
        acc_b.add(piece_b)
        for start in range(0, piece_a.size, BLOCK):
            n = min(BLOCK, piece_a.size - start)
            # every gradient dtype widens to float64 exactly: values compare as they are
            np.copyto(wide_a[:n], piece_a[start : start + n], casting="unsafe")
            np.copyto(wide_b[:n], piece_b[start : start + n], casting="unsafe")
            differing += _count_differing(wide_a[:n], wide_b[:n], zero_nonfinite, tolerance)
            np.multiply(wide_a[:n], wide_b[:n], out=wide_a[:n])
            dot.add(float(np.add.reduce(wide_a[:n])))
    return _Streamed(acc_a.finish(), acc_b.finish(), dot.value, differing)


def _count_differing(
    x: np.ndarray, y: np.ndarray, zero_nonfinite: bool, tolerance: Tolerance
) -> int:
    """How many values of *x* and *y* differ (finite ones: beyond *tolerance*); NaN/Inf are
    then set to 0 in both (the dot product counts the values the norms count)."""
    finite_x, finite_y = np.isfinite(x), np.isfinite(y)
    if finite_x.all() and finite_y.all():
        return tolerance.mismatched(x, y)
    if zero_nonfinite:
        x[~finite_x] = 0.0
        y[~finite_y] = 0.0
        return tolerance.mismatched(x, y)
    finite = finite_x & finite_y  # others match only as they are: NaN and NaN, Inf and Inf
    unequal = (x != y) & ~(np.isnan(x) & np.isnan(y))
    count = tolerance.mismatched(x[finite], y[finite]) + int(np.count_nonzero(unequal[~finite]))
    x[~finite_x] = 0.0
    y[~finite_y] = 0.0
    return count


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


def _norm(stats: NormStats, nonfinite: NonFinite) -> float:
    """NaN/Inf propagate into the norm unless a policy says how to count them."""
    return stats.norm() if nonfinite is NonFinite.ERROR else stats.finite_norm()


def _norm_or_none(stats: NormStats | None, nonfinite: NonFinite) -> float | None:
    return None if stats is None else _norm(stats, nonfinite)


def _ratio(b: float | None, a: float | None) -> float | None:
    if a is None or b is None:
        return None
    return b / a if a and math.isfinite(a) and math.isfinite(b) else None


def _cosine(dot: float, norm_a: float, norm_b: float) -> float | None:
    if not (norm_a and norm_b) or not all(map(math.isfinite, (dot, norm_a, norm_b))):
        return None
    return max(-1.0, min(1.0, dot / (norm_a * norm_b)))
