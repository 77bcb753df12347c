"""HDF5 files compressed by hdf5plugin's filters, read and rewritten by gclip in a process of its
own (the test process has hdf5plugin imported, which would register the filters for any child
it forks), and the one-line error when the filter is missing."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from conftest import exact_norm, expected_scaled, read_tensors

import gclip_cli
from gclip_cli import InputError

FILTERS = {  # the keyword arguments of create_dataset, from the hdf5plugin module
    "blosc": lambda plugin: plugin.Blosc(cname="lz4", clevel=5, shuffle=plugin.Blosc.SHUFFLE),
    "blosc2": lambda plugin: plugin.Blosc2(cname="zstd", clevel=3),
    "zstd": lambda plugin: plugin.Zstd(clevel=3),
    "lz4": lambda plugin: plugin.LZ4(),
    "bitshuffle": lambda plugin: plugin.Bitshuffle(cname="lz4"),
}


@pytest.fixture
def plugin():
    """hdf5plugin, to write the files (CI installs it: .ci/run)."""
    return pytest.importorskip(
        "hdf5plugin", reason="hdf5plugin not installed (pip install -e '.[hdf5plugin]')"
    )


def pipeline(dataset: h5py.Dataset) -> list[tuple]:
    """The dataset's filters as HDF5 stores them: id, flags, parameters, name."""
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(i) for i in range(plist.get_nfilters())]


def write_filtered(path, compression) -> None:
    rng = np.random.default_rng(7)
    with h5py.File(path, "w") as f:
        # several chunks, edge chunks included, in two dtypes
        f.create_dataset(
            "layer/w", data=rng.standard_normal((37, 20)).astype(np.float32), chunks=(8, 16),
            **compression,
        )  # fmt: skip
        f.create_dataset("layer/b", data=rng.standard_normal(50) * 30, chunks=(16,), **compression)
        f.create_dataset("step", data=np.int64(12))


def gclip(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *args], capture_output=True, text=True, **kwargs
    )


@pytest.mark.parametrize("name", FILTERS)
def test_files_with_hdf5plugin_filters_are_inspected_and_rescaled(tmp_path, plugin, name):
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    compression = FILTERS[name](plugin)
    write_filtered(src, compression)
    values = read_tensors(src, "hdf5")  # h5py's own reading, with hdf5plugin's filters

    inspected = gclip("inspect", str(src), "--json")
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    floats = [values["layer/w"], values["layer/b"]]
    assert report["global_norm"] == pytest.approx(exact_norm(floats), rel=1e-12)
    assert report["tensor_count"] == 2

    rescaled = gclip("rescale", str(src), str(out), "--max-norm", "1", "--json", "-q")
    assert rescaled.returncode == 0, rescaled.stderr
    report = SimpleNamespace(**json.loads(rescaled.stdout))
    report.strategy = SimpleNamespace(max_norm=report.max_norm, eps=report.eps)
    assert report.clipped
    written = read_tensors(out, "hdf5")
    for tensor in ("layer/w", "layer/b"):
        assert np.array_equal(written[tensor], expected_scaled(values[tensor], report)), tensor
    assert written["step"] == values["step"]
    with h5py.File(src) as a, h5py.File(out) as b:
        for tensor in ("layer/w", "layer/b"):
            assert pipeline(b[tensor]) == pipeline(a[tensor]), tensor
            assert pipeline(b[tensor])[0][0] == compression["compression"]
            assert b[tensor].chunks == a[tensor].chunks


# hdf5plugin absent: importing it finds None in sys.modules (ModuleNotFoundError); gclip's
# forked children inherit that
ABSENT = (
    "import sys\n"
    "sys.modules['hdf5plugin'] = None\n"
    "from gclip_cli.cli import entry_point\n"
    "sys.argv = ['gclip', *sys.argv[1:]]\n"
    "entry_point()\n"
)


@pytest.mark.parametrize("how", ["absent", "broken"])
def test_without_hdf5plugin_the_error_names_the_extra(tmp_path, plugin, how):
    work = tmp_path / "work"
    work.mkdir()
    src, out = work / "in.h5", work / "out.h5"
    write_filtered(src, plugin.Blosc())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if how == "absent":
        command = [sys.executable, "-c", ABSENT]
    else:  # present but broken: a hdf5plugin package first on the path whose import fails
        shadow = tmp_path / "shadow" / "hdf5plugin"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('libh5blosc.so: cannot open')\n")
        env["PYTHONPATH"] = str(shadow.parent)
        command = [sys.executable, "-m", "gclip_cli"]
    for args in (["inspect", str(src)], ["rescale", str(src), str(out), "--max-norm", "1"]):
        proc = subprocess.run([*command, *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 3, proc.stderr
        assert proc.stdout == ""
        [line] = proc.stderr.splitlines()  # one line, no traceback
        assert line.startswith(f"gclip: error: {src}: dataset 'layer/")
        assert "uses HDF5 filter 32001 (Blosc), which is not available" in line
        assert "pip install 'gclip[hdf5plugin]'" in line
        if how == "broken":
            assert "libh5blosc.so: cannot open" in line
    assert list(work.iterdir()) == [src]  # nothing written, not even a temporary file


@pytest.mark.parametrize(("name", "imported"), [("gzip", False), ("blosc", True)])
def test_hdf5plugin_is_imported_only_for_a_file_that_needs_it(tmp_path, plugin, name, imported):
    """Its import costs start-up; files gclip reads without it do not pay for it."""
    src = tmp_path / "in.h5"
    write_filtered(src, {"compression": "gzip"} if name == "gzip" else plugin.Blosc())
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gclip_cli.formats.hdf5 import Hdf5File\n"
        f"Hdf5File(Path({str(src)!r})).close()\n"
        "print('hdf5plugin' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(imported)


def test_a_filter_hdf5plugin_does_not_provide_names_the_plugin_path(tmp_path):
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:  # 511: an id HDF5 reserves for tests; no plugin has it
        f.create_dataset(
            "x", data=np.ones(10, np.float32), chunks=(5,), compression=511,
            allow_unknown_filter=True,
        )  # fmt: skip
    with pytest.raises(InputError) as caught:
        gclip_cli.inspect_file(src)
    message = caught.value.message
    assert message.startswith("dataset 'x' uses HDF5 filter 511, which is not available")
    assert "gclip[hdf5plugin] does not provide it" in message
    assert "HDF5_PLUGIN_PATH" in message
