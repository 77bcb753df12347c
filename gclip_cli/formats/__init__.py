"""File formats: one module per format behind the TensorFile protocol (base.py) and its
optional capabilities, found and opened through one registry (registry.py).

Light to import: the registry's names come without numpy (``gclip --help`` lists them); the
protocol's names, from base.py, are imported when first asked for.  A format's module (and its
library) is imported only when a file needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import FORMAT_NAMES, FORMATS, FormatEntry, Registry

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from .base import (
        Checksummed,
        ChunkedPieces,
        FinishesOutput,
        Metadata,
        PlainValues,
        SelfMeasuring,
        TensorFile,
        TensorInfo,
        Transform,
        WholeArrays,
    )

__all__ = [
    "FORMATS",
    "FORMAT_NAMES",
    "Checksummed",
    "ChunkedPieces",
    "FinishesOutput",
    "FormatEntry",
    "Metadata",
    "PlainValues",
    "Registry",
    "SelfMeasuring",
    "TensorFile",
    "TensorInfo",
    "Transform",
    "WholeArrays",
    "crashes_on_damage",
    "detect_format",
    "needs_named_output",
    "open_file",
]

_FROM_BASE = frozenset(
    {
        "Checksummed",
        "ChunkedPieces",
        "FinishesOutput",
        "Metadata",
        "PlainValues",
        "SelfMeasuring",
        "TensorFile",
        "TensorInfo",
        "Transform",
        "WholeArrays",
        "WritesInOrder",
    }
)


def __getattr__(name: str) -> object:
    """The protocol's names, from base.py (which imports numpy) when first asked for."""
    if name in _FROM_BASE:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def detect_format(path: Path) -> str:
    """The format of *path*, judged by its content (see Registry.detect)."""
    return FORMATS.detect(path)


def open_file(
    path: Path, file_format: str | None = None, storage: Mapping[str, object] | None = None
) -> TensorFile:
    """Open *path* for reading, as *file_format* or as detected, validating its structure
    before any data is read (*storage*: fsspec options, for a stand-in of a remote object)."""
    return FORMATS.open(path, file_format, storage)


def crashes_on_damage(name: str) -> bool:
    """Whether the library of format *name* can crash (not raise) on a damaged file."""
    return FORMATS.entry(name).crashes_on_damage


def needs_named_output(name: str) -> bool:
    """Whether format *name*'s writer needs an output file with a name (see FormatEntry)."""
    return FORMATS.entry(name).needs_named_output
