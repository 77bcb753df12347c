"""p-norm accumulation that is exact to float64 rounding and independent of how data is chunked.

Values are cut into fixed blocks of ``BLOCK`` values counted from the start of each tensor, so the
blocks (and their float64 partial sums) are the same whatever size the chunks read from a file
have.  Each block sum is added to an exact running sum (Shewchuk's algorithm, as in
``math.fsum``), which makes the total independent of the order blocks and tensors are merged in.
Blocks whose powers would overflow or underflow float64 are divided by a reference near their
largest value first (see ``NormStats``), so no p and no magnitude overflows or underflows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import numpy as np

from . import kernels

BLOCK = 1 << 16  # values per block: its float64 working copy (512 KiB) stays in cache

# A block whose largest p-th power lies outside 2**[_MIN_EXPONENT, _MAX_EXPONENT] is divided by
# a reference near its largest value first, so no power overflows (the bound leaves room to sum
# 2**60 blocks) and the largest ones do not underflow.
_MAX_EXPONENT = 880
_MIN_EXPONENT = -900
# A reference is the block's largest |value| rounded down to a power of two, which divides
# exactly; the p-th power of that largest value then lies within [1, 2**p).  Beyond
# p = _FINE_P that could overflow, so the reference keeps more bits of the largest value:
# enough that it stays below 2**739.
_FINE_P = 512.0
# Below this p, a second non-zero value adds at least 2**-40 to sum(|x / max|**p) (its ratio to
# the largest is at least 2**-2098 in float64), so a sum closer to 1 than 2**-41 means the
# largest |value| is the only non-zero one, and the norm is exactly that value.
_SINGLE_VALUE_P = 40 / 2098
_SINGLE_VALUE_ROOM = 2.0**-41
# How far (as a power of two) beyond the largest |value| a norm is told apart (see
# _times_power_of_two).
_WIDEST = 4096
# A norm computed up to this fraction beyond float64's largest value is taken as that value.
_TOP_ROOM = 2.0**-49
_LARGEST = float(np.finfo(np.float64).max)
# Kept references are pruned (those whose weight would be exactly 0 in the result) once there
# are more than this many.
_PRUNE_AT = 64


def _add_exact(partials: list[float], x: float) -> None:
    """Add *x* to the non-overlapping *partials* whose exact sum they represent (Shewchuk)."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


class ExactSum:
    """A float sum that is exact until its final rounding, whatever the order of its terms."""

    def __init__(self) -> None:
        self._partials: list[float] = []

    def add(self, value: float) -> None:
        _add_exact(self._partials, value)

    @property
    def value(self) -> float:
        return math.fsum(self._partials)


@dataclass
class NormStats:
    """Mergeable statistics of a set of values for one norm type.

    The sum of |x|**p is kept as exact partial sums per reference r (the float the values of a
    block were divided by; 1.0 for blocks taken as they are): the true sum is
    ``sum(r**p * fsum(sums[r]) for r in sums)``.  Almost always only 1.0 is present.
    Non-finite values are counted (NaN, +Inf and -Inf apart) and left out of the sums and of
    ``max_abs``; ``first_nonfinite`` is the flat index, in C order, of the first of them.
    """

    norm_type: float
    numel: int = 0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    max_abs: float = 0.0
    sums: dict[float, list[float]] = field(default_factory=dict)
    first_nonfinite: int | None = None

    @property
    def inf(self) -> int:
        return self.posinf + self.neginf

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    def merge(self, other: NormStats) -> None:
        self.numel += other.numel
        self.nan += other.nan
        self.posinf += other.posinf
        self.neginf += other.neginf
        self.max_abs = max(self.max_abs, other.max_abs)
        self._note_nonfinite(other.first_nonfinite)
        for reference, partials in other.sums.items():
            for part in partials:
                self._add(reference, part)

    def _note_nonfinite(self, index: int | None) -> None:
        """Keep the first index of a non-finite value: parts of a tensor measured apart (by
        workers) each know their own first, and the tensor's is the least of them."""
        if index is not None and (self.first_nonfinite is None or index < self.first_nonfinite):
            self.first_nonfinite = index

    def _add(self, reference: float, value: float) -> None:
        partials = self.sums.get(reference)
        if partials is None:
            partials = self.sums[reference] = []
            if len(self.sums) > _PRUNE_AT:
                self._prune()
        _add_exact(partials, value)

    def _prune(self) -> None:
        """Drop the references whose weight (r / top)**p is 0: it can only shrink as larger
        ones come, so they would add exactly 0 to the result whatever else is merged."""
        top, p = max(self.sums), self.norm_type
        for reference in [r for r in self.sums if (r / top) ** p == 0.0]:
            del self.sums[reference]

    def finite_norm(self) -> float:
        """The p-norm of the finite values; inf where it exceeds float64's range."""
        return as_float(*self.finite_norm_parts())

    def finite_norm_exact(self) -> Fraction:
        """finite_norm() as an exact fraction, also where it exceeds float64's range."""
        mantissa, exponent = self.finite_norm_parts()
        return Fraction(mantissa) * Fraction(2) ** exponent

    def finite_norm_parts(self) -> tuple[float, int]:
        """The p-norm of the finite values as ``mantissa * 2**exponent``, 0.5 <= mantissa < 1
        (or 0.0, 0): never overflows, whatever p and the magnitudes."""
        if math.isinf(self.norm_type) or self.max_abs == 0.0:
            return math.frexp(self.max_abs)
        p, largest = self.norm_type, self.max_abs
        top, total = self._scaled_sum()
        if self._single_value(top, total):
            return math.frexp(largest)
        # A root's error grows with its logarithm: take it of the sum relative to largest**p
        # (within [1, count]) where that can be formed; sqrt and p = 1 need no such help.
        log2_weight = p * math.log2(top / largest)
        if p not in (1, 2) and abs(log2_weight) < 1000:
            return root_parts(largest, total * (top / largest) ** p, p)
        return root_parts(top, total, p)

    def power_sum_ratio(self, total: NormStats) -> float:
        """This sum of |x|**p divided by *total*'s (0.0 when that is 0), without overflow."""
        if not total.sums:
            return 0.0
        top = max(max(self.sums, default=0.0), max(total.sums))
        return self._sum_relative_to(top) / total._sum_relative_to(top)

    def norm(self) -> float:
        """The p-norm of all values: NaN if any value is NaN, inf if any is infinite."""
        if self.nan:
            return math.nan
        if self.inf:
            return math.inf
        return self.finite_norm()

    def _scaled_sum(self) -> tuple[float, float]:
        """(top, total): the largest reference and the sum of |x|**p divided by top**p, which
        lies within 2**[-900, 967] (each reference's own sum is at least 2**-900)."""
        top = max(self.sums)
        return top, self._sum_relative_to(top)

    def _sum_relative_to(self, top: float) -> float:
        p = self.norm_type
        return math.fsum(
            (r / top) ** p * total
            for r, total in ((r, math.fsum(parts)) for r, parts in self.sums.items())
        )

    def _single_value(self, top: float, total: float) -> bool:
        """Whether, for p below _SINGLE_VALUE_P, the largest |value| is the only non-zero one:
        then sum(|x / largest|**p) is 1 (see there)."""
        p = self.norm_type
        if p >= _SINGLE_VALUE_P:
            return False
        log2_ratio = math.log2(total) + p * (math.log2(top) - math.log2(self.max_abs))
        return log2_ratio < _SINGLE_VALUE_ROOM


def root_parts(top: float, total: float, p: float) -> tuple[float, int]:
    """top * total**(1/p) as (mantissa, exponent) (see NormStats.finite_norm_parts), for
    positive finite *top* and *total*: no overflow or underflow whatever p."""
    log2_root = math.log2(total) / p
    if abs(log2_root) < 1000:  # the root is a normal float64: take it directly
        return _times(top, math.sqrt(total) if p == 2 else total ** (1.0 / p))
    return _times_power_of_two(top, log2_root)


def p_norm_of(terms: Iterable[tuple[int, float]], p: float) -> float:
    """(sum of count * magnitude**p) ** (1/p) over (count, magnitude) pairs of non-negative
    magnitudes, scaled by the largest so that nothing overflows or underflows on the way;
    inf where the result exceeds float64's range (or a magnitude is inf)."""
    kept = [(count, magnitude) for count, magnitude in terms if count and magnitude]
    top = max((magnitude for _, magnitude in kept), default=0.0)
    if top == 0.0 or math.isinf(top) or math.isinf(p):
        return top
    total = math.fsum(count * (magnitude / top) ** p for count, magnitude in kept)
    return as_float(*root_parts(top, total, p))


def as_float(mantissa: float, exponent: int) -> float:
    """mantissa * 2**exponent (0.5 <= mantissa < 1), inf beyond float64's range, except
    within the few rounding units a computed norm can be off by: float64's largest value (so
    that the norm of that value alone is not called inf)."""
    if exponent <= 1024:
        return math.ldexp(mantissa, exponent)
    if exponent == 1025 and mantissa < 0.5 + _TOP_ROOM:
        return _LARGEST
    return math.inf


def _times(a: float, b: float) -> tuple[float, int]:
    """a * b as (mantissa, exponent) (see NormStats.finite_norm_parts), for positive a, b."""
    ma, ea = math.frexp(a)
    mb, eb = math.frexp(b)
    mantissa, exponent = math.frexp(ma * mb)  # within [0.25, 1): rounded once, as a * b is
    return mantissa, exponent + ea + eb


def _times_power_of_two(a: float, log2_factor: float) -> tuple[float, int]:
    """a * 2**log2_factor as (mantissa, exponent), for positive a and finite log2_factor.

    Factors beyond 2**_WIDEST are taken as 2**_WIDEST: the norm is then inf in float64, and any
    value divided by it rounds to 0 in every float type all the same.
    """
    log2_factor = min(log2_factor, _WIDEST)
    whole = math.floor(log2_factor)
    mantissa, exponent = _times(a, 2.0 ** (log2_factor - whole))
    return mantissa, exponent + whole


class StoredTensor(Protocol):
    """What an accumulator needs to know of a tensor (formats.base.TensorInfo has it)."""

    shape: tuple[int, ...]

    @property
    def stored_axes(self) -> tuple[int, ...] | None: ...


class NormAccumulator:
    """Streams the values of one tensor, in order and in chunks of any size, into NormStats.

    *first*: the flat index of the first value streamed, when they are a part of the tensor
    that begins further on (a worker's span); *shape*: the tensor's; *axes*: when its values
    come in another order than C order (Fortran order, a transposed view), the axes in whose C
    order they come, outermost first (first_nonfinite is counted in C order all the same).
    """

    def __init__(
        self,
        norm_type: float,
        first: int = 0,
        shape: tuple[int, ...] = (),
        axes: tuple[int, ...] | None = None,
    ) -> None:
        self.stats = NormStats(norm_type)
        self._first = first
        self._shape, self._axes = shape, axes
        self._work = np.empty(BLOCK, dtype=np.float64)  # one block's squares or |values|
        self._waiting: np.ndarray | None = None  # values of an unfinished block, as they came
        self._filled = 0
        self._squares = False  # whether blocks are reduced as squares (else as |values|)

    def add(self, values: np.ndarray) -> None:
        """Account for the next *values* (1-D, any float dtype) of the tensor."""
        if self._waiting is None:
            self._waiting = np.empty(BLOCK, dtype=values.dtype)
            # float32 and narrower square exactly in float64: summing their squares gives the
            # bits of squaring |values|, one pass fewer.
            self._squares = self.stats.norm_type == 2 and values.dtype.itemsize <= 4
        start = self._top_up(values)
        if self._filled:  # all of values went into the waiting block, still unfinished
            return
        whole = (values.size - start) // BLOCK * BLOCK
        if whole:
            self._reduce_blocks(values[start : start + whole])
        rest = values[start + whole :]
        self._waiting[: rest.size] = rest
        self._filled = rest.size

    def finish(self) -> NormStats:
        """Reduce the last, partial block and return the statistics."""
        if self._filled:
            self._reduce_blocks(self._waiting[: self._filled])
            self._filled = 0
        return self.stats

    def _top_up(self, values: np.ndarray) -> int:
        """Complete the waiting block from *values*; how many of them it took."""
        if not self._filled:
            return 0
        take = min(BLOCK - self._filled, values.size)
        self._waiting[self._filled : self._filled + take] = values[:take]
        self._filled += take
        if self._filled == BLOCK:
            self._reduce_blocks(self._waiting)
            self._filled = 0
        return take

    def _reduce_blocks(self, values: np.ndarray) -> None:
        """Reduce *values*: whole blocks, or the tensor's last, shorter one."""
        if self._squares and kernels.handle(values):
            self._reduce_compiled(values)
            return
        for start in range(0, values.size, BLOCK):
            self._reduce_block(values[start : start + BLOCK])

    def _reduce_compiled(self, values: np.ndarray) -> None:
        """The compiled kernel's block sums; blocks holding NaN/Inf (whose sums are not
        finite) go through numpy, which counts them."""
        blocks = -(-values.size // BLOCK)
        sums, peaks = np.empty(blocks), np.empty(blocks)
        kernels.compiled.square_sums(values, sums, peaks, BLOCK)
        for k, (total, top) in enumerate(zip(sums.tolist(), peaks.tolist(), strict=True)):
            if not math.isfinite(total):
                self._reduce_block(values[k * BLOCK : (k + 1) * BLOCK])
                continue
            self.stats.numel += min(BLOCK, values.size - k * BLOCK)
            self.stats.max_abs = max(self.stats.max_abs, math.sqrt(top))
            if top:
                self.stats._add(1.0, total)

    @classmethod
    def for_tensor(cls, tensor: StoredTensor, norm_type: float, first: int = 0) -> NormAccumulator:
        """An accumulator for the values of *tensor* (its shape and storage order) from its
        value *first* (in storage order) on."""
        return cls(norm_type, first, tuple(tensor.shape), tensor.stored_axes)

    def _reduce_block(self, values: np.ndarray) -> None:
        block = self._work[: values.size]
        (np.square if self._squares else np.abs)(values, out=block, dtype=np.float64)
        start = self._first + self.stats.numel  # the block's first value in the tensor
        self.stats.numel += values.size
        if self._squares:
            self._reduce_squares(block, values, start)
            return
        peak = float(np.maximum.reduce(block))
        if not math.isfinite(peak):
            peak = self._zero_nonfinite(block, values, start)
        self.stats.max_abs = max(self.stats.max_abs, peak)
        if peak == 0.0 or math.isinf(self.stats.norm_type):
            return
        reference = self._reference(peak)
        if reference != 1.0:
            np.divide(block, reference, out=block)  # at most 1: nothing overflows
        self.stats._add(reference, self._power_sum(block))

    def _reduce_squares(self, block: np.ndarray, values: np.ndarray, start: int) -> None:
        """Sum a block of exact squares: no rescaling is needed (float32 squares lie within
        2**-298 .. 2**256) and the square root of the largest is exactly the largest |value|."""
        top = float(np.maximum.reduce(block))
        if not math.isfinite(top):
            top = self._zero_nonfinite(block, values, start)
        self.stats.max_abs = max(self.stats.max_abs, math.sqrt(top))
        if top:
            self.stats._add(1.0, float(np.add.reduce(block)))

    def _reference(self, peak: float) -> float:
        """1.0 when the block's p-th powers fit float64 safely, else what to divide it by."""
        p = self.stats.norm_type
        exponent = math.frexp(peak)[1]
        if (exponent - 1) * p > _MIN_EXPONENT and exponent * p < _MAX_EXPONENT:
            return 1.0
        return reference_for(peak, p)

    def _zero_nonfinite(self, block: np.ndarray, values: np.ndarray, start: int) -> float:
        """Count NaN/Inf in *block* (the powers of *values*, whose first is the tensor's value
        *start*: their signs tell +Inf from -Inf), note where the first lies, set them to 0 and
        return the new peak.  Only blocks that hold NaN/Inf come here: finite data pays
        nothing for it."""
        nan = np.isnan(block)
        inf = np.isinf(block)
        posinf = int(np.count_nonzero(values[inf] > 0))  # as compared in every float type
        self.stats.nan += int(np.count_nonzero(nan))
        self.stats.posinf += posinf
        self.stats.neginf += int(np.count_nonzero(inf)) - posinf
        bad = nan | inf
        self.stats._note_nonfinite(self._first_in_c_order(start + np.flatnonzero(bad)))
        block[bad] = 0.0
        return float(np.maximum.reduce(block))

    def _first_in_c_order(self, positions: np.ndarray) -> int:
        """The least C-order flat index of the values at *positions* (in the order they come:
        for a tensor stored in another order, its first in C order may come later)."""
        if self._axes is None:
            return int(positions[0])
        stored = np.unravel_index(positions, tuple(self._shape[a] for a in self._axes))
        where = [stored[self._axes.index(axis)] for axis in range(len(self._shape))]
        return int(np.ravel_multi_index(where, self._shape).min())

    def _power_sum(self, block: np.ndarray) -> float:
        """sum(block**p), computed in place; pairwise summation in a fixed order."""
        p = self.stats.norm_type
        if p == 1:
            return float(np.add.reduce(block))
        if p == 2:
            np.square(block, out=block)
        else:
            np.power(block, p, out=block)
        return float(np.add.reduce(block))


def reference_for(peak: float, p: float) -> float:
    """The float at or just below *peak* (> 0) that a block is divided by before its p-th
    powers are taken: *peak* rounded down to a power of two, or for p > _FINE_P to as many bits
    as keep (peak / reference)**p below 2**739 (all of them, for the largest p)."""
    bits = 0 if p <= _FINE_P else min(52, math.ceil(math.log2(p / _FINE_P)))
    mantissa, exponent = math.frexp(peak)
    steps = 2.0 ** (bits + 1)  # mantissa in [0.5, 1) rounded down to a multiple of 1 / steps
    return math.ldexp(math.floor(mantissa * steps) / steps, exponent)


def measure(values: np.ndarray, norm_type: float = 2.0) -> NormStats:
    """NormStats of an in-memory array (flattened in C order)."""
    acc = NormAccumulator(norm_type)
    acc.add(np.ravel(values))
    return acc.finish()
