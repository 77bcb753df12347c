import math
import warnings
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from conftest import exactly_scaled, nearest
from hypothesis import given, settings
from hypothesis import strategies as st

from gclip_cli import kernels, rounding
from gclip_cli.rounding import ScaleFactor, ScratchBuffers, round_to_odd_float32, scale

NARROW = [np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]
ALPHAS = [0.3, 1 / 3, 0.7071067811865476, 0.123456789012345, 2.0**-10 * 1.1]


def scaled_copy(values: np.ndarray, q: Fraction, block: int) -> np.ndarray:
    """*values* scaled by *q* in place of a copy, *block* values at a time."""
    scaled = values.copy()
    scale(scaled, scaled, ScaleFactor(q), ScratchBuffers(block))
    return scaled


def every_finite_value(dtype) -> np.ndarray:
    bits = np.arange(2 ** (8 * np.dtype(dtype).itemsize), dtype=np.uint32)
    uint = np.uint8 if np.dtype(dtype).itemsize == 1 else np.uint16
    values = bits.astype(uint).view(dtype)
    with np.errstate(invalid="ignore"):
        return values[np.isfinite(values.astype(np.float64))]


def nearest_by_enumeration(exact: Fraction, table: np.ndarray, dtype) -> float:
    """Round *exact* to nearest among all finite values of *dtype*, ties to an even last bit."""
    wide = table.astype(np.float64)
    order = np.argsort(wide, kind="stable")
    i = int(np.searchsorted(wide[order], float(exact)))
    candidates = [order[j] for j in (i - 1, i, i + 1) if 0 <= j < len(order)]
    uint = np.uint8 if np.dtype(dtype).itemsize == 1 else np.uint16
    best = min(
        candidates,
        key=lambda j: (
            abs(Fraction(float(wide[j])) - exact),
            int(table[j : j + 1].view(uint)[0]) & 1,
        ),
    )
    return float(wide[best])


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_every_value_of_a_narrow_type_is_rounded_once_to_nearest(dtype, alpha):
    table = every_finite_value(dtype)
    scaled = table.copy()
    scale(scaled, scaled, ScaleFactor.of(alpha), ScratchBuffers(1000))
    sample = np.random.default_rng(0).choice(table.size, size=min(table.size, 400), replace=False)
    for i in sample:
        exact = Fraction(float(table[i].astype(np.float64))) * Fraction(alpha)
        assert float(scaled[i].astype(np.float64)) == nearest_by_enumeration(exact, table, dtype)


def double_rounding_cases(count: int) -> list[tuple[np.float32, float]]:
    """float32 v and alpha whose float64 product lands exactly on a float32 midpoint while the
    exact product lies above it: converting the float64 product rounds the wrong way."""
    midpoint = Fraction(1, 2) + Fraction(1, 2**25)
    cases = []
    for k in range(1, 5000):
        v = np.float32(1 + k * 2.0**-23)
        alpha = float(np.nextafter(float(midpoint / Fraction(float(v))), 1.0))
        if float(v) * alpha == float(midpoint) and Fraction(float(v)) * Fraction(alpha) > midpoint:
            cases.append((v, alpha))
        if len(cases) == count:
            break
    return cases


def test_float32_products_on_a_midpoint_are_rounded_from_the_exact_value():
    cases = double_rounding_cases(20)
    assert len(cases) == 20
    for v, alpha in cases:
        naive = np.float32(float(v) * alpha)
        values = np.array([v], dtype=np.float32)
        scale(values, values, ScaleFactor.of(alpha), ScratchBuffers(16))
        assert values[0] == np.float32(0.5 + 2.0**-24) != naive


def test_float32_big_endian_is_scaled_in_its_own_byte_order():
    values = np.array([3.0, 4.0], dtype=">f4")
    scale(values, values, ScaleFactor(Fraction(1, 5)), ScratchBuffers(4))
    assert values.dtype == np.dtype(">f4")
    assert values.tolist() == [np.float32(0.6), np.float32(0.8)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("q", [Fraction(1, 5), Fraction(1, 3), Fraction(10, 13), Fraction(2, 7919)])
def test_products_with_an_exact_fraction_are_correctly_rounded(dtype, q):
    values = (np.random.default_rng(3).standard_normal(3000) * 10).astype(dtype)
    scaled = scaled_copy(values, q, 256)
    assert np.array_equal(scaled, exactly_scaled(values, q))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, ml_dtypes.bfloat16])
def test_source_is_left_alone_when_writing_elsewhere(dtype):
    values = np.array([3.0, 4.0, 5.5], dtype=dtype)
    read_only = values.copy()
    read_only.flags.writeable = False
    out = np.empty_like(values)
    scale(read_only, out, ScaleFactor(Fraction(1, 5)), ScratchBuffers(2))
    assert np.array_equal(read_only, values)
    assert np.array_equal(out, exactly_scaled(values, Fraction(1, 5)))


def test_float64_worked_example_is_exact():
    values = np.array([3.0, 4.0, 0.0])
    scale(values, values, ScaleFactor(Fraction(1, 5)), ScratchBuffers())
    assert values.tolist() == [0.6, 0.8, 0.0]  # where fl(3 * fl(1/5)) is 0.6000000000000001


@pytest.mark.parametrize("magnitude", [1e300, 1e-300])
def test_float64_extremes_are_correctly_rounded(magnitude):
    values = np.random.default_rng(8).standard_normal(500) * magnitude
    q = Fraction(3, 7)
    scaled = scaled_copy(values, q, 64)
    assert np.isfinite(scaled).all()
    assert np.array_equal(scaled, exactly_scaled(values, q))


def test_round_to_odd_marks_inexact_results_with_an_odd_last_bit():
    wide = np.array([1.0, 1 + 2.0**-30, 1 - 2.0**-30, -(1 + 2.0**-30), 2.0**-140 * 1.3])
    narrow = round_to_odd_float32(wide)
    bits = narrow.view(np.uint32)
    assert narrow[0] == 1.0 and bits[0] % 2 == 0
    for w, n, b in zip(wide[1:], narrow[1:], bits[1:], strict=True):
        assert b % 2 == 1
        assert abs(float(n) - w) < float(np.spacing(np.abs(n)))  # one of w's two neighbours


def values_of_every_magnitude(dtype, count: int = 4000) -> np.ndarray:
    """Random values whose exponents span *dtype*'s whole range, subnormals and signs included."""
    rng = np.random.default_rng(11)
    info = np.finfo(dtype)
    exponents = rng.uniform(np.log2(float(info.smallest_subnormal)), info.maxexp - 1, count)
    signs = rng.choice([-1.0, 1.0], count)
    return (signs * np.exp2(exponents)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(
    "q", [Fraction(1, 3), Fraction(10**6, 10**6 + 1), Fraction(7, 2**20), Fraction(1, 2**700)]
)
def test_bracketed_products_over_the_whole_range_are_correctly_rounded(dtype, q):
    values = values_of_every_magnitude(dtype)
    assert ScaleFactor(q).brackets(values.dtype)
    scaled = scaled_copy(values, q, 512)
    bits = f"u{values.itemsize}"  # -0.0 and 0.0 differ
    assert np.array_equal(scaled.view(bits), exactly_scaled(values, q).view(bits))


@pytest.mark.parametrize("q", [Fraction(1, 2**801), Fraction(3, 2**810)])
def test_factors_too_small_to_bracket_are_still_correctly_rounded(q):
    values = np.array([2.0**120 * 1.75, -(2.0**127) * 1.2, 3.0, 0.0], dtype=np.float32)
    assert not ScaleFactor(q).brackets(values.dtype)
    scaled = scaled_copy(values, q, 4)
    assert np.array_equal(scaled, exactly_scaled(values, q))


def test_factors_above_one_are_correctly_rounded_near_the_largest_float32():
    values = np.array([np.finfo(np.float32).max / 3, -1e-40, 1.0], dtype=np.float32)
    q = Fraction(2999999, 1000000)
    scaled = scaled_copy(values, q, 4)
    assert np.isfinite(scaled).all()
    assert np.array_equal(scaled, exactly_scaled(values, q))


def test_bracketing_keeps_nan_and_infinity():
    values = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32)
    scaled = scaled_copy(values, Fraction(1, 3), 4)
    assert np.isnan(scaled[0]) and scaled[1] == np.inf and scaled[2] == -np.inf
    assert scaled[3] == 0 and np.signbit(scaled[3])


def counting_exact_fallback(monkeypatch) -> list[Fraction]:
    """The products handed to the per-value Fraction fallback, from now on."""
    handed, real = [], rounding.round_exact
    monkeypatch.setattr(
        rounding, "round_exact", lambda exact, dtype: handed.append(exact) or real(exact, dtype)
    )
    return handed


def count_ties(values: np.ndarray, q: Fraction) -> int:
    """How many exact products lie exactly halfway between two values of their dtype."""
    ties = 0
    for v in values.astype(np.float64):
        exact = Fraction(float(v)) * q
        rounded = nearest(exact, values.dtype)
        other = float(2 * exact - Fraction(rounded))
        ties += other != rounded and float(np.array(other).astype(values.dtype)) == other
    return ties


MIDPOINT_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


@pytest.mark.parametrize("dtype", MIDPOINT_DTYPES)
def test_products_exactly_on_midpoints_go_to_even_without_fractions(dtype, monkeypatch):
    values = (np.random.default_rng(5).standard_normal(4000) * 10).astype(dtype)
    q = Fraction(3, 4)  # puts about a third of all products exactly on a midpoint
    assert count_ties(values, q) > 500
    handed = counting_exact_fallback(monkeypatch)
    assert np.array_equal(scaled_copy(values, q, 1024), exactly_scaled(values, q))
    assert handed == []


@pytest.mark.parametrize("dtype", [np.float32, np.float16])  # the bracketed types
def test_products_a_hair_off_midpoints_are_settled_without_fractions(dtype, monkeypatch):
    values = (np.random.default_rng(6).standard_normal(4000) * 10).astype(dtype)
    factor = ScaleFactor.of(0.37)  # within 2**-54 of 37/100, which puts products on midpoints
    wide = values.astype(np.float64)
    bracket = [(wide * f).astype(dtype) for f in (factor.below, factor.above)]
    assert (bracket[0] != bracket[1]).sum() > 20  # float64 products cannot tell these apart
    handed = counting_exact_fallback(monkeypatch)
    assert np.array_equal(
        scaled_copy(values, factor.exact, 1024), exactly_scaled(values, factor.exact)
    )
    assert handed == []


@pytest.mark.parametrize("dtype", MIDPOINT_DTYPES)
def test_products_too_close_to_a_midpoint_for_double_double_go_to_fractions(dtype, monkeypatch):
    values = (np.random.default_rng(7).standard_normal(2000) * 10).astype(dtype)
    q = Fraction(3, 4) + Fraction(1, 2**120)  # just above a third of the midpoints
    handed = counting_exact_fallback(monkeypatch)
    assert np.array_equal(scaled_copy(values, q, 1024), exactly_scaled(values, q))
    assert len(handed) > 100


# --- float64 at the ends of its range (issue 20, item 14) ----------------------------------------


def float64_product(v: float, q: Fraction) -> float:
    """v * q rounded once to nearest float64, ties to even (as Python divides integers), inf
    beyond float64's largest value plus half its step, with v's sign (zeros too: q > 0)."""
    try:
        product = float(Fraction(v) * q)
    except OverflowError:
        product = math.inf
    return math.copysign(product, v)


def assert_scaled_exactly(values: np.ndarray, q: Fraction, block: int = 64) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings on the way
        scaled = scaled_copy(values, q, block)
    expected = np.array([float64_product(float(v), q) for v in values])
    assert scaled.view(np.uint64).tolist() == expected.view(np.uint64).tolist()


def test_float64_products_in_a_block_with_huge_values_keep_their_own_precision():
    # the cases of the issue: clipping to 0.5 a file whose norm is 2.247e307
    q = Fraction(0.5) / Fraction(2.247e307)
    values = np.array([2.247e307, 0.0078125, 2.5565e15, 1.0, -3e-310, 1e-300, -0.0, 0.0])
    scaled = scaled_copy(values, q, 64)
    assert scaled[1] == nearest(Fraction(0.0078125) * q, np.float64) == 1.7384290164664e-310
    assert scaled[2] == nearest(Fraction(2.5565e15) * q, np.float64)  # 5.6887e-293: all digits
    assert_scaled_exactly(values, q)


EXTREME_FLOAT64 = st.floats(allow_nan=False, allow_infinity=False)
# factors of every size: clip factors down to far below 2**-1074, normalising factors up to far
# beyond float64; short fractions (ties), long ones, and dyadic ones of more than 53 bits
ANY_FACTOR = st.builds(
    lambda n, d, k: Fraction(n, d) * Fraction(2) ** k,
    st.integers(1, 2**64),
    st.integers(1, 2**64),
    st.integers(-1200, 1200),
) | st.sampled_from([Fraction(1, 2), Fraction(3, 4), Fraction(1) + Fraction(1, 2**60)])


@settings(max_examples=200)
@given(values=st.lists(EXTREME_FLOAT64, min_size=1, max_size=40), q=ANY_FACTOR)
def test_float64_products_of_any_magnitude_are_correctly_rounded(values, q):
    assert_scaled_exactly(np.array(values), q, block=16)


@pytest.mark.parametrize("q", [Fraction(1, 2), Fraction(3, 4), Fraction(5, 2**63)])
def test_float64_ties_below_the_normal_range_go_to_even_without_fractions(q, monkeypatch):
    odd = np.arange(1, 4001, 2, dtype=np.uint64).view(np.float64)  # odd multiples of 2**-1074
    values = np.concatenate([odd, -odd, odd * 2.0**600])
    handed = counting_exact_fallback(monkeypatch)
    assert_scaled_exactly(values, q)
    assert handed == []


# just above the midpoints of a quarter of the products; the second so little that lo is 0
@pytest.mark.parametrize(
    "q", [Fraction(3, 4) + Fraction(1, 2**120), Fraction(3, 4) + Fraction(1, 2**2000)]
)
def test_float64_products_too_close_to_a_midpoint_go_to_fractions(q, monkeypatch):
    values = np.random.default_rng(9).standard_normal(2000) * 10
    handed = counting_exact_fallback(monkeypatch)
    assert_scaled_exactly(values, q)
    assert len(handed) > 100


def test_float64_products_beyond_the_largest_value_round_to_infinity():
    largest = float(np.finfo(np.float64).max)
    below = math.nextafter(largest / 2, 0.0)  # doubled: within half a step of overflowing
    values = np.array([largest / 2, below, math.nextafter(below, 0.0), -largest / 3, 1.0])
    for q in (Fraction(2), Fraction(2) + Fraction(1, 2**53), Fraction(3)):
        assert_scaled_exactly(values, q)


def test_float64_is_scaled_by_numpy_alone_so_kernels_cannot_change_it(monkeypatch):
    values = np.array([2.247e307, 0.0078125, -1e-310, 3.0])
    assert not kernels.handle(values, values.copy())
    q = Fraction(1, 3) / Fraction(2.247e307)
    with_kernels = scaled_copy(values, q, 4)
    monkeypatch.setattr(kernels, "compiled", None)
    assert scaled_copy(values, q, 4).tobytes() == with_kernels.tobytes()


def test_float64_in_its_own_byte_order_and_elsewhere_is_scaled_alike():
    values = np.array([1.5e308, -2.5e-310, 3.0, -0.0])
    q = Fraction(1, 7) * Fraction(2) ** -60
    big_endian = values.astype(">f8")
    out = np.empty_like(values)
    scale(big_endian, big_endian, ScaleFactor(q), ScratchBuffers(2))
    scale(values, out, ScaleFactor(q), ScratchBuffers(2))
    assert big_endian.astype(np.float64).tobytes() == out.tobytes()
    assert_scaled_exactly(values, q)
