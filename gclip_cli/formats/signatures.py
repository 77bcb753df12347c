"""Recognising a format from a file's first bytes, without importing its library."""

from __future__ import annotations

import struct
from typing import BinaryIO

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HEAD_BYTES = 16


def read_head(file: BinaryIO) -> bytes:
    return file.read(_HEAD_BYTES)


def is_safetensors(head: bytes, file: BinaryIO) -> bool:
    """u64 header length (at least '{}') followed by a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2


def is_zip(head: bytes, file: BinaryIO) -> bool:
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def is_hdf5(head: bytes, file: BinaryIO) -> bool:
    """The HDF5 signature at offset 0, or after a user block at 512, 1024, 2048, ... bytes."""
    if head.startswith(HDF5_SIGNATURE):
        return True
    size = file.seek(0, 2)
    offset = 512
    while offset + len(HDF5_SIGNATURE) <= size:
        file.seek(offset)
        if file.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            return True
        offset *= 2
    return False
