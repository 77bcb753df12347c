"""HDF5 through h5py: the output starts as a byte copy of the input, then each floating-point
dataset is rewritten: contiguous ones in place, chunked ones filtered by gzip/shuffle only as
raw chunks that gclip decodes and encodes itself (hdf5_chunks.py), the others through HDF5.

Copying the bytes keeps everything else exactly as it was (groups, attributes, hard links,
object references, committed types, non-float data), and rewriting values where they lie, or
chunk by chunk, keeps every dataset's dtype (incl. big-endian), shape, maxshape, chunking,
filters and fill value.  Filters from plugins (Blosc, Zstd, LZ4, ...) are hdf5plugin's, loaded
when a dataset needs one (hdf5_plugins.py).
Where values lie is checked before anything is read there (hdf5_storage.py), and before a
rewrite, that the values lie neither over each other nor inside the file's metadata
(hdf5_metadata.py).  Unallocated chunks of sparse datasets are counted from the fill value,
and stay unallocated (hdf5_values.py).  Floats whose bit layout is not IEEE 754 are read as
HDF5 converts them, and not rewritten.
Data stored in other files (external links, virtual datasets, external raw storage) is refused.
A remote object is read by ranges (RangedHdf5File) with the same checks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import h5py
import numpy as np

from ..errors import InputError, OutputError
from ..norms import NormStats
from .base import (
    MAX_WINDOW,
    TensorInfo,
    Transform,
    ValuePiece,
    describe_array,
    reading,
    rewrite_in_place,
    window_pieces,
)
from .byte_sources import LocalBytes
from .hdf5_chunks import RawChunks, band_pieces, raw_chunks, read_values, rewrite_values
from .hdf5_metadata import (
    refuse_broken_output,
    refuse_values_in_metadata,
    refuse_values_in_rewritten_blocks,
)
from .hdf5_plugins import load_plugins_if_needed, missing_filter, unavailable_filter_message
from .hdf5_storage import (
    FileSpace,
    refuse_inflating_streams,
    refuse_overlaps,
    refuse_oversized_chunks,
)
from .hdf5_values import (
    Sparse,
    hdf5_output,
    measure_sparse,
    refuse_filling_beyond_limit,
    rewrite_slabs,
    rewrite_sparse,
    silence_hdf5,
    slabs,
)

if TYPE_CHECKING:
    from ..progress import Progress
    from .byte_sources import ByteSource
    from .ranged import RangedBytes

FORMAT_NAME = "hdf5"

_NO_RANGES = np.zeros((0, 2), dtype=np.int64)


@dataclass(frozen=True)
class _Stored:
    """How a gradient dataset's values are stored, found and checked once.  With none of
    start, raw and sparse, HDF5 reads and writes them (in C-order slabs)."""

    ranges: np.ndarray  # (offset, size) rows: where the values lie in the file
    start: int | None = None  # one plain block of values at this offset: mapped
    raw: RawChunks | None = None  # chunks gclip decodes itself
    sparse: Sparse | None = None  # storage not all allocated


class _Hdf5Reader:
    """What the readers of local HDF5 files and of remote objects share: h5py over the file
    (*_file*), its bytes (*_source*), and the checks of where values lie."""

    format_name = FORMAT_NAME
    path: Path
    _file: h5py.File

    def _describe(self, source: ByteSource) -> None:
        """Find the datasets of the open *_file*, whose bytes *source* gives; closed on
        failure."""
        self._source = source
        self._stored: dict[str, _Stored] = {}
        self._datasets: dict[str, h5py.Dataset] = {}  # by location: looking up a path is slow
        try:
            with reading(self.path, "damaged HDF5 structure"):
                base = _chunk_address_base(self._file)
                self._space = FileSpace.of(self.path, source, self._file.userblock_size, base)
                self.tensors = self._describe_tree()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._file.close()

    def read_chunks(self, tensor: TensorInfo, chunk_size: int) -> Iterator[np.ndarray]:
        stored = self._storage(tensor)
        if stored.start is not None:  # one plain block of values: map it, as for safetensors
            return self._mapped_chunks(stored.start, tensor, chunk_size)
        if stored.raw is not None:  # chunks gclip decodes itself
            source = self._chunk_source(stored.raw)
            return read_values(self.path, source, tensor, stored.raw, chunk_size)
        dataset = self._datasets[tensor.location]
        # viewed as the tensor's dtype: raw (opaque) values may have been given a type
        found = slabs(self.path, dataset, chunk_size)
        return (values.reshape(-1).view(tensor.dtype) for _, values in found)

    def _chunk_source(self, raw: RawChunks) -> ByteSource:
        """Where read_values reads the chunks of *raw* from, in the order it keeps them."""
        return self._source

    def measure_tensor(
        self, tensor: TensorInfo, norm_type: float, chunk_size: int, progress: Progress
    ) -> NormStats | None:
        """The statistics of a sparse tensor, its unallocated values counted without being
        visited; None for the others (read_chunks serves them)."""
        sparse = self._storage(tensor).sparse
        if sparse is None:
            return None
        dataset = self._datasets[tensor.location]
        return measure_sparse(self.path, dataset, sparse, tensor, norm_type, chunk_size, progress)

    def _mapped_chunks(
        self, start: int, tensor: TensorInfo, chunk_size: int
    ) -> Iterator[np.ndarray]:
        """A local file's windows are mapped; an object's fetched, the next while one is
        worked on."""
        pieces = window_pieces(start, tensor.nbytes, tensor.dtype.itemsize, chunk_size)
        for raw in self._source.windows(pieces):
            yield raw.view(tensor.dtype)

    def _storage(self, tensor: TensorInfo) -> _Stored:
        if tensor.name not in self._stored:
            self._stored[tensor.name] = self._find_storage(tensor)
        return self._stored[tensor.name]

    def _find_storage(self, tensor: TensorInfo) -> _Stored:
        """Where and how *tensor*'s values are stored, checked before anything reads them."""
        name, dataset = tensor.name, self._datasets[tensor.location]
        with reading(self.path, f"dataset {name!r}"):
            layout = dataset.id.get_create_plist().get_layout()
            as_stored = is_ieee_float(dataset)  # else HDF5 converts the values
        if layout == h5py.h5d.CONTIGUOUS:
            found = self._space.contiguous(name, dataset)
            if found is None:  # never written: every value is the fill value
                return _Stored(_NO_RANGES, sparse=Sparse.of(dataset, None))
            start, size = found
            plain = as_stored and size == tensor.nbytes
            return _Stored(np.array([found], dtype=np.int64), start=start if plain else None)
        if layout != h5py.h5d.CHUNKED:  # compact: the values lie in the object header
            return _Stored(_NO_RANGES)
        index = self._space.chunk_index(name, dataset)
        refuse_oversized_chunks(self.path, name, dataset, index)
        raw = raw_chunks(dataset, index) if as_stored else None
        if raw is None:  # HDF5 decodes the chunks
            refuse_inflating_streams(self.path, name, self._source, dataset, index)
        sparse = None if index.complete else Sparse.of(dataset, index)
        return _Stored(index.ranges(), raw=raw, sparse=sparse)

    def _chunked_gradients(self) -> list[TensorInfo]:
        """The gradient tensors not stored as plain bytes."""
        return [t for t in self.tensors if t.is_gradient and self._storage(t).start is None]

    def attribute(self, key: str) -> object | None:
        with reading(self.path, f"root attribute {key!r}"):
            return self._file.attrs.get(key)

    def read_array(self, tensor: TensorInfo) -> np.ndarray | None:
        dataset = self._datasets[tensor.location]
        if dataset.shape is None:  # null dataspace: no values at all
            return None
        with reading(self.path, f"dataset {tensor.name!r}"):
            return np.asarray(dataset[()])

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


class Hdf5File(_Hdf5Reader):
    """A TensorFile with PlainValues (contiguous datasets), ChunkedPieces (chunks gclip
    decodes itself), SelfMeasuring (sparse datasets), FinishesOutput (the output's structure
    checked), Metadata and WholeArrays.  A tensor's location is its dataset's path.
    Messages name *shown_as* if given (a remote object's copy, named as its stand-in)."""

    def __init__(self, path: Path, shown_as: Path | None = None) -> None:
        self.path = shown_as or path
        silence_hdf5()
        with reading(self.path, "HDF5 cannot open it"):
            self._file = h5py.File(path, "r")
        self._raw: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._describe(LocalBytes(self._raw.fileno()))

    def plain_offsets(self) -> dict[str, int]:
        found = {t.name: self._storage(t).start for t in self.tensors if t.is_gradient}
        return {name: start for name, start in found.items() if start is not None}

    def chunked_pieces(self) -> list[ValuePiece]:
        return [
            piece
            for tensor in self._chunked_gradients()
            if (raw := self._storage(tensor).raw) is not None
            for piece in band_pieces(self.path, tensor, raw)
        ]

    def write_transformed(
        self, out: Path, transform: Transform, chunk_size: int, leave: Set[str] = frozenset()
    ) -> None:
        self._refuse_unwritable()
        plain = self.plain_offsets()
        by_name = {t.name: t for t in self.tensors}
        placed = {by_name[name]: start for name, start in plain.items()}
        chunked = self._chunked_gradients()
        raw = {t: r for t in chunked if (r := self._storage(t).raw) is not None}
        # chunks gclip writes itself need not be copied first (nor linger, if HDF5 moves them)
        holes = np.concatenate([r.stored_ranges() for r in raw.values()]) if raw else ()
        fd = self._raw.fileno()
        rewrite_in_place(fd, out, placed, transform, chunk_size, leave, holes)
        # One HDF5 session for the datasets HDF5 filters, then one for those gclip encodes
        # (workers' pieces are placed in such a session too): HDF5 then allocates the same
        # places for the new chunks whoever encoded them.
        through_hdf5 = [t for t in chunked if t not in raw]
        if through_hdf5:
            with hdf5_output(out) as copy:
                for tensor in through_hdf5:
                    self._rewrite_through_hdf5(copy[tensor.location], tensor, transform, chunk_size)
        encoded_here = [t for t in raw if t.name not in leave]
        if encoded_here:
            with hdf5_output(out) as copy:
                for tensor in encoded_here:
                    target = copy[tensor.location]
                    rewrite_values(self.path, fd, tensor, raw[tensor], target, transform)

    def _rewrite_through_hdf5(
        self, target: h5py.Dataset, tensor: TensorInfo, transform: Transform, chunk_size: int
    ) -> None:
        sparse = self._storage(tensor).sparse
        if sparse is not None:
            rewrite_sparse(self.path, target, sparse, tensor, transform, chunk_size)
        else:
            rewrite_slabs(self.path, target, tensor, transform, chunk_size)

    def _refuse_unwritable(self) -> None:
        """Refuse, before anything is written, values gclip would not write back faithfully,
        and values whose rewriting would break the file."""
        gradients = [t for t in self.tensors if t.is_gradient]
        for tensor in gradients:
            dataset = self._datasets[tensor.location]
            if not is_ieee_float(dataset):
                raise InputError(self.path, _not_ieee_message(tensor.name, dataset))
            sparse = self._storage(tensor).sparse
            if sparse is not None and not sparse.keeps_fill:
                refuse_filling_beyond_limit(self.path, tensor.name, sparse)
        written = {t.name: self._storage(t).ranges for t in gradients}
        refuse_overlaps(self.path, {**self._other_ranges(), **written}.items())
        fd = self._raw.fileno()
        refuse_values_in_metadata(self.path, self._file, fd, written)
        by_hdf5 = [self._datasets[t.location] for t in self._chunked_gradients()]
        refuse_values_in_rewritten_blocks(self.path, fd, written, by_hdf5)

    def _other_ranges(self) -> dict[str, np.ndarray]:
        """Where the values of the datasets gclip does not rewrite lie (they must stay)."""
        gradients = {t.name for t in self.tensors if t.is_gradient}
        found = {}
        for name, dataset in self._datasets.items():
            if name in gradients or dataset.shape is None:
                continue
            with reading(self.path, f"dataset {name!r}"):
                layout = dataset.id.get_create_plist().get_layout()
            if layout == h5py.h5d.CONTIGUOUS:
                place = self._space.contiguous(name, dataset)
                found[name] = np.array([place] if place else _NO_RANGES, dtype=np.int64)
            elif layout == h5py.h5d.CHUNKED:
                found[name] = self._space.chunk_index(name, dataset).ranges()
        return found

    def finish_output(self, out: Path, crcs: Mapping[str, int]) -> None:
        """Where HDF5 wrote values (all but the contiguous datasets, rewritten in place), check
        that the output has the input's structure (nothing else depends on the values)."""
        if not self._chunked_gradients():
            return
        gradients = [self._datasets[t.location] for t in self.tensors if t.is_gradient]
        rewritten = {h5py.h5o.get_info(dataset.id).addr for dataset in gradients}
        refuse_broken_output(self.path, self._file, out, rewritten)

    def close(self) -> None:
        self._file.close()
        self._raw.close()


class RangedHdf5File(_Hdf5Reader):
    """An HDF5 object read by ranges from its URL (formats/ranged.py): h5py reads its
    structure through a file object whose short reads share a few cached blocks (HDF5's
    metadata is many small reads), contiguous values come in windows, the next fetched while
    one is worked on, as do the chunks gclip decodes itself; the local reader's checks
    hold.  A TensorFile with SelfMeasuring, FinishesOutput, Metadata and WholeArrays, not
    PlainValues nor ChunkedPieces (worker processes read local files only).

    A rewrite (HDF5 writes its output with random access, so the output is a local file
    anyway) starts from a local copy of the object beside the output, rewritten by the local
    reader: the object is read once more and needs its size again on disk while the output
    is written, and the output is the local run's, byte for byte."""

    def __init__(self, path: Path, ranged: RangedBytes) -> None:
        from .ranged import CachedRangedFile

        self.path, self._ranged = path, ranged
        self._local: Hdf5File | None = None  # the copy a rewrite works on
        self._view = CachedRangedFile(ranged)
        silence_hdf5()
        with reading(path, "HDF5 cannot open it"):
            self._file = h5py.File(self._view, "r")
        self._describe(ranged)

    def write_transformed(
        self, out: Path, transform: Transform, chunk_size: int, leave: Set[str] = frozenset()
    ) -> None:
        self._local = self._local_copy(out)
        self._local.write_transformed(out, transform, chunk_size, leave)

    def finish_output(self, out: Path, crcs: Mapping[str, int]) -> None:
        if self._local is not None:
            self._local.finish_output(out, crcs)

    def copy_to(self, out: Path) -> None:
        self._ranged.copy_to(out, MAX_WINDOW)

    def _chunk_source(self, raw: RawChunks) -> ByteSource:
        """The chunks fetched ahead, adjacent ones together (not a request each)."""
        from .ranged import ReadAhead

        pieces = zip(raw.offsets.tolist(), raw.sizes.tolist(), strict=True)
        return ReadAhead(self._ranged, list(pieces))

    def _local_copy(self, out: Path) -> Hdf5File:
        """A local reader of a copy of the object, made beside *out* (with room for it and
        the output to come, as for a spool: its disk's free space less 5%, at most
        $GCLIP_SPOOL_LIMIT), gone from the folder once opened; its messages name the object."""
        import tempfile

        from ..streams import spool_limit

        folder = Path(os.path.realpath(out)).parent
        needed, limit = 2 * self._ranged.size, spool_limit(folder)
        if needed > limit:
            raise OutputError(
                out,
                f"a rewrite of an HDF5 object starts from a local copy of it beside the output: "
                f"needs {needed:,} bytes in {folder} with the output, but only {limit:,} may be "
                "used there (the disk's free space less 5%, at most $GCLIP_SPOOL_LIMIT)",
            )
        fd, name = tempfile.mkstemp(prefix=".gclip-input-", suffix=".h5", dir=folder)
        os.close(fd)
        copy = Path(name)
        try:
            self._ranged.copy_to(copy, MAX_WINDOW)
            return Hdf5File(copy, shown_as=self.path)
        finally:  # the reader holds it open: the name may go
            copy.unlink(missing_ok=True)

    def close(self) -> None:
        try:
            if self._local is not None:
                self._local.close()
            self._file.close()
            self._view.close()
        finally:
            self._ranged.close()


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


# The IEEE 754 types gclip reads as they are stored (HDF5's predefined ones, either order).
_IEEE_FLOATS = (
    h5py.h5t.IEEE_F16LE,
    h5py.h5t.IEEE_F16BE,
    h5py.h5t.IEEE_F32LE,
    h5py.h5t.IEEE_F32BE,
    h5py.h5t.IEEE_F64LE,
    h5py.h5t.IEEE_F64BE,
)


def is_ieee_float(dataset: h5py.Dataset) -> bool:
    """Whether *dataset*'s values are stored as h5py's numpy dtype says: not a float at all,
    or an IEEE 754 float.  HDF5 can describe others (any sizes and positions of sign,
    exponent and mantissa, another bias, VAX order); h5py gives them a numpy float dtype
    wide enough to hold them, into which HDF5 converts their values when reading."""
    stored = dataset.id.get_type()
    if stored.get_class() != h5py.h5t.FLOAT:
        return True
    return any(stored == ieee for ieee in _IEEE_FLOATS)


def _not_ieee_message(name: str, dataset: h5py.Dataset) -> str:
    stored = dataset.id.get_type()
    sign, exponent_at, exponent_bits, mantissa_at, mantissa_bits = stored.get_fields()
    vax = " in VAX order" if stored.get_order() == h5py.h5t.ORDER_VAX else ""
    return (
        f"dataset {name!r} holds floats that are not IEEE 754{vax} ({stored.get_size()} bytes: "
        f"sign bit {sign}, {exponent_bits} exponent bits at {exponent_at} biased by "
        f"{stored.get_ebias()}, {mantissa_bits} mantissa bits at {mantissa_at}); gclip reads "
        "them as HDF5 converts them but does not write them back; nothing written"
    )
