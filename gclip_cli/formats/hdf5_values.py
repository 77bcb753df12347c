"""Values of HDF5 datasets read and written through HDF5 itself: in C-order hyperslabs, or,
for datasets whose storage is not all allocated (sparse), chunk by chunk.

HDF5 reads a dataset's fill value wherever its storage was never allocated, so a file of
2 KB can declare 10**12 values.  gclip reads the allocated chunks of such a dataset one after
another, in the C order of the chunk grid, and counts the others from the fill value without
visiting them: the statistics of N equal values are those of one, summed N times exactly.  A
rewrite writes the allocated chunks only, so the others stay unallocated; that keeps their
values right when the fill value is 0, which every transform keeps.  With another fill value
the unallocated values are written out (allocating them), up to MAX_FILL_WRITTEN.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ..errors import GclipError, InputError
from ..norms import NormAccumulator, NormStats, measure
from .base import MAX_WINDOW, TensorInfo, Transform, items_per_chunk, reading
from .hdf5_storage import MAX_CHUNK_BYTES, ChunkIndex

if TYPE_CHECKING:
    from ..progress import Progress

Selection = tuple[slice, ...]

# Unallocated values of a fill value other than 0 that a rewrite writes out (as many as a
# 256 MiB float32 tensor holds); a file declaring more is refused rather than inflated.
MAX_FILL_WRITTEN = 1 << 26


def slabs(
    path: Path, dataset: h5py.Dataset, chunk_size: int, region: Selection | None = None
) -> Iterator[tuple[Selection, np.ndarray]]:
    """Read *dataset* (or its *region*) in hyperslabs that follow C order, each into one
    reused buffer."""
    region = region or tuple(slice(0, n) for n in dataset.shape)
    shape = tuple(s.stop - s.start for s in region)
    if math.prod(shape) == 0:
        return
    # no larger than a mapped window: HDF5 holds the compressed chunks besides
    max_items = items_per_chunk(dataset.dtype.itemsize, min(chunk_size, MAX_WINDOW))
    buffer = np.empty(min(max_items, math.prod(shape)), dtype=dataset.dtype)
    for relative in c_order_slabs(shape, dataset.chunks, max_items):
        selection = (
            tuple(
                slice(r.start + s.start, r.stop + s.start)
                for r, s in zip(relative, region, strict=False)
            )
            + region[len(relative) :]
        )
        slab_shape = tuple(s.stop - s.start for s in selection)
        values = buffer[: math.prod(slab_shape)].reshape(slab_shape)
        with reading(path, f"dataset {dataset.name!r}"):
            dataset.read_direct(values, source_sel=selection)
        yield selection, values


def c_order_slabs(
    shape: tuple[int, ...], chunks: tuple[int, ...] | None, max_items: int
) -> Iterator[Selection]:
    """Selections covering *shape* in C order, each of at most *max_items* values.

    Each selection is a run of whole trailing sub-arrays along one axis, so reading them one
    after another yields the values in the same order whatever *max_items* is.  Runs along that
    axis are whole multiples of the storage chunk where they can be.
    """
    if math.prod(shape) == 0:
        return
    if not shape:
        yield ()
        return
    axis = next(k for k in range(len(shape)) if math.prod(shape[k + 1 :]) <= max_items)
    step = max(1, max_items // math.prod(shape[axis + 1 :]))
    if chunks and step > chunks[axis]:
        step -= step % chunks[axis]
    for lead in itertools.product(*(range(n) for n in shape[:axis])):
        head = tuple(slice(i, i + 1) for i in lead)
        for start in range(0, shape[axis], step):
            yield (*head, slice(start, min(start + step, shape[axis])))


def rewrite_slabs(
    path: Path, dataset: h5py.Dataset, tensor: TensorInfo, transform: Transform, chunk_size: int
) -> None:
    """Pass every value of *dataset* (in a copy of the file) through *transform*, in C order."""
    for selection, values in slabs(path, dataset, chunk_size):
        flat = values.reshape(-1).view(tensor.dtype)  # raw values may have been given a type
        transform(tensor, flat, flat)
        dataset.write_direct(values, dest_sel=selection)
    dataset.flush()  # the chunks still in the cache: a failure is raised here, not lost


@dataclass(frozen=True)
class Sparse:
    """A dataset whose storage is not all allocated: its allocated chunks (None: nothing is
    allocated), and the value HDF5 reads everywhere else."""

    index: ChunkIndex | None
    fill: np.ndarray  # one value, of the dataset's dtype
    unallocated: int  # how many values read as the fill value

    @classmethod
    def of(cls, dataset: h5py.Dataset, index: ChunkIndex | None) -> Sparse:
        fill = np.array([dataset.fillvalue], dtype=dataset.dtype)
        allocated = index.values_inside() if index is not None else 0
        return cls(index, fill, dataset.size - allocated)

    @property
    def keeps_fill(self) -> bool:
        """Whether every transform leaves the fill value as it is (it is 0)."""
        return not any(self.fill.tobytes())


def measure_sparse(
    path: Path,
    dataset: h5py.Dataset,
    sparse: Sparse,
    tensor: TensorInfo,
    norm_type: float,
    chunk_size: int,
    progress: Progress,
) -> NormStats:
    """The statistics of every value of a sparse *dataset* (*tensor*): the allocated chunks'
    values, read, and the unallocated ones, counted (told to *progress*)."""
    accumulator = NormAccumulator(norm_type)
    for _, values in _allocated_slabs(path, dataset, sparse, chunk_size):
        accumulator.add(values.reshape(-1).view(tensor.dtype))  # raw values may have a type
        progress.advance(values.nbytes)
    stats = accumulator.finish()
    stats.merge(repeated(measure(sparse.fill.view(tensor.dtype), norm_type), sparse.unallocated))
    progress.advance(sparse.unallocated * dataset.dtype.itemsize)
    if stats.nonfinite:  # rare: read again to place the first
        stats.first_nonfinite = _first_nonfinite(path, dataset, sparse, tensor, chunk_size)
    return stats


def _first_nonfinite(
    path: Path, dataset: h5py.Dataset, sparse: Sparse, tensor: TensorInfo, chunk_size: int
) -> int | None:
    """The flat C-order index of the first NaN/Inf of a sparse dataset.  Its allocated chunks
    come in the order of its chunk grid, not of its values: each slab's first is placed in the
    dataset and the least kept; a non-finite fill value counts from the first unallocated
    chunk."""
    found = []
    for selection, values in _allocated_slabs(path, dataset, sparse, chunk_size):
        bad = ~np.isfinite(values.view(tensor.dtype))
        if bad.any():
            local = np.unravel_index(int(np.argmax(bad)), bad.shape)
            where = tuple(s.start + int(i) for s, i in zip(selection, local, strict=True))
            found.append(int(np.ravel_multi_index(where, dataset.shape)))
    if sparse.unallocated and not np.all(np.isfinite(sparse.fill.view(tensor.dtype))):
        found.append(_first_unallocated(dataset, sparse.index))
    return min(found, default=None)


def _first_unallocated(dataset: h5py.Dataset, index: ChunkIndex | None) -> int:
    """The flat index of the first value of the first unallocated chunk: grid cells in C order
    begin at increasing flat indexes, so it is the first cell the index does not list (found
    in at most one step more than there are allocated chunks)."""
    grid = tuple(-(-n // c) for n, c in zip(dataset.shape, dataset.chunks, strict=True))
    taken = set() if index is None else set(index.cells.tolist())
    cell = next(k for k in itertools.count() if k not in taken)
    place = np.unravel_index(cell, grid)
    corner = tuple(int(i) * c for i, c in zip(place, dataset.chunks, strict=True))
    return int(np.ravel_multi_index(corner, dataset.shape))


def rewrite_sparse(
    path: Path,
    dataset: h5py.Dataset,
    sparse: Sparse,
    tensor: TensorInfo,
    transform: Transform,
    chunk_size: int,
) -> None:
    """Pass the values of a sparse *dataset* (in a copy of the file) through *transform*:
    those of the allocated chunks, in place; the unallocated ones stay so (fill value 0), or
    are written out."""
    if not sparse.keeps_fill:
        refuse_filling_beyond_limit(path, tensor.name, sparse)
        rewrite_slabs(path, dataset, tensor, transform, chunk_size)
        return
    for selection, values in _allocated_slabs(path, dataset, sparse, chunk_size):
        flat = values.reshape(-1).view(tensor.dtype)
        transform(tensor, flat, flat)
        dataset.write_direct(values, dest_sel=selection)
    dataset.flush()


def refuse_filling_beyond_limit(path: Path, name: str, sparse: Sparse) -> None:
    if sparse.unallocated > MAX_FILL_WRITTEN:
        raise InputError(
            path,
            f"dataset {name!r}: {sparse.unallocated:,} of its values are unallocated, read as "
            f"its fill value {float(sparse.fill[0]):g}; rewriting them would allocate them all "
            f"(gclip writes at most {MAX_FILL_WRITTEN:,}); nothing written",
        )


def _allocated_slabs(
    path: Path, dataset: h5py.Dataset, sparse: Sparse, chunk_size: int
) -> Iterator[tuple[Selection, np.ndarray]]:
    """The values of the allocated chunks, chunk after chunk, each in C-order slabs."""
    index = sparse.index
    if index is None:
        return
    for k in range(len(index.cells)):
        yield from slabs(path, dataset, chunk_size, index.region(k))


def repeated(one: NormStats, count: int) -> NormStats:
    """The statistics of *count* copies of the values *one* describes, by doubling: every
    merge is exact, so this is the sum of count * |x|**p without rounding."""
    total, power = NormStats(one.norm_type), one
    while count:
        if count & 1:
            total.merge(power)
        count >>= 1
        if count:
            twice = NormStats(one.norm_type)
            twice.merge(power)
            twice.merge(power)
            power = twice
    return total


def silence_hdf5() -> None:
    """Keep HDF5 from printing its error stack on stderr (its errors come back as exceptions):
    h5py turns the printing off for the thread that imports it, and a thread-safe HDF5 keeps
    that setting per thread."""
    from h5py import _errors

    _errors.silence_errors()


@contextmanager
def hdf5_output(out: Path) -> Iterator[h5py.File]:
    """The output *out* opened by HDF5 for writing.  HDF5's failures there (a full disk, for
    one, may show only when HDF5 flushes on closing) come out as OSErrors, which the caller
    reports as the output's, in one line; gclip's own errors pass as they are."""
    silence_hdf5()
    try:
        with h5py.File(out, "r+", **_CHUNK_CACHE) as copy:
            yield copy
    except GclipError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        raise _as_os_error(exc) from None


# The output's datasets are read and written in C-order slabs, each a part of some chunks: a
# cache that holds the chunks of a slab decodes and encodes each chunk once (HDF5's default of
# 1 MiB did both again for every slab: a 64 MiB gzip chunk took 13 s instead of 4.5 s).  Chunks
# fully written are evicted first (w0 = 1); one dataset's cache is freed when it closes.
_CHUNK_CACHE = {"rdcc_nbytes": MAX_CHUNK_BYTES, "rdcc_w0": 1.0, "rdcc_nslots": 10_007}

_ERRNO = re.compile(r"errno = (\d+)")


def _as_os_error(exc: Exception) -> OSError:
    """An OSError for an HDF5 failure: with the system's error when HDF5 names one (its
    messages run on with buffers and offsets), else with HDF5's own message."""
    found = _ERRNO.search(str(exc))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return OSError(f"HDF5: {exc}")
