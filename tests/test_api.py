import functools
import math
import os
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from conftest import (
    FORMATS,
    SUFFIX,
    exact_norm,
    expected_scaled,
    progress_by_phase,
    read_tensors,
    write_tensors,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gclip_cli
import gclip_cli.pipeline
from gclip_cli import NonFiniteError, OutputError, UsageError
from gclip_cli.options import Options

try:
    import torch
except ImportError:  # the comparison tests say so when skipped
    torch = None

GRADIENT_DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


def sample_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.0.weight": rng.standard_normal((64, 33)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(33).astype(np.float32) * 40,
        "layer.1.weight": rng.standard_normal((7, 5, 3)),
        "step": np.array(1234, dtype=np.int64),
        "mask": rng.integers(0, 2, 10).astype(np.int32),
    }


def test_inspect_reports_every_tensor_and_the_exact_global_norm(make_file, fmt):
    tensors = sample_tensors()
    report = gclip_cli.inspect_file(make_file(fmt, tensors), max_norm=1.0)
    gradients = [v for k, v in tensors.items() if v.dtype.kind == "f"]
    assert report.global_norm == pytest.approx(exact_norm(gradients), rel=1e-12)
    assert report.file_format == fmt
    by_name = {t.name: t for t in report.tensors}
    assert set(by_name) == set(tensors)
    assert by_name["step"].skipped and by_name["step"].norm is None
    weight = by_name["layer.0.weight"]
    assert (weight.shape, weight.numel, weight.dtype) == ((64, 33), 64 * 33, "float32")
    assert weight.norm == pytest.approx(exact_norm([tensors["layer.0.weight"]]), rel=1e-12)
    assert sum(t.share for t in report.counted) == pytest.approx(1.0)
    assert report.scale == pytest.approx(1.0 / report.global_norm)
    assert report.clipped is True


def test_rescale_scales_gradients_and_copies_the_rest(make_file, fmt, tmp_path):
    tensors = sample_tensors()
    out = tmp_path / f"out{SUFFIX[fmt]}"
    report = gclip_cli.rescale_file(make_file(fmt, tensors), out, max_norm=2.0)
    written = read_tensors(out, fmt)
    assert report.clipped and report.scale == 2.0 / report.global_norm
    for name, original in tensors.items():
        assert written[name].dtype == original.dtype and written[name].shape == original.shape
        if original.dtype.kind == "f":
            assert np.array_equal(written[name], expected_scaled(original, report))
        else:
            assert np.array_equal(written[name], original)
    gradients = [v for k, v in written.items() if v.dtype.kind == "f"]
    assert report.global_norm_after == pytest.approx(exact_norm(gradients), rel=1e-12)
    assert report.global_norm_after == pytest.approx(2.0, rel=1e-7)


def test_within_max_norm_the_output_is_the_input_byte_for_byte(make_file, fmt, tmp_path):
    src = make_file(fmt, sample_tensors())
    out = tmp_path / f"out{SUFFIX[fmt]}"
    report = gclip_cli.rescale_file(src, out, max_norm=1e6)
    assert not report.clipped and report.scale == 1.0
    assert report.global_norm_after == report.global_norm
    assert out.read_bytes() == src.read_bytes()


def test_progress_of_a_rescale_that_copies_says_so_and_counts_the_file(make_file, fmt, tmp_path):
    tensors = sample_tensors()
    src = make_file(fmt, tensors)
    seen = []
    gclip_cli.rescale_file(src, tmp_path / f"out{SUFFIX[fmt]}", max_norm=1e6, progress=seen.append)
    float_bytes = sum(v.nbytes for v in tensors.values() if v.dtype.kind == "f")
    size = src.stat().st_size
    assert progress_by_phase(seen) == [
        ("measuring", float_bytes, float_bytes),
        ("copying", size, size),
    ]


def test_progress_tells_which_of_several_files_is_read(make_file, tmp_path):
    from gclip_cli import progress

    tensors = sample_tensors()
    files = [make_file(fmt, tensors, name=f"step_{n}") for n, fmt in enumerate(FORMATS, 1)]
    float_bytes = sum(v.nbytes for v in tensors.values() if v.dtype.kind == "f")
    history = functools.partial(gclip_cli.api.history_of, as_given=True)  # one step tensor
    for run in (gclip_cli.inspect_files, history):
        seen = []
        run(files, progress=seen.append)
        positions = [e for e in seen if isinstance(e, progress.File)]
        assert positions == [progress.File(n, len(FORMATS)) for n in range(1, len(FORMATS) + 1)]
        assert progress_by_phase(seen) == [("measuring", float_bytes, float_bytes)] * len(FORMATS)


def test_nonfinite_values_are_refused_before_anything_is_written(make_file, fmt, tmp_path):
    tensors = {"a": np.array([1.0, np.nan, np.inf], dtype=np.float32), "b": np.ones(3)}
    src = make_file(fmt, tensors)
    before = src.read_bytes()
    out = tmp_path / f"out{SUFFIX[fmt]}"
    with pytest.raises(NonFiniteError, match=r"'a' \(1 NaN, 1 Inf\)"):
        gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert not out.exists() and src.read_bytes() == before
    assert list(tmp_path.iterdir()) == [src]
    report = gclip_cli.inspect_file(src)
    assert math.isnan(report.global_norm) and report.nonfinite == 2


def test_output_may_not_be_the_input(make_file, fmt):
    src = make_file(fmt, sample_tensors())
    with pytest.raises(OutputError, match="is the input file"):
        gclip_cli.rescale_file(src, src, max_norm=1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_max_norm_must_be_finite_and_positive(make_file, bad, tmp_path):
    with pytest.raises(UsageError):
        gclip_cli.rescale_file(make_file("npz", sample_tensors()), tmp_path / "o.npz", max_norm=bad)


def test_chunk_size_does_not_change_a_single_output_byte(make_file, fmt, tmp_path):
    tensors = {
        "w": np.random.default_rng(5).standard_normal((300, 257)).astype(np.float32),
        "h": np.random.default_rng(6).standard_normal(1001).astype(np.float16),
    }
    src = make_file(fmt, tensors)
    outputs = []
    for chunk in (1000, 4096, 100_003, 64 << 20):
        out = tmp_path / f"out{chunk}{SUFFIX[fmt]}"
        report = gclip_cli.rescale_file(src, out, max_norm=0.5, options=Options(chunk_size=chunk))
        outputs.append((report.global_norm, report.global_norm_after, out.read_bytes()))
    assert all(o == outputs[0] for o in outputs)


# --- properties --------------------------------------------------------------------------------


@st.composite
def tensor_sets(draw):
    count = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(count):
        shape = tuple(draw(st.lists(st.integers(0, 12), min_size=0, max_size=3)))
        kind = draw(st.sampled_from(["float32", "float64", "float16", "int32"]))
        scale = 10.0 ** draw(st.integers(-3, 3))
        values = np.asarray(rng.standard_normal(shape) * scale)
        tensors[f"t{i}"] = np.asarray((values * 100) if kind == "int32" else values, dtype=kind)
    return tensors


def unit_roundoff(tensors) -> float:
    floats = [np.finfo(v.dtype).eps / 2 for v in tensors.values() if v.dtype.kind == "f"]
    return max(floats, default=0.0)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tensors=tensor_sets(),
    fmt=st.sampled_from(FORMATS),
    max_norm=st.floats(1e-3, 1e3),
    chunk=st.integers(1, 5000),
)
def test_rescale_properties(tmp_path_factory, tensors, fmt, max_norm, chunk):
    folder = tmp_path_factory.mktemp("prop")
    src = write_tensors(folder / f"in{SUFFIX[fmt]}", fmt, tensors)
    out, again, other = (folder / f"{n}{SUFFIX[fmt]}" for n in ("out", "again", "other"))
    if not any(v.dtype.kind == "f" for v in tensors.values()):  # nothing a norm could count
        with pytest.raises(gclip_cli.InputError, match="no floating-point tensor"):
            gclip_cli.rescale_file(src, out, max_norm=max_norm, options=Options(chunk_size=chunk))
        assert not out.exists()
        return
    report = gclip_cli.rescale_file(src, out, max_norm=max_norm, options=Options(chunk_size=chunk))
    written = read_tensors(out, fmt)
    u = unit_roundoff(tensors)

    # the norm of what was written never exceeds max_norm by more than the dtypes' rounding
    gradients = [v for v in written.values() if v.dtype.kind == "f"]
    assert exact_norm(gradients) <= max_norm * (1 + 2 * u) + 1e-300 or not report.clipped
    assert report.global_norm_after == pytest.approx(exact_norm(gradients), rel=1e-12, abs=1e-300)
    for name, original in tensors.items():
        if original.dtype.kind != "f":
            assert np.array_equal(written[name], original)  # not a gradient: untouched
        else:  # direction kept: every value is its original times the one factor, rounded once
            expected = original.astype(np.float64) * report.scale
            assert np.allclose(
                written[name],
                expected,
                rtol=np.finfo(original.dtype).eps,
                atol=float(np.finfo(original.dtype).smallest_subnormal),
            )

    # clipping the clipped file again changes nothing at all
    second = gclip_cli.rescale_file(
        out, again, max_norm=max_norm, options=Options(chunk_size=chunk)
    )
    assert not second.clipped
    assert again.read_bytes() == out.read_bytes()

    # and the chunk size never matters
    gclip_cli.rescale_file(src, other, max_norm=max_norm, options=Options(chunk_size=chunk * 7 + 3))
    assert other.read_bytes() == out.read_bytes()


# --- PyTorch reference -------------------------------------------------------------------------


@pytest.mark.skipif(torch is None, reason="torch is not installed: pip install torch==2.13.0")
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf, 3.0, 0.5, 7.5])
def test_matches_torch_clip_grad_norm_on_float64(make_file, fmt, tmp_path, norm_type):
    rng = np.random.default_rng(11)
    tensors = {
        f"p{i}": rng.standard_normal(shape) * 3
        for i, shape in enumerate([(40, 30), (30,), (5, 6, 7), (1,)])
    }
    params = [
        torch.nn.Parameter(torch.zeros(v.shape, dtype=torch.float64)) for v in tensors.values()
    ]
    for param, values in zip(params, tensors.values(), strict=True):
        param.grad = torch.from_numpy(values.copy())
    torch_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type=norm_type))

    out = tmp_path / f"out{SUFFIX[fmt]}"
    report = gclip_cli.rescale_file(
        make_file(fmt, tensors), out, max_norm=1.0, eps=1e-6, options=Options(norm_type=norm_type)
    )
    assert report.global_norm == pytest.approx(torch_norm, rel=1e-12)
    written = read_tensors(out, fmt)
    for name, param in zip(tensors, params, strict=True):
        np.testing.assert_allclose(written[name], param.grad.numpy(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("norm_type", [1075.0, 1e300])
def test_huge_p_where_torch_overflows_clips_by_the_exact_norm(make_file, tmp_path, norm_type):
    # torch raises |x|**p to float64 as it is: 4**1075 overflows, its norm is inf and
    # clip_grad_norm_ zeroes the gradients; the norm is 4 (2**1075 and 1 relative to it vanish)
    values = np.array([4.0, -2.0, 1.0])
    out = tmp_path / "out.npz"
    report = gclip_cli.rescale_file(
        make_file("npz", {"g": values}), out, max_norm=1.0, options=Options(norm_type=norm_type)
    )
    assert report.global_norm == 4.0
    assert read_tensors(out, "npz")["g"].tolist() == [1.0, -0.5, 0.25]


# --- memory ------------------------------------------------------------------------------------


def peak_traced_memory(fmt, src, out, chunk) -> int:
    tracemalloc.start()
    try:
        gclip_cli.inspect_file(src, options=Options(chunk_size=chunk))
        gclip_cli.rescale_file(src, out, max_norm=1.0, options=Options(chunk_size=chunk))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_working_set_does_not_grow_with_the_file(make_file, fmt, tmp_path):
    values = np.random.default_rng(0).standard_normal(8 << 20).astype(np.float32)  # 32 MiB
    small = make_file(fmt, {"big": values[: 4 << 20], "tail": values[:1000].copy()}, "small")
    large = make_file(fmt, {"big": values, "tail": values[:1000].copy()}, "large")
    del values
    chunk = 1 << 20
    peaks = [
        peak_traced_memory(fmt, src, tmp_path / f"out{SUFFIX[fmt]}", chunk)
        for src in (small, large)
    ]
    # a chunk, the float64 work blocks and bookkeeping, the same for 16 and 32 MiB of data
    assert peaks[1] < 8 * chunk, f"peak traced allocation {peaks[1] / 2**20:.1f} MiB"
    assert peaks[1] < peaks[0] + chunk / 4, peaks  # twice the data, no more memory


# --- non-finite values -------------------------------------------------------------------------


def nonfinite_tensors() -> dict[str, np.ndarray]:
    return {
        "a": np.array([3.0, np.nan, 4.0, -np.inf], dtype=np.float32),
        "b": np.array([np.inf, 12.0]),
        "c": np.array([1.0, 2.0], dtype=np.float16),
    }


def test_nonfinite_zero_counts_them_as_zero_and_writes_zero(make_file, fmt, tmp_path):
    tensors = nonfinite_tensors()
    out = tmp_path / f"out{SUFFIX[fmt]}"
    report = gclip_cli.rescale_file(
        make_file(fmt, tensors), out, max_norm=1.0, options=Options(nonfinite="zero")
    )
    zeroed = {k: np.where(np.isfinite(v), v, 0).astype(v.dtype) for k, v in tensors.items()}
    assert report.global_norm == pytest.approx(exact_norm(list(zeroed.values())), rel=1e-12)
    assert {t.name: (t.nan, t.inf) for t in report.tensors} == {
        "a": (1, 1),
        "b": (0, 1),
        "c": (0, 0),
    }
    written = read_tensors(out, fmt)
    for name, values in zeroed.items():
        assert np.array_equal(written[name], expected_scaled(values, report))
    assert report.global_norm_after == pytest.approx(1.0, rel=1e-3)


def test_nonfinite_zero_rewrites_even_when_within_max_norm(make_file, tmp_path):
    src = make_file("npz", {"a": np.array([0.1, np.nan])})
    report = gclip_cli.rescale_file(
        src, tmp_path / "o.npz", max_norm=10.0, options=Options(nonfinite="zero")
    )
    assert not report.clipped
    assert read_tensors(tmp_path / "o.npz", "npz")["a"].tolist() == [0.1, 0.0]


def test_nonfinite_keep_writes_them_back_bit_for_bit(make_file, fmt, tmp_path):
    tensors = nonfinite_tensors()
    tensors["a"][1] = np.frombuffer(np.uint32(0x7FC0_1234).tobytes(), np.float32)[0]  # payload
    out = tmp_path / f"out{SUFFIX[fmt]}"
    report = gclip_cli.rescale_file(
        make_file(fmt, tensors), out, max_norm=1.0, options=Options(nonfinite="keep")
    )
    finite = [v[np.isfinite(v)] for v in tensors.values()]
    assert report.global_norm == pytest.approx(exact_norm(finite), rel=1e-12)
    written = read_tensors(out, fmt)
    for name, original in tensors.items():
        bad = ~np.isfinite(original)
        uint = f"u{original.dtype.itemsize}"
        assert np.array_equal(written[name][bad].view(uint), original[bad].view(uint))
        expected = expected_scaled(np.where(bad, 0, original).astype(original.dtype), report)
        assert np.array_equal(written[name][~bad], expected[~bad])


def test_inspect_with_a_policy_reports_the_finite_norm(make_file):
    src = make_file("safetensors", nonfinite_tensors())
    assert math.isnan(gclip_cli.inspect_file(src).global_norm)
    report = gclip_cli.inspect_file(src, max_norm=1.0, options=Options(nonfinite="keep"))
    assert report.global_norm == pytest.approx(math.sqrt(9 + 16 + 144 + 1 + 4))
    assert report.clipped and report.nonfinite == 3


# --- the file measured is the file written from ------------------------------------------------


def changed_around(monkeypatch, target: str, change, after: bool = False) -> None:
    """Make *target* (module.function) call change() before (or *after*) doing its work."""
    module, name = target.rsplit(".", 1)
    real = getattr(__import__(module, fromlist=[name]), name)

    def work_and_change(*args, **kwargs):
        if not after:
            change()
        result = real(*args, **kwargs)
        if after:
            change()
        return result

    monkeypatch.setattr(target, work_and_change)


def test_an_input_renamed_over_during_pass_1_is_refused_not_half_clipped(
    make_file, tmp_path, monkeypatch
):
    # -j2: pass 1 measured the old file (norm 13); the workers of pass 2 reopen the input by
    # name and wrote the new one (norm 39) scaled for the old: exit 0, output norm 3.
    src = make_file("safetensors", {"w": np.array([3.0, 4.0]), "b": np.array([12.0])})
    newer = make_file("safetensors", {"w": np.array([9.0, 12.0]), "b": np.array([36.0])}, "new")
    monkeypatch.setattr("gclip_cli.parallel.MIN_PARALLEL_BYTES", 0)
    rename = lambda: newer.rename(src)  # noqa: E731
    changed_around(monkeypatch, "gclip_cli.parallel.measure_pieces", rename, after=True)
    out = tmp_path / "out.safetensors"
    with pytest.raises(gclip_cli.InputError, match="changed while gclip was reading it"):
        gclip_cli.rescale_file(src, out, max_norm=1.0, options=Options(jobs=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda path: os.truncate(path, path.stat().st_size // 2), "size went from"),
        (lambda path: path.unlink(), "was removed while gclip was reading it"),
        (lambda path: os.utime(path, ns=(0, path.stat().st_mtime_ns + 1)), "modified"),
    ],
)
def test_an_input_changed_while_it_is_read_is_one_error_and_nothing_written(
    make_file, fmt, tmp_path, monkeypatch, change, message
):
    src = make_file(fmt, {"w": np.arange(4096, dtype=np.float32), "b": np.ones(3)})
    changed_around(monkeypatch, "gclip_cli.pipeline.measure_tensors", lambda: change(src))
    out = tmp_path / f"out{SUFFIX[fmt]}"
    with pytest.raises(gclip_cli.InputError, match=message) as refused:
        gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert refused.value.path == str(src)
    assert not out.exists() and [p for p in tmp_path.iterdir() if p != src] == []


def test_an_input_unlinked_as_rescale_starts_is_one_error(make_file, tmp_path, monkeypatch):
    src = make_file("npz", {"w": np.array([3.0, 4.0])})
    real_check = gclip_cli.pipeline.check_output_path

    def check_then_unlink(*args):  # unlinked between the checks and the work
        real_check(*args)
        src.unlink()

    monkeypatch.setattr("gclip_cli.pipeline.check_output_path", check_then_unlink)
    with pytest.raises(gclip_cli.InputError, match="was removed while gclip was reading it"):
        gclip_cli.rescale_file(src, tmp_path / "out.npz", max_norm=1.0)
    assert list(tmp_path.iterdir()) == []
