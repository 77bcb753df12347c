"""Where the pipeline's phases run: in this thread, on a process pool on this machine, or on a
Dask cluster; each a ``concurrent.futures.Executor``.  run_all() runs a phase's tasks on one.

Tasks return statistics, never arrays, and their exact sums are merged by the caller, so no
result depends on the executor or the order tasks finish in; pass 2 writes each file to its own
temporary file (in staging()) renamed when complete, so a retried task is harmless and an
interrupted one leaves no partial file.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from . import interrupts
from .errors import OutputError, UsageError

# Seconds stopped pool workers have to unwind (an upload's abort waits for a store up to 10 s,
# remote._GIVE_UP_AFTER) before they are killed.
_HALT_GRACE = 12.0

if TYPE_CHECKING:
    import logging
    from concurrent.futures import ProcessPoolExecutor

RETRIES = 2  # how often a failing task is tried again (bad input fails at once)
DASK_MISSING = "--scheduler needs Dask: pip install 'gclip[dask]'"


@contextmanager
def executor_for(jobs: int | None = None, scheduler: str | None = None) -> Iterator[Executor]:
    """This thread by default; ``jobs``: a process pool on this machine; ``scheduler``: a Dask
    cluster at that address, or ``local[:N]`` for a LocalCluster of N worker processes.

    No process started here outlives gclip: a failure, Ctrl-C or SIGTERM stops them
    (run_all), and pool workers die with gclip even when it is killed (SIGKILL), as Dask's
    do.  None takes Ctrl-C itself: gclip stops them and says so in one line.
    """
    if scheduler:
        with _dask_executor(scheduler) as executor:
            yield executor
    elif jobs and jobs > 1:
        with RestartingProcessPool(jobs) as executor:
            yield executor
    else:
        yield InThisThread()


class InThisThread(Executor):
    """Each task runs in the calling thread when its result is first asked for: a signal
    then reaches the work itself (and, through it, the children it forked)."""

    def submit(self, fn: Callable[..., object], /, *args: object, **kwargs: object) -> Future:
        return _Deferred(functools.partial(fn, *args, **kwargs))


class _Deferred(Future):
    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__()
        self._call = call

    def result(self, timeout: float | None = None) -> object:
        self._run()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._run()
        return super().exception(timeout)

    def _run(self) -> None:
        if not self.done():
            try:
                self.set_result(self._call())
            except Exception as exc:  # as a pool's future holds it; the rest propagates
                self.set_exception(exc)


@contextmanager
def _dask_executor(scheduler: str) -> Iterator[Executor]:
    import logging

    _start_resource_tracker()
    with ExitStack() as running:
        # Dask starts threads as it is imported, and the workers from them: all must inherit
        # the blocked Ctrl-C; and a cluster half started by an exception cannot be closed.
        with interrupts.deferred(), interrupts.withheld_from_children():
            try:
                from distributed import Client, LocalCluster
            except ImportError:
                raise UsageError(None, DASK_MISSING) from None
            _quiet_while(running, logging.getLogger("distributed"))
            cluster = None
            if scheduler == "local" or scheduler.startswith("local:"):
                workers = int(scheduler.partition(":")[2] or os.cpu_count() or 1)
                cluster = LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",  # any free port: no warning when 8787 is taken
                    # failures come back through the tasks, as gclip's one line; not logged
                    silence_logs=logging.CRITICAL,
                )
                running.enter_context(cluster)
            client = running.enter_context(Client(cluster or scheduler))
        yield DaskExecutor(client, cluster)


def _quiet_while(running: ExitStack, logger: logging.Logger) -> None:
    """Keep *logger* quiet until *running* closes (its level restored last).  LocalCluster's
    silence_logs lasts only while the cluster starts: a worker stopped with gclip (Ctrl-C,
    SIGTERM) then had the client log "Batched Comm Closed" with a traceback on stderr before
    gclip's one line (seen once in CI, under load)."""
    import logging

    running.callback(logger.setLevel, logger.level)
    logger.setLevel(logging.CRITICAL)


class DaskExecutor(Executor):
    """A Dask client's executor; halt() stops its tasks, and a local cluster's workers."""

    def __init__(self, client: object, cluster: object | None) -> None:
        self._executor = client.get_executor(retries=RETRIES, pure=False)
        self._cluster = cluster

    def submit(self, fn: Callable[..., object], /, *args: object, **kwargs: object) -> Future:
        return self._executor.submit(fn, *args, **kwargs)

    def halt(self) -> None:
        self._executor.shutdown(wait=False)  # cancels the tasks
        if self._cluster is not None:  # its workers may be busy writing: kill them
            for worker in self._cluster.workers.values():
                if worker.pid is not None:
                    _kill(worker.pid)


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _start_resource_tracker() -> None:
    """Start the process that removes the semaphores of spawned processes if gclip dies
    before it does: now, outside interrupts.withheld_from_children(), since starting it
    unblocks Ctrl-C in the thread that does (Python's resource_tracker); and told to remove
    them quietly, as after a SIGKILL it would warn on stderr of semaphores "leaked"."""
    import sys
    from multiprocessing import resource_tracker

    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    sys.warnoptions.append(quiet)  # the tracker's interpreter gets this process's -W options
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(quiet)


class RestartingProcessPool(Executor):
    """A process pool that replaces itself when a worker dies (which breaks a pool for good),
    so that the tasks lost with it can be submitted again."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        _start_resource_tracker()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        # spawn, not fork: the parent may run threads
        return ProcessPoolExecutor(
            self._workers,
            mp_context=get_context("spawn"),
            initializer=interrupts.start_worker,
            initargs=(os.getpid(),),
        )

    def submit(self, fn: Callable[..., object], /, *args: object, **kwargs: object) -> Future:
        from concurrent.futures.process import BrokenProcessPool

        # submit() starts the workers: they must not take Ctrl-C, not even while starting
        with interrupts.withheld_from_children():
            try:
                return self._pool.submit(fn, *args, **kwargs)
            except BrokenProcessPool:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    def halt(self) -> None:
        """Stop now: the tasks not started dropped, the workers stopped (they may be busy):
        with SIGTERM, which their work unwinds from (an upload it began is aborted), killed
        if they have not ended within _HALT_GRACE seconds."""
        # Python 3.14's ProcessPoolExecutor.kill_workers(); before it, its _processes
        workers = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        deadline = time.monotonic() + _HALT_GRACE
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()


def _sendable_errors(task: Callable[..., object], *args: object) -> object:
    """task(*args), its error fit to be sent back from a worker process."""
    from .isolation import sendable

    try:
        with interrupts.worker_task():
            return task(*args)
    except Exception as error:
        raise sendable(error) from None


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A private directory in *out_dir* for the shards' temporary files, removed at the end
    whatever happened: a worker killed mid-write leaves no partial file in *out_dir*.

    It is made and removed through a descriptor of *out_dir*, by a name chosen before it
    exists: an interruption at any moment, or *out_dir* moved meanwhile, leaves nothing."""
    try:
        folder = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OutputError(out_dir, f"cannot use the folder: {exc.strerror or exc}") from None
    name = f".gclip-staging-{os.urandom(4).hex()}"
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=folder)
        except OSError as exc:
            raise OutputError(out_dir, f"cannot make a folder: {exc.strerror or exc}") from None
        yield out_dir / name
    finally:
        _remove_staging(folder, name)
        os.close(folder)


def _remove_staging(folder: int, name: str) -> None:
    """Remove the staging directory *name* of *folder* and the temporary files it holds."""
    try:
        inside = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
    except OSError:
        return  # never made, or gone
    try:
        for entry in os.listdir(inside):
            with suppress(OSError):
                os.unlink(entry, dir_fd=inside)
    finally:
        os.close(inside)
    with suppress(OSError):
        os.rmdir(name, dir_fd=folder)


def run_all(
    executor: Executor,
    task: Callable[..., object],
    jobs: Sequence[tuple],
    done: Callable[[], None] | None = None,
) -> list:
    """task(*args) for every args in *jobs*, results in order; a task that fails for another
    reason than the input (a worker that died, say) is tried again, RETRIES times.  *done* is
    called as each result arrives (for progress)."""
    from .errors import GclipError

    task = functools.partial(_sendable_errors, task)
    try:
        futures = [executor.submit(task, *args) for args in jobs]
        results = []
        for args, future in zip(jobs, futures, strict=True):
            for attempt in range(RETRIES + 1):
                try:
                    results.append(future.result())
                    if done:
                        done()
                    break
                except GclipError:
                    raise
                except Exception:
                    if attempt == RETRIES:
                        raise
                    future = executor.submit(task, *args)
    except BaseException:  # the other tasks may be writing: stop them before what follows
        halt = getattr(executor, "halt", None)
        if halt is not None:
            halt()
        else:
            executor.shutdown(wait=False, cancel_futures=True)
        raise
    return results
