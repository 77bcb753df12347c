"""gclip: global-norm gradient clipping and inspection for .npz, safetensors and HDF5 files.

    >>> import gclip_cli
    >>> report = gclip_cli.rescale_file("grads.safetensors", "clipped.safetensors", max_norm=1.0)
    >>> report.global_norm, report.scale, report.global_norm_after

The names below are imported on first use, so that ``gclip --help`` does not pay for NumPy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "inspect_file": "api",
    "inspect_files": "api",
    "Options": "api",
    "rescale_file": "api",
    "DEFAULT_CHUNK_SIZE": "api",
    "Report": "report",
    "TensorReport": "report",
    "GclipError": "errors",
    "InputError": "errors",
    "NonFiniteError": "errors",
    "OutputError": "errors",
    "UsageError": "errors",
    "ExitCode": "errors",
}
__all__ = [  # noqa: RUF022 - grouped as in _EXPORTS
    "inspect_file",
    "inspect_files",
    "rescale_file",
    "Options",
    "DEFAULT_CHUNK_SIZE",
    "Report",
    "TensorReport",
    "GclipError",
    "InputError",
    "NonFiniteError",
    "OutputError",
    "UsageError",
    "ExitCode",
    "__version__",
]

if TYPE_CHECKING:
    from .api import DEFAULT_CHUNK_SIZE, Options, inspect_file, inspect_files, rescale_file
    from .errors import (
        ExitCode,
        GclipError,
        InputError,
        NonFiniteError,
        OutputError,
        UsageError,
    )
    from .report import Report, TensorReport


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gclip_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
