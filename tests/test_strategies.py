"""Per-tensor, group, value and normalising clipping against independent references."""

import math
from fractions import Fraction

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SUFFIX, exactly_scaled, read_tensors
from test_norms import reference_norm

import gclip_cli
from gclip_cli import UsageError
from gclip_cli.api import clip_value_file, normalize_file
from gclip_cli.cli import main
from gclip_cli.norms import measure

try:
    import torch
except ImportError:
    torch = None


def gradients() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(21)
    return {
        "enc.0.w": rng.standard_normal((20, 10)).astype(np.float32),  # norm ~14
        "enc.0.b": (rng.standard_normal(10) * 0.01).astype(np.float32),  # norm ~0.03
        "dec.0.w": rng.standard_normal((10, 5)) * 3,  # float64, norm ~21
        "dec.1.w": rng.standard_normal(7).astype(np.float16),
        "step": np.array(9, dtype=np.int64),
    }


def keras_clipnorm(g: np.ndarray, c: float) -> np.ndarray:
    """Keras/TF ``clip_by_norm``: g * c / max(||g||, c), in float64 on the whole array."""
    wide = g.astype(np.float64)
    return wide * c / max(float(np.linalg.norm(wide)), c)


def test_per_tensor_clips_each_tensor_by_its_own_norm(make_file, fmt, tmp_path):
    grads = gradients()
    out = tmp_path / f"out{SUFFIX[fmt]}"
    report = gclip_cli.rescale_file(make_file(fmt, grads), out, max_norm=1.0, per_tensor=True)
    assert report.strategy.name == "per-tensor" and report.clipped
    written = read_tensors(out, fmt)
    by_name = {t.name: t for t in report.tensors}
    for name, original in grads.items():
        if original.dtype.kind != "f":
            assert np.array_equal(written[name], original)
            continue
        eps = np.finfo(original.dtype).eps
        np.testing.assert_allclose(written[name], keras_clipnorm(original, 1.0), rtol=eps, atol=0)
        norm = by_name[name].norm
        q = Fraction(1.0) / Fraction(norm) if norm > 1.0 else Fraction(1)
        assert np.array_equal(written[name], exactly_scaled(original, q))
        assert by_name[name].scale == float(q)
    assert written["enc.0.b"].tobytes() == grads["enc.0.b"].tobytes()  # below 1: untouched
    assert all(g.scale < 1 for g in report.groups if g.norm > 1.001)


def test_groups_clip_each_group_by_its_norm_first_match_wins(make_file, fmt, tmp_path):
    grads = gradients()
    out = tmp_path / f"out{SUFFIX[fmt]}"
    groups = [("enc.*", 2.0), ("*.w", 5.0)]  # dec.*.w fall to the second, enc.0.w to the first
    report = gclip_cli.rescale_file(make_file(fmt, grads), out, groups=groups)
    written = read_tensors(out, fmt)
    enc = ["enc.0.w", "enc.0.b"]
    dec = ["dec.0.w", "dec.1.w"]
    for members, limit in ((enc, 2.0), (dec, 5.0)):
        norm = math.sqrt(
            math.fsum(float(np.sum(grads[n].astype(np.float64) ** 2)) for n in members)
        )
        for name in members:
            expected = grads[name].astype(np.float64) * min(1.0, limit / norm)
            np.testing.assert_allclose(
                written[name], expected, rtol=np.finfo(grads[name].dtype).eps
            )
    assert {g.name: g.tensors for g in report.groups} == {"enc.*": 2, "*.w": 2}


def test_unmatched_tensors_use_max_norm_or_stay_untouched(make_file, tmp_path):
    grads = {"a": np.array([3.0, 4.0]), "b": np.array([12.0])}
    src = make_file("npz", grads)
    untouched = gclip_cli.rescale_file(src, tmp_path / "u.npz", groups=[("a", 1.0)])
    assert read_tensors(tmp_path / "u.npz", "npz")["b"].tolist() == [12.0]
    assert [g.name for g in untouched.groups] == ["a", "(default)"]
    gclip_cli.rescale_file(src, tmp_path / "d.npz", groups=[("a", 1.0)], max_norm=6.0)
    written = read_tensors(tmp_path / "d.npz", "npz")
    assert written["a"].tolist() == [0.6, 0.8] and written["b"].tolist() == [6.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_value_matches_numpy_clip(make_file, fmt, tmp_path, dtype):
    grads = {k: v.astype(dtype) for k, v in gradients().items() if v.dtype.kind == "f"}
    out = tmp_path / f"out{SUFFIX[fmt]}"
    report = clip_value_file(make_file(fmt, grads), out, max_value=0.5)
    written = read_tensors(out, fmt)
    for name, original in grads.items():
        assert np.array_equal(written[name], np.clip(original, -0.5, 0.5))
    clamped = {t.name: t.clamped for t in report.tensors}
    assert clamped == {n: int(np.count_nonzero(np.abs(v) > 0.5)) for n, v in grads.items()}


@pytest.mark.skipif(torch is None, reason="torch is not installed: pip install torch==2.13.0")
def test_clip_value_matches_torch_clip_grad_value(make_file, fmt, tmp_path):
    grads = {k: v.astype(np.float64) for k, v in gradients().items() if v.dtype.kind == "f"}
    params = [torch.nn.Parameter(torch.zeros(v.shape, dtype=torch.float64)) for v in grads.values()]
    for param, values in zip(params, grads.values(), strict=True):
        param.grad = torch.from_numpy(values.copy())
    torch.nn.utils.clip_grad_value_(params, 0.7)
    out = tmp_path / f"out{SUFFIX[fmt]}"
    clip_value_file(make_file(fmt, grads), out, max_value=0.7)
    written = read_tensors(out, fmt)
    for name, param in zip(grads, params, strict=True):
        assert np.array_equal(written[name], param.grad.numpy())


def test_clip_value_rounds_the_bound_toward_zero_in_each_dtype(make_file, tmp_path):
    src = make_file("safetensors", {"h": np.array([0.5, -1.0], dtype=np.float16)})
    assert float(np.float16(0.3)) > 0.3  # the nearest float16 lies above the bound
    clip_value_file(src, tmp_path / "o.safetensors", max_value=0.3)
    written = read_tensors(tmp_path / "o.safetensors", "safetensors")["h"]
    below = np.nextafter(np.float16(0.3), np.float16(0))
    assert written.tolist() == [below, -below] and float(below) <= 0.3


def test_normalize_reaches_the_target_up_and_down(make_file, fmt, tmp_path):
    grads = {k: v for k, v in gradients().items() if k != "dec.1.w"}
    for target in (0.25, 100.0):
        out = tmp_path / f"out{target}{SUFFIX[fmt]}"
        report = normalize_file(make_file(fmt, grads), out, target_norm=target)
        assert report.global_norm_after == pytest.approx(target, rel=1e-6)
        written = read_tensors(out, fmt)
        q = Fraction(target) / Fraction(report.global_norm)
        for name, original in grads.items():
            if original.dtype.kind == "f":
                assert np.array_equal(written[name], exactly_scaled(original, q))


def test_normalize_leaves_zero_alone_and_refuses_overflow(make_file, tmp_path):
    zeros = make_file("npz", {"z": np.zeros(4)}, "zeros")
    report = normalize_file(zeros, tmp_path / "z.npz", target_norm=1.0)
    assert not report.clipped and read_tensors(tmp_path / "z.npz", "npz")["z"].tolist() == [0] * 4
    small = make_file("npz", {"h": np.array([60000.0, 1.0], dtype=np.float16)}, "half")
    with pytest.raises(UsageError, match="would overflow float16 in tensor 'h'"):
        normalize_file(small, tmp_path / "h.npz", target_norm=1e5)


def test_strategy_commands(make_file, tmp_path):
    src = make_file("safetensors", {"a.0": np.array([3.0, 4.0]), "b.0": np.array([12.0])})
    runner = CliRunner()
    groups = runner.invoke(
        main, ["rescale", str(src), str(tmp_path / "g.safetensors"), "--group", "a.*=1", "--json"]
    )
    assert groups.exit_code == 0, groups.stderr
    assert [g["name"] for g in __import__("json").loads(groups.stdout)["groups"]] == [
        "a.*",
        "(default)",
    ]
    value = runner.invoke(
        main, ["clip-value", str(src), str(tmp_path / "v.safetensors"), "--max-value", "3.5"]
    )
    assert value.exit_code == 0 and "values clamped:        2 in 2 tensors" in value.stderr
    norm = runner.invoke(
        main, ["normalize", str(src), str(tmp_path / "n.safetensors"), "--target-norm", "26"]
    )
    assert norm.exit_code == 0 and "global L2 norm after:  26" in norm.stderr
    nothing = runner.invoke(main, ["rescale", str(src), str(tmp_path / "x.safetensors")])
    assert nothing.exit_code == 2 and "give --max-norm, or --group GLOB=C" in nothing.stderr
    bad = runner.invoke(
        main, ["rescale", str(src), str(tmp_path / "x.safetensors"), "--group", "a*"]
    )
    assert bad.exit_code == 2 and "is not GLOB=C" in bad.stderr


# --- factors from norms beyond float64, overflow decided as scaling rounds (issue 20) ------------


def test_normalize_and_per_tensor_divide_by_norms_beyond_float64(make_file, fmt, tmp_path):
    values = np.array([1.5e308, -1.5e308, 1e308])
    norm = measure(values).finite_norm_exact()  # about 2.35e308: inf in float64
    assert abs(norm / Fraction(reference_norm(values / 2, 2.0)) - 2) < 1e-15
    src = make_file(fmt, {"g": values, "small": np.array([3.0, 4.0])})
    out = tmp_path / f"n{SUFFIX[fmt]}"
    report = normalize_file(src, out, target_norm=2.0)
    assert report.global_norm == math.inf and report.global_norm_after == pytest.approx(2.0)
    total = measure(np.array([*values, 3.0, 4.0])).finite_norm_exact()
    assert np.array_equal(read_tensors(out, fmt)["g"], exactly_scaled(values, 2 / total))
    per_tensor = tmp_path / f"p{SUFFIX[fmt]}"
    gclip_cli.rescale_file(src, per_tensor, max_norm=1.0, per_tensor=True)
    written = read_tensors(per_tensor, fmt)
    assert np.array_equal(written["g"], exactly_scaled(values, 1 / norm))
    assert written["small"].tolist() == [0.6, 0.8]


def test_normalize_refuses_only_products_that_round_beyond_the_dtype(make_file, tmp_path):
    largest = np.float16(65504.0)  # 65504 * (1 + 2**-12) rounds to 65504: no overflow
    src = make_file("npz", {"h": np.array([largest, 1.0], dtype=np.float16)}, "edge")
    norm = Fraction(measure(np.array([largest, 1.0], dtype=np.float16)).finite_norm())
    target = float(norm * (1 + Fraction(1, 4096)))
    report = normalize_file(src, tmp_path / "e.npz", target_norm=target)
    assert read_tensors(tmp_path / "e.npz", "npz")["h"][0] == largest and report.clipped
    with pytest.raises(UsageError, match="would overflow float16"):
        normalize_file(src, tmp_path / "f.npz", target_norm=float(norm * (1 + Fraction(1, 1024))))
