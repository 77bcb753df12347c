"""The formats gclip reads, in one table: detection by content, ``--file-format``'s choices,
the messages that name the formats and the opening of a file all come from it.

Light to import (``gclip --help`` imports it for the choices, and must not import numpy): an
entry names its signature test and its reader as ``module:attribute`` (relative to this
package, or absolute), imported only when a file is detected or opened.  Adding a format is a
module with its reader class, a signature test, its tests, and one line in FORMATS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path
    from typing import BinaryIO

    from .base import TensorFile
    from .ranged import StandIn


@dataclass(frozen=True)
class FormatEntry:
    """One format gclip reads."""

    name: str  # as --file-format spells it
    title: str  # as messages name it ("is not a safetensors, .npz, HDF5 or PyTorch file")
    signature: str  # "module:function", test(first bytes, file) -> whether a file is one
    reader: str  # "module:class" of the TensorFile that opens a file: cls(path)
    # Its C library can crash (not raise) on a damaged file: it is worked on in a child
    # process whose crash becomes an error (isolation.py).
    crashes_on_damage: bool = False
    # "module:class" of its reader of remote objects by ranges, cls(stand-in path,
    # ranged.RangedBytes) (None: such objects are downloaded first; see remote.py)
    ranged_reader: str | None = None
    # Its writer needs a file with a name (HDF5's library resolves the name it opens), so an
    # output to upload is written into a temporary file by the process that uploads it, not
    # streamed (see pipeline._written_at).
    needs_named_output: bool = False

    def is_one(self, head: bytes, file: BinaryIO) -> bool:
        test: Callable[[bytes, BinaryIO], bool] = _imported(self.signature)
        return test(head, file)

    def open(self, path: Path) -> TensorFile:
        return _imported(self.reader)(path)


def _imported(reference: str) -> object:
    """What ``module:attribute`` names (a module relative to this package, or absolute)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module, __package__), attribute)


@dataclass(frozen=True)
class Registry:
    """Formats, in the order detection tries them."""

    entries: tuple[FormatEntry, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(entry.name for entry in self.entries)

    def adding(self, entry: FormatEntry) -> Registry:
        """These formats and *entry*, tried last."""
        return Registry((*self.entries, entry))

    def entry(self, name: str) -> FormatEntry:
        found = next((entry for entry in self.entries if entry.name == name), None)
        if found is None:
            raise KeyError(f"no format {name!r}")
        return found

    def listed(self) -> str:
        """The formats' titles for a message: "safetensors, .npz, HDF5 or PyTorch"."""
        titles = [entry.title for entry in self.entries]
        return " or ".join([", ".join(titles[:-1]), titles[-1]] if len(titles) > 1 else titles)

    def detect(self, path: Path) -> str:
        """The format of *path*, judged by its content (the extension is not trusted).

        A file of a kind gclip recognises but does not read (a PyTorch or Keras archive, a zip
        without arrays, a pickle) is refused with a message naming that kind.
        """
        from . import signatures
        from .base import open_regular
        from .ranged import StandIn, is_stand_in

        try:
            with open_regular(path) as file:
                head = signatures.read_head(file)
                stand_in = StandIn.read(path) if is_stand_in(head) else None
                if stand_in is not None:
                    return stand_in.file_format
                found = next((e.name for e in self.entries if e.is_one(head, file)), None)
                kind = None if found else signatures.unsupported_kind(head, file)
        except OSError as exc:
            raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
        if found:
            return found
        if kind:
            raise InputError(path, f"is {kind}")
        if not head:
            raise InputError(path, "is empty")
        raise InputError(path, f"is not a {self.listed()} file (unrecognised content)")

    def open(
        self, path: Path, name: str | None = None, storage: Mapping[str, object] | None = None
    ) -> TensorFile:
        """Open *path*, as format *name* or as detected, validating its structure before any
        data is read; a stand-in of a remote object (ranged.py) opens the object, reached with
        the fsspec *storage* options."""
        from .base import open_regular
        from .ranged import StandIn

        open_regular(path).close()  # a device or a pipe forced into a format is refused too
        stand_in = StandIn.read(path)
        if stand_in is not None:
            return self._open_ranged(path, stand_in, name, storage or {})
        return self.entry(name or self.detect(path)).open(path)

    def _open_ranged(
        self, path: Path, stand_in: StandIn, name: str | None, storage: Mapping[str, object]
    ) -> TensorFile:
        """The reader by ranges of the remote object *stand_in* names."""
        from .ranged import RangedBytes

        entry = self.entry(stand_in.file_format)
        if (name is not None and name != entry.name) or entry.ranged_reader is None:
            raise InputError(
                stand_in.url, f"is a {entry.title} object, read by ranges as such only"
            )
        ranged = RangedBytes(stand_in, storage)
        try:
            return _imported(entry.ranged_reader)(path, ranged)
        except BaseException:
            ranged.stop()
            raise

    def read_by_ranges(self, head: bytes, file: BinaryIO) -> str | None:
        """The format of a file beginning with *head*, if its objects are read by ranges."""
        return next(
            (e.name for e in self.entries if e.ranged_reader and e.is_one(head, file)), None
        )


FORMATS = Registry(
    (
        FormatEntry(
            "safetensors",
            "safetensors",
            ".signatures:is_safetensors",
            ".safetensors:SafetensorsFile",
            ranged_reader=".safetensors:RangedSafetensorsFile",
        ),
        FormatEntry(
            "npz",
            ".npz",
            ".signatures:is_npz",
            ".npz:NpzFile",
            ranged_reader=".npz:RangedNpzFile",
        ),
        FormatEntry(
            "hdf5",
            "HDF5",
            ".signatures:is_hdf5",
            ".hdf5:Hdf5File",
            crashes_on_damage=True,
            ranged_reader=".hdf5:RangedHdf5File",
            needs_named_output=True,
        ),
        FormatEntry(
            "torch",
            "PyTorch",
            ".signatures:is_torch",
            ".torch:TorchFile",
            ranged_reader=".torch:RangedTorchFile",
        ),
    )
)
FORMAT_NAMES = FORMATS.names
