import numpy as np
import pytest
from conftest import SUFFIX, read_tensors

import gclip_cli


def test_excluded_tensors_are_not_counted_and_copied_untouched(make_file, fmt, tmp_path):
    tensors = {"enc.0.w": np.array([3.0, 4.0]), "dec.0.w": np.array([12.0]), "dec.1.b": np.ones(2)}
    src = make_file(fmt, tensors)
    out = tmp_path / f"out{SUFFIX[fmt]}"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0, exclude=("dec.*",))
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
    report = gclip_cli.inspect_file(src, include=("a.*",), exclude=("*.b",))
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
    assert gclip_cli.inspect_file(src, include=(pattern,)).global_norm == 4.0
    assert gclip_cli.inspect_file(src, exclude=(pattern,)).global_norm == 3.0
