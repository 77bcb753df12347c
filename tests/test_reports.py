"""Reports: NaN/Inf located per tensor (counts by kind, the first one's index in C order) in
every format and storage layout, whether one process or workers measure a tensor, compared
with numpy's own np.argwhere on the arrays the formats' libraries read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SUFFIX, read_tensors, write_tensors

from gclip_cli import api, parallel
from gclip_cli.formats import hdf5_chunks
from gclip_cli.norms import BLOCK
from gclip_cli.options import NonFinite, Options

# how the values are stored: a format, and for some a way of its (after the dash)
LAYOUTS = (
    *("safetensors", "npz", "npz-deflated", "npz-fortran", "npz-fortran-deflated"),
    *("hdf5", "hdf5-chunked"),
)


def spoiled(seed: int) -> dict[str, np.ndarray]:
    """Tensors of several shapes and dtypes with NaN, +Inf and -Inf at random places.  Workers
    measure parts of the long ones: "late" has them in its last block only (found by the
    worker that measures it), "big" its first in C order stored late in Fortran order."""
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((600, 400)).astype(np.float32)
    big[599, 0] = np.nan  # stored early in Fortran order, late in C order
    big[0, 399] = -np.inf  # the first in C order; stored late in Fortran order
    big[rng.integers(300, 600, 3), rng.integers(0, 400, 3)] = np.inf
    late = rng.standard_normal(4 * BLOCK + 5).astype(np.float32)
    late[rng.integers(3 * BLOCK, late.size, 4)] = [np.nan, np.inf, -np.inf, np.nan]
    tensors = {
        "big": big,
        "late": late,
        "cube": rng.standard_normal((5, 7, 9)),
        "half": rng.standard_normal(3 * BLOCK + 11).astype(np.float16),
        "clean": rng.standard_normal((4, 3)).astype(np.float32),
        "scalar": np.array(np.nan, dtype=np.float32),
    }
    for name in ("cube", "half"):
        flat = tensors[name].reshape(-1)
        for value in (np.nan, np.inf, -np.inf):
            flat[rng.integers(flat.size // 3, flat.size, 2)] = value
    return tensors


def write_layout(layout: str, folder, tensors) -> tuple[Path, str]:
    """Write *tensors* in *layout* into *folder*: the file, and its format."""
    fmt = layout.partition("-")[0]
    path = folder / f"in{SUFFIX[fmt]}"
    if "fortran" in layout:  # np.save stores F-contiguous arrays in Fortran order
        tensors = {name: np.asfortranarray(a) for name, a in tensors.items()}
    if layout.endswith("deflated"):
        np.savez_compressed(path, **tensors)
    elif layout == "npz-fortran":
        np.savez(path, **tensors)
    elif layout == "hdf5-chunked":
        with h5py.File(path, "w") as f:
            for name, values in tensors.items():
                # 1-D: chunks that tile blocks, so that workers measure pieces of them
                chunks = (4096,) if values.ndim == 1 else True
                chunked = {"chunks": chunks, "compression": "gzip"} if values.ndim else {}
                f.create_dataset(name, data=values, **chunked)
    else:
        write_tensors(path, fmt, tensors)
    return path, fmt


def expected(values: np.ndarray) -> dict:
    """The counts and the first index, from numpy."""
    bad = np.argwhere(~np.isfinite(values))
    return {
        "nan": int(np.isnan(values).sum()),
        "posinf": int(np.isposinf(values).sum()),
        "neginf": int(np.isneginf(values).sum()),
        "first_nonfinite": tuple(int(i) for i in bad[0]) if len(bad) else None,
    }


@pytest.fixture
def always_parallel(monkeypatch):
    """Hand even small files to workers, chunked HDF5 datasets cut in pieces of a block
    (forked workers inherit the patched thresholds)."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(hdf5_chunks, "PIECE_BYTES", 1)


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nonfinite_values_are_counted_by_kind_and_the_first_located(
    layout, jobs, tmp_path, always_parallel
):
    path, fmt = write_layout(layout, tmp_path, spoiled(seed=len(layout)))
    arrays = read_tensors(path, fmt)
    if "fortran" in layout:
        assert np.load(path)["big"].flags.f_contiguous  # the layout under test
    report = api.inspect_file(
        path, options=Options(jobs=jobs, chunk_size=4096, nonfinite=NonFinite.KEEP)
    )
    for tensor in report.tensors:
        found = {key: getattr(tensor, key) for key in ("nan", "posinf", "neginf")}
        found["first_nonfinite"] = tensor.first_nonfinite
        assert found == expected(arrays[tensor.name]), tensor.name
    assert report.nonfinite == sum(int((~np.isfinite(a)).sum()) for a in arrays.values())


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *args], capture_output=True, text=True, check=False
    )


def test_every_report_format_locates_them(make_file, tmp_path):
    tensors = spoiled(seed=7)
    src = make_file("safetensors", tensors)
    want = {name: expected(values) for name, values in read_tensors(src, "safetensors").items()}
    data = json.loads(run("inspect", str(src), "--json").stdout)
    lines = [
        json.loads(line)
        for line in run("inspect", str(src), "--format", "jsonl").stdout.splitlines()
    ]
    csv = run("inspect", str(src), "--format", "csv").stdout.splitlines()
    header = csv[0].split(",")
    for name, want_one in want.items():
        first = want_one["first_nonfinite"]
        as_json = want_one | {"first_nonfinite": None if first is None else list(first)}
        shown = next(t for t in data["tensors"] if t["name"] == name)
        assert {key: shown[key] for key in as_json} == as_json
        record = next(r for r in lines if r.get("name") == name)
        assert {key: record[key] for key in as_json} == as_json
        line = next(r for r in csv[1:] if r.startswith(f"{name},"))
        row = dict(zip(header, line.split(","), strict=True))
        assert row["first_nonfinite"] == ("" if first is None else "x".join(map(str, first)))
        assert int(row["posinf"]) == want_one["posinf"]


def test_the_table_shows_them_only_when_there_are_any(make_file):
    tensors = spoiled(seed=3)
    spoilt = run("inspect", str(make_file("safetensors", tensors, name="bad"))).stdout
    first = expected(tensors["big"])["first_nonfinite"]
    row = next(line for line in spoilt.splitlines() if line.startswith("big "))
    assert "first NaN/Inf at" in spoilt and row.endswith(f"[{first[0]}, {first[1]}]")
    clean = {"clean": tensors["clean"]}
    plain = run("inspect", str(make_file("safetensors", clean, name="good"))).stdout
    assert "NaN" not in plain and "Inf" not in plain


def test_sort_nonfinite_puts_the_most_first(make_file):
    tensors = spoiled(seed=5)
    src = make_file("npz", tensors)
    data = json.loads(run("inspect", str(src), "--json", "--sort", "nonfinite").stdout)
    counts = {name: int((~np.isfinite(a)).sum()) for name, a in tensors.items()}
    # the most first; ties keep file order
    want = sorted(tensors, key=lambda name: -counts[name])
    assert [t["name"] for t in data["tensors"]] == want


def test_sort_nonfinite_orders_layers_by_their_count(make_file):
    rng = np.random.default_rng(11)
    tensors = {f"h.{i}.w": rng.standard_normal(50).astype(np.float32) for i in range(4)}
    for i, count in enumerate([0, 3, 1, 5]):
        tensors[f"h.{i}.w"][rng.choice(50, count, replace=False)] = np.nan
    src = make_file("hdf5", tensors)
    args = ("inspect", str(src), "--json", "--by-layer", "--sort", "nonfinite")
    layers = json.loads(run(*args).stdout)["layers"]
    counts = {f"h.{i}": int(np.isnan(tensors[f"h.{i}.w"]).sum()) for i in range(4)}
    assert [layer["name"] for layer in layers] == sorted(counts, key=lambda n: -counts[n])
    assert {layer["name"]: layer["nonfinite"] for layer in layers} == counts
