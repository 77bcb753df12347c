"""Which layer explodes, and when: the step x layer matrix of norms over a run of dumps, and
the steps where a layer's norm leaves its own history.

A layer (views.layer_of: the name up to its first number, or its first *depth* components) is
*anomalous* at a step when its norm exceeds *spike* times the median of its own norms at its
earlier steps, from its third step on (so the median is of two norms at least), or when its
norm is NaN/Inf (the values hold NaN/Inf, under ``--nonfinite error``).  The run's first
anomaly is the earliest step with one; of several layers there, the one furthest above its
baseline.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .engine import combine, norm_share
from .errors import UsageError
from .norms import NormStats
from .options import NonFinite, Options
from .progress import SILENT, Progress
from .views import layer_of, natural_key

if TYPE_CHECKING:
    from .history import Step
    from .pipeline import Measured
    from .sources import Inputs

SPIKE = 4.0  # the default: a norm above 4x the median of the layer's earlier steps
_EARLIER = 2  # norms a median needs: a layer is judged from its third step on


@dataclass(frozen=True)
class Anomaly:
    """A layer's norm at a step (its *index* among the run's steps) against its *baseline*,
    the median of its earlier norms (None when there were too few, for a NaN/Inf norm)."""

    layer: str
    index: int
    step: int | None
    norm: float
    baseline: float | None

    @property
    def ratio(self) -> float:
        """How far above its baseline the norm is (inf for NaN/Inf or a baseline of 0)."""
        if not math.isfinite(self.norm) or not self.baseline:
            return math.inf
        return self.norm / self.baseline

    def to_dict(self) -> dict:
        norm = self.norm if math.isfinite(self.norm) else None
        return {"layer": self.layer, "step": self.step, "norm": norm, "baseline": self.baseline}


@dataclass(frozen=True)
class LayerSeries:
    """One layer's norm and share of the step's sum of |x|**p at every step (None where the
    step's dump lacks the layer), and the steps where it is anomalous."""

    name: str
    norms: tuple[float | None, ...]
    shares: tuple[float | None, ...]
    anomalies: tuple[Anomaly, ...]

    @property
    def first_anomaly(self) -> Anomaly | None:
        return self.anomalies[0] if self.anomalies else None

    def to_dict(self) -> dict:
        first = self.first_anomaly
        return {
            "name": self.name,
            "norms": [_finite_or_none(n) for n in self.norms],
            "shares": list(self.shares),
            "first_anomaly_step": None if first is None else first.step,
            "anomaly_steps": [a.step for a in self.anomalies],
        }


@dataclass(frozen=True)
class LayerHistory:
    """history --by-layer: the run's steps in order, and every layer's series (in natural
    order of their names)."""

    steps: tuple[Step, ...]
    layers: tuple[LayerSeries, ...]
    norm_type: float
    spike: float = SPIKE
    depth: int | None = None
    nonfinite_policy: NonFinite = NonFinite.ERROR

    @property
    def nonfinite(self) -> int:
        """NaN/Inf values counted over every step."""
        return sum(s.nonfinite for s in self.steps)

    @property
    def first_anomaly(self) -> Anomaly | None:
        """The earliest anomaly of the run; at one step, the layer furthest above baseline."""
        firsts = [layer.first_anomaly for layer in self.layers if layer.first_anomaly]
        return min(firsts, key=lambda a: (a.index, -a.ratio), default=None)

    def by_first_anomaly(self) -> list[LayerSeries]:
        """The layers, anomalous earliest first (at one step, furthest above its median
        first), then the others, by name."""
        return sorted(self.layers, key=_first_anomaly_order)

    def shown_as(self, names: Mapping[str, str]) -> LayerHistory:
        """This history with the files in *names* shown by those names (``<stdin>``)."""
        steps = tuple(replace(s, file=names.get(s.file, s.file)) for s in self.steps)
        return replace(self, steps=steps)

    def to_dict(self, view: object = None) -> dict:
        """The history as one JSON-ready object (*view*: none applies to it)."""
        from .reports import SCHEMA_VERSION

        first = self.first_anomaly
        return {
            "schema_version": SCHEMA_VERSION,
            "norm_type": "inf" if math.isinf(self.norm_type) else self.norm_type,
            "spike": self.spike,
            "depth": self.depth,
            "steps": [s.step for s in self.steps],
            "files": [s.file for s in self.steps],
            "global_norms": [_finite_or_none(s.global_norm) for s in self.steps],
            "layers": [layer.to_dict() for layer in self.layers],
            "first_anomaly": None if first is None else first.to_dict(),
            "nonfinite": self.nonfinite,
            "nonfinite_policy": NonFinite(self.nonfinite_policy).value,
        }

    def rows(self, view: object = None) -> tuple[str, list[dict]]:
        """One row per step and layer, for JSON Lines and CSV."""
        return "layer_step", [
            {
                "step": step.step,
                "file": step.file,
                "layer": layer.name,
                "norm": _finite_or_none(layer.norms[i]),
                "share": layer.shares[i],
                "anomaly": any(a.index == i for a in layer.anomalies),
            }
            for i, step in enumerate(self.steps)
            for layer in self.layers
        ]


def _first_anomaly_order(layer: LayerSeries) -> tuple[object, ...]:
    """Anomalous first, earliest first; at one step, furthest above its median first."""
    first = layer.first_anomaly
    if first is None:
        return (True, 0, 0.0, natural_key(layer.name))
    return (False, first.index, -first.ratio, natural_key(layer.name))


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class Baseline:
    """A layer's norms so far, which judge its next one: anomalous when above *spike* x the
    median of the earlier finite ones (at least _EARLIER of them), or NaN/Inf."""

    def __init__(self, spike: float) -> None:
        self.spike = spike
        self._earlier: list[float] = []

    def judge(self, norm: float) -> tuple[bool, float | None]:
        """Whether *norm* is anomalous, and the median it was held against; then it joins
        the earlier norms (if finite)."""
        earlier = self._earlier
        baseline = statistics.median(earlier) if len(earlier) >= _EARLIER else None
        if not math.isfinite(norm):
            return True, baseline
        earlier.append(norm)
        return baseline is not None and norm > self.spike * baseline, baseline


def spikes(norms: Sequence[float | None], spike: float) -> list[tuple[int, float | None]]:
    """(position, baseline) of each anomalous norm of a layer's series (see Baseline).
    None: a step without the layer."""
    baseline, found = Baseline(spike), []
    for i, norm in enumerate(norms):
        if norm is not None:
            anomalous, median = baseline.judge(norm)
            if anomalous:
                found.append((i, median))
    return found


def layer_history(
    inputs: Inputs,
    options: Options,
    *,
    spike: float = SPIKE,
    depth: int | None = None,
    as_given: bool = False,
    progress: Progress = SILENT,
) -> LayerHistory:
    """The layers' norms at each step of the files *inputs* name (see api.layer_history_of)."""
    from .history import ordered_steps

    if not 0 < spike < math.inf:
        raise UsageError(None, f"--spike must be a finite number > 0, not {spike}")
    ordered = ordered_steps(inputs, options, as_given, progress)
    per_step = [layers_of(measured, options.norm_type, depth) for _, measured in ordered]
    steps = tuple(step for step, _ in ordered)
    names = sorted({name for layers in per_step for name in layers}, key=natural_key)
    series = tuple(_series(name, per_step, steps, options, spike) for name in names)
    return LayerHistory(steps, series, options.norm_type, spike, depth, options.nonfinite)


def layers_of(measured: Measured, norm_type: float, depth: int | None) -> dict[str, NormStats]:
    """The statistics of each layer of one file: its counted tensors' taken together."""
    members: dict[str, list[NormStats | None]] = {}
    for tensor, stats in zip(measured.tensors, measured.stats, strict=True):
        if stats is not None:
            members.setdefault(layer_of(tensor.name, depth), []).append(stats)
    return {name: combine(parts, norm_type) for name, parts in members.items()}


def _series(
    name: str,
    per_step: Sequence[dict[str, NormStats]],
    steps: Sequence[Step],
    options: Options,
    spike: float,
) -> LayerSeries:
    norms, shares = [], []
    for layers in per_step:
        stats = layers.get(name)
        norms.append(None if stats is None else options.norm(stats))
        shares.append(None if stats is None else _share(stats, layers, options))
    anomalies = tuple(
        Anomaly(name, i, steps[i].step, norms[i], baseline) for i, baseline in spikes(norms, spike)
    )
    return LayerSeries(name, tuple(norms), tuple(shares), anomalies)


def _share(stats: NormStats, layers: dict[str, NormStats], options: Options) -> float | None:
    """The layer's share of the step's sum of |x|**p; None where the step's norm counts
    NaN/Inf (it is then NaN/inf, and shares of it mean nothing)."""
    total = combine(list(layers.values()), options.norm_type)
    if total.nonfinite and options.nonfinite is NonFinite.ERROR:
        return None
    return norm_share(stats, total)


def plot(history: LayerHistory, path: Path) -> None:
    """A heatmap of the norms, layers by steps on a log colour scale, the first anomaly
    circled."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.colors import LogNorm
    except ImportError:
        raise UsageError(None, "--plot needs matplotlib: pip install 'gclip[plot]'") from None
    grid = np.array(
        [
            [n if n is not None and 0 < n < math.inf else np.nan for n in s.norms]
            for s in history.layers
        ]
    )
    shown = grid[np.isfinite(grid)]
    figure, axes = plt.subplots(figsize=(8, min(12, 1.5 + 0.3 * len(history.layers))))
    colour = LogNorm(shown.min(), shown.max()) if shown.size else None
    image = axes.imshow(np.ma.masked_invalid(grid), aspect="auto", norm=colour, cmap="viridis")
    figure.colorbar(image, ax=axes, label="norm (log scale)")
    labels = [str(s.step if s.step is not None else i) for i, s in enumerate(history.steps)]
    axes.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 20 else 0)
    axes.set_yticks(range(len(history.layers)), [s.name for s in history.layers])
    first = history.first_anomaly
    if first is not None:
        row = next(i for i, s in enumerate(history.layers) if s.name == first.layer)
        axes.plot(first.index, row, "o", markersize=14, markerfacecolor="none", color="red")
    axes.set_xlabel("step")
    axes.set_title(
        "norm per layer and step" + ("" if first is None else " (first anomaly circled)")
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
