"""Work in forked children: so that a crash inside a C library becomes an error, and so that
one file can keep several cores busy.

The HDF5 library can crash (SIGSEGV) on a damaged file, which no exception handler can catch;
gclip's fuzz tests found such files.  Work on HDF5 files therefore runs in a child process:
its result (or exception) comes back through a pipe, and a child killed by a signal becomes an
InputError naming the file.  Forking a process that has already imported its libraries takes
milliseconds.  Where fork is not available the work simply runs in this process.

Children pass the progress they make back to this process, which owns the display.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypeVar

from . import progress
from .errors import InputError

T = TypeVar("T")
Task = tuple[Callable[..., object], tuple[object, ...]]

HDF5_CRASH = "the HDF5 library crashed reading it ({how}); the file is damaged"
WORKER_CRASH = "a worker process died ({how}) while working on it"


def run_isolated(path: Path, work: Callable[..., T], *args: object) -> T:
    """*work*(*args) in a forked child; its exceptions are re-raised here."""
    return run_forked(path, [(work, args)], HDF5_CRASH)[0]


def can_fork() -> bool:
    """Daemonic processes (a Dask worker, for one) may not start children."""
    return (
        "fork" in multiprocessing.get_all_start_methods()
        and not multiprocessing.current_process().daemon
    )


def run_forked(
    path: Path,
    tasks: Sequence[Task],
    crash: str = WORKER_CRASH,
    on_note: Callable[[int, object], None] | None = None,
) -> list:
    """Each task's work(*args), all at once, each in its own forked child; results in order.

    What a task passes to tell_parent() arrives here, while it works, as on_note(index of the
    task, value).  The first exception raised in a child (or by on_note) is raised here, and
    the children are stopped.  A child killed by a signal becomes an InputError on *path* with
    the message *crash* (``{how}`` names the signal).  Without fork the tasks run here, one
    after another.
    """
    if not can_fork():
        return [_run_here(index, task, on_note) for index, task in enumerate(tasks)]
    context = multiprocessing.get_context("fork")
    children: list[tuple[BaseProcess, Connection]] = []
    # The garbage collector of a child would touch every object it inherits, copying the
    # pages they lie in: keep them out of its sight.
    gc.freeze()
    _release_free_heap()
    try:
        for work, args in tasks:
            receiver, sender = context.Pipe(duplex=False)
            # not daemonic: a child may fork workers of its own (HDF5 work on several cores)
            child = context.Process(target=_child, args=(sender, work, args))
            with _signals_held():
                child.start()
            sender.close()
            children.append((child, receiver))
        return _collect(path, children, crash, on_note)
    except BaseException:  # an error or an interruption here: stop every child too
        for child, _ in children:
            child.terminate()
        raise
    finally:
        for child, receiver in children:
            child.join()
            receiver.close()
        gc.unfreeze()


def _release_free_heap() -> None:
    """Give the free pages of the C heap back to the system (glibc's malloc_trim), so that a
    child reusing that free space gets fresh pages rather than copies of the parent's
    (measured: 8-10 MiB less memory over gclip's processes for a gzip HDF5 rescale)."""
    import ctypes  # here: only forking needs it, and start-up counts

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _run_here(index: int, task: Task, on_note: Callable[[int, object], None] | None) -> object:
    """Run *task* in this process, its notes going straight to on_note."""
    global _tell
    work, args = task
    before, _tell = _tell, functools.partial(on_note, index) if on_note else None
    try:
        return work(*args)
    finally:
        _tell = before


def tell_parent(value: object) -> None:
    """From a task of run_forked: hand *value* to its on_note (picklable)."""
    if _tell is not None:
        _tell(value)


_tell: Callable[[object], None] | None = None


def _collect(
    path: Path,
    children: list[tuple[BaseProcess, Connection]],
    crash: str,
    on_note: Callable[[int, object], None] | None,
) -> list:
    """Wait for every child's result, passing their progress and notes on as they arrive."""
    results: dict[int, object] = {}
    pending = {receiver: index for index, (_, receiver) in enumerate(children)}
    while pending:
        for receiver in wait(list(pending)):
            index = pending[receiver]
            try:
                kind, value = receiver.recv()
            except EOFError:  # the child died without answering
                child = children[index][0]
                child.join()
                raise InputError(path, crash.format(how=_how(child.exitcode))) from None
            if kind == "progress":
                progress.forward(value)
            elif kind == "note" and on_note is not None:
                on_note(index, value)
            elif kind == "error":
                raise value
            else:
                results[index] = value
                del pending[receiver]
    return [results[index] for index in range(len(children))]


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while forking: their handlers would otherwise run inside
    fork's callbacks, which swallow the exceptions the handlers raise to stop gclip."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


_STOPPING = {signal.SIGINT, signal.SIGTERM}


def _child(sender: Connection, work: Callable[..., object], args: tuple[object, ...]) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent stops a child with SIGTERM
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPPING)
    global _tell
    progress.relay(functools.partial(_send, sender, "progress"))
    _tell = functools.partial(_send, sender, "note")
    try:
        outcome = ("result", work(*args))
    except BaseException as exc:  # everything goes back to the parent, which decides
        outcome = ("error", exc)
    try:
        sender.send(outcome)
    finally:
        os._exit(0)  # no atexit handlers or buffer flushes inherited from the parent


def _send(sender: Connection, kind: str, value: object) -> None:
    sender.send((kind, value))


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return signal.Signals(-exitcode).name
    return f"exit status {exitcode}"
