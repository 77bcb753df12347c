"""Remote objects read by ranges (formats/ranged.py): stand-ins, and bytes fetched by window
from memory:// (fsspec's in-process file system)."""

from __future__ import annotations

import tempfile
import uuid
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from gclip_cli.errors import InputError
from gclip_cli.formats import detect_format, open_file

fsspec = pytest.importorskip("fsspec", reason="needs gclip[remote]")

from gclip_cli.formats.ranged import (  # noqa: E402
    STAND_IN_FOLDER,
    RangedBytes,
    StandIn,
    is_stand_in,
)
from gclip_cli.urls import open_remote, version_of  # noqa: E402


@pytest.fixture
def stored():
    """put(bytes) -> the StandIn of a new memory:// object holding them."""
    fs = fsspec.filesystem("memory")
    root = f"/ranged-{uuid.uuid4().hex[:8]}"

    def put(data: bytes) -> StandIn:
        fs.pipe_file(f"{root}/o", data)
        url = f"memory://{root}/o"
        return StandIn(url, "safetensors", len(data), version_of(open_remote(url, {})))

    yield put
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def private(tmp_path, monkeypatch):
    """A folder such as gclip makes for stand-ins (in a temporary folder of the test's own)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = Path(tempfile.mkdtemp(prefix=STAND_IN_FOLDER))
    return folder


def test_a_stand_in_reads_back_and_is_as_long_as_its_object(private):
    path = private / "g.safetensors"
    StandIn("s3://b/k", "safetensors", 10 << 20).write(path)
    assert StandIn.read(path) == StandIn("s3://b/k", "safetensors", 10 << 20)
    assert path.stat().st_size == 10 << 20
    assert is_stand_in(path.read_bytes()[:16])
    assert detect_format(path) == "safetensors"


def test_an_ordinary_file_is_no_stand_in(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x00gclip: a remote object, read by ranges\nnot json")
    assert StandIn.read(path) is None
    assert not is_stand_in(b"PK\x03\x04")


def test_windows_come_in_order_with_the_bytes_asked(stored):
    data = bytes(range(256)) * 1000
    ranged = RangedBytes(stored(data), {})
    pieces = [(0, 10), (10, 5000), (5010, 0), (100_000, 156_000)]
    try:
        got = [bytes(w) for w in ranged.windows(pieces)]
    finally:
        ranged.close()
    assert got == [data[s : s + n] for s, n in pieces]


def test_a_window_of_several_parts_is_whole_and_in_order(stored):
    data = np.random.default_rng(5).integers(0, 256, 11 << 20, dtype=np.uint8).tobytes()
    ranged = RangedBytes(stored(data), {})
    with closing(ranged):
        assert ranged.read(3, 10 << 20) == data[3 : 3 + (10 << 20)]  # parts of 4, 4 and 2 MiB


def test_an_object_shorter_than_its_stand_in_says_is_refused(stored):
    stand_in = stored(b"12345")
    ranged = RangedBytes(StandIn(stand_in.url, "safetensors", 10), {})
    with pytest.raises(InputError, match="changed while gclip read it"), closing(ranged):
        ranged.read(0, 10)


def test_a_stand_in_opens_as_its_format_only(stored, private, make_file):
    local = make_file("safetensors", {"w": np.ones(4, dtype=np.float32)})
    stand_in = stored(local.read_bytes())
    path = private / "g.safetensors"
    StandIn(stand_in.url, "safetensors", stand_in.size).write(path)
    with closing(open_file(path)) as tfile:
        assert [t.name for t in tfile.tensors] == ["w"]
    with pytest.raises(InputError, match="is a safetensors object, read by ranges as such only"):
        open_file(path, "npz")


@pytest.mark.parametrize("where", ["elsewhere", "shared folder"])
def test_a_stand_in_gclip_did_not_make_is_an_ordinary_file(stored, private, tmp_path, where):
    stand_in = stored(b"12345678")
    if where == "shared folder":
        private.chmod(0o755)
        path = private / "g.safetensors"
    else:
        path = tmp_path / "g.safetensors"
    StandIn(stand_in.url, "safetensors", stand_in.size).write(path)
    assert StandIn.read(path) is None
    with pytest.raises(InputError, match="unrecognised content"):
        detect_format(path)


def test_an_object_replaced_before_or_while_it_is_read_is_refused(stored):
    first = stored(b"a" * 100)
    stored(b"b" * 100)  # replaced after its stand-in was made: refused when opened
    with pytest.raises(InputError, match="was replaced while gclip was reading it"):
        RangedBytes(first, {})
    second = stored(b"c" * 100)
    ranged = RangedBytes(second, {})
    assert ranged.read(0, 3) == b"ccc"
    stored(b"d" * 100)  # replaced while read: refused when done with
    with pytest.raises(InputError, match="was replaced"):
        ranged.close()
