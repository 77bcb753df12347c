"""gclip: global-norm gradient clipping and inspection for .npz, safetensors and HDF5 files.

    >>> import gclip_cli
    >>> report = gclip_cli.rescale_file("grads.safetensors", "clipped.safetensors", max_norm=1.0)
    >>> report.global_norm, report.scale, report.global_norm_after
    >>> gclip_cli.inspect_files(["ckpt/"], options=gclip_cli.Options(norm_type=1)).global_norm

The names below are imported on first use, so that ``gclip --help`` does not pay for NumPy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # one function per command
    "inspect_file": "api",
    "inspect_files": "api",
    "rescale_file": "api",
    "rescale_files": "api",
    "clip_value_file": "api",
    "clip_value_files": "api",
    "normalize_file": "api",
    "normalize_files": "api",
    "history_of": "api",
    "layer_history_of": "api",
    "diff_files": "api",
    "rewrite_file": "api",
    "rewrite_files": "api",
    "rescale_strategy": "api",
    # what they take
    "Options": "options",
    "NonFinite": "options",
    "DEFAULT_CHUNK_SIZE": "options",
    "GlobalNorm": "strategies",
    "PerTensor": "strategies",
    "Groups": "strategies",
    "Normalize": "strategies",
    "ClipValue": "strategies",
    "Strategy": "strategies",
    # what they give
    "InspectReport": "reports",
    "RewriteReport": "reports",
    "TensorReport": "reports",
    "History": "history",
    "LayerHistory": "layer_history",
    "Diff": "compare",
    # what they raise
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
    "rescale_files",
    "clip_value_file",
    "clip_value_files",
    "normalize_file",
    "normalize_files",
    "history_of",
    "layer_history_of",
    "diff_files",
    "rewrite_file",
    "rewrite_files",
    "rescale_strategy",
    "Options",
    "NonFinite",
    "DEFAULT_CHUNK_SIZE",
    "GlobalNorm",
    "PerTensor",
    "Groups",
    "Normalize",
    "ClipValue",
    "Strategy",
    "InspectReport",
    "RewriteReport",
    "TensorReport",
    "History",
    "LayerHistory",
    "Diff",
    "GclipError",
    "InputError",
    "NonFiniteError",
    "OutputError",
    "UsageError",
    "ExitCode",
    "__version__",
]

if TYPE_CHECKING:
    from .api import (
        clip_value_file,
        clip_value_files,
        diff_files,
        history_of,
        inspect_file,
        inspect_files,
        layer_history_of,
        normalize_file,
        normalize_files,
        rescale_file,
        rescale_files,
        rescale_strategy,
        rewrite_file,
        rewrite_files,
    )
    from .compare import Diff
    from .errors import (
        ExitCode,
        GclipError,
        InputError,
        NonFiniteError,
        OutputError,
        UsageError,
    )
    from .history import History
    from .layer_history import LayerHistory
    from .options import DEFAULT_CHUNK_SIZE, NonFinite, Options
    from .reports import InspectReport, RewriteReport, TensorReport
    from .strategies import ClipValue, GlobalNorm, Groups, Normalize, PerTensor, Strategy


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gclip_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
