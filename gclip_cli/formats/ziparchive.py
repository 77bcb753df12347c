"""Zip archives, for every format that is one: ``.npz`` now, PyTorch checkpoints (a zip of
``NAME/data.pkl`` and stored ``NAME/data/<key>`` storages) next.

zipfile lists the members (its reading of the central directory is trusted) and reads those
compressed with bzip2 or LZMA.  The rest is done here, because zipfile offers no way to choose
its deflate or CRC-32 (ISA-L's are about 20 and 8 times faster, see deflate.py) but patching
its module, and because values that keep their place are best read and written where they lie:

- ZipArchive: where each member's data begin (after its local header, whose name and extra
  field lengths may differ from the directory's); stored and deflated members read with
  ``pread`` (so readers in several processes share no file offset), inflated by ISA-L where
  installed, their CRC-32 checked as zipfile checks it; stored members mapped; whether the
  members lie apart, so that a byte copy can take new values in place and only the CRC-32s
  need patching, in the local headers and the central directory.  It reads through a
  byte_sources.ByteSource: a local file, or a remote object by ranges (ranged.RangedBytes,
  which zipfile lists through a ranged.RangedFile: end records and central directory only;
  stored members come in windows, deflated ones are inflated from windows read ahead).
- ZipWriter: an archive written as zipfile writes one (the same bytes for the same members
  written alike, zip64 where zipfile would use it), each member's bytes compressed by the
  compressor chosen for its method here: deflate by ISA-L at its fastest level where
  installed, else by zlib as zipfile would.
"""

from __future__ import annotations

import bz2
import io
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from ..errors import InputError
from ..strict_json import shown
from .base import (
    MAX_WINDOW,
    READ_ERRORS,
    one_line,
    open_regular,
    reading,
    window_pieces,
    write_all,
    write_all_at,
)
from .byte_sources import ByteSource, LocalBytes
from .deflate import crc32, raw_deflater, raw_inflater
from .signatures import MAX_ZIP_DIRECTORY, read_head, unsupported_kind, zip_directory_size

if TYPE_CHECKING:
    from .base import TensorInfo, Transform
    from .ranged import RangedBytes

_ENCRYPTED = 0x1  # general purpose flag bit 0
_LZMA_END_MARKER = 0x2  # bit 1 for LZMA: the data end with an end-of-stream marker
_DATA_DESCRIPTOR = 0x8  # bit 3: CRC and sizes also follow the data
_UTF8_NAME = 0x800  # bit 11: the name is UTF-8 (else code page 437, or ASCII)
_LOCAL_HEADER_SIZE = 30  # fixed part of a zip local file header
_CENTRAL_HEADER_SIZE = 46  # fixed part of a central directory file header
_LOCAL_CRC, _CENTRAL_CRC = 14, 16  # where the CRC-32 lies in each header
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"  # optional, before a data descriptor's CRC-32
_ZIP64_EXTRA = 0x0001  # the extra field holding 64-bit sizes and offsets
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_READ_HERE = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # the others through zipfile
# Compressed bytes read at a time: as many as the bytes asked for, within these bounds (a
# .npy header is a short read, and inflating more than it needs would be waste).
_MIN_INPUT, _MAX_INPUT = 16 << 10, 1 << 20
# From a remote object, compressed bytes are read ahead in windows growing to this size (the
# first small, so that reading a member's header fetches little more than it needs).
_MAX_FETCHED = 4 << 20
# Versions needed to extract, as zipfile records them
_METHOD_VERSIONS = {
    zipfile.ZIP_BZIP2: zipfile.BZIP2_VERSION,
    zipfile.ZIP_LZMA: zipfile.LZMA_VERSION,
}


class ZipArchive:
    """A zip archive open for reading (see the module's doc).  *kind* names the format in
    messages (``.npz``).  *ranged*: the remote object *path* (a stand-in) stands for, read by
    ranges (None: *path* is read)."""

    def __init__(self, path: Path, kind: str, ranged: RangedBytes | None = None) -> None:
        self.path = path
        # first, so that a pipe or a device is refused before zipfile reads to its end
        self._raw: BinaryIO = open_regular(path) if ranged is None else _ranged_file(ranged)
        try:
            _check_directory_size(path, self._raw)
            self._zip = _open_zip(path, kind, self._raw if ranged is not None else None)
        except BaseException:
            self._raw.close()
            raise
        self.source: ByteSource = LocalBytes(self._raw.fileno()) if ranged is None else ranged
        self.size = self.source.size
        self._starts: dict[str, int] = {}  # where each member's data begin
        self._checked: set[str] = set()  # members whose CRC-32 has been checked

    @property
    def fd(self) -> int:
        """The local file's descriptor (for the fast paths of local files only)."""
        return self._raw.fileno()

    @property
    def members(self) -> list[zipfile.ZipInfo]:
        return self._zip.infolist()

    @property
    def names(self) -> list[str]:
        return self._zip.namelist()

    @property
    def comment(self) -> bytes:
        return self._zip.comment

    def check_members(self) -> None:
        """Refuse what could not be read or copied faithfully, before anything is read or
        written: names that repeat, encrypted members, compression methods zipfile lacks."""
        repeated = [name for name, n in Counter(self.names).items() if n > 1]
        if repeated:
            raise InputError(self.path, f"zip member {shown(repeated[0])} appears more than once")
        for info in self.members:
            if info.flag_bits & _ENCRYPTED:
                raise InputError(self.path, f"zip member {shown(info.filename)} is encrypted")
            if info.compress_type not in _COMPRESSIONS:
                raise InputError(
                    self.path,
                    f"zip member {shown(info.filename)} uses compression method "
                    f"{info.compress_type}, which gclip cannot read",
                )
            # opening checks the member's local header against the directory (signature,
            # name), even for members that would otherwise only be copied
            with reading(self.path, f"zip member {shown(info.filename)}"), self._zip.open(info):
                pass

    def data_start(self, info: zipfile.ZipInfo) -> int:
        """Where the (stored or compressed) data of member *info* begin in the file."""
        if info.filename not in self._starts:
            self._starts[info.filename] = self._read_data_start(info)
        return self._starts[info.filename]

    def _read_data_start(self, info: zipfile.ZipInfo) -> int:
        with reading(self.path, f"member {shown(info.filename)}"):
            header = self.source.read(info.header_offset, _LOCAL_HEADER_SIZE)
            name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + _LOCAL_HEADER_SIZE + name_length + extra_length
        stored = info.compress_type == zipfile.ZIP_STORED  # then read as file_size bytes
        if start + (info.file_size if stored else info.compress_size) > self.size:
            raise InputError(
                self.path,
                f"member {shown(info.filename)} runs past the end of the file (truncated?)",
            )
        return start

    def open_member(self, info: zipfile.ZipInfo) -> BinaryIO:
        """The bytes of member *info*, as a stream (a MemberReader, or zipfile's for bzip2
        and LZMA); its CRC-32 is checked once all are read."""
        if info.compress_type in _READ_HERE:
            return MemberReader(self.source, info, self.data_start(info))
        return self._zip.open(info)

    def stored_windows(
        self, info: zipfile.ZipInfo, skip: int, itemsize: int, chunk_size: int
    ) -> Iterator[np.ndarray]:
        """The data of the stored member *info* from byte *skip* on, straight from the file's
        pages (no copy; from a remote object, the next window fetched while one is worked on)
        as uint8 windows of whole items of *itemsize* bytes, at most *chunk_size* long; the
        member's CRC-32 (its first *skip* bytes included) is checked on the way, once per
        member."""
        start = self.data_start(info)
        check = info.filename not in self._checked
        with reading(self.path, f"member {shown(info.filename)}"):
            crc = crc32(self.source.read(start, skip)) if check else 0
        pieces = window_pieces(start + skip, info.file_size - skip, itemsize, chunk_size)
        for raw in self.source.windows(pieces):
            if check:
                crc = crc32(raw, crc)
            yield raw
        if check:
            self.verify_crc(info, crc)

    def checked(self, info: zipfile.ZipInfo) -> bool:
        """Whether the CRC-32 of member *info* has been checked."""
        return info.filename in self._checked

    def verify_crc(self, info: zipfile.ZipInfo, crc: int) -> None:
        """Check *crc*, computed over all the bytes of member *info*, against its own."""
        if crc != info.CRC:
            raise InputError(self.path, f"member {shown(info.filename)}: bad CRC-32 (damaged data)")
        self._checked.add(info.filename)

    def verify_stored(self, infos: list[zipfile.ZipInfo]) -> None:
        """Check the CRC-32s of the stored members *infos* that no reader has checked yet."""
        for info in infos:
            if info.filename not in self._checked:
                crc = source_crc(self.source, self.data_start(info), info.file_size)
                self.verify_crc(info, crc)

    def members_apart(self) -> bool:
        """Whether all members lie apart, one after another, before the central directory (so
        that a byte copy of the archive can take new member data in place)."""
        position = 0
        for info in sorted(self.members, key=lambda i: i.header_offset):
            if info.header_offset < position:
                return False
            position = self.data_start(info) + info.compress_size
        return position <= self._zip.start_dir

    def patch_crcs(self, out: Path, crcs: Mapping[str, int]) -> None:
        """Write the CRC-32s *crcs* (by member name) into the local headers and the central
        directory of *out*, a byte copy of this archive with new member data in place."""
        central = self._central_headers()
        with open(out, "r+b") as copy:
            for info in self.members:
                if info.filename in crcs:
                    field = memoryview(struct.pack("<I", crcs[info.filename]))
                    for offset in (
                        *self._local_crc_fields(info),
                        central[info.filename] + _CENTRAL_CRC,
                    ):
                        write_all_at(copy.fileno(), field, offset)

    def copy_rewritten(
        self,
        out: Path,
        placed: Mapping[TensorInfo, int],
        transform: Transform,
        chunk_size: int,
        stored: Sequence[zipfile.ZipInfo],
    ) -> None:
        """Write *out* as a byte copy of the archive, the values of the *placed* tensors (each
        at its offset) passed through *transform*: the source read once, in order (a remote
        object's windows fetched ahead); the CRC-32s of the stored members *stored* that no
        reader has checked yet are checked on the way."""
        from .ranged import copy_rewritten

        unchecked = [info for info in stored if not self.checked(info)]
        spans = [(self.data_start(info), info.file_size) for info in unchecked]
        crcs = copy_rewritten(self.source, out, placed, transform, chunk_size, spans)
        for info, crc in zip(unchecked, crcs, strict=True):
            self.verify_crc(info, crc)

    def write_in_order(
        self,
        out: Path,
        placed: Mapping[TensorInfo, int],
        transform: Transform,
        rehearsal: Transform,
        chunk_size: int,
        changed: Sequence[zipfile.ZipInfo],
    ) -> None:
        """Write into *out* (a stream), front to back, a byte copy of this archive in which
        the values of the *placed* tensors (each at its offset) are passed through *transform*
        and the CRC-32s of the stored members *changed* (those holding them) are new, wherever
        they lie: in the central directory and a data descriptor (both after the member's
        data: found on the way), and in a local header (before them: found beforehand by a
        rehearsal, the member's new bytes computed once more by *rehearsal*, which writes
        nothing).  The input members' CRC-32s are checked on the way, before the caller can
        commit the output.
        """
        from .ranged import SpanCrcs, rewritten_pieces

        spans = [(self.data_start(info), info.compress_size) for info in changed]
        fields = self._crc_fields(changed, spans)
        known = {  # the CRC-32s needed before their member's data: rehearsed
            index: _crc_of(rewritten_pieces(self.source, placed, rehearsal, chunk_size, span))
            for index, span in enumerate(spans)
            if any(offset < span[0] for offset, member in fields if member == index)
        }
        read, written = SpanCrcs(spans), SpanCrcs(spans)
        patches = _Patches(fields)

        def crc_of(index: int) -> int:
            return known[index] if index in known else written.crc(index)

        with open(out, "wb", buffering=0) as dst:
            for start, raw, data in rewritten_pieces(self.source, placed, transform, chunk_size):
                read.add(start, raw)
                written.add(start, data)
                write_all(dst.fileno(), patches.applied(start, data, crc_of))
        for info, crc in zip(changed, read.crcs(), strict=True):
            self.verify_crc(info, crc)

    def _crc_fields(
        self, changed: Sequence[zipfile.ZipInfo], spans: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """(offset, index in *changed*) of every CRC-32 field of the members *changed*."""
        central = self._central_headers()
        fields = []
        for index, info in enumerate(changed):
            for offset in (*self._local_crc_fields(info), central[info.filename] + _CENTRAL_CRC):
                fields.append((offset, index))
        return sorted(fields)

    def _local_crc_fields(self, info: zipfile.ZipInfo) -> list[int]:
        """Where member *info*'s CRC-32 lies outside the central directory: in its local
        header, and in its data descriptor when it has one (torch.save writes them, and zeros
        in the local header, which stay zeros)."""
        if not info.flag_bits & _DATA_DESCRIPTOR:
            return [info.header_offset + _LOCAL_CRC]
        with reading(self.path, f"member {shown(info.filename)}"):
            local = self.source.read(info.header_offset + _LOCAL_CRC, 4)
            end = self.data_start(info) + info.compress_size
            descriptor = self.source.read(end, 4)
        if len(descriptor) < 4:
            raise InputError(self.path, f"member {shown(info.filename)}: no data descriptor")
        fields = [end + 4 if descriptor == _DESCRIPTOR_SIGNATURE else end]
        return fields if local == bytes(4) else [info.header_offset + _LOCAL_CRC, *fields]

    def _central_headers(self) -> dict[str, int]:
        """Where each member's central directory header begins."""
        offsets, position = {}, self._zip.start_dir
        for info in self.members:
            with reading(self.path, "zip central directory"):
                header = self.source.read(position, _CENTRAL_HEADER_SIZE)
            if header[:4] != zipfile.stringCentralDir:
                raise InputError(self.path, "zip central directory is damaged")
            offsets[info.filename] = position
            position += _CENTRAL_HEADER_SIZE + sum(struct.unpack("<HHH", header[28:34]))
        return offsets

    def close(self) -> None:
        self._zip.close()
        self._raw.close()


class RangedArchive:
    """What a zip format's reader of a remote object (RangedBytes) adds to the format's
    reader, put before it (``class RangedNpzFile(RangedArchive, _NpzReader)``): the reader
    opened over the object, the object copied as it is (CopiesItself), closed with it."""

    _archive: ZipArchive

    def __init__(self, path: Path, ranged: RangedBytes) -> None:
        super().__init__(path, ranged)  # the format's reader, over the object
        self._ranged = ranged

    def copy_to(self, out: Path) -> None:
        self._ranged.copy_to(out, MAX_WINDOW)

    def close(self) -> None:
        try:
            self._archive.close()
        finally:
            self._ranged.close()


def _ranged_file(ranged: RangedBytes) -> BinaryIO:
    from .ranged import RangedFile

    return RangedFile(ranged)


def _open_zip(path: Path, kind: str, file: BinaryIO | None = None) -> zipfile.ZipFile:
    """zipfile's reading of the archive *path* (through *file*, a remote object's, if given)."""
    try:
        return zipfile.ZipFile(path if file is None else file)
    except READ_ERRORS as exc:
        why = _known_kind(path, file) or one_line(exc)
        raise InputError(path, f"not a readable {kind} (zip) file: {why}") from None


def _known_kind(path: Path, file: BinaryIO | None = None) -> str | None:
    """What a file that is no zip is, when it is a kind gclip knows (a legacy PyTorch
    checkpoint forced to be read as a zip, say)."""
    try:
        if file is not None:
            file.seek(0)
            return unsupported_kind(read_head(file), file)
        with open(path, "rb") as local:
            return unsupported_kind(read_head(local), local)
    except (*READ_ERRORS, InputError):
        return None


def _check_directory_size(path: Path, raw: BinaryIO) -> None:
    """Refuse a central directory larger than MAX_ZIP_DIRECTORY before zipfile reads it."""
    with reading(path, "zip end record"):
        size = zip_directory_size(raw)
    if size is not None and size > MAX_ZIP_DIRECTORY:
        raise InputError(
            path, f"zip central directory of {size:,} bytes exceeds the limit of 100 MB"
        )


def in_place(info: zipfile.ZipInfo) -> bool:
    """Whether member *info* can take new data in place in a byte copy of its archive, only
    its CRC-32s patched: stored, without a data descriptor (which would hold them again)."""
    return info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & _DATA_DESCRIPTOR


def stored_crc(fd: int, start: int, size: int) -> int:
    """The CRC-32 of the *size* bytes at *start* of file *fd* (a stored member's data)."""
    return source_crc(LocalBytes(fd), start, size)


def source_crc(source: ByteSource, start: int, size: int) -> int:
    """The CRC-32 of the *size* bytes at *start* of *source* (a stored member's data)."""
    crc = 0
    for raw in source.windows(window_pieces(start, size, 1, MAX_WINDOW)):
        crc = crc32(raw, crc)
    return crc


def _crc_of(pieces: Iterator[tuple[int, np.ndarray, np.ndarray]]) -> int:
    """The CRC-32 of the bytes to write of *pieces* (ranged.rewritten_pieces)."""
    crc = 0
    for _, _, data in pieces:
        crc = crc32(data, crc)
    return crc


class _Patches:
    """CRC-32 fields (offset, member) to write over a stream's bytes as they pass, each once
    its member's CRC-32 is known (fields come in order of offset; each is 4 bytes)."""

    def __init__(self, fields: Sequence[tuple[int, int]]) -> None:
        self._fields = fields
        self._first = 0  # the first field the next bytes may hold

    def applied(self, start: int, data: np.ndarray, crc_of: Callable[[int], int]) -> memoryview:
        """*data* (the bytes from *start* on) with the fields in them patched (*crc_of*: the
        CRC-32 of a member, by its index)."""
        end = start + len(data)
        while self._first < len(self._fields) and self._fields[self._first][0] + 4 <= start:
            self._first += 1
        patched = None
        for offset, member in self._fields[self._first :]:
            if offset >= end:
                break
            if patched is None:
                patched = bytearray(data)
            value = struct.pack("<I", crc_of(member))
            low, high = max(offset, start), min(offset + 4, end)
            patched[low - start : high - start] = value[low - offset : high - offset]
        return memoryview(patched if patched is not None else data).cast("B")


@contextmanager
def member_bytes(path: Path, fd: int, info: zipfile.ZipInfo, start: int) -> Iterator[BinaryIO]:
    """The bytes of member *info* of the archive *path*, open as *fd*, whose data begin at
    *start* (ZipArchive.data_start): for a worker process, which has no ZipArchive."""
    if info.compress_type in _READ_HERE:
        with MemberReader(LocalBytes(fd), info, start) as member:
            yield member
    else:  # zipfile reads through a file object of its own: inherited ones share offsets
        with zipfile.ZipFile(path) as archive, archive.open(info) as member:
            yield member


class MemberReader(io.RawIOBase):
    """The bytes of the stored or deflated member *info*, whose data begin at *start* of
    *source*; read with ``pread`` (from a remote object, compressed bytes in windows read
    ahead), inflated by ISA-L where installed (never beyond the member's declared size: a zip
    bomb gives no more).  Its CRC-32 is checked where it ends, as zipfile checks it."""

    def __init__(self, source: ByteSource, info: zipfile.ZipInfo, start: int) -> None:
        super().__init__()
        deflated = info.compress_type == zipfile.ZIP_DEFLATED
        self._source, self._info = source, info
        self._inflater = raw_inflater() if deflated else None
        self._position = start  # of the next byte of data to read
        self._end = start + (info.compress_size if deflated else info.file_size)
        # compressed bytes read ahead, for a source whose every read costs (a remote object)
        self._ahead = (
            iter(source.windows(_growing_pieces(start, self._end)))
            if deflated and source.prefetches
            else None
        )
        self._pending = b""  # data read but not yet inflated
        self._left = info.file_size  # bytes still to give
        self._crc = 0
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Fill *buffer* with the member's next bytes: all of it, unless the member ends."""
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._left)
        filled = 0
        while filled < want:
            got = self._read_into(view[filled:want])
            if not got:
                break
            filled += got
        self._crc = crc32(view[:filled], self._crc)
        self._left -= filled
        if not self._ended and (not self._left or filled < want):
            self._ended = True
            if self._crc != self._info.CRC:
                raise zipfile.BadZipFile("bad CRC-32 (damaged data)")
        return filled

    def _read_into(self, view: memoryview) -> int:
        if self._inflater is None:
            got = self._source.readinto(view, self._position)
            self._position += got
            return got
        data = self._inflate(len(view))
        view[: len(data)] = data
        return len(data)

    def _inflate(self, limit: int) -> bytes:
        """At most *limit* more bytes of the member (b"" where its data end)."""
        while True:
            if not self._pending and self._position < self._end:
                self._pending = self._read_input(limit)
                if not self._pending:  # the file shrank
                    return b""
                self._position += len(self._pending)
            data = self._inflater.decompress(self._pending, limit)
            self._pending = self._inflater.unconsumed_tail
            exhausted = not self._pending and self._position >= self._end
            if data or self._inflater.eof or exhausted:
                return data

    def _read_input(self, limit: int) -> bytes:
        """The next compressed bytes: as many as *limit* asks (within bounds), or the next
        window read ahead."""
        if self._ahead is not None:
            return bytes(next(self._ahead, b""))
        size = min(max(limit, _MIN_INPUT), _MAX_INPUT, self._end - self._position)
        return self._source.read(self._position, size)


def _growing_pieces(start: int, end: int) -> Iterator[tuple[int, int]]:
    """The bytes [start, end) in pieces of _MIN_INPUT, then four times as many each time up to
    _MAX_FETCHED."""
    size = _MIN_INPUT
    while start < end:
        yield start, min(size, end - start)
        start += size
        size = min(size * 4, _MAX_FETCHED)


def copy_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A ZipInfo for writing a member like *info*: name, date, compression, attributes.

    The size is declared up front, so that the writer uses zip64 for large members.
    """
    copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    copy.compress_type = info.compress_type
    copy.external_attr = info.external_attr
    copy.create_system = info.create_system
    copy.comment = info.comment
    copy.file_size = info.file_size
    return copy


class ZipWriter:
    """Writes a zip archive into the binary *file* as zipfile writes one into a seekable file
    (see the module's doc); the central directory is written when the block ends without an
    error.  Into a stream (*file* not seekable), each member is rehearsed first (see member).

    *zip64_limit*: beyond it, sizes and offsets go into zip64 records (zipfile.ZIP64_LIMIT;
    lowered only by tests).
    """

    def __init__(
        self, file: BinaryIO, comment: bytes = b"", zip64_limit: int = zipfile.ZIP64_LIMIT
    ) -> None:
        self._file = _Counted(file)
        self.comment = comment
        self._limit = zip64_limit
        self._written: list[zipfile.ZipInfo] = []

    def __enter__(self) -> ZipWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self._write_directory()

    @contextmanager
    def member(
        self,
        info: zipfile.ZipInfo,
        level: int | None = None,
        rehearsal: Callable[[MemberWriter], object] | None = None,
    ) -> Iterator[MemberWriter]:
        """A member *info* (its name, date, method, attributes and file_size, which must be
        the size of what is written); write its bytes into the MemberWriter yielded.  *level*:
        the compression level (the method's default when None; ISA-L deflates at its own).

        The header, written first, holds the member's CRC-32 and compressed size: in a
        seekable file it is written again once they are known; into a stream they are known
        beforehand from *rehearsal*, which writes the same bytes into the MemberWriter it is
        given, whose output goes nowhere (the same compressor gives the same bytes).
        """
        info.compress_size = info.CRC = 0
        info.flag_bits = _LZMA_END_MARKER if info.compress_type == zipfile.ZIP_LZMA else 0
        if not info.external_attr:
            info.external_attr = 0o600 << 16  # ?rw-------, as zipfile gives
        zip64 = info.file_size * 1.05 > self._limit  # compressed data can be a little longer
        if rehearsal is not None:
            rehearsed = MemberWriter(_Counted(None), _compressor(info.compress_type, level))
            rehearsal(rehearsed)
            rehearsed.finish(info)
            expected = (info.file_size, info.compress_size, info.CRC)
        info.header_offset = self._file.position
        self._file.write(info.FileHeader(zip64))
        member = MemberWriter(self._file, _compressor(info.compress_type, level))
        yield member
        member.finish(info)
        if not zip64 and max(info.file_size, info.compress_size) > self._limit:
            raise zipfile.LargeZipFile(f"member {shown(info.filename)} needs zip64 sizes")
        if rehearsal is None:
            end = self._file.position
            self._file.seek(info.header_offset)
            self._file.write(info.FileHeader(zip64))  # now with the sizes and CRC-32
            self._file.seek(end)
        elif (info.file_size, info.compress_size, info.CRC) != expected:
            raise RuntimeError(f"member {shown(info.filename)} differs from its rehearsal")
        self._written.append(info)

    def _write_directory(self) -> None:
        """The central directory, then the end records (zip64 ones too where needed)."""
        start = self._file.position
        for info in self._written:
            self._file.write(_central_header(info, self._limit))
        size = self._file.position - start
        count = len(self._written)
        limit = self._limit
        if count > zipfile.ZIP_FILECOUNT_LIMIT or start > limit or size > limit:
            self._file.write(
                struct.pack(
                    zipfile.structEndArchive64,
                    zipfile.stringEndArchive64,
                    44,  # the size of the rest of this record
                    45,  # version made by
                    45,  # version needed
                    *(0, 0),  # this disk, the directory's disk
                    *(count, count, size, start),
                )
            )
            locator = (zipfile.structEndArchive64Locator, zipfile.stringEndArchive64Locator)
            self._file.write(struct.pack(*locator, 0, start + size, 1))
            count, size, start = min(count, 0xFFFF), min(size, 0xFFFFFFFF), min(start, 0xFFFFFFFF)
        end = (zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0, count, count)
        self._file.write(struct.pack(*end, size, start, len(self.comment)))
        self._file.write(self.comment)


class _Counted:
    """A binary file (None: nowhere) that counts the bytes written into it: the position in a
    stream, which cannot tell it."""

    def __init__(self, file: BinaryIO | None) -> None:
        self._file, self.position = file, 0

    def write(self, data: bytes | memoryview) -> int:
        size = memoryview(data).nbytes
        if self._file is not None:
            self._file.write(data)
        self.position += size
        return size

    def seek(self, position: int) -> None:
        assert self._file is not None
        self._file.seek(position)
        self.position = position


class MemberWriter:
    """Takes a member's bytes: checksums them (ISA-L's CRC-32 where installed), compresses
    them and writes them on."""

    def __init__(self, file: BinaryIO, compressor: object | None) -> None:
        self._file, self._compressor = file, compressor
        self._size = self._compressed = self._crc = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        self._size += view.nbytes
        self._crc = crc32(view, self._crc)
        out = view if self._compressor is None else self._compressor.compress(view)
        self._compressed += memoryview(out).nbytes
        self._file.write(out)
        return view.nbytes

    def finish(self, info: zipfile.ZipInfo) -> None:
        """The compressor's last bytes written; *info* given the sizes and CRC-32."""
        if self._compressor is not None:
            tail = self._compressor.flush()
            self._compressed += len(tail)
            self._file.write(tail)
        info.file_size, info.compress_size, info.CRC = self._size, self._compressed, self._crc


def _compressor(method: int, level: int | None) -> object | None:
    """A compressor for *method* (None: stored), as zipfile makes them, but deflate's
    (deflate.raw_deflater)."""
    if method == zipfile.ZIP_DEFLATED:
        return raw_deflater(level)
    if method == zipfile.ZIP_BZIP2:
        return bz2.BZ2Compressor() if level is None else bz2.BZ2Compressor(level)
    if method == zipfile.ZIP_LZMA:
        return zipfile.LZMACompressor()  # LZMA in zip wraps the stream in a header of its own
    return None


def _central_header(info: zipfile.ZipInfo, limit: int) -> bytes:
    """The central directory header of the written member *info*, as zipfile makes it."""
    wide: list[int] = []  # values too large for their field, in a zip64 extra field
    file_size, compress_size, offset = info.file_size, info.compress_size, info.header_offset
    if file_size > limit or compress_size > limit:
        wide += [file_size, compress_size]
        file_size = compress_size = 0xFFFFFFFF
    if offset > limit:
        wide.append(offset)
        offset = 0xFFFFFFFF
    extra, version = info.extra, _METHOD_VERSIONS.get(info.compress_type, 0)
    if wide:
        zip64 = struct.pack(f"<HH{len(wide)}Q", _ZIP64_EXTRA, 8 * len(wide), *wide)
        extra = zip64 + _without_zip64(extra)
        version = max(version, zipfile.ZIP64_VERSION)
    name, flags = _encoded_name(info)
    header = struct.pack(
        zipfile.structCentralDir,
        zipfile.stringCentralDir,
        max(version, info.create_version),
        info.create_system,
        max(version, info.extract_version),
        info.reserved,
        flags,
        info.compress_type,
        *_dos_time_and_date(info.date_time),
        info.CRC,
        compress_size,
        file_size,
        *(len(name), len(extra), len(info.comment)),
        0,  # the disk the member starts on
        info.internal_attr,
        info.external_attr,
        offset,
    )
    return header + name + extra + info.comment


def _without_zip64(extra: bytes) -> bytes:
    """The extra fields *extra* but any zip64 field."""
    kept, at = [], 0
    while at + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, at)
        if kind != _ZIP64_EXTRA:
            kept.append(extra[at : at + 4 + size])
        at += 4 + size
    return b"".join([*kept, extra[at:]])


def _encoded_name(info: zipfile.ZipInfo) -> tuple[bytes, int]:
    """The member's name as stored, and its flags (with bit 11 where the name is UTF-8)."""
    try:
        return info.filename.encode("ascii"), info.flag_bits
    except UnicodeEncodeError:
        return info.filename.encode("utf-8"), info.flag_bits | _UTF8_NAME


def _dos_time_and_date(moment: tuple[int, int, int, int, int, int]) -> tuple[int, int]:
    year, month, day, hours, minutes, seconds = moment
    return hours << 11 | minutes << 5 | seconds // 2, (year - 1980) << 9 | month << 5 | day
