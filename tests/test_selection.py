import h5py
import ml_dtypes
import numpy as np
import pytest
from conftest import SUFFIX, exact_norm, expected_scaled, read_tensors

import gclip_cli
from gclip_cli import InputError, UsageError
from gclip_cli.options import Options


def test_excluded_tensors_are_not_counted_and_copied_untouched(make_file, fmt, tmp_path):
    tensors = {"enc.0.w": np.array([3.0, 4.0]), "dec.0.w": np.array([12.0]), "dec.1.b": np.ones(2)}
    src = make_file(fmt, tensors)
    out = tmp_path / f"out{SUFFIX[fmt]}"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0, options=Options(exclude=("dec.*",)))
    assert report.global_norm == 5.0
    skipped = {t.name: t.skipped for t in report.tensors if t.skipped}
    assert skipped == {
        "dec.0.w": "excluded by --exclude dec.*",
        "dec.1.b": "excluded by --exclude dec.*",
    }
    written = read_tensors(out, fmt)
    assert written["dec.0.w"].tolist() == [12.0] and written["dec.1.b"].tolist() == [1.0, 1.0]
    assert written["enc.0.w"].tolist() == [0.6, 0.8]


def test_include_keeps_only_matching_tensors(make_file):
    src = make_file("npz", {"a.w": np.array([3.0]), "a.b": np.array([4.0]), "b.w": np.ones(1)})
    report = gclip_cli.inspect_file(src, options=Options(include=("a.*",), exclude=("*.b",)))
    assert report.global_norm == 3.0 and len(report.counted) == 1


def test_one_global_norm_over_files_of_mixed_formats(make_file, tmp_path):
    a = make_file("safetensors", {"w": np.array([3.0])}, "a")
    b = make_file("hdf5", {"w": np.array([4.0])}, "b")
    report = gclip_cli.inspect_files([a, b], max_norm=1.0)
    assert report.global_norm == 5.0 and report.files == (str(a), str(b))
    assert [t.file for t in report.tensors] == [str(a), str(b)]
    assert report.file_format == "safetensors,hdf5"


@pytest.mark.parametrize("pattern", ["model.layers.1.*", "model/layers/1/*", "model.layers/1.*"])
def test_globs_read_dot_and_slash_alike(make_file, fmt, pattern):
    # HDF5 names are paths (model/layers/1/w), safetensors keys dotted: one pattern for both
    tensors = {"model/layers/0/w": np.array([3.0]), "model/layers/1/w": np.array([4.0])}
    if fmt != "hdf5":
        tensors = {k.replace("/", "."): v for k, v in tensors.items()}
    src = make_file(fmt, tensors)
    assert gclip_cli.inspect_file(src, options=Options(include=(pattern,))).global_norm == 4.0
    assert gclip_cli.inspect_file(src, options=Options(exclude=(pattern,))).global_norm == 3.0


# --- raw values of unrecorded type: refused, or read as the type named ---------------------------

BF16 = np.dtype(ml_dtypes.bfloat16)
F8 = np.dtype(ml_dtypes.float8_e4m3fn)


def raw_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "bf": (rng.standard_normal((40, 3)) * 30).astype(BF16),
        "f8": (rng.standard_normal(50) * 8).astype(F8),
        "w": rng.standard_normal(5).astype(np.float32),
    }


def write_raw(path, fmt, tensors, layout="plain"):
    """How JAX users' files hold bfloat16/float8: np.savez and h5py store them as raw |V2/|V1."""
    if fmt == "npz":
        (np.savez if layout == "plain" else np.savez_compressed)(path, **tensors)
        return path.with_suffix(".npz") if path.suffix != ".npz" else path
    with h5py.File(path, "w") as f:
        for name, values in tensors.items():
            extra = {} if layout == "plain" else {"chunks": True, "compression": layout}
            f.create_dataset(name, data=values, **extra)
    return path


def read_raw(path, fmt) -> dict[str, np.ndarray]:
    kinds = {2: BF16, 1: F8}
    arrays = read_tensors(path, fmt)
    return {k: v.view(kinds[v.itemsize]) if v.dtype.kind == "V" else v for k, v in arrays.items()}


@pytest.mark.parametrize(
    ("fmt", "layout"),
    [("npz", "plain"), ("npz", "deflated"), ("hdf5", "plain"), ("hdf5", "gzip"), ("hdf5", "lzf")],
)
def test_raw_values_are_refused_or_read_as_the_type_named(tmp_path, fmt, layout):
    tensors = raw_tensors()
    src = write_raw(tmp_path / f"in{SUFFIX[fmt]}", fmt, tensors, layout)
    assert read_tensors(src, fmt)["bf"].dtype.str.endswith("V2")  # the premise: raw bytes
    out = tmp_path / f"out{SUFFIX[fmt]}"
    with pytest.raises(InputError, match=r"'bf', 'f8' hold raw .*--opaque-dtype"):
        gclip_cli.inspect_file(src)
    with pytest.raises(InputError, match="--opaque-dtype"):
        gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert not out.exists()

    named = ("bfloat16", "float8_e4m3fn")
    report = gclip_cli.inspect_file(src, options=Options(opaque_dtypes=named))
    assert report.global_norm == exact_norm(list(tensors.values()))
    assert {t.name: t.dtype for t in report.tensors}["bf"] == "bfloat16 (raw)"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0, options=Options(opaque_dtypes=named))
    written = read_raw(out, fmt)
    for name, values in tensors.items():
        assert written[name].dtype == values.dtype
        expected = expected_scaled(values, report)
        assert written[name].view(np.uint8).tobytes() == expected.view(np.uint8).tobytes(), name
    assert read_tensors(out, fmt)["bf"].dtype.str.endswith("V2")  # still raw in the file


def test_raw_values_left_out_by_exclude_are_copied_untouched(tmp_path):
    tensors = raw_tensors()
    src = write_raw(tmp_path / "in.npz", "npz", tensors)
    report = gclip_cli.rescale_file(
        src, tmp_path / "o.npz", max_norm=1e-3, options=Options(exclude=("bf", "f8"))
    )
    assert report.global_norm == exact_norm([tensors["w"]])
    written = read_tensors(tmp_path / "o.npz", "npz")
    assert written["bf"].tobytes() == tensors["bf"].tobytes()


def test_opaque_dtypes_must_be_known_and_one_per_size(tmp_path):
    src = write_raw(tmp_path / "in.npz", "npz", raw_tensors())
    with pytest.raises(UsageError, match="not one of"):
        gclip_cli.inspect_file(src, options=Options(opaque_dtypes=("float16",)))
    with pytest.raises(UsageError, match="two opaque dtypes of 1 byte"):
        gclip_cli.inspect_file(src, options=Options(opaque_dtypes=("float8_e4m3fn", "float8_e5m2")))
