"""Standard input and output as files: every format needs seeking, so streams are spooled."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .errors import GclipError, InputError, UsageError

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
def stdout_file() -> Iterator[Path]:
    """A path to write to; once written, its bytes are copied to standard output."""
    if is_terminal(sys.stdout):
        raise UsageError(
            None,
            "refusing to write a binary file to a terminal: redirect stdout "
            "or give an output file name",
        )
    with _temporary("stdout") as path:
        path.unlink()  # the writer creates it, atomically
        yield path
        with open(path, "rb") as written:
            shutil.copyfileobj(written, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()


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
