"""Many files, one global norm: the two phases as tasks on any ``concurrent.futures.Executor``.

Phase 1 measures each shard and returns its statistics (never arrays); the exact sums are
merged here, so the global norm does not depend on the executor or the order tasks finish in.
Phase 2 writes each shard to its own temporary file and renames it, so a retried task is
harmless and an interrupted one leaves no partial file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import OutputError, UsageError

RETRIES = 2  # how often a failing task is tried again (bad input fails at once)


@contextmanager
def executor_for(jobs: int | None = None, scheduler: str | None = None) -> Iterator[Executor]:
    """This process by default; ``jobs``: a process pool on this machine;
    ``scheduler``: a Dask cluster at that address, or ``local[:N]`` for a LocalCluster of N
    worker processes."""
    if scheduler:
        with _dask_executor(scheduler) as executor:
            yield executor
    elif jobs and jobs > 1:
        with RestartingProcessPool(jobs) as executor:
            yield executor
    else:
        yield InProcess()


class InProcess(Executor):
    """Runs each task here, in the calling thread, when its result is asked for: Ctrl-C stops
    the task itself, and no task runs after it (a thread would finish the queue first)."""

    def submit(self, fn: Callable[..., object], /, *args: object, **kwargs: object) -> Future:
        return _Deferred(fn, args, kwargs)


class _Deferred(Future):
    """A future that does its work the first time its result is asked for."""

    def __init__(self, fn: Callable[..., object], args: tuple, kwargs: dict) -> None:
        super().__init__()
        self._work: tuple | None = (fn, args, kwargs)

    def result(self, timeout: float | None = None) -> object:
        if self._work is not None and self.set_running_or_notify_cancel():
            fn, args, kwargs = self._work
            self._work = None
            try:
                self.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # Ctrl-C too: raised below, as any error
                self.set_exception(exc)
        return super().result(timeout)


@contextmanager
def _dask_executor(scheduler: str) -> Iterator[Executor]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UsageError(None, "--scheduler needs Dask: pip install 'gclip[dask]'") from None
    if scheduler == "local" or scheduler.startswith("local:"):
        workers = int(scheduler.partition(":")[2] or os.cpu_count() or 1)
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        with cluster, Client(cluster) as client:
            yield client.get_executor(retries=RETRIES, pure=False)
    else:
        with Client(scheduler) as client:
            yield client.get_executor(retries=RETRIES, pure=False)


class RestartingProcessPool(Executor):
    """A process pool that replaces itself when a worker dies (which breaks a pool for good),
    so that the tasks lost with it can be submitted again."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool = self._new_pool()

    def _new_pool(self) -> Executor:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        # spawn, not fork: the parent may run threads
        return ProcessPoolExecutor(self._workers, mp_context=get_context("spawn"))

    def submit(self, fn: Callable[..., object], /, *args: object, **kwargs: object):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self._pool.submit(fn, *args, **kwargs)
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


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
    return results
