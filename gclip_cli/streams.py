"""Standard input and output as files: every format needs seeking, so streams are spooled."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .errors import GclipError, InputError, OutputError, UsageError

STDIO = "-"
STDIN_NAME = "<stdin>"  # how errors and reports name standard input
STDOUT_NAME = "<stdout>"


@contextmanager
def local_inputs(paths: Sequence[str]) -> Iterator[list[str]]:
    """*paths* with ``-`` replaced by a temporary copy of standard input (removed afterwards)."""
    if paths.count(STDIO) > 1:
        raise UsageError(None, "standard input (-) can be read only once")
    with ExitStack() as stack:
        local = [stack.enter_context(spooled_stdin()) if p == STDIO else p for p in paths]
        try:
            yield local
        except GclipError as exc:
            if exc.path not in local or exc.path in paths:
                raise
            raise type(exc)(STDIN_NAME, exc.message) from None  # not the spool's name


@contextmanager
def spooled_stdin() -> Iterator[str]:
    if is_terminal(sys.stdin):
        raise UsageError(None, "input '-' is a terminal: pipe a file in, e.g. < grads.safetensors")
    with _temporary("stdin") as path:
        try:
            with open(path, "wb") as spool:
                shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
        except OSError as exc:
            raise InputError(STDIN_NAME, f"cannot spool it: {exc.strerror or exc}") from None
        yield str(path)


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
