"""Standard input and output as files: every format needs seeking, so streams (standard input,
pipes given as inputs) are spooled to temporary files, within limits."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO

from .errors import GclipError, InputError, OutputError, UsageError
from .progress import SENDING, SILENT, Progress

STDIO = "-"
STDIN_NAME = "<stdin>"  # how errors and reports name standard input
STDOUT_NAME = "<stdout>"
# A spool of a stream stops before it leaves less than this share of its disk free.
SPOOL_RESERVE = 0.05
SPOOL_LIMIT_VARIABLE = "GCLIP_SPOOL_LIMIT"  # an upper limit of one's own, e.g. 20G
_SPOOL_PIECE = 1 << 20
_UNITS = {"K": 10, "M": 20, "G": 30, "T": 40}


@contextmanager
def local_inputs(paths: Sequence[str]) -> Iterator[list[str]]:
    """*paths* with ``-`` replaced by a temporary copy of standard input, and pipes (a FIFO,
    ``<(...)``) by temporary copies of what they hold (removed afterwards)."""
    if paths.count(STDIO) > 1:
        raise UsageError(None, "standard input (-) can be read only once")
    with ExitStack() as stack:
        local = [stack.enter_context(_local_copy(p)) for p in paths]
        shown = {
            spool: STDIN_NAME if p == STDIO else p
            for p, spool in zip(paths, local, strict=True)
            if spool != p
        }
        try:
            yield local
        except GclipError as exc:
            if exc.path not in shown:
                raise
            raise type(exc)(shown[exc.path], exc.message) from None  # not the spool's name


@contextmanager
def spooled_stdin() -> Iterator[str]:
    if is_terminal(sys.stdin):
        raise UsageError(None, "input '-' is a terminal: pipe a file in, e.g. < grads.safetensors")
    with _temporary("stdin") as path:
        _spool(sys.stdin.buffer, path, STDIN_NAME)
        yield str(path)


def _local_copy(path: str) -> AbstractContextManager[str]:
    if path == STDIO:
        return spooled_stdin()
    if _is_pipe(path):
        return spooled_pipe(path)
    return nullcontext(path)


def _is_pipe(path: str) -> bool:
    """Whether *path* is a pipe whose bytes can be spooled: not an index, whose shards are
    found beside it (the library refuses it, as it refuses devices)."""
    from .sources import INDEX_SUFFIX

    try:
        return stat.S_ISFIFO(os.stat(path).st_mode) and not path.endswith(INDEX_SUFFIX)
    except OSError:
        return False  # the library says what is wrong with it


@contextmanager
def spooled_pipe(path: str) -> Iterator[str]:
    """A temporary copy of what the pipe *path* holds, under the pipe's own name (history
    takes a step from it)."""
    with _temporary(Path(path).name) as spool:
        try:
            source = open(path, "rb")  # noqa: SIM115 - closed below; waits for a FIFO's writer
        except OSError as exc:
            raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
        with source:
            _spool(source, spool, path)
        yield str(spool)


def _spool(source: BinaryIO, spool: Path, name: str) -> None:
    """Copy the stream *source* into the file *spool*, in pieces (memory does not depend on how
    long the stream is), and no more than spool_limit() allows (nor does the disk used)."""
    limit = spool_limit(spool.parent)
    copied = 0
    try:
        with open(spool, "wb") as out:
            while piece := source.read(_SPOOL_PIECE):
                copied += len(piece)
                if copied > limit:
                    raise InputError(name, _too_long(limit, spool.parent))
                out.write(piece)
    except OSError as exc:
        raise InputError(name, f"cannot spool it: {exc.strerror or exc}") from None


@contextmanager
def staged_into(stream: Path, size: int, progress: Progress = SILENT) -> Iterator[Path]:
    """A temporary file to write an output that cannot be written front to back into
    *stream* (a pipe); once complete, it is copied into *stream* (*progress* hears of it).
    Refused before any work where its *size* bytes would leave the disk too full.

    The file has no name (unlinked at once; reached through its descriptor): whatever stops
    this process, a SIGKILL included, its disk space is freed with it."""
    folder = Path(tempfile.gettempdir())
    limit = spool_limit(folder)
    if size > limit:
        raise OutputError(
            stream,
            f"needs {size:,} bytes in {folder} to be written first, but only {limit:,} may "
            f"be used there (the disk's free space less {SPOOL_RESERVE:.0%}, at most "
            f"${SPOOL_LIMIT_VARIABLE}); set TMPDIR to a larger disk",
        )
    with tempfile.TemporaryFile(prefix="gclip-output-") as staged:
        path = Path(f"/proc/self/fd/{staged.fileno()}")
        yield path
        progress.begin(SENDING, os.fstat(staged.fileno()).st_size)
        with open(path, "rb") as written, open(stream, "wb") as out:
            while piece := written.read(_SPOOL_PIECE):
                out.write(piece)
                progress.advance(len(piece))


def spool_limit(folder: Path) -> int:
    """How many bytes a spool in *folder* may hold: what leaves SPOOL_RESERVE of its disk free,
    and at most $GCLIP_SPOOL_LIMIT."""
    usage = shutil.disk_usage(folder)
    limit = max(usage.free - int(usage.total * SPOOL_RESERVE), 0)
    setting = os.environ.get(SPOOL_LIMIT_VARIABLE, "").strip()
    return min(limit, _size(setting)) if setting else limit


def _size(text: str) -> int:
    """A size such as 65536, 512K, 64M or 1G, from the environment."""
    number, unit = text[:-1], text[-1:].upper()
    if unit not in _UNITS:
        number, unit = text, ""
    if not number.isdigit():
        raise UsageError(None, f"{SPOOL_LIMIT_VARIABLE}={text!r} is not a size such as 512M or 2G")
    return int(number) << _UNITS.get(unit, 0)


def _too_long(limit: int, folder: Path) -> str:
    return (
        f"holds more than the {limit:,} bytes gclip may spool to {folder.parent} "
        f"(the disk's free space less {SPOOL_RESERVE:.0%}, at most ${SPOOL_LIMIT_VARIABLE}); "
        "give a file instead, or set TMPDIR to a larger disk"
    )


@contextmanager
def stdout_file(inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """A path to write to; once written, its bytes are copied to standard output.

    Refused before anything is written: a terminal, and a standard output that is one of the
    files *inputs* name (``>> IN``, ``1<> IN``).  A failed write is an OutputError, a reader
    gone away a BrokenPipeError.
    """
    if is_terminal(sys.stdout):
        raise UsageError(
            None,
            "refusing to write a binary file to a terminal: redirect stdout "
            "or give an output file name",
        )
    refuse_stdout_onto(inputs)
    with _temporary("stdout") as path:
        path.unlink()  # the writer creates it, atomically
        try:
            yield path
        except GclipError as exc:
            if exc.path != str(path):
                raise
            raise type(exc)(STDOUT_NAME, exc.message) from None  # not the spool's name
        with open(path, "rb") as written:
            _copy_to_stdout(written.fileno())


def refuse_stdout_onto(inputs: Sequence[str | Path]) -> None:
    """Refuse a standard output redirected onto one of the files *inputs* name (``-``:
    standard input's file, as in ``< IN 1<> IN``)."""
    out = _descriptor(sys.stdout)
    if out is None:
        return  # not a file (a test's capture)
    from .output import refuse_stream_onto_inputs

    refuse_stream_onto_inputs(out, [p for p in inputs if p != STDIO], STDOUT_NAME)
    stdin = _descriptor(sys.stdin)
    if STDIO in inputs and stdin is not None and _same_regular_file(stdin, out):
        raise OutputError(STDOUT_NAME, "is standard input's file; redirect it to another file")


def _descriptor(stream: object) -> int | None:
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def _same_regular_file(fd: int, other: int) -> bool:
    try:
        one, two = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return stat.S_ISREG(one.st_mode) and (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)


def _copy_to_stdout(fd: int) -> None:
    """Copy the file *fd* to standard output's descriptor, past Python's buffer (flushed
    first), so that a failed write leaves nothing pending to fail again at exit."""
    sys.stdout.flush()
    out = _descriptor(sys.stdout)
    if out is None:  # not a file (a test's capture)
        with open(fd, "rb", closefd=False) as written:
            shutil.copyfileobj(written, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
        return
    while block := os.read(fd, 1 << 20):
        view = memoryview(block)
        while view:
            try:
                view = view[os.write(out, view) :]
            except BrokenPipeError:
                raise
            except OSError as exc:
                raise OutputError(STDOUT_NAME, f"cannot write: {exc.strerror or exc}") from None


# A write that fails for these reasons failed for want of room (or of a device): the output
# is short, which is never a success.
WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def stdout_failure(exc: BaseException) -> OutputError | None:
    """An error from writing the report to standard output, as an OutputError (None when
    *exc* is not one: the library reports its own files' errors as GclipErrors)."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno in WRITE_FAILURES:
        return OutputError(STDOUT_NAME, f"cannot write: {exc.strerror or exc}")
    return None


def is_terminal(stream: object) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


@contextmanager
def _temporary(name: str) -> Iterator[Path]:
    """An empty file *name* in a private temporary folder: the file's own name carries no
    random digits, which history could take for a step number."""
    folder = Path(tempfile.mkdtemp(prefix="gclip-"))
    path = folder / name
    try:
        path.touch(mode=0o600)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)
