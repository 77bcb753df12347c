"""HDF5 through h5py: the output starts as a byte copy of the input, then each floating-point
dataset is rewritten: contiguous ones in place, chunked ones filtered by gzip/shuffle only as
raw chunks that gclip decodes and encodes itself (hdf5_chunks.py), the others through HDF5.

Copying the bytes keeps everything else exactly as it was (groups, attributes, hard links,
object references, committed types, non-float data), and rewriting values where they lie, or
chunk by chunk, keeps every dataset's dtype (incl. big-endian), shape, maxshape, chunking,
filters and fill value.  Filters from plugins (Blosc, Zstd, LZ4, ...) are hdf5plugin's, loaded
when a dataset needs one (hdf5_plugins.py).
Unallocated chunks of sparse datasets stay unallocated when they would only be written as zeros.
Data stored in other files (external links, virtual datasets, external raw storage) is refused.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Set
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np

from ..errors import InputError
from .base import (
    MAX_WINDOW,
    TensorInfo,
    Transform,
    ValuePiece,
    describe_array,
    items_per_chunk,
    mapped,
    reading,
    rewrite_in_place,
    window_pieces,
)
from .hdf5_chunks import (
    RawChunks,
    band_pieces,
    chunk_grid,
    raw_chunks,
    read_values,
    rewrite_values,
)
from .hdf5_plugins import load_plugins_if_needed, missing_filter, unavailable_filter_message

FORMAT_NAME = "hdf5"

Selection = tuple[slice, ...]


class Hdf5File:
    """A TensorFile with PlainValues (contiguous datasets), ChunkedPieces (chunks gclip
    decodes itself), Metadata and WholeArrays.  A tensor's location is its dataset's path."""

    format_name = FORMAT_NAME

    def __init__(self, path: Path) -> None:
        self.path = path
        with reading(path, "HDF5 cannot open it"):
            self._file = h5py.File(path, "r")
        self._raw: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._size = os.fstat(self._raw.fileno()).st_size
        self._plain: dict[str, int] | None = None
        self._datasets: dict[str, h5py.Dataset] = {}  # by location: looking up a path is slow
        self._chunk_index: dict[str, RawChunks | None] = {}
        try:
            with reading(path, "damaged HDF5 structure"):
                self.tensors = self._describe_tree()
        except BaseException:
            self.close()
            raise

    def read_chunks(self, tensor: TensorInfo, chunk_bytes: int) -> Iterator[np.ndarray]:
        dataset = self._datasets[tensor.location]
        start = self._contiguous_start(dataset, tensor)
        if start is not None:  # one plain block of values: map it, as for safetensors
            return self._mapped_chunks(start, tensor, chunk_bytes)
        raw = self._raw_chunks(tensor)
        if raw is not None:  # chunks gclip decodes itself
            return read_values(self.path, self._raw.fileno(), tensor, raw, chunk_bytes)
        # viewed as the tensor's dtype: raw (opaque) values may have been given a type
        slabs = _slabs(self.path, dataset, chunk_bytes)
        return (values.reshape(-1).view(tensor.dtype) for _, values in slabs)

    def _mapped_chunks(
        self, start: int, tensor: TensorInfo, chunk_bytes: int
    ) -> Iterator[np.ndarray]:
        for offset, nbytes in window_pieces(
            start, tensor.nbytes, tensor.dtype.itemsize, chunk_bytes
        ):
            with mapped(self._raw.fileno(), offset, nbytes) as raw:
                yield raw.view(tensor.dtype)

    def _contiguous_start(self, dataset: h5py.Dataset, tensor: TensorInfo) -> int | None:
        """Where a dataset's values lie in the file as one plain block (contiguous layout, no
        filters, allocated, inside the file), else None: then HDF5 itself reads them."""
        plist = dataset.id.get_create_plist()
        if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters():
            return None
        address = dataset.id.get_offset()
        if address is None or dataset.id.get_storage_size() != tensor.nbytes:
            return None
        # H5Dget_offset counts from the start of the file, user block included
        return address if address + tensor.nbytes <= self._size else None

    def plain_offsets(self) -> dict[str, int]:
        if self._plain is None:
            starts = {
                t.name: self._contiguous_start(self._datasets[t.location], t)
                for t in self.tensors
                if t.is_gradient
            }
            self._plain = {name: start for name, start in starts.items() if start is not None}
        selected = {t.name for t in self.tensors if t.is_gradient}  # tensors may be deselected
        return {name: start for name, start in self._plain.items() if name in selected}

    def chunked_pieces(self) -> list[ValuePiece]:
        return [
            piece
            for tensor in self._chunked_gradients()
            if (raw := self._raw_chunks(tensor)) is not None
            for piece in band_pieces(self.path, tensor, raw)
        ]

    def write_transformed(
        self, out: Path, transform: Transform, chunk_bytes: int, leave: Set[str] = frozenset()
    ) -> None:
        plain = self.plain_offsets()
        by_name = {t.name: t for t in self.tensors}
        placed = {by_name[name]: start for name, start in plain.items()}
        chunked = self._chunked_gradients()
        raw = {t: r for t in chunked if (r := self._raw_chunks(t)) is not None}
        # chunks gclip writes itself need not be copied first (nor linger, if HDF5 moves them)
        holes = np.concatenate([r.stored_ranges() for r in raw.values()]) if raw else ()
        fd = self._raw.fileno()
        rewrite_in_place(fd, out, placed, transform, chunk_bytes, leave, holes)
        # One HDF5 session for the datasets HDF5 filters, then one for those gclip encodes
        # (workers' pieces are placed in such a session too): HDF5 then allocates the same
        # places for the new chunks whoever encoded them.
        through_hdf5 = [t for t in chunked if t not in raw]
        if through_hdf5:
            with h5py.File(out, "r+") as copy:
                for tensor in through_hdf5:
                    dataset = copy[tensor.location]
                    _rewrite_through_hdf5(self.path, dataset, tensor, transform, chunk_bytes)
        encoded_here = [t for t in raw if t.name not in leave]
        if encoded_here:
            with h5py.File(out, "r+") as copy:
                for tensor in encoded_here:
                    target = copy[tensor.location]
                    rewrite_values(self.path, fd, tensor, raw[tensor], target, transform)

    def _chunked_gradients(self) -> list[TensorInfo]:
        """The gradient tensors not stored as plain bytes."""
        plain = self.plain_offsets()
        return [t for t in self.tensors if t.is_gradient and t.name not in plain]

    def _raw_chunks(self, tensor: TensorInfo) -> RawChunks | None:
        """How gclip reads *tensor*'s chunks itself (None: through HDF5); found once."""
        if tensor.name not in self._chunk_index:
            with reading(self.path, f"dataset {tensor.name!r}"):
                dataset = self._datasets[tensor.location]
                found = raw_chunks(dataset, _chunk_address_base(self._file), self._size)
            self._chunk_index[tensor.name] = found
        return self._chunk_index[tensor.name]

    def attribute(self, key: str) -> object | None:
        with reading(self.path, f"root attribute {key!r}"):
            return self._file.attrs.get(key)

    def read_array(self, tensor: TensorInfo) -> np.ndarray | None:
        dataset = self._datasets[tensor.location]
        if dataset.shape is None:  # null dataspace: no values at all
            return None
        with reading(self.path, f"dataset {tensor.name!r}"):
            return np.asarray(dataset[()])

    def close(self) -> None:
        self._file.close()
        self._raw.close()

    def _describe_tree(self) -> list[TensorInfo]:
        _refuse_external_links(self.path, self._file)
        datasets: list[tuple[str, h5py.Dataset]] = []

        def collect(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                datasets.append((name, obj))

        # visititems sees each object once, so a dataset with two hard links is scaled once.
        # (Errors are raised after the visit: exceptions do not cross HDF5's C callbacks.)
        self._file.visititems(collect)
        self._datasets = dict(datasets)
        plugins = load_plugins_if_needed(self._datasets.values())
        return [self._describe_dataset(name, dataset, plugins) for name, dataset in datasets]

    def _describe_dataset(
        self, name: str, dataset: h5py.Dataset, plugins: str | None
    ) -> TensorInfo:
        """*plugins*: why hdf5plugin's filters are not loaded (None: loaded or not needed)."""
        if dataset.is_virtual:
            raise InputError(
                self.path, f"dataset {name!r} is virtual (its data lives in other files); refused"
            )
        if dataset.external:
            raise InputError(
                self.path, f"dataset {name!r} keeps its data in external files; refused"
            )
        missing = missing_filter(dataset)
        if missing:
            raise InputError(self.path, unavailable_filter_message(name, *missing, plugins))
        if dataset.shape is None:
            return TensorInfo(
                name,
                dataset.dtype.name,
                (0,),
                0,
                skip_reason="empty (null dataspace)",
                location=name,
            )
        return describe_array(name, dataset.dtype, dataset.shape, location=name)


def _chunk_address_base(root: h5py.File) -> int:
    """What to add to the chunk addresses HDF5 reports to get file offsets: before HDF5 1.14.4
    they did not count the user block (HDFGroup/hdf5#3003), unlike H5Dget_offset's."""
    return root.userblock_size if h5py.version.hdf5_version_tuple < (1, 14, 4) else 0


def _refuse_external_links(path: Path, root: h5py.File) -> None:
    def first_external(name: str, link: object) -> tuple[str, h5py.ExternalLink] | None:
        return (name, link) if isinstance(link, h5py.ExternalLink) else None

    found = root.visititems_links(first_external)
    if found:
        name, link = found
        raise InputError(
            path,
            f"{name!r} is an external link to {link.filename}:{link.path}; "
            "gclip does not follow links into other files",
        )


def _slabs(
    path: Path, dataset: h5py.Dataset, chunk_bytes: int
) -> Iterator[tuple[Selection, np.ndarray]]:
    """Read *dataset* in hyperslabs that follow C order, each into one reused buffer."""
    shape = dataset.shape
    # no larger than a mapped window: HDF5 holds the compressed chunks besides
    max_items = items_per_chunk(dataset.dtype.itemsize, min(chunk_bytes, MAX_WINDOW))
    buffer = np.empty(min(max_items, math.prod(shape)), dtype=dataset.dtype)
    for selection in _c_order_slabs(shape, dataset.chunks, max_items):
        slab_shape = tuple(s.stop - s.start for s in selection) + shape[len(selection) :]
        values = buffer[: math.prod(slab_shape)].reshape(slab_shape)
        with reading(path, f"dataset {dataset.name!r}"):
            dataset.read_direct(values, source_sel=selection)
        yield selection, values


def _c_order_slabs(
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


def _rewrite_through_hdf5(
    path: Path, dataset: h5py.Dataset, tensor: TensorInfo, transform: Transform, chunk_bytes: int
) -> None:
    keep_sparse = _is_sparse(dataset) and not np.any(dataset.fillvalue)
    for selection, values in _slabs(path, dataset, chunk_bytes):
        flat = values.reshape(-1).view(tensor.dtype)  # raw values may have been given a type
        transform(tensor, flat, flat)
        if keep_sparse:
            _write_nonzero_chunks(dataset, selection, values)
        else:
            dataset.write_direct(values, dest_sel=selection)


def _write_nonzero_chunks(dataset: h5py.Dataset, selection: Selection, values: np.ndarray) -> None:
    """Write the parts of *values* that fall in storage chunks holding a nonzero value.

    Writing an all-zero part would allocate a chunk that reads as zero (the fill value) anyway.
    """
    origin = [s.start for s in selection] + [0] * (values.ndim - len(selection))
    pieces = [
        _chunk_pieces(start, size, chunk)
        for start, size, chunk in zip(origin, values.shape, dataset.chunks, strict=True)
    ]
    for piece in itertools.product(*pieces):
        local = tuple(slice(a - o, b - o) for (a, b), o in zip(piece, origin, strict=True))
        part = values[local]
        if np.any(part):
            target = tuple(slice(a, b) for a, b in piece)
            dataset.write_direct(np.ascontiguousarray(part), dest_sel=target)


def _chunk_pieces(start: int, size: int, chunk: int) -> list[tuple[int, int]]:
    """[start, start + size) cut at multiples of *chunk*."""
    cuts = [start, *range((start // chunk + 1) * chunk, start + size, chunk), start + size]
    return list(itertools.pairwise(cuts))


def _is_sparse(dataset: h5py.Dataset) -> bool:
    """Whether some chunks of *dataset* are not allocated (they read as the fill value)."""
    if dataset.chunks is None:
        return False
    return dataset.id.get_num_chunks() < math.prod(chunk_grid(dataset.shape, dataset.chunks))
