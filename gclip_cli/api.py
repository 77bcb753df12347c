"""The library API: one function per command, with explicit keyword parameters; the options
every command shares come whole, as an :class:`~gclip_cli.options.Options`.

    >>> from gclip_cli import Options, inspect_files, rescale_file
    >>> inspect_files(["grads.h5"], max_norm=1.0).scale
    >>> rescale_file("grads.npz", "clipped.npz", max_norm=1.0, options=Options(norm_type=2.0))

Paths may name files, folders (their tensor files) and sharded checkpoints' ``*.index.json``,
or be URLs (``s3://...``, see remote.py; ``options.storage_options`` for their file systems).
Failures raise :class:`~gclip_cli.errors.GclipError` subclasses, each with the CLI's exit code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from . import pipeline
from .errors import UsageError
from .options import DEFAULT_CHUNK_SIZE, NonFinite, Options
from .progress import Listener, Progress
from .remote import (
    refuse_onto_inputs,
    refuse_targets,
    staged_inputs,
    standing_for,
    uploaded_folder,
)
from .reports import InspectReport, RewriteReport
from .sources import resolve
from .strategies import ClipValue, GlobalNorm, Groups, Normalize, PerTensor, Strategy
from .urls import is_remote, local_path, open_remote

if TYPE_CHECKING:
    from .compare import Diff
    from .history import History
    from .layer_history import LayerHistory

PathLike = str | os.PathLike[str]
ShardProgress = Callable[[str, int, int], None]
_DEFAULTS = Options()

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "NonFinite",
    "Options",
    "clip_value_file",
    "clip_value_files",
    "diff_files",
    "history_of",
    "inspect_file",
    "inspect_files",
    "normalize_file",
    "normalize_files",
    "rescale_file",
    "rescale_files",
    "rescale_strategy",
    "rewrite_file",
    "rewrite_files",
]


def inspect_files(
    paths: Sequence[PathLike],
    *,
    max_norm: float | None = None,
    eps: float = 0.0,
    options: Options = _DEFAULTS,
    require_counted: bool = False,
    progress: Listener | None = None,
) -> InspectReport:
    """Every tensor's norm, share, max |x| and NaN/Inf count, and one global norm over all
    of *paths*; with *max_norm*, also the factor rescale would apply (max_norm / (norm + eps)).

    With ``options.nonfinite`` "zero" or "keep" the global norm is that of the finite values
    (as rescale would use), else it is NaN/inf when the values hold NaN/Inf.  With
    *require_counted*, inputs with no tensor to count are refused (as norm and check do).
    *progress*, if given, is called with each progress event (see progress.py) as the work
    advances, here and in the children that do it.
    """
    with staged_inputs(_names(paths), options.storage, progress) as (local, shown):
        report = pipeline.inspect(
            resolve(local),
            options,
            max_norm=max_norm,
            eps=eps,
            require_counted=require_counted,
            progress=Progress(progress),
        )
    return report.shown_as(shown)


def inspect_file(
    path: PathLike,
    *,
    max_norm: float | None = None,
    eps: float = 0.0,
    options: Options = _DEFAULTS,
    progress: Listener | None = None,
) -> InspectReport:
    """inspect_files of one path."""
    return inspect_files([path], max_norm=max_norm, eps=eps, options=options, progress=progress)


def rescale_strategy(
    max_norm: float | None = None,
    *,
    per_tensor: bool = False,
    groups: Sequence[tuple[str, float]] = (),
    eps: float = 0.0,
) -> Strategy:
    """The clipping rescale does: by the global norm; each tensor by its own (*per_tensor*);
    or each group of *groups* ((glob, max_norm) pairs, first match wins) by its own, the
    tensors no glob matches by *max_norm* (or not at all without it)."""
    if groups:
        return Groups(groups=tuple(groups), default=max_norm, eps=eps)
    if max_norm is None:
        raise UsageError(None, "give a max norm, or groups with their own max norms")
    if per_tensor:
        return PerTensor(max_norm=max_norm, eps=eps)
    return GlobalNorm(max_norm=max_norm, eps=eps)


def rewrite_file(
    src: PathLike,
    dst: PathLike,
    strategy: Strategy,
    *,
    options: Options = _DEFAULTS,
    clobber: bool = True,
    progress: Listener | None = None,
) -> RewriteReport:
    """Write *src* to *dst* (same format) with its values changed as *strategy* says; *src*
    is never modified.

    *dst* appears only when complete; with *clobber* off an existing *dst* is never replaced.
    NaN/Inf values: ``options.nonfinite`` "error" raises NonFiniteError before anything is
    written; "zero" counts them as 0 and writes 0; "keep" clips by the norm of the finite
    values and writes NaN/Inf back unchanged.  *progress*: as for inspect_files.
    """
    storage = options.storage
    with (
        staged_inputs(_names([src]), storage, progress) as (local, shown),
        _output(os.fspath(dst), [os.fspath(src)], storage) as (out, url),
    ):
        outputs = pipeline.Outputs.one_file(out, clobber, url)
        report = pipeline.rewrite_files(
            resolve(local), outputs, strategy, options, progress=Progress(progress)
        )
    return report.shown_as({**shown, **_remote_name(out, dst)})


def rewrite_files(
    paths: Sequence[PathLike],
    out_dir: PathLike,
    strategy: Strategy,
    *,
    options: Options = _DEFAULTS,
    clobber: bool = True,
    scheduler: str | None = None,
    shards: ShardProgress | None = None,
) -> RewriteReport:
    """Rewrite the files *paths* name (files, folders, ``*.index.json``) into *out_dir* with
    one plan over all of them, each under its path relative to their common folder; indexes
    and the folders' other files are copied unchanged, so *out_dir* is a whole checkpoint.

    Where it runs: file after file here, each large file on every core (``options.jobs``
    processes); with ``options.jobs`` > 1 and several files, that many files at once in a
    process pool; with *scheduler*, on the Dask cluster at that address (``local[:N]`` starts
    one here).  The result is identical to the last bit whichever.  With *scheduler* and a URL
    *out_dir*, each worker uploads the shards it writes itself (safetensors objects it reads
    by their URLs too: no file system shared with this process needed).  *shards*(phase,
    files done, files) is called as files finish.
    """
    storage = options.storage
    with (
        staged_inputs(_names(paths), storage) as (local, shown),
        _output_folder(os.fspath(out_dir), shown.values(), storage, clobber) as folder,
    ):
        inputs = resolve(local)
        url = os.fspath(out_dir) if is_remote(os.fspath(out_dir)) else None
        outputs = pipeline.Outputs.folder(inputs, folder, clobber, url)
        if url is not None:  # each shard uploaded as it is written: all checked now
            targets = [outputs.url_of(dst) for dst in outputs.targets]
            refuse_targets(
                [open_remote(t, storage) for t in targets], shown.values(), storage, clobber
            )
        report = pipeline.rewrite_files(
            inputs, outputs, strategy, options, scheduler=scheduler, shards=shards
        )
    return report.shown_as({**shown, **_remote_name(folder, out_dir)})


def rescale_file(
    src: PathLike,
    dst: PathLike,
    *,
    max_norm: float | None = None,
    per_tensor: bool = False,
    groups: Sequence[tuple[str, float]] = (),
    eps: float = 0.0,
    options: Options = _DEFAULTS,
    clobber: bool = True,
    progress: Listener | None = None,
) -> RewriteReport:
    """Clip *src* into *dst* as rescale_strategy() says (by the global norm by default); see
    rewrite_file."""
    strategy = rescale_strategy(max_norm, per_tensor=per_tensor, groups=groups, eps=eps)
    return rewrite_file(src, dst, strategy, options=options, clobber=clobber, progress=progress)


def rescale_files(
    paths: Sequence[PathLike],
    out_dir: PathLike,
    *,
    max_norm: float | None = None,
    per_tensor: bool = False,
    groups: Sequence[tuple[str, float]] = (),
    eps: float = 0.0,
    options: Options = _DEFAULTS,
    clobber: bool = True,
    scheduler: str | None = None,
    shards: ShardProgress | None = None,
) -> RewriteReport:
    """Clip the files *paths* name by one plan into *out_dir*; see rewrite_files."""
    strategy = rescale_strategy(max_norm, per_tensor=per_tensor, groups=groups, eps=eps)
    return rewrite_files(
        paths,
        out_dir,
        strategy,
        options=options,
        clobber=clobber,
        scheduler=scheduler,
        shards=shards,
    )


def clip_value_file(
    src: PathLike,
    dst: PathLike,
    *,
    max_value: float,
    options: Options = _DEFAULTS,
    clobber: bool = True,
    progress: Listener | None = None,
) -> RewriteReport:
    """Clamp every gradient value of *src* to [-max_value, max_value] into *dst*."""
    strategy = ClipValue(max_value=max_value)
    return rewrite_file(src, dst, strategy, options=options, clobber=clobber, progress=progress)


def clip_value_files(
    paths: Sequence[PathLike],
    out_dir: PathLike,
    *,
    max_value: float,
    options: Options = _DEFAULTS,
    clobber: bool = True,
    scheduler: str | None = None,
) -> RewriteReport:
    """clip_value_file for the files *paths* name, into *out_dir*; see rewrite_files."""
    strategy = ClipValue(max_value=max_value)
    return rewrite_files(
        paths, out_dir, strategy, options=options, clobber=clobber, scheduler=scheduler
    )


def normalize_file(
    src: PathLike,
    dst: PathLike,
    *,
    target_norm: float,
    eps: float = 0.0,
    options: Options = _DEFAULTS,
    clobber: bool = True,
    progress: Listener | None = None,
) -> RewriteReport:
    """Scale *src* so that its global norm becomes *target_norm* (up or down) into *dst*: the
    factor is target_norm / (norm + eps); a zero gradient stays zero; refused when a value
    would overflow its dtype."""
    strategy = Normalize(target_norm=target_norm, eps=eps)
    return rewrite_file(src, dst, strategy, options=options, clobber=clobber, progress=progress)


def normalize_files(
    paths: Sequence[PathLike],
    out_dir: PathLike,
    *,
    target_norm: float,
    eps: float = 0.0,
    options: Options = _DEFAULTS,
    clobber: bool = True,
    scheduler: str | None = None,
) -> RewriteReport:
    """normalize_file for the files *paths* name, by their one global norm, into *out_dir*."""
    strategy = Normalize(target_norm=target_norm, eps=eps)
    return rewrite_files(
        paths, out_dir, strategy, options=options, clobber=clobber, scheduler=scheduler
    )


def history_of(
    paths: Sequence[PathLike],
    *,
    percentile: float = 95.0,
    max_norm: float | None = None,
    as_given: bool = False,
    options: Options = _DEFAULTS,
    progress: Listener | None = None,
) -> History:
    """The global norm of each file (one training step each), in step order unless
    *as_given*, with percentiles and a suggested max norm (the *percentile*-th); with
    *max_norm*, how many steps it would clip.

    A file's step is a ``global_step`` or ``step`` entry of its metadata (safetensors
    ``__metadata__``, an HDF5 root attribute), else a 0-d integer tensor so named, else the
    number after step/iter/it in its name's stem, else the stem's last number.  In step order,
    a file without a step, or two files with one step, are a UsageError.
    """
    from .history import history

    with staged_inputs(_names(paths), options.storage, progress) as (local, shown):
        found = history(
            resolve(local),
            options,
            percentile=percentile,
            max_norm=max_norm,
            as_given=as_given,
            progress=Progress(progress),
        )
    return found.shown_as(shown)


def layer_history_of(
    paths: Sequence[PathLike],
    *,
    spike: float = 4.0,
    depth: int | None = None,
    as_given: bool = False,
    options: Options = _DEFAULTS,
    progress: Listener | None = None,
) -> LayerHistory:
    """The norm of each layer (the name up to its first number, or its first *depth*
    components) of each file (one training step each, ordered as history_of orders them),
    its share of the step's norm, and the steps where a layer's norm exceeds *spike* times the
    median of its own earlier steps (from its third step on), the first of them for the run."""
    from .layer_history import layer_history

    with staged_inputs(_names(paths), options.storage, progress) as (local, shown):
        found = layer_history(
            resolve(local),
            options,
            spike=spike,
            depth=depth,
            as_given=as_given,
            progress=Progress(progress),
        )
    return found.shown_as(shown)


def diff_files(
    path_a: PathLike,
    path_b: PathLike,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    options: Options = _DEFAULTS,
) -> Diff:
    """Whether two dumps hold the same tensors with the same values (Diff.same), each one's
    own global L2 norm, and per tensor the L2 norms side by side, their ratio and cosine
    similarity.  Names are paired with ``.`` and ``/`` alike (see compare.py for what is
    compared); finite values a of A and b of B match when |a - b| <= atol + rtol * |b|, as
    numpy.allclose says (the default: when equal); of *options*, chunk_size, nonfinite,
    include, exclude and file_format count."""
    from .compare import Tolerance, diff

    with staged_inputs(_names([path_a, path_b]), options.storage) as ((a, b), shown):
        compared = diff(Path(a), Path(b), options, Tolerance(rtol, atol))
    return compared.shown_as(shown)


def _names(paths: Sequence[PathLike]) -> list[str]:
    return [os.fspath(p) for p in paths]


def _remote_name(local: Path, given: PathLike) -> dict[str, str]:
    """The name to show for *local* when it stands for the URL *given* (else none)."""
    return {str(local): os.fspath(given)} if is_remote(os.fspath(given)) else {}


@contextmanager
def _output(
    dst: str, inputs: Sequence[str], storage: Mapping[str, object]
) -> Iterator[tuple[Path, str | None]]:
    """Where to write *dst*: the file itself; or, for a URL, a local name that stands for it
    (errors about it name the URL; nothing is written there) and the URL, which pass 2
    uploads to (pipeline._written_at)."""
    if not is_remote(dst):
        yield Path(local_path(dst)), None
        return
    refuse_onto_inputs(dst, inputs, storage)
    with standing_for(dst) as name:
        yield name, dst


@contextmanager
def _output_folder(
    out_dir: str, read: Collection[str], storage: Mapping[str, object], clobber: bool
) -> Iterator[Path]:
    """The folder to write into: *out_dir*, or a temporary one uploaded to its URL (where no
    file may replace an object *read*)."""
    if not is_remote(out_dir):
        yield Path(local_path(out_dir))
        return
    refuse_onto_inputs(out_dir, list(read), storage)
    with uploaded_folder(out_dir, storage, clobber, inputs=read) as path:
        yield path
