"""What inspect and rescale found: plain data a Python caller, a table or JSON can use."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

from .engine import combine, norm_share
from .formats import TensorInfo
from .norms import NormStats
from .strategies import GroupReport

SCHEMA_VERSION = 1  # of the JSON: raised when a field changes meaning or goes away


@dataclass(frozen=True)
class TensorReport:
    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    skipped: str | None  # why the tensor is not a gradient; None when it is counted
    norm: float | None = None  # NaN/inf when the tensor holds NaN/inf values
    max_abs: float | None = None  # of the finite values
    nan: int = 0
    inf: int = 0
    share: float | None = None  # of the global sum of |x|**p
    norm_after: float | None = None  # rescale: the norm of the values written
    file: str | None = None
    scale: float | None = None  # rescale: the factor this tensor was multiplied by
    clamped: int | None = None  # clip-value: how many values were clamped

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf


@dataclass(frozen=True)
class Report:
    path: str
    file_format: str
    norm_type: float
    global_norm: float
    tensors: tuple[TensorReport, ...]
    files: tuple[str, ...] = ()
    max_norm: float | None = None
    eps: float = 0.0
    nonfinite_policy: str = "error"
    scale: float | None = None  # the clip factor (applied by rescale, prospective for inspect)
    clipped: bool | None = None
    output: str | None = None
    global_norm_after: float | None = None
    strategy: str = "global-norm"
    groups: tuple[GroupReport, ...] = ()  # per-tensor and group clipping: each group's result
    max_value: float | None = None  # clip-value
    target_norm: float | None = None  # normalize
    not_read: tuple[tuple[str, str], ...] = ()  # (path, why): what the inputs held, unread

    def shown_as(self, names: Mapping[str, str]) -> Report:
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
            output=show(self.output),
            tensors=tuple(replace(t, file=show(t.file)) for t in self.tensors),
            not_read=tuple((show(path), why) for path, why in self.not_read),
        )

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
    def beyond_float64(self) -> bool:
        """Whether the global norm is inf only because it exceeds float64's range: the values
        it counts are finite (tensor norms shown as inf then exceed it too)."""
        counts_nonfinite = self.nonfinite and self.nonfinite_policy == "error"
        return math.isinf(self.global_norm) and not counts_nonfinite

    def to_dict(self) -> dict:
        """A JSON-ready dict: non-finite numbers become None (JSON has no NaN)."""
        fields = {
            "schema_version": SCHEMA_VERSION,
            "file": self.path,
            "files": list(self.files),
            "format": self.file_format,
            "norm_type": _json_number(self.norm_type, inf_as="inf"),
            # no tensor counted: no norm (0 would claim that values were read)
            "global_norm": _json_number(self.global_norm) if self.counted else None,
            "global_norm_beyond_float64": self.beyond_float64,
            "tensor_count": len(self.counted),
            "skipped_count": len(self.tensors) - len(self.counted),
            "numel": self.total_numel,
            "nbytes": self.total_bytes,
            "nonfinite": self.nonfinite,
            "nonfinite_policy": self.nonfinite_policy,
            "not_read": [{"file": path, "reason": why} for path, why in self.not_read],
        }
        if self.max_norm is not None:
            fields |= {
                "max_norm": self.max_norm,
                "eps": self.eps,
                "scale": self.scale,
                "clipped": self.clipped,
            }
        if self.output is not None:
            fields |= {
                "output": self.output,
                "global_norm_after": _json_number(self.global_norm_after),
            }
        if self.output is not None:
            fields["strategy"] = self.strategy
            fields |= {
                k: v
                for k, v in (("max_value", self.max_value), ("target_norm", self.target_norm))
                if v is not None
            }
        if self.groups:
            fields["groups"] = [asdict(g) | {"norm": _json_number(g.norm)} for g in self.groups]
        fields["tensors"] = [self.tensor_dict(t) for t in self.tensors]
        return fields

    def tensor_dict(self, tensor: TensorReport) -> dict:
        """One tensor as JSON-ready data (fields of rescale only when this is a rescale)."""
        fields = asdict(tensor)
        fields["shape"] = list(tensor.shape)
        for key in ("norm", "max_abs", "norm_after"):
            fields[key] = _json_number(fields[key])
        if self.output is None:
            for key in ("norm_after", "scale", "clamped"):
                del fields[key]
        elif self.strategy != "clip-value":
            del fields["clamped"]
        return fields


def _json_number(value: float | None, inf_as: str | None = None) -> float | str | None:
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return inf_as
    return value


def tensor_reports(
    tensors: list[TensorInfo],
    before: list[NormStats | None],
    global_norm: float,
    norm_of: Callable[[NormStats], float],
    after: list[NormStats | None] | None = None,
    files: list[str] | None = None,
) -> tuple[TensorReport, ...]:
    """One TensorReport per tensor from the pass-1 (and pass-2) statistics.

    *norm_of* turns statistics into the norm reported (finite values only, or NaN/inf);
    *files* names each tensor's file.
    """
    after = after or [None] * len(tensors)
    files = files or [None] * len(tensors)
    total = _shares_total(before, global_norm)
    return tuple(
        replace(_tensor_report(info, stats, total, norm_of, written), file=file)
        for info, stats, written, file in zip(tensors, before, after, files, strict=True)
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
    info: TensorInfo,
    stats: NormStats | None,
    total: NormStats | None,
    norm_of: Callable[[NormStats], float],
    after: NormStats | None,
) -> TensorReport:
    base = TensorReport(
        info.name, info.dtype_name, info.shape, info.numel, info.nbytes, skipped=info.skip_reason
    )
    if stats is None:
        return base
    return replace(
        base,
        norm=norm_of(stats),
        max_abs=stats.max_abs,
        nan=stats.nan,
        inf=stats.inf,
        share=None if total is None else norm_share(stats, total),
        norm_after=None if after is None else norm_of(after),
    )
