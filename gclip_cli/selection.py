"""Which tensors count: --include/--exclude globs, and which files an input names."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path

from .errors import InputError
from .formats import TensorInfo, detect_format

INDEX_SUFFIX = ".index.json"


def select(
    tensors: Sequence[TensorInfo], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[TensorInfo]:
    """*tensors* with those not selected marked skipped: not counted, copied untouched.

    A tensor is selected when it matches some *include* glob (or there are none) and no
    *exclude* glob.
    """
    return [_apply(t, include, exclude) for t in tensors]


def name_key(name: str) -> str:
    """*name* with ``/`` read as ``.``: an HDF5 path and a safetensors key name a tensor alike
    (``model/layers/0/w`` and ``model.layers.0.w``)."""
    return name.replace("/", ".")


def matches(name: str, glob: str) -> bool:
    """Whether tensor *name* matches *glob*, ``.`` and ``/`` alike in both."""
    return fnmatchcase(name_key(name), name_key(glob))


def _apply(tensor: TensorInfo, include: Sequence[str], exclude: Sequence[str]) -> TensorInfo:
    if not tensor.is_gradient:
        return tensor
    if include and not any(matches(tensor.name, glob) for glob in include):
        return replace(tensor, dtype=None, skip_reason="not matched by --include")
    matched = next((glob for glob in exclude if matches(tensor.name, glob)), None)
    if matched is not None:
        return replace(tensor, dtype=None, skip_reason=f"excluded by --exclude {matched}")
    return tensor


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """The files that *paths* name: files as given, a directory's files of a known format in
    name order (others, such as READMEs and scripts, left out), and the shards of a
    ``*.index.json`` in order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if _is_data_file(p))
        elif path.name.endswith(INDEX_SUFFIX):
            files += index_shards(path)
        else:
            files.append(path)
    if not files:
        raise InputError(", ".join(map(str, paths)), "no files to read")
    return list(dict.fromkeys(files))  # each file once


def index_shards(index: Path) -> list[Path]:
    """The shard files of a sharded checkpoint's index, in the order they first appear."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = dict.fromkeys(weight_map.values())
    except FileNotFoundError:
        raise InputError(index, "no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(index, f"not a sharded checkpoint index ({exc})") from None
    return [index.parent / shard for shard in shards]


def _is_data_file(path: Path) -> bool:
    if not path.is_file() or path.name.startswith(".") or path.name.endswith(INDEX_SUFFIX):
        return False
    try:
        detect_format(path)
    except InputError:
        return False
    return True
