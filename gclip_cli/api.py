"""The library API: what the CLI calls, and what a Python user can call directly."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .engine import (
    Clamper,
    NonFinite,
    Rewriter,
    Scaler,
    clip_factor,
    combine,
    dividing_norm,
    measure_tensors,
    rewrite,
    rounding_bound,
)
from .errors import InputError, NonFiniteError, OutputError, UsageError
from .formats import TensorFile, TensorInfo, crashes_on_damage, detect_format, open_file
from .formats.base import FileShrank
from .isolation import HDF5_CRASH, WORKER_CRASH, run_isolated
from .norms import NormStats
from .output import atomic_output, check_output_path
from .parallel import available_cores
from .progress import COPYING, SILENT, Listener, Progress
from .report import Report, TensorReport, tensor_reports
from .rounding import ScaleFactor
from .selection import (
    check_globs,
    counted_or_why,
    read_opaque_as,
    refuse_opaque,
    require_counted,
    select,
)
from .sources import Identity, Inputs, NotRead, resolve, unchanged
from .strategies import (
    ClipValue,
    GlobalNorm,
    Groups,
    Normalize,
    PerTensor,
    Plan,
    Strategy,
    plan,
)

if TYPE_CHECKING:
    import numpy as np

    from .compare import Diff
    from .history import FoundStep, History, Step

DEFAULT_CHUNK_SIZE = 64 << 20  # bytes read per chunk
T = TypeVar("T")
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Options:
    """How to measure and clip: the options every command shares."""

    norm_type: float = 2.0
    max_norm: float | None = None
    eps: float = 0.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    jobs: int | None = None  # worker processes for one large file (None: every core)
    nonfinite: str = "error"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    opaque_dtypes: tuple[str, ...] = ()  # what raw 1-/2-byte values are, e.g. ("bfloat16",)

    def __post_init__(self) -> None:
        if self.nonfinite not in {p.value for p in NonFinite}:
            raise UsageError(None, f"nonfinite must be error, zero or keep, not {self.nonfinite!r}")
        if not (self.norm_type > 0):
            raise UsageError(None, f"norm type must be a number > 0 or inf, not {self.norm_type}")
        if self.max_norm is not None:
            _require_positive("max norm", self.max_norm)
        if not (0 <= self.eps < math.inf):
            raise UsageError(None, f"eps must be a finite number >= 0, not {self.eps}")
        if self.chunk_size < 1:
            raise UsageError(None, f"chunk size must be at least 1 byte, not {self.chunk_size}")
        if self.jobs is not None and self.jobs < 1:
            raise UsageError(None, f"jobs must be at least 1, not {self.jobs}")
        self.opaque  # noqa: B018 - validates the names

    @property
    def opaque(self) -> dict[int, np.dtype]:
        """The types raw values are read as, by item size."""
        from .dtypes import OPAQUE_DTYPES

        types: dict[int, np.dtype] = {}
        for name in self.opaque_dtypes:
            if name not in OPAQUE_DTYPES:
                known = ", ".join(OPAQUE_DTYPES)
                raise UsageError(None, f"opaque dtype {name!r} is not one of {known}")
            dtype = OPAQUE_DTYPES[name]
            if types.setdefault(dtype.itemsize, dtype) != dtype:
                raise UsageError(None, f"two opaque dtypes of {dtype.itemsize} byte(s) given")
        return types

    @property
    def workers(self) -> int:
        return self.jobs or available_cores()

    @property
    def policy(self) -> NonFinite:
        return NonFinite(self.nonfinite)

    def norm(self, stats: NormStats) -> float:
        """The norm that counts: NaN/Inf propagate unless a policy says how to treat them."""
        return stats.norm() if self.policy is NonFinite.ERROR else stats.finite_norm()


def _require_positive(what: str, value: float) -> None:
    if not 0 < value < math.inf:
        raise UsageError(None, f"{what} must be a finite number > 0, not {value}")


@dataclass(frozen=True)
class _Measured:
    """Pass 1 of one file: its tensors (after selection) and their statistics."""

    path: Path
    file_format: str
    tensors: list[TensorInfo]
    stats: list[NormStats | None]


def inspect_file(
    path: PathLike,
    *,
    file_format: str | None = None,
    progress: Listener | None = None,
    **options: object,
) -> Report:
    """Measure every tensor of *path*; with max_norm, also the factor rescale would apply.

    *options* are those of :class:`Options`.  NaN/Inf values are counted per tensor; with
    nonfinite "zero" or "keep" the global norm is that of the finite values (as rescale would
    use), else it is NaN/inf.  *progress*, if given, is called with each progress event
    (see progress.py), as the work advances.
    """
    return inspect_files([path], file_format=file_format, progress=progress, **options)


def inspect_files(
    paths: Sequence[PathLike],
    *,
    file_format: str | None = None,
    progress: Listener | None = None,
    **options: object,
) -> Report:
    """One report, and one global norm, over several files: paths may also be directories
    or sharded-checkpoint ``*.index.json`` files."""
    settings = Options(**options)
    inputs = resolve(paths)
    measured = _measure_all(inputs, file_format, settings, Progress(progress))
    tensors = [t for m in measured for t in m.tensors]
    before = [s for m in measured for s in m.stats]
    total = combine(before, settings.norm_type)
    global_norm = settings.norm(total)
    factor = None
    if settings.max_norm is not None and dividing_norm(total, global_norm) is not None:
        factor = _factor(tensors, before, total, settings)
    files = [str(m.path) for m in measured for _ in m.tensors]
    return Report(
        path=str(measured[0].path) if len(measured) == 1 else f"{len(measured)} files",
        file_format=",".join(dict.fromkeys(m.file_format for m in measured)),
        norm_type=settings.norm_type,
        global_norm=global_norm,
        tensors=tensor_reports(tensors, before, global_norm, settings.norm, files=files),
        files=tuple(str(m.path) for m in measured),
        max_norm=settings.max_norm,
        eps=settings.eps,
        nonfinite_policy=settings.nonfinite,
        scale=None if factor is None else factor.hi,
        clipped=None if factor is None else factor.exact != 1,
        not_read=_not_read(inputs),
    )


def _measure_all(
    inputs: Inputs, file_format: str | None, options: Options, progress: Progress
) -> list[_Measured]:
    """Pass 1 over every input file, then the checks that need all of them: each shard holds
    what its index lists, each glob matches some tensor."""
    alone = len(inputs.files) == 1  # then the file checks the globs itself, before pass 1
    measured = [
        _in_child_if_fragile(src, file_format, _measure_file, options, alone, progress=progress)
        for src in progress.each_file(inputs.files)
    ]
    inputs.check_indexes({m.path: [t.name for t in m.tensors] for m in measured})
    check_globs([t.name for m in measured for t in m.tensors], options.include, options.exclude)
    return measured


def _not_read(inputs: Inputs, copied: bool = False) -> tuple[tuple[str, str], ...]:
    """(path, why) of what the inputs held but gclip did not read; *copied*: into --out-dir."""
    if not copied:
        return tuple((str(n.path), n.reason) for n in inputs.not_read)
    return tuple(
        (str(n.path), f"{n.reason}; {'copied unchanged' if _copied(n) else 'not copied'}")
        for n in inputs.not_read
    )


def _copied(entry: NotRead) -> bool:
    """Whether --out-dir gets a copy of a file not read: yes, unless it is a folder or another
    name for a file read."""
    return entry.same_as is None and entry.path.is_file()


def diff_files(
    path_a: PathLike, path_b: PathLike, *, file_format: str | None = None, **options: object
) -> Diff:
    """Whether two dumps hold the same tensors with the same values (Diff.same), each one's
    own global L2 norm, and per tensor the L2 norms side by side, their ratio and cosine
    similarity.  Names are paired with ``.`` and ``/`` alike.  *options*: chunk_size,
    nonfinite, include and exclude of :class:`Options` (see compare.py for what is compared)."""
    settings = Options(**options)
    a, b = Path(path_a), Path(path_b)
    format_a, format_b = file_format or detect_format(a), file_format or detect_format(b)
    # in a child, as every file's work (see _in_child_if_fragile)
    fragile = crashes_on_damage(format_a) or crashes_on_damage(format_b)
    crash = HDF5_CRASH if fragile else WORKER_CRASH
    return run_isolated(a, _diff, a, format_a, b, format_b, settings, crash=crash)


def _diff(
    progress: Progress, a: Path, format_a: str, b: Path, format_b: str, options: Options
) -> Diff:
    from .compare import compare  # imported where needed, here and below: start-up counts

    del progress  # comparing reports none

    with _opened(a, format_a, options) as file_a, _opened(b, format_b, options) as file_b:
        return compare(
            file_a, file_b, options.chunk_size, options.nonfinite, options.include, options.exclude
        )


def history_of(
    paths: Sequence[PathLike],
    *,
    percentile: float = 95.0,
    max_norm: float | None = None,
    as_given: bool = False,
    file_format: str | None = None,
    progress: Listener | None = None,
    **options: object,
) -> History:
    """The global norm of each file (one training step each), in step order unless *as_given*,
    with percentiles and a suggested max norm (the *percentile*-th); with *max_norm*, how many
    steps it would clip.

    A file's step is a ``global_step`` or ``step`` entry of its metadata (safetensors
    ``__metadata__``, an HDF5 root attribute), else a 0-d integer tensor so named, else the
    number after step/iter/it in its name's stem, else the stem's last number.  In step order,
    a file without a step, or two files with one step, are a UsageError.  *progress*: as for
    inspect_file.
    """
    if not 0 <= percentile <= 100:
        raise UsageError(None, f"percentile must lie in [0, 100], not {percentile}")
    from .history import Step, summarise

    settings = Options(max_norm=max_norm, **options)
    inputs = resolve(paths)
    steps: list[Step] = []
    tensors: list[str] = []
    sink = Progress(progress)
    for src in sink.each_file(inputs.files):
        measured, found = _in_child_if_fragile(
            src, file_format, _measure_with_step, settings, progress=sink
        )
        if not as_given:
            _check_step(src, found, steps)
        require_counted(src, counted_or_why(measured.tensors))  # no norm of 0 for nothing
        tensors += (t.name for t in measured.tensors)
        total = combine(measured.stats, settings.norm_type)
        value, source = (None, None) if found is None else (found.value, found.source)
        steps.append(Step(str(src), value, settings.norm(total), total.nonfinite, source))
    check_globs(tensors, settings.include, settings.exclude)
    if not as_given:
        steps.sort(key=lambda s: s.step)
    return summarise(steps, settings.norm_type, percentile, max_norm, settings.nonfinite)


def _check_step(src: Path, found: FoundStep | None, earlier: Sequence[Step]) -> None:
    """Ordering by step needs one step per file, each its own."""
    if found is None:
        raise UsageError(
            None,
            f"{src}: no step found (no step or global_step in its metadata or tensors, no "
            "number in its name); give --as-given to keep the order of the command line",
        )
    twin = next((s for s in earlier if s.step == found.value), None)
    if twin is not None:
        sources = dict.fromkeys((twin.step_source, found.source))
        raise UsageError(
            None,
            f"{twin.file} and {src} both hold step {found.value} (from their "
            f"{' and '.join(map(str, sources))}); give --as-given to keep the order of the "
            "command line",
        )


def rescale_file(
    src: PathLike,
    dst: PathLike,
    *,
    max_norm: float | None = None,
    per_tensor: bool = False,
    groups: Sequence[tuple[str, float]] = (),
    file_format: str | None = None,
    clobber: bool = True,
    progress: Listener | None = None,
    **options: object,
) -> Report:
    """Clip *src* by its global norm into *dst* (same format); *src* is never modified.

    With *per_tensor*, each tensor is clipped by its own norm instead; with *groups*
    ((glob, max_norm) pairs, first match wins) each group by its own norm, the tensors no glob
    matches by *max_norm* (or not at all without it).

    *dst* appears only when complete.  NaN/Inf values: nonfinite "error" raises
    NonFiniteError before anything is written; "zero" counts them as 0 and writes 0; "keep"
    clips by the norm of the finite values and writes NaN/Inf back unchanged.  With *clobber*
    off an existing *dst* is never replaced.  *progress*: as for inspect_file.  Other
    *options* are those of :class:`Options`.
    """
    if groups:
        for glob, limit in groups:
            _require_positive(f"group {glob!r}: max norm", limit)
        strategy: Strategy = Groups(tuple((g, float(c)) for g, c in groups), max_norm)
    elif max_norm is None:
        raise UsageError(None, "give a max norm, or groups with their own max norms")
    else:
        strategy = PerTensor(max_norm) if per_tensor else GlobalNorm(max_norm)
    return _rewrite_file(
        src, dst, strategy, file_format, clobber, progress, max_norm=max_norm, **options
    )


def rescale_files(
    paths: Sequence[PathLike],
    out_dir: PathLike,
    *,
    max_norm: float,
    jobs: int | None = None,
    scheduler: str | None = None,
    file_format: str | None = None,
    clobber: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    **options: object,
) -> Report:
    """Clip the shards *paths* (files, directories, ``*.index.json``) by their one global norm
    into *out_dir*, each under its own name (an index file is copied unchanged).

    The two phases run shard by shard here (each large shard cut into parts for every core),
    as tasks on a process pool of *jobs* processes (*jobs* shards at once), or on the Dask
    cluster *scheduler* (``local[:N]`` starts one here); the result is identical to the last
    bit whichever.  *progress*(phase, shards done, shards) is called as shards finish.
    """
    from .sharded import executor_for, run_all, staging

    inputs, out_dir = resolve(paths), Path(out_dir)
    files = inputs.files
    if scheduler or ((jobs or 1) > 1 and len(files) > 1):
        pool, jobs = jobs, 1  # shards at once, each in one process
    else:
        pool = None
    settings = Options(max_norm=max_norm, jobs=jobs, **options)
    targets, copies = _out_dir_layout(inputs, out_dir)
    _check_outputs([*zip(files, targets, strict=True), *copies], clobber)
    # The staging folder goes once the executor has stopped: no task can still write there.
    with ExitStack() as cleanup, executor_for(pool, scheduler) as executor:
        measured = run_all(
            executor,
            _measure_task,
            [(src, file_format, settings) for src in files],
            _counter("measuring", len(files), progress),
        )
        inputs.check_indexes({m.path: [t.name for t in m.tensors] for m in measured})
        tensors = [t for m in measured for t in m.tensors]
        check_globs([t.name for t in tensors], settings.include, settings.exclude)
        require_counted(", ".join(map(str, paths)), counted_or_why(tensors))
        before = [s for m in measured for s in m.stats]
        total = combine(before, settings.norm_type)
        bad = [
            (f"{m.path.name}: {t.name}", s)
            for m in measured
            for t, s in zip(m.tensors, m.stats, strict=True)
            if s is not None and s.nonfinite
        ]
        if bad and settings.policy is NonFinite.ERROR:
            raise NonFiniteError(measured[0].path.parent, _nonfinite_message(bad))
        factor = _factor(tensors, before, total, settings)
        inputs.check_unchanged()  # pass 2 writes from the files pass 1 measured
        _make_folders(out_dir, [dst.parent for dst in [*targets, *(c for _, c in copies)]])
        _check_outputs([*zip(files, targets, strict=True), *copies], clobber, made=True)
        temp_dir = cleanup.enter_context(staging(out_dir))
        tasks = [
            (
                m.path,
                m.file_format,
                dst,
                temp_dir,
                factor,
                settings,
                clobber,
                _with_nonfinite(m),
                inputs.identities[m.path],
            )
            for m, dst in zip(measured, targets, strict=True)
        ]
        after = run_all(executor, _write_task, tasks, _counter("writing", len(tasks), progress))
        for src, dst in copies:
            with (
                atomic_output(dst, clobber, temp_dir, mode_from=src) as tmp,
                _output_errors(dst),
            ):
                _copy_file(src, tmp)
    global_norm = settings.norm(total)
    written = [
        s
        for m, shard in zip(measured, after, strict=True)
        for s in (m.stats if shard is None else shard)
    ]
    return Report(
        path=f"{len(files)} files" if len(files) > 1 else str(files[0]),
        file_format=",".join(dict.fromkeys(m.file_format for m in measured)),
        norm_type=settings.norm_type,
        global_norm=global_norm,
        tensors=tensor_reports(
            tensors,
            before,
            global_norm,
            settings.norm,
            written,
            files=[str(m.path) for m in measured for _ in m.tensors],
        ),
        files=tuple(str(m.path) for m in measured),
        max_norm=max_norm,
        eps=settings.eps,
        nonfinite_policy=settings.nonfinite,
        scale=factor.hi,
        clipped=factor.exact != 1,
        output=str(out_dir),
        global_norm_after=settings.norm(combine(written, settings.norm_type)),
        not_read=_not_read(inputs, copied=True),
    )


def _out_dir_layout(inputs: Inputs, out_dir: Path) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """Where each shard goes in *out_dir*, and the files copied unchanged beside them, so
    that it is a whole checkpoint: the indexes (scaling changes no size) and the other files
    of the folders given (config, tokenizer, ...); folders inside them are not copied.

    Each file keeps its path relative to the folder all of them share, so that two shards of
    one name in different folders stay two files (and an index keeps naming its shards
    right); files of one folder, or of one index, go straight into *out_dir*.
    """
    copied = [
        *(i.path for i in inputs.indexes),
        *(n.path for n in inputs.not_read if _copied(n)),
    ]
    places = [os.path.abspath(p) for p in [*inputs.files, *copied]]  # names, links kept
    common = os.path.commonpath([os.path.dirname(p) for p in places])
    targets = [out_dir / os.path.relpath(p, common) for p in places]
    _refuse_clashes([*inputs.files, *copied], targets)
    shards = len(inputs.files)
    return targets[:shards], list(zip(copied, targets[shards:], strict=True))


def _refuse_clashes(sources: Sequence[Path], targets: Sequence[Path]) -> None:
    """Two names alike that lead to two files (``..`` after a link) may not share an output."""
    first: dict[Path, Path] = {}
    for source, target in zip(sources, targets, strict=True):
        if first.setdefault(target, source) != source:
            both = f"{first[target]} and {source}"
            raise OutputError(target, f"would be written for both {both}; rename one")


def _check_outputs(pairs: Sequence[tuple[Path, Path]], clobber: bool, made: bool = False) -> None:
    """check_output_path for every pair; before the folders are *made*, only for the outputs
    whose folder exists already."""
    for src, dst in pairs:
        if made or dst.parent.is_dir():
            check_output_path(src, dst, clobber)


def _make_folders(out_dir: Path, folders: Sequence[Path]) -> None:
    for folder in dict.fromkeys([out_dir, *folders]):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(folder, f"cannot make the folder: {exc.strerror or exc}") from None


def _copy_file(src: Path, dst: Path) -> None:
    """Copy *src*'s bytes into the file *dst*; failing to open *src* is the input's error."""
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        if exc.filename is None or os.fspath(exc.filename) != os.fspath(src):
            raise
        raise InputError(src, f"cannot read: {exc.strerror or exc}") from None


def _counter(
    phase: str, total: int, progress: Callable[[str, int, int], None] | None
) -> Callable[[], None] | None:
    if progress is None:
        return None
    count = iter(range(1, total + 1))
    progress(phase, 0, total)
    return lambda: progress(phase, next(count), total)


def _measure_task(src: Path, file_format: str | None, options: Options) -> _Measured:
    return _in_child_if_fragile(src, file_format, _measure_file, options)


def _with_nonfinite(measured: _Measured) -> frozenset[str]:
    return frozenset(
        t.name for t, s in zip(measured.tensors, measured.stats, strict=True) if s and s.nonfinite
    )


def _write_task(
    src: Path,
    file_format: str,
    dst: Path,
    temp_dir: Path,
    factor: ScaleFactor,
    options: Options,
    clobber: bool,
    with_nonfinite: frozenset[str],
    identity: Identity,
) -> list[NormStats | None] | None:
    """Phase 2 for one shard: a temporary file in *temp_dir*, renamed into place when
    complete (so a task tried again, or killed, leaves nothing half-written at *dst*), and
    only if *src* is still the file pass 1 measured (*identity*)."""
    with atomic_output(dst, clobber, temp_dir, mode_from=src) as tmp, unchanged(src, identity):
        return _in_child_if_fragile(
            src, file_format, _write_shard, tmp, dst, factor, options, with_nonfinite
        )


def _write_shard(
    progress: Progress,
    src: Path,
    file_format: str,
    tmp: Path,
    dst: Path,
    factor: ScaleFactor,
    options: Options,
    with_nonfinite: frozenset[str],
) -> list[NormStats | None] | None:
    with _opened(src, file_format, options) as tfile:
        gradients = dict.fromkeys((t.name for t in tfile.tensors if t.is_gradient), factor)
        scaler = Scaler(gradients, options.norm_type, options.policy, with_nonfinite)
        return _write_or_copy(
            tfile, tmp, dst, scaler, factor.exact != 1, with_nonfinite, options, progress
        )


def _write_or_copy(
    tfile: TensorFile,
    tmp: Path,
    dst: Path,
    rewriter: Rewriter,
    changes: bool,
    with_nonfinite: frozenset[str],
    options: Options,
    progress: Progress,
) -> list[NormStats | None] | None:
    """Pass 2 into *tmp*, or, when no value would change, a byte copy (None: the values
    written are those pass 1 measured).  Zeroing NaN/Inf is a change too."""
    with _output_errors(dst):
        if changes or (with_nonfinite and options.policy is NonFinite.ZERO):
            return rewrite(tfile, tmp, rewriter, options.chunk_size, options.workers, progress)
        size = tfile.path.stat().st_size
        progress.begin(COPYING, size)
        _copy_file(tfile.path, tmp)
        progress.advance(size)
        return None


def normalize_file(
    src: PathLike,
    dst: PathLike,
    *,
    target_norm: float,
    file_format: str | None = None,
    clobber: bool = True,
    progress: Listener | None = None,
    **options: object,
) -> Report:
    """Scale *src* so that its global norm becomes *target_norm* (up or down) into *dst*.

    The factor is target_norm / (norm + eps); a zero gradient stays zero.  Refused when a
    value would overflow its dtype.
    """
    _require_positive("target norm", target_norm)
    return _rewrite_file(
        src, dst, Normalize(target_norm), file_format, clobber, progress, **options
    )


def clip_value_file(
    src: PathLike,
    dst: PathLike,
    *,
    max_value: float,
    file_format: str | None = None,
    clobber: bool = True,
    progress: Listener | None = None,
    **options: object,
) -> Report:
    """Clamp every gradient value of *src* to [-max_value, max_value] into *dst*."""
    _require_positive("max value", max_value)
    return _rewrite_file(src, dst, ClipValue(max_value), file_format, clobber, progress, **options)


def _rewrite_file(
    src: PathLike,
    dst: PathLike,
    strategy: Strategy,
    file_format: str | None,
    clobber: bool,
    progress: Listener | None,
    **options: object,
) -> Report:
    settings = Options(**options)
    src, dst = Path(src), Path(dst)
    check_output_path(src, dst, clobber)
    identity = Identity.of(src)  # the file measured must be the file written from
    sink = Progress(progress)
    with atomic_output(dst, clobber, mode_from=src) as tmp, unchanged(src, identity):
        return _in_child_if_fragile(
            src, file_format, _rewrite, dst, tmp, strategy, settings, identity, progress=sink
        )


def _in_child_if_fragile(
    src: PathLike,
    file_format: str | None,
    work: Callable[..., T],
    *args: object,
    progress: Progress = SILENT,
) -> T:
    """*work*(progress, src, format, *args), in a child process (where fork is available),
    its progress reaching *progress*: a library can crash (not raise) on a damaged file, and
    a mapped file that shrinks kills its reader with SIGBUS; either is then an InputError
    (see isolation.py)."""
    src = Path(src)
    file_format = file_format or detect_format(src)
    crash = HDF5_CRASH if crashes_on_damage(file_format) else WORKER_CRASH
    return run_isolated(src, work, src, file_format, *args, crash=crash, progress=progress)


@contextmanager
def _opened(src: Path, file_format: str, options: Options) -> Iterator[TensorFile]:
    """The file, with raw values read as the types *options* name, and the tensors *options*
    do not select marked skipped; raw values of no type are refused."""
    with closing(open_file(src, file_format)) as tfile:
        typed = read_opaque_as(tfile.tensors, options.opaque)
        tfile.tensors = select(typed, options.include, options.exclude)
        refuse_opaque(src, tfile.tensors)
        try:
            yield tfile
        except FileShrank as exc:
            if not exc.concerns(src):  # another file opened around this one
                raise
            raise InputError(src, str(exc)) from None


def _measure_file(
    progress: Progress,
    src: Path,
    file_format: str,
    options: Options,
    check_selection: bool = False,
) -> _Measured:
    """Pass 1 of one file; *check_selection*: refuse globs that match none of its tensors
    first (when it is the only file, that is the whole check)."""
    with _opened(src, file_format, options) as tfile:
        if check_selection:
            check_globs([t.name for t in tfile.tensors], options.include, options.exclude)
        return _measure_opened(tfile, options, progress)


def _measure_opened(tfile: TensorFile, options: Options, progress: Progress) -> _Measured:
    stats = measure_tensors(tfile, options.norm_type, options.chunk_size, options.workers, progress)
    # locations are the format's handles: not needed by reports, and may not pickle
    tensors = [replace(t, location=None) for t in tfile.tensors]
    return _Measured(tfile.path, tfile.format_name, tensors, stats)


def _measure_with_step(
    progress: Progress, src: Path, file_format: str, options: Options
) -> tuple[_Measured, FoundStep | None]:
    """Pass 1 of one file and the training step it holds (history), in one opening."""
    from .history import step_of

    with _opened(src, file_format, options) as tfile:
        return _measure_opened(tfile, options, progress), step_of(tfile)


def _rewrite(
    progress: Progress,
    src: Path,
    file_format: str,
    dst: Path,
    tmp: Path,
    strategy: Strategy,
    options: Options,
    identity: Identity,
) -> Report:
    """Pass 1, the plan, then pass 2 (or a plain copy when nothing changes) into *tmp*; pass 2
    only if *src* is still the file pass 1 measured (*identity*: workers reopen it by name)."""
    with _opened(src, file_format, options) as tfile:
        tensors = list(tfile.tensors)
        check_globs([t.name for t in tensors], options.include, options.exclude)
        require_counted(src, counted_or_why(tensors))
        before = measure_tensors(
            tfile, options.norm_type, options.chunk_size, options.workers, progress
        )
        identity.check(src)
        total = combine(before, options.norm_type)
        if options.policy is NonFinite.ERROR:
            _refuse_nonfinite(tfile, before)
        global_norm = options.norm(total)
        with_nonfinite = frozenset(
            t.name for t, s in zip(tensors, before, strict=True) if s and s.nonfinite
        )
        if isinstance(strategy, ClipValue):
            rewriter: Rewriter = Clamper(strategy.max_value, options.norm_type, options.policy)
            changes = any(s.max_abs > strategy.max_value for s in before if s)
            planned = Plan({}, ())
        else:
            planned = plan(strategy, tensors, before, options.norm, options.eps)
            rewriter = Scaler(planned.factors, options.norm_type, options.policy, with_nonfinite)
            changes = planned.changes_anything
        written = _write_or_copy(
            tfile, tmp, dst, rewriter, changes, with_nonfinite, options, progress
        )
        after = before if written is None else written
        reports = tensor_reports(
            tensors, before, global_norm, options.norm, after, files=[str(src)] * len(tensors)
        )
        reports = tuple(_with_changes(t, planned, rewriter) for t in reports)
        scales = {f.hi for f in planned.factors.values()}
        return Report(
            path=str(src),
            file_format=tfile.format_name,
            norm_type=options.norm_type,
            global_norm=global_norm,
            tensors=reports,
            files=(str(src),),
            max_norm=getattr(strategy, "max_norm", None),
            eps=options.eps,
            nonfinite_policy=options.nonfinite,
            scale=scales.pop() if len(scales) == 1 else None,
            clipped=changes,
            output=str(dst),
            global_norm_after=options.norm(combine(after, options.norm_type)),
            strategy=strategy.name,
            groups=planned.groups if isinstance(strategy, (PerTensor, Groups)) else (),
            max_value=getattr(strategy, "max_value", None),
            target_norm=getattr(strategy, "target_norm", None),
        )


def _with_changes(tensor: TensorReport, planned: Plan, rewriter: Rewriter) -> TensorReport:
    """*tensor* with the factor it was multiplied by, or the count of values clamped."""
    if tensor.skipped:
        return tensor
    if isinstance(rewriter, Clamper):
        return replace(tensor, clamped=rewriter.clamped.get(tensor.name, 0))
    return replace(tensor, scale=planned.factors[tensor.name].hi)


def _factor(
    tensors: Sequence[TensorInfo],
    before: Sequence[NormStats | None],
    total: NormStats,
    options: Options,
) -> ScaleFactor:
    dividing = dividing_norm(total, options.norm(total))
    if dividing is None:  # NaN/Inf counted in the norm: nothing to clip by
        return ScaleFactor.of(1.0)
    bound = rounding_bound(tensors, before, total)
    return clip_factor(dividing, options.max_norm, options.eps, bound)


def _refuse_nonfinite(tfile: TensorFile, stats: list[NormStats | None]) -> None:
    bad = [
        (t.name, s)
        for t, s in zip(tfile.tensors, stats, strict=True)
        if s is not None and s.nonfinite
    ]
    if not bad:
        return
    raise NonFiniteError(tfile.path, _nonfinite_message(bad))


def _nonfinite_message(bad: list[tuple[str, NormStats]]) -> str:
    listed = ", ".join(f"{name!r} ({s.nan} NaN, {s.inf} Inf)" for name, s in bad[:5])
    more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
    return f"non-finite values in {listed}{more}; nothing written"


@contextmanager
def _output_errors(dst: Path) -> Iterator[None]:
    """OS errors while writing are the output's (input errors are raised as InputError)."""
    try:
        yield
    except OSError as exc:
        raise OutputError(dst, f"cannot write: {exc.strerror or exc}") from None
