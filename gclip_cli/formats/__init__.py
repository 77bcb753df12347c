"""File formats: detection from a file's first bytes, and opening it as a TensorFile.

Adding a format means adding a module with ``FORMAT_NAME``, ``sniff(head)`` and a class that
implements :class:`~gclip_cli.formats.base.TensorFile`, and listing it in ``_FORMATS``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from . import hdf5, npz, safetensors
from .base import TensorFile, TensorInfo, Transform

__all__ = ["FORMAT_NAMES", "TensorFile", "TensorInfo", "Transform", "detect_format", "open_file"]

_FORMATS = {
    module.FORMAT_NAME: (module, opener)
    for module, opener in (
        (safetensors, safetensors.SafetensorsFile),
        (npz, npz.NpzFile),
        (hdf5, hdf5.Hdf5File),
    )
}
FORMAT_NAMES = tuple(_FORMATS)
_SNIFF_BYTES = 16


def detect_format(path: Path) -> str:
    """The format of *path*, judged by its content (the extension is not trusted)."""
    try:
        with open(path, "rb") as file:
            head = file.read(_SNIFF_BYTES)
    except IsADirectoryError:
        raise InputError(path, "is a directory, not a file") from None
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    for name, (module, _) in _FORMATS.items():
        if module.sniff(head):
            return name
    if hdf5.sniff_file(path):  # HDF5 with a user block: the signature sits further in
        return hdf5.FORMAT_NAME
    if not head:
        raise InputError(path, "is empty")
    raise InputError(path, "is not a safetensors, .npz or HDF5 file (unrecognised content)")


def open_file(path: Path, file_format: str | None = None) -> TensorFile:
    """Open *path* for reading, validating its structure before any data is read."""
    name = file_format or detect_format(path)
    _, opener = _FORMATS[name]
    return opener(path)
