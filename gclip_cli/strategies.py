"""Clipping strategies: from pass-1 statistics to the factor each tensor is multiplied by.

- global norm: one factor for all tensors (``rescale --max-norm``, the default);
- per tensor: each tensor clipped by its own norm (Keras ``clipnorm``);
- groups: tensors matched by name patterns clipped by their group's norm, each its own C;
- normalise: every tensor scaled so that the global norm becomes the target, up or down.

Clipping by value is not a factor; see :class:`ClipValue` and ``rewriters.Clamper``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import ml_dtypes
import numpy as np

from .engine import clip_factor, combine, dividing_norm, rounding_bound
from .errors import UsageError
from .formats import TensorInfo
from .norms import NormStats
from .rounding import ScaleFactor, ScratchBuffers, scale
from .selection import matches

ONE = ScaleFactor.of(1.0)
DEFAULT_GROUP = "(default)"


@dataclass(frozen=True)
class GlobalNorm:
    max_norm: float
    name = "global-norm"


@dataclass(frozen=True)
class PerTensor:
    max_norm: float
    name = "per-tensor"


@dataclass(frozen=True)
class Groups:
    """(glob, max_norm) pairs, first match wins; the rest clipped by *default* if given."""

    groups: tuple[tuple[str, float], ...]
    default: float | None = None
    name = "groups"


@dataclass(frozen=True)
class Normalize:
    target_norm: float
    name = "normalize"


@dataclass(frozen=True)
class ClipValue:
    max_value: float
    name = "clip-value"


Strategy = GlobalNorm | PerTensor | Groups | Normalize | ClipValue


@dataclass(frozen=True)
class GroupReport:
    name: str
    max_norm: float | None
    norm: float
    scale: float
    tensors: int


@dataclass(frozen=True)
class Plan:
    """The factor for every gradient tensor (by name), and what the groups came to."""

    factors: dict[str, ScaleFactor]
    groups: tuple[GroupReport, ...]

    @property
    def changes_anything(self) -> bool:
        return any(f.exact != 1 for f in self.factors.values())


def plan(
    strategy: Strategy,
    tensors: Sequence[TensorInfo],
    stats: Sequence[NormStats | None],
    norm_of: Callable[[NormStats], float],
    eps: float,
) -> Plan:
    """The factors *strategy* gives *tensors*, from their pass-1 *stats*.

    *norm_of* is the norm that counts (finite values only, or NaN/inf, by the policy).
    """
    members = [(t, s) for t, s in zip(tensors, stats, strict=True) if s is not None]
    if isinstance(strategy, GlobalNorm):
        assigned = {DEFAULT_GROUP: (strategy.max_norm, members)}
    elif isinstance(strategy, PerTensor):
        assigned = {t.name: (strategy.max_norm, [(t, s)]) for t, s in members}
    elif isinstance(strategy, Groups):
        assigned = _assign_groups(strategy, members)
    elif isinstance(strategy, Normalize):
        return _normalize(strategy, members, norm_of, eps)
    else:
        raise TypeError(f"no factors for {strategy!r}")
    return _clip_groups(assigned, norm_of, eps)


def _assign_groups(
    strategy: Groups, members: list[tuple[TensorInfo, NormStats]]
) -> dict[str, tuple[float | None, list[tuple[TensorInfo, NormStats]]]]:
    assigned: dict[str, tuple[float | None, list]] = {
        glob: (limit, []) for glob, limit in strategy.groups
    }
    assigned[DEFAULT_GROUP] = (strategy.default, [])
    for tensor, part in members:
        glob = next((g for g, _ in strategy.groups if matches(tensor.name, g)), DEFAULT_GROUP)
        assigned[glob][1].append((tensor, part))
    return assigned


def _clip_groups(
    assigned: dict[str, tuple[float | None, list[tuple[TensorInfo, NormStats]]]],
    norm_of: Callable[[NormStats], float],
    eps: float,
) -> Plan:
    factors: dict[str, ScaleFactor] = {}
    groups = []
    for name, (limit, members) in assigned.items():
        if not members:
            continue
        tensors = [t for t, _ in members]
        stats = [s for _, s in members]
        total = combine(stats, stats[0].norm_type)
        norm = norm_of(total)
        dividing = dividing_norm(total, norm)
        factor = ONE
        if limit is not None and dividing is not None:
            factor = clip_factor(dividing, limit, eps, rounding_bound(tensors, stats, total))
        factors.update(dict.fromkeys((t.name for t in tensors), factor))
        groups.append(GroupReport(name, limit, norm, factor.hi, len(members)))
    return Plan(factors, tuple(groups))


def _normalize(
    strategy: Normalize,
    members: list[tuple[TensorInfo, NormStats]],
    norm_of: Callable[[NormStats], float],
    eps: float,
) -> Plan:
    total = combine([s for _, s in members], members[0][1].norm_type if members else 2.0)
    norm = norm_of(total)
    dividing = dividing_norm(total, norm)
    if norm == 0.0 or dividing is None:  # a zero gradient stays zero
        factor = ONE
    else:
        factor = ScaleFactor(Fraction(strategy.target_norm) / (Fraction(dividing) + Fraction(eps)))
    for tensor, part in members:
        if _overflows(part.max_abs, tensor.dtype, factor):
            limit = float(ml_dtypes.finfo(tensor.dtype).max)
            raise UsageError(
                None,
                f"normalising to {strategy.target_norm:g} would overflow "
                f"{tensor.dtype_name} in tensor {tensor.name!r} "
                f"(largest value {part.max_abs:g} x {factor.hi:g} > {limit:g})",
            )
    factors = {t.name: factor for t, _ in members}
    group = GroupReport(DEFAULT_GROUP, None, norm, factor.hi, len(members))
    return Plan(factors, (group,))


def _overflows(largest: float, dtype: np.dtype, factor: ScaleFactor) -> bool:
    """Whether *largest* (a value of *dtype*) times the factor rounds beyond *dtype*'s range,
    as scaling would round it."""
    value = np.array([largest], dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        scale(value, value, factor, ScratchBuffers(16))
        return not np.isfinite(value.astype(np.float64))[0]
