"""Running work in a forked child, so that a crash inside a C library becomes an error.

The HDF5 library can crash (SIGSEGV) on a damaged file, which no exception handler can catch;
gclip's fuzz tests found such files.  Work on HDF5 files therefore runs in a child process:
its result (or exception) comes back through a pipe, and a child killed by a signal becomes an
InputError naming the file.  Forking a process that has already imported its libraries takes
milliseconds.  Where fork is not available the work simply runs in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

from . import progress
from .errors import InputError

T = TypeVar("T")


def run_isolated(path: Path, work: Callable[..., T], *args: object) -> T:
    """*work*(*args) in a forked child; its exceptions are re-raised here."""
    if "fork" not in multiprocessing.get_all_start_methods() or _daemonic():
        return work(*args)
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, work, args), daemon=True)
    child.start()
    sender.close()
    try:
        outcome = receiver.recv()
    except EOFError:  # the child died without answering
        outcome = None
    except BaseException:  # interrupted here: stop the child too
        child.terminate()
        raise
    finally:
        child.join()
        receiver.close()
    if outcome is None:
        raise InputError(
            path,
            f"the HDF5 library crashed reading it ({_how(child.exitcode)}); the file is damaged",
        )
    succeeded, value = outcome
    if succeeded:
        return value
    raise value


def _daemonic() -> bool:
    """Daemonic processes (a Dask worker, for one) may not start children: work in place."""
    return multiprocessing.current_process().daemon


def _child(sender: Connection, work: Callable[..., object], args: tuple[object, ...]) -> None:
    progress.silence()  # the parent owns the terminal
    try:
        outcome = (True, work(*args))
    except BaseException as exc:  # everything goes back to the parent, which decides
        outcome = (False, exc)
    try:
        sender.send(outcome)
    finally:
        os._exit(0)  # no atexit handlers or buffer flushes inherited from the parent


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return signal.Signals(-exitcode).name
    return f"exit status {exitcode}"
