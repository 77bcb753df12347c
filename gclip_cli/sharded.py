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
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as executor:
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


def run_all(executor: Executor, task: Callable[..., object], jobs: Sequence[tuple]) -> list:
    """task(*args) for every args in *jobs*, results in order; a task that fails for another
    reason than the input (a worker that died, say) is tried again, RETRIES times."""
    from .errors import GclipError

    futures = [executor.submit(task, *args) for args in jobs]
    results = []
    for args, future in zip(jobs, futures, strict=True):
        for attempt in range(RETRIES + 1):
            try:
                results.append(future.result())
                break
            except GclipError:
                raise
            except Exception:
                if attempt == RETRIES:
                    raise
                future = executor.submit(task, *args)
    return results


def copy_index(index: Path, out_dir: Path) -> None:
    """An index names the shards and their sizes, which scaling does not change."""
    shutil.copyfile(index, out_dir / index.name)
