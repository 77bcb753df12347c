"""Thresholds from history: the global norm of successive steps' dumps, and what it suggests."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .formats import TensorFile

PERCENTILES = (50.0, 90.0, 95.0, 99.0)
_SPARKS = "▁▂▃▄▅▆▇█"
STEP_KEYS = ("global_step", "step")  # in a file's metadata, or as a 0-d integer tensor
# "step", "iter" or "it" as a word of its own ("split3" is not "it3"), then its number:
# step12, step_12, step-12, iter=5, global_step12
_NAMED_STEP = re.compile(r"(?<![a-z])(?:step|iter|it)[_=-]?([0-9]+)", re.IGNORECASE)


@dataclass(frozen=True)
class FoundStep:
    """A file's training step, and where it was found."""

    value: int
    source: str  # "metadata", "tensor" or "name"


@dataclass(frozen=True)
class Step:
    file: str
    step: int | None  # None only with as_given, when the file does not tell
    global_norm: float
    nonfinite: int
    step_source: str | None = None  # FoundStep.source


@dataclass(frozen=True)
class History:
    steps: tuple[Step, ...]
    norm_type: float
    percentiles: dict[str, float]  # "p50" -> value, over the finite norms
    percentile: float  # the one the suggestion uses
    suggested_max_norm: float | None
    max_norm: float | None = None
    would_clip: int | None = None  # steps whose norm exceeds max_norm
    nonfinite_policy: str = "error"

    @property
    def nonfinite(self) -> int:
        """NaN/Inf values counted over every step."""
        return sum(s.nonfinite for s in self.steps)

    def shown_as(self, names: Mapping[str, str]) -> History:
        """This history with the files in *names* shown by those names (``<stdin>``)."""
        steps = tuple(replace(s, file=names.get(s.file, s.file)) for s in self.steps)
        return replace(self, steps=steps)

    def to_dict(self) -> dict:
        from .report import SCHEMA_VERSION

        return {
            "schema_version": SCHEMA_VERSION,
            "norm_type": "inf" if np.isinf(self.norm_type) else self.norm_type,
            "steps": [
                s.__dict__ | {"global_norm": _finite_or_none(s.global_norm)} for s in self.steps
            ],
            "percentiles": self.percentiles,
            "percentile": self.percentile,
            "suggested_max_norm": self.suggested_max_norm,
            "max_norm": self.max_norm,
            "would_clip": self.would_clip,
            "nonfinite_policy": self.nonfinite_policy,
        }


def step_of(tfile: TensorFile) -> FoundStep | None:
    """The training step *tfile* holds: a step entry of its metadata, else a 0-d integer
    tensor so named, else the number its file name gives (step_in_name)."""
    for key in STEP_KEYS:
        value = _as_step(tfile.attribute(key))
        if value is not None:
            return FoundStep(value, "metadata")
    for key in STEP_KEYS:
        tensor = next((t for t in tfile.tensors if t.name == key and t.shape == ()), None)
        value = None if tensor is None or tensor.is_gradient else tfile.read_array(tensor)
        if value is not None and value.dtype.kind in "iu" and value.item() >= 0:
            return FoundStep(int(value.item()), "tensor")
    value = step_in_name(tfile.path)
    return None if value is None else FoundStep(value, "name")


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


def summarise(
    steps: Sequence[Step],
    norm_type: float,
    percentile: float,
    max_norm: float | None,
    nonfinite_policy: str = "error",
) -> History:
    finite = np.array([s.global_norm for s in steps if np.isfinite(s.global_norm)])
    marks = {f"p{p:g}": float(np.percentile(finite, p)) for p in PERCENTILES} if finite.size else {}
    suggested = float(np.percentile(finite, percentile)) if finite.size else None
    would_clip = None
    if max_norm is not None:
        would_clip = sum(1 for s in steps if not s.global_norm <= max_norm)
    return History(
        tuple(steps),
        norm_type,
        marks,
        percentile,
        suggested,
        max_norm,
        would_clip,
        nonfinite_policy,
    )


def sparkline(values: Sequence[float]) -> str:
    """One character a value, its height by value between the smallest and the largest."""
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return "?" * len(values)
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    return "".join(_SPARKS[round((v - low) / span * 7)] if np.isfinite(v) else "!" for v in values)


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


def plot(history: History, path: Path) -> None:
    """A chart of the global norm per step, with the suggested (and given) max norm."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import UsageError

        raise UsageError(None, "--plot needs matplotlib: pip install 'gclip[plot]'") from None
    xs = [s.step if s.step is not None else i for i, s in enumerate(history.steps)]
    figure, axes = plt.subplots(figsize=(8, 3.5))
    axes.plot(xs, [s.global_norm for s in history.steps], marker=".", label="global norm")
    if history.suggested_max_norm is not None:
        axes.axhline(
            history.suggested_max_norm,
            color="tab:orange",
            linestyle="--",
            label=f"p{history.percentile:g} = {history.suggested_max_norm:.4g}",
        )
    if history.max_norm is not None:
        axes.axhline(history.max_norm, color="tab:red", label=f"max norm {history.max_norm:g}")
    axes.set_xlabel("step")
    axes.set_ylabel("global norm")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
