import math
from fractions import Fraction

import numpy as np
import pytest
from conftest import SUFFIX, progress_by_phase

from gclip_cli.engine import (
    RoundingBound,
    clip_factor,
    combine,
    dividing_norm,
    norm_share,
    rounding_bound,
)
from gclip_cli.formats import TensorInfo
from gclip_cli.norms import NormStats, measure
from gclip_cli.options import Options


@pytest.mark.parametrize(
    ("norm", "max_norm", "eps", "expected"),
    [
        (5.0, 1.0, 0.0, 0.2),
        (0.5, 1.0, 0.0, 1.0),
        (13.0, 13.0, 0.0, 1.0),  # exactly at the threshold: unchanged (TF semantics)
        (13.0, 13.0, 1e-6, 1.0),  # PyTorch would scale by 0.99999992 here; gclip does not
        (0.0, 1.0, 0.0, 1.0),  # all-zero gradients: no division by zero
        (5.0, 2.5, 0.0, 0.5),
        (20.0, 1.0, 1e-6, float(1 / (20 + Fraction(1e-6)))),
    ],
)
def test_clip_factor(norm, max_norm, eps, expected):
    assert clip_factor(norm, max_norm, eps).hi == expected


def test_clip_factor_is_exact_and_exactly_one_when_not_clipping():
    assert clip_factor(5.0, 1.0).exact == Fraction(1, 5)
    assert clip_factor(math.nextafter(1.0, 0), 1.0).exact == 1
    assert clip_factor(math.nextafter(1.0, 2), 1.0).exact < 1
    within = RoundingBound(relative=2e-8)
    assert clip_factor(1 + 1e-8, 1.0, bound=within).exact == 1
    assert clip_factor(1 + 3e-8, 1.0, bound=within).exact < 1
    assert clip_factor(1.5, 1.0, bound=RoundingBound(absolute=0.6)).exact == 1


def test_rounding_bound_weights_each_dtypes_roundoff_by_its_share():
    f32, f64 = _tensor("a", np.float32), _tensor("b", np.float64)
    a, b = measure(np.array([3.0])), measure(np.array([4.0]))
    bound = rounding_bound([f32, f64], [a, b], combine([a, b], 2.0))
    # to first order: share * u for each tensor
    assert bound.relative == pytest.approx(9 / 25 * 2.0**-24 + 16 / 25 * 2.0**-53, rel=1e-3)
    assert bound.absolute == pytest.approx(2.0**-150, rel=1e-9)  # half a float32 subnormal
    only64 = rounding_bound([f64], [b], combine([b], 2.0)).relative
    assert 2.0**-53 < only64 < 1e-14
    inf_total = combine([measure(np.array([3.0]), math.inf)], math.inf)
    assert rounding_bound([f32], [inf_total], inf_total).relative == pytest.approx(2.0**-24)


def test_rounding_bound_counts_half_a_subnormal_step_per_float16_value():
    f16 = TensorInfo("h", "float16", (100,), 200, dtype=np.dtype(np.float16))
    stats = measure(np.full(100, 0.5, dtype=np.float16))
    bound = rounding_bound([f16], [stats], combine([stats], 2.0))
    assert bound.absolute == pytest.approx(math.sqrt(100) * 2.0**-25)


def test_combine_skips_non_gradient_entries():
    total = combine([measure(np.array([3.0])), None, measure(np.array([4.0]))], 2.0)
    assert total.norm() == 5.0


def test_norm_share_is_the_fraction_of_the_sum_of_powers():
    a, b = measure(np.array([3.0])), measure(np.array([4.0]))
    total = combine([a, b], 2.0)
    assert norm_share(a, total) == pytest.approx(9 / 25)
    assert norm_share(b, total) == pytest.approx(16 / 25)
    inf_total = combine([measure(np.array([3.0]), math.inf)], math.inf)
    assert norm_share(inf_total, inf_total) is None
    assert norm_share(NormStats(2.0), NormStats(2.0)) == 0.0


def _tensor(name: str, dtype) -> TensorInfo:
    return TensorInfo(name, np.dtype(dtype).name, (4,), 16, dtype=np.dtype(dtype))


def test_each_pass_announces_the_bytes_of_its_gradients_then_does_them(make_file, fmt, tmp_path):
    import gclip_cli

    values = {"w": np.ones(1000, np.float32), "h": np.ones((30, 7), np.float16), "n": np.arange(9)}
    gradient_bytes = values["w"].nbytes + values["h"].nbytes  # not the integers
    src = make_file(fmt, values)
    seen = []
    gclip_cli.inspect_file(src, progress=seen.append, options=Options(chunk_size=1024))
    inspected = len(seen)
    out = tmp_path / f"o{SUFFIX[fmt]}"
    gclip_cli.rescale_file(
        src, out, max_norm=1.0, progress=seen.append, options=Options(chunk_size=1024)
    )
    measuring = ("measuring", gradient_bytes, gradient_bytes)
    assert progress_by_phase(seen[:inspected]) == [measuring]
    assert progress_by_phase(seen[inspected:]) == [measuring, ("writing", *measuring[1:])]
    assert all(0 < e <= 1024 for e in seen if isinstance(e, int))  # chunk by chunk


def test_the_measuring_phase_counts_only_the_selected_tensors(make_file, fmt):
    import gclip_cli

    values = {"w": np.ones(1000, np.float32), "h": np.ones(70, np.float64)}
    seen = []
    gclip_cli.inspect_file(
        make_file(fmt, values), progress=seen.append, options=Options(exclude=("h",))
    )
    assert progress_by_phase(seen) == [("measuring", values["w"].nbytes, values["w"].nbytes)]


# --- norms beyond float64 and every p (issue 20, items 5 and 6) ----------------------------------


@pytest.mark.parametrize("p", [1e-300, 1e-5, 0.5, 2.0, 1075.0, 1e300, math.inf])
def test_rounding_bound_never_overflows_whatever_p(p):
    f16, f64 = _tensor("h", np.float16), _tensor("d", np.float64)
    parts = [measure(np.array([60000.0, 3.0], dtype=np.float16), p), measure(np.array([1e308]), p)]
    bound = rounding_bound([f16, f64], parts, combine(parts, p))
    u16 = 2.0**-11  # float16's unit roundoff: the power mean of (1 + u) lies within [1, 1 + u16]
    assert 0 <= bound.relative <= u16 + 2.0**-48 / max(min(p, 1.0), 2.0**-12)
    assert bound.absolute >= 2.0**-25  # half a float16 subnormal step, at least
    if 1075 <= p < math.inf:  # float16's share of the sum of |x|**p is nil: only float64's u
        assert bound.relative < 2.0**-47


def test_rounding_bounds_add_up_as_p_th_powers_below_p_1():
    # for p < 1 the triangle inequality fails; |a + e|**p <= |a|**p + |e|**p holds instead
    assert RoundingBound(0.0, 1.0, norm_type=0.5).limit(1.0) == pytest.approx(4.0)
    assert RoundingBound(0.0, 1.0, norm_type=2.0).limit(1.0) == 2.0
    assert RoundingBound(0.0, 1e300, norm_type=0.01).limit(1e300) == math.inf


def test_clip_factor_divides_by_the_exact_norm_beyond_float64():
    stats = measure(np.array([1.5e308, 1.5e308, 1e308]))
    assert stats.finite_norm() == math.inf
    norm = dividing_norm(stats, stats.finite_norm())
    squares = sum(Fraction(v) ** 2 for v in (1.5e308, 1.5e308, 1e308))
    assert isinstance(norm, Fraction) and abs(norm**2 / squares - 1) < 1e-15
    factor = clip_factor(norm, 1.0)
    assert factor.exact == 1 / norm and factor.hi == float(1 / norm)  # a subnormal factor
    assert dividing_norm(measure(np.array([1.0, np.inf])), math.inf) is None
    assert dividing_norm(stats, 3.0) == 3.0


def test_shares_are_taken_of_the_sums_so_norms_beyond_float64_have_them():
    a, b = measure(np.array([1.5e308, 1.5e308])), measure(np.array([1e308]))
    total = combine([a, b], 2.0)
    assert total.finite_norm() == math.inf
    assert norm_share(a, total) == pytest.approx(4.5 / 5.5, rel=1e-15)
    assert norm_share(b, total) == pytest.approx(1 / 5.5, rel=1e-15)


@pytest.mark.parametrize("p", [1075.0, 1e300])
def test_shares_for_huge_p_go_to_the_largest_values(p):
    a, b = measure(np.array([4.0, -4.0, 1.0]), p), measure(np.array([3.9]), p)
    total = combine([a, b], p)
    assert norm_share(a, total) == pytest.approx(1.0) and norm_share(b, total) < 1e-11
