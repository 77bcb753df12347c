"""The library API: what the CLI calls, and what a Python user can call directly."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .engine import (
    NonFinite,
    Scaler,
    clip_factor,
    combine,
    measure_tensors,
    rounding_bound,
    write_scaled,
)
from .errors import NonFiniteError, OutputError, UsageError
from .formats import TensorFile, crashes_on_damage, detect_format, open_file
from .isolation import run_isolated
from .norms import NormStats
from .output import atomic_output, check_output_path
from .report import Report, tensor_reports
from .rounding import ScaleFactor

DEFAULT_CHUNK_SIZE = 64 << 20  # bytes read per chunk


@dataclass(frozen=True)
class _Options:
    norm_type: float
    max_norm: float | None
    eps: float
    chunk_size: int
    nonfinite: NonFinite

    def norm(self, stats: NormStats) -> float:
        """The norm that counts: NaN/Inf propagate unless a policy says how to treat them."""
        return stats.norm() if self.nonfinite is NonFinite.ERROR else stats.finite_norm()


def inspect_file(
    path: str | os.PathLike[str],
    *,
    norm_type: float = 2.0,
    max_norm: float | None = None,
    eps: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    file_format: str | None = None,
    nonfinite: str = "error",
) -> Report:
    """Measure every tensor of *path*; with *max_norm*, also the factor rescale would apply.

    NaN/Inf values are counted per tensor; with *nonfinite* "zero" or "keep" the global norm
    is that of the finite values (as rescale would use), else it is NaN/inf.
    """
    options = _options(norm_type, max_norm, eps, chunk_size, nonfinite)
    src = Path(path)
    file_format = file_format or detect_format(src)
    return _contained(file_format, src, _inspect, src, file_format, options)


def rescale_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_norm: float,
    norm_type: float = 2.0,
    eps: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    file_format: str | None = None,
    nonfinite: str = "error",
    clobber: bool = True,
) -> Report:
    """Clip *src* by its global norm into *dst* (same format); *src* is never modified.

    *dst* appears only when complete.  NaN/Inf values: *nonfinite* "error" raises
    NonFiniteError before anything is written; "zero" counts them as 0 and writes 0; "keep"
    clips by the norm of the finite values and writes NaN/Inf back unchanged.  With
    *clobber* off an existing *dst* is never replaced.
    """
    options = _options(norm_type, max_norm, eps, chunk_size, nonfinite)
    src, dst = Path(src), Path(dst)
    check_output_path(src, dst, clobber)
    file_format = file_format or detect_format(src)
    with atomic_output(dst, clobber) as tmp:
        return _contained(file_format, src, _rescale, src, dst, tmp, file_format, options)


def _contained(file_format: str, src: Path, work: Callable[..., Report], *args: object) -> Report:
    """Run *work* in a child process for formats whose library can crash on damaged files."""
    if crashes_on_damage(file_format):
        return run_isolated(src, work, *args)
    return work(*args)


def _inspect(src: Path, file_format: str, options: _Options) -> Report:
    with closing(open_file(src, file_format)) as tfile:
        before, total = _measure(tfile, options)
        global_norm = options.norm(total)
        factor = None
        if options.max_norm is not None and math.isfinite(global_norm):
            factor = _factor(tfile, before, total, options)
        return Report(
            path=str(src),
            file_format=tfile.format_name,
            norm_type=options.norm_type,
            global_norm=global_norm,
            tensors=tensor_reports(list(tfile.tensors), before, global_norm, options.norm),
            max_norm=options.max_norm,
            eps=options.eps,
            nonfinite_policy=options.nonfinite.value,
            scale=None if factor is None else factor.hi,
            clipped=None if factor is None else factor.exact != 1,
        )


def _rescale(src: Path, dst: Path, tmp: Path, file_format: str, options: _Options) -> Report:
    """Pass 1, the decision, then pass 2 (or a plain copy) into *tmp*."""
    with closing(open_file(src, file_format)) as tfile:
        before, total = _measure(tfile, options)
        if options.nonfinite is NonFinite.ERROR:
            _refuse_nonfinite(tfile, before)
        global_norm = options.norm(total)
        factor = _factor(tfile, before, total, options)
        clipped = factor.exact != 1
        with_nonfinite = frozenset(
            t.name for t, s in zip(tfile.tensors, before, strict=True) if s and s.nonfinite
        )
        with _output_errors(dst):
            if clipped or (with_nonfinite and options.nonfinite is NonFinite.ZERO):
                scaler = Scaler(factor, options.norm_type, options.nonfinite, with_nonfinite)
                after = write_scaled(tfile, tmp, scaler, options.chunk_size)
            else:  # nothing to change: the output is the input, byte for byte
                shutil.copyfile(src, tmp)
                after = before
        return Report(
            path=str(src),
            file_format=tfile.format_name,
            norm_type=options.norm_type,
            global_norm=global_norm,
            tensors=tensor_reports(list(tfile.tensors), before, global_norm, options.norm, after),
            max_norm=options.max_norm,
            eps=options.eps,
            nonfinite_policy=options.nonfinite.value,
            scale=factor.hi,
            clipped=clipped,
            output=str(dst),
            global_norm_after=options.norm(combine(after, options.norm_type)),
        )


def _options(
    norm_type: float, max_norm: float | None, eps: float, chunk_size: int, nonfinite: str
) -> _Options:
    try:
        policy = NonFinite(nonfinite)
    except ValueError:
        raise UsageError(
            None, f"nonfinite must be error, zero or keep, not {nonfinite!r}"
        ) from None
    options = _Options(norm_type, max_norm, eps, chunk_size, policy)
    _check_options(options)
    return options


def _check_options(options: _Options) -> None:
    if not (options.norm_type > 0):
        raise UsageError(None, f"norm type must be a number > 0 or inf, not {options.norm_type}")
    if options.max_norm is not None and not (0 < options.max_norm < math.inf):
        raise UsageError(None, f"max norm must be a finite number > 0, not {options.max_norm}")
    if not (0 <= options.eps < math.inf):
        raise UsageError(None, f"eps must be a finite number >= 0, not {options.eps}")
    if options.chunk_size < 1:
        raise UsageError(None, f"chunk size must be at least 1 byte, not {options.chunk_size}")


def _measure(tfile: TensorFile, options: _Options) -> tuple[list[NormStats | None], NormStats]:
    before = measure_tensors(tfile, options.norm_type, options.chunk_size)
    return before, combine(before, options.norm_type)


def _factor(
    tfile: TensorFile, before: list[NormStats | None], total: NormStats, options: _Options
) -> ScaleFactor:
    bound = rounding_bound(tfile.tensors, before, total)
    return clip_factor(options.norm(total), options.max_norm, options.eps, bound)


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


@contextmanager
def _output_errors(dst: Path) -> Iterator[None]:
    """OS errors while writing are the output's (input errors are raised as InputError)."""
    try:
        yield
    except OSError as exc:
        raise OutputError(dst, f"cannot write: {exc.strerror or exc}") from None
