"""How gclip stops: Ctrl-C (SIGINT) or SIGTERM, at any moment, ends in one line and the
documented exit code (130, 143), temporary files are removed on the way out, and no process
of gclip's is left running.

The gclip command installs its handler before anything slow is imported (``__main__.py``).
The handler raises once (Interrupted, Terminated); the unwinding that starts removes
temporary files and stops children, and later signals are ignored, since a second exception
would cut that unwinding short.  Python code may turn the exception into another (an import
cut short becomes an ImportError, some libraries wrap what they catch), so whatever escapes
after a signal counts as that signal.

Children leave signals to gclip: Ctrl-C at a terminal reaches every process of the
foreground group, and each child would stop on its own, with its own traceback; gclip stops
them itself.  So that none outlives a gclip killed by SIGKILL, Linux kills them when gclip
dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from .errors import ExitCode, Interrupted, Terminated

STOPPING = (signal.SIGINT, signal.SIGTERM)
_LINES = {signal.SIGINT: "gclip: interrupted", signal.SIGTERM: "gclip: terminated"}
_CODES = {signal.SIGINT: ExitCode.INTERRUPTED, signal.SIGTERM: ExitCode.TERMINATED}


class Stop:
    """The gclip command's handler of SIGINT and SIGTERM: the first signal raises Interrupted
    or Terminated, later ones (and any once gclip is finishing) nothing.

    Where Python would not let the exception stop gclip, the signal acts a moment later
    instead: inside an import (the exception would become an ImportError, which C extensions
    such as NumPy's print with its traceback), or inside a callback whose exceptions Python
    prints and ignores (those run around a fork, finalizers).
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal whose exception was raised
        self.waiting: int | None = None  # a signal held back, to act a moment later
        self.finishing = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if signum == _RETRY:
            signum, self.waiting = self.waiting, None
        elif self.waiting is not None or self.signum is not None:
            return
        if signum is None or self.finishing:
            return
        if _importing(frame):
            self._retry(signum)
            return
        self.signum = signum
        if signum == signal.SIGINT:
            raise Interrupted
        raise Terminated

    def unraisable(self, hook: Callable[[object], None], unraisable: object) -> None:
        """sys.unraisablehook: an exception of this handler's that Python ignores (a callback
        raised it) is raised again a moment later; and, after a signal, what Python would
        print and ignore (an object the exception left half made, say) is its consequence:
        not printed."""
        error = getattr(unraisable, "exc_value", None)
        if self.signum is not None and isinstance(error, (Interrupted, Terminated)):
            self._retry(self.signum)
            self.signum = None
        elif self.signum is None and self.waiting is None:
            hook(unraisable)

    def _retry(self, signum: int) -> None:
        """Act on *signum* a moment from now (by SIGALRM)."""
        self.waiting = signum
        signal.signal(_RETRY, self)
        signal.setitimer(signal.ITIMER_REAL, _RETRY_AFTER)


_RETRY = getattr(signal, "SIGALRM", None)  # POSIX, as setitimer
_RETRY_AFTER = 0.01  # seconds
# The signals whose handlers may raise: Stop's.
RAISING = frozenset({*STOPPING, _RETRY} - {None})


def _importing(frame: FrameType | None) -> bool:
    """Whether *frame* runs inside an import (importlib's frames are below it)."""
    while _RETRY is not None and frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def install() -> Stop:
    """Make SIGINT and SIGTERM stop gclip (see Stop); the Stop already installed, if any.
    A signal ignored from the start (as ``nohup`` leaves SIGHUP, a shell's ``&`` SIGINT)
    stays ignored."""
    stop = _installed()
    if stop is not None:
        return stop
    stop = Stop()
    for signum in STOPPING:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, stop)
    if _RETRY is not None:
        sys.unraisablehook = functools.partial(stop.unraisable, sys.unraisablehook)
    return stop


def _installed() -> Stop | None:
    for signum in STOPPING:
        handler = signal.getsignal(signum)
        if isinstance(handler, Stop):
            return handler
    return None


def received() -> int | None:
    """The signal that is stopping gclip, if one is (and Stop handles signals)."""
    stop = _installed()
    if stop is None:
        return None
    return stop.signum if stop.signum is not None else stop.waiting


def final_status(code: int | str | None) -> int | str | None:
    """The exit status to end with, once gclip's result is decided (exit status *code*): that
    of a signal held back until now (its line printed), else *code*.  Later signals are
    ignored, so that none cuts the final flushes short."""
    stop = _installed()
    if stop is None or stop.finishing:
        return code
    stop.finishing = True
    if stop.waiting is None:
        return code
    print(_LINES[stop.waiting], file=sys.stderr)
    return _CODES[stop.waiting]


def exit_stopped(signum: int) -> None:
    """Say that *signum* stopped gclip, in one line, and exit with its code."""
    stop = _installed()
    if stop is not None:
        stop.finishing = True
    print(_LINES[signum], file=sys.stderr)
    sys.exit(_CODES[signum])


@contextmanager
def reported() -> Iterator[None]:
    """Run the block; what escapes it after a stop signal, whatever the signal's exception
    has become meanwhile, is reported as that signal (exit_stopped)."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException:
        signum = received()
        if signum is None:
            raise
        exit_stopped(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """Signals whose handlers may raise (SIGINT, SIGTERM, and SIGALRM, by which Stop acts
    later) act at the end of the block, not inside it: for work that an exception would leave
    half done (forking a child, starting a Dask cluster).  In the main thread only, the only
    one where Python runs signal handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    before = {s: signal.signal(s, lambda signum, _: arrived.append(signum)) for s in RAISING}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        for signum in arrived:
            signal.raise_signal(signum)  # to the handler that was deferred


@contextmanager
def withheld_from_children() -> Iterator[None]:
    """Block SIGINT in this thread while the block starts child processes and threads: they
    inherit the blocked signal (child processes across exec too), so a Ctrl-C at the terminal
    never reaches them, not even while they start.  This process still gets it: another
    thread takes it, or this one at the end of the block."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def die_with_parent(parent: int) -> None:
    """Have Linux kill this process (SIGKILL) when its parent, whose pid is *parent*, dies,
    however it dies.  The parent is, to the kernel, the thread that started this process: it
    must outlive its children (gclip starts them from the thread that waits for them).
    Elsewhere than on Linux, nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    set_parent_death_signal = 1  # PR_SET_PDEATHSIG, from <sys/prctl.h>
    ctypes.CDLL(None).prctl(set_parent_death_signal, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it died before the request: the kernel will not tell
        os._exit(ExitCode.TERMINATED)


class WorkerStop:
    """A pool worker's handler of SIGTERM, by which gclip stops its workers: a task running
    unwinds (Terminated), so that what it began is undone (an upload aborted); an idle worker
    ends at once, silently."""

    def __init__(self) -> None:
        self.busy = False
        self.stopped = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.busy:
            os._exit(ExitCode.TERMINATED)
        if not self.stopped:
            self.stopped = True
            raise Terminated


def start_worker(parent: int) -> None:
    """The start of a pool's worker process: Ctrl-C is *parent*'s to handle (it stops its
    workers, with SIGTERM: see WorkerStop), and the worker dies with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, WorkerStop())
    die_with_parent(parent)


@contextmanager
def worker_task() -> Iterator[None]:
    """A task running in this process: in a pool's worker, SIGTERM then stops the task (the
    worker ends after it); elsewhere, nothing changes."""
    stop = signal.getsignal(signal.SIGTERM)
    if not isinstance(stop, WorkerStop):
        yield
        return
    stop.busy = True
    try:
        yield
    finally:
        stop.busy = False
        if stop.stopped:
            os._exit(ExitCode.TERMINATED)
