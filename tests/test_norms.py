import math

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
