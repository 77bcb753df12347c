"""Objects read by ranges from their URL, with no local copy (remote.py decides which).

The pipeline works on local paths (identities, output checks, forked children), so a remote
object is given to it as a **stand-in**: a local file that names the object (a line of JSON
after STAND_IN_MAGIC), made as long as the object (sparse: it takes no disk), so that size
and free-space checks see the object's size.  Opening a stand-in (registry.py) gives the
format's ranged reader: the values are fetched a window at a time (at most
base.MAX_WINDOW), the next window while the current one is worked on, so memory stays
bounded as for local files and the network stays busy.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ..errors import InputError
from .base import MAX_WINDOW, TensorInfo, Transform, window_pieces
from .deflate import crc32

if TYPE_CHECKING:
    from .byte_sources import ByteSource

STAND_IN_MAGIC = b"\x00gclip: a remote object, read by ranges\n"
STAND_IN_FOLDER = "gclip-inputs-"  # the private temporary folders stand-ins are honoured in
_STAND_IN_LIMIT = 1 << 16  # the stand-in's line of JSON: a URL and a format name
# A window is fetched in parts of this size at once: a store serves several ranged GETs faster
# than one (each connection has its own limit), and a 16 MiB window makes four.
_PART = 4 << 20
# Short reads (zip headers, .npy headers, a small tensor) are served from a block of this size
# fetched once: an archive of many small members is then not a GET per header.
_BLOCK = 64 << 10


@dataclass(frozen=True)
class StandIn:
    """What a stand-in names: the object's URL, its format and size, and its version as found
    (urls.version_of: a replaced object is refused, as a changed file is)."""

    url: str
    file_format: str
    size: int
    version: str = ""

    def write(self, path: Path) -> None:
        """Write this stand-in to *path*, as long as the object (a sparse file)."""
        line = json.dumps(self.__dict__).encode() + b"\n"
        with open(path, "wb") as file:
            file.write(STAND_IN_MAGIC + line)
            file.truncate(max(self.size, len(STAND_IN_MAGIC) + len(line)))

    @classmethod
    def read(cls, path: Path) -> StandIn | None:
        """The stand-in *path* is, or None when it is an ordinary file (or a stand-in gclip did
        not make here: a file handed over must not make gclip fetch what it names)."""
        if not made_here(path):
            return None
        try:
            with open(path, "rb") as file:
                head = file.read(len(STAND_IN_MAGIC))
                if head != STAND_IN_MAGIC:
                    return None
                return cls(**json.loads(file.readline(_STAND_IN_LIMIT)))
        except (OSError, ValueError, TypeError):
            return None


def made_here(path: Path) -> bool:
    """Whether *path* lies in a folder of stand-ins gclip made for this user: directly in the
    temporary folder, named STAND_IN_FOLDER..., owned by this user, private (mode 0700)."""
    temporary = os.path.realpath(tempfile.gettempdir())
    found = Path(os.path.realpath(path))
    folder = next((p for p in found.parents if str(p.parent) == temporary), None)
    if folder is None or not folder.name.startswith(STAND_IN_FOLDER):
        return False
    try:
        mode = os.stat(folder)
    except OSError:
        return False
    return mode.st_uid == os.getuid() and stat.S_IMODE(mode.st_mode) & 0o077 == 0


def is_stand_in(head: bytes) -> bool:
    """Whether a file beginning with *head* may be a stand-in (its first 16 bytes suffice)."""
    return bool(head) and STAND_IN_MAGIC.startswith(head[: len(STAND_IN_MAGIC)])


@runtime_checkable
class CopiesItself(Protocol):
    """A file whose bytes are not those of its local path (a stand-in's reader): a byte copy
    of it is made by the file itself."""

    def copy_to(self, out: Path) -> None:
        """Write the file's bytes, as they are, to *out*."""
        ...


class RangedBytes:
    """The bytes of a remote object, by ranges, fetched through fsspec (the backend retries
    transient errors); failures are InputErrors naming the URL.  A byte_sources.ByteSource."""

    prefetches = True

    def __init__(self, stand_in: StandIn, storage: Mapping[str, Any]) -> None:
        from ..urls import open_remote

        self.url, self.size, self._version = stand_in.url, stand_in.size, stand_in.version
        self._storage = storage
        self._remote = open_remote(stand_in.url, storage)
        self.check_unchanged()
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gclip-fetch")
        self._block: tuple[int, bytes] = (0, b"")  # the last short read's block: (start, bytes)

    def check_unchanged(self) -> None:
        """Refuse the object if it was replaced since its stand-in was made."""
        from ..urls import remote_errors, version_of

        with remote_errors(InputError, self.url, self._storage, "cannot read"):
            now = version_of(self._remote)
        if self._version and now != self._version:
            raise InputError(self.url, "was replaced while gclip was reading it")

    def read(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the object; refused if it has fewer.  A short
        read comes from the _BLOCK-aligned block around it, fetched once (one at a time is
        kept: a tuple replaced whole, so the prefetching thread may read too)."""
        if 0 < length <= _BLOCK and start + length <= self.size:
            first = start - start % _BLOCK
            if start + length <= first + _BLOCK:
                cached_at, block = self._block
                if cached_at != first or not block:
                    block = self._fetch(first, min(_BLOCK, self.size - first))
                    self._block = (first, block)
                return block[start - first : start - first + length]
        return self._fetch(start, length)

    def readinto(self, view: memoryview, start: int) -> int:
        """Fill *view* with the bytes from *start* on (fewer where the object ends)."""
        length = max(0, min(len(view), self.size - start))
        view[:length] = self.read(start, length)
        return length

    def _fetch(self, start: int, length: int) -> bytes:
        from ..urls import remote_errors

        if length == 0:
            return b""
        end = start + length
        starts = list(range(start, end, _PART))
        ends = [*starts[1:], end]
        fs, path = self._remote.fs, self._remote.path
        with remote_errors(InputError, self.url, self._storage, "cannot read"):
            if len(starts) == 1:
                data = fs.cat_file(path, start=start, end=end)
            else:  # the parts at once (fsspec's async backends run them concurrently)
                parts = fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise")
                data = b"".join(parts)
        if len(data) != length:
            raise InputError(
                self.url,
                f"the object changed while gclip read it: it ends before {start + length:,}",
            )
        return data

    def windows(self, pieces: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
        """Each (start, length) of *pieces* as a read-only uint8 array, in order; the next is
        fetched while the caller works on this one (two windows in memory at most)."""
        pending: Future[bytes] | None = None
        for start, length in pieces:
            fetched = self._ahead.submit(self.read, start, length)
            if pending is not None:
                yield np.frombuffer(pending.result(), dtype=np.uint8)
            pending = fetched
        if pending is not None:
            yield np.frombuffer(pending.result(), dtype=np.uint8)

    def cursor(self) -> Cursor:
        return Cursor(self)

    def copy_to(self, out: Path, chunk_size: int) -> None:
        """The object's bytes into the file *out*, *chunk_size* bytes at a time."""
        pieces = ((s, min(chunk_size, self.size - s)) for s in range(0, self.size, chunk_size))
        with open(out, "wb") as file:
            for data in self.windows(pieces):
                file.write(data)

    def close(self) -> None:
        """Stop fetching; refuse, at the end, an object replaced while it was read (what was
        made from it is then discarded)."""
        self.stop()
        self.check_unchanged()

    def stop(self) -> None:
        """Stop fetching (no check: for a reader that failed already)."""
        self._ahead.shutdown(wait=True, cancel_futures=True)


class Cursor:
    """Sequential reads of a RangedBytes, as a file's read(n) (for headers)."""

    def __init__(self, ranged: RangedBytes) -> None:
        self._ranged, self._position = ranged, 0

    def read(self, length: int) -> bytes:
        length = max(0, min(length, self._ranged.size - self._position))
        data = self._ranged.read(self._position, length)
        self._position += len(data)
        return data


class RangedFile(io.RawIOBase):
    """A RangedBytes as a seekable read-only file (for zipfile, which reads an archive's end
    records and central directory through one, and members only when they are bzip2 or LZMA)."""

    def __init__(self, ranged: RangedBytes) -> None:
        super().__init__()
        self._ranged, self._position = ranged, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._ranged.size}
        position = base[whence] + offset
        if position < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._position = position
        return position

    def tell(self) -> int:
        return self._position

    def readall(self) -> bytes:  # in one read, not in io's default pieces of 8 KiB
        return self.read(max(0, self._ranged.size - self._position))

    def readinto(self, buffer: memoryview | bytearray) -> int:
        got = self._ranged.readinto(memoryview(buffer).cast("B"), self._position)
        self._position += got
        return got


class CachedRangedFile(RangedFile):
    """A RangedFile whose short reads come from the last *blocks* _BLOCK-aligned blocks
    fetched (least recently used dropped first): HDF5 reads an object's metadata in many
    small reads that come back to the same places (superblock, heaps, B-tree nodes), which
    one cached block would fetch again and again."""

    def __init__(self, ranged: RangedBytes, blocks: int = 16) -> None:
        super().__init__(ranged)
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._limit = blocks

    def readinto(self, buffer: memoryview | bytearray) -> int:
        view = memoryview(buffer).cast("B")
        start = self._position
        length = max(0, min(len(view), self._ranged.size - start))
        if length > _BLOCK:  # values, or a large heap: fetched whole
            return super().readinto(buffer)
        got = 0
        while got < length:
            at = start + got
            first = at - at % _BLOCK
            block = self._block(first)
            taken = min(length - got, first + len(block) - at)
            view[got : got + taken] = block[at - first : at - first + taken]
            got += taken
        self._position += got
        return got

    def _block(self, first: int) -> bytes:
        block = self._blocks.pop(first, None)
        if block is None:
            block = self._ranged.read(first, min(_BLOCK, self._ranged.size - first))
        self._blocks[first] = block
        if len(self._blocks) > self._limit:
            self._blocks.popitem(last=False)
        return block


class ReadAhead:
    """A ByteSource over *ranged* for reads expected in the order of *pieces* (start, length),
    such as a dataset's chunks: adjacent pieces are fetched together in windows of at most
    MAX_WINDOW, the next while one is worked on.  A read out of that order is served as
    asked, as are all after it."""

    prefetches = True

    def __init__(self, ranged: RangedBytes, pieces: Sequence[tuple[int, int]]) -> None:
        self.size, self._ranged = ranged.size, ranged
        self._expected: Iterator[tuple[int, int]] | None = iter(pieces)
        self._ahead = _pieces_fetched_together(ranged, pieces)

    def read(self, start: int, length: int) -> bytes:
        if self._expected is not None:
            if next(self._expected, None) == (start, length):
                return next(self._ahead)
            self._expected = None
            self._ahead.close()
        return self._ranged.read(start, length)

    def readinto(self, view: memoryview, start: int) -> int:
        return self._ranged.readinto(view, start)

    def windows(self, pieces: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
        return self._ranged.windows(pieces)


def _pieces_fetched_together(
    ranged: RangedBytes, pieces: Sequence[tuple[int, int]]
) -> Iterator[bytes]:
    """The bytes of each of *pieces* in order, adjacent ones fetched as one window."""
    groups: list[list[tuple[int, int]]] = []
    for start, length in pieces:
        if groups:
            last_start, last_length = groups[-1][-1]
            total = last_start + last_length - groups[-1][0][0]
            if start == last_start + last_length and total + length <= MAX_WINDOW:
                groups[-1].append((start, length))
                continue
        groups.append([(start, length)])
    spans = [(group[0][0], sum(length for _, length in group)) for group in groups]
    for (first, _), window, group in zip(spans, ranged.windows(spans), groups, strict=True):
        for start, length in group:
            yield window[start - first : start - first + length].tobytes()


def copy_rewritten(
    ranged: ByteSource,
    out: Path,
    placed: Mapping[TensorInfo, int],
    transform: Transform,
    chunk_size: int,
    checked: Sequence[tuple[int, int]] = (),
) -> list[int]:
    """Write *out* as a byte copy of the object in which the values of the *placed* tensors
    (each at its offset) are passed through *transform*: the object read once, in order, in
    windows of at most MAX_WINDOW (short pieces fetched together), the next fetched while one
    is worked on.  Returns the CRC-32s of the input's byte ranges (start, length) *checked*,
    computed on the way (zip members whose CRC-32 is to be checked)."""
    spans = SpanCrcs(checked)
    with open(out, "wb") as dst:
        for start, raw, written in rewritten_pieces(ranged, placed, transform, chunk_size):
            spans.add(start, raw)
            dst.write(written)
    return spans.crcs()


def rewritten_pieces(
    source: ByteSource,
    placed: Mapping[TensorInfo, int],
    transform: Transform,
    chunk_size: int,
    span: tuple[int, int] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(offset, bytes read, bytes to write) of a byte copy of *source* (or of its byte range
    *span*: start, length) in order, the values of the *placed* tensors (each at its offset)
    passed through *transform*, the rest as read; each valid until the next is asked for."""
    begin, end = (span[0], span[0] + span[1]) if span is not None else (0, source.size)
    # tensors without values may lie within another's (a torch view of no items): none to write
    values = sorted(
        ((s, t) for t, s in placed.items() if t.nbytes and begin <= s < end), key=lambda p: p[0]
    )
    pieces = list(_copy_pieces(begin, end, values, chunk_size))
    buffer = np.empty(max(min(chunk_size, MAX_WINDOW), 64), dtype=np.uint8)  # at least an item
    for window_start, window, group in _fetched_together(source, pieces):
        for start, length, tensor in group:
            raw = window[start - window_start : start - window_start + length]
            if tensor is None:
                yield start, raw, raw
            else:
                target = buffer[:length]
                transform(tensor, raw.view(tensor.dtype), target.view(tensor.dtype))
                yield start, raw, target


class SpanCrcs:
    """CRC-32s of byte ranges (start, length) of a file whose bytes arrive in order."""

    def __init__(self, spans: Sequence[tuple[int, int]]) -> None:
        order = sorted(range(len(spans)), key=lambda i: spans[i])
        self._spans = [spans[i] for i in order]
        self._sorted_at = {given: at for at, given in enumerate(order)}
        self._crcs = [0] * len(self._spans)
        self._first = 0  # the first span the next bytes may fall in

    def add(self, start: int, data: np.ndarray) -> None:
        """The bytes [start, start + len(data)) arrived."""
        end = start + len(data)
        while self._first < len(self._spans) and sum(self._spans[self._first]) <= start:
            self._first += 1
        for index in range(self._first, len(self._spans)):
            span_start, span_length = self._spans[index]
            if span_start >= end:
                break
            low = max(span_start, start) - start
            high = min(span_start + span_length, end) - start
            self._crcs[index] = crc32(data[low:high], self._crcs[index])

    def crc(self, index: int) -> int:
        """The CRC-32 of the bytes of span *index* (in the order given) arrived so far."""
        return self._crcs[self._sorted_at[index]]

    def crcs(self) -> list[int]:
        """The CRC-32 of each span, in the order given."""
        return [self.crc(index) for index in range(len(self._spans))]


def _copy_pieces(
    begin: int, end: int, values: Sequence[tuple[int, TensorInfo]], chunk_size: int
) -> Iterator[tuple[int, int, TensorInfo | None]]:
    """(start, length, tensor or None) of the pieces of bytes [begin, end) in order: the
    values of the (start, tensor) *values* in whole items, the bytes between as they are."""
    position = begin
    for start, tensor in [*values, (end, None)]:
        for offset, length in window_pieces(position, start - position, 1, MAX_WINDOW):
            yield offset, length, None
        if tensor is None:
            break
        itemsize = tensor.dtype.itemsize
        for offset, length in window_pieces(start, tensor.nbytes, itemsize, chunk_size):
            yield offset, length, tensor
        position = start + tensor.nbytes


def _fetched_together(
    ranged: ByteSource, pieces: Sequence[tuple[int, int, TensorInfo | None]]
) -> Iterator[tuple[int, np.ndarray, list[tuple[int, int, TensorInfo | None]]]]:
    """The contiguous *pieces* in groups of at most MAX_WINDOW bytes, each group fetched as
    one window: (its start, its bytes, its pieces)."""
    groups: list[list[tuple[int, int, TensorInfo | None]]] = []
    total = MAX_WINDOW
    for piece in pieces:
        if total + piece[1] > MAX_WINDOW:
            groups.append([])
            total = 0
        groups[-1].append(piece)
        total += piece[1]
    spans = [(group[0][0], sum(p[1] for p in group)) for group in groups]
    for (start, _), window, group in zip(spans, ranged.windows(spans), groups, strict=True):
        yield start, window, group
