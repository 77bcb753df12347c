"""The library API: what the CLI calls, and what a Python user can call directly."""

from __future__ import annotations

import math
import os
import shutil
from contextlib import closing
from pathlib import Path

from .engine import clip_factor, combine, measure_tensors, rounding_bound, write_scaled
from .errors import InputError, NonFiniteError, OutputError, UsageError
from .formats import TensorFile, open_file
from .norms import NormStats
from .output import atomic_output, check_output_path
from .report import Report, tensor_reports
from .rounding import ScaleFactor

DEFAULT_CHUNK_SIZE = 64 << 20  # bytes read per chunk


def inspect_file(
    path: str | os.PathLike[str],
    *,
    norm_type: float = 2.0,
    max_norm: float | None = None,
    eps: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    file_format: str | None = None,
) -> Report:
    """Measure every tensor of *path*; with *max_norm*, also the factor rescale would apply."""
    _check_options(norm_type, max_norm, eps, chunk_size)
    src = Path(path)
    with closing(open_file(src, file_format)) as tfile:
        before, total = _measure(tfile, norm_type, chunk_size)
        global_norm = total.norm()
        factor = None
        if max_norm is not None and math.isfinite(global_norm):
            factor = _factor(tfile, before, total, max_norm, eps)
        return Report(
            path=str(src),
            file_format=tfile.format_name,
            norm_type=norm_type,
            global_norm=global_norm,
            tensors=tensor_reports(list(tfile.tensors), before, global_norm),
            max_norm=max_norm,
            eps=eps,
            scale=None if factor is None else factor.hi,
            clipped=None if factor is None else factor.exact != 1,
        )


def rescale_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_norm: float,
    norm_type: float = 2.0,
    eps: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    file_format: str | None = None,
) -> Report:
    """Clip *src* by its global norm into *dst* (same format); *src* is never modified.

    Raises NonFiniteError, before writing anything, when *src* holds NaN or Inf values.
    """
    _check_options(norm_type, max_norm, eps, chunk_size)
    src, dst = Path(src), Path(dst)
    check_output_path(src, dst)
    with closing(open_file(src, file_format)) as tfile:
        before, total = _measure(tfile, norm_type, chunk_size)
        _refuse_nonfinite(tfile, before)
        global_norm = total.norm()
        factor = _factor(tfile, before, total, max_norm, eps)
        clipped = factor.exact != 1
        if clipped:
            after = _write(tfile, dst, factor, norm_type, chunk_size)
        else:
            _copy_unchanged(src, dst)
            after = before
        return Report(
            path=str(src),
            file_format=tfile.format_name,
            norm_type=norm_type,
            global_norm=global_norm,
            tensors=tensor_reports(list(tfile.tensors), before, global_norm, after),
            max_norm=max_norm,
            eps=eps,
            scale=factor.hi,
            clipped=clipped,
            output=str(dst),
            global_norm_after=combine(after, norm_type).norm(),
        )


def _check_options(norm_type: float, max_norm: float | None, eps: float, chunk_size: int) -> None:
    if not (norm_type > 0):
        raise UsageError(None, f"norm type must be a number > 0 or inf, not {norm_type}")
    if max_norm is not None and not (0 < max_norm < math.inf):
        raise UsageError(None, f"max norm must be a finite number > 0, not {max_norm}")
    if not (0 <= eps < math.inf):
        raise UsageError(None, f"eps must be a finite number >= 0, not {eps}")
    if chunk_size < 1:
        raise UsageError(None, f"chunk size must be at least 1 byte, not {chunk_size}")


def _measure(
    tfile: TensorFile, norm_type: float, chunk_size: int
) -> tuple[list[NormStats | None], NormStats]:
    before = measure_tensors(tfile, norm_type, chunk_size)
    return before, combine(before, norm_type)


def _factor(
    tfile: TensorFile,
    before: list[NormStats | None],
    total: NormStats,
    max_norm: float,
    eps: float,
) -> ScaleFactor:
    bound = rounding_bound(tfile.tensors, before, total)
    return clip_factor(total.norm(), max_norm, eps, bound)


def _refuse_nonfinite(tfile: TensorFile, stats: list[NormStats | None]) -> None:
    bad = [
        (t.name, s)
        for t, s in zip(tfile.tensors, stats, strict=True)
        if s is not None and s.nonfinite
    ]
    if not bad:
        return
    listed = ", ".join(f"{name!r} ({s.nan} NaN, {s.inf} Inf)" for name, s in bad[:5])
    more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
    raise NonFiniteError(tfile.path, f"non-finite values in {listed}{more}; nothing written")


def _write(
    tfile: TensorFile, dst: Path, factor: ScaleFactor, norm_type: float, chunk_size: int
) -> list[NormStats | None]:
    with atomic_output(dst) as tmp:
        try:
            return write_scaled(tfile, tmp, factor, norm_type, chunk_size)
        except InputError:
            raise
        except OSError as exc:
            raise OutputError(dst, f"cannot write: {exc.strerror or exc}") from None


def _copy_unchanged(src: Path, dst: Path) -> None:
    """Within max_norm: the output is the input, byte for byte."""
    with atomic_output(dst) as tmp:
        try:
            shutil.copyfile(src, tmp)
        except OSError as exc:
            raise OutputError(dst, f"cannot write: {exc.strerror or exc}") from None
