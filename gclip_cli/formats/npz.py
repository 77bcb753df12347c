""".npz: a zip archive of ``.npy`` members.

When every member to rewrite is stored (``np.savez``), the output is a byte copy of the archive
with only those members' values and their CRC-32s replaced: all else stays as it was, and the
values sit at known offsets, where worker processes can write them.  Otherwise every member is
rewritten in order through :mod:`zipfile`, with its name, compression, date and attributes.
Either way each ``.npy`` member keeps its original header bytes (descr incl. byte order,
fortran_order, shape).  Pickled (object) arrays are refused without being unpickled.
"""

from __future__ import annotations

import ast
import io
import os
import struct
import tokenize
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from ..errors import InputError
from ..norms import NormAccumulator, NormStats
from ..strict_json import shown
from .base import (
    MAX_WINDOW,
    READ_ERRORS,
    PipelinedWriter,
    TensorInfo,
    Transform,
    ValuePiece,
    copy_stream,
    describe_array,
    items_per_chunk,
    mapped,
    one_line,
    open_regular,
    reading,
    rewrite_in_place,
    window_pieces,
    write_all_at,
)
from .deflate import crc32, crc32_combine, faster_deflate
from .signatures import MAX_ZIP_DIRECTORY, zip_directory_size, zip_refusal

if TYPE_CHECKING:
    from ..progress import Progress

FORMAT_NAME = "npz"
_ENCRYPTED = 0x1  # general purpose flag bit 0
_DATA_DESCRIPTOR = 0x8  # general purpose flag bit 3: CRC and sizes also follow the data
_LOCAL_HEADER_SIZE = 30  # fixed part of a zip local file header
_CENTRAL_HEADER_SIZE = 46  # fixed part of a central directory file header
_LOCAL_CRC, _CENTRAL_CRC = 14, 16  # where the CRC-32 lies in each header
# zipfile allocates every read afresh (and keeps the compressed input besides): small reads.
_INFLATE_WINDOW = 4 << 20
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_NPY_SUFFIX = ".npy"
_NPY_MAGIC_BYTES = 8  # \x93NUMPY, then the major and minor version
_MAX_NPY_HEADER = 10_000  # numpy's max_header_size: it refuses longer headers
_MAX_DIMS = 64  # numpy's limit on an array's dimensions
_MAX_EXTENT = 1 << 63  # numpy's dimensions are signed 64-bit integers
# What numpy's .npy header parser raises besides READ_ERRORS and tokenize.TokenError (headers
# from Python 2 are tokenized): ast.literal_eval's SyntaxError, MemoryError on deep nesting.
_HEADER_PARSE_ERRORS = (SyntaxError, MemoryError)
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
    # 3.0 differs from 2.0 only in allowing UTF-8 in the header, which occurs solely in the
    # field names of structured dtypes: never gradients, and their item size is unaffected.
    (3, 0): np.lib.format.read_array_header_2_0,
}


class NpzFile:
    """A TensorFile with PlainValues (stored members), Checksummed (a CRC-32 per member),
    ChunkedPieces (compressed members, whole) and WholeArrays; no metadata of its own."""

    format_name = FORMAT_NAME

    def __init__(self, path: Path) -> None:
        self.path = path
        # first, so that a pipe or a device is refused before zipfile reads to its end
        self._raw: BinaryIO = open_regular(path)
        try:
            _check_directory_size(path, self._raw)
            self._zip = _open_zip(path)
        except BaseException:
            self._raw.close()
            raise
        self._size = os.fstat(self._raw.fileno()).st_size
        self._checked: set[str] = set()  # members whose CRC-32 has been checked
        self._starts: dict[str, int] = {}  # where each member's bytes begin
        try:
            self._check_members()
            self.tensors = [
                self._describe_member(info)
                for info in self._zip.infolist()
                if info.filename.endswith(_NPY_SUFFIX)
            ]
        except BaseException:
            self.close()
            raise

    def read_chunks(self, tensor: TensorInfo, chunk_bytes: int) -> Iterator[np.ndarray]:
        info, _ = tensor.location
        if info.compress_type == zipfile.ZIP_STORED:
            return self._mapped_chunks(tensor, chunk_bytes)
        return self._inflated_chunks(tensor, chunk_bytes)

    def _mapped_chunks(self, tensor: TensorInfo, chunk_bytes: int) -> Iterator[np.ndarray]:
        """A stored member's values straight from the archive's pages (no copy), its CRC
        checked on the way as zipfile would (once per member and file)."""
        info, data_offset = tensor.location
        start = self._data_start(info)
        check = info.filename not in self._checked
        with reading(self.path, f"member {shown(info.filename)}"):
            self._raw.seek(start)
            crc = crc32(self._raw.read(data_offset))
        pieces = window_pieces(
            start + data_offset, tensor.nbytes, tensor.dtype.itemsize, chunk_bytes
        )
        for offset, nbytes in pieces:
            with mapped(self._raw.fileno(), offset, nbytes) as raw:
                if check:
                    crc = crc32(raw, crc)
                yield raw.view(tensor.dtype)
        if check:
            if crc != info.CRC:
                raise self._bad_crc(info)
            self._checked.add(info.filename)

    def _bad_crc(self, info: zipfile.ZipInfo) -> InputError:
        return InputError(self.path, f"member {shown(info.filename)}: bad CRC-32 (damaged data)")

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a member's (stored or compressed) bytes begin: after its local header, whose
        name and extra field lengths may differ from the central directory's."""
        if info.filename not in self._starts:
            self._starts[info.filename] = self._read_data_start(info)
        return self._starts[info.filename]

    def _read_data_start(self, info: zipfile.ZipInfo) -> int:
        with reading(self.path, f"member {shown(info.filename)}"):
            self._raw.seek(info.header_offset)
            header = self._raw.read(_LOCAL_HEADER_SIZE)
            name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + _LOCAL_HEADER_SIZE + name_length + extra_length
        stored = info.compress_type == zipfile.ZIP_STORED  # then read as file_size bytes
        if start + (info.file_size if stored else info.compress_size) > self._size:
            raise InputError(
                self.path,
                f"member {shown(info.filename)} runs past the end of the file (truncated?)",
            )
        return start

    def _inflated_chunks(self, tensor: TensorInfo, chunk_bytes: int) -> Iterator[np.ndarray]:
        with faster_deflate():
            yield from self._zipfile_chunks(tensor, chunk_bytes)

    def _zipfile_chunks(self, tensor: TensorInfo, chunk_bytes: int) -> Iterator[np.ndarray]:
        return _member_values(self.path, self._zip, tensor, chunk_bytes)

    def plain_offsets(self) -> dict[str, int]:
        """Where the values of the gradient members lie, when the output can keep the archive's
        layout (every one of them stored, members apart); else none.  Whoever reads them there
        checks their CRC-32s: read_chunks() on the way, workers by verify_checksums(), and
        write_transformed() checks any left before it writes."""
        members = [t for t in self.tensors if t.is_gradient]
        if not members or not self._layout_is_plain(members):
            return {}
        return {t.name: self._data_start(t.location[0]) + t.location[1] for t in members}

    def verify_checksums(self, crcs: Mapping[str, int]) -> None:
        """Check the CRC-32s of members' values (by tensor name), computed as they were read."""
        for tensor in self.tensors:
            if tensor.name in crcs:
                info = tensor.location[0]
                if self._member_crc(tensor, crcs[tensor.name]) != info.CRC:
                    raise self._bad_crc(info)
                self._checked.add(info.filename)

    def _member_crc(self, tensor: TensorInfo, values_crc: int) -> int:
        """A stored member's CRC-32 from that of its values: its .npy header's comes first."""
        info, data_offset = tensor.location
        with reading(self.path, f"member {shown(info.filename)}"):
            header = os.pread(self._raw.fileno(), data_offset, self._data_start(info))
        return crc32_combine(crc32(header), values_crc, tensor.nbytes)

    def _check_unchecked(self, plain: Mapping[str, int]) -> None:
        """Check the CRC-32s of the *plain* members that no reader has checked yet."""
        for tensor in self.tensors:
            info = tensor.location[0]
            if tensor.name in plain and info.filename not in self._checked:
                if _member_crc(self._raw.fileno(), self._data_start(info), info) != info.CRC:
                    raise self._bad_crc(info)
                self._checked.add(info.filename)

    def _layout_is_plain(self, members: list[TensorInfo]) -> bool:
        """Whether *members* are stored, without data descriptors after them (which would hold
        their CRC-32 a second time), and all members lie apart before the central directory."""
        for tensor in members:
            info = tensor.location[0]
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & _DATA_DESCRIPTOR:
                return False
        position = 0
        for info in sorted(self._zip.infolist(), key=lambda i: i.header_offset):
            if info.header_offset < position:
                return False
            position = self._data_start(info) + info.compress_size
        return position <= self._zip.start_dir

    def chunked_pieces(self) -> list[ValuePiece]:
        """Deflated gradient members, whole (a deflate stream is read from its start)."""
        return [
            DeflatedMember(self.path, t)
            for t in self.tensors
            if t.is_gradient and t.location[0].compress_type != zipfile.ZIP_STORED
        ]

    def write_transformed(
        self, out: Path, transform: Transform, chunk_bytes: int, leave: Set[str] = frozenset()
    ) -> None:
        plain = self.plain_offsets()
        if plain:
            self._check_unchecked(plain)
            placed = {t: plain[t.name] for t in self.tensors if t.name in plain}
            rewrite_in_place(self._raw.fileno(), out, placed, transform, chunk_bytes, leave)
        else:
            self._write_through_zipfile(out, transform, chunk_bytes)

    def finish_output(self, out: Path, crcs: Mapping[str, int]) -> None:
        """A byte copy with new values needs their new CRC-32s, in the members' local headers
        and in the central directory (from those of the values in *crcs*, else computed)."""
        plain = self.plain_offsets()
        if not plain:
            return
        central = self._central_headers()
        with open(out, "r+b") as copy:
            for tensor in self.tensors:
                if tensor.name in plain:
                    info = tensor.location[0]
                    crc = (
                        self._member_crc(tensor, crcs[tensor.name])
                        if tensor.name in crcs
                        else _member_crc(copy.fileno(), self._data_start(info), info)
                    )
                    field = memoryview(struct.pack("<I", crc))
                    write_all_at(copy.fileno(), field, info.header_offset + _LOCAL_CRC)
                    write_all_at(copy.fileno(), field, central[info.filename] + _CENTRAL_CRC)

    def _central_headers(self) -> dict[str, int]:
        """Where each member's central directory header begins."""
        offsets, position = {}, self._zip.start_dir
        for info in self._zip.infolist():
            with reading(self.path, "zip central directory"):
                header = os.pread(self._raw.fileno(), _CENTRAL_HEADER_SIZE, position)
            if header[:4] != zipfile.stringCentralDir:
                raise InputError(self.path, "zip central directory is damaged")
            offsets[info.filename] = position
            position += _CENTRAL_HEADER_SIZE + sum(struct.unpack("<HHH", header[28:34]))
        return offsets

    def _write_through_zipfile(self, out: Path, transform: Transform, chunk_bytes: int) -> None:
        tensors = {t.location[0].filename: t for t in self.tensors if t.is_gradient}
        size = max(min(chunk_bytes, MAX_WINDOW), 8)  # at least one item
        with (
            faster_deflate(),
            zipfile.ZipFile(out, "w") as dst,
            PipelinedWriter(lambda data, member: member.write(data), size) as writer,
        ):
            dst.comment = self._zip.comment
            for info in self._zip.infolist():
                # every byte written before zipfile closes the member
                with dst.open(_copy_info(info), "w") as member_out, writer.drained():
                    tensor = tensors.get(info.filename)
                    if tensor is None:
                        self._copy_member(info, member_out, chunk_bytes)
                    else:
                        member_out.write(self._npy_header(tensor))
                        self._write_values(tensor, transform, member_out, writer, chunk_bytes)

    def _write_values(
        self,
        tensor: TensorInfo,
        transform: Transform,
        member_out: BinaryIO,
        writer: PipelinedWriter,
        chunk_bytes: int,
    ) -> None:
        """Transformed chunks into *member_out*, written (and CRC'd by zipfile) on the writer's
        thread while the next chunk is transformed."""
        for chunk in self.read_chunks(tensor, chunk_bytes):
            target = writer.buffer(chunk.nbytes).view(chunk.dtype)
            transform(tensor, chunk, target)
            writer.submit(target, member_out)

    def read_array(self, tensor: TensorInfo) -> np.ndarray | None:
        info = tensor.location[0]
        with (
            reading(self.path, f"member {shown(info.filename)}"),
            self._zip.open(info) as member,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # numpy warns on headers from Python 2
            return np.lib.format.read_array(member, allow_pickle=False)

    def close(self) -> None:
        self._zip.close()
        self._raw.close()

    def _check_members(self) -> None:
        """Refuse what could not be copied faithfully, before anything is read or written, and
        archives that are not ``.npz`` (even when --file-format npz says they are)."""
        refusal = zip_refusal(self._zip.namelist())
        if refusal:
            raise InputError(self.path, f"is {refusal}")
        repeated = [name for name, n in Counter(self._zip.namelist()).items() if n > 1]
        if repeated:
            raise InputError(self.path, f"zip member {shown(repeated[0])} appears more than once")
        for info in self._zip.infolist():
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

    def _describe_member(self, info: zipfile.ZipInfo) -> TensorInfo:
        name = info.filename[: -len(_NPY_SUFFIX)]
        try:
            with self._zip.open(info) as member:
                shape, fortran_order, dtype, data_offset = _read_npy_header(member)
        except tokenize.TokenError as exc:  # its message is a tuple
            raise InputError(
                self.path, f"member {shown(info.filename)} is not a valid .npy: {exc.args[0]}"
            ) from None
        except (*READ_ERRORS, *_HEADER_PARSE_ERRORS) as exc:
            raise InputError(
                self.path, f"member {shown(info.filename)} is not a valid .npy: {one_line(exc)}"
            ) from None
        if dtype.hasobject:
            raise InputError(
                self.path, f"member {shown(info.filename)} holds Python objects (a pickle); refused"
            )
        tensor = replace(
            describe_array(name, dtype, tuple(shape), location=(info, data_offset)),
            fortran_order=bool(fortran_order) and len(shape) > 1,
        )
        if info.file_size != data_offset + tensor.nbytes:
            raise InputError(
                self.path,
                f"member {shown(info.filename)} is {info.file_size} bytes but its .npy header "
                f"({dtype.str} {shown(tuple(shape))}) needs {data_offset + tensor.nbytes}",
            )
        return tensor

    def _npy_header(self, tensor: TensorInfo) -> bytes:
        info, data_offset = tensor.location
        with reading(self.path, f"member {shown(info.filename)}"), self._zip.open(info) as member:
            return member.read(data_offset)

    def _copy_member(self, info: zipfile.ZipInfo, dst: BinaryIO, chunk_bytes: int) -> None:
        with reading(self.path, f"member {shown(info.filename)}"):
            member = self._zip.open(info)
        with member:
            copy_stream(member, dst, info.file_size, chunk_bytes, self.path)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except READ_ERRORS as exc:
        raise InputError(path, f"not a readable .npz (zip) file: {one_line(exc)}") from None


def _check_directory_size(path: Path, raw: BinaryIO) -> None:
    """Refuse a central directory larger than MAX_ZIP_DIRECTORY before zipfile reads it."""
    with reading(path, "zip end record"):
        size = zip_directory_size(raw)
    if size is not None and size > MAX_ZIP_DIRECTORY:
        raise InputError(
            path, f"zip central directory of {size:,} bytes exceeds the limit of 100 MB"
        )


def _read_npy_header(member: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and data offset from the ``.npy`` header at the start of
    *member*.

    numpy reads as many header bytes as the header claims (up to 4 GiB) before checking them
    against its limit, and its parser raises more than ValueError on a damaged header; here the
    length is checked first, and numpy parses the bytes read, silenced (it warns on Python 2
    headers)."""
    magic = member.read(_NPY_MAGIC_BYTES)
    version = np.lib.format.read_magic(io.BytesIO(magic))
    if version not in _HEADER_READERS:
        raise ValueError(f"unsupported .npy format version {version}")
    length_format = "<H" if version == (1, 0) else "<I"
    length_bytes = member.read(struct.calcsize(length_format))
    if len(length_bytes) < struct.calcsize(length_format):
        raise ValueError("file ends within the .npy header")
    (length,) = struct.unpack(length_format, length_bytes)
    if length > _MAX_NPY_HEADER:
        raise ValueError(
            f".npy header of {length} bytes exceeds numpy's limit of {_MAX_NPY_HEADER} bytes"
        )
    header = member.read(length)
    if len(header) < length:
        raise ValueError("file ends within the .npy header")
    if version == (3, 0):  # read as 2.0, but numpy rereads no 3.0 header as Python 2's
        ast.literal_eval(header.decode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shape, fortran_order, dtype = _HEADER_READERS[version](io.BytesIO(length_bytes + header))
    if len(shape) > _MAX_DIMS or any(type(n) is not int or not 0 <= n < _MAX_EXTENT for n in shape):
        raise ValueError(f"shape {shown(shape)} is not one numpy can make")
    if dtype.subdtype is not None:  # numpy writes ('<f4', (2,)) into the shape, and reads no other
        base, extent = dtype.subdtype
        raise ValueError(f"descr {(base.str, extent)} is an array type, which numpy cannot read")
    return shape, fortran_order, dtype, len(magic) + len(length_bytes) + length


def _member_values(
    path: Path, archive: zipfile.ZipFile, tensor: TensorInfo, chunk_bytes: int
) -> Iterator[np.ndarray]:
    """The values of member *tensor* of *archive* through zipfile (which checks the CRC-32),
    in pieces of at most *chunk_bytes* read into one reused buffer."""
    info, data_offset = tensor.location
    dtype = tensor.dtype
    step = items_per_chunk(dtype.itemsize, min(chunk_bytes, _INFLATE_WINDOW))
    buffer = np.empty(min(step, tensor.numel), dtype=dtype)
    raw = memoryview(buffer.view(np.uint8))
    try:
        with archive.open(info) as member:
            member.read(data_offset)
            left = tensor.numel
            while left:
                count = min(step, left)
                nbytes = count * dtype.itemsize
                if member.readinto(raw[:nbytes]) != nbytes:
                    raise InputError(path, f"member {shown(info.filename)} ends early")
                left -= count
                yield buffer[:count]
    except READ_ERRORS as exc:
        raise InputError(path, f"member {shown(info.filename)}: {one_line(exc)}") from None


@dataclass(frozen=True)
class DeflatedMember:
    """A deflated member, which a worker process inflates and measures (a base.ValuePiece)."""

    path: Path
    tensor: TensorInfo

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    def measure(self, fd: int, norm_type: float, window: int, progress: Progress) -> NormStats:
        del fd  # zipfile reads through a file object of its own: inherited ones share offsets
        accumulator = NormAccumulator(norm_type)
        with faster_deflate(), zipfile.ZipFile(self.path) as archive:
            for values in _member_values(self.path, archive, self.tensor, window):
                accumulator.add(values)
                progress.advance(values.nbytes)
        return accumulator.finish()


def _member_crc(fd: int, start: int, info: zipfile.ZipInfo) -> int:
    """The CRC-32 of the stored member *info* whose bytes begin at *start* in file *fd*."""
    crc = 0
    for offset, nbytes in window_pieces(start, info.file_size, 1, MAX_WINDOW):
        with mapped(fd, offset, nbytes) as raw:
            crc = crc32(raw, crc)
    return crc


def _copy_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A ZipInfo for writing a member like *info*: name, date, compression, attributes.

    The size is declared up front so that zipfile switches to zip64 for large members itself.
    """
    copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    copy.compress_type = info.compress_type
    copy.external_attr = info.external_attr
    copy.create_system = info.create_system
    copy.comment = info.comment
    copy.file_size = info.file_size
    return copy
