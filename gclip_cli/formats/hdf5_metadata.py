"""Whether the places where gclip would write values lie inside an HDF5 file's metadata.

gclip's output starts as a byte copy of the input, and values are rewritten where the file says
they lie.  A crafted address can put a dataset's values over the superblock, an object header
or a B-tree: rewriting them would leave an unreadable file.  HDF5 does not tell where its
metadata lies, but it can tell whether some bytes matter to it: the file is opened a second
time through a view in which every byte gclip would write is inverted, and everything HDF5
reports about the file's structure (links, object headers, types, shapes, layouts, filters,
fill values, chunk indexes, attributes, and the values of compact and variable-length
datasets, which lie in metadata) must come out the same.  In a sound file those bytes are
values only, so nothing changes and nothing is refused.
"""

from __future__ import annotations

import functools
import io
import math
import os
import signal
import time
from collections.abc import Iterator, Set
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError
from ..isolation import run_forked
from .hdf5_storage import ChunkIndex, read_chunk_index


class _InvertedView(io.RawIOBase):
    """The file *fd*, read-only, with the bytes of the (offset, size) *ranges* inverted."""

    def __init__(self, fd: int, ranges: np.ndarray) -> None:
        super().__init__()
        self.reads: list[tuple[int, int]] = []  # (offset, length) of every read, in order
        self._fd = fd
        self._size = os.fstat(fd).st_size
        ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
        self._starts, self._ends = ranges[:, 0], ranges[:, 0] + ranges[:, 1]
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: memoryview) -> int:
        data = os.pread(self._fd, len(buffer), self._position)
        self.reads.append((self._position, len(data)))
        view = np.frombuffer(bytearray(data), dtype=np.uint8)
        end = self._position + len(data)
        # the ranges are disjoint, so sorted by their ends too
        first = int(np.searchsorted(self._ends, self._position, side="right"))
        last = int(np.searchsorted(self._starts, end, side="left"))
        for start, stop in zip(self._starts[first:last], self._ends[first:last], strict=True):
            low, high = max(int(start), self._position), min(int(stop), end)
            view[low - self._position : high - self._position] ^= 0xFF
        memoryview(buffer).cast("B")[: len(data)] = view.tobytes()
        self._position = end
        return len(data)


def refuse_values_in_metadata(
    path: Path, root: h5py.File, fd: int, ranges: dict[str, np.ndarray]
) -> None:
    """Refuse the file if writing values at *ranges* ((offset, size) rows by dataset name) of
    the open file *fd* would change what HDF5 reads as its structure (*root*: the file as
    HDF5 opened it)."""
    written = [rows for rows in ranges.values() if len(rows)]
    if not written:
        return
    started = time.monotonic()
    expected = describe_structure(root)
    # HDF5 reading crafted metadata can loop for ever: the view is read in a child process
    # killed after this long (a sound file's view is read as fast as the file itself).
    seconds = 10 + math.ceil(20 * (time.monotonic() - started))
    check = functools.partial(_same_with_inverted, path, fd, expected, seconds)
    if check(np.concatenate(written)):
        return
    culprit = next((name for name, rows in ranges.items() if len(rows) and not check(rows)), None)
    what = f"dataset {culprit!r}" if culprit else "some datasets"
    raise InputError(
        path,
        f"the values of {what} would lie inside the file's metadata (their address points "
        "into it); rewriting them would break the file; damaged file",
    )


def _same_with_inverted(
    path: Path, fd: int, expected: list[object], seconds: int, ranges: np.ndarray
) -> bool:
    """Whether HDF5 reads the structure *expected* from *fd* with *ranges* inverted: in a
    child process, so that a crash or an endless loop of HDF5 means "no"."""
    task = (_compare_view, (fd, ranges, expected, seconds, os.getpid()))
    try:
        return run_forked(path, [task])[0]
    except InputError:  # the child died
        return False


def _compare_view(
    channel: object, fd: int, ranges: np.ndarray, expected: list[object], seconds: int, parent: int
) -> bool:
    del channel  # nothing to tell while it works
    if os.getpid() != parent:  # in a child (where fork is not available, no time limit)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # ends the process, even inside HDF5
        signal.alarm(seconds)
    try:
        with _opened_view(fd, ranges) as root:
            return describe_structure(root) == expected
    except Exception:  # any failure to read the view means the bytes matter
        return False


@contextmanager
def _opened_view(fd: int, ranges: np.ndarray) -> Iterator[h5py.File]:
    with _InvertedView(fd, ranges) as view, h5py.File(view, "r") as root:
        yield root


def describe_structure(root: h5py.File, rewritten: Set[int] | None = None) -> list[object]:
    """What HDF5 reports about the file's structure, as comparable values.  With *rewritten*
    (the object header addresses of datasets whose values were rewritten), what a rewrite
    keeps: not which chunks are allocated, where they lie or how large they are (only that
    their index is sound), nor the file's size."""
    links: list[tuple[str, object]] = []
    root.visititems_links(lambda name, link: links.append((name, link)))  # type: ignore[func-returns-value]
    size = root.id.get_filesize() if rewritten is None else None
    found: list[object] = [("file", root.userblock_size, size)]
    moved = frozenset(rewritten or ())
    found.extend(_describe_object(root, moved))
    for name, link in links:
        found.append(("link", name, type(link).__name__, *_link_target(link)))
        if isinstance(link, h5py.HardLink):
            found.extend(_guarded(name, lambda n=name: _describe_object(root[n], moved)))
    return found


def refuse_broken_output(path: Path, root: h5py.File, out: Path, rewritten: Set[int]) -> None:
    """Refuse the output *out* of the input *path* (*root*) if HDF5 reads another structure in
    it than in the input, beyond what rewriting the datasets *rewritten* changes.  HDF5
    updates chunk indexes as it writes chunks, following pointers that reading never uses: a
    damaged one there breaks the output of an input that reads well."""
    expected = describe_structure(root, rewritten)
    try:
        with h5py.File(out, "r") as copy:
            found = describe_structure(copy, rewritten)
    except Exception as exc:  # HDF5 cannot open it at all
        found = [("unreadable", type(exc).__name__, str(exc))]
    if found != expected:
        raise InputError(
            path,
            "rewriting its values changed the file's structure (HDF5 followed damaged "
            "metadata while writing); damaged file; nothing written",
        )


def _link_target(link: object) -> tuple[object, ...]:
    return tuple(getattr(link, key, None) for key in ("path", "filename"))


def _guarded(name: str, describe: object) -> list[object]:
    """describe(), or a record of how it failed (each object on its own: one that cannot be
    read must not hide the others)."""
    try:
        return describe()  # type: ignore[operator]
    except Exception as exc:
        return [("failed", name, type(exc).__name__, str(exc))]


def _describe_object(obj: h5py.HLObject, moved: frozenset[str]) -> list[object]:
    info = h5py.h5o.get_info(obj.id)
    header = info.hdr
    found: list[object] = [
        (
            "object",
            obj.name,
            info.type,
            info.rc,
            info.num_attrs,
            header.version,
            header.nmesgs,
            header.nchunks,
            header.flags,
            header.space.total,
            header.space.meta,
            header.space.mesg,
            header.space.free,
            header.mesg.present,
            header.mesg.shared,
            info.meta_size.obj.index_size,
            info.meta_size.obj.heap_size,
            info.meta_size.attr.index_size,
            info.meta_size.attr.heap_size,
        )
    ]
    for key in obj.attrs:
        found.extend(_guarded(key, lambda k=key: [_describe_attribute(obj.attrs, k)]))
    if isinstance(obj, h5py.Dataset):
        found.extend(_describe_dataset(obj, info.addr in moved))
    elif isinstance(obj, h5py.Datatype):
        found.append(("type", obj.id.encode()))
    return found


def _describe_attribute(attrs: h5py.AttributeManager, key: str) -> object:
    attribute = attrs.get_id(key)
    kind = attribute.get_type()
    found = ("attribute", key, kind.encode(), attribute.shape, attribute.get_storage_size())
    if not _small(attribute.shape, kind.get_size()):
        return found
    return (*found, _comparable(attrs[key]))


# Values read to compare them are read only when their shape says they are at most this large:
# the inverted view can make a shape claim anything, and reading it would take as long.
_VALUES_READ = 1 << 20


def _small(shape: tuple[int, ...] | None, itemsize: int) -> bool:
    count = 1
    for n in shape or ():
        count *= n
    return count * itemsize <= _VALUES_READ


def _describe_dataset(dataset: h5py.Dataset, moved: bool) -> list[object]:
    """*moved*: its chunks may have moved (and changed size) in a rewrite."""
    dsid = dataset.id
    plist = dsid.get_create_plist()
    space = dsid.get_space()
    filters = [plist.get_filter(i)[:3] for i in range(plist.get_nfilters())]
    layout = plist.get_layout()
    fill = np.zeros(1, dtype=dataset.dtype)
    plist.get_fill_value(fill)
    found: list[object] = [
        (
            "dataset",
            dsid.get_type().encode(),
            space.get_simple_extent_type(),
            space.get_simple_extent_dims(),
            space.get_simple_extent_dims(maxdims=True),
            layout,
            plist.get_chunk() if layout == h5py.h5d.CHUNKED else None,
            filters,
            plist.get_alloc_time(),
            plist.get_fill_time(),
            plist.fill_value_defined(),
            _comparable(fill),
            None if moved else dsid.get_storage_size(),
        )
    ]
    if layout == h5py.h5d.CONTIGUOUS:
        found.append(("offset", _offset(dsid)))
    elif layout == h5py.h5d.CHUNKED:
        index = read_chunk_index(dataset, base=0)
        if moved:
            found.append(("chunks", _sound(index, dataset.file)))
        else:
            found.append(("chunks", index.cells.tobytes(), index.ranges().tobytes()))
    in_metadata = layout == h5py.h5d.COMPACT or dataset.dtype.kind == "O"
    if in_metadata and not moved and _small(dataset.shape, dataset.dtype.itemsize):
        # their values lie in the object header, or in global heaps (variable-length data)
        found.append(("values", _comparable(dataset[()])))
    return found


def _sound(index: ChunkIndex, root: h5py.File) -> bool:
    """Whether a chunk index lists chunks of the dataset, none twice, inside the file."""
    distinct = np.unique(index.cells).size == index.cells.size
    inside = not index.cells.size or (
        index.offsets.min() >= root.userblock_size
        and (index.offsets + index.sizes).max() <= root.id.get_filesize()
    )
    return bool(distinct and inside and np.all(index.cells >= 0))


def _offset(dsid: h5py.h5d.DatasetID) -> int | None:
    try:
        return dsid.get_offset()
    except RuntimeError:  # address 0
        return 0


def _comparable(value: object) -> object:
    """*value* as something == compares by content (arrays by their bytes, object arrays by
    their elements)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            return (value.shape, tuple(_comparable(v) for v in value.ravel()))
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return (value.dtype.str, value.tobytes())
    if isinstance(value, bytes | str | int | float | type(None)):
        return value
    return repr(value)


# The blocks of a chunk index (v1 and v2 B-tree nodes, fixed and extensible arrays), by the
# signature each begins with; HDF5 reads each whole, and writes each whole when it changes it.
_INDEX_SIGNATURES = (
    b"TREE\x01",  # a v1 B-tree node of chunks (type 1)
    b"BTHD",
    b"BTIN",
    b"BTLF",
    b"FAHD",
    b"FADB",
    b"EAHD",
    b"EAIB",
    b"EASB",
    b"EADB",
)


def refuse_values_in_rewritten_blocks(
    path: Path, fd: int, ranges: dict[str, np.ndarray], written_by_hdf5: list[h5py.Dataset]
) -> None:
    """Refuse values that lie in a block HDF5 will write back: the object header and the
    chunk index of each dataset HDF5 writes values of.  HDF5 writes such a block whole when it
    changes it (a chunk's new place, a modification time), unused bytes included: values lying
    there (which reading does not depend on, so refuse_values_in_metadata lets them pass) would
    be overwritten, or would overwrite the block."""
    rows = [r for r in ranges.values() if len(r)]
    if not rows or not written_by_hdf5:
        return
    blocks = [_header_extent(fd, h5py.h5o.get_info(d.id).addr) for d in written_by_hdf5]
    blocks += _index_blocks(fd, [d.name for d in written_by_hdf5 if d.chunks is not None])
    starts = np.array([b[0] for b in blocks], dtype=np.int64)
    ends = np.array([b[0] + b[1] for b in blocks], dtype=np.int64)
    for name, found in ranges.items():
        for start, size in found.tolist():
            if size and np.any((starts < start + size) & (ends > start)):
                raise InputError(
                    path,
                    f"the values of dataset {name!r} would lie inside an object header or "
                    "chunk index that HDF5 rewrites; damaged file",
                )


def _header_extent(fd: int, address: int) -> tuple[int, int]:
    """(start, length) of the first chunk of the object header at *address*, from its prefix
    (version 1: 16 bytes and the size; version 2: "OHDR", flags, optional times and phase
    change values, the size in 1 to 8 bytes, and a checksum after the messages)."""
    head = os.pread(fd, 32, address)
    if head[:4] == b"OHDR" and len(head) >= 6:
        flags = head[5]
        at = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 3)
        size = int.from_bytes(head[at : at + width], "little")
        return address, at + width + size + 4
    if len(head) >= 12:
        return address, 16 + int.from_bytes(head[8:12], "little")
    return address, len(head)


def _index_blocks(fd: int, names: list[str]) -> list[tuple[int, int]]:
    """(start, length) of the blocks HDF5 reads to list the chunks of datasets *names*."""
    if not names:
        return []
    view = _InvertedView(fd, np.zeros((0, 2), dtype=np.int64))
    with view, h5py.File(view, "r") as root:
        for name in names:
            read_chunk_index(root[name], base=0)
    return [
        (offset, length)
        for offset, length in set(view.reads)
        if os.pread(fd, 5, offset).startswith(_INDEX_SIGNATURES)
    ]
