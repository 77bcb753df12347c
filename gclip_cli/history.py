"""Thresholds from history: the global norm of successive steps' dumps, and what it suggests."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .engine import combine
from .errors import UsageError
from .options import NonFinite, Options
from .progress import SILENT, Progress
from .selection import counted_or_why, require_counted

if TYPE_CHECKING:
    from .pipeline import Measured
    from .sources import Inputs

PERCENTILES = (50.0, 90.0, 95.0, 99.0)
_SPARKS = "▁▂▃▄▅▆▇█"


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
    nonfinite_policy: NonFinite = NonFinite.ERROR

    @property
    def nonfinite(self) -> int:
        """NaN/Inf values counted over every step."""
        return sum(s.nonfinite for s in self.steps)

    def shown_as(self, names: Mapping[str, str]) -> History:
        """This history with the files in *names* shown by those names (``<stdin>``)."""
        steps = tuple(replace(s, file=names.get(s.file, s.file)) for s in self.steps)
        return replace(self, steps=steps)

    def to_dict(self, view: object = None) -> dict:
        """The history as one JSON-ready object (*view*: none applies to it)."""
        from .reports import SCHEMA_VERSION

        return {
            "schema_version": SCHEMA_VERSION,
            "norm_type": "inf" if np.isinf(self.norm_type) else self.norm_type,
            "steps": self.rows()[1],
            "percentiles": self.percentiles,
            "percentile": self.percentile,
            "suggested_max_norm": self.suggested_max_norm,
            "max_norm": self.max_norm,
            "would_clip": self.would_clip,
            "nonfinite_policy": NonFinite(self.nonfinite_policy).value,
        }

    def rows(self, view: object = None) -> tuple[str, list[dict]]:
        """One row per step, for JSON Lines and CSV."""
        return "step", [
            asdict(s) | {"global_norm": _finite_or_none(s.global_norm)} for s in self.steps
        ]


def history(
    inputs: Inputs,
    options: Options,
    *,
    percentile: float = 95.0,
    max_norm: float | None = None,
    as_given: bool = False,
    progress: Progress = SILENT,
) -> History:
    """The history of the files *inputs* name, one step each (see api.history_of)."""
    if not 0 <= percentile <= 100:
        raise UsageError(None, f"percentile must lie in [0, 100], not {percentile}")
    steps = [step for step, _ in ordered_steps(inputs, options, as_given, progress)]
    return summarise(steps, options.norm_type, percentile, max_norm, options.nonfinite)


def ordered_steps(
    inputs: Inputs, options: Options, as_given: bool, progress: Progress = SILENT
) -> list[tuple[Step, Measured]]:
    """Each file's step and what pass 1 found in it, in step order unless *as_given*."""
    from .pipeline import measure

    measurement = measure(inputs, options, with_step=True, progress=progress)
    steps = [(_step(m, options, as_given), m) for m in measurement.files]
    if not as_given:
        _refuse_twins([step for step, _ in steps])
        steps.sort(key=lambda pair: pair[0].step)
    return steps


def _step(measured: Measured, options: Options, as_given: bool) -> Step:
    """One file's step: its global norm, and the step it holds (needed unless *as_given*)."""
    src, found = measured.path, measured.step
    if found is None and not as_given:
        raise UsageError(
            None,
            f"{src}: no step found (no step or global_step in its metadata or tensors, no "
            "number in its name); give --as-given to keep the order of the command line",
        )
    require_counted(src, counted_or_why(measured.tensors))  # no norm of 0 for nothing
    total = combine(measured.stats, options.norm_type)
    value, source = (None, None) if found is None else (found.value, found.source)
    return Step(str(src), value, options.norm(total), total.nonfinite, source)


def _refuse_twins(steps: Sequence[Step]) -> None:
    """Ordering by step needs one step per file, each its own."""
    first: dict[int | None, Step] = {}
    for step in steps:
        twin = first.setdefault(step.step, step)
        if twin is not step:
            sources = dict.fromkeys((twin.step_source, step.step_source))
            raise UsageError(
                None,
                f"{twin.file} and {step.file} both hold step {step.step} (from their "
                f"{' and '.join(map(str, sources))}); give --as-given to keep the order of "
                "the command line",
            )


def summarise(
    steps: Sequence[Step],
    norm_type: float,
    percentile: float,
    max_norm: float | None,
    nonfinite_policy: NonFinite = NonFinite.ERROR,
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


def log_sparkline(values: Sequence[float | None]) -> str:
    """One character a value, its height by log(value) between the smallest and the largest
    positive ones: a spike of 100x stands out beside steps of 1 to 2x.  Zero is the lowest,
    a missing value a space, NaN/Inf ``!``."""
    logs = [math.log(v) for v in values if v is not None and 0 < v < math.inf]
    low, high = (min(logs), max(logs)) if logs else (0.0, 0.0)
    span = (high - low) or 1.0

    def spark(value: float | None) -> str:
        if value is None:
            return " "
        if not np.isfinite(value):
            return "!"
        if value <= 0:
            return _SPARKS[0]
        return _SPARKS[round((math.log(value) - low) / span * 7)]

    return "".join(map(spark, values))


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


def plot(history: History, path: Path) -> None:
    """A chart of the global norm per step, with the suggested (and given) max norm."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
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
