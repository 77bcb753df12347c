"""Inputs and outputs named by URL (``s3://``, ``gs://``, ``az://``, ``hf://``, ``https://``,
``memory://``, ...), through fsspec and the backend each protocol needs (an optional extra).

How, in this version: an object of any format is read by ranges, with no local copy: the
pipeline is given a stand-in (formats/ranged.py), a local file that names it, and both passes
fetch its values a window at a time.  With $GCLIP_REMOTE_COPY=1 every object is downloaded in
pieces (memory does not grow with the object) into a private temporary folder, once its size
is known to fit there, and read there as a local file.

An output object is written by a file opened with autocommit off (S3: a multipart upload,
completed only when every part is in; any failure, refusal or Ctrl-C aborts it, so that no
partial object appears and no upload stays open).  To the pipeline it is a stream
(streamed_upload: a pipe whose bytes a thread uploads as they come): pass 2 writes into it
front to back where the file can (formats.WritesInOrder), else into a temporary file first
(engine.rewrite); a format whose writer needs a named file (HDF5) writes a temporary file of
the uploading process's, uploaded when complete (uploaded_file).  fsspec is imported only
when a URL is given: local work starts as light as before.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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
_PIPE_BUFFER = 1 << 20  # a pipe's buffer where Linux allows it to grow (pipe-max-size)
# Seconds a stopping gclip waits for an upload to end (its last request to finish, the upload
# aborted) before it goes without: a store that does not answer holds it no longer.
_GIVE_UP_AFTER = 10.0
# Where an open descriptor can be reopened by name (Linux), as output.py reaches its files
_DESCRIPTORS = Path("/proc/self/fd")


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
    ranged: bool = True  # objects of formats with a ranged reader read so (else downloaded)
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
        _make_room(remote.url, self.root, size)
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


def _make_room(url: str, folder: Path, size: int, output: bool = False) -> None:
    """Refuse *size* more bytes in *folder* (for the input, or the *output*, *url*) where
    they would leave less free than a spool may."""
    from .streams import spool_limit

    limit = spool_limit(folder)
    if size > limit:
        error, done = (OutputError, "written") if output else (InputError, "read")
        raise error(
            shown_url(url),
            f"needs {size:,} bytes in {folder.parent} to be {done} but only {limit:,} "
            "may be used there (the disk's free space less 5%, at most $GCLIP_SPOOL_LIMIT); "
            "set TMPDIR to a larger disk",
        )


def _copy_asked() -> bool:
    """Whether $GCLIP_REMOTE_COPY asks for local copies of every input object."""
    return os.environ.get(REMOTE_COPY_VARIABLE, "").strip() not in ("", "0")


def _read_by_ranges(remote: Remote) -> str | None:
    """The object's format if it is read by ranges, with no local copy (a format with a
    ranged reader: all of them, so far)."""
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
def standing_for(url: str) -> Iterator[Path]:
    """A local name for the output object *url* (in a private folder, removed after; nothing
    is written there): errors about it name *url*."""
    with _private_folder("gclip-output-") as root:
        local = root / (posixpath.basename(url.rstrip("/")) or "output")
        with _named_as({str(local): shown_url(url)}):
            yield local


@contextmanager
def uploaded_file(
    url: str,
    storage: Mapping[str, Any],
    clobber: bool = True,
    progress: Listener | None = None,
    size: int = 0,
) -> Iterator[Path]:
    """A local path to write the output to; once written, it is uploaded to *url*, whole or
    not at all (*progress* hears of the bytes sent).  *size*: the bytes it will hold, refused
    before any work where the temporary folder's disk has not that much room.  Errors about
    the local path name *url*."""
    remote = _writable(url, storage)
    _refuse_existing(remote, storage, clobber)  # before any work
    with _private_folder("gclip-output-") as root:
        _make_room(url, root, size, output=True)
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


@contextmanager
def streamed_upload(
    url: str, storage: Mapping[str, Any], clobber: bool = True, size: int = 0
) -> Iterator[Path]:
    """A path to write the output to front to back with plain writes (a pipe: no seeking, no
    patching afterwards), whose bytes go to *url* as they come, in parts of part_size(*size*,
    the bytes expected): no local copy, and memory holds a few parts.  The object is
    completed only if the block ends without error (else its upload is aborted: no partial
    object, no upload left open).  Errors about the path name *url*.  Where the system cannot
    name a pipe by path (no /proc), a temporary file uploaded when complete (uploaded_file)."""
    if not _DESCRIPTORS.is_dir():
        with uploaded_file(url, storage, clobber, size=size) as path:
            yield path
        return
    remote = _writable(url, storage)
    _refuse_existing(remote, storage, clobber)  # before any work
    with _PipeSender(remote, storage, size) as sender:
        with _named_as({str(sender.path): shown_url(url)}):
            yield sender.path
        sender.finish()
        _refuse_existing(remote, storage, clobber)  # it may have appeared meanwhile
        sender.commit()


class _PipeSender:
    """A pipe whose bytes a thread uploads to *remote* (an uncommitted file) as they come.

    The writer opens ``path`` (the pipe's write end, /proc/self/fd/N: a forked child reaches
    it through the descriptor it inherits); the object's bytes end when every write end is
    closed, this process's last (finish).  If the upload fails, or the work does (the
    sender is then stopping), the thread goes on reading and dropping what is written, so
    that a writer, in this process or a child holding the read end too, never blocks on a
    full pipe; an upload's error is raised by finish().  Stopping, the thread sends nothing
    more (no last part) and aborts the upload; it is waited for a while only (_GIVE_UP_AFTER):
    a store that does not answer must not keep Ctrl-C from stopping gclip.
    """

    def __init__(self, remote: Remote, storage: Mapping[str, Any], size: int) -> None:
        self._remote, self._storage, self._size = remote, storage, size
        self._read, self._write = os.pipe()
        _widen(self._write)
        self.path = _DESCRIPTORS / str(self._write)
        self._out: Any = None
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._send, name="gclip-upload", daemon=True)

    def __enter__(self) -> _PipeSender:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            return
        self._stopping.set()  # before the end of bytes: the thread must not send a last part
        self._end_of_bytes()
        self._thread.join(_GIVE_UP_AFTER)  # it aborts the upload as it ends
        if not self._thread.is_alive() and self._out is not None:
            _abandon(self._out)  # it had ended already (the commit failed, say)

    def finish(self) -> None:
        """Wait until every byte written is sent; raise the upload's error, if any."""
        self._end_of_bytes()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def commit(self) -> None:
        """Make the object appear, complete."""
        with remote_errors(OutputError, self._remote.url, self._storage, "cannot write"):
            self._out.commit()

    def _end_of_bytes(self) -> None:
        if self._write >= 0:
            os.close(self._write)
            self._write = -1

    def _send(self) -> None:
        buffer = memoryview(bytearray(_PIPE_BUFFER))  # the parts gather in the file
        with open(self._read, "rb", buffering=0) as pipe:
            try:
                with remote_errors(OutputError, self._remote.url, self._storage, "cannot write"):
                    self._out = _uncommitted(self._remote, self._size)
                    while (got := _fill(pipe, buffer)) and not self._stopping.is_set():
                        self._out.write(buffer[:got])
                    if not self._stopping.is_set():
                        self._out.close()  # the last part: commit() completes the object
            except BaseException as exc:
                self._error = exc
                self._stopping.set()
            finally:
                if self._stopping.is_set():
                    if self._out is not None:
                        _abandon(self._out)  # not a partial object, nor an upload left open
                    while pipe.readinto(buffer):
                        pass


def _fill(pipe: BinaryIO, buffer: memoryview) -> int:
    """Read from *pipe* until *buffer* is full or the pipe ends; the bytes read."""
    got = 0
    while got < len(buffer) and (n := pipe.readinto(buffer[got:])):
        got += n
    return got


def _widen(fd: int) -> None:
    """Give the pipe *fd* 1 MiB of buffer where allowed (Linux: 64 KiB by default), so that
    writer and uploader wait on one another less."""
    import fcntl  # not on every system

    with suppress(AttributeError, OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BUFFER)


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
    """Copy the file *local* to *remote*: the object appears complete, or (after any failure,
    Ctrl-C included) not at all, its multipart upload aborted."""
    size = local.stat().st_size
    progress.begin(UPLOADING, size)
    with remote_errors(OutputError, remote.url, storage, "cannot write"):
        out = _uncommitted(remote, size)
        try:
            with open(local, "rb") as src:
                while piece := src.read(_PIECE):
                    out.write(piece)
                    progress.advance(len(piece))
            out.close()  # the last part
            out.commit()
        except BaseException:
            _abandon(out)
            raise


def _uncommitted(remote: Remote, size: int = 0) -> Any:
    """A file that writes *remote*'s object but makes it appear only on commit(), and never
    after discard(): the backend's file opened with autocommit off (on S3, a multipart upload
    completed by commit() and aborted by discard()), in parts of part_size(*size*).  Not an
    fsspec transaction: that is one per file system object, which threads (Dask's) share."""
    if remote.protocol == "memory":  # its files ignore autocommit: one held until commit()
        return _HeldInMemory(remote)
    return remote.fs.open(remote.path, "wb", block_size=part_size(size), autocommit=False)


class _HeldInMemory(io.BytesIO):
    """An object of memory:// written at commit() (memory:// has no uploads to abort)."""

    def __init__(self, remote: Remote) -> None:
        super().__init__()
        self._remote = remote

    def close(self) -> None:
        pass  # the bytes are kept for commit()

    def commit(self) -> None:
        self._remote.fs.pipe_file(self._remote.path, self.getvalue())
        super().close()

    def discard(self) -> None:
        super().close()


def part_size(size: int) -> int:
    """The parts to upload a file of about *size* bytes in: _PIECE (the memory an upload holds
    is a few parts: s3fs's default, 50 MiB parts, held 4-5 times that), larger only where S3's
    limit of 10,000 parts asks for it (past 78 GiB), with room for an output a little larger
    than its input (a rebuilt .npz): an eighth more."""
    return max(_PIECE, -(-(size + size // 8) // _MOST_PARTS))


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
