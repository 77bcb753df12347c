"""Recognising a format from a file's structure, without importing its library.

A zip archive is an ``.npz`` only when it holds ``.npy`` arrays, a PyTorch checkpoint when it
holds ``NAME/data.pkl``; TorchScript and Keras archives are zips too, and are named (and
refused) rather than read as archives without arrays.
"""

from __future__ import annotations

import re
import struct
import zipfile
from collections.abc import Sequence
from typing import BinaryIO

from .base import READ_ERRORS

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# torch.save before PyTorch 1.6: a pickle (protocol 2) of the magic number 0x1950a86a20f9469cfc6c
LEGACY_TORCH_SIGNATURE = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_HEAD_BYTES = 16
_TORCH_PICKLE = re.compile(r"(?:^|/)data\.pkl$")
_TORCHSCRIPT_MEMBER = re.compile(r"(?:^|/)(?:constants\.pkl|code/)")
_KERAS_MEMBERS = frozenset({"config.json", "metadata.json", "model.weights.h5"})
# zipfile keeps about 9 bytes of memory per byte of central directory: 100 MB, as for a
# safetensors header, is some 600,000 members of long names
MAX_ZIP_DIRECTORY = 100_000_000
_END_SIGNATURE = b"PK\x05\x06"
_END_SIZE = 22  # the end record without its comment
_END_SEARCH = _END_SIZE + 0xFFFF  # the comment is at most 65,535 bytes
_ZIP64_LOCATOR_SIZE = 20
_ZIP64_END_SIZE = 56
_LOCAL_HEADER_SIZE = 30


def read_head(file: BinaryIO) -> bytes:
    return file.read(_HEAD_BYTES)


def is_safetensors(head: bytes, file: BinaryIO) -> bool:
    """u64 header length (at least '{}') followed by a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2


def is_zip(head: bytes) -> bool:
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def is_npz(head: bytes, file: BinaryIO) -> bool:
    """A zip archive of ``.npy`` arrays, or one too damaged to list (the npz reader then says
    what is wrong with it)."""
    if not is_zip(head):
        return False
    names = zip_names(file)
    if names is None:
        return not _starts_with_torch_pickle(file)
    return zip_kind(names) == "npz"


def is_torch(head: bytes, file: BinaryIO) -> bool:
    """A zip archive of ``NAME/data.pkl`` and its storages, as torch.save writes (not a
    TorchScript archive, which holds code too)."""
    if not is_zip(head):
        return False
    names = zip_names(file)
    if names is None:  # too damaged to list: its first member tells (the torch reader says why)
        return _starts_with_torch_pickle(file)
    return zip_kind(names) == "torch"


def _starts_with_torch_pickle(file: BinaryIO) -> bool:
    """Whether the first member of a zip archive, as its local header names it, is the
    ``NAME/data.pkl`` torch.save writes first."""
    file.seek(0)
    header = file.read(_LOCAL_HEADER_SIZE)
    if len(header) < _LOCAL_HEADER_SIZE or header[:4] != b"PK\x03\x04":
        return False
    name = file.read(struct.unpack_from("<H", header, 26)[0])
    return re.fullmatch(rb"[^/]+/data\.pkl", name) is not None


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


def zip_directory_size(file: BinaryIO) -> int | None:
    """The size of the zip archive *file*'s central directory, as its end record (or zip64 end
    record) says; None when there is none (zipfile then says what is wrong)."""
    size = file.seek(0, 2)
    tail_start = max(size - _END_SEARCH, 0)
    file.seek(tail_start)
    tail = file.read()
    at = tail.rfind(_END_SIGNATURE)
    if at < 0 or at + _END_SIZE > len(tail):
        return None
    directory = struct.unpack_from("<I", tail, at + 12)[0]
    locator = at - _ZIP64_LOCATOR_SIZE
    if directory == 0xFFFFFFFF and locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        file.seek(struct.unpack_from("<Q", tail, locator + 8)[0])
        record = file.read(_ZIP64_END_SIZE)
        if len(record) == _ZIP64_END_SIZE and record[:4] == b"PK\x06\x06":
            directory = struct.unpack_from("<Q", record, 40)[0]
    return directory


def zip_names(file: BinaryIO) -> list[str] | None:
    """The member names of the zip archive *file* (None when its directory cannot be read, or
    is larger than MAX_ZIP_DIRECTORY: the npz reader then says so)."""
    try:
        size = zip_directory_size(file)
        if size is not None and size > MAX_ZIP_DIRECTORY:
            return None
        file.seek(0)
        with zipfile.ZipFile(file) as archive:
            return archive.namelist()
    except READ_ERRORS:  # zipfile raises many kinds on a damaged directory
        return None


def zip_kind(names: Sequence[str]) -> str:
    """What a zip archive with members *names* is: ``torchscript``, ``torch``, ``keras``,
    ``npz`` or ``zip`` (none of these)."""
    if any(_TORCH_PICKLE.search(n) for n in names):
        return "torchscript" if any(_TORCHSCRIPT_MEMBER.search(n) for n in names) else "torch"
    if set(names) >= _KERAS_MEMBERS:
        return "keras"
    if any(n.endswith(".npy") for n in names):
        return "npz"
    return "zip"


_UNSUPPORTED = {
    "torch": "a PyTorch checkpoint (torch.save), not an .npz: read it as --file-format torch",
    "torchscript": "a TorchScript archive (a saved program, not a tensor file)",
    "keras": "a Keras archive (.keras): give the model.weights.h5 inside it instead",
    "zip": "a zip archive without .npy arrays, not an .npz",
}


def zip_refusal(names: Sequence[str]) -> str | None:
    """What a zip archive with members *names* is, when it is not an ``.npz`` (else None)."""
    return _UNSUPPORTED.get(zip_kind(names))


def unsupported_kind(head: bytes, file: BinaryIO) -> str | None:
    """What a file of no supported format is, when it is a known kind gclip does not read."""
    if is_zip(head):
        names = zip_names(file)
        return None if names is None else zip_refusal(names)
    if head.startswith(LEGACY_TORCH_SIGNATURE):
        return "a PyTorch checkpoint in the legacy (pre-1.6) format, which gclip cannot read"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle, which gclip never loads (it could run code)"
    return None
