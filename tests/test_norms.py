import decimal
import math
from decimal import Decimal
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from conftest import exact_norm
from hypothesis import given, settings
from hypothesis import strategies as st

from gclip_cli.norms import BLOCK, NormAccumulator, NormStats, measure

RTOL = 1e-12


def streamed(values: np.ndarray, chunk: int, p: float = 2.0) -> NormStats:
    acc = NormAccumulator(p)
    flat = values.ravel()
    for start in range(0, flat.size, chunk):
        acc.add(flat[start : start + chunk])
    return acc.finish()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_l2_norm_matches_exact_reference(dtype):
    values = np.random.default_rng(1).standard_normal(3 * BLOCK + 17).astype(dtype)
    assert measure(values).norm() == pytest.approx(exact_norm([values]), rel=RTOL)


@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e-320])
def test_extreme_float64_magnitudes_do_not_overflow_or_vanish(scale):
    values = np.random.default_rng(2).standard_normal(BLOCK + 5) * scale
    expected = exact_norm([values])
    assert math.isfinite(expected) and expected > 0
    assert measure(values).norm() == pytest.approx(expected, rel=RTOL)


def test_float16_squares_that_overflow_float16_are_counted():
    assert measure(np.array([60000, 60000], dtype=np.float16)).norm() == pytest.approx(
        84852.8137423857, rel=RTOL
    )


def test_bfloat16_sum_keeps_growing_past_256():
    values = np.ones(100_000, dtype=ml_dtypes.bfloat16)
    assert measure(values).norm() == pytest.approx(math.sqrt(100_000), rel=RTOL)


@pytest.mark.parametrize(
    ("p", "arrays", "expected"),
    [
        (math.inf, [[3, -4], [12, -13]], 13.0),
        (1, [[3, -4], [12]], 19.0),
        (3, [[1, 2], [2]], 17 ** (1 / 3)),
        (2, [[3, 4], [12]], 13.0),
        (0.5, [[1, 4], [9]], 36.0),
    ],
)
def test_norm_types_of_clipping_md(p, arrays, expected):
    total = NormStats(p)
    for a in arrays:
        total.merge(measure(np.array(a, dtype=np.float64), p))
    assert total.norm() == pytest.approx(expected, rel=RTOL)


def test_large_p_with_large_values_does_not_overflow():
    values = np.array([3e38, 1e38], dtype=np.float32)
    big, small = (float(v) for v in values)
    expected = big * (1 + (small / big) ** 9) ** (1 / 9)
    assert measure(values, 9).norm() == pytest.approx(expected, rel=RTOL)


def test_nonfinite_values_are_counted_and_left_out_of_the_finite_norm():
    stats = measure(np.array([3.0, np.nan, 4.0, np.inf, -np.inf]))
    assert (stats.nan, stats.inf, stats.numel) == (1, 2, 5)
    assert stats.finite_norm() == 5.0
    assert math.isnan(stats.norm())
    assert measure(np.array([1.0, np.inf])).norm() == math.inf
    assert stats.max_abs == 4.0


def test_zero_and_empty_tensors_have_norm_zero():
    assert measure(np.zeros(10)).norm() == 0.0
    assert measure(np.zeros(0)).norm() == 0.0


@settings(max_examples=60)
@given(
    n=st.integers(0, 3 * BLOCK),
    chunk=st.integers(1, 2 * BLOCK + 3),
    p=st.sampled_from([1.0, 2.0, 3.0, math.inf]),
    seed=st.integers(0, 2**32 - 1),
)
def test_result_is_bit_identical_whatever_the_chunk_size(n, chunk, p, seed):
    values = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    assert streamed(values, chunk, p).norm() == measure(values, p).norm()


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), parts=st.integers(1, 6))
def test_merging_is_exact_so_order_does_not_matter(seed, parts):
    rng = np.random.default_rng(seed)
    arrays = [
        rng.standard_normal(rng.integers(0, 5000)) * 10.0 ** rng.integers(-5, 5)
        for _ in range(parts)
    ]
    forward, backward = NormStats(2.0), NormStats(2.0)
    for a in arrays:
        forward.merge(measure(a))
    for a in reversed(arrays):
        backward.merge(measure(a))
    assert forward.norm() == backward.norm()
    assert forward.norm() == pytest.approx(exact_norm(arrays), rel=RTOL)


# --- every p, every magnitude (issue 20, items 5 and 6) ------------------------------------------

# p from vanishingly small to vanishingly close to inf: below 1, where a p-th root magnifies
# rounding; around _FINE_P, where the block references change; 1075, where 2**-p underflows
EVERY_P = [1e-300, 1e-5, 2.0**-12, 0.001, 0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 7.5, 511.0, 513.0]
EVERY_P += [1075.0, 1e6, 1e300, math.inf]
EXTREME_FLOATS = st.floats(allow_nan=False, allow_infinity=False)  # subnormals to float64's max


def reference_norm(values, p: float, counts=None) -> float:
    """(sum count * |x|**p) ** (1/p) in 50-digit decimal arithmetic with an exponent range no
    float64 input can leave (relative to the largest |x|, so huge p underflows only what is
    negligible), rounded to float64: inf where the norm exceeds float64's range.  *counts*:
    how many times each value occurs (default once)."""
    values = np.ravel(values).astype(np.float64)
    counts = np.ones(values.size, dtype=np.int64) if counts is None else np.ravel(counts)
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 50, 10**15, -(10**15)
        for signal in (decimal.Overflow, decimal.Underflow, decimal.Inexact, decimal.Rounded):
            ctx.traps[signal] = False
        ctx.traps[decimal.Subnormal] = ctx.traps[decimal.Clamped] = False
        terms = [(abs(Decimal(float(v))), int(c)) for v, c in zip(values, counts, strict=True) if v]
        if not terms:
            return 0.0
        largest = max(m for m, _ in terms)
        if math.isinf(p):
            return float(largest)
        power = Decimal(p)
        total = sum((c * (m / largest) ** power for m, c in terms), Decimal(0))
        return float(largest * total ** (1 / power))


def assert_norm_matches(norm: float, reference: float, p: float) -> None:
    """Within 1e-12 of the reference; equal where it is 0, inf (beyond float64) or exact."""
    if reference == 0.0 or math.isinf(reference) or p < 2.0**-12:
        assert norm == reference
    else:
        assert norm == pytest.approx(reference, rel=RTOL)


@settings(max_examples=150)
@given(
    values=st.lists(EXTREME_FLOATS, min_size=1, max_size=12),
    p=st.sampled_from(EVERY_P),
)
def test_norm_of_any_magnitudes_for_any_p_matches_a_decimal_reference(values, p):
    values = np.array(values)
    assert_norm_matches(measure(values, p).finite_norm(), reference_norm(values, p), p)


@pytest.mark.parametrize("p", EVERY_P)
@pytest.mark.parametrize(
    "values",
    [
        [4.0, 2.0, 1.0],  # -p 1075: the powers of 2 and 1 relative to 4 underflow, the norm is 4
        [1.5e308, -1.5e308, 1e308],  # the L2 norm exceeds float64's range
        [np.finfo(np.float64).max] * 3,
        [5e-324, -5e-324, 1e-310],  # subnormals only
        [1.7e308, 5e-324, 0.0, -1.0],
        [0.0, -3.5, 0.0],  # one non-zero value: its magnitude, exactly, whatever p
    ],
)
def test_norms_at_the_ends_of_float64(values, p):
    values = np.array(values)
    norm = measure(values, p).finite_norm()
    assert_norm_matches(norm, reference_norm(values, p), p)
    if np.count_nonzero(values) == 1 and p < 2.0**-12:  # exact where a root would magnify
        assert norm == 3.5


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("p", EVERY_P)
def test_norms_of_the_narrow_types_extremes_for_any_p(dtype, p):
    info = ml_dtypes.finfo(dtype)
    values = np.array(
        [float(info.max), -float(info.max), float(info.smallest_subnormal), 1.0], dtype=dtype
    )
    repeats = 3 * BLOCK // 4 + 1  # several blocks
    stats = streamed(np.tile(values, repeats), 5000, p)
    reference = reference_norm(values, p, counts=np.full(values.size, repeats))
    assert_norm_matches(stats.finite_norm(), reference, p)


def test_a_norm_beyond_float64_is_inf_and_its_exact_value_is_kept():
    values = np.array([1.5e308, 1.5e308, 1e308])
    stats = measure(values)
    assert stats.finite_norm() == math.inf and stats.norm() == math.inf
    exact = sum(Fraction(float(v)) ** 2 for v in values)
    assert abs(stats.finite_norm_exact() ** 2 / exact - 1) < 1e-15


@pytest.mark.parametrize("p", [0.5, 3.0, 1075.0, 1e6, 1e300])
def test_merging_for_any_p_is_exact_so_order_does_not_matter(p):
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(700) * 10.0 ** rng.integers(-200, 200) for _ in range(8)]
    forward, backward = NormStats(p), NormStats(p)
    for a in arrays:
        forward.merge(measure(a, p))
    for a in reversed(arrays):
        backward.merge(measure(a, p))
    assert forward.finite_norm() == backward.finite_norm()
    assert_norm_matches(forward.finite_norm(), reference_norm(np.concatenate(arrays), p), p)


@pytest.mark.parametrize("p", [600.0, 1075.0, 1e6, 1e300])
def test_the_statistics_of_many_blocks_stay_small_for_huge_p(p):
    """Each block is divided by a float near its own peak; references whose weight in the
    result is 0 are dropped, so a million-block tensor does not keep a million of them."""
    rng = np.random.default_rng(6)
    peaks = 2.0 ** rng.uniform(-20, 20, 2000)  # 2000 blocks of 2 values, every peak different
    stats = NormStats(p)
    for peak in peaks:
        stats.merge(measure(np.array([peak, peak / 3]), p))
    assert len(stats.sums) <= 65
    assert stats.finite_norm() == pytest.approx(
        reference_norm(np.concatenate([peaks, peaks / 3]), p), rel=RTOL
    )


@settings(max_examples=40)
@given(
    values=st.lists(EXTREME_FLOATS, min_size=1, max_size=5),
    chunk=st.integers(1, 2 * BLOCK + 3),
    p=st.sampled_from(EVERY_P),
)
def test_extreme_values_for_any_p_give_the_same_bits_whatever_the_chunk_size(values, chunk, p):
    tiled = np.resize(np.array(values), 2 * BLOCK + 11)  # blocks of different peaks
    assert streamed(tiled, chunk, p).finite_norm_parts() == measure(tiled, p).finite_norm_parts()
