"""Ways to look at a report: sorted, the top N, or aggregated per layer."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, TypeVar

from .errors import UsageError
from .norms import p_norm_of

SORT_KEYS = ("name", "norm", "size", "file", "nonfinite")
LAYER_SORT_KEYS = (
    "name",
    "norm",
    "size",
    "nonfinite",
)  # a layer's tensors may lie in several files
_SEPARATORS = re.compile(r"[./]")
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class View:
    """How to present a report's tensors."""

    sort: str | None = None  # one of SORT_KEYS; None keeps file order
    top: int | None = None
    by_layer: bool = False
    depth: int | None = None  # with by_layer: group by the first N name components

    def __post_init__(self) -> None:
        if self.by_layer:
            check_layer_sort(self.sort)


PLAIN = View()  # tensors as in the file


@dataclass(frozen=True)
class LayerReport:
    name: str
    tensors: int
    numel: int
    norm: float | None
    share: float | None
    nonfinite: int = 0  # NaN/Inf values in its tensors

    def to_dict(self) -> dict:
        norm = self.norm if self.norm is not None and math.isfinite(self.norm) else None
        return asdict(self) | {"norm": norm}


class Tensor(Protocol):
    """What views read of a report's tensor."""

    name: str
    file: str | None
    numel: int
    nbytes: int
    norm: float | None
    share: float | None

    @property
    def nonfinite(self) -> int: ...


class Report(Protocol):
    """What views read of a report."""

    norm_type: float
    tensors: Sequence[Tensor]

    @property
    def counted(self) -> Sequence[Tensor]: ...


Row = TypeVar("Row", Tensor, LayerReport)


def natural_key(text: str) -> tuple[object, ...]:
    """Sort key in which numbers compare as numbers: h.2 before h.10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def sort_tensors(report: Report, key: str | None, top: int | None) -> list[Tensor]:
    """The report's tensors in file order, or sorted by *key* (size: bytes), cut to the *top* N."""
    return _sorted_cut(report.tensors, key, top, size=lambda tensor: tensor.nbytes)


def sort_layers(
    layers: Sequence[LayerReport], key: str | None, top: int | None
) -> list[LayerReport]:
    """*layers* as given, or sorted by *key* (size: values), cut to the *top* N."""
    check_layer_sort(key)
    return _sorted_cut(layers, key, top, size=lambda layer: layer.numel)


def tensor_rows(report: Report, view: View) -> list[Tensor]:
    """The tensors *view* shows, in its order."""
    return sort_tensors(report, view.sort, view.top)


def layer_rows(report: Report, view: View) -> list[LayerReport]:
    """The layers *view* shows (``--by-layer``): in natural order of their names by default."""
    return sort_layers(by_layer(report, view.depth), view.sort, view.top)


def check_layer_sort(key: str | None) -> None:
    if key is not None and key not in LAYER_SORT_KEYS:
        raise UsageError(
            None,
            f"--sort {key} has no meaning with --by-layer (a layer's tensors may lie in "
            "several files); sort layers by name, norm, size or nonfinite",
        )


def _sorted_cut(
    rows: Sequence[Row], key: str | None, top: int | None, size: Callable[[Row], int]
) -> list[Row]:
    """*rows* in their order, or sorted by *key*: names and files in natural order, norms,
    sizes and NaN/Inf counts largest first (unknown and NaN norms last); ties keep their order.
    Then the first *top*."""
    sort_key: Callable[[Row], object] | None = {
        None: None,
        "name": lambda row: natural_key(row.name),
        "norm": lambda row: _largest_first(row.norm),
        "size": lambda row: -size(row),
        "file": lambda row: natural_key(row.file or ""),
        "nonfinite": lambda row: -row.nonfinite,
    }[key]
    ordered = list(rows) if sort_key is None else sorted(rows, key=sort_key)
    return ordered if top is None else ordered[:top]


def _largest_first(norm: float | None) -> tuple[int, float]:
    if norm is None or math.isnan(norm):
        return (1, 0.0)
    return (0, -norm)


def layer_of(name: str, depth: int | None = None) -> str:
    """The layer a tensor belongs to, as a prefix of its name.

    By default: up to and including the first numeric component (``h.3.mlp.c_fc.bias`` ->
    ``h.3``), or the first component when there is none.  With *depth*: the first *depth*
    components.  ``.`` and ``/`` both separate components.
    """
    bounds = [m.end() for m in _SEPARATORS.finditer(name)] + [len(name) + 1]
    parts = _SEPARATORS.split(name)
    if depth is None:
        numeric = next((i for i, part in enumerate(parts) if _NUMBER.fullmatch(part)), 0)
        count = numeric + 1
    else:
        count = max(1, depth)
    count = min(count, len(parts))
    return name[: bounds[count - 1] - 1]


def by_layer(report: Report, depth: int | None = None) -> list[LayerReport]:
    """Counted tensors grouped by layer, in natural order of the layer names."""
    groups: dict[str, list[Tensor]] = {}
    for tensor in report.counted:
        groups.setdefault(layer_of(tensor.name, depth), []).append(tensor)
    return [
        LayerReport(
            name=name,
            tensors=len(members),
            numel=sum(t.numel for t in members),
            norm=_combined_norm([t.norm for t in members], report.norm_type),
            share=None
            if any(t.share is None for t in members)
            else math.fsum(t.share for t in members),
            nonfinite=sum(t.nonfinite for t in members),
        )
        for name, members in sorted(groups.items(), key=lambda item: natural_key(item[0]))
    ]


def _combined_norm(norms: Sequence[float | None], p: float) -> float | None:
    """The p-norm of tensors taken together, from their norms (scaled: no overflow or
    underflow; inf where it exceeds float64's range)."""
    if any(n is None for n in norms):
        return None
    if any(math.isnan(n) for n in norms):
        return math.nan
    return p_norm_of(((1, n) for n in norms), p)
