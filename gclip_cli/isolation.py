"""Work in forked children: so that a crash inside a C library becomes an error, and so that
one file can keep several cores busy.

The HDF5 library can crash (SIGSEGV) on a damaged file, which no exception handler can catch;
gclip's fuzz tests found such files.  Work on HDF5 files therefore runs in a child process:
its result (or exception) comes back through a pipe, and a child killed by a signal becomes an
InputError naming the file.  Forking a process that has already imported its libraries takes
milliseconds.  Where fork is not available the work simply runs in this process.

Children pass the progress they make back to this process, which owns the display, through
the Channel each task is given.  They leave Ctrl-C to this process, which stops them
(SIGTERM), and die with it, even when it is killed by SIGKILL (see interrupts.py).

The same holds for an input read through a mapping (every format reads plain values so): if
the file shrinks meanwhile, touching a page past its new end kills the reader with SIGBUS,
which Python cannot catch either.  Every file's work therefore runs in a child, and a child
killed by SIGBUS becomes an InputError saying that the file shrank; no temporary file is left,
since the parent removes it.  (The alternatives cost more: reading with pread copies every
byte once more, and checking the size after mapping leaves the window open.)
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypeVar

from . import interrupts
from .errors import GclipError, InputError
from .progress import SILENT, Progress

T = TypeVar("T")
Task = tuple[Callable[..., object], tuple[object, ...]]

HDF5_CRASH = "the HDF5 library crashed reading it ({how}); the file is damaged"
WORKER_CRASH = "a worker process died ({how}) while working on it"
SHRANK = "the file shrank from {before:,} to {now:,} bytes while gclip read it (SIGBUS)"
MAPPING_FAILED = (
    "reading its mapped pages failed (SIGBUS): it was truncated, or its disk failed, "
    "while gclip read it"
)
# For tests only: each run_isolated work starts this many seconds late (in its child, where
# it has one), so that a test can signal gclip while its children live.
TEST_DELAY = "GCLIP_TEST_WORK_DELAY"


@dataclass(frozen=True)
class Channel:
    """What a task of run_forked has of its parent: *progress*, which reaches the parent's,
    and note(value), which reaches the parent's on_note."""

    progress: Progress = SILENT
    send_note: Callable[[object], None] | None = None

    def note(self, value: object) -> None:
        """Hand *value* (picklable) to the parent's on_note, if it has one."""
        if self.send_note is not None:
            self.send_note(value)


def run_isolated(
    path: Path,
    work: Callable[..., T],
    *args: object,
    crash: str = HDF5_CRASH,
    progress: Progress = SILENT,
) -> T:
    """*work*(child's progress, *args) in a forked child, its progress reaching *progress*;
    its exceptions are re-raised here, and its death by a signal is an InputError on *path*,
    with the message *crash* (see run_forked)."""
    return run_forked(path, [(_after_test_delay, (work, *args))], crash, progress=progress)[0]


def _after_test_delay(channel: Channel, work: Callable[..., T], *args: object) -> T:
    """*work*(channel.progress, *args), TEST_DELAY seconds late when that is set."""
    delay = os.environ.get(TEST_DELAY)
    if delay:
        time.sleep(float(delay))
    return work(channel.progress, *args)


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
    *,
    on_note: Callable[[int, object], None] | None = None,
    progress: Progress = SILENT,
) -> list:
    """Each task's work(channel, *args), all at once, each in its own forked child; results
    in order.

    The task's progress on channel.progress reaches *progress* here, and what it passes to
    channel.note() arrives, while it works, as on_note(index of the task, value).  The first
    exception raised in a child (or by on_note) is raised here, and the children are stopped.
    A child killed by a signal becomes an InputError on *path* with the message *crash*
    (``{how}`` names the signal), or, killed by SIGBUS, one saying that the file shrank.
    Without fork the tasks run here, one after another.
    """
    if not can_fork():
        return [_run_here(index, task, on_note, progress) for index, task in enumerate(tasks)]
    context = multiprocessing.get_context("fork")
    size = _size(path)
    children: list[tuple[BaseProcess, Connection]] = []
    # The garbage collector of a child would touch every object it inherits, copying the
    # pages they lie in: keep them out of its sight.
    gc.freeze()
    _release_free_heap()
    try:
        for work, args in tasks:
            receiver, sender = context.Pipe(duplex=False)
            # not daemonic: a child may fork workers of its own (HDF5 work on several cores)
            channel = _channel_to_parent(sender, progress.listening, on_note is not None)
            child = context.Process(target=_child, args=(os.getpid(), sender, channel, work, args))
            with _signals_held():
                child.start()
                children.append((child, receiver))  # before a signal can act: to be stopped
            sender.close()
        death = functools.partial(_death, path, size, crash)
        return _collect(path, children, death, on_note, progress)
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


def _run_here(
    index: int, task: Task, on_note: Callable[[int, object], None] | None, progress: Progress
) -> object:
    """Run *task* in this process, its notes and progress going straight to on_note and
    *progress*."""
    work, args = task
    return work(Channel(progress, functools.partial(on_note, index) if on_note else None), *args)


def _channel_to_parent(sender: Connection, progress: bool, notes: bool) -> Channel:
    """The channel of a child that sends through *sender*: its progress if the parent
    listens to progress, its notes if the parent takes notes (else nothing is sent)."""
    return Channel(
        Progress(functools.partial(_send, sender, "progress")) if progress else SILENT,
        functools.partial(_send, sender, "note") if notes else None,
    )


def _collect(
    path: Path,
    children: list[tuple[BaseProcess, Connection]],
    death: Callable[[int | None], str],
    on_note: Callable[[int, object], None] | None,
    progress: Progress,
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
                raise InputError(path, death(child.exitcode)) from None
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
    """Hold signals back while forking: raised inside fork's callbacks (or after fork, before
    the child is recorded), their exceptions would be swallowed, or leave a child nobody
    stops.  The child inherits them blocked until it is ready (_child)."""
    with interrupts.deferred():
        held = signal.pthread_sigmask(signal.SIG_BLOCK, interrupts.RAISING)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _child(
    parent: int,
    sender: Connection,
    channel: Channel,
    work: Callable[..., object],
    args: tuple[object, ...],
) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent stops a child with SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # after Ctrl-C, which is the parent's
    interrupts.die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, interrupts.RAISING)
    try:
        outcome = ("result", work(channel, *args))
    except BaseException as exc:  # everything goes back to the parent, which decides
        outcome = ("error", sendable(exc))
    try:
        sender.send(outcome)
    except Exception as failed:  # it does not pickle, say: its text, at least, goes back
        sender.send(("error", RuntimeError(f"{outcome[1]!r}, not sent back: {failed!r}")))
    finally:
        os._exit(0)  # no atexit handlers or buffer flushes inherited from the parent


def sendable(error: BaseException) -> BaseException:
    """*error*, to be pickled to another process: a GclipError without the exception it
    replaced, which says nothing more and may not pickle (an ISA-L error, whose module cannot
    be imported by its name), should something pickle it (tblib, as Dask installs it)."""
    if isinstance(error, GclipError):
        error.__context__ = error.__cause__ = None
        error.__traceback__ = None
    return error


def _send(sender: Connection, kind: str, value: object) -> None:
    sender.send((kind, value))


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _death(path: Path, size: int | None, crash: str, exitcode: int | None) -> str:
    """Why a child working on *path* (*size* bytes when it started) died, from its exit code."""
    if exitcode == -signal.SIGBUS:
        now = _size(path)
        if size is not None and now is not None and now < size:
            return SHRANK.format(before=size, now=now)
        return MAPPING_FAILED
    return crash.format(how=_how(exitcode))


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return signal.Signals(-exitcode).name
    return f"exit status {exitcode}"
