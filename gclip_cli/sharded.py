"""Many files, one global norm: the two phases as tasks on any ``concurrent.futures.Executor``.

Phase 1 measures each shard and returns its statistics (never arrays); the exact sums are
merged here, so the global norm does not depend on the executor or the order tasks finish in.
Phase 2 writes each shard to its own temporary file and renames it, so a retried task is
harmless and an interrupted one leaves no partial file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

RETRIES = 2  # how often a failing task is tried again (bad input fails at once)


@contextmanager
def executor_for(jobs: int | None = None, scheduler: str | None = None) -> Iterator[Executor]:
    """Threads in this process by default; ``jobs``: a process pool on this machine;
    ``scheduler``: a Dask cluster at that address, or ``local[:N]`` for a LocalCluster of N
    worker processes."""
    if scheduler:
        with _dask_executor(scheduler) as executor:
            yield executor
    elif jobs and jobs > 1:
        with RestartingProcessPool(jobs) as executor:
            yield executor
    else:
        with ThreadPoolExecutor(max_workers=1) as executor:
            yield executor


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
    whatever happened: a worker killed mid-write leaves no partial file in *out_dir*."""
    import tempfile

    path = Path(tempfile.mkdtemp(dir=out_dir, prefix=".gclip-staging-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
