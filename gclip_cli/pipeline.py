"""One pipeline for every command: sources -> measure -> plan -> write -> report.

- The inputs resolve to sources (sources.py): files, a folder's tensor files, an index's shards.
- measure() runs pass 1 over every source through an executor (executors.py) and gives one
  record per tensor (file, tensor, statistics), then the checks that need all of them.
- A strategy (strategies.py) plans the factors from those records.
- write() runs pass 2, each source through the plan, through the same executor.
- The report (reports.py) is built from what was measured, planned and written.

Each file's work runs in a forked child (isolation.py: a crash or a SIGBUS there becomes an
error) and, for a large file, on several cores (parallel.py, inside engine.py).  A lone source
keeps its file open from pass 1 to pass 2, in one child: an ``.npz``'s checksums, checked as
pass 1 reads the values, need not be read again, nor an HDF5 tree described twice.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .engine import combine, dividing_norm, measure_tensors, rewrite
from .errors import InputError, NonFiniteError, OutputError
from .executors import InThisThread, executor_for, run_all, staging
from .formats import (
    TensorFile,
    TensorInfo,
    crashes_on_damage,
    detect_format,
    needs_named_output,
    open_file,
)
from .formats.base import FileShrank
from .formats.ranged import CopiesItself
from .isolation import HDF5_CRASH, WORKER_CRASH, run_isolated
from .norms import NormStats
from .options import NonFinite, Options
from .output import atomic_output, check_output_path, is_stream
from .progress import COPYING, SILENT, File, Progress
from .remote import ObjectSource, portable, reachable, streamed_upload, uploaded_file
from .reports import InspectReport, RewriteReport, TensorReport, tensor_reports
from .selection import check_globs, counted_or_why, read_opaque_as, refuse_opaque, select
from .selection import require_counted as refuse_if_none_counted
from .sources import Identity, Inputs, NotRead, unchanged
from .strategies import Member, Plan, Strategy, global_norm_plan

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from .steps import FoundStep

T = TypeVar("T")
Record = tuple[str, TensorInfo, NormStats | None]  # (file, tensor, pass-1 statistics)
ShardProgress = Callable[[str, int, int], None]  # (phase, files done, files)
_ALONE = File(1, 1)
_COPY_PIECE = 1 << 20  # bytes copied at a time into a stream


@dataclass(frozen=True)
class Measured:
    """Pass 1 of one file: its tensors (after selection) and their statistics; with history,
    the training step it holds."""

    path: Path
    file_format: str
    tensors: tuple[TensorInfo, ...]
    stats: tuple[NormStats | None, ...]
    step: FoundStep | None = None

    @property
    def records(self) -> list[Record]:
        return [(str(self.path), t, s) for t, s in zip(self.tensors, self.stats, strict=True)]

    @property
    def with_nonfinite(self) -> frozenset[str]:
        """The tensors holding NaN/Inf."""
        return frozenset(
            t.name for t, s in zip(self.tensors, self.stats, strict=True) if s and s.nonfinite
        )


@dataclass(frozen=True)
class Measurement:
    """Pass 1 of every source: one record per tensor."""

    inputs: Inputs
    options: Options
    files: tuple[Measured, ...]

    @property
    def records(self) -> list[Record]:
        return [record for measured in self.files for record in measured.records]

    @property
    def members(self) -> list[Member]:
        """The counted tensors, as strategies plan from them."""
        return [Member(file, t, s) for file, t, s in self.records if s is not None]

    @cached_property
    def total(self) -> NormStats:
        """All counted values as one vector (exact sums: the order does not matter)."""
        return combine([stats for _, _, stats in self.records], self.options.norm_type)

    @property
    def global_norm(self) -> float:
        return self.options.norm(self.total)

    def check(self, require_counted: bool) -> None:
        """What no single file can tell: each shard holds what its index lists, each glob
        matches some tensor; and, where an answer needs one, that some tensor is counted."""
        self.inputs.check_indexes({m.path: [t.name for t in m.tensors] for m in self.files})
        names = [t.name for _, t, _ in self.records]
        check_globs(names, self.options.include, self.options.exclude)
        if require_counted:
            where = str(self.files[0].path) if len(self.files) == 1 else _title(self.inputs)
            refuse_if_none_counted(where, counted_or_why([t for _, t, _ in self.records]))

    def refuse_nonfinite(self) -> None:
        """Rewriting refuses NaN/Inf unless a policy says how to treat them."""
        if self.options.nonfinite is not NonFinite.ERROR:
            return
        several = len(self.files) > 1
        bad = [
            (f"{Path(file).name}: {t.name}" if several else t.name, s)
            for file, t, s in self.records
            if s is not None and s.nonfinite
        ]
        if bad:
            where = self.files[0].path if not several else self.files[0].path.parent
            raise NonFiniteError(where, _nonfinite_message(bad))

    def plan(self, strategy: Strategy) -> Plan:
        """What *strategy* does to these tensors; NaN/Inf refused first unless a policy says
        how to treat them."""
        self.refuse_nonfinite()
        members = self.members
        nonfinite = frozenset(m.key for m in members if m.stats.nonfinite)
        planned = strategy.plan(members, self.options)
        return replace(planned, strategy=strategy, nonfinite=nonfinite)


@dataclass(frozen=True)
class Written:
    """Pass 2 of one file: the statistics of the values written (None: a byte copy, whose
    values are those pass 1 measured), and how many values were clamped, by tensor."""

    after: tuple[NormStats | None, ...] | None = None
    clamped: dict[str, int] = field(default_factory=dict)


# --- measure -------------------------------------------------------------------------------


def measure(
    inputs: Inputs,
    options: Options,
    *,
    executor: Executor | None = None,
    with_step: bool = False,
    require_counted: bool = False,
    shards: ShardProgress | None = None,
    progress: Progress = SILENT,
) -> Measurement:
    """Pass 1 over every source, and the checks that need them all (Measurement.check).

    *progress* hears of the bytes measured where the work runs in this process's children
    (shards on a pool or a cluster report to *shards*, as each is done)."""
    executor = executor or InThisThread()
    alone = len(inputs.files) == 1  # then the file checks the globs itself, before pass 1
    count = len(inputs.files)
    here = progress if isinstance(executor, InThisThread) else SILENT
    jobs = [
        (_sent(src, executor), options, alone, with_step, File(n, count), here)
        for n, src in enumerate(inputs.files, 1)
    ]
    measured = run_all(executor, measure_source, jobs, _counter("measuring", count, shards))
    measurement = Measurement(inputs, options, tuple(measured))
    measurement.check(require_counted)
    return measurement


def _sent(src: Path, executor: Executor) -> Path | ObjectSource:
    """*src* as a task on *executor* names it: on a Dask cluster, whose workers may share no
    file system with this process, a remote object by its URL (remote.portable)."""
    from .executors import DaskExecutor

    return portable(src) if isinstance(executor, DaskExecutor) else src


def measure_source(
    src: Path | ObjectSource,
    options: Options,
    check_selection: bool = False,
    with_step: bool = False,
    position: File = _ALONE,
    progress: Progress = SILENT,
) -> Measured:
    """Pass 1 of one file (a task: in a child of its own); *check_selection*: refuse globs that
    match none of its tensors before reading values (when it is the only file, that is the
    whole check); *with_step*: also the training step it holds; *position*: which file of how
    many, told to *progress*."""
    progress.forward(position)
    with reachable(src) as local:
        measured = in_child(local, options, progress, _measure_file, check_selection, with_step)
    return replace(measured, path=src.path) if isinstance(src, ObjectSource) else measured


def _measure_file(
    tfile: TensorFile,
    options: Options,
    progress: Progress,
    check_selection: bool,
    with_step: bool,
) -> Measured:
    if check_selection:
        check_globs([t.name for t in tfile.tensors], options.include, options.exclude)
    measured = measure_opened(tfile, options, progress)
    if with_step:
        from .steps import step_of

        measured = replace(measured, step=step_of(tfile))
    return measured


def measure_opened(tfile: TensorFile, options: Options, progress: Progress = SILENT) -> Measured:
    jobs = options.processes
    stats = measure_tensors(tfile, options.norm_type, options.chunk_size, jobs, progress)
    # locations are the format's handles: not needed by reports, and may not pickle
    tensors = tuple(replace(t, location=None) for t in tfile.tensors)
    return Measured(tfile.path, tfile.format_name, tensors, tuple(stats))


@contextmanager
def opened(src: Path, file_format: str, options: Options) -> Iterator[TensorFile]:
    """The file, with raw values read as the types *options* name, and the tensors *options*
    do not select marked skipped; raw values of no type are refused."""
    with closing(open_file(src, file_format, options.storage)) as tfile:
        typed = read_opaque_as(tfile.tensors, options.opaque)
        tfile.tensors = select(typed, options.include, options.exclude)
        refuse_opaque(src, tfile.tensors)
        try:
            yield tfile
        except FileShrank as exc:
            if not exc.concerns(src):  # another file opened around this one
                raise
            raise InputError(src, str(exc)) from None


def in_child(
    src: Path, options: Options, progress: Progress, work: Callable[..., T], *args: object
) -> T:
    """*work*(the file *src* opened, options, the child's progress, *args) in a forked child
    (where fork is available): a library can crash (not raise) on a damaged file, and a mapped
    file that shrinks kills its reader with SIGBUS; either is then an InputError (see
    isolation.py)."""
    file_format = options.file_format or detect_format(src)
    crash = HDF5_CRASH if crashes_on_damage(file_format) else WORKER_CRASH
    task = (src, file_format, options, work, *args)
    return run_isolated(src, _on_opened, *task, crash=crash, progress=progress)


def _on_opened(
    progress: Progress,
    src: Path,
    file_format: str,
    options: Options,
    work: Callable[..., T],
    *args: object,
) -> T:
    with opened(src, file_format, options) as tfile:
        return work(tfile, options, progress, *args)


# --- inspect -------------------------------------------------------------------------------


def inspect(
    inputs: Inputs,
    options: Options,
    *,
    max_norm: float | None = None,
    eps: float = 0.0,
    require_counted: bool = False,
    progress: Progress = SILENT,
) -> InspectReport:
    """Measure every tensor; with *max_norm*, also what clipping by the global norm would do."""
    measurement = measure(inputs, options, require_counted=require_counted, progress=progress)
    preview = None
    if (
        max_norm is not None
        and dividing_norm(measurement.total, measurement.global_norm) is not None
    ):
        preview = global_norm_plan(measurement.members, options, max_norm, eps)
    return replace(
        _inspect_report(measurement),
        max_norm=max_norm,
        eps=eps,
        scale=None if preview is None else preview.scale,
        clipped=None if preview is None else preview.changes,
    )


def _inspect_report(measurement: Measurement) -> InspectReport:
    files = measurement.files
    options = measurement.options
    global_norm = measurement.global_norm
    return InspectReport(
        path=str(files[0].path) if len(files) == 1 else f"{len(files)} files",
        file_format=",".join(dict.fromkeys(m.file_format for m in files)),
        norm_type=options.norm_type,
        global_norm=global_norm,
        tensors=tensor_reports(measurement.records, global_norm, options.norm),
        files=tuple(str(m.path) for m in files),
        nonfinite_policy=options.nonfinite,
        not_read=_not_read(measurement.inputs),
    )


# --- rewrite -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """Where the rewritten files go: each source's target, and the files copied beside them;
    *clobber* off: an existing file is never replaced."""

    targets: tuple[Path, ...]
    copies: tuple[tuple[Path, Path], ...] = ()
    out_dir: Path | None = None
    clobber: bool = True
    # the object the lone target stands for, or the prefix out_dir stands for: pass 2 then
    # uploads each target itself (where it runs: here, a worker process, a Dask worker)
    url: str | None = None

    @classmethod
    def one_file(cls, dst: Path, clobber: bool = True, url: str | None = None) -> Outputs:
        return cls((dst,), clobber=clobber, url=url)

    @classmethod
    def folder(
        cls, inputs: Inputs, out_dir: Path, clobber: bool = True, url: str | None = None
    ) -> Outputs:
        targets, copies = _out_dir_layout(inputs, out_dir)
        return cls(tuple(targets), tuple(copies), out_dir, clobber, url)

    def url_of(self, dst: Path) -> str | None:
        """The object pass 2 uploads *dst* to (None: it writes *dst*)."""
        if self.url is None or self.out_dir is None:
            return self.url
        return f"{self.url.rstrip('/')}/{dst.relative_to(self.out_dir).as_posix()}"

    def check(self, inputs: Inputs, made: bool = False) -> None:
        """check_output_path for every output written here (an object is checked as it is
        opened, remote.py); in a folder not yet *made*, only for those whose folder exists
        already (a lone output's must)."""
        for src, dst in [*zip(inputs.files, self.targets, strict=True), *self.copies]:
            if self.url_of(dst) is not None and dst in self.targets:
                continue
            if made or self.out_dir is None or dst.parent.is_dir():
                check_output_path(src, dst, self.clobber)


@dataclass(frozen=True)
class Target:
    """Where pass 2 writes one file: *dst*, through a temporary file in *temp_dir*, and only
    if the input is still the file pass 1 measured (*identity*)."""

    dst: Path
    temp_dir: Path | None
    clobber: bool
    identity: Identity
    source: Path | ObjectSource | None = None  # the input as the task reaches it (_sent)
    url: str | None = None  # the object the task uploads its output to, instead of dst


def rewrite_files(
    inputs: Inputs,
    outputs: Outputs,
    strategy: Strategy,
    options: Options,
    *,
    scheduler: str | None = None,
    shards: ShardProgress | None = None,
    progress: Progress = SILENT,
) -> RewriteReport:
    """Rewrite every source through *strategy* into *outputs*: one plan over all of them.

    A lone source (without a scheduler) is measured and written in one child, its file open
    from pass 1 to pass 2; several go through the executor that options.jobs and *scheduler*
    choose (see executors.executor_for), phase after phase.
    """
    outputs.check(inputs)
    if len(inputs.files) == 1 and outputs.out_dir is None and scheduler is None:
        return _rewrite_alone(inputs, outputs, strategy, options, progress)
    # several files at once, each in one process; or one after another, each on every core
    jobs = options.jobs
    pool = jobs if scheduler or ((jobs or 1) > 1 and len(inputs.files) > 1) else None
    options = replace(options, jobs=1) if pool else options
    with ExitStack() as cleanup, executor_for(pool, scheduler) as executor:
        here = progress if isinstance(executor, InThisThread) else SILENT
        measurement = measure(
            inputs, options, executor=executor, require_counted=True, shards=shards, progress=here
        )
        plan = measurement.plan(strategy)
        inputs.check_unchanged()  # pass 2 writes from the files pass 1 measured
        _make_folders([dst.parent for dst in [*outputs.targets, *(c for _, c in outputs.copies)]])
        outputs.check(inputs, made=True)
        temp_dir = cleanup.enter_context(staging(outputs.out_dir or outputs.targets[0].parent))
        tasks = [
            (
                m,
                Target(
                    dst,
                    temp_dir,
                    outputs.clobber,
                    inputs.identities[m.path],
                    _sent(m.path, executor),
                    outputs.url_of(dst),
                ),
                plan,
                options,
                here,
            )
            for m, dst in zip(measurement.files, outputs.targets, strict=True)
        ]
        written = run_all(executor, write_source, tasks, _counter("writing", len(tasks), shards))
        for src, dst in outputs.copies:
            with (
                atomic_output(dst, outputs.clobber, temp_dir, mode_from=src) as tmp,
                _output_errors(dst),
            ):
                _copy_file(src, tmp)
    return rewrite_report(measurement, plan, written, outputs)


def _rewrite_alone(
    inputs: Inputs, outputs: Outputs, strategy: Strategy, options: Options, progress: Progress
) -> RewriteReport:
    """One source: pass 1, the plan and pass 2 in one child, the file open throughout."""
    src, dst = inputs.files[0], outputs.targets[0]
    identity = inputs.identities[src]  # the file measured must be the file written from
    target = Target(dst, None, outputs.clobber, identity, url=outputs.url_of(dst))
    with _written_at(target, src, options, progress) as tmp, unchanged(src, identity):
        work = (tmp, dst, strategy, inputs)
        measured, plan, written = in_child(src, options, progress, _session, *work)
    measurement = Measurement(inputs, options, (measured,))
    return rewrite_report(measurement, plan, [written], outputs)


def _session(
    tfile: TensorFile,
    options: Options,
    progress: Progress,
    tmp: Path,
    dst: Path,
    strategy: Strategy,
    inputs: Inputs,
) -> tuple[Measured, Plan, Written]:
    """The lone source's two passes, on the file opened once."""
    check_globs([t.name for t in tfile.tensors], options.include, options.exclude)
    refuse_if_none_counted(tfile.path, counted_or_why(tfile.tensors))
    measurement = Measurement(inputs, options, (measure_opened(tfile, options, progress),))
    inputs.identities[tfile.path].check(tfile.path)
    plan = measurement.plan(strategy)
    return measurement.files[0], plan, write_opened(tfile, options, progress, tmp, dst, plan)


def write_source(
    measured: Measured, target: Target, plan: Plan, options: Options, progress: Progress = SILENT
) -> Written:
    """Pass 2 of one file (a task): a temporary file in the target's folder of temporary
    files, renamed into place when complete (so a task tried again, or killed, leaves nothing
    half-written at the target), and only if the file is still the one pass 1 measured (a
    remote object sent by its URL: its version, checked by its reader)."""
    source = target.source or measured.path
    with reachable(source) as src, ExitStack() as checks:
        tmp = checks.enter_context(_written_at(target, src, options, progress))
        if not isinstance(source, ObjectSource):
            checks.enter_context(unchanged(src, target.identity))
        planned_as = str(measured.path)  # the plan names files as this process found them
        return in_child(src, options, progress, write_opened, tmp, target.dst, plan, planned_as)


@contextmanager
def _written_at(target: Target, src: Path, options: Options, progress: Progress) -> Iterator[Path]:
    """Where pass 2 writes *target*: a temporary file renamed into place when complete; for an
    object (target.url), a stream uploaded as it is written (engine.rewrite writes it in
    order, or stages what cannot be), or, for a format whose writer needs a named file, a
    temporary file of this process's (removed by it whatever stops the writer) uploaded when
    complete.  Either way the output appears whole or not at all."""
    if target.url is None:
        with atomic_output(target.dst, target.clobber, target.temp_dir, mode_from=src) as tmp:
            yield tmp
        return
    size = src.stat().st_size  # the output's, about (a stand-in is as long as its object)
    storage, clobber = options.storage, target.clobber
    if needs_named_output(options.file_format or detect_format(src)):
        with uploaded_file(target.url, storage, clobber, progress.listener, size) as tmp:
            yield tmp
        return
    with streamed_upload(target.url, storage, clobber, size) as stream:
        yield stream


def write_opened(
    tfile: TensorFile,
    options: Options,
    progress: Progress,
    tmp: Path,
    dst: Path,
    plan: Plan,
    planned_as: str | None = None,
) -> Written:
    """Pass 2 into *tmp*, or, when no value would change, a byte copy (errors name *dst*);
    *planned_as*: the file's name in *plan*, when it is opened here by another path."""
    file = planned_as or str(tfile.path)
    with _output_errors(dst):
        if plan.rewrites(file, options):
            rewriter = plan.rewriter(file, options)
            jobs = options.processes
            after = rewrite(tfile, tmp, rewriter, options.chunk_size, jobs, progress)
            return Written(tuple(after), rewriter.clamped)
        size = tfile.path.stat().st_size
        progress.begin(COPYING, size)
        if isinstance(tfile, CopiesItself):  # a remote object's reader: not its stand-in's bytes
            tfile.copy_to(tmp)
        else:
            _copy_file(tfile.path, tmp)
        progress.advance(size)
        return Written()


def rewrite_report(
    measurement: Measurement, plan: Plan, written: Sequence[Written], outputs: Outputs
) -> RewriteReport:
    """The report of a rewrite: what pass 1 measured, what the plan gave each tensor, what
    pass 2 wrote."""
    options = measurement.options
    after = [
        stats
        for measured, done in zip(measurement.files, written, strict=True)
        for stats in (measured.stats if done.after is None else done.after)
    ]
    clamped = {
        (str(m.path), name): n
        for m, done in zip(measurement.files, written, strict=True)
        for name, n in done.clamped.items()
    }
    total_after = combine(after, options.norm_type)
    base = _inspect_report(measurement)
    tensors = tensor_reports(measurement.records, measurement.global_norm, options.norm, after)
    tensors = tuple(_with_changes(t, plan, clamped) for t in tensors)
    copied = outputs.out_dir is not None
    return RewriteReport(
        path=base.path,
        file_format=base.file_format,
        norm_type=base.norm_type,
        global_norm=base.global_norm,
        tensors=tensors,
        files=base.files,
        nonfinite_policy=base.nonfinite_policy,
        not_read=_not_read(measurement.inputs, copied=copied),
        strategy=plan.strategy,
        output=str(outputs.out_dir or outputs.targets[0]),
        global_norm_after=options.norm(total_after),
        scale=plan.scale,
        clipped=plan.changes,
        groups=plan.groups if plan.strategy.groups_table else (),
    )


def _with_changes(
    tensor: TensorReport, plan: Plan, clamped: dict[tuple[str, str], int]
) -> TensorReport:
    """*tensor* with the factor it was multiplied by, or the count of values clamped."""
    if tensor.skipped:
        return tensor
    key = (tensor.file or "", tensor.name)
    if plan.factors:
        return replace(tensor, scale=plan.factors[key].hi)
    return replace(tensor, clamped=clamped.get(key, 0))


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


def _title(inputs: Inputs) -> str:
    return str(inputs.files[0]) if len(inputs.files) == 1 else f"{len(inputs.files)} files"


def _counter(phase: str, total: int, shards: ShardProgress | None) -> Callable[[], None] | None:
    """What to call as each of *total* files is done with *phase*, to tell *shards*."""
    if shards is None:
        return None
    count = iter(range(1, total + 1))
    shards(phase, 0, total)
    return lambda: shards(phase, next(count), total)


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


def _make_folders(folders: Sequence[Path]) -> None:
    for folder in dict.fromkeys(folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(folder, f"cannot make the folder: {exc.strerror or exc}") from None


def _copy_file(src: Path, dst: Path) -> None:
    """Copy *src*'s bytes into the file (or stream) *dst*; failing to open *src* is the
    input's error."""
    try:
        if is_stream(dst):  # copyfile refuses pipes
            with open(src, "rb") as source, open(dst, "wb") as copy:
                shutil.copyfileobj(source, copy, _COPY_PIECE)
        else:
            shutil.copyfile(src, dst)
    except OSError as exc:
        if exc.filename is None or os.fspath(exc.filename) != os.fspath(src):
            raise
        raise InputError(src, f"cannot read: {exc.strerror or exc}") from None


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
