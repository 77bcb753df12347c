"""Thresholds from history: the global norm of successive steps' dumps, and what it suggests."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .views import natural_key

PERCENTILES = (50.0, 90.0, 95.0, 99.0)
_SPARKS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Step:
    file: str
    step: int | None  # the last number in the file name, if any
    global_norm: float
    nonfinite: int


@dataclass(frozen=True)
class History:
    steps: tuple[Step, ...]
    norm_type: float
    percentiles: dict[str, float]  # "p50" -> value, over the finite norms
    percentile: float  # the one the suggestion uses
    suggested_max_norm: float | None
    max_norm: float | None = None
    would_clip: int | None = None  # steps whose norm exceeds max_norm

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
        }


def step_number(path: str | Path) -> int | None:
    numbers = re.findall(r"\d+", Path(path).name)
    return int(numbers[-1]) if numbers else None


def in_step_order(paths: Sequence[Path]) -> list[Path]:
    """By the number in each name (natural order) when every name has one, else as given."""
    if all(step_number(p) is not None for p in paths):
        return sorted(paths, key=lambda p: (step_number(p), natural_key(p.name)))
    return list(paths)


def summarise(
    steps: Sequence[Step], norm_type: float, percentile: float, max_norm: float | None
) -> History:
    finite = np.array([s.global_norm for s in steps if np.isfinite(s.global_norm)])
    marks = {f"p{p:g}": float(np.percentile(finite, p)) for p in PERCENTILES} if finite.size else {}
    suggested = float(np.percentile(finite, percentile)) if finite.size else None
    would_clip = None
    if max_norm is not None:
        would_clip = sum(1 for s in steps if not s.global_norm <= max_norm)
    return History(tuple(steps), norm_type, marks, percentile, suggested, max_norm, would_clip)


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
