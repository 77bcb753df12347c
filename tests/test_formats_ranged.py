"""Remote objects read by ranges (formats/ranged.py): stand-ins, and bytes fetched by window
from memory:// (fsspec's in-process file system)."""

from __future__ import annotations

import io
import os
import tempfile
import uuid
import zipfile
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from conftest import import_torch

from gclip_cli import inspect_files, remote, rescale_file
from gclip_cli.errors import InputError
from gclip_cli.formats import (
    ChunkedPieces,
    FinishesOutput,
    PlainValues,
    detect_format,
    open_file,
)
from gclip_cli.options import Options

fsspec = pytest.importorskip("fsspec", reason="needs gclip[remote]")

from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

from gclip_cli.formats.ranged import (  # noqa: E402
    STAND_IN_FOLDER,
    CachedRangedFile,
    RangedBytes,
    RangedFile,
    ReadAhead,
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


# --- zip archives (.npz, PyTorch) by ranges ------------------------------------------------


def _zip_of(entries: list[tuple[str, int, np.ndarray]]) -> bytes:
    """An .npz of (name, zip method, array) entries, as zipfile writes one."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, method, array in entries:
            member = io.BytesIO()
            np.lib.format.write_array(member, array)
            info = zipfile.ZipInfo(f"{name}.npy", (2024, 1, 2, 3, 4, 6))
            archive.writestr(info, member.getvalue(), compress_type=method)
    return buffer.getvalue()


def _torch_checkpoint(path: Path) -> None:
    torch = import_torch()
    x = torch.arange(4000, dtype=torch.float32).reshape(50, 80) / 1000
    y = torch.randn(70, 30, generator=torch.Generator().manual_seed(1))
    torch.save(
        {
            "strided": x[:, ::2],  # a view with gaps
            "transposed": y.t(),
            "empty": y[5:5],  # no values, within those of another tensor
            "half": torch.ones(300, dtype=torch.bfloat16),
            "steps": torch.arange(3),
        },
        path,
    )


def _zip_file(kind: str, tmp_path: Path, make_file) -> Path:
    """A local file of *kind*: an .npz of stored or deflated members, mixed, or a torch.save
    checkpoint."""
    rng = np.random.default_rng(11)
    tensors = {
        "a": rng.standard_normal((300, 40)).astype(np.float32),
        "b": rng.standard_normal(5000).astype(np.float16),
        "n": np.arange(10),
    }
    path = tmp_path / f"{kind}.zip"
    if kind == "npz stored":
        np.savez(path, **tensors)
        return tmp_path / f"{kind}.zip.npz"
    if kind == "npz deflated":
        np.savez_compressed(path, **tensors)
        return tmp_path / f"{kind}.zip.npz"
    if kind == "npz mixed":
        methods = {"a": zipfile.ZIP_DEFLATED, "b": zipfile.ZIP_STORED, "n": zipfile.ZIP_DEFLATED}
        entries = [(name, method, tensors[name]) for name, method in methods.items()]
        path.write_bytes(_zip_of(entries))
        return path
    _torch_checkpoint(path)
    return path


@pytest.fixture
def no_download(monkeypatch):
    """Any download of a whole object fails the test (objects must be read by ranges)."""

    def refused(*args, **kwargs):
        pytest.fail("the object was downloaded")

    monkeypatch.setattr(MemoryFileSystem, "get_file", refused)
    monkeypatch.setattr(MemoryFileSystem, "get", refused)


def _put(local: Path) -> str:
    url = f"memory://ranged-{uuid.uuid4().hex[:8]}/{local.name}"
    fsspec.filesystem("memory").pipe_file(url, local.read_bytes())
    return url


ZIP_KINDS = ["npz stored", "npz deflated", "npz mixed", "torch"]


@pytest.mark.parametrize("kind", ZIP_KINDS)
def test_a_zip_object_is_read_by_ranges_with_no_local_copy(kind, tmp_path, make_file):
    local = _zip_file(kind, tmp_path, make_file)
    url = _put(local)
    with remote.staged_inputs([url], {}) as ((path,), _):
        assert StandIn.read(Path(path)).file_format == ("torch" if kind == "torch" else "npz")
        assert Path(path).stat().st_blocks * 512 < 64 << 10  # sparse: no copy
        with closing(open_file(Path(path))) as ranged, closing(open_file(local)) as here:
            assert not isinstance(ranged, (PlainValues, ChunkedPieces))  # one process, in order
            assert isinstance(ranged, FinishesOutput)
            assert [t.name for t in ranged.tensors] == [t.name for t in here.tensors]
            for got, expected in zip(ranged.tensors, here.tensors, strict=True):
                assert np.array_equal(ranged.read_array(got), here.read_array(expected))
                if got.is_gradient:
                    chunks = list(ranged.read_chunks(got, 4096))
                    values = np.concatenate([*chunks, np.empty(0, got.dtype)])
                    local = list(here.read_chunks(expected, 4096))
                    assert np.array_equal(values, np.concatenate([*local, values[:0]]))


@pytest.mark.parametrize("kind", ZIP_KINDS)
def test_a_zip_object_rewrites_as_its_file(kind, tmp_path, make_file, no_download):
    local = _zip_file(kind, tmp_path, make_file)
    url = _put(local)
    assert _measured(inspect_files([url])) == _measured(inspect_files([local]))
    for max_norm in (1.0, 1e9):  # values rescaled; none changed (a byte copy)
        reference = tmp_path / f"reference-{max_norm}"
        rescale_file(local, reference, max_norm=max_norm)
        out = f"{url}.out-{max_norm}"
        rescale_file(url, out, max_norm=max_norm, options=Options(chunk_size=3000))
        assert fsspec.filesystem("memory").cat_file(out) == reference.read_bytes()
    assert reference.read_bytes() == local.read_bytes()


def _measured(report) -> list[dict]:
    return [{k: v for k, v in t.items() if k != "file"} for t in report.to_dict()["tensors"]]


def test_a_zip_object_replaced_after_it_was_found_is_refused(tmp_path, make_file):
    local = _zip_file("npz stored", tmp_path, make_file)
    url = _put(local)
    with remote.staged_inputs([url], {}) as ((path,), _):
        fsspec.filesystem("memory").pipe_file(url, local.read_bytes()[::-1])
        with pytest.raises(InputError, match="was replaced"):
            open_file(Path(path))


def test_a_truncated_zip_object_is_refused(tmp_path, make_file):
    local = _zip_file("npz stored", tmp_path, make_file)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(local.read_bytes()[:-30])  # no end record
    with (
        remote.staged_inputs([_put(cut)], {}) as ((path,), _),
        pytest.raises(InputError, match=r"not a readable \.npz \(zip\) file"),
    ):
        open_file(Path(path))


def test_a_ranged_file_reads_and_seeks_as_a_file(stored):
    data = bytes(range(256)) * 1000
    ranged = RangedBytes(stored(data), {})
    with closing(ranged), RangedFile(ranged) as file:
        assert file.seekable() and file.readable()
        assert file.read(10) == data[:10]
        assert file.seek(-5, os.SEEK_END) == len(data) - 5
        assert file.read() == data[-5:]
        assert file.read(3) == b""
        file.seek(100_000)
        assert file.tell() == 100_000
        assert file.read(70_000) == data[100_000:170_000]
        file.seek(3, os.SEEK_CUR)
        assert file.read(2) == data[170_003:170_005]


def test_short_reads_share_a_block_and_long_ones_are_fetched_whole(stored, monkeypatch):
    data = np.random.default_rng(6).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    fetched = _counting(monkeypatch)
    ranged = RangedBytes(stored(data), {})
    with closing(ranged):
        fetched.clear()
        got = [ranged.read(start, 30) for start in range(0, 60_000, 1000)]
        assert got == [data[s : s + 30] for s in range(0, 60_000, 1000)]
        assert len(fetched) == 1  # one block for 60 short reads
        assert ranged.read(65_530, 20) == data[65_530:65_550]  # across two blocks: fetched as is
        assert ranged.read(200_000, 300_000) == data[200_000:500_000]
    assert fetched[1:] == [(65_530, 65_550), (200_000, 500_000)]


def _counting(monkeypatch) -> list[tuple[int, int]]:
    """The (start, end) of every ranged GET from memory:// from now on."""
    fetched: list[tuple[int, int]] = []
    real = MemoryFileSystem.cat_file

    def cat_file(self, path, start=None, end=None, **kwargs):
        fetched.append((start, end))
        return real(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    return fetched


# --- HDF5 objects -----------------------------------------------------------------------------

H5_KINDS = ["contiguous", "chunked gzip", "chunked shuffle gzip big-endian", "sparse"]


def _hdf5_file(kind: str, tmp_path: Path) -> Path:
    """An HDF5 file written by h5py, its gradients stored as *kind* says, with a group, an
    attribute and an integer dataset besides."""
    import h5py

    rng = np.random.default_rng(23)
    path = tmp_path / f"{kind.replace(' ', '-')}.h5"
    values = rng.standard_normal((300, 70)).astype(np.float32)
    with h5py.File(path, "w") as file:
        file.attrs["step"] = 7
        group = file.create_group("layer")
        if kind == "contiguous":
            group.create_dataset("w", data=values)
            file.create_dataset("b", data=values[0].astype(np.float64))
        elif kind == "chunked gzip":
            group.create_dataset("w", data=values, chunks=(32, 16), compression="gzip")
            file.create_dataset("b", data=values[0], chunks=(10,), compression="gzip")
        elif kind == "chunked shuffle gzip big-endian":
            group.create_dataset(
                "w", data=values.astype(">f4"), chunks=(50, 70), compression="gzip", shuffle=True
            )
            file.create_dataset("b", data=values[0].astype(">f8"), chunks=(70,))
        else:
            sparse = group.create_dataset("w", shape=(400, 70), dtype=np.float32, chunks=(20, 70))
            sparse[40:60] = values[:20]  # one chunk of twenty allocated
            file.create_dataset("b", data=values[0])
        file.create_dataset("count", data=np.arange(12, dtype=np.int64))
    return path


@pytest.mark.parametrize("kind", H5_KINDS)
def test_an_hdf5_object_is_read_by_ranges_with_no_local_copy(kind, tmp_path, no_download):
    local = _hdf5_file(kind, tmp_path)
    url = _put(local)
    with remote.staged_inputs([url], {}) as ((path,), _):
        assert StandIn.read(Path(path)).file_format == "hdf5"
        assert Path(path).stat().st_blocks * 512 < 64 << 10  # sparse: no copy
        with closing(open_file(Path(path))) as ranged, closing(open_file(local)) as here:
            assert not isinstance(ranged, (PlainValues, ChunkedPieces))  # one process
            assert isinstance(ranged, FinishesOutput)
            assert ranged.attribute("step") == here.attribute("step") == 7
            assert [t.name for t in ranged.tensors] == [t.name for t in here.tensors]
            for got, expected in zip(ranged.tensors, here.tensors, strict=True):
                assert np.array_equal(ranged.read_array(got), here.read_array(expected))
                if got.is_gradient:
                    chunks = list(ranged.read_chunks(got, 4096))
                    values = np.concatenate([*chunks, np.empty(0, got.dtype)])
                    local_chunks = list(here.read_chunks(expected, 4096))
                    assert np.array_equal(values, np.concatenate([*local_chunks, values[:0]]))


@pytest.mark.parametrize("kind", H5_KINDS)
def test_an_hdf5_object_reports_and_rewrites_as_its_file(kind, tmp_path):
    local = _hdf5_file(kind, tmp_path)
    url = _put(local)
    assert _measured(inspect_files([url])) == _measured(inspect_files([local]))
    for max_norm in (1.0, 1e9):  # values rescaled; none changed (a byte copy)
        reference = tmp_path / f"reference-{max_norm}.h5"
        rescale_file(local, reference, max_norm=max_norm)
        out = f"{url}.out-{max_norm}"
        rescale_file(url, out, max_norm=max_norm, options=Options(chunk_size=3000))
        assert fsspec.filesystem("memory").cat_file(out) == reference.read_bytes()
    assert reference.read_bytes() == local.read_bytes()
    assert not list(tmp_path.glob(".gclip-input-*"))


def test_an_hdf5_rewrite_leaves_no_local_copy_behind(tmp_path):
    local = _hdf5_file("chunked gzip", tmp_path)
    url = _put(local)
    out = tmp_path / "out" / "rescaled.h5"
    out.parent.mkdir()
    rescale_file(url, out, max_norm=1.0)
    reference = tmp_path / "reference.h5"
    rescale_file(local, reference, max_norm=1.0)
    assert out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["rescaled.h5"]


def test_an_hdf5_object_replaced_after_it_was_found_is_refused(tmp_path):
    local = _hdf5_file("contiguous", tmp_path)
    url = _put(local)
    with remote.staged_inputs([url], {}) as ((path,), _):
        fsspec.filesystem("memory").pipe_file(url, local.read_bytes()[:-1] + b"\x01")
        with pytest.raises(InputError, match="was replaced"):
            open_file(Path(path))


def test_a_truncated_hdf5_object_is_refused(tmp_path):
    local = _hdf5_file("chunked gzip", tmp_path)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(local.read_bytes()[: local.stat().st_size // 2])
    with pytest.raises(InputError) as here:
        open_file(cut)
    with (
        remote.staged_inputs([_put(cut)], {}) as ((path,), _),
        pytest.raises(InputError) as there,
    ):
        open_file(Path(path))
    assert str(there.value).split(": ", 1)[1] == str(here.value).split(": ", 1)[1]


def test_hdf5_metadata_reads_share_cached_blocks(tmp_path, monkeypatch):
    """HDF5 reads an object's structure in many small reads: a few cached blocks serve them
    with a few GETs, where one cached block (RangedFile) takes many more."""
    import h5py

    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as file:
        for k in range(40):  # values of 100 KB between the headers: a block each
            file.create_dataset(f"g{k % 4}/d{k}", data=np.full(25_000, k, np.float32))
    url = _put(path)
    fetched = _counting(monkeypatch)
    with remote.staged_inputs([url], {}) as ((stand_in,), _):
        stand = StandIn.read(Path(stand_in))
        for file_class in (RangedFile, CachedRangedFile):
            ranged = RangedBytes(stand, {})
            fetched.clear()
            with closing(ranged), file_class(ranged) as view, h5py.File(view, "r") as file:
                names = []
                file.visit(names.append)
                shapes = {file[name].shape for name in names if name.count("/")}
            assert shapes == {(25_000,)}
            counted = len(fetched)
            if file_class is RangedFile:
                uncached = counted
    assert counted <= 12 and 3 * counted < uncached  # 9 and 46 GETs when written


def test_an_hdf5_rewrite_without_room_for_its_local_copy_is_refused(tmp_path, monkeypatch):
    from gclip_cli.errors import OutputError

    local = _hdf5_file("contiguous", tmp_path)
    url = _put(local)
    size = local.stat().st_size
    monkeypatch.setenv("GCLIP_SPOOL_LIMIT", str(size * 3 // 2))  # the output, not the copy too
    out = tmp_path / "out.h5"
    with pytest.raises(OutputError, match=f"needs {2 * size:,} bytes in .*GCLIP_SPOOL_LIMIT"):
        rescale_file(url, out, max_norm=1.0)
    assert not out.exists()
    assert not list(tmp_path.glob(".gclip-input-*"))
    monkeypatch.setenv("GCLIP_SPOOL_LIMIT", str(size * 2))
    rescale_file(url, out, max_norm=1.0)
    reference = tmp_path / "reference.h5"
    rescale_file(local, reference, max_norm=1.0)
    assert out.read_bytes() == reference.read_bytes()


def test_hdf5_chunks_are_fetched_together(tmp_path, monkeypatch):
    """Chunks of 80 KB (more than a cached block), adjacent in the file: one window, not a
    request each; read as the local file reads them."""
    import h5py

    path = tmp_path / "chunks.h5"
    values = np.random.default_rng(9).standard_normal((2000, 100)).astype(np.float32)
    with h5py.File(path, "w") as file:
        file.create_dataset("g", data=values, chunks=(200, 100), compression="gzip")
    url = _put(path)
    with (
        remote.staged_inputs([url], {}) as ((stand_in,), _),
        closing(open_file(Path(stand_in))) as ranged,
    ):
        fetched = _counting(monkeypatch)
        got = np.concatenate(list(ranged.read_chunks(ranged.tensors[0], 1 << 20)))
    assert np.array_equal(got.reshape(values.shape), values)
    assert len(fetched) == 1, fetched


def test_reads_ahead_serve_the_bytes_asked_in_or_out_of_order(stored, monkeypatch):
    data = np.random.default_rng(10).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    pieces = [(100_000, 70_000), (170_000, 90_000), (400_000, 80_000), (480_000, 5)]
    for asked in (pieces, [pieces[0], pieces[2], pieces[1], pieces[3]]):
        ranged = RangedBytes(stored(data), {})
        with closing(ranged):
            fetched = _counting(monkeypatch)
            ahead = ReadAhead(ranged, pieces)
            got = [ahead.read(start, length) for start, length in asked]
        assert got == [data[start : start + length] for start, length in asked]
        if asked == pieces:  # two runs of adjacent pieces: two windows
            assert fetched == [(100_000, 260_000), (400_000, 480_005)]
