"""safetensors: u64 header length, JSON header, then one flat byte buffer.

The library's ``save_file`` needs every tensor in memory, so the writer here is our own: scaling
changes no dtype or shape, so the output keeps the input's header byte for byte and rewrites the
buffer at the same offsets.  Validation follows the reference (Rust) loader, plus duplicate keys.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from collections.abc import Iterator, Set
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import ml_dtypes
import numpy as np

from ..dtypes import describe_dtype, is_gradient_dtype
from ..errors import InputError
from ..strict_json import JsonLimitError, shown
from ..strict_json import load as load_json
from .base import (
    MAX_WINDOW,
    InOrder,
    PipelinedWriter,
    TensorInfo,
    Transform,
    mapped,
    open_regular,
    reading,
    reserve,
    window_pieces,
    write_all,
    write_all_at,
)

if TYPE_CHECKING:
    from .ranged import Cursor, RangedBytes

FORMAT_NAME = "safetensors"
MAX_HEADER_BYTES = 100_000_000  # the reference loader's limit
MAX_DEPTH = 3  # {name: {"shape": [...]}}: a valid header nests no deeper
MAX_DIMS = 64  # numpy's limit: no array of more dimensions can be made from the values
_MAX_BYTES = 1 << 64  # a tensor larger than this cannot lie in any file
_MAX_EXTENT = 1 << 63  # numpy's (and torch's) dimensions are signed 64-bit integers

# dtype code -> (bits per value, numpy dtype)
_DTYPES: dict[str, tuple[int, np.dtype]] = {
    code: (bits, np.dtype(dtype))
    for code, bits, dtype in (
        ("F64", 64, "<f8"),
        ("F32", 32, "<f4"),
        ("F16", 16, "<f2"),
        ("BF16", 16, ml_dtypes.bfloat16),
        ("F8_E4M3", 8, ml_dtypes.float8_e4m3fn),
        ("F8_E5M2", 8, ml_dtypes.float8_e5m2),
        ("F8_E4M3FNUZ", 8, ml_dtypes.float8_e4m3fnuz),
        ("F8_E5M2FNUZ", 8, ml_dtypes.float8_e5m2fnuz),
        ("F8_E8M0", 8, ml_dtypes.float8_e8m0fnu),
        ("F6_E2M3", 6, ml_dtypes.float6_e2m3fn),
        ("F6_E3M2", 6, ml_dtypes.float6_e3m2fn),
        ("F4", 4, ml_dtypes.float4_e2m1fn),
        ("I8", 8, "<i1"),
        ("I16", 16, "<i2"),
        ("I32", 32, "<i4"),
        ("I64", 64, "<i8"),
        ("U8", 8, "<u1"),
        ("U16", 16, "<u2"),
        ("U32", 32, "<u4"),
        ("U64", 64, "<u8"),
        ("BOOL", 8, "?"),
        ("C64", 64, "<c8"),
    )
}
_BY_NAME = {describe_dtype(dtype): (bits, dtype) for bits, dtype in _DTYPES.values()}
# dtype code -> what TensorInfo says of its tensors, worked out once: describing 10^6 tensors
# must not ask numpy about their type 10^6 times
_TYPE_FIELDS: dict[str, dict[str, object]] = {
    code: {
        "dtype_name": describe_dtype(dtype),
        "dtype": dtype if is_gradient_dtype(dtype) else None,
        "skip_reason": None if is_gradient_dtype(dtype) else f"{code} is not a gradient type",
    }
    for code, (_, dtype) in _DTYPES.items()
}


# Where a safetensors tensor's values lie (its TensorInfo.location): bytes [begin, end) of the
# data buffer, which follows the header.  A plain pair: a header may describe 10^6 tensors.
DataOffsets = tuple[int, int]


class _Safetensors:
    """What both readers share: the header's metadata; and, since the tensors tile the data
    buffer, an output written in order of offset goes front to back (WritesInOrder)."""

    _metadata: dict[str, str]

    def attribute(self, key: str) -> object | None:
        return self._metadata.get(key)

    def writes_in_order(self) -> bool:
        return True

    def write_in_order(
        self, out: Path, transform: Transform, rehearsal: Transform, chunk_size: int
    ) -> None:
        self.write_transformed(out, transform, chunk_size)  # each reader's own


class SafetensorsFile(_Safetensors):
    """A TensorFile with PlainValues (every tensor), Metadata, WholeArrays and WritesInOrder."""

    format_name = FORMAT_NAME

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open_regular(path)
        try:
            size = os.fstat(self._file.fileno()).st_size
            self._header_bytes, self.tensors, self._metadata = _read_header(path, self._file, size)
        except BaseException:
            self._file.close()
            raise

    @property
    def _data_start(self) -> int:
        return len(self._header_bytes)

    def read_chunks(self, tensor: TensorInfo, chunk_size: int) -> Iterator[np.ndarray]:
        for start, nbytes in self._pieces(tensor, chunk_size):
            with mapped(self._file.fileno(), start, nbytes) as raw:
                yield raw.view(tensor.dtype)

    def plain_offsets(self) -> dict[str, int]:
        return {t.name: self._data_start + t.location[0] for t in self.tensors if t.is_gradient}

    def write_transformed(
        self, out: Path, transform: Transform, chunk_size: int, leave: Set[str] = frozenset()
    ) -> None:
        # write() from reused buffers: as fast here as writing through a mapping, and a full
        # disk is an OSError rather than SIGBUS.  The tensors tile the data buffer, so
        # writing them in order of offset writes the file front to back: a stream (an
        # upload's pipe) takes it as it comes, when no tensor is left for other writers.
        size = max(min(chunk_size, MAX_WINDOW), 8)  # at least one item
        with open(out, "wb", buffering=0) as dst:
            fd = dst.fileno()
            in_order = stat.S_ISFIFO(os.fstat(fd).st_mode)
            if not in_order:
                reserve(fd, os.fstat(self._file.fileno()).st_size)
            write_all(fd, memoryview(self._header_bytes))
            at = InOrder(fd, self._data_start) if in_order else partial(write_all_at, fd)
            with PipelinedWriter(at, size) as writer:
                for tensor in sorted(self.tensors, key=lambda t: t.location):
                    if tensor.name in leave:
                        continue
                    for start, nbytes in self._pieces(tensor, chunk_size):
                        target = writer.buffer(nbytes)
                        with mapped(self._file.fileno(), start, nbytes) as src:
                            if tensor.is_gradient:
                                transform(tensor, src.view(tensor.dtype), target.view(tensor.dtype))
                            else:
                                np.copyto(target, src)
                        writer.submit(target, start)

    def _pieces(self, tensor: TensorInfo, chunk_size: int) -> Iterator[tuple[int, int]]:
        return _value_pieces(self._data_start, tensor, chunk_size)

    def read_array(self, tensor: TensorInfo) -> np.ndarray | None:
        bits, dtype = _BY_NAME[tensor.dtype_name]
        if bits % 8:  # packed: two or more values a byte
            return None
        begin, end = tensor.location
        with reading(self.path, f"tensor {shown(tensor.name)}"):
            data = os.pread(self._file.fileno(), end - begin, self._data_start + begin)
        if len(data) != end - begin:
            raise InputError(
                self.path, f"tensor {shown(tensor.name)}: file ends early (truncated?)"
            )
        return np.frombuffer(data, dtype=dtype).reshape(tensor.shape)

    def close(self) -> None:
        self._file.close()


class RangedSafetensorsFile(_Safetensors):
    """A safetensors object read by ranges from its URL (formats/ranged.py): a TensorFile with
    Metadata, WholeArrays and WritesInOrder, but not PlainValues (worker processes map local
    files only), so one process reads it in order, the next window fetched while one is
    worked on."""

    format_name = FORMAT_NAME

    def __init__(self, path: Path, ranged: RangedBytes) -> None:
        self.path = path  # the stand-in
        self._ranged = ranged
        cursor = ranged.cursor()
        self._header_bytes, self.tensors, self._metadata = _read_header(
            ranged.url, cursor, ranged.size
        )

    def read_chunks(self, tensor: TensorInfo, chunk_size: int) -> Iterator[np.ndarray]:
        pieces = _value_pieces(len(self._header_bytes), tensor, chunk_size)
        for raw in self._ranged.windows(pieces):
            yield raw.view(tensor.dtype)

    def write_transformed(
        self, out: Path, transform: Transform, chunk_size: int, leave: Set[str] = frozenset()
    ) -> None:
        buffer = np.empty(max(min(chunk_size, MAX_WINDOW), 8), dtype=np.uint8)
        with open(out, "wb") as dst:
            dst.write(self._header_bytes)
            for tensor in sorted(self.tensors, key=lambda t: t.location):
                pieces = _value_pieces(len(self._header_bytes), tensor, chunk_size)
                for raw in self._ranged.windows(pieces):
                    if tensor.is_gradient:
                        target = buffer[: raw.size]
                        transform(tensor, raw.view(tensor.dtype), target.view(tensor.dtype))
                        dst.write(target)
                    else:
                        dst.write(raw)

    def copy_to(self, out: Path) -> None:
        self._ranged.copy_to(out, MAX_WINDOW)

    def read_array(self, tensor: TensorInfo) -> np.ndarray | None:
        bits, dtype = _BY_NAME[tensor.dtype_name]
        if bits % 8:  # packed: two or more values a byte
            return None
        begin, end = tensor.location
        data = self._ranged.read(len(self._header_bytes) + begin, end - begin)
        return np.frombuffer(data, dtype=dtype).reshape(tensor.shape)

    def close(self) -> None:
        self._ranged.close()


def _value_pieces(
    data_start: int, tensor: TensorInfo, chunk_size: int
) -> Iterator[tuple[int, int]]:
    """The pieces of *tensor*'s data to read (the header was validated against the file size,
    so no piece runs past the end)."""
    begin, end = tensor.location
    itemsize = tensor.dtype.itemsize if tensor.is_gradient else 1
    return window_pieces(data_start + begin, end - begin, itemsize, chunk_size)


def _read_header(
    path: Path | str, file: BinaryIO | Cursor, size: int
) -> tuple[bytes, list[TensorInfo], dict[str, str]]:
    """Validate the header like the reference loader does; return its raw bytes, tensors and
    ``__metadata__``."""
    prefix = file.read(8)
    if len(prefix) < 8:
        raise InputError(path, "not a safetensors file: shorter than its 8-byte header length")
    n = struct.unpack("<Q", prefix)[0]
    if n > MAX_HEADER_BYTES:
        raise InputError(path, f"safetensors header of {n} bytes exceeds the limit of 100 MB")
    if 8 + n > size:
        raise InputError(path, f"safetensors header length {n} runs past the end of the file")
    raw = file.read(n)
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", {}))
    tensors = _describe_tensors(path, header)
    _check_layout(path, tensors, data_size=size - 8 - n)
    return prefix + raw, tensors, metadata


def _parse_json(path: Path, raw: bytes) -> dict:
    try:
        header = load_json(raw, MAX_DEPTH)
    except JsonLimitError as exc:
        raise InputError(path, f"safetensors header {exc}") from None
    if not isinstance(header, dict):
        raise InputError(path, "safetensors header is not a JSON object")
    return header


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(path, "safetensors __metadata__ must map strings to strings")
    return metadata


def _describe_tensors(path: Path, entries: dict[str, object]) -> list[TensorInfo]:
    """The tensors of the header's *entries*, in order.  *entries* is emptied as they are
    described, so that a header of a million tensors is not held twice (parsed and described)."""
    return [_describe_tensor(path, name, entries.pop(name)) for name in list(entries)]


def _describe_tensor(path: Path, name: str, entry: object) -> TensorInfo:
    def bad(what: str) -> InputError:
        return InputError(path, f"tensor {shown(name)}: {what}")

    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in _DTYPES:
        raise bad(f"unknown dtype {shown(code)}")
    if not isinstance(shape, list) or not _are_counts(shape, _MAX_EXTENT):
        raise bad(f"shape {shown(shape)} is not a list of integers from 0 to 2**63 - 1")
    if len(shape) > MAX_DIMS:
        raise bad(f"shape has {len(shape)} dimensions, more than the {MAX_DIMS} numpy allows")
    if not (isinstance(offsets, list) and len(offsets) == 2 and _are_counts(offsets, 1 << 64)):
        raise bad(f"data_offsets {shown(offsets)} is not a pair of integers from 0 to 2**64 - 1")
    begin, end = offsets
    bits = _DTYPES[code][0]
    total_bits = math.prod(shape) * bits  # at most 64 factors of 20 digits: a small number
    if total_bits % 8 or total_bits // 8 != end - begin:
        needed = f"{total_bits / 8:g}" if total_bits < 8 * _MAX_BYTES else "more than 2**64"
        raise bad(f"{code} {shown(shape)} needs {needed} bytes but data_offsets span {end - begin}")
    return TensorInfo(
        name=name,
        shape=tuple(shape),
        nbytes=end - begin,
        location=(begin, end),
        **_TYPE_FIELDS[code],
    )


def _are_counts(values: list[object], limit: int) -> bool:
    """Whether *values* are integers in [0, *limit*) (JSON gives plain ints, never subclasses
    but bool)."""
    return all(type(v) is int and 0 <= v < limit for v in values)


def _check_layout(path: Path, tensors: list[TensorInfo], data_size: int) -> None:
    """Offsets must tile the buffer exactly: from 0, contiguous, ending at the end of the file."""
    position = 0
    for tensor in sorted(tensors, key=lambda t: t.location):
        begin, end = tensor.location
        if begin != position:
            gap = "overlaps the previous tensor" if begin < position else "leaves a hole before it"
            raise InputError(
                path, f"tensor {shown(tensor.name)}: data_offsets {[begin, end]} {gap}"
            )
        position = end
    if position != data_size:
        raise InputError(
            path,
            f"tensors cover {position} bytes of a {data_size}-byte data buffer "
            + ("(file truncated?)" if position > data_size else "(trailing bytes)"),
        )
