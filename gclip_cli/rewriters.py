"""The pass-2 transforms: each writes a tensor's values changed (scaled, clamped) and
measures what it wrote.  Progress is counted around them (counted()), so that a rewriter holds
nothing of the process it runs in: workers get copies of it (blank()) and send theirs back.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .norms import NormAccumulator, NormStats
from .options import NonFinite
from .rounding import ScaleFactor, ScratchBuffers, scale

if TYPE_CHECKING:
    from .formats import TensorInfo, Transform
    from .progress import Progress


class Rewriter:
    """A pass-2 transform that measures what it writes, tensor by tensor.

    Chunks of one tensor must arrive one after another (every writer goes tensor by tensor).
    """

    def __init__(self, norm_type: float) -> None:
        self.norm_type = norm_type
        self.after: dict[str, NormStats] = {}
        self.clamped: dict[str, int] = {}  # values clamped, by tensor (clipping by value)
        self._current: tuple[str, NormAccumulator] | None = None

    def __call__(self, tensor: TensorInfo, src: np.ndarray, dst: np.ndarray) -> None:
        self.rewrite(tensor, src, dst)
        self._accumulator_for(tensor.name).add(dst)

    def rewrite(self, tensor: TensorInfo, src: np.ndarray, dst: np.ndarray) -> None:
        raise NotImplementedError

    def blank(self) -> Rewriter:
        """A rewriter like this one that has written nothing yet."""
        fresh = copy.copy(self)
        fresh.after, fresh.clamped, fresh._current = {}, {}, None
        return fresh

    def merge(self, other: Rewriter) -> None:
        """Take in what *other* (a blank() copy that worked elsewhere) wrote."""
        for name, stats in other.finish().items():
            self.after.setdefault(name, NormStats(self.norm_type)).merge(stats)
        for name, count in other.clamped.items():
            self.clamped[name] = self.clamped.get(name, 0) + count

    def finish(self) -> dict[str, NormStats]:
        """The norms of the values written, per tensor name."""
        if self._current is not None:
            name, accumulator = self._current
            self.after[name] = accumulator.finish()
            self._current = None
        return self.after

    def _accumulator_for(self, name: str) -> NormAccumulator:
        if self._current is None or self._current[0] != name:
            self.finish()
            self._current = (name, NormAccumulator(self.norm_type))
        return self._current[1]


class Scaler(Rewriter):
    """Multiplies each tensor by its factor, rounding once (see rounding.py).

    *with_nonfinite* names the tensors holding NaN/Inf, treated as *policy* says.
    """

    def __init__(
        self,
        factors: Mapping[str, ScaleFactor],
        norm_type: float,
        policy: NonFinite = NonFinite.ERROR,
        with_nonfinite: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(norm_type)
        self.factors = factors
        self.policy = policy
        self.with_nonfinite = with_nonfinite
        self._scratch = ScratchBuffers()

    def rewrite(self, tensor: TensorInfo, src: np.ndarray, dst: np.ndarray) -> None:
        factor = self.factors[tensor.name]
        if tensor.name in self.with_nonfinite:
            self._scale_around_nonfinite(src, dst, factor)
        else:
            scale(src, dst, factor, self._scratch)

    def _scale_around_nonfinite(
        self, src: np.ndarray, dst: np.ndarray, factor: ScaleFactor
    ) -> None:
        bad = ~np.isfinite(src)
        if self.policy is NonFinite.ZERO:
            np.copyto(dst, src)
            dst[bad] = 0
            scale(dst, dst, factor, self._scratch)
            return
        kept = src[bad]  # copied first: src and dst may be the same array
        with np.errstate(invalid="ignore", over="ignore"):
            scale(src, dst, factor, self._scratch)
        dst[bad] = kept  # exactly the original bits


class Clamper(Rewriter):
    """Clips every value to [-V, V], V rounded toward zero into each tensor's dtype, and counts
    the values it changed.  NaN/Inf: 0 with policy ZERO, untouched with KEEP."""

    def __init__(
        self, max_value: float, norm_type: float, policy: NonFinite = NonFinite.ERROR
    ) -> None:
        super().__init__(norm_type)
        self.max_value = max_value
        self.policy = policy

    def rewrite(self, tensor: TensorInfo, src: np.ndarray, dst: np.ndarray) -> None:
        bound = self.bound(src.dtype)
        finite = np.isfinite(src)
        changed = int(np.count_nonzero((np.abs(src) > bound) & finite))
        kept = src[~finite]  # copied first: src and dst may be the same array
        np.clip(src, -bound, bound, out=dst)
        dst[~finite] = 0 if self.policy is NonFinite.ZERO else kept
        self.clamped[tensor.name] = self.clamped.get(tensor.name, 0) + changed

    def bound(self, dtype: np.dtype) -> np.generic:
        """The largest value of *dtype* not above max_value."""
        value = dtype.type(self.max_value)
        if float(value) > self.max_value:
            value = np.nextafter(value, dtype.type(0))
        return value


def counted(transform: Transform, progress: Progress) -> Transform:
    """*transform*, telling *progress* of the bytes of each chunk it writes (*transform*
    itself when nobody listens)."""
    if not progress.listening:
        return transform

    def counting(tensor: TensorInfo, src: np.ndarray, dst: np.ndarray) -> None:
        transform(tensor, src, dst)
        progress.advance(dst.nbytes)

    return counting
