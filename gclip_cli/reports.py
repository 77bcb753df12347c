"""What the commands found, one kind of report each, as plain data a Python caller, a table or
JSON can use: InspectReport (inspect, norm, check), RewriteReport (rescale, clip-value,
normalize); history.History and compare.Diff are the other two kinds.

Every kind has one JSON-able form, to_dict(), and rows(): its rows (tensors, layers, steps)
as JSON-able dicts for JSON Lines and CSV, with the kind of row they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from .engine import combine, norm_share
from .formats import TensorInfo
from .norms import NormStats
from .options import NonFinite
from .strategies import GroupReport, Strategy

if TYPE_CHECKING:
    from .views import View

SCHEMA_VERSION = 1  # of the JSON: raised when a field changes meaning or goes away


@dataclass(frozen=True)
class TensorReport:
    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    skipped: str | None  # why the tensor is not counted; None when it is
    norm: float | None = None  # NaN/inf when the tensor holds NaN/inf values
    max_abs: float | None = None  # of the finite values
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    first_nonfinite: tuple[int, ...] | None = None  # its index, one entry per dimension
    share: float | None = None  # of the global sum of |x|**p
    norm_after: float | None = None  # rewrites: the norm of the values written
    file: str | None = None
    scale: float | None = None  # rewrites: the factor this tensor was multiplied by
    clamped: int | None = None  # clip-value: how many values were clamped

    @property
    def inf(self) -> int:
        return self.posinf + self.neginf

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    def to_dict(self) -> dict:
        """What every report says of a tensor (rewrites add theirs)."""
        fields = asdict(self)
        for key in ("norm_after", "scale", "clamped"):
            del fields[key]
        fields["shape"] = list(self.shape)
        first = self.first_nonfinite
        fields["first_nonfinite"] = None if first is None else list(first)
        for key in ("norm", "max_abs"):
            fields[key] = json_number(fields[key])
        # inf (+Inf and -Inf together, as before they were told apart) stays, after nan
        items = list(fields.items())
        items.insert(list(fields).index("nan") + 1, ("inf", self.inf))
        return dict(items)


@dataclass(frozen=True)
class _FilesReport:
    """What the inputs held: every tensor, counted or not and why, and the global norm."""

    path: str  # the file, or "N files"
    file_format: str  # the formats read, comma-separated
    norm_type: float
    global_norm: float
    tensors: tuple[TensorReport, ...]
    files: tuple[str, ...] = ()
    nonfinite_policy: NonFinite = NonFinite.ERROR
    not_read: tuple[tuple[str, str], ...] = ()  # (path, why): what the inputs held, unread

    def __post_init__(self) -> None:  # the enum from its value too ("error")
        object.__setattr__(self, "nonfinite_policy", NonFinite(self.nonfinite_policy))

    def shown_as(self, names: Mapping[str, str]):  # -> the same kind of report
        """This report with the paths in *names* shown by the names given there (standard
        input's spool as ``<stdin>``)."""
        if not names:
            return self

        def show(path: str | None) -> str | None:
            return names.get(path, path) if path is not None else None

        return replace(
            self,
            path=show(self.path),
            files=tuple(map(show, self.files)),
            tensors=tuple(replace(t, file=show(t.file)) for t in self.tensors),
            not_read=tuple((show(path), why) for path, why in self.not_read),
            **self._shown_fields(show),
        )

    def _shown_fields(self, show: Callable[[str | None], str | None]) -> dict:
        return {}

    @property
    def counted(self) -> tuple[TensorReport, ...]:
        return tuple(t for t in self.tensors if t.skipped is None)

    @property
    def total_numel(self) -> int:
        return sum(t.numel for t in self.counted)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def nonfinite(self) -> int:
        return sum(t.nonfinite for t in self.tensors)

    @property
    def refuses_nonfinite(self) -> bool:
        """Whether the values hold NaN/Inf that the policy refuses (the command exits 4)."""
        return bool(self.nonfinite) and self.nonfinite_policy is NonFinite.ERROR

    @property
    def beyond_float64(self) -> bool:
        """Whether the global norm is inf only because it exceeds float64's range: the values
        it counts are finite (tensor norms shown as inf then exceed it too)."""
        return math.isinf(self.global_norm) and not self.refuses_nonfinite

    def to_dict(self, view: View | None = None) -> dict:
        """The report as one JSON-ready object (no NaN: non-finite numbers become None); with
        a *view*, its tensors (or, by layer, its layers) as the view orders and cuts them."""
        fields = {
            "schema_version": SCHEMA_VERSION,
            "file": self.path,
            "files": list(self.files),
            "format": self.file_format,
            "norm_type": json_number(self.norm_type, inf_as="inf"),
            # no tensor counted: no norm (0 would claim that values were read)
            "global_norm": json_number(self.global_norm) if self.counted else None,
            "global_norm_beyond_float64": self.beyond_float64,
            "tensor_count": len(self.counted),
            "skipped_count": len(self.tensors) - len(self.counted),
            "numel": self.total_numel,
            "nbytes": self.total_bytes,
            "nonfinite": self.nonfinite,
            "nonfinite_policy": self.nonfinite_policy.value,
            "not_read": [{"file": path, "reason": why} for path, why in self.not_read],
            **self._kind_fields(),
        }
        return fields | self._listed(view)

    def _kind_fields(self) -> dict:
        return {}

    def _listed(self, view: View | None) -> dict:
        from .views import layer_rows, tensor_rows

        if view is not None and view.by_layer:  # the layers as shown; every tensor, in order
            layers = [layer.to_dict() for layer in layer_rows(self, view)]
            return {"tensors": [self.tensor_dict(t) for t in self.tensors], "layers": layers}
        shown = self.tensors if view is None else tensor_rows(self, view)
        return {"tensors": [self.tensor_dict(t) for t in shown]}

    def rows(self, view: View | None = None) -> tuple[str, list[dict]]:
        """The rows for JSON Lines and CSV: ("tensor", tensors) or ("layer", layers)."""
        listed = self._listed(view)
        return ("layer", listed["layers"]) if "layers" in listed else ("tensor", listed["tensors"])

    def tensor_dict(self, tensor: TensorReport) -> dict:
        return tensor.to_dict()


@dataclass(frozen=True)
class InspectReport(_FilesReport):
    """inspect, norm and check: the norms, and with max_norm what clipping would do."""

    max_norm: float | None = None
    eps: float = 0.0
    scale: float | None = None  # the factor rescale would apply (None: the norm is not finite)
    clipped: bool | None = None  # whether rescale would clip

    def _kind_fields(self) -> dict:
        if self.max_norm is None:
            return {}
        return {
            "max_norm": self.max_norm,
            "eps": self.eps,
            "scale": self.scale,
            "clipped": self.clipped,
        }


@dataclass(frozen=True)
class RewriteReport(_FilesReport):
    """rescale, clip-value and normalize: what the strategy did, and the norms after."""

    strategy: Strategy | None = None
    output: str = ""
    global_norm_after: float | None = None  # of the values written, measured while writing
    scale: float | None = None  # the factor, when every tensor got the same
    clipped: bool | None = None  # whether any value changed
    groups: tuple[GroupReport, ...] = ()  # per-tensor and group clipping: each group's result

    def _shown_fields(self, show: Callable[[str | None], str | None]) -> dict:
        return {"output": show(self.output)}

    def _kind_fields(self) -> dict:
        return self.strategy.report_fields(self) | {
            "output": self.output,
            "global_norm_after": json_number(self.global_norm_after),
            "strategy": self.strategy.name,
        }

    def tensor_dict(self, tensor: TensorReport) -> dict:
        after = {"norm_after": json_number(tensor.norm_after)}
        return tensor.to_dict() | after | self.strategy.tensor_fields(tensor)


Report = InspectReport | RewriteReport


def json_number(value: float | None, inf_as: str | None = None) -> float | str | None:
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return inf_as
    return value


def tensor_reports(
    records: Sequence[tuple[str, TensorInfo, NormStats | None]],
    global_norm: float,
    norm_of: Callable[[NormStats], float],
    after: Sequence[NormStats | None] | None = None,
) -> tuple[TensorReport, ...]:
    """One TensorReport per (file, tensor, pass-1 statistics) record, with the statistics of
    what pass 2 wrote, *after*, if given.

    *norm_of* turns statistics into the norm reported (finite values only, or NaN/inf).
    """
    after = after or [None] * len(records)
    total = _shares_total([s for _, _, s in records], global_norm)
    return tuple(
        _tensor_report(file, info, stats, total, norm_of, written)
        for (file, info, stats), written in zip(records, after, strict=True)
    )


def _shares_total(before: list[NormStats | None], global_norm: float) -> NormStats | None:
    """All tensors' statistics together, which shares are taken of; None when the global norm
    counts NaN/Inf values (it is then NaN/inf, and shares of it mean nothing)."""
    counted = [s for s in before if s is not None]
    if not counted:
        return None
    total = combine(counted, counted[0].norm_type)
    return total if global_norm == total.finite_norm() else None


def _tensor_report(
    file: str | None,
    info: TensorInfo,
    stats: NormStats | None,
    total: NormStats | None,
    norm_of: Callable[[NormStats], float],
    after: NormStats | None,
) -> TensorReport:
    """Made in one call: dataclasses.replace() twice per tensor cost 1.1 s of 3.3 for the
    report of 60,000 tensors."""
    shown = (info.name, info.dtype_name, info.shape, info.numel, info.nbytes)
    if stats is None:
        return TensorReport(*shown, skipped=info.skip_reason, file=file)
    return TensorReport(
        *shown,
        skipped=info.skip_reason,
        file=file,
        norm=norm_of(stats),
        max_abs=stats.max_abs,
        nan=stats.nan,
        posinf=stats.posinf,
        neginf=stats.neginf,
        first_nonfinite=c_index(stats.first_nonfinite, info.shape),
        share=None if total is None else norm_share(stats, total),
        norm_after=None if after is None else norm_of(after),
    )


def c_index(flat: int | None, shape: Sequence[int]) -> tuple[int, ...] | None:
    """The index, one entry per dimension, of the value *flat* values in, in C order."""
    if flat is None:
        return None
    index = []
    for size in reversed(shape):
        flat, position = divmod(flat, size)
        index.append(position)
    return tuple(reversed(index))
