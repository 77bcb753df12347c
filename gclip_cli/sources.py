"""What the inputs name: files, directories and sharded-checkpoint indexes, resolved to the
tensor files to read (each file once, however many names reach it), the files left unread
(each with the reason), and the indexes whose shards must hold exactly the tensors they list.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import strict_json
from .errors import InputError
from .formats import detect_format
from .formats.base import open_regular, reading
from .selection import name_key

INDEX_SUFFIX = ".index.json"
MAX_INDEX_BYTES = 100_000_000  # as for a safetensors header: real indexes are a few MB
_INDEX_DEPTH = 16  # weight_map is 2 levels down; metadata may nest a little deeper
_NAMES_SHOWN = 3  # tensors named in an index error; the rest are counted
_NAME_MAX, _PATH_MAX = 255, 4096  # bytes in a file name, in a path (Linux, macOS: 1024)


@dataclass(frozen=True)
class NotRead:
    """A file or folder an input holds that gclip does not read, and why; *same_as*: the
    file read instead, when this is another name for it."""

    path: Path
    reason: str
    same_as: Path | None = None


@dataclass(frozen=True)
class Identity:
    """The file a path named when this was taken, with its size and last change: one renamed
    over, rewritten or truncated since no longer matches."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    host: str  # device numbers mean something on one machine only (a Dask worker elsewhere)

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> Identity:
        try:
            found = os.stat(path)
        except FileNotFoundError:
            raise InputError(path, "no such file") from None
        except OSError as exc:
            raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
        host = os.uname().nodename
        return cls(found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, host)

    @property
    def file(self) -> tuple[int, int]:
        return self.device, self.inode

    def check(self, path: str | os.PathLike[str]) -> None:
        """Refuse when *path* no longer names the file as it was."""
        try:
            now = Identity.of(path)
        except InputError:
            raise InputError(path, "was removed while gclip was reading it") from None
        change = self._change(now)
        if change:
            raise InputError(path, f"changed while gclip was reading it ({change})")

    def _change(self, now: Identity) -> str | None:
        moved = self.inode != now.inode or (self.host == now.host and self.device != now.device)
        if moved:
            return "replaced by another file"
        if self.size != now.size:
            return f"its size went from {self.size:,} to {now.size:,} bytes"
        if self.mtime_ns != now.mtime_ns:
            return "modified"
        return None


@contextmanager
def unchanged(path: Path, identity: Identity) -> Iterator[None]:
    """Refuse, at the end of the block, an input that changed while it ran; an error inside it
    that such a change caused (a mapping past a truncated end, a file gone) is reported as the
    change."""
    try:
        yield
    except Exception:
        try:
            identity.check(path)
        except InputError as changed:
            raise changed from None
        raise
    identity.check(path)


@dataclass(frozen=True)
class Index:
    """A sharded checkpoint's ``*.index.json``: which shard holds each tensor."""

    path: Path
    shards: dict[Path, frozenset[str]]  # shard -> the names (name_key) it lists, in order

    def check(self, names: Mapping[Path, Iterable[str]]) -> None:
        """Refuse shards that do not hold exactly the tensors the index lists for them
        (*names*: each shard's tensor names, as read)."""
        owner = {name: shard for shard, listed in self.shards.items() for name in listed}
        for shard, listed in self.shards.items():
            found = [name_key(n) for n in names[shard]]
            present = set(found)
            elsewhere = [n for n in found if n not in listed and n in owner]
            if elsewhere:
                other = owner[elsewhere[0]].name
                self._refuse(elsewhere, f"in {shard.name} but listed for {other}")
            unlisted = [n for n in found if n not in owner]
            if unlisted:
                self._refuse(unlisted, f"in {shard.name} but not in the index")
            absent = sorted(listed - present)
            if absent:
                self._refuse(absent, f"listed for {shard.name} but not in it")

    def _refuse(self, names: Sequence[str], problem: str) -> None:
        shown = ", ".join(strict_json.shown(n) for n in names[:_NAMES_SHOWN])
        more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
        tensors = "tensor" if len(names) == 1 else "tensors"
        raise InputError(self.path, f"{tensors} {shown}{more} {problem}")


@dataclass(frozen=True)
class Inputs:
    """The tensor files to read, in order, each once; what else the inputs held."""

    files: tuple[Path, ...]
    not_read: tuple[NotRead, ...] = ()
    indexes: tuple[Index, ...] = field(default=())
    identities: Mapping[Path, Identity] = field(default_factory=dict)  # of each file, as found

    def check_indexes(self, names: Mapping[Path, Iterable[str]]) -> None:
        """Refuse when a shard does not hold the tensors its index lists (*names*: the tensor
        names read from each file)."""
        read_as = {n.path: n.same_as for n in self.not_read if n.same_as is not None}
        for index in self.indexes:
            index.check({**{p: names[k] for p, k in read_as.items()}, **names})

    def check_unchanged(self) -> None:
        """Refuse when a file changed since it was found."""
        for path in self.files:
            self.identities[path].check(path)


def resolve(paths: Sequence[str | Path]) -> Inputs:
    """The files that *paths* name: files as given, a directory's tensor files in name order
    (the rest listed as not read), the shards of a ``*.index.json`` in order."""
    files: list[Path] = []
    not_read: list[NotRead] = []
    indexes: list[Index] = []
    for path in map(Path, paths):
        if path.is_dir():
            found, left = _directory(path)
            files += found
            not_read += left
        elif path.name.endswith(INDEX_SUFFIX):
            index = read_index(path)
            indexes.append(index)
            files += index.shards
        else:
            files.append(path)
    if not files:
        raise InputError(", ".join(map(str, paths)), "holds no tensor files to read")
    kept, identities, duplicates = _once_each(files)
    return Inputs(tuple(kept), (*not_read, *duplicates), tuple(indexes), identities)


def _once_each(files: Sequence[Path]) -> tuple[list[Path], dict[Path, Identity], list[NotRead]]:
    """*files* with each file once, however it is named (paths, symbolic and hard links), its
    identity, and the other names, as not read."""
    first: dict[tuple[int, int], Path] = {}
    identities: dict[Path, Identity] = {}
    duplicates: list[NotRead] = []
    for path in files:
        identity = Identity.of(path)
        kept = first.setdefault(identity.file, path)
        if kept == path:
            identities.setdefault(path, identity)
        else:
            duplicates.append(NotRead(path, f"the same file as {kept}, read once", kept))
    return list(identities), identities, duplicates


def read_index(path: Path) -> Index:
    """A sharded checkpoint's index: its shards in the order they first appear."""
    shards: dict[str, list[str]] = {}
    for name, shard in _weight_map(path).items():
        shards.setdefault(shard, []).append(name_key(name))
    for shard in shards:
        _refuse_outside(path, shard)
    return Index(path, {path.parent / shard: frozenset(n) for shard, n in shards.items()})


def _refuse_outside(index: Path, shard: str) -> None:
    """An index (maybe from the internet) may name only files in its own folder, links
    resolved: not ../secret, /etc/passwd, or a link out of the folder."""
    folder = os.path.dirname(os.path.realpath(index))  # the folder the index really lies in
    found = os.path.realpath(index.parent / shard)
    if os.path.commonpath([folder, found]) != folder or found == folder:
        raise InputError(index, f"shard {shard!r} lies outside the index's folder ({found})")


def _weight_map(path: Path) -> dict[str, str]:
    """The ``weight_map`` of the index *path* (tensor name -> shard file name), read within
    limits: a regular file of at most MAX_INDEX_BYTES, JSON nested at most _INDEX_DEPTH deep."""
    with open_regular(path) as file, reading(path, "index"):
        raw = file.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise InputError(path, f"index is larger than the limit of {MAX_INDEX_BYTES:,} bytes")
    try:
        index = strict_json.load(raw, _INDEX_DEPTH)
    except strict_json.JsonLimitError as exc:
        raise InputError(path, f"not a sharded checkpoint index: it {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(path, "not a sharded checkpoint index (no weight_map object)")
    for name, shard in weight_map.items():
        if not _is_file_name(shard):
            raise InputError(
                path,
                f"not a sharded checkpoint index: weight_map gives tensor {strict_json.shown(name)}"
                f" the shard {strict_json.shown(shard)}, not a file name",
            )
    return weight_map


def _is_file_name(shard: object) -> bool:
    """Whether *shard* can name a file: a string, not empty, without NUL, of parts no longer
    than a file system allows (a name longer would only fail later, in a line as long)."""
    if not isinstance(shard, str) or not shard or "\0" in shard:
        return False
    encoded = shard.encode("utf-8", "surrogateescape")
    return len(encoded) < _PATH_MAX and all(len(p) <= _NAME_MAX for p in encoded.split(b"/"))


def _directory(folder: Path) -> tuple[list[Path], list[NotRead]]:
    """The tensor files of *folder* in name order, and its other entries with the reason."""
    files, others = [], []
    for path in sorted(folder.iterdir()):
        reason = _why_not_read(path)
        if reason is None:
            files.append(path)
        else:
            others.append(NotRead(path, reason))
    return files, others


def _why_not_read(path: Path) -> str | None:
    if path.is_dir():
        return "a directory (folders inside are not searched)"
    if path.name.endswith(INDEX_SUFFIX):
        return "a sharded checkpoint index (give it instead of the folder to check the shards)"
    try:
        detect_format(path)
    except InputError as exc:
        return exc.message
    return None
