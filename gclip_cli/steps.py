"""A dump's training step: from its metadata, a tensor, or its name (never its extension)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .formats import Metadata, WholeArrays

if TYPE_CHECKING:
    from .formats import TensorFile

STEP_KEYS = ("global_step", "step")  # in a file's metadata, or as a 0-d integer tensor
# "step", "iter" or "it" as a word of its own ("split3" is not "it3"), then its number:
# step12, step_12, step-12, iter=5, global_step12
_NAMED_STEP = re.compile(r"(?<![a-z])(?:step|iter|it)[_=-]?([0-9]+)", re.IGNORECASE)


@dataclass(frozen=True)
class FoundStep:
    """A file's training step, and where it was found."""

    value: int
    source: str  # "metadata", "tensor" or "name"


def step_of(tfile: TensorFile) -> FoundStep | None:
    """The training step *tfile* holds: a step entry of its metadata, else a 0-d integer
    tensor so named, else the number its file name gives (step_in_name)."""
    found = _step_in_metadata(tfile) or _step_tensor(tfile)
    if found is not None:
        return found
    value = step_in_name(tfile.path)
    return None if value is None else FoundStep(value, "name")


def _step_in_metadata(tfile: TensorFile) -> FoundStep | None:
    if isinstance(tfile, Metadata):
        for key in STEP_KEYS:
            value = _as_step(tfile.attribute(key))
            if value is not None:
                return FoundStep(value, "metadata")
    return None


def _step_tensor(tfile: TensorFile) -> FoundStep | None:
    if isinstance(tfile, WholeArrays):
        for key in STEP_KEYS:
            tensor = next((t for t in tfile.tensors if t.name == key and t.shape == ()), None)
            value = None if tensor is None or tensor.is_gradient else tfile.read_array(tensor)
            if value is not None and value.dtype.kind in "iu" and value.item() >= 0:
                return FoundStep(int(value.item()), "tensor")
    return None


def step_in_name(path: str | Path) -> int | None:
    """The number after step/iter/it in the name's stem, else the stem's last number: never
    one in the extension (``ckpt_10.h5`` is step 10, ``x_step12_bf16.safetensors`` 12)."""
    stem = Path(path).stem
    named = _NAMED_STEP.search(stem)
    if named:
        return int(named[1])
    numbers = re.findall(r"[0-9]+", stem)
    return int(numbers[-1]) if numbers else None


def _as_step(value: object) -> int | None:
    """*value* as a step: a non-negative integer, or a string of one (safetensors metadata
    holds strings only); else None."""
    if isinstance(value, np.ndarray):  # an HDF5 attribute may be an array of one
        value = value.reshape(()) if value.size == 1 else None
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.item()  # the Python int, str or bytes
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip()
        return int(text) if re.fullmatch(r"[0-9]+", text) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
