"""File formats: detection from a file's first bytes, and opening it as a TensorFile.

Adding a format means adding a module with a class that implements
:class:`~gclip_cli.formats.base.TensorFile`, a signature test in ``signatures.py``, and a line
in ``_FORMATS``.  A format's module (and its library) is imported only when a file needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError
from . import signatures
from .base import (
    Checksummed,
    ChunkedPieces,
    Metadata,
    PlainValues,
    TensorFile,
    TensorInfo,
    Transform,
    WholeArrays,
    open_regular,
)

__all__ = [
    "FORMAT_NAMES",
    "Checksummed",
    "ChunkedPieces",
    "Metadata",
    "PlainValues",
    "TensorFile",
    "TensorInfo",
    "Transform",
    "WholeArrays",
    "crashes_on_damage",
    "detect_format",
    "open_file",
]

# name -> (signature test, module, class)
_FORMATS: dict[str, tuple[Callable[[bytes, BinaryIO], bool], str, str]] = {
    "safetensors": (signatures.is_safetensors, "safetensors", "SafetensorsFile"),
    "npz": (signatures.is_npz, "npz", "NpzFile"),
    "hdf5": (signatures.is_hdf5, "hdf5", "Hdf5File"),
}
# Formats whose C library can crash (not raise) on a damaged file: worked on in a child process.
_CRASH_PRONE = frozenset({"hdf5"})
FORMAT_NAMES = tuple(_FORMATS)


def detect_format(path: Path) -> str:
    """The format of *path*, judged by its content (the extension is not trusted).

    A file of a kind gclip recognises but does not read (a PyTorch or Keras archive, a zip
    without arrays, a pickle) is refused with a message naming that kind.
    """
    try:
        with open_regular(path) as file:
            head = signatures.read_head(file)
            found = next(
                (name for name, (test, _, _) in _FORMATS.items() if test(head, file)), None
            )
            kind = None if found else signatures.unsupported_kind(head, file)
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    if found:
        return found
    if kind:
        raise InputError(path, f"is {kind}")
    if not head:
        raise InputError(path, "is empty")
    raise InputError(path, "is not a safetensors, .npz or HDF5 file (unrecognised content)")


def crashes_on_damage(name: str) -> bool:
    return name in _CRASH_PRONE


def open_file(path: Path, file_format: str | None = None) -> TensorFile:
    """Open *path* for reading, validating its structure before any data is read."""
    if file_format:
        open_regular(path).close()  # a device or a pipe forced into a format is refused too
    name = file_format or detect_format(path)
    _, module, cls = _FORMATS[name]
    opener = getattr(importlib.import_module(f".{module}", __package__), cls)
    return opener(path)
