"""Where an HDF5 dataset's values lie in its file, checked before gclip or HDF5 goes there.

HDF5 takes the addresses a file gives on trust.  A damaged or crafted file can put a dataset's
values at address 0 or inside the superblock, past the end of the file (or at an address that
overflows when its size is added), over another dataset's values, or inside the file's own
metadata (hdf5_metadata.py); it can declare chunks far larger than any real file uses, and
store chunks whose deflate streams inflate far beyond their chunk.  Each is refused here with
one line naming the dataset, before any of its values is read or written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ..errors import InputError
from .base import reading
from .byte_sources import read_at
from .deflate import inflate

if TYPE_CHECKING:
    from .byte_sources import ByteSource

# The largest chunk (decoded) gclip lets HDF5 decode: HDF5 holds a whole decoded chunk in memory,
# and its deflate filter grows the buffer by doubling (so up to twice that while it inflates).
# h5py's automatic chunks are at most 1 MiB and HDF5 advises about that size; with 64 MiB
# chunks gclip peaked at 184 MiB reading and 248 MiB rewriting (gzip and Fletcher-32).
MAX_CHUNK_BYTES = 64 << 20
# Bytes an encoded chunk may hold beyond its decoded size: deflate adds at most 5 bytes per
# 16 KiB block, Fletcher-32 4 bytes, plugins' headers a few dozen.
_STORED_SLACK = 4096

# chunk_iter's callback may not raise (exceptions do not cross HDF5's C callbacks): addresses
# too large for int64 are noted as this, which lies past the end of any file.
_HUGE = 1 << 62
_UNALLOCATED = -1


@dataclass(frozen=True)
class ChunkIndex:
    """The allocated chunks of a chunked dataset, in the C order of its chunk grid."""

    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    cells: np.ndarray  # int64: each chunk's place in the chunk grid, in C order
    offsets: np.ndarray  # int64 file offsets (user block included)
    sizes: np.ndarray  # int64 stored sizes
    masks: np.ndarray  # uint32 filter masks (bit i set: filter i was skipped)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunk_shape, strict=True))

    @property
    def complete(self) -> bool:
        """Whether every chunk of the grid is allocated."""
        return len(self.cells) == math.prod(self.grid)

    def ranges(self) -> np.ndarray:
        """(offset, size) rows: where the chunks lie in the file."""
        return np.stack([self.offsets, self.sizes], axis=1).reshape(-1, 2)

    def region(self, k: int) -> tuple[slice, ...]:
        """The part of the dataset chunk *k* (a row of this index) holds."""
        cell = np.unravel_index(int(self.cells[k]), self.grid)
        return tuple(
            slice(int(i) * c, min((int(i) + 1) * c, n))
            for i, c, n in zip(cell, self.chunk_shape, self.shape, strict=True)
        )

    def values_inside(self) -> int:
        """How many of the dataset's values the allocated chunks hold (edge chunks reach
        beyond the dataset's extent)."""
        counts = np.ones(len(self.cells), dtype=np.int64)
        cells = np.unravel_index(self.cells, self.grid)
        for axis_cells, chunk, n in zip(cells, self.chunk_shape, self.shape, strict=True):
            first = axis_cells.astype(np.int64) * chunk
            counts *= np.minimum(first + chunk, n) - first
        return int(counts.sum())


@dataclass(frozen=True)
class FileSpace:
    """Where values may lie in one HDF5 file: after its superblock, before its end."""

    path: Path
    base: int  # what to add to the chunk addresses HDF5 reports to get file offsets
    first: int  # the first byte after the superblock
    size: int  # the file's length

    @classmethod
    def of(cls, path: Path, source: ByteSource, userblock: int, base: int) -> FileSpace:
        """The space of the file whose bytes *source* gives (a local file or an object)."""
        return cls(path, base, _superblock_end(source, userblock), source.size)

    def contiguous(self, name: str, dataset: h5py.Dataset) -> tuple[int, int] | None:
        """(file offset, size) of a contiguous dataset's values; None when they are not
        allocated (HDF5 reads the fill value)."""
        try:
            address = dataset.id.get_offset()
        except RuntimeError:  # h5py takes address 0 for HDF5's error value
            address = 0
        if address is None:
            return None
        with reading(self.path, f"dataset {name!r}"):
            size = dataset.id.get_storage_size()
        self._check(name, "its values", address, size)
        return address, size

    def chunk_index(self, name: str, dataset: h5py.Dataset) -> ChunkIndex:
        """The allocated chunks of a chunked dataset, each checked to lie inside the file and
        to be a chunk of the dataset, none twice."""
        with reading(self.path, f"dataset {name!r}, chunk index"):
            index = read_chunk_index(dataset, self.base)
            filters = dataset.id.get_create_plist().get_nfilters()
            raw_bytes = math.prod(dataset.chunks) * dataset.id.get_type().get_size()
        self._check_chunks(name, index)
        self._check_unfiltered_sizes(name, index, filters, raw_bytes)
        return index

    def _check_unfiltered_sizes(
        self, name: str, index: ChunkIndex, filters: int, raw_bytes: int
    ) -> None:
        """A chunk stored without filters (none, or all skipped) holds the chunk's bytes as
        they are: HDF5 takes as many as the index says and leaves the rest of its buffer as
        it was (values read from uninitialised memory, different on every run)."""
        unfiltered = index.masks & ((1 << filters) - 1) == (1 << filters) - 1
        wrong = unfiltered & (index.sizes != raw_bytes)
        if np.any(wrong):
            k = int(np.argmax(wrong))
            raise InputError(
                self.path,
                f"dataset {name!r}: its chunk at {_coordinates(index, k)} is stored unfiltered "
                f"in {int(index.sizes[k]):,} bytes, not {raw_bytes:,}; damaged file",
            )

    def _check_chunks(self, name: str, index: ChunkIndex) -> None:
        if np.any(index.cells < 0):
            raise InputError(
                self.path,
                f"dataset {name!r}: its chunk index lists a chunk outside the dataset, or not "
                "at a chunk's corner; damaged file",
            )
        if np.unique(index.cells).size != index.cells.size:
            raise InputError(
                self.path, f"dataset {name!r}: its chunk index lists a chunk twice; damaged file"
            )
        if index.offsets.size:
            smallest = int(np.argmin(index.offsets))
            largest = int(np.argmax(index.offsets + index.sizes))
            for k in (smallest, largest):
                start, size = int(index.offsets[k]), int(index.sizes[k])
                self._check(name, f"its chunk at {_coordinates(index, k)}", start, size)

    def _check(self, name: str, what: str, start: int, size: int) -> None:
        at = f"byte {start:,}" if start < _HUGE else "an address past 2**62"
        where = f"dataset {name!r}: {what} ({size:,} bytes at {at})"
        if start < self.first:
            raise InputError(self.path, f"{where} would lie in the superblock; damaged file")
        if start + size > self.size:
            raise InputError(
                self.path, f"{where} would reach past the end of the file ({self.size:,} bytes)"
            )


def _superblock_end(source: ByteSource, userblock: int) -> int:
    """The first byte after the superblock that begins at *userblock* (its size depends on
    its version and the size of the file's addresses)."""
    head = source.read(userblock, max(0, min(16, source.size - userblock)))
    if len(head) < 16:
        return userblock + len(head)
    version = head[8]
    if version in (0, 1):  # 24 bytes of versions and sizes, 4 addresses, the root's entry
        address_bytes = head[13]
        return userblock + 48 + 6 * address_bytes + (4 if version == 1 else 0)
    address_bytes = head[9]  # 12 bytes of sizes and flags, 4 addresses, a checksum
    return userblock + 16 + 4 * address_bytes


def read_chunk_index(dataset: h5py.Dataset, base: int) -> ChunkIndex:
    """The allocated chunks of *dataset* as its chunk index lists them (chunk addresses
    counted from byte *base*), unchecked."""
    shape, chunk_shape = dataset.shape, dataset.chunks
    count = dataset.id.get_num_chunks()
    coordinates = np.zeros((count, len(shape)), dtype=np.int64)
    offsets = np.full(count, _UNALLOCATED, dtype=np.int64)
    sizes = np.zeros(count, dtype=np.int64)
    masks = np.zeros(count, dtype=np.uint32)
    seen = 0

    def note(info: h5py.h5d.StoreInfo) -> None:
        nonlocal seen
        # an undefined address (h5py: None) is a chunk not allocated: HDF5 reads the fill value
        if seen < count and info.byte_offset is not None and info.chunk_offset is not None:
            coordinates[seen] = [min(c, _HUGE) for c in info.chunk_offset]
            offsets[seen] = min(base + info.byte_offset, _HUGE)
            sizes[seen], masks[seen] = min(info.size, _HUGE), info.filter_mask
        seen += 1

    if hasattr(dataset.id, "chunk_iter"):
        dataset.id.chunk_iter(note)
    else:  # HDF5 before 1.14: one call per chunk
        for k in range(count):
            note(dataset.id.get_chunk_info(k))
    allocated = offsets[:seen] != _UNALLOCATED
    cells = _cells(coordinates[:seen][allocated], shape, chunk_shape)
    order = np.argsort(cells, kind="stable")
    pick = np.flatnonzero(allocated)[order]
    return ChunkIndex(shape, chunk_shape, cells[order], offsets[pick], sizes[pick], masks[pick])


def _cells(coordinates: np.ndarray, shape: tuple[int, ...], chunks: tuple[int, ...]) -> np.ndarray:
    """Each chunk's place in the C order of the chunk grid; -1 for coordinates that are not a
    chunk's first value inside the dataset."""
    grid = np.array([-(-n // c) for n, c in zip(shape, chunks, strict=True)], np.int64)
    size = np.array(chunks, dtype=np.int64)
    extent = np.minimum(np.array(shape, dtype=object), _HUGE).astype(np.int64)
    valid = np.all((coordinates % size == 0) & (coordinates < extent), axis=1)
    cells = np.ravel_multi_index((coordinates // size * valid[:, None]).T, grid)
    return np.where(valid, cells, -1).astype(np.int64)


def _coordinates(index: ChunkIndex, k: int) -> tuple[int, ...]:
    return tuple(s.start for s in index.region(k))


def declared_chunk_bytes(dataset: h5py.Dataset) -> int:
    """The decoded size of one chunk, in the file's type or in memory, whichever is larger
    (HDF5 converts a chunk's values in place)."""
    itemsize = max(dataset.id.get_type().get_size(), dataset.dtype.itemsize)
    return math.prod(dataset.chunks) * itemsize


def refuse_oversized_chunks(
    path: Path, name: str, dataset: h5py.Dataset, index: ChunkIndex
) -> None:
    """Refuse filtered chunks that decode to more than MAX_CHUNK_BYTES, or are stored larger
    than their decoded size allows (unfiltered chunks are read piece by piece: any size)."""
    if dataset.id.get_create_plist().get_nfilters() == 0:
        return
    declared = declared_chunk_bytes(dataset)
    if declared > MAX_CHUNK_BYTES:
        raise InputError(
            path,
            f"dataset {name!r}: its chunks decode to {declared:,} bytes each, more than the "
            f"{MAX_CHUNK_BYTES >> 20} MiB gclip lets HDF5 hold for one chunk",
        )
    if index.sizes.size and int(index.sizes.max()) > declared + _STORED_SLACK:
        k = int(np.argmax(index.sizes))
        raise InputError(
            path,
            f"dataset {name!r}: its chunk at {_coordinates(index, k)} is stored in "
            f"{int(index.sizes[k]):,} bytes, more than a {declared:,}-byte chunk can take; "
            "damaged file",
        )


def refuse_inflating_streams(
    path: Path, name: str, fd: int | ByteSource, dataset: h5py.Dataset, index: ChunkIndex
) -> None:
    """Refuse chunks whose deflate stream inflates past the chunk's size, before HDF5 decodes
    them: HDF5's deflate filter inflates a stream whole, however large (a 300 KB chunk of a
    crafted file took 300 MiB).  Only streams HDF5 meets first are checked (deflate last in
    the pipeline, or before Fletcher-32); for the others the filters' own bounds hold."""
    plist = dataset.id.get_create_plist()
    codes = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if h5py.h5z.FILTER_DEFLATE not in codes:
        return
    limit = declared_chunk_bytes(dataset) + _STORED_SLACK
    for k in range(len(index.cells)):
        stream = _outer_deflate_stream(codes, int(index.masks[k]), fd, index, k)
        if stream is None:
            continue
        with reading(path, f"dataset {name!r}, chunk at {_coordinates(index, k)}"):
            inflate(stream, limit)


def _outer_deflate_stream(
    codes: list[int], mask: int, fd: int | ByteSource, index: ChunkIndex, k: int
) -> bytes | None:
    """The deflate stream HDF5 meets first when decoding chunk *k*, or None."""
    applied = [code for i, code in enumerate(codes) if not mask >> i & 1]
    trailer = 0
    while applied and applied[-1] == h5py.h5z.FILTER_FLETCHER32:
        applied.pop()
        trailer += 4
    if not applied or applied[-1] != h5py.h5z.FILTER_DEFLATE:
        return None
    data = read_at(fd, int(index.offsets[k]), int(index.sizes[k]))
    return data[: len(data) - trailer]


def refuse_overlaps(path: Path, ranges: Iterable[tuple[str, np.ndarray]]) -> None:
    """Refuse values that would lie over other values: *ranges* gives each dataset's
    (offset, size) rows."""
    named = [(name, rows[rows[:, 1] > 0]) for name, rows in ranges]
    if not any(len(rows) for _, rows in named):
        return
    owners = np.concatenate(
        [np.full(len(rows), i, dtype=np.int64) for i, (_, rows) in enumerate(named)]
    )
    rows = np.concatenate([rows for _, rows in named])
    order = np.argsort(rows[:, 0], kind="stable")
    starts, ends, owners = rows[order, 0], rows[order, 0] + rows[order, 1], owners[order]
    clash = np.flatnonzero(starts[1:] < np.maximum.accumulate(ends)[:-1])
    if not clash.size:
        return
    k = int(clash[0]) + 1
    before = int(np.argmax(ends[:k] > starts[k]))  # the earlier range that reaches into k's
    first, second = named[owners[before]][0], named[owners[k]][0]
    what = (
        f"datasets {first!r} and {second!r}"
        if first != second
        else f"two chunks of dataset {first!r}"
    )
    raise InputError(path, f"the values of {what} would lie over each other; damaged file")
