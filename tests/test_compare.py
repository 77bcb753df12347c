"""diff: what it compares, each file's own norm, names '.' and '/' alike, and its exit codes."""

import json
import math
import subprocess
import sys
from contextlib import closing

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SUFFIX, CoreOnly, exact_norm, neighbours, read_tensors, write_tensors

import gclip_cli
from gclip_cli import compare
from gclip_cli.api import diff_files
from gclip_cli.cli import main
from gclip_cli.compare import pair_by_name
from gclip_cli.formats import TensorInfo, open_file
from gclip_cli.options import Options


def exact(arrays: list[np.ndarray]):
    """The exact reference norm, to float64 rounding (gclip sums each block in float64)."""
    return pytest.approx(exact_norm(arrays), rel=1e-12)


def gclip(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


def gradients() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(21)
    return {
        "enc.0.w": rng.standard_normal((20, 10)).astype(np.float32),
        "enc.0.b": (rng.standard_normal(10) * 0.01).astype(np.float32),
        "dec.0.w": rng.standard_normal((10, 5)) * 3,  # float64
        "dec.1.w": rng.standard_normal(7).astype(np.float16),
        "step": np.array(9, dtype=np.int64),
    }


def statuses(diff) -> dict[str, str]:
    return {t.name: t.status for t in diff.tensors}


def test_identical_files_are_the_same_and_exit_0(make_file, fmt, tmp_path):
    grads = gradients()
    a, b = make_file(fmt, grads, "a"), make_file(fmt, grads, "b")
    diff = diff_files(a, b, options=Options(chunk_size=1000))
    assert diff.same and set(statuses(diff).values()) == {"same"}
    assert diff.counts == {
        "compared": 5,
        "same": 5,
        "differ": 0,
        "only_in_a": 0,
        "only_in_b": 0,
        "not_compared": 0,
        "shared": 4,
    }
    floats = [v for k, v in grads.items() if k != "step"]
    assert diff.global_norm_a == diff.global_norm_b == exact(floats)
    assert diff.shared_norm_a == exact(floats) and diff.cosine == pytest.approx(1, abs=1e-15)
    proc = gclip("diff", a, b)
    assert proc.returncode == 0, proc.stderr
    assert "A and B hold the same tensors with the same values" in proc.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_one_value_one_ulp_apart_differs_and_exits_1(make_file, fmt, dtype):
    values = np.linspace(-1, 1, 300).astype(dtype)
    changed = values.copy()
    changed[123] = neighbours(values[123], np.dtype(dtype))[2]
    a = make_file(fmt, {"w": values, "b": np.ones(3, dtype)}, "a")
    b = make_file(fmt, {"w": changed, "b": np.ones(3, dtype)}, "b")
    diff = diff_files(a, b)
    w = {t.name: t for t in diff.tensors}["w"]
    assert (w.status, w.values_differ, w.note) == ("differs", 1, "1 values differ")
    assert statuses(diff)["b"] == "same" and not diff.same
    assert diff.global_norm_b == exact([changed, np.ones(3, dtype)])
    assert gclip("diff", a, b).returncode == 1


def test_own_norms_cover_every_tensor_and_shared_norms_the_shared_ones(make_file):
    """The issue's case: A's 'global norm' was that of the tensors both files hold."""
    rng = np.random.default_rng(5)
    shared = {"s": rng.standard_normal(40).astype(np.float32) * 0.05}
    only_a = {"big": rng.standard_normal((30, 30)) * 2.5}
    only_b = {"other": rng.standard_normal(9).astype(np.float32)}
    a = make_file("safetensors", shared | only_a, "a")
    b = make_file("npz", shared | only_b, "b")
    diff = diff_files(a, b)
    assert diff.global_norm_a == exact([shared["s"], only_a["big"]])
    assert diff.global_norm_b == exact([shared["s"], only_b["other"]])
    assert diff.shared_norm_a == diff.shared_norm_b == exact([shared["s"]])
    assert diff.ratio == 1.0
    assert statuses(diff) == {"s": "same", "big": "only in A", "other": "only in B"}
    rows = {t.name: t for t in diff.tensors}
    assert rows["big"].norm_a == exact([only_a["big"]])
    assert rows["other"].norm_b == exact([only_b["other"]])
    assert diff.counts["only_in_a"] == diff.counts["only_in_b"] == 1
    proc = gclip("diff", a, b, "--json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["same"] is False and data["counts"]["compared"] == 1
    assert data["global_norm_a"] == diff.global_norm_a


def test_safetensors_and_hdf5_of_the_same_data_are_the_same(make_file):
    """Keys with '.' and HDF5 paths with '/' name the same tensors."""
    grads = gradients()
    a = make_file("safetensors", grads, "a")
    b = make_file("hdf5", {k.replace(".", "/"): v for k, v in grads.items()}, "b")
    assert sorted(read_tensors(b, "hdf5")) == sorted(k.replace(".", "/") for k in grads)
    diff = diff_files(a, b)
    assert diff.same and set(statuses(diff).values()) == {"same"}
    assert {t.name_b for t in diff.tensors if t.name != "step"} == {
        k.replace(".", "/") for k in grads if k != "step"
    }
    floats = [v for k, v in grads.items() if k != "step"]
    assert diff.global_norm_a == diff.global_norm_b == exact(floats)
    assert diff.shared_norm_a == diff.shared_norm_b == exact(floats)
    proc = gclip("diff", a, b)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 compared: 5 same, 0 differ; 0 only in A, 0 only in B, 0 not compared" in (proc.stdout)


def test_equal_names_pair_before_names_alike():
    def info(name: str) -> TensorInfo:
        return TensorInfo(name, "float32", (1,), 4)

    a = [info("x.w"), info("y/b"), info("z")]
    b = [info("x/w"), info("x.w"), info("y.b"), info("q")]
    pairs = [(ta and ta.name, tb and tb.name) for ta, tb in pair_by_name(a, b)]
    assert pairs == [("x.w", "x.w"), ("y/b", "y.b"), ("z", None), (None, "x/w"), (None, "q")]


def test_after_rescale_every_cosine_is_1_and_every_ratio_the_factor(make_file, fmt, tmp_path):
    src = make_file(fmt, gradients())
    out = tmp_path / f"out{SUFFIX[fmt]}"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0, options=Options(chunk_size=4096))
    diff = diff_files(src, out, options=Options(chunk_size=1000))
    floats = [t for t in diff.tensors if t.name != "step"]
    assert {t.status for t in floats} == {"differs"} and statuses(diff)["step"] == "same"
    for t in floats:
        assert t.cosine == pytest.approx(1.0, abs=1e-6)
        assert t.ratio == pytest.approx(report.scale, rel=1e-3)
    assert diff.global_norm_b == pytest.approx(1.0, rel=1e-6)


def test_cosine_and_ratio_match_numpy_across_formats(make_file):
    rng = np.random.default_rng(4)
    a = {"w": rng.standard_normal((30, 7)).astype(np.float32), "only_a": np.ones(2)}
    b = {"w": rng.standard_normal((30, 7)).astype(np.float32), "only_b": np.ones(2)}
    diff = diff_files(
        make_file("hdf5", a, "a"), make_file("npz", b, "b"), options=Options(chunk_size=64)
    )
    w = {t.name: t for t in diff.tensors}["w"]
    x, y = a["w"].astype(np.float64).ravel(), b["w"].astype(np.float64).ravel()
    assert w.cosine == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), rel=1e-12)
    assert w.ratio == pytest.approx(np.linalg.norm(y) / np.linalg.norm(x), rel=1e-12)
    assert diff.cosine == w.cosine and w.values_differ == x.size
    assert statuses(diff) == {"w": "differs", "only_a": "only in A", "only_b": "only in B"}


def test_other_dtype_shape_or_layout_differ(make_file):
    values = np.arange(6.0).reshape(2, 3)
    a = make_file(
        "npz",
        {
            "dtype": values.astype(np.float32),
            "shape": values,
            "layout": np.asfortranarray(values),
            "int_vs_float": np.arange(6).reshape(2, 3),
        },
        "a",
    )
    b = make_file(
        "safetensors",
        {"dtype": values, "shape": values.reshape(3, 2), "layout": values, "int_vs_float": values},
        "b",
    )
    diff = diff_files(a, b)
    rows = {t.name: t for t in diff.tensors}
    assert {t.status for t in diff.tensors} == {"differs"}
    assert rows["dtype"].note == "dtypes differ (float32, float64)"
    assert rows["dtype"].values_differ == 0 and rows["dtype"].cosine == 1.0
    assert rows["shape"].note == "shapes differ (2x3, 3x2)"
    assert rows["layout"].note == "layouts differ (Fortran and C order)"
    assert rows["int_vs_float"].note == "dtypes differ (int64, float64)"
    # each still counts in its own file's norm
    assert diff.global_norm_a == exact([values, values, values])
    assert diff.global_norm_b == exact([values] * 4)


def test_non_float_tensors_compare_by_bytes_or_are_listed_as_not_compared(make_file, fmt):
    floats = {"g": np.ones(4, np.float32)}
    a = make_file(fmt, floats | {"step": np.array(3), "mask": np.array([True, False])}, "a")
    b = make_file(fmt, floats | {"step": np.array(4), "mask": np.array([True, False])}, "b")
    diff = diff_files(a, b)
    assert statuses(diff) == {"g": "same", "step": "differs", "mask": "same"}
    assert {t.name: t.note for t in diff.tensors}["step"] == "int64 values differ"
    assert gclip("diff", a, b).returncode == 1
    # tensors larger than a chunk are not read whole: listed, counted, and exit 0 is honest
    big = {"ids": np.arange(1000, dtype=np.int32)}
    c, d = make_file(fmt, floats | big, "c"), make_file(fmt, floats | big, "d")
    diff = diff_files(c, d, options=Options(chunk_size=1024))
    assert statuses(diff) == {"g": "same", "ids": "not compared"}
    assert diff.same and diff.counts["not_compared"] == 1
    proc = gclip("diff", c, d, "--chunk-size", "1K")
    assert proc.returncode == 0
    assert "1 not compared" in proc.stdout
    as_json = json.loads(gclip("diff", c, d, "--chunk-size", "1K", "--json").stdout)
    ids = next(t for t in as_json["tensors"] if t["name"] == "ids")
    assert ids["note"] == "int32: larger than --chunk-size"
    assert "A and B hold the same tensors with the same values (1 not compared)" in proc.stdout


def test_include_and_exclude_leave_tensors_out_of_the_comparison(make_file):
    a = make_file("safetensors", {"x.w": np.ones(2), "y.w": np.ones(2), "n": np.array(1)}, "a")
    b = make_file("hdf5", {"x/w": np.ones(2), "y/w": np.zeros(2), "n": np.array(2)}, "b")
    diff = diff_files(a, b, options=Options(include=("x.*",)))
    assert statuses(diff) == {"x.w": "same", "y.w": "not compared", "n": "not compared"}
    assert diff.same and diff.global_norm_b == math.sqrt(2)
    assert statuses(diff_files(a, b, options=Options(exclude=("y.*", "n")))) == statuses(diff)
    assert gclip("diff", a, b, "--include", "x.*").returncode == 0
    assert gclip("diff", a, b).returncode == 1


def test_diff_help_documents_the_exit_codes():
    result = CliRunner().invoke(main, ["diff", "--help"])
    assert result.exit_code == 0
    for line in ("0    the same tensors", "1    the files differ", "4    NaN/Inf"):
        assert line in result.stdout


def test_usage_and_input_errors_exit_2_and_3(make_file, tmp_path):
    a = make_file("npz", {"g": np.ones(2)}, "a")
    assert gclip("diff", a).returncode == 2
    assert gclip("diff", a, a, "--nonfinite", "maybe").returncode == 2
    proc = gclip("diff", a, tmp_path / "missing.npz")
    assert proc.returncode == 3 and "no such file" in proc.stderr


# --- NaN/Inf ----------------------------------------------------------------------------------


@pytest.fixture
def nan_pair(make_file, fmt):
    """Files whose NaN/Inf lie at the same places, with finite values alike."""
    values = np.array([1.0, np.nan, 2.0, np.inf, -np.inf, 2.0], np.float32)
    return make_file(fmt, {"g": values}, "a"), make_file(fmt, {"g": values.copy()}, "b")


def test_nonfinite_values_print_the_report_then_exit_4(nan_pair):
    proc = gclip("diff", *nan_pair)
    assert proc.returncode == 4, proc.stderr
    assert "non-finite values: A 3, B 3 (norms nan/inf; exit 4" in proc.stdout
    as_json = gclip("diff", *nan_pair, "--json")
    assert as_json.returncode == 4
    data = json.loads(as_json.stdout)
    assert data["global_norm_a"] is None and data["nonfinite_a"] == data["nonfinite_b"] == 3
    assert data["same"] is True  # NaN where NaN is, each Inf where the same Inf is


@pytest.mark.parametrize("policy", ["zero", "keep"])
def test_nonfinite_at_the_same_places_are_the_same_under_zero_and_keep(nan_pair, policy):
    proc = gclip("diff", *nan_pair, "--nonfinite", policy, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    finite = exact_norm([np.array([1.0, 2.0, 2.0])])
    assert data["global_norm_a"] == data["shared_norm_b"] == finite == 3.0
    assert data["cosine"] == 1.0 and data["nonfinite_policy"] == policy


@pytest.mark.parametrize(
    ("value_a", "value_b", "zero", "keep"),
    [
        (np.nan, 0.0, "same", "differs"),  # zero: both 0
        (np.nan, np.inf, "same", "differs"),
        (np.inf, -np.inf, "same", "differs"),
        (np.inf, np.inf, "same", "same"),
        (np.nan, 1.0, "differs", "differs"),
    ],
)
def test_what_same_means_for_nonfinite_values(make_file, value_a, value_b, zero, keep):
    a = make_file("safetensors", {"g": np.array([1.0, value_a, 3.0])}, "a")
    b = make_file("safetensors", {"g": np.array([1.0, value_b, 3.0])}, "b")
    for policy, expected in (("zero", zero), ("keep", keep)):
        diff = diff_files(a, b, options=Options(nonfinite=policy))
        assert statuses(diff) == {"g": expected}, policy
        assert gclip("diff", a, b, "--nonfinite", policy).returncode == (
            0 if expected == "same" else 1
        )
    assert gclip("diff", a, b).returncode == 4  # whatever they compare as


def test_integers_are_compared_only_where_the_format_reads_whole_arrays(tmp_path):
    a = write_tensors(tmp_path / "a.safetensors", "safetensors", {"n": np.arange(4)})
    b = write_tensors(tmp_path / "b.safetensors", "safetensors", {"n": np.arange(4) + 1})
    with closing(open_file(a)) as fa, closing(open_file(b)) as fb:
        ta, tb = fa.tensors[0], fb.tensors[0]
        assert compare._compare_bytes(fa, fb, ta, tb, 1 << 20).status == compare.DIFFERS
        row = compare._compare_bytes(CoreOnly(fa), fb, ta, tb, 1 << 20)
    assert (row.status, row.note) == (
        compare.NOT_COMPARED,
        "int64: its format reads no whole arrays",
    )


# --- --rtol / --atol ---------------------------------------------------------------------------


def perturbed(seed: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Values and the same values moved by relative and absolute amounts of several sizes,
    some exactly on a boundary (|a - b| = atol + rtol * |b| for the tolerances below)."""
    rng = np.random.default_rng(seed)
    b = (rng.standard_normal(3000) * 10.0 ** rng.integers(-4, 4, 3000)).astype(dtype)
    moved = b * (1 + rng.choice([0, 1e-9, 1e-7, 1e-5, 1e-3], b.size)) + rng.choice(
        [0, 1e-9, 1e-6, 1e-3], b.size
    )
    a = moved.astype(dtype)
    a[:4], b[:4] = [1.5, 3.0, 1.0, 2.0], [1.0, 2.0, 2.0, 1.0]  # 0.5 apart, 1 apart (b small/large)
    return a, b


TOLERANCES = [(0.0, 0.0), (1e-5, 1e-8), (1e-3, 0.0), (0.0, 1e-6), (0.5, 0.0), (0.0, 0.5)]


@pytest.mark.parametrize(("rtol", "atol"), TOLERANCES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_match_within_tolerance_as_numpy_isclose_says(make_file, dtype, rtol, atol):
    a_values, b_values = perturbed(seed=len(TOLERANCES), dtype=dtype)
    a = make_file("safetensors", {"w": a_values}, "a")
    b = make_file("hdf5", {"w": b_values}, "b")
    read_a, read_b = read_tensors(a, "safetensors")["w"], read_tensors(b, "hdf5")["w"]
    wide_a, wide_b = read_a.astype(np.float64), read_b.astype(np.float64)
    mismatched = int(np.count_nonzero(~np.isclose(wide_a, wide_b, rtol=rtol, atol=atol)))
    diff = diff_files(a, b, rtol=rtol, atol=atol, options=Options(chunk_size=4096))
    assert diff.tensors[0].values_differ == mismatched
    assert diff.same == np.allclose(wide_a, wide_b, rtol=rtol, atol=atol)
    proc = gclip("diff", a, b, "--rtol", rtol, "--atol", atol, "--json")
    assert proc.returncode == (0 if diff.same else 1), proc.stderr
    data = json.loads(proc.stdout)
    assert (data["rtol"], data["atol"], data["tensors"][0]["values_differ"]) == (
        rtol,
        atol,
        mismatched,
    )


def test_tolerance_is_relative_to_b(make_file):
    """|a - b| <= rtol * |b|: 1 and 2 match with rtol 0.5 when B holds 2, not when B holds 1."""
    one, two = (
        make_file("npz", {"w": np.array([v])}, name) for v, name in ((1.0, "a"), (2.0, "b"))
    )
    assert np.isclose(1.0, 2.0, rtol=0.5, atol=0) and not np.isclose(2.0, 1.0, rtol=0.5, atol=0)
    assert gclip("diff", one, two, "--rtol", "0.5").returncode == 0
    proc = gclip("diff", two, one, "--rtol", "0.5")
    assert proc.returncode == 1 and "1 values differ beyond the tolerance" in proc.stdout
    assert "values compared with rtol 0.5, atol 0" in proc.stdout


def test_nonfinite_values_match_only_as_they_are_whatever_the_tolerance(make_file):
    a_values = np.array([np.nan, np.inf, 1e308, 5.0, -np.inf])
    b_values = np.array([np.nan, np.inf, np.inf, 5.5, -np.inf])
    a = make_file("safetensors", {"g": a_values}, "a")
    b = make_file("safetensors", {"g": b_values}, "b")
    want = np.isclose(a_values, b_values, rtol=10.0, atol=1.0, equal_nan=True)
    diff = diff_files(a, b, rtol=10.0, atol=1.0, options=Options(nonfinite="keep"))
    assert diff.tensors[0].values_differ == int(np.count_nonzero(~want)) == 1


def test_tolerances_are_finite_and_not_negative(make_file):
    a = make_file("safetensors", {"g": np.ones(3)}, "a")
    for bad in ("-1e-9", "inf", "nan"):
        proc = gclip("diff", a, a, "--rtol", bad)
        assert proc.returncode == 2 and "--rtol" in proc.stderr
    with pytest.raises(gclip_cli.UsageError):
        diff_files(a, a, atol=-1.0)
