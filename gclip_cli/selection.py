"""Which tensors count: --include/--exclude globs, raw values read as a named type, and the
refusals that keep a selection honest (a glob that matches nothing, nothing left to count)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from .dtypes import describe_dtype
from .errors import InputError, UsageError
from .formats import TensorInfo

NOT_INCLUDED = "not matched by --include"
EXCLUDED = "excluded by --exclude"
_SHOWN = 3  # tensor names quoted in a message; the rest are counted


def name_key(name: str) -> str:
    """*name* with ``/`` read as ``.``: an HDF5 path and a safetensors key name a tensor alike
    (``model/layers/0/w`` and ``model.layers.0.w``)."""
    return name.replace("/", ".")


def matches(name: str, glob: str) -> bool:
    """Whether tensor *name* matches *glob*, ``.`` and ``/`` alike in both."""
    return fnmatchcase(name_key(name), name_key(glob))


def select(
    tensors: Sequence[TensorInfo], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[TensorInfo]:
    """*tensors* with those not selected marked skipped: not counted, copied untouched.

    A tensor is selected when it matches some *include* glob (or there are none) and no
    *exclude* glob.
    """
    return [_apply(t, include, exclude) for t in tensors]


def _apply(tensor: TensorInfo, include: Sequence[str], exclude: Sequence[str]) -> TensorInfo:
    if not (tensor.is_gradient or tensor.opaque_itemsize):
        return tensor
    if include and not any(matches(tensor.name, glob) for glob in include):
        return _deselected(tensor, NOT_INCLUDED)
    matched = next((glob for glob in exclude if matches(tensor.name, glob)), None)
    if matched is not None:
        return _deselected(tensor, f"{EXCLUDED} {matched}")
    return tensor


def _deselected(tensor: TensorInfo, reason: str) -> TensorInfo:
    return replace(tensor, dtype=None, skip_reason=reason, opaque_itemsize=0)


def read_opaque_as(
    tensors: Sequence[TensorInfo], dtypes: Mapping[int, np.dtype]
) -> list[TensorInfo]:
    """*tensors* with raw (opaque) values of an item size in *dtypes* read as that type."""
    return [
        _typed(t, dtypes[t.opaque_itemsize]) if t.opaque_itemsize in dtypes else t for t in tensors
    ]


def _typed(tensor: TensorInfo, dtype: np.dtype) -> TensorInfo:
    return replace(
        tensor,
        dtype=dtype,
        dtype_name=f"{describe_dtype(dtype)} (raw)",
        skip_reason=None,
        opaque_itemsize=0,
    )


def refuse_opaque(path: Path, tensors: Sequence[TensorInfo]) -> None:
    """Refuse raw values of unrecorded type that are selected: they are usually bfloat16 or
    float8 gradients, which skipping would leave out of the norm and unscaled."""
    raw = [t for t in tensors if t.opaque_itemsize]
    if not raw:
        return
    kinds = "bfloat16" if raw[0].opaque_itemsize == 2 else "float8_e4m3fn, float8_e5m2, ..."
    raise InputError(
        path,
        f"{_quoted([t.name for t in raw])} hold{'s' if len(raw) == 1 else ''} raw "
        f"{raw[0].opaque_itemsize}-byte values of unrecorded type (as np.savez and h5py store "
        f"bfloat16 and float8): name their type with --opaque-dtype ({kinds}), or leave "
        "them out with --exclude",
    )


def check_globs(names: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> None:
    """A usage error for an --include or --exclude glob that matches no tensor of *names*
    (every tensor of every input, counted or not)."""
    for option, globs in (("--include", include), ("--exclude", exclude)):
        for glob in globs:
            if not any(matches(name, glob) for name in names):
                raise UsageError(
                    None, f"{option} {glob!r} matches no tensor; names look like {_examples(names)}"
                )


def require_counted(where: str | Path, tensors: Sequence[tuple[str, str | None]]) -> None:
    """Refuse to answer about the (name, why not counted, or None if counted) *tensors* when
    none is counted: a norm of 0 would claim that values were read which were not."""
    if any(reason is None for _, reason in tensors):
        return
    if not tensors:
        raise InputError(where, "holds no tensors: nothing to measure")
    names = [name for name, _ in tensors]
    if any(reason.startswith((NOT_INCLUDED, EXCLUDED)) for _, reason in tensors):
        raise UsageError(
            None,
            f"--include/--exclude leave no tensor to count; names look like {_examples(names)}",
        )
    reasons = "; ".join(f"{name!r}: {reason}" for name, reason in tensors[:_SHOWN])
    more = f"; and {len(tensors) - _SHOWN} more" if len(tensors) > _SHOWN else ""
    raise InputError(where, f"holds no floating-point tensor to measure ({reasons}{more})")


def counted_or_why(tensors: Sequence[TensorInfo]) -> list[tuple[str, str | None]]:
    """(name, None) for each counted tensor, (name, why not) for the others."""
    return [(t.name, None if t.is_gradient else t.skip_reason or "not counted") for t in tensors]


def _examples(names: Sequence[str]) -> str:
    if not names:
        return "nothing (there are no tensors)"
    more = ", ..." if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


def _quoted(names: Sequence[str]) -> str:
    more = f" and {len(names) - _SHOWN} more tensors" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more
