"""Chunked HDF5 datasets read and written as raw chunks, with the shuffle and deflate filters
applied by gclip itself.

HDF5 deflates with zlib at the dataset's level: about 30 MB/s on float data, which made a
gzip-compressed dump a one-core, zlib-bound job.  Through ISA-L (``gclip[fast]``) the same
filter runs about 20 times faster and produces ordinary zlib streams that HDF5's own filter
reads; without ISA-L, zlib runs at the dataset's own level, as HDF5 would.

Values still come and go in C order, so every norm is the one HDF5's own reading gives: chunks
are decoded a band at a time (all chunks that start at one row of the first axis), the band's
values are passed on in C order, and each chunk is encoded and written back whole (including
the part of an edge chunk beyond the dataset's extent, which keeps its bytes).  Datasets with
any other filter, with unallocated chunks, or whose bands would be larger than a window go
through HDF5 as before.

For several cores, a tensor is cut into pieces (BandRows) at rows where both a band and a
block of values (norms.BLOCK) begin: worker processes measure them in pass 1, and in pass 2
decode, scale and encode them into spool files whose chunks one process then places.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ..norms import BLOCK, NormAccumulator, NormStats
from . import deflate
from .base import MAX_WINDOW, TensorInfo, Transform, items_per_chunk, reading, write_all_at
from .byte_sources import read_at
from .hdf5_storage import ChunkIndex
from .hdf5_values import hdf5_output

if TYPE_CHECKING:
    from ..progress import Progress
    from .byte_sources import ByteSource

Coordinates = tuple[int, ...]
Region = tuple[slice, ...]


@dataclass(frozen=True)
class Filter:
    code: int  # h5py.h5z.FILTER_SHUFFLE or FILTER_DEFLATE
    parameter: int  # shuffle: bytes per value; deflate: level

    def decode(self, data: bytes, limit: int) -> bytes:
        """Undo this filter; no result may be longer than *limit* bytes."""
        if self.code == h5py.h5z.FILTER_DEFLATE:
            return deflate.inflate(data, limit)
        values = np.frombuffer(data, dtype=np.uint8)
        body = len(data) - len(data) % self.parameter  # HDF5 leaves trailing bytes in place
        return values[:body].reshape(self.parameter, -1).T.tobytes() + data[body:]

    def encode(self, data: bytes) -> bytes:
        if self.code == h5py.h5z.FILTER_DEFLATE:
            return deflate.deflate(data, self.parameter)
        values = np.frombuffer(data, dtype=np.uint8)
        body = len(data) - len(data) % self.parameter
        return values[:body].reshape(-1, self.parameter).T.tobytes() + data[body:]


_HANDLED = {h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE}


@dataclass(frozen=True)
class Pipeline:
    """A dataset's filters, in the order HDF5 applies them when writing."""

    filters: tuple[Filter, ...]

    @classmethod
    def of(cls, dataset: h5py.Dataset) -> Pipeline | None:
        """The dataset's pipeline when gclip can apply every filter of it, else None."""
        plist = dataset.id.get_create_plist()
        filters = []
        for index in range(plist.get_nfilters()):
            code, _, values, _ = plist.get_filter(index)
            if code not in _HANDLED:
                return None
            default = dataset.dtype.itemsize if code == h5py.h5z.FILTER_SHUFFLE else 6
            filters.append(Filter(code, int(values[0]) if values else default))
        return cls(tuple(filters))

    def decode(self, data: bytes, mask: int, limit: int) -> bytes:
        """Undo the filters not skipped in *mask* (bit i set: filter i was skipped), into at
        most *limit* bytes."""
        for index in reversed(range(len(self.filters))):
            if not mask >> index & 1:
                data = self.filters[index].decode(data, limit)
        return data

    def encode(self, data: bytes, mask: int) -> bytes:
        for index, step in enumerate(self.filters):
            if not mask >> index & 1:
                data = step.encode(data)
        return data


@dataclass(frozen=True)
class RawChunks:
    """Where a chunked dataset's chunks lie in its file, and the filters they went through.

    The index is kept in arrays in the C order of the chunk grid (a few bytes per chunk).
    """

    pipeline: Pipeline
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    offsets: np.ndarray  # int64 file offsets (user block included)
    sizes: np.ndarray  # int64 stored sizes
    masks: np.ndarray  # uint32 filter masks (bit i set: filter i was skipped)

    @property
    def grid(self) -> tuple[int, ...]:
        return chunk_grid(self.shape, self.chunk_shape)

    def stored_ranges(self) -> np.ndarray:
        """(offset, size) rows: where the chunks lie in the file."""
        return np.stack([self.offsets, self.sizes], axis=1)

    def stored(self, coordinates: Coordinates) -> tuple[int, int, int]:
        """(offset, size, filter mask) of the chunk at *coordinates*."""
        cell = tuple(o // c for o, c in zip(coordinates, self.chunk_shape, strict=True))
        k = int(np.ravel_multi_index(cell, self.grid))
        return int(self.offsets[k]), int(self.sizes[k]), int(self.masks[k])


def chunk_grid(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    """How many chunks of shape *chunks* cover *shape* along each axis."""
    return tuple(math.ceil(n / c) for n, c in zip(shape, chunks, strict=True))


def raw_chunks(dataset: h5py.Dataset, index: ChunkIndex) -> RawChunks | None:
    """How to read *dataset* chunk by chunk, straight from its file (*index*: its chunks,
    checked to lie in the file), or None when HDF5 must do it: empty, chunks not all
    allocated, a filter gclip does not apply itself, or bands larger than a window."""
    if dataset.chunks is None or dataset.size == 0 or not index.complete:
        return None
    shape, chunks = dataset.shape, dataset.chunks
    band_bytes = chunks[0] * math.prod(shape[1:]) * dataset.dtype.itemsize
    pipeline = Pipeline.of(dataset)
    if pipeline is None or band_bytes > MAX_WINDOW:
        return None
    # a complete index lists the chunks in the C order of the grid, as RawChunks keeps them
    return RawChunks(pipeline, shape, chunks, index.offsets, index.sizes, index.masks)


@dataclass(frozen=True)
class _Chunk:
    coordinates: Coordinates
    mask: int
    place: Region  # where the chunk's values inside the dataset lie in its band
    inside: Region  # where they lie in the chunk
    edge: np.ndarray | None  # a chunk reaching beyond the dataset, decoded whole, else None


@dataclass(frozen=True)
class _Band:
    """The chunks that start at one row of the first axis, and their values in C order."""

    values: np.ndarray
    chunks: list[_Chunk]


class _ChunkedDataset:
    """A dataset's chunks read straight from its file a band at a time, decoded, and encoded
    again as they were."""

    def __init__(
        self, path: Path, fd: int | ByteSource, name: str, raw: RawChunks, dtype: np.dtype
    ) -> None:
        self.path, self.fd, self.name, self.raw, self.dtype = path, fd, name, raw, dtype
        self.chunk_size = math.prod(raw.chunk_shape) * dtype.itemsize
        self._starts = [
            range(0, n, c) for n, c in zip(raw.shape[1:], raw.chunk_shape[1:], strict=True)
        ]

    def bands(self, rows: range | None = None) -> Iterator[_Band]:
        """The bands starting at *rows* (default: all), in order."""
        rows = rows or range(0, self.raw.shape[0], self.raw.chunk_shape[0])
        return map(self._read_band, rows)

    def write(self, bands: Iterable[_Band], target: h5py.Dataset) -> None:
        """Write the values of *bands* into their chunks of *target*, encoded as they were."""
        for band in bands:
            for coordinates, data, mask in self.encode_band(band):
                target.id.write_direct_chunk(coordinates, data, mask)

    def _read_band(self, row: int) -> _Band:
        shape, chunk_rows = self.raw.shape, self.raw.chunk_shape[0]
        values = np.empty((min(chunk_rows, shape[0] - row), *shape[1:]), dtype=self.dtype)
        chunks = []
        for rest in itertools.product(*self._starts):
            chunk, decoded = self._read_chunk((row, *rest))
            values[chunk.place] = decoded[chunk.inside]
            chunks.append(chunk)
        return _Band(values, chunks)

    def _read_chunk(self, coordinates: Coordinates) -> tuple[_Chunk, np.ndarray]:
        offset, size, mask = self.raw.stored(coordinates)
        with reading(self.path, f"dataset {self.name!r}, chunk at {coordinates}"):
            data = self.raw.pipeline.decode(read_at(self.fd, offset, size), mask, self.chunk_size)
            if len(data) != self.chunk_size:
                raise ValueError(f"{len(data)} bytes decoded, {self.chunk_size} expected")
        chunk_shape = self.raw.chunk_shape
        decoded = np.frombuffer(data, dtype=self.dtype).reshape(chunk_shape)
        sizes = [
            min(c, n - o) for c, n, o in zip(chunk_shape, self.raw.shape, coordinates, strict=True)
        ]
        inside = tuple(slice(0, size) for size in sizes)
        place = (
            slice(None),
            *(slice(o, o + s) for o, s in zip(coordinates[1:], sizes[1:], strict=True)),
        )
        edge = decoded.copy() if tuple(sizes) != chunk_shape else None  # keeps its padding
        return _Chunk(coordinates, mask, place, inside, edge), decoded

    def encode_band(self, band: _Band) -> list[tuple[Coordinates, bytes, int]]:
        """(coordinates, stored bytes, filter mask) of each chunk of *band*."""
        encoded = []
        for chunk in band.chunks:
            if chunk.edge is None:
                data = band.values[chunk.place].tobytes()  # C order, as HDF5 stores a chunk
            else:
                chunk.edge[chunk.inside] = band.values[chunk.place]
                data = chunk.edge.tobytes()
            encoded.append(
                (chunk.coordinates, self.raw.pipeline.encode(data, chunk.mask), chunk.mask)
            )
        return encoded


@dataclass(frozen=True)
class BandRows:
    """The values of whole bands of a chunked tensor, from a row where a block of values
    begins: a piece a worker process can measure (see base.ValuePiece)."""

    path: Path
    tensor: TensorInfo
    raw: RawChunks
    rows: range  # the first rows of the bands

    @property
    def nbytes(self) -> int:
        rows = min(self.rows.stop, self.raw.shape[0]) - self.rows.start
        return rows * _row_bytes(self.raw, self.tensor.dtype)

    def measure(self, fd: int, norm_type: float, chunk_size: int, progress: Progress) -> NormStats:
        del chunk_size  # bands are read whole: each holds whole chunks
        first = self.rows.start * math.prod(self.raw.shape[1:])  # its first value's index
        accumulator = NormAccumulator.for_tensor(self.tensor, norm_type, first)
        for band in self._dataset(fd).bands(self.rows):
            accumulator.add(band.values.reshape(-1))
            progress.advance(band.values.nbytes)
        return accumulator.finish()

    def encode(self, fd: int, transform: Transform, spool: int) -> list[SpooledChunk]:
        dataset = self._dataset(fd)
        spooled = []
        for band in _transformed(dataset.bands(self.rows), self.tensor, transform):
            for coordinates, data, mask in dataset.encode_band(band):
                end = os.lseek(spool, 0, os.SEEK_END)
                write_all_at(spool, memoryview(data), end)
                spooled.append((coordinates, mask, end, len(data)))
        return spooled

    @staticmethod
    @contextmanager
    def placing(out: Path) -> Iterator[Callable[[BandRows, int, list[SpooledChunk]], None]]:
        with hdf5_output(out) as copy:  # one session, as Hdf5File.write_transformed's

            def place(piece: BandRows, spool: int, chunks: list[SpooledChunk]) -> None:
                target = copy[piece.tensor.location]
                for coordinates, mask, offset, size in chunks:
                    data = os.pread(spool, size, offset)
                    target.id.write_direct_chunk(coordinates, data, mask)

            yield place

    def _dataset(self, fd: int) -> _ChunkedDataset:
        return _ChunkedDataset(self.path, fd, self.tensor.name, self.raw, self.tensor.dtype)


# (chunk coordinates, filter mask, offset in the spool file, size)
SpooledChunk = tuple[Coordinates, int, int, int]


# A tensor is cut into pieces of about this many bytes for workers to measure, where it can be.
PIECE_BYTES = 32 << 20


def band_pieces(path: Path, tensor: TensorInfo, raw: RawChunks) -> list[BandRows]:
    """*tensor* cut into pieces of about PIECE_BYTES at the rows where both a band and a block
    of values begin (the whole tensor when there is no such row)."""
    chunk_rows, row_values = raw.chunk_shape[0], math.prod(raw.shape[1:])
    aligned = math.lcm(chunk_rows, BLOCK // math.gcd(row_values, BLOCK))  # rows between such
    row_bytes = _row_bytes(raw, tensor.dtype)
    step = max(1, PIECE_BYTES // (aligned * row_bytes)) * aligned
    return [
        BandRows(path, tensor, raw, range(start, min(start + step, raw.shape[0]), chunk_rows))
        for start in range(0, raw.shape[0], step)
    ]


def _row_bytes(raw: RawChunks, dtype: np.dtype) -> int:
    return math.prod(raw.shape[1:]) * dtype.itemsize


def read_values(
    path: Path,
    fd: int | ByteSource,
    tensor: TensorInfo,
    raw: RawChunks,
    chunk_size: int,
) -> Iterator[np.ndarray]:
    """The values of *tensor* (stored as *raw* in the open file *fd*, or a remote object's
    bytes) in C order, as 1-D pieces of at most *chunk_size*."""
    step = items_per_chunk(tensor.dtype.itemsize, chunk_size)
    for band in _ChunkedDataset(path, fd, tensor.name, raw, tensor.dtype).bands():
        flat = band.values.reshape(-1)
        for start in range(0, flat.size, step):
            yield flat[start : start + step]


def rewrite_values(
    path: Path,
    fd: int,
    tensor: TensorInfo,
    raw: RawChunks,
    target: h5py.Dataset,
    transform: Transform,
) -> None:
    """Pass the values of *tensor* (stored as *raw* in the open file *fd*) through *transform*,
    in C order, into the chunks of *target*, the same dataset in a copy of the file."""
    chunks = _ChunkedDataset(path, fd, tensor.name, raw, tensor.dtype)
    chunks.write(_transformed(chunks.bands(), tensor, transform), target)


def _transformed(
    bands: Iterable[_Band], tensor: TensorInfo, transform: Transform
) -> Iterator[_Band]:
    for band in bands:
        flat = band.values.reshape(-1)
        transform(tensor, flat, flat)
        yield band
