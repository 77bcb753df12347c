""".npz: a zip archive of ``.npy`` members (the zip parts are ziparchive.py's).

When every member to rewrite is stored (``np.savez``), the output is a byte copy of the archive
with only those members' values and their CRC-32s replaced: all else stays as it was, and the
values sit at known offsets, where worker processes can write them.  Otherwise every member is
rewritten in order (ziparchive.ZipWriter), with its name, compression, date and attributes.
Either way each ``.npy`` member keeps its original header bytes (descr incl. byte order,
fortran_order, shape).  Pickled (object) arrays are refused without being unpickled.

A remote object is read by ranges (RangedNpzFile, over the same zip layer and the same
writing as NpzFile): the byte copy is then written in one pass over the object, in order.
It offers no PlainValues nor ChunkedPieces, whose worker processes read local files only.
"""

from __future__ import annotations

import ast
import io
import struct
import tokenize
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Set
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

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
    one_line,
    reading,
    rewrite_in_place,
)
from .deflate import crc32, crc32_combine
from .signatures import zip_refusal
from .ziparchive import (
    RangedArchive,
    ZipArchive,
    ZipWriter,
    copy_info,
    in_place,
    member_bytes,
    stored_crc,
)

if TYPE_CHECKING:
    from ..progress import Progress
    from .ranged import RangedBytes

FORMAT_NAME = "npz"
# Inflated values are read into one buffer of at most this size (and held once more, inflated).
_INFLATE_WINDOW = 4 << 20
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


class NpyMember(NamedTuple):
    """Where an .npz tensor's values lie (its TensorInfo.location): in zip member *info*,
    after the *values_offset* bytes of its .npy header."""

    info: zipfile.ZipInfo
    values_offset: int


class _NpzReader:
    """What NpzFile and RangedNpzFile share: an .npz read through the zip layer, whichever
    its bytes come from (*ranged*: a remote object's, by ranges; else *path*'s)."""

    format_name = FORMAT_NAME

    def __init__(self, path: Path, ranged: RangedBytes | None = None) -> None:
        self.path = path
        self._archive = ZipArchive(path, ".npz", ranged)
        try:
            self._check_members()
            self.tensors = [
                self._describe_member(info)
                for info in self._archive.members
                if info.filename.endswith(_NPY_SUFFIX)
            ]
        except BaseException:
            self._archive.close()
            raise

    def read_chunks(self, tensor: TensorInfo, chunk_size: int) -> Iterator[np.ndarray]:
        info, values_offset = tensor.location
        if info.compress_type != zipfile.ZIP_STORED:
            opened = partial(self._archive.open_member, info)
            return _member_values(self.path, opened, tensor, chunk_size)
        # straight from the archive's pages (no copy), the CRC-32 checked on the way
        itemsize = tensor.dtype.itemsize
        windows = self._archive.stored_windows(info, values_offset, itemsize, chunk_size)
        return (raw.view(tensor.dtype) for raw in windows)

    def _plain_layout(self) -> dict[str, int]:
        """Where the values of the gradient members lie, when the output can keep the archive's
        layout (every one of them stored, members apart); else none.  Whoever reads them there
        checks their CRC-32s: read_chunks() on the way, workers by verify_checksums(), and
        write_transformed() checks any left."""
        members = [t for t in self.tensors if t.is_gradient]
        if not members or not self._layout_is_plain(members):
            return {}
        start = self._archive.data_start
        return {t.name: start(t.location.info) + t.location.values_offset for t in members}

    def _layout_is_plain(self, members: list[TensorInfo]) -> bool:
        """Whether *members* can take their new values in place (stored, no data descriptor)
        in a byte copy of the archive (members apart)."""
        return all(in_place(t.location.info) for t in members) and self._archive.members_apart()

    def _member_crc(self, tensor: TensorInfo, values_crc: int) -> int:
        """A stored member's CRC-32 from that of its values: its .npy header's comes first."""
        info, values_offset = tensor.location
        with reading(self.path, f"member {shown(info.filename)}"):
            header = self._archive.source.read(self._archive.data_start(info), values_offset)
        return crc32_combine(crc32(header), values_crc, tensor.nbytes)

    def write_transformed(
        self, out: Path, transform: Transform, chunk_size: int, leave: Set[str] = frozenset()
    ) -> None:
        plain = self._plain_layout()
        if plain:
            placed = {t: plain[t.name] for t in self.tensors if t.name in plain}
            self._write_in_place(out, placed, transform, chunk_size, leave)
        else:
            self._write_rebuilt(out, transform, chunk_size)

    def writes_in_order(self) -> bool:
        """A byte copy (every gradient member stored, members apart) is written front to back,
        its new CRC-32s where they lie (ziparchive); so is a rebuilt archive, each member
        rehearsed first (its bytes made, compressed, twice: ZipWriter.member)."""
        return True

    def write_in_order(
        self, out: Path, transform: Transform, rehearsal: Transform, chunk_size: int
    ) -> None:
        plain = self._plain_layout()
        if not plain:
            self._write_rebuilt(out, transform, chunk_size, rehearsal)
            return
        placed = {t: plain[t.name] for t in self.tensors if t.name in plain}
        changed = [t.location.info for t in placed]
        self._archive.write_in_order(out, placed, transform, rehearsal, chunk_size, changed)

    def _write_in_place(
        self,
        out: Path,
        placed: Mapping[TensorInfo, int],
        transform: Transform,
        chunk_size: int,
        leave: Set[str],
    ) -> None:
        """A byte copy of the archive into *out*, the values of *placed* (at their offsets)
        passed through *transform*, their members' CRC-32s checked (each reader's way)."""
        raise NotImplementedError

    def finish_output(self, out: Path, crcs: Mapping[str, int]) -> None:
        """A byte copy with new values needs their new CRC-32s, in the members' local headers
        and in the central directory (from those of the values in *crcs*, else computed)."""
        plain = self._plain_layout()
        if not plain:
            return
        member_crcs = {}
        with open(out, "rb") as copy:
            for tensor in self.tensors:
                if tensor.name in plain:
                    info = tensor.location.info
                    member_crcs[info.filename] = (
                        self._member_crc(tensor, crcs[tensor.name])
                        if tensor.name in crcs
                        else stored_crc(
                            copy.fileno(), self._archive.data_start(info), info.file_size
                        )
                    )
        self._archive.patch_crcs(out, member_crcs)

    def _write_rebuilt(
        self,
        out: Path,
        transform: Transform,
        chunk_size: int,
        rehearsal: Transform | None = None,
    ) -> None:
        """Every member written anew, in order, gradient values passed through *transform*;
        into a stream with *rehearsal* (each member's bytes made once more first, for the
        CRC-32 and compressed size its header holds: ZipWriter.member)."""
        tensors = {t.location.info.filename: t for t in self.tensors if t.is_gradient}
        size = max(min(chunk_size, MAX_WINDOW), 8)  # at least one item
        with (
            open(out, "wb") as file,
            ZipWriter(file, self._archive.comment) as dst,
            PipelinedWriter(lambda data, member: member.write(data), size) as writer,
        ):
            for info in self._archive.members:
                tensor = tensors.get(info.filename)
                rehearse = None
                if rehearsal is not None:
                    rehearse = partial(self._fill, info, tensor, rehearsal, chunk_size, None)
                # every byte written before the member is closed
                with (
                    dst.member(copy_info(info), rehearsal=rehearse) as member_out,
                    writer.drained(),
                ):
                    self._fill(info, tensor, transform, chunk_size, writer, member_out)

    def _fill(
        self,
        info: zipfile.ZipInfo,
        tensor: TensorInfo | None,
        transform: Transform,
        chunk_size: int,
        writer: PipelinedWriter | None,
        member_out: BinaryIO,
    ) -> None:
        """The bytes of member *info* into *member_out*: a copy, or the .npy header and the
        values of *tensor* passed through *transform* (on *writer*'s thread, if given)."""
        if tensor is None:
            self._copy_member(info, member_out, chunk_size)
        else:
            member_out.write(self._npy_header(tensor))
            self._write_values(tensor, transform, member_out, writer, chunk_size)

    def _write_values(
        self,
        tensor: TensorInfo,
        transform: Transform,
        member_out: BinaryIO,
        writer: PipelinedWriter | None,
        chunk_size: int,
    ) -> None:
        """Transformed chunks into *member_out*, written (checksummed, compressed) on the
        writer's thread while the next chunk is transformed (without *writer*: here)."""
        scratch = None
        for chunk in self.read_chunks(tensor, chunk_size):
            if writer is None:
                if scratch is None or scratch.nbytes < chunk.nbytes:
                    scratch = np.empty(chunk.nbytes, dtype=np.uint8)
                target = scratch[: chunk.nbytes].view(chunk.dtype)
                transform(tensor, chunk, target)
                member_out.write(memoryview(target.view(np.uint8)))
            else:
                target = writer.buffer(chunk.nbytes).view(chunk.dtype)
                transform(tensor, chunk, target)
                writer.submit(target, member_out)

    def read_array(self, tensor: TensorInfo) -> np.ndarray | None:
        info = tensor.location.info
        with (
            reading(self.path, f"member {shown(info.filename)}"),
            self._archive.open_member(info) as member,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # numpy warns on headers from Python 2
            return np.lib.format.read_array(member, allow_pickle=False)

    def close(self) -> None:
        self._archive.close()

    def _check_members(self) -> None:
        """Refuse archives that are not ``.npz`` (even when --file-format npz says they are),
        then what could not be copied faithfully (ZipArchive.check_members)."""
        refusal = zip_refusal(self._archive.names)
        if refusal:
            raise InputError(self.path, f"is {refusal}")
        self._archive.check_members()

    def _describe_member(self, info: zipfile.ZipInfo) -> TensorInfo:
        name = info.filename[: -len(_NPY_SUFFIX)]
        try:
            with self._archive.open_member(info) as member:
                shape, fortran_order, dtype, values_offset = _read_npy_header(member)
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
        location = NpyMember(info, values_offset)
        tensor = replace(
            describe_array(name, dtype, tuple(shape), location=location),
            fortran_order=bool(fortran_order) and len(shape) > 1,
        )
        if info.file_size != values_offset + tensor.nbytes:
            raise InputError(
                self.path,
                f"member {shown(info.filename)} is {info.file_size} bytes but its .npy header "
                f"({dtype.str} {shown(tuple(shape))}) needs {values_offset + tensor.nbytes}",
            )
        return tensor

    def _npy_header(self, tensor: TensorInfo) -> bytes:
        info, values_offset = tensor.location
        with (
            reading(self.path, f"member {shown(info.filename)}"),
            self._archive.open_member(info) as member,
        ):
            return member.read(values_offset)

    def _copy_member(self, info: zipfile.ZipInfo, dst: BinaryIO, chunk_size: int) -> None:
        with reading(self.path, f"member {shown(info.filename)}"):
            member = self._archive.open_member(info)
        with member:
            copy_stream(member, dst, info.file_size, chunk_size, self.path)


class NpzFile(_NpzReader):
    """A TensorFile with PlainValues (stored members), Checksummed (a CRC-32 per member),
    ChunkedPieces (compressed members, whole) and WholeArrays; no metadata of its own."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)

    def plain_offsets(self) -> dict[str, int]:
        return self._plain_layout()

    def verify_checksums(self, crcs: Mapping[str, int]) -> None:
        """Check the CRC-32s of members' values (by tensor name), computed as they were read."""
        for tensor in self.tensors:
            if tensor.name in crcs:
                crc = self._member_crc(tensor, crcs[tensor.name])
                self._archive.verify_crc(tensor.location.info, crc)

    def chunked_pieces(self) -> list[ValuePiece]:
        """Compressed gradient members, whole (a deflate stream is read from its start)."""
        return [
            DeflatedMember(self.path, t, self._archive.data_start(t.location.info))
            for t in self.tensors
            if t.is_gradient and t.location.info.compress_type != zipfile.ZIP_STORED
        ]

    def _write_in_place(
        self,
        out: Path,
        placed: Mapping[TensorInfo, int],
        transform: Transform,
        chunk_size: int,
        leave: Set[str],
    ) -> None:
        self._archive.verify_stored([t.location.info for t in placed])
        rewrite_in_place(self._archive.fd, out, placed, transform, chunk_size, leave)


class RangedNpzFile(RangedArchive, _NpzReader):
    """An .npz object read by ranges from its URL (formats/ranged.py): a TensorFile with
    FinishesOutput (the CRC-32s of a byte copy) and WholeArrays, not PlainValues nor
    ChunkedPieces (worker processes read local files only); the next window is fetched while
    one is worked on."""

    def _write_in_place(
        self,
        out: Path,
        placed: Mapping[TensorInfo, int],
        transform: Transform,
        chunk_size: int,
        leave: Set[str],
    ) -> None:
        infos = [t.location.info for t in placed]
        self._archive.copy_rewritten(out, placed, transform, chunk_size, infos)


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
    path: Path,
    opened: Callable[[], AbstractContextManager[BinaryIO]],
    tensor: TensorInfo,
    chunk_size: int,
) -> Iterator[np.ndarray]:
    """The values of member *tensor*, from the stream *opened*() gives (which checks the
    CRC-32), in pieces of at most *chunk_size* read into one reused buffer."""
    info, values_offset = tensor.location
    dtype = tensor.dtype
    step = items_per_chunk(dtype.itemsize, min(chunk_size, _INFLATE_WINDOW))
    buffer = np.empty(min(step, tensor.numel), dtype=dtype)
    raw = memoryview(buffer.view(np.uint8))
    try:
        with opened() as member:
            member.read(values_offset)
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
    """A compressed member, whose data begin at *start*, which a worker process inflates and
    measures (a base.ValuePiece)."""

    path: Path
    tensor: TensorInfo
    start: int

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    def measure(self, fd: int, norm_type: float, chunk_size: int, progress: Progress) -> NormStats:
        accumulator = NormAccumulator.for_tensor(self.tensor, norm_type)
        opened = partial(member_bytes, self.path, fd, self.tensor.location.info, self.start)
        for values in _member_values(self.path, opened, self.tensor, chunk_size):
            accumulator.add(values)
            progress.advance(values.nbytes)
        return accumulator.finish()
