"""Clipping strategies, one class each: the factors it gives the tensors (its plan), the
rewriter that applies them, and what its report says.

- GlobalNorm: one factor for all tensors (``rescale --max-norm``, the default);
- PerTensor: each tensor clipped by its own norm (Keras ``clipnorm``);
- Groups: tensors matched by name patterns clipped by their group's norm, each its own C;
- Normalize: every tensor scaled so that the global norm becomes the target, up or down;
- ClipValue: every value clamped to [-V, V] (no factor: rewriters.Clamper).

A new strategy is one class here and one option in cli.py.  Plans key tensors by (file, name),
so that one plan serves a file or the shards of a checkpoint alike.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import ClassVar, Protocol

import ml_dtypes
import numpy as np

from .engine import clip_factor, combine, dividing_norm, rounding_bound
from .errors import UsageError
from .formats import TensorInfo
from .norms import NormStats
from .options import NonFinite, Options, require_eps, require_positive
from .render.text import number
from .rewriters import Clamper, Rewriter, Scaler
from .rounding import ScaleFactor, ScratchBuffers, scale
from .selection import matches

ONE = ScaleFactor.of(1.0)
DEFAULT_GROUP = "(default)"
Key = tuple[str, str]  # (file, tensor name)


class RewrittenTensor(Protocol):
    """What a strategy reads of a tensor's part of a rewrite report."""

    scale: float | None
    clamped: int | None


class Rewritten(Protocol):
    """What a strategy reads of a rewrite report to say what it did."""

    scale: float | None
    clipped: bool | None
    groups: tuple[GroupReport, ...]

    @property
    def counted(self) -> Sequence[RewrittenTensor]: ...


@dataclass(frozen=True)
class Member:
    """A counted tensor as strategies see it: where it lies and what pass 1 measured."""

    file: str
    tensor: TensorInfo
    stats: NormStats

    @property
    def key(self) -> Key:
        return self.file, self.tensor.name


@dataclass(frozen=True)
class GroupReport:
    name: str
    max_norm: float | None
    norm: float
    scale: float
    tensors: int

    def to_dict(self) -> dict:
        return asdict(self) | {"norm": self.norm if math.isfinite(self.norm) else None}


@dataclass(frozen=True)
class Plan:
    """What a strategy will do: the factor of every counted tensor (by file and name; none for
    clip-value), the groups it formed, and whether any value changes; with the strategy that
    made it and the tensors holding NaN/Inf (Measurement.plan adds both), what pass 2 needs."""

    factors: Mapping[Key, ScaleFactor] = field(default_factory=dict)
    groups: tuple[GroupReport, ...] = ()
    changes: bool = False
    strategy: Strategy | None = None
    nonfinite: frozenset[Key] = frozenset()

    def factors_of(self, file: str) -> dict[str, ScaleFactor]:
        """The factors of one file's tensors, by name (what a rewriter of that file needs)."""
        return {name: f for (owner, name), f in self.factors.items() if owner == file}

    def nonfinite_of(self, file: str) -> frozenset[str]:
        """The tensors of *file* that hold NaN/Inf."""
        return frozenset(name for owner, name in self.nonfinite if owner == file)

    def rewrites(self, file: str, options: Options) -> bool:
        """Whether pass 2 changes any value of *file* (else it is copied): a factor, a clamp,
        or NaN/Inf written as 0."""
        zeroing = options.nonfinite is NonFinite.ZERO and bool(self.nonfinite_of(file))
        return self.changes or zeroing

    def rewriter(self, file: str, options: Options) -> Rewriter:
        """What pass 2 passes *file*'s values through."""
        return self.strategy.rewriter(self, file, options, self.nonfinite_of(file))

    @property
    def scale(self) -> float | None:
        """The one factor every tensor gets, if they all get the same."""
        scales = {f.hi for f in self.factors.values()}
        return scales.pop() if len(scales) == 1 else None


class Strategy(ABC):
    """How a rewriting command changes the values."""

    name: ClassVar[str]
    groups_table: ClassVar[bool] = False  # whether the report for people has a groups table

    @abstractmethod
    def plan(self, members: Sequence[Member], options: Options) -> Plan:
        """The factors for *members*, from their pass-1 statistics."""

    def rewriter(
        self, plan: Plan, file: str, options: Options, with_nonfinite: frozenset[str]
    ) -> Rewriter:
        """What pass 2 passes *file*'s values through (*with_nonfinite*: its tensors holding
        NaN/Inf, treated as options.nonfinite says)."""
        factors = plan.factors_of(file)
        return Scaler(factors, options.norm_type, options.nonfinite, with_nonfinite)

    def summary_rows(self, report: Rewritten) -> list[tuple[str, str]]:
        """The lines of the summary between the norm before and the norm after."""
        return [("scale factor", number(report.scale))]

    def report_fields(self, report: Rewritten) -> dict:
        """What the JSON report says of this strategy (besides ``strategy``)."""
        return {}

    def tensor_fields(self, tensor: RewrittenTensor) -> dict:
        """What the JSON report says of a tensor under this strategy."""
        return {"scale": tensor.scale}


@dataclass(frozen=True, kw_only=True)
class _Clipping(Strategy):
    """Clipping by norms, in groups (of all tensors, one each, or by name)."""

    eps: float = 0.0

    def plan(self, members: Sequence[Member], options: Options) -> Plan:
        factors: dict[Key, ScaleFactor] = {}
        groups = []
        for name, (limit, group) in self.assign(members).items():
            if group:
                factor, report = _clip_group(name, limit, group, options, self.eps)
                factors.update(dict.fromkeys((m.key for m in group), factor))
                groups.append(report)
        return Plan(factors, tuple(groups), any(f.exact != 1 for f in factors.values()))

    @abstractmethod
    def assign(self, members: Sequence[Member]) -> dict[str, tuple[float | None, list[Member]]]:
        """Group name -> (its max norm, its members)."""


@dataclass(frozen=True, kw_only=True)
class GlobalNorm(_Clipping):
    """All tensors by their one global norm: max_norm / (norm + eps) when it exceeds max_norm."""

    max_norm: float
    name: ClassVar[str] = "global-norm"

    def __post_init__(self) -> None:
        require_positive("max norm", self.max_norm)
        require_eps(self.eps)

    def assign(self, members: Sequence[Member]) -> dict[str, tuple[float | None, list[Member]]]:
        return {DEFAULT_GROUP: (self.max_norm, list(members))}

    def summary_rows(self, report: Rewritten) -> list[tuple[str, str]]:
        return [("max norm", number(self.max_norm)), *super().summary_rows(report)]

    def report_fields(self, report: Rewritten) -> dict:
        return _max_norm_fields(self.max_norm, self.eps, report)


class _ByGroups(_Clipping):
    """Clipping whose report has a row per group."""

    groups_table: ClassVar[bool] = True

    def summary_rows(self, report: Rewritten) -> list[tuple[str, str]]:
        scaled = sum(1 for g in report.groups if g.scale != 1.0)
        return [("groups clipped", f"{scaled} of {len(report.groups)}")]


@dataclass(frozen=True, kw_only=True)
class PerTensor(_ByGroups):
    """Each tensor by its own norm (Keras clipnorm)."""

    max_norm: float
    name: ClassVar[str] = "per-tensor"

    def __post_init__(self) -> None:
        require_positive("max norm", self.max_norm)
        require_eps(self.eps)

    def assign(self, members: Sequence[Member]) -> dict[str, tuple[float | None, list[Member]]]:
        # the file too: shards of one folder may hold tensors of one name
        several = len({m.file for m in members}) > 1
        return {
            f"{m.file}: {m.tensor.name}" if several else m.tensor.name: (self.max_norm, [m])
            for m in members
        }

    def report_fields(self, report: Rewritten) -> dict:
        return _max_norm_fields(self.max_norm, self.eps, report) | _groups_fields(report)


@dataclass(frozen=True, kw_only=True)
class Groups(_ByGroups):
    """(glob, max_norm) pairs, first match wins; the rest clipped by *default* if given."""

    groups: tuple[tuple[str, float], ...] = ()
    default: float | None = None
    name: ClassVar[str] = "groups"

    def __post_init__(self) -> None:
        if not self.groups:
            raise UsageError(None, "give groups, as (glob, max norm) pairs")
        for glob, limit in self.groups:
            require_positive(f"group {glob!r}: max norm", limit)
        if self.default is not None:
            require_positive("max norm", self.default)
        require_eps(self.eps)
        object.__setattr__(self, "groups", tuple((g, float(c)) for g, c in self.groups))

    def assign(self, members: Sequence[Member]) -> dict[str, tuple[float | None, list[Member]]]:
        assigned: dict[str, tuple[float | None, list[Member]]] = {
            glob: (limit, []) for glob, limit in self.groups
        }
        assigned[DEFAULT_GROUP] = (self.default, [])
        for member in members:
            glob = next((g for g, _ in self.groups if matches(member.tensor.name, g)), None)
            assigned[glob or DEFAULT_GROUP][1].append(member)
        return assigned

    def report_fields(self, report: Rewritten) -> dict:
        fields = {} if self.default is None else _max_norm_fields(self.default, self.eps, report)
        return fields | _groups_fields(report)


@dataclass(frozen=True, kw_only=True)
class Normalize(Strategy):
    """Every tensor scaled to global norm *target_norm*, up or down: target / (norm + eps); a
    zero gradient stays zero; a value that would overflow its dtype is refused."""

    target_norm: float
    eps: float = 0.0
    name: ClassVar[str] = "normalize"

    def __post_init__(self) -> None:
        require_positive("target norm", self.target_norm)
        require_eps(self.eps)

    def plan(self, members: Sequence[Member], options: Options) -> Plan:
        total = combine([m.stats for m in members], options.norm_type)
        norm = options.norm(total)
        dividing = dividing_norm(total, norm)
        if norm == 0.0 or dividing is None:  # a zero gradient stays zero
            factor = ONE
        else:
            exact = Fraction(self.target_norm) / (Fraction(dividing) + Fraction(self.eps))
            factor = ScaleFactor(exact)
        for member in members:
            self._refuse_overflow(member, factor)
        factors = {m.key: factor for m in members}
        group = GroupReport(DEFAULT_GROUP, None, norm, factor.hi, len(members))
        return Plan(factors, (group,), factor.exact != 1)

    def _refuse_overflow(self, member: Member, factor: ScaleFactor) -> None:
        tensor = member.tensor
        if _overflows(member.stats.max_abs, tensor.dtype, factor):
            limit = float(ml_dtypes.finfo(tensor.dtype).max)
            raise UsageError(
                None,
                f"normalising to {self.target_norm:g} would overflow "
                f"{tensor.dtype_name} in tensor {tensor.name!r} "
                f"(largest value {member.stats.max_abs:g} x {factor.hi:g} > {limit:g})",
            )

    def summary_rows(self, report: Rewritten) -> list[tuple[str, str]]:
        return [("target norm", number(self.target_norm)), *super().summary_rows(report)]

    def report_fields(self, report: Rewritten) -> dict:
        return {"target_norm": self.target_norm}


@dataclass(frozen=True, kw_only=True)
class ClipValue(Strategy):
    """Every value clamped to [-max_value, max_value] (V rounded toward zero in each dtype)."""

    max_value: float
    name: ClassVar[str] = "clip-value"

    def __post_init__(self) -> None:
        require_positive("max value", self.max_value)

    def plan(self, members: Sequence[Member], options: Options) -> Plan:
        return Plan(changes=any(m.stats.max_abs > self.max_value for m in members))

    def rewriter(
        self, plan: Plan, file: str, options: Options, with_nonfinite: frozenset[str]
    ) -> Rewriter:
        return Clamper(self.max_value, options.norm_type, options.nonfinite)

    def summary_rows(self, report: Rewritten) -> list[tuple[str, str]]:
        clamped = [t for t in report.counted if t.clamped]
        total = sum(t.clamped for t in clamped)
        return [
            ("max value", number(self.max_value)),
            ("values clamped", f"{total:,} in {len(clamped)} tensors"),
        ]

    def report_fields(self, report: Rewritten) -> dict:
        return {"max_value": self.max_value}

    def tensor_fields(self, tensor: RewrittenTensor) -> dict:
        return {"scale": tensor.scale, "clamped": tensor.clamped}


def global_norm_plan(
    members: Sequence[Member], options: Options, max_norm: float, eps: float = 0.0
) -> Plan:
    """What clipping by the global norm would do (inspect's --max-norm)."""
    return GlobalNorm(eps=eps, max_norm=max_norm).plan(members, options)


def _clip_group(
    name: str, limit: float | None, group: Sequence[Member], options: Options, eps: float
) -> tuple[ScaleFactor, GroupReport]:
    stats = [m.stats for m in group]
    total = combine(stats, options.norm_type)
    norm = options.norm(total)
    dividing = dividing_norm(total, norm)
    factor = ONE
    if limit is not None and dividing is not None:
        bound = rounding_bound([m.tensor for m in group], stats, total)
        factor = clip_factor(dividing, limit, eps, bound)
    return factor, GroupReport(name, limit, norm, factor.hi, len(group))


def _max_norm_fields(max_norm: float, eps: float, report: Rewritten) -> dict:
    return {"max_norm": max_norm, "eps": eps, "scale": report.scale, "clipped": report.clipped}


def _groups_fields(report: Rewritten) -> dict:
    return {"groups": [g.to_dict() for g in report.groups]} if report.groups else {}


def _overflows(largest: float, dtype: np.dtype, factor: ScaleFactor) -> bool:
    """Whether *largest* (a value of *dtype*) times the factor rounds beyond *dtype*'s range,
    as scaling would round it."""
    value = np.array([largest], dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        scale(value, value, factor, ScratchBuffers(16))
        return not np.isfinite(value.astype(np.float64))[0]


def members_of(records: Iterable[tuple[str, TensorInfo, NormStats | None]]) -> list[Member]:
    """The counted tensors of (file, tensor, statistics) records."""
    return [Member(file, t, s) for file, t, s in records if s is not None]
