"""p-norm accumulation that is exact to float64 rounding and independent of how data is chunked.

Values are cut into fixed blocks of ``BLOCK`` values counted from the start of each tensor, so the
blocks (and their float64 partial sums) are the same whatever size the chunks read from a file
have.  Each block sum is added to an exact running sum (Shewchuk's algorithm, as in
``math.fsum``), which makes the total independent of the order blocks and tensors are merged in.
Blocks whose powers would overflow or underflow float64 are rescaled by a power of two first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import kernels

BLOCK = 1 << 16  # values per block: its float64 working copy (512 KiB) stays in cache

# A block whose largest p-th power lies outside 2**[_MIN_EXPONENT, _MAX_EXPONENT] is scaled by a
# power of two first, so no power overflows (the bound leaves room to sum 2**60 blocks) and the
# largest ones do not underflow.
_MAX_EXPONENT = 880
_MIN_EXPONENT = -900


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

    The sum of |x|**p is kept as exact partial sums per power-of-two scale: the true sum is
    ``sum(2**(k*p) * fsum(sums[k]) for k in sums)``.  Almost always only scale 0 is present.
    Non-finite values are counted and left out of the sums and of ``max_abs``.
    """

    norm_type: float
    numel: int = 0
    nan: int = 0
    inf: int = 0
    max_abs: float = 0.0
    sums: dict[int, list[float]] = field(default_factory=dict)

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    def merge(self, other: NormStats) -> None:
        self.numel += other.numel
        self.nan += other.nan
        self.inf += other.inf
        self.max_abs = max(self.max_abs, other.max_abs)
        for scale, partials in other.sums.items():
            for part in partials:
                self._add(scale, part)

    def _add(self, scale: int, value: float) -> None:
        _add_exact(self.sums.setdefault(scale, []), value)

    def finite_norm(self) -> float:
        """The p-norm of the finite values."""
        p = self.norm_type
        if math.isinf(p):
            return self.max_abs
        totals = {k: math.fsum(parts) for k, parts in self.sums.items()}
        totals = {k: t for k, t in totals.items() if t > 0.0}
        if not totals:
            return 0.0
        top = max(totals)
        scaled = math.fsum(t * 2.0 ** ((k - top) * p) for k, t in totals.items())
        root = math.sqrt(scaled) if p == 2 else scaled ** (1.0 / p)
        return math.ldexp(root, top)

    def norm(self) -> float:
        """The p-norm of all values: NaN if any value is NaN, inf if any is infinite."""
        if self.nan:
            return math.nan
        if self.inf:
            return math.inf
        return self.finite_norm()


class NormAccumulator:
    """Streams the values of one tensor, in order and in chunks of any size, into NormStats."""

    def __init__(self, norm_type: float) -> None:
        self.stats = NormStats(norm_type)
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
                self.stats._add(0, total)

    def _reduce_block(self, values: np.ndarray) -> None:
        block = self._work[: values.size]
        (np.square if self._squares else np.abs)(values, out=block, dtype=np.float64)
        self.stats.numel += values.size
        if self._squares:
            self._reduce_squares(block)
            return
        peak = float(np.maximum.reduce(block))
        if not math.isfinite(peak):
            peak = self._zero_nonfinite(block)
        self.stats.max_abs = max(self.stats.max_abs, peak)
        if peak == 0.0 or math.isinf(self.stats.norm_type):
            return
        scale = self._scale_exponent(peak)
        if scale:
            # Two exact power-of-two steps: 2**-scale alone can overflow for subnormal peaks.
            half = -scale // 2
            np.multiply(block, math.ldexp(1.0, half), out=block)
            np.multiply(block, math.ldexp(1.0, -scale - half), out=block)
        self.stats._add(scale, self._power_sum(block))

    def _reduce_squares(self, block: np.ndarray) -> None:
        """Sum a block of exact squares: no rescaling is needed (float32 squares lie within
        2**-298 .. 2**256) and the square root of the largest is exactly the largest |value|."""
        top = float(np.maximum.reduce(block))
        if not math.isfinite(top):
            top = self._zero_nonfinite(block)
        self.stats.max_abs = max(self.stats.max_abs, math.sqrt(top))
        if top:
            self.stats._add(0, float(np.add.reduce(block)))

    def _scale_exponent(self, peak: float) -> int:
        """0 when the block's p-th powers fit float64 safely, else the exponent to divide out."""
        exponent = math.frexp(peak)[1]
        p = self.stats.norm_type
        if (exponent - 1) * p > _MIN_EXPONENT and exponent * p < _MAX_EXPONENT:
            return 0
        return exponent

    def _zero_nonfinite(self, block: np.ndarray) -> float:
        """Count NaN/Inf in *block*, set them to 0 and return the new peak."""
        nan = np.isnan(block)
        inf = np.isinf(block)
        self.stats.nan += int(np.count_nonzero(nan))
        self.stats.inf += int(np.count_nonzero(inf))
        block[nan | inf] = 0.0
        return float(np.maximum.reduce(block))

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


def measure(values: np.ndarray, norm_type: float = 2.0) -> NormStats:
    """NormStats of an in-memory array (flattened in C order)."""
    acc = NormAccumulator(norm_type)
    acc.add(np.ravel(values))
    return acc.finish()
