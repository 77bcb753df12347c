"""PyTorch checkpoints (``torch.save``'s zip format, the default since PyTorch 1.6), read and
written without torch.

The archive holds ``NAME/data.pkl``, a pickle of the saved object in which each tensor is a view
(offset, shape, strides) of a storage, and one stored member ``NAME/data/<key>`` per storage,
aligned for mapping.  ``data.pkl`` is read by torch_pickle.py's restricted unpickler, which runs
nothing; tensors are named by their path in the saved containers (``lstm.weight_hh_l1``,
``state.0.exp_avg_sq``).  A tensor saved under several names (tied weights), or views covering
the same values, are one tensor, named ``first (= second, ...)``: counted and scaled once.

Every view must cover a contiguous run of its storage's items, in any order of its dimensions
(a transposed matrix does): its values are then read and scaled in storage order, which changes
neither a norm's exact sum nor an element-wise product.  Views with gaps between their items
(a strided slice) and views that partly overlap another are refused.

The output is a byte copy of the archive with the values rewritten in place (pickle, member
order, alignment and every other byte kept); only the CRC-32s of the storages that changed are
patched, in the central directory and the data descriptors torch writes after each member.

A remote object is read by ranges (RangedTorchFile, over the same zip layer as TorchFile):
the byte copy is then written in one pass over the object, in order, and the views with gaps
are rewritten from that copy.  It offers no PlainValues, whose worker processes read local
files only.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
import zipfile
from collections import deque
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

from ..errors import InputError
from ..strict_json import shown
from . import torch_pickle
from .base import (
    MAX_WINDOW,
    READ_ERRORS,
    TensorInfo,
    Transform,
    describe_array,
    one_line,
    reading,
    rewrite_in_place,
    window_pieces,
    write_all_at,
)
from .byte_sources import ByteSource, LocalBytes
from .deflate import crc32, crc32_combine
from .signatures import zip_kind, zip_refusal
from .torch_pickle import TORCH_DTYPES, Refused, Storage, TensorView
from .torch_views import Piece, covers_items_once, is_dense, item_range, pieces, storage_axes
from .ziparchive import RangedArchive, ZipArchive, source_crc

if TYPE_CHECKING:
    from .ranged import RangedBytes

FORMAT_NAME = "torch"
MAX_PICKLE_BYTES = 100_000_000  # as for a safetensors header: a state dict's is kilobytes
_PICKLE = re.compile(r"^([^/]+)/data\.pkl$")
MAX_ALIASES = 8  # other names of a tied tensor shown in its name
_STEP = "step"  # an optimizer's step count: a float tensor in torch 2, not a gradient
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    RecursionError,
    MemoryError,
    AttributeError,
    OverflowError,  # a length beyond what the machine can hold
)


@dataclass(frozen=True)
class StorageSlice:
    """Where a torch tensor's values lie (its TensorInfo.location): in the *extent* bytes from
    byte *start* of the storage member *info*, all of them when *dense*, else as *view* (as the
    pickle describes it) picks them."""

    info: zipfile.ZipInfo
    start: int
    extent: int
    view: TensorView
    dense: bool


class _TorchReader:
    """What TorchFile and RangedTorchFile share: a checkpoint read through the zip layer,
    whichever its bytes come from (*ranged*: a remote object's, by ranges; else *path*'s)."""

    format_name = FORMAT_NAME

    def __init__(self, path: Path, ranged: RangedBytes | None = None) -> None:
        self.path = path
        self._archive = ZipArchive(path, "PyTorch", ranged)
        try:
            self._infos = {info.filename: info for info in self._archive.members}
            self._prefix = self._check_members()
            root = self._read_pickle()
            self.tensors = self._describe(root)
            # gradient tensors by the storage member they lie in
            self._by_member: dict[str, list[TensorInfo]] = {}
            for tensor in self.tensors:
                if tensor.is_gradient:
                    self._by_member.setdefault(tensor.location.info.filename, []).append(tensor)
        except BaseException:
            self._archive.close()
            raise

    # --- reading -------------------------------------------------------------------------------

    def read_chunks(self, tensor: TensorInfo, chunk_size: int) -> Iterator[np.ndarray]:
        where: StorageSlice = tensor.location
        source = self._archive.source
        if not where.dense:
            for _, values in self._strided_values(source, tensor, chunk_size):
                yield values
            self._verify_member(where.info, {})
            return
        begin = self._archive.data_start(where.info) + where.start
        crc = 0
        itemsize = tensor.dtype.itemsize
        for raw in source.windows(window_pieces(begin, tensor.nbytes, itemsize, chunk_size)):
            crc = crc32(raw, crc)
            yield raw.view(tensor.dtype)
        self._verify_member(where.info, {tensor.name: crc})

    def _strided_values(
        self, source: ByteSource, tensor: TensorInfo, chunk_size: int
    ) -> Iterator[tuple[Piece, np.ndarray]]:
        """The values of a view with gaps, from *source* (the archive, or a byte copy of it),
        in storage order, a bounded window of its storage at a time: (piece, its values in a
        new 1-D array)."""
        where: StorageSlice = tensor.location
        dtype = tensor.dtype
        storage_start = self._archive.data_start(where.info)  # its item 0
        max_items = min(chunk_size, MAX_WINDOW) // dtype.itemsize
        asked: deque[Piece] = deque()  # pieces whose windows were asked for (read ahead)

        def windows() -> Iterator[tuple[int, int]]:
            for piece in pieces(where.view, max_items):
                asked.append(piece)
                yield storage_start + piece.offset * dtype.itemsize, piece.extent * dtype.itemsize

        for raw in source.windows(windows()):
            piece = asked.popleft()
            yield piece, _picked(raw.view(dtype), piece).reshape(-1)

    def _dense_offsets(self) -> dict[str, int]:
        start = self._archive.data_start
        return {
            t.name: start(t.location.info) + t.location.start
            for t in self._gradients()
            if t.location.dense
        }

    def read_array(self, tensor: TensorInfo) -> np.ndarray | None:
        where: StorageSlice = tensor.location
        view = where.view
        dtype = _numpy_dtype(view.dtype)
        with reading(self.path, f"storage {shown(where.info.filename)}"):
            start = self._archive.data_start(where.info) + where.start
            data = self._archive.source.read(start, where.extent)
        if len(data) != where.extent:
            raise InputError(self.path, f"storage {shown(where.info.filename)} ends early")
        flat = np.frombuffer(data, dtype=dtype)  # from the view's first item on
        if not flat.size:
            return flat.reshape(view.shape)
        strides = tuple(s * dtype.itemsize for s in view.stride)
        array = np.lib.stride_tricks.as_strided(flat, view.shape, strides, writeable=False).copy()
        if view.negated and dtype.kind in "fiuc":
            array = -array
        return array

    # --- writing -------------------------------------------------------------------------------

    def write_transformed(
        self, out: Path, transform: Transform, chunk_size: int, leave: Set[str] = frozenset()
    ) -> None:
        offsets = self._dense_offsets()
        placed = {t: offsets[t.name] for t in self._gradients() if t.name in offsets}
        self._write_copy(out, placed, transform, chunk_size, leave)
        strided = [t for t in self._gradients() if not t.location.dense]
        if strided:
            with open(out, "r+b") as copy:
                for tensor in strided:
                    self._write_strided(tensor, copy.fileno(), transform, chunk_size)

    def writes_in_order(self) -> bool:
        """A byte copy goes front to back (new CRC-32s in the data descriptors and the central
        directory, after the data) when every gradient is dense; views with gaps are written
        into the copy afterwards."""
        return all(t.location.dense for t in self._gradients())

    def write_in_order(
        self, out: Path, transform: Transform, rehearsal: Transform, chunk_size: int
    ) -> None:
        offsets = self._dense_offsets()
        placed = {t: offsets[t.name] for t in self._gradients() if t.name in offsets}
        changed = [self._infos[name] for name in self._by_member]
        self._archive.write_in_order(out, placed, transform, rehearsal, chunk_size, changed)

    def _write_copy(
        self,
        out: Path,
        placed: Mapping[TensorInfo, int],
        transform: Transform,
        chunk_size: int,
        leave: Set[str],
    ) -> None:
        """A byte copy of the archive into *out*, the values of *placed* (at their offsets)
        passed through *transform*, the CRC-32s of the storages checked (each reader's way)."""
        raise NotImplementedError

    def _strided_source(self, out: int) -> ByteSource:
        """Where views with gaps are read from when written into the byte copy *out*."""
        raise NotImplementedError

    def _write_strided(
        self, tensor: TensorInfo, out: int, transform: Transform, chunk_size: int
    ) -> None:
        """The values of a view with gaps passed through *transform* into the byte copy *out*,
        each piece's window read from it, its values replaced, and written back."""
        dtype = tensor.dtype
        where: StorageSlice = tensor.location
        storage_start = self._archive.data_start(where.info)  # its item 0
        source = self._strided_source(out)
        for piece, values in self._strided_values(source, tensor, chunk_size):
            target = np.empty_like(values)
            transform(tensor, values, target)
            position = storage_start + piece.offset * dtype.itemsize
            window = bytearray(os.pread(out, piece.extent * dtype.itemsize, position))
            _picked(np.frombuffer(window, dtype=dtype), piece)[...] = target.reshape(piece.shape)
            write_all_at(out, memoryview(window), position)

    def finish_output(self, out: Path, crcs: Mapping[str, int]) -> None:
        """The new CRC-32s of the storages rewritten, from those of the values written in
        *crcs* (by workers), the rest read from *out*."""
        new = {}
        with open(out, "rb") as copy:
            for name in self._by_member:
                new[name] = self._member_crc(LocalBytes(copy.fileno()), self._infos[name], crcs)
        self._archive.patch_crcs(out, new)

    def close(self) -> None:
        self._archive.close()

    # --- checksums -----------------------------------------------------------------------------

    def _verify_member(self, info: zipfile.ZipInfo, crcs: Mapping[str, int]) -> None:
        """Check the CRC-32 of storage member *info* once, from the CRC-32s *crcs* of values of
        its tensors (by name) and the rest of its bytes, read here."""
        if not self._archive.checked(info):
            self._archive.verify_crc(info, self._member_crc(self._archive.source, info, crcs))

    def _member_crc(
        self, source: ByteSource, info: zipfile.ZipInfo, crcs: Mapping[str, int]
    ) -> int:
        """The CRC-32 of storage member *info* in *source* (the input or the output, whose
        members lie at the same places), from the known CRC-32s of its tensors' values (*crcs*,
        by name) and the other bytes, read from *source*."""
        known = sorted(
            (t.location.start, t.nbytes, crcs[t.name])
            for t in self._by_member.get(info.filename, [])
            if t.name in crcs
        )
        base = self._archive.data_start(info)
        crc, position = 0, 0
        with reading(self.path, f"storage {shown(info.filename)}"):
            for start, nbytes, values_crc in [*known, (info.file_size, 0, 0)]:
                if start > position:
                    gap = source_crc(source, base + position, start - position)
                    crc = crc32_combine(crc, gap, start - position)
                crc = crc32_combine(crc, values_crc, nbytes)
                position = start + nbytes
        return crc

    # --- structure -----------------------------------------------------------------------------

    def _gradients(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.is_gradient]

    def _check_members(self) -> str:
        """Refuse archives that are no torch.save checkpoint, or that could not be copied
        faithfully; the folder its records lie in."""
        names = self._archive.names
        if zip_kind(names) != "torch":
            refusal = zip_refusal(names) or "an .npz (a zip of .npy arrays)"
            raise InputError(self.path, f"is {refusal}, not a PyTorch checkpoint")
        pickles = [m.group(1) for m in map(_PICKLE.match, names) if m]
        if len(pickles) != 1:
            found = "no" if not pickles else f"{len(pickles)}"
            raise InputError(self.path, f"PyTorch archive has {found} NAME/data.pkl records")
        self._archive.check_members()
        if not self._archive.members_apart():
            raise InputError(self.path, "zip members overlap (not an archive torch.save wrote)")
        prefix = pickles[0]
        order = self._member(f"{prefix}/byteorder")
        if order is not None and self._small_member(order, 16) != b"little":
            raise InputError(
                self.path, "PyTorch checkpoint is big-endian (byteorder), which gclip cannot read"
            )
        return prefix

    def _member(self, name: str) -> zipfile.ZipInfo | None:
        return self._infos.get(name)

    def _small_member(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        if info.file_size > limit:
            raise InputError(
                self.path,
                f"record {shown(info.filename)} is {info.file_size:,} bytes, over {limit:,}",
            )
        with reading(self.path, f"record {shown(info.filename)}"):
            member = self._archive.open_member(info)
            with member:  # its CRC-32 is checked as its end is read
                return member.read(info.file_size)

    def _read_pickle(self) -> object:
        info = self._member(f"{self._prefix}/data.pkl")
        data = self._small_member(info, MAX_PICKLE_BYTES)
        try:
            return torch_pickle.load(data)
        except Refused as exc:
            raise InputError(self.path, str(exc)) from None
        except (*_PICKLE_ERRORS, *READ_ERRORS) as exc:
            raise InputError(
                self.path, f"data.pkl is not a valid pickle: {one_line(exc)}"
            ) from None

    def _describe(self, root: object) -> list[TensorInfo]:
        """One TensorInfo per set of values, in the saved order, named by every path that
        reaches them."""
        try:
            found = list(torch_pickle.walk(root))
        except Refused as exc:
            raise InputError(self.path, str(exc)) from None
        names: dict[TensorView, list[str]] = {}
        for path, view in found:
            names.setdefault(view, []).append(self._name(path))
        _refuse_repeated_names(self.path, [n for group in names.values() for n in group])
        storages: dict[str, Storage] = {}
        groups: dict[tuple[object, ...], list[TensorView]] = {}
        for view in names:
            self._check_storage(view.storage, storages)
            start, end, dense = self._span(view, names[view][0])
            # dense views over the same bytes hold the same values; others only when the same
            how = None if dense else (view.shape, view.stride)
            key = (view.storage.key, start, end if end > start else -id(view), view.dtype, how)
            groups.setdefault(key, []).append(view)
        self._refuse_overlaps(groups, names)
        optimizer = isinstance(root, dict) and {"state", "param_groups"} <= set(root)
        return [
            self._tensor(key, views, [n for v in views for n in names[v]], optimizer)
            for key, views in groups.items()
        ]

    def _name(self, path: list[object]) -> str:
        return ".".join(map(str, path)) if path else self._prefix

    def _check_storage(self, storage: Storage, seen: dict[str, Storage]) -> None:
        """A storage's member must exist, be stored, and hold its items exactly; every
        reference to a key must describe the same storage."""
        first = seen.setdefault(storage.key, storage)
        if first != storage:
            raise InputError(
                self.path,
                f"storage {shown(storage.key)} is described twice, as {first.numel} "
                f"{first.dtype} and as {storage.numel} {storage.dtype}",
            )
        if first is not storage:
            return
        info = self._storage_member(storage)
        if info.compress_type != zipfile.ZIP_STORED:
            raise InputError(
                self.path, f"storage {shown(info.filename)} is compressed (torch stores them)"
            )
        if info.file_size != storage.nbytes:
            raise InputError(
                self.path,
                f"storage {shown(info.filename)} is {info.file_size:,} bytes but data.pkl says "
                f"it holds {storage.numel:,} {storage.dtype} ({storage.nbytes:,} bytes)",
            )

    def _storage_member(self, storage: Storage) -> zipfile.ZipInfo:
        info = self._member(f"{self._prefix}/data/{storage.key}")
        if info is None:
            raise InputError(
                self.path, f"data.pkl names storage {shown(storage.key)}, which the archive lacks"
            )
        return info

    def _span(self, view: TensorView, name: str) -> tuple[int, int, bool]:
        """The bytes [start, end) of its storage a view spans, and whether it covers them all
        (dense): refused when it runs past the storage's end or holds an item twice."""
        itemsize = view.itemsize
        if view.storage.nbytes % itemsize:
            raise InputError(
                self.path,
                f"tensor {shown(name)}: its storage of {view.storage.nbytes} bytes is no whole "
                f"number of {view.dtype} items",
            )
        first, end = item_range(view)
        if end * itemsize > view.storage.nbytes or first * itemsize > view.storage.nbytes:
            raise InputError(
                self.path,
                f"tensor {shown(name)} {view.dtype} {list(view.shape)} (offset {view.offset}, "
                f"strides {list(view.stride)}) runs past the end of its storage of "
                f"{view.storage.nbytes // itemsize:,} items",
            )
        if view.numel and not covers_items_once(view):
            raise InputError(
                self.path,
                f"tensor {shown(name)} {list(view.shape)} with strides {list(view.stride)} "
                "holds some values more than once (a broadcast or overlapping view); refused",
            )
        return first * itemsize, end * itemsize, not view.numel or is_dense(view)

    def _refuse_overlaps(
        self, groups: dict[tuple[object, ...], list[TensorView]], names: dict
    ) -> None:
        """Views of one storage must cover the same values (one tensor) or none of the bytes
        the other spans (views with gaps that interleave are refused too)."""
        ranges = sorted(
            ((k[0], k[1], k[2], v[0]) for k, v in groups.items() if k[2] > k[1]),
            key=lambda r: r[:3],
        )
        for before, after in itertools.pairwise(ranges):
            if before[0] == after[0] and after[1] < before[2]:
                first, second = names[before[3]][0], names[after[3]][0]
                raise InputError(
                    self.path,
                    f"tensors {shown(first)} and {shown(second)} share values of storage "
                    f"{shown(before[0])} without being the same view (partly overlapping "
                    "views, or one dtype over another's bytes); refused",
                )

    def _tensor(
        self, key: tuple[object, ...], views: list[TensorView], names: list[str], optimizer: bool
    ) -> TensorInfo:
        view = views[0]
        name = _aliased(names)
        _, start, end, _, how = key
        info = self._storage_member(view.storage)
        location = StorageSlice(info, start, max(end - start, 0), view, how is None)
        # the dtype is recorded: ml_dtypes' types are not raw values of unknown type here
        tensor = replace(
            describe_array(name, _numpy_dtype(view.dtype), view.shape, location),
            opaque_itemsize=0,  # the dtype is recorded
            axes=storage_axes(view),  # the order values are read in, for first_nonfinite
        )
        if optimizer and tensor.is_gradient and names[0].rpartition(".")[2] == _STEP:
            return replace(tensor, dtype=None, skip_reason="an optimizer's step count")
        return tensor


class TorchFile(_TorchReader):
    """A TensorFile with PlainValues and Checksummed (every gradient tensor lies in a stored
    member whose CRC-32 the archive keeps) and WholeArrays; no metadata of its own."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)

    def plain_offsets(self) -> dict[str, int]:
        return self._dense_offsets()

    def verify_checksums(self, crcs: Mapping[str, int]) -> None:
        """Check the CRC-32s of the storages from those of their tensors' values (by tensor
        name, computed by workers as read); the rest of each storage is read here."""
        for name, tensors in self._by_member.items():
            if any(t.name in crcs for t in tensors):
                self._verify_member(self._infos[name], crcs)

    def _write_copy(
        self,
        out: Path,
        placed: Mapping[TensorInfo, int],
        transform: Transform,
        chunk_size: int,
        leave: Set[str],
    ) -> None:
        self._archive.verify_stored([self._infos[name] for name in self._by_member])
        rewrite_in_place(self._archive.fd, out, placed, transform, chunk_size, leave)

    def _strided_source(self, out: int) -> ByteSource:
        return self._archive.source


class RangedTorchFile(RangedArchive, _TorchReader):
    """A PyTorch object read by ranges from its URL (formats/ranged.py): a TensorFile with
    FinishesOutput (the CRC-32s of a byte copy) and WholeArrays, not PlainValues (worker
    processes read local files only); the next window is fetched while one is worked on."""

    def _write_copy(
        self,
        out: Path,
        placed: Mapping[TensorInfo, int],
        transform: Transform,
        chunk_size: int,
        leave: Set[str],
    ) -> None:
        infos = [self._infos[name] for name in self._by_member]
        self._archive.copy_rewritten(out, placed, transform, chunk_size, infos)

    def _strided_source(self, out: int) -> ByteSource:
        """The byte copy itself: it holds the object's bytes where views with gaps lie (they
        are not fetched twice), and each of their values belongs to one piece only."""
        return LocalBytes(out)


def _aliased(names: list[str]) -> str:
    """One tensor's name from the names it was saved under: ``first (= second, third)``, at
    most MAX_ALIASES of the others spelled out (a pickle can repeat a tensor a million times)."""
    if len(names) == 1:
        return names[0]
    others = names[1 : 1 + MAX_ALIASES]
    more = len(names) - 1 - len(others)
    return f"{names[0]} (= {', '.join(others)}{f' and {more:,} more' if more else ''})"


def _picked(items: np.ndarray, piece: Piece) -> np.ndarray:
    """The values of *piece* in *items*, the storage's items from the piece's first on (a
    view into them)."""
    strides = tuple(s * items.itemsize for s in piece.stride)
    return np.lib.stride_tricks.as_strided(items, piece.shape, strides, subok=False)


def _numpy_dtype(name: str) -> np.dtype:
    numpy_name = TORCH_DTYPES[name][0]
    if hasattr(ml_dtypes, numpy_name):
        return np.dtype(getattr(ml_dtypes, numpy_name))
    return np.dtype(numpy_name).newbyteorder("<")


def _refuse_repeated_names(path: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(path, f"two tensors are named {shown(name)} (keys with dots?)")
        seen.add(name)
