"""safetensors: u64 header length, JSON header, then one flat byte buffer.

The library's ``save_file`` needs every tensor in memory, so the writer here is our own: scaling
changes no dtype or shape, so the output keeps the input's header byte for byte and rewrites the
buffer at the same offsets.  Validation follows the reference (Rust) loader, plus duplicate keys.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping, Set
from functools import partial
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np

from ..dtypes import describe_dtype, is_gradient_dtype
from ..errors import InputError
from .base import (
    MAX_WINDOW,
    PipelinedWriter,
    TensorInfo,
    Transform,
    ValuePiece,
    mapped,
    reading,
    reserve,
    window_pieces,
    write_all_at,
)

FORMAT_NAME = "safetensors"
MAX_HEADER_BYTES = 100_000_000  # the reference loader's limit

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


class SafetensorsFile:
    format_name = FORMAT_NAME
    checksummed = False  # the file keeps no checksums of the values

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self._header_bytes, self.tensors, self._metadata = _read_header(path, self._file)
        except BaseException:
            self._file.close()
            raise

    @property
    def _data_start(self) -> int:
        return len(self._header_bytes)

    def read_chunks(self, tensor: TensorInfo, chunk_bytes: int) -> Iterator[np.ndarray]:
        for start, nbytes in self._pieces(tensor, chunk_bytes):
            with mapped(self._file.fileno(), start, nbytes) as raw:
                yield raw.view(tensor.dtype)

    def plain_offsets(self) -> dict[str, int]:
        return {t.name: self._data_start + t.location[0] for t in self.tensors if t.is_gradient}

    def chunked_pieces(self) -> list[ValuePiece]:
        return []  # every value is plain bytes (plain_offsets)

    def write_transformed(
        self, out: Path, transform: Transform, chunk_bytes: int, leave: Set[str] = frozenset()
    ) -> None:
        # write() from reused buffers: as fast here as writing through a mapping, and a full
        # disk is an OSError rather than SIGBUS.
        size = max(min(chunk_bytes, MAX_WINDOW), 8)  # at least one item
        with open(out, "wb") as dst:
            reserve(dst.fileno(), os.fstat(self._file.fileno()).st_size)
            dst.write(self._header_bytes)
            with PipelinedWriter(partial(write_all_at, dst.fileno()), size) as writer:
                for tensor in sorted(self.tensors, key=lambda t: t.location):
                    if tensor.name in leave:
                        continue
                    for start, nbytes in self._pieces(tensor, chunk_bytes):
                        target = writer.buffer(nbytes)
                        with mapped(self._file.fileno(), start, nbytes) as src:
                            if tensor.is_gradient:
                                transform(tensor, src.view(tensor.dtype), target.view(tensor.dtype))
                            else:
                                np.copyto(target, src)
                        writer.submit(target, start)

    def _pieces(self, tensor: TensorInfo, chunk_bytes: int) -> Iterator[tuple[int, int]]:
        """The pieces of *tensor*'s data to map (the header was validated against the file
        size, so no piece runs past the end)."""
        begin, end = tensor.location
        itemsize = tensor.dtype.itemsize if tensor.is_gradient else 1
        return window_pieces(self._data_start + begin, end - begin, itemsize, chunk_bytes)

    def attribute(self, key: str) -> object | None:
        return self._metadata.get(key)

    def read_array(self, tensor: TensorInfo) -> np.ndarray | None:
        bits, dtype = _BY_NAME[tensor.dtype_name]
        if bits % 8:  # packed: two or more values a byte
            return None
        begin, end = tensor.location
        with reading(self.path, f"tensor {tensor.name!r}"):
            data = os.pread(self._file.fileno(), end - begin, self._data_start + begin)
        if len(data) != end - begin:
            raise InputError(self.path, f"tensor {tensor.name!r}: file ends early (truncated?)")
        return np.frombuffer(data, dtype=dtype).reshape(tensor.shape)

    def verify_checksums(self, crcs: Mapping[str, int]) -> None:
        pass  # not checksummed: there are none

    def finish_output(self, out: Path, crcs: Mapping[str, int]) -> None:
        pass  # nothing outside the values depends on them

    def close(self) -> None:
        self._file.close()


def _read_header(path: Path, file: BinaryIO) -> tuple[bytes, list[TensorInfo], dict[str, str]]:
    """Validate the header like the reference loader does; return its raw bytes, tensors and
    ``__metadata__``."""
    file.seek(0, 2)
    size = file.tell()
    file.seek(0)
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
    tensors = _describe_tensors(path, header)
    _check_layout(path, tensors, data_size=size - 8 - n)
    return prefix + raw, tensors, header.get("__metadata__", {})


def _parse_json(path: Path, raw: bytes) -> dict:
    def refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in pairs]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise InputError(path, f"safetensors header repeats the key {duplicates[0]!r}")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=refuse_duplicates)
    except UnicodeDecodeError:
        raise InputError(path, "safetensors header is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"safetensors header is not valid JSON ({exc.msg})") from None
    if not isinstance(header, dict):
        raise InputError(path, "safetensors header is not a JSON object")
    return header


def _describe_tensors(path: Path, header: dict) -> list[TensorInfo]:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError(path, "safetensors __metadata__ must map strings to strings")
    return [
        _describe_tensor(path, name, entry)
        for name, entry in header.items()
        if name != "__metadata__"
    ]


def _describe_tensor(path: Path, name: str, entry: object) -> TensorInfo:
    def bad(what: str) -> InputError:
        return InputError(path, f"tensor {name!r}: {what}")

    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in _DTYPES:
        raise bad(f"unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise bad(f"data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    bits, dtype = _DTYPES[code]
    total_bits = math.prod(shape) * bits
    if total_bits % 8 or total_bits // 8 != end - begin:
        raise bad(
            f"{code} {shape} needs {total_bits / 8:g} bytes but data_offsets span {end - begin}"
        )
    gradient = is_gradient_dtype(dtype)
    return TensorInfo(
        name=name,
        dtype_name=describe_dtype(dtype),
        shape=tuple(shape),
        nbytes=end - begin,
        dtype=dtype if gradient else None,
        skip_reason=None if gradient else f"{code} is not a gradient type",
        location=(begin, end),
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: Path, tensors: list[TensorInfo], data_size: int) -> None:
    """Offsets must tile the buffer exactly: from 0, contiguous, ending at the end of the file."""
    position = 0
    for tensor in sorted(tensors, key=lambda t: t.location):
        begin, end = tensor.location
        if begin != position:
            gap = "overlaps the previous tensor" if begin < position else "leaves a hole before it"
            raise InputError(path, f"tensor {tensor.name!r}: data_offsets {[begin, end]} {gap}")
        position = end
    if position != data_size:
        raise InputError(
            path,
            f"tensors cover {position} bytes of a {data_size}-byte data buffer "
            + ("(file truncated?)" if position > data_size else "(trailing bytes)"),
        )
