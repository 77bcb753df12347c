"""Inputs and outputs named by URL (``s3://``, ``gs://``, ``az://``, ``hf://``, ``https://``,
``memory://``, ...), through fsspec and the backend each protocol needs (an optional extra).

How, in this version: a safetensors object is read by ranges, with no local copy: the
pipeline is given a stand-in (formats/ranged.py), a local file that names it, and both passes
fetch its values a window at a time.  Other input objects (.npz, HDF5: their readers work on
file descriptors) are downloaded in pieces (memory does not grow with the object) into a
private temporary folder, once their size is known to fit there, and read there as local
files; so is every object with $GCLIP_REMOTE_COPY=1.  An output URL is written into a
private temporary folder, then uploaded inside an fsspec transaction: S3 completes the
multipart upload only when every part is in, and any failure, refusal or Ctrl-C aborts it, so
that no partial object appears and no upload stays open.  fsspec is imported only when a URL
is given: local work starts as light as before.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GclipError, InputError, OutputError, UsageError
from .progress import SILENT, Listener, Progress
from .urls import (
    READ_ONLY,
    Remote,
    is_remote,
    is_url,
    local_path,
    open_remote,
    remote_errors,
    shown_url,
    version_of,
)

DOWNLOADING = "downloading"  # progress phases, as the passes' (progress.py)
UPLOADING = "uploading"
REMOTE_COPY_VARIABLE = "GCLIP_REMOTE_COPY"  # 1: download every input object first
_PIECE = 8 << 20  # bytes copied at a time into an upload, and its smallest part
_MOST_PARTS = 10_000  # S3's most parts in a multipart upload


# --- inputs --------------------------------------------------------------------------------


@contextmanager
def staged_inputs(
    names: Sequence[str], storage: Mapping[str, Any], progress: Listener | None = None
) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Local paths for *names*: URLs downloaded into a private temporary folder (removed
    afterwards), the rest as given; and the URL to show for each local copy, in reports and
    in errors.  *progress* hears of the bytes downloaded (a phase per object)."""
    names = [local_path(n) if is_url(n) and not is_remote(n) else n for n in names]
    if not any(map(is_remote, names)):
        yield list(names), {}
        return
    from .formats.ranged import STAND_IN_FOLDER

    with _private_folder(STAND_IN_FOLDER) as root:
        stager = _Stager(root, storage, Progress(progress), ranged=not _copy_asked())
        local = [stager.stage(n) if is_remote(n) else n for n in names]
        try:
            yield local, dict(stager.shown)
        except GclipError as exc:
            if exc.path not in stager.shown:
                raise
            raise type(exc)(stager.shown[exc.path], exc.message) from None


@dataclass
class _Stager:
    """Downloads URLs under *root*, each at ``root/protocol/its path`` (so that inputs keep
    their names and folders relative to one another, as --out-dir lays them out)."""

    root: Path
    storage: Mapping[str, Any]
    progress: Progress = SILENT
    ranged: bool = True  # safetensors objects read by ranges (else downloaded, as the rest)
    shown: dict[str, str] = field(default_factory=dict)  # local copy -> URL

    def stage(self, url: str) -> str:
        remote = open_remote(url, self.storage)
        with remote_errors(InputError, url, self.storage, "cannot read"):
            info = remote.fs.info(remote.path)
            if info.get("type") == "directory":
                return str(self._folder(remote))
            if url.endswith(".index.json"):
                return str(self._index(remote, info))
            return str(self._file(remote, info))

    def _local(self, remote: Remote) -> Path:
        return self.root / remote.protocol / remote.path.strip("/")

    def _file(self, remote: Remote, info: Mapping[str, Any]) -> Path:
        local = self._local(remote)
        if str(local) in self.shown:
            return local  # named twice: downloaded once
        size = int(info.get("size") or 0)
        local.parent.mkdir(parents=True, exist_ok=True)
        self.shown[str(local)] = shown_url(remote.url)
        file_format = _read_by_ranges(remote) if self.ranged else None
        if file_format is not None:
            from .formats.ranged import StandIn

            StandIn(remote.url, file_format, size, version_of(remote)).write(local)
            return local
        self._make_room(remote.url, size)
        self.progress.begin(DOWNLOADING, size)
        remote.fs.get_file(remote.path, str(local), callback=_told(self.progress))
        if local.stat().st_size != size:
            raise InputError(shown_url(remote.url), "changed while gclip downloaded it")
        return local

    def _folder(self, remote: Remote) -> Path:
        """A prefix: the objects directly in it (as a local folder's files are read)."""
        local = self._local(remote)
        local.mkdir(parents=True, exist_ok=True)
        self.shown[str(local)] = shown_url(remote.url)
        for entry in remote.fs.ls(remote.path, detail=True):
            inside = remote.child(posixpath.basename(entry["name"].rstrip("/")))
            if entry.get("type") == "file":
                self._file(inside, entry)
            else:  # listed as not read, as a local folder's folders are
                self._local(inside).mkdir(parents=True, exist_ok=True)
                self.shown[str(self._local(inside))] = shown_url(inside.url)
        return local

    def _index(self, remote: Remote, info: Mapping[str, Any]) -> Path:
        """A sharded checkpoint's index and the shards it names (checked by sources.py)."""
        from .sources import read_index

        local = self._file(remote, info)
        folder = Remote(remote.url.rsplit("/", 1)[0], remote.fs, posixpath.dirname(remote.path))
        for shard in read_index(local).shards:
            name = shard.relative_to(local.parent).as_posix()
            piece = folder.child(name)
            self._file(piece, piece.fs.info(piece.path))
        return local

    def _make_room(self, url: str, size: int) -> None:
        """Refuse *size* more bytes where they would leave less free than a spool may."""
        from .streams import spool_limit

        limit = spool_limit(self.root)
        if size > limit:
            raise InputError(
                shown_url(url),
                f"needs {size:,} bytes in {self.root.parent} to be read but only {limit:,} "
                "may be used there (the disk's free space less 5%, at most $GCLIP_SPOOL_LIMIT); "
                "set TMPDIR to a larger disk",
            )


def _copy_asked() -> bool:
    """Whether $GCLIP_REMOTE_COPY asks for local copies of every input object."""
    return os.environ.get(REMOTE_COPY_VARIABLE, "").strip() not in ("", "0")


def _read_by_ranges(remote: Remote) -> str | None:
    """The object's format if it is read by ranges, with no local copy (safetensors, so far:
    the other formats read their files through descriptors, so they get a local copy)."""
    from .formats import FORMATS
    from .formats.signatures import read_head

    with remote.fs.open(remote.path, "rb", block_size=1 << 16) as file:
        return FORMATS.read_by_ranges(read_head(file), file)


# --- inputs sent to other machines ---------------------------------------------------------


@dataclass(frozen=True)
class ObjectSource:
    """A remote object as a task sent to a Dask worker names it: by its stand-in's content
    (URL, format, size, version), not by the stand-in, a file on the client only.  *path*,
    the client's stand-in, is how the results name it."""

    path: Path
    stand_in: Any  # formats.ranged.StandIn


def portable(src: Path) -> Path | ObjectSource:
    """*src* as a task for a worker on any machine names it: a stand-in by what it stands
    for; another file as its path (a file system the worker must share)."""
    from .formats.ranged import StandIn

    stand_in = StandIn.read(src)
    return src if stand_in is None else ObjectSource(src, stand_in)


@contextmanager
def reachable(src: Path | ObjectSource) -> Iterator[Path]:
    """On a worker: a local path for *src*, an object's stand-in made here (in a private
    folder, removed after) from what the client sent; the object's version travels with it, so
    that one replaced since the client found it is refused."""
    if not isinstance(src, ObjectSource):
        yield src
        return
    from .formats.ranged import STAND_IN_FOLDER

    with _private_folder(STAND_IN_FOLDER) as root:
        local = root / src.path.name
        src.stand_in.write(local)
        with _named_as({str(local): str(src.path)}):
            yield local


# --- outputs -------------------------------------------------------------------------------


def refuse_onto_inputs(out: str, inputs: Sequence[str], storage: Mapping[str, Any]) -> None:
    """Refuse an output URL that names one of the inputs (gclip never changes an input)."""
    target = _place(open_remote(out, storage))
    for name in filter(is_remote, inputs):
        if _place(open_remote(name, storage)) == target:
            raise OutputError(shown_url(out), "is the input; write the output to another URL")


@contextmanager
def uploaded_file(
    url: str, storage: Mapping[str, Any], clobber: bool = True, progress: Listener | None = None
) -> Iterator[Path]:
    """A local path to write the output to; once written, it is uploaded to *url*, whole or
    not at all (*progress* hears of the bytes sent).  Errors about the local path name
    *url*."""
    remote = _writable(url, storage)
    _refuse_existing(remote, storage, clobber)  # before any work
    with _private_folder("gclip-output-") as root:
        local = root / (posixpath.basename(remote.path.rstrip("/")) or "output")
        with _named_as({str(local): shown_url(url)}):
            yield local
        _refuse_existing(remote, storage, clobber)  # it may have appeared meanwhile
        upload(local, remote, storage, Progress(progress))


@contextmanager
def uploaded_folder(
    url: str,
    storage: Mapping[str, Any],
    clobber: bool = True,
    progress: Listener | None = None,
    inputs: Collection[str] = (),
) -> Iterator[Path]:
    """A local folder to write outputs into; once complete, every file in it is uploaded
    under *url* at its relative path, each whole or not at all (a failure stops there: the
    files uploaded before it stay).  None may replace one of the objects *inputs* (URLs)."""
    remote = _writable(url, storage)
    with _private_folder("gclip-out-dir-") as root:
        local = root / "out"
        local.mkdir()
        with _named_as({str(local): shown_url(url)}):
            yield local
        files = sorted(p for p in local.rglob("*") if p.is_file())
        targets = [remote.child(p.relative_to(local).as_posix()) for p in files]
        refuse_targets(targets, inputs, storage, clobber)
        for path, target in zip(files, targets, strict=True):
            upload(path, target, storage, Progress(progress))


def refuse_targets(
    targets: Sequence[Remote], inputs: Collection[str], storage: Mapping[str, Any], clobber: bool
) -> None:
    """Refuse to write any of *targets* over one of the objects *inputs* (URLs), or over an
    existing object when *clobber* is off."""
    read = {_place(open_remote(name, storage)) for name in filter(is_remote, inputs)}
    for target in targets:
        if _place(target) in read:
            raise OutputError(shown_url(target.url), "is an input; give another --out-dir")
        _refuse_existing(target, storage, clobber)


def _place(remote: Remote) -> tuple[str, str]:
    return remote.protocol, remote.path.rstrip("/")


def _writable(url: str, storage: Mapping[str, Any]) -> Remote:
    remote = open_remote(url, storage)
    if remote.protocol in READ_ONLY:
        raise UsageError(None, f"{remote.protocol}:// URLs are read only: write elsewhere")
    return remote


def _refuse_existing(remote: Remote, storage: Mapping[str, Any], clobber: bool) -> None:
    """Refuse a prefix as the output, and an existing object when *clobber* is off; an
    unreachable store is found here, before any work."""
    with remote_errors(OutputError, remote.url, storage, "cannot write"):
        if remote.fs.isdir(remote.path):
            raise OutputError(shown_url(remote.url), "is a folder (prefix); give an object name")
        if not clobber and remote.fs.exists(remote.path):
            raise OutputError(shown_url(remote.url), "exists and --no-clobber was given")


def upload(
    local: Path, remote: Remote, storage: Mapping[str, Any], progress: Progress = SILENT
) -> None:
    """Copy the file *local* to *remote* in one transaction: the object appears complete, or
    (after any failure, Ctrl-C included) not at all, its multipart upload aborted."""
    fs = remote.fs
    size = local.stat().st_size
    progress.begin(UPLOADING, size)
    with remote_errors(OutputError, remote.url, storage, "cannot write"), fs.transaction:
        out = fs.open(remote.path, "wb", block_size=part_size(size))
        try:
            with open(local, "rb") as src:
                while piece := src.read(_PIECE):
                    out.write(piece)
                    progress.advance(len(piece))
        except BaseException:
            _abandon(out)
            raise
        out.close()  # the last part; the transaction commits it on leaving


def part_size(size: int) -> int:
    """The parts to upload a file of *size* bytes in: _PIECE (the memory an upload holds is
    a few parts: s3fs's default, 50 MiB parts, held 4-5 times that), larger only where S3's
    limit of 10,000 parts asks for it (past 78 GiB)."""
    return max(_PIECE, -(-size // _MOST_PARTS))


def _abandon(out: Any) -> None:
    """Abort what *out* has uploaded, and mark it closed: closing would upload its buffer."""
    with suppress(Exception):
        out.discard()
    with suppress(Exception):
        out.closed = True


def _told(progress: Progress) -> Any:
    """An fsspec callback that tells *progress* of the bytes copied."""
    from fsspec.callbacks import Callback

    class Told(Callback):
        def relative_update(self, inc: int = 1) -> None:
            progress.advance(inc)

    return Told()


# --- shared --------------------------------------------------------------------------------


@contextmanager
def _named_as(names: Mapping[str, str]) -> Iterator[None]:
    """Errors about the local paths in *names* name what they stand for."""
    try:
        yield
    except GclipError as exc:
        if exc.path not in names:
            raise
        raise type(exc)(names[exc.path], exc.message) from None


@contextmanager
def _private_folder(prefix: str) -> Iterator[Path]:
    """A new folder in the temporary folder, for this user only (mode 0700), removed after."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
