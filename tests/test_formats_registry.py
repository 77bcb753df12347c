"""The one table of formats: detection, --file-format's choices and the messages come from it,
it imports without numpy, and a format is added to it with one line."""

import subprocess
import sys
from contextlib import closing

import numpy as np
import pytest
from conftest import write_tensors

from gclip_cli import InputError, UsageError, engine
from gclip_cli.formats import FORMATS, FormatEntry, crashes_on_damage, detect_format, open_file
from gclip_cli.formats.base import describe_array
from gclip_cli.options import Options
from gclip_cli.rewriters import Rewriter


def gclip(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *map(str, args)], capture_output=True, text=True
    )


def test_the_cli_offers_the_registry_formats_and_names_them_when_it_refuses(tmp_path):
    listed = "|".join(FORMATS.names)
    assert listed == "safetensors|npz|hdf5|torch"
    assert f"--file-format [{listed}]" in gclip("inspect", "--help").stdout
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"neither of them, nor anything else")
    proc = gclip("inspect", junk)
    assert proc.returncode == 3
    assert proc.stderr == (
        f"gclip: error: {junk}: is not a {FORMATS.listed()} file (unrecognised content)\n"
    )
    assert FORMATS.listed() == "safetensors, .npz, HDF5 or PyTorch"
    with pytest.raises(UsageError, match=r"is not one of safetensors, npz, hdf5, torch$"):
        Options(file_format="pt")


def test_the_registry_imports_without_numpy_or_zipfile():
    """--help lists the formats: it must not pay for numpy, nor for zipfile."""
    code = (
        "import sys\n"
        "from gclip_cli.formats.registry import FORMAT_NAMES\n"
        "from gclip_cli.cli import main\n"
        "try:\n"
        "    main(['inspect', '--help'], standalone_mode=False)\n"
        "finally:\n"
        "    print(FORMAT_NAMES, sorted({'numpy', 'zipfile', 'h5py'} & set(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "('safetensors', 'npz', 'hdf5', 'torch') []"


def test_only_formats_whose_library_can_crash_are_worked_on_in_a_child():
    assert [e.name for e in FORMATS.entries if e.crashes_on_damage] == ["hdf5"]
    assert [crashes_on_damage(name) for name in FORMATS.names] == [False, False, True, False]


# --- a format of the test's own --------------------------------------------------------------


def is_dummy(head: bytes, file) -> bool:
    return head.startswith(b"DUMMY")


class DummyFile:
    """b"DUMMY" then little-endian float32 values: one tensor, the core protocol only."""

    format_name = "dummy"

    def __init__(self, path) -> None:
        self.path = path
        self._values = np.frombuffer(path.read_bytes()[5:], dtype="<f4")
        self.tensors = [describe_array("values", self._values.dtype, self._values.shape)]

    def read_chunks(self, tensor, chunk_size):
        step = max(1, chunk_size // 4)
        for start in range(0, self._values.size, step):
            yield self._values[start : start + step]

    def write_transformed(self, out, transform, chunk_size, leave=frozenset()):
        written = np.empty_like(self._values)
        step = max(1, chunk_size // 4)
        for start in range(0, self._values.size, step):
            part = slice(start, start + step)
            transform(self.tensors[0], self._values[part], written[part])
        out.write_bytes(b"DUMMY" + written.tobytes())

    def close(self) -> None:
        pass


class Halve(Rewriter):
    def rewrite(self, tensor, src, dst):
        np.multiply(src, np.float32(0.5), out=dst)


def test_a_format_is_added_with_one_line(tmp_path):
    registry = FORMATS.adding(
        FormatEntry("dummy", "dummy", f"{__name__}:is_dummy", f"{__name__}:DummyFile")
    )
    values = np.arange(1, 11, dtype="<f4")
    src = tmp_path / "grads.bin"
    src.write_bytes(b"DUMMY" + values.tobytes())
    other = write_tensors(tmp_path / "g.safetensors", "safetensors", {"w": values})
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"nothing known")
    assert registry.names == ("safetensors", "npz", "hdf5", "torch", "dummy")
    assert [registry.detect(path) for path in (src, other)] == ["dummy", "safetensors"]
    assert registry.listed() == "safetensors, .npz, HDF5, PyTorch or dummy"
    with pytest.raises(
        InputError, match=r"is not a safetensors, \.npz, HDF5, PyTorch or dummy file"
    ):
        registry.detect(junk)
    assert "dummy" not in FORMATS.names  # the package's registry is left as it is
    with pytest.raises(InputError, match="unrecognised content"):
        detect_format(src)
    with closing(registry.open(src)) as tfile:
        assert isinstance(tfile, DummyFile)
        stats = engine.measure_tensors(tfile, 2.0, 16, jobs=2)
        engine.rewrite(tfile, tmp_path / "out.bin", Halve(2.0), 16, jobs=2)
    assert stats[0].norm() == float(np.sqrt(np.sum(values.astype(np.float64) ** 2)))
    written = np.frombuffer((tmp_path / "out.bin").read_bytes()[5:], dtype="<f4")
    assert written.tolist() == (values / 2).tolist()
    with closing(registry.open(other, "safetensors")) as tfile:
        assert tfile.format_name == "safetensors"
    with closing(open_file(other)) as tfile:
        assert tfile.format_name == "safetensors"
