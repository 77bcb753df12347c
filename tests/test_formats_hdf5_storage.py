"""Where an HDF5 file says a dataset's values lie, checked before anything goes there: files
written by h5py, then crafted at the byte level (addresses patched where the file keeps them)."""

import os
import signal
import struct
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest
from conftest import expected_scaled

import gclip_cli
from gclip_cli.formats.hdf5_storage import MAX_CHUNK_BYTES
from gclip_cli.strategies import GlobalNorm


def patch_address(path, old: int, new: int, follows: bytes = b"") -> None:
    """Replace the one place the file keeps the 8-byte address *old* (followed by *follows*)
    with *new*."""
    data = bytearray(path.read_bytes())
    needle = struct.pack("<Q", old) + follows
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the address is not unique in the file"
    data[at : at + 8] = struct.pack("<Q", new % (1 << 64))
    path.write_bytes(bytes(data))


def gclip(*args, timeout=120, **popen) -> subprocess.CompletedProcess:
    """Run gclip; past *timeout* seconds, end it and its children (its HDF5 child too)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def one_error_line(proc: subprocess.CompletedProcess, code: int = 3) -> str:
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("gclip: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def patch_contiguous_address(path, name: str, new: int) -> None:
    """Point the values of contiguous dataset *name* to address *new* (its layout message
    keeps the address, then the size)."""
    with h5py.File(path) as f:
        old, size = f[name].id.get_offset(), f[name].id.get_storage_size()
    patch_address(path, old, new, follows=struct.pack("<Q", size))


def contiguous_file(path) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(1, 9, dtype=np.float32))
        f.create_dataset("y", data=np.ones(4, dtype=np.float64))


def chunked_file(path, compression=None):
    with h5py.File(path, "w") as f:
        values = np.arange(1, 41, dtype=np.float32).reshape(4, 10)
        f.create_dataset("x", data=values, chunks=(2, 10), compression=compression)
        found = []
        f["x"].id.chunk_iter(found.append)
    return found


# address -> what the test makes of it, from the first chunk's own address and the file size
BAD_ADDRESSES = {
    "zero": lambda own, size: 0,
    "in_superblock": lambda own, size: 40,
    "past_the_end": lambda own, size: size + 100,
    "end_overflows": lambda own, size: (1 << 64) - 16,
    "beyond_int64": lambda own, size: (1 << 63) + 5,
}


def test_a_contiguous_dataset_at_address_0_is_one_line(tmp_path):
    """h5py reports address 0 as an error of its own: this was a traceback, exit 1."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    contiguous_file(src)
    patch_contiguous_address(src, "x", 0)
    for args in (["norm", src], ["rescale", src, out, "--max-norm", "1"]):
        line = one_error_line(gclip(*args))
        assert "'x'" in line and "superblock" in line
    assert not out.exists()


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
@pytest.mark.parametrize("bad", list(BAD_ADDRESSES))
def test_chunk_addresses_outside_the_file_are_one_line(tmp_path, bad, compression):
    """Addresses past 2**63 were an OverflowError traceback; the others read the superblock as
    values (norm NaN, or a clipped copy of it) or were left to HDF5."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    first = chunked_file(src, compression)[0]
    patch_address(src, first.byte_offset, BAD_ADDRESSES[bad](first.byte_offset, src.stat().st_size))
    before = src.read_bytes()
    for args in (["norm", src], ["rescale", src, out, "--max-norm", "1"]):
        line = one_error_line(gclip(*args))
        assert "dataset 'x': its chunk at (0, 0)" in line, line
    assert not out.exists() and src.read_bytes() == before


def test_chunks_over_each_other_are_refused_before_writing(tmp_path):
    """The first chunk moved 8 bytes into the second: the clipped copy had the overlap
    scaled twice (exit 0)."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    first, second = chunked_file(src)
    patch_address(src, first.byte_offset, second.byte_offset - 8)
    line = one_error_line(gclip("rescale", src, out, "--max-norm", "1"))
    assert "two chunks of dataset 'x' would lie over each other" in line
    assert not out.exists()


def test_values_over_another_datasets_values_are_refused(tmp_path):
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    with h5py.File(src, "w") as f:
        f["x"] = np.arange(1, 9, dtype=np.float32)
        # not rescaled: its values must survive (read as float32 they are 1 .. 8, to clip)
        f["n"] = np.arange(1, 9, dtype=np.float32).view(np.int32)
        other = f["n"].id.get_offset()
    patch_contiguous_address(src, "x", other)
    line = one_error_line(gclip("rescale", src, out, "--max-norm", "1"))
    assert "datasets" in line and "'x'" in line and "'n'" in line
    assert not out.exists()


def test_unallocated_chunks_are_not_a_damage(tmp_path):
    """An undefined address in a chunk index is a chunk never written: HDF5 reads the fill
    value there, and so does gclip."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    first = chunked_file(src)[0]
    patch_address(src, first.byte_offset, (1 << 64) - 1)
    with h5py.File(src) as f:
        values = f["x"][()]
    assert values[:2].tolist() == [[0.0] * 10] * 2
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    with h5py.File(out) as f:
        assert np.array_equal(f["x"][()], expected_scaled(values, report))


def test_sound_files_pass_every_check(tmp_path):
    """User block, both superblock versions, every layout: nothing is refused."""
    rng = np.random.default_rng(5)
    for libver, userblock in (("earliest", 0), ("latest", 512)):
        src, out = tmp_path / f"{libver}.h5", tmp_path / f"{libver}-out.h5"
        with h5py.File(src, "w", libver=libver, userblock_size=userblock) as f:
            f["plain"] = rng.standard_normal(100).astype(np.float32)
            f.create_dataset("gz", data=rng.standard_normal((30, 7)), chunks=(4, 7), compression=1)
            compact(f, "small", rng.standard_normal(3))
            f.create_dataset("late", shape=(10,), dtype="f4", chunks=(5,))[:5] = 2.0
            f["ints"] = np.arange(50)
            f.attrs["note"] = "kept"
        report = gclip_cli.rescale_file(src, out, max_norm=1.0)
        with h5py.File(src) as a, h5py.File(out) as b:
            for name in ("plain", "gz", "small", "late"):
                assert np.array_equal(b[name][()], expected_scaled(a[name][()], report))
            assert b.attrs["note"] == "kept" and np.array_equal(b["ints"][()], a["ints"][()])


def compact(f: h5py.File, name: str, values: np.ndarray) -> None:
    """A dataset whose values lie in its object header (h5py makes none by itself)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)
    space = h5py.h5s.create_simple(values.shape)
    dsid = h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(values.dtype), space, dcpl=dcpl)
    dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, values)


# --- chunk sizes and inflating streams: memory bounded whatever the file declares ------------


def peak_rss_of(*args) -> tuple[subprocess.CompletedProcess, int]:
    """Run gclip; its exit and the peak RSS (bytes) of it and its children."""
    script = (
        "import resource, subprocess, sys\n"
        "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stdout.write(proc.stdout)\n"
        "sys.stderr.write(proc.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(proc.returncode)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, sys.executable, "-m", "gclip_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    *lines, peak = proc.stderr.splitlines()
    proc.stderr = "".join(f"{line}\n" for line in lines)
    return proc, int(peak) * 1024


def deflated_zeros(nbytes: int) -> bytes:
    """A zlib stream of *nbytes* zero bytes, made a MiB at a time."""
    stream = zlib.compressobj(9)
    piece = bytes(1 << 20)
    parts = [
        stream.compress(piece[: min(len(piece), nbytes - done)])
        for done in range(0, nbytes, len(piece))
    ]
    return b"".join(parts) + stream.flush()


def test_chunks_declared_larger_than_the_limit_are_refused(tmp_path):
    """One 256 MiB gzip chunk of zeros in a 260 KB file: HDF5 held it whole (and more),
    past 512 MiB of RSS."""
    src = tmp_path / "big_chunk.h5"
    count = 64 << 20  # float32 values: 256 MiB
    with h5py.File(src, "w") as f:
        ds = f.create_dataset("x", shape=(count,), chunks=(count,), dtype="<f4", compression="gzip")
        ds.id.write_direct_chunk((0,), deflated_zeros(count * 4))
    assert src.stat().st_size < 1 << 20
    proc, peak = peak_rss_of("norm", src)
    line = one_error_line(proc)
    assert "decode to 268,435,456 bytes" in line and f"{MAX_CHUNK_BYTES >> 20} MiB" in line
    assert peak < 512 << 20


def test_chunks_at_the_limit_are_read_and_written_within_the_memory_bound(tmp_path):
    """One 64 MiB chunk with gzip and Fletcher-32 (so HDF5 decodes and encodes it)."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    count = MAX_CHUNK_BYTES // 4
    with h5py.File(src, "w") as f:
        ds = f.create_dataset(
            "x", shape=(count,), chunks=(count,), dtype="<f4", compression="gzip",
            fletcher32=True,
        )  # fmt: skip
        ds[::4096] = np.arange(count // 4096, dtype=np.float32)
    proc, peak = peak_rss_of("rescale", src, out, "--max-norm", "1")
    assert proc.returncode == 0, proc.stderr
    assert peak < 512 << 20
    report = gclip_cli.inspect_file(src)
    with h5py.File(src) as a, h5py.File(out) as b:
        assert np.array_equal(b["x"][::4096], expected_scaled(a["x"][::4096], _clip(report)))
        assert not np.any(b["x"][1:4096])


def _clip(report):
    """What expected_scaled reads of a rescale report, from an inspect report's norm."""

    class Clipped:
        global_norm, strategy = report.global_norm, GlobalNorm(max_norm=1.0)

    return Clipped


def test_lzf_chunks_declared_larger_than_the_limit_are_refused(tmp_path):
    src = tmp_path / "big_lzf.h5"
    count = 32 << 20  # float32 values: 128 MiB
    with h5py.File(src, "w") as f:
        ds = f.create_dataset("x", shape=(count,), chunks=(count,), dtype="<f4", compression="lzf")
        ds[:10] = 1.0
    proc, peak = peak_rss_of("rescale", src, tmp_path / "out.h5", "--max-norm", "1")
    assert "decode to 134,217,728 bytes" in one_error_line(proc)
    assert peak < 512 << 20 and not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("fletcher32", [True, False])
def test_streams_inflating_past_their_chunk_are_refused_before_hdf5_decodes_them(
    tmp_path, fletcher32
):
    """A 1 MiB chunk whose stream inflates to 600 MiB (in a 600 KB file): HDF5's deflate
    filter inflated it whole.  With Fletcher-32 after deflate, or in a sparse dataset, HDF5
    (not gclip) decodes the chunks."""
    src = tmp_path / "bomb.h5"
    with h5py.File(src, "w") as f:
        ds = f.create_dataset(
            "x",
            shape=(4, 1 << 18),
            chunks=(1, 1 << 18),
            dtype="<f4",
            compression="gzip",
            fletcher32=fletcher32,
        )
        ds[1:] = 1.0  # without Fletcher-32, chunk 0 is left unallocated: sparse
        stream = deflated_zeros(600 << 20)
        if fletcher32:  # HDF5 checks the checksum before inflating: give the right one
            stream += _fletcher32(stream)
        ds.id.write_direct_chunk((1, 0), stream)
    proc, peak = peak_rss_of("norm", src)
    line = one_error_line(proc)
    assert "chunk at (1, 0)" in line and "more than the" in line
    assert peak < 512 << 20


def _fletcher32(data: bytes) -> bytes:
    """HDF5's Fletcher-32 of *data*, as its filter stores it (H5_checksum_fletcher32)."""
    sum1 = sum2 = 0
    words = len(data) // 2
    position = 0
    while words:
        run = min(words, 360)
        words -= run
        for _ in range(run):
            sum1 += data[position] << 8 | data[position + 1]
            position += 2
            sum2 += sum1
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    if len(data) % 2:
        sum1 += data[position] << 8
        sum2 += sum1
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
    sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    return struct.pack("<I", sum2 << 16 | sum1)


def test_unfiltered_chunks_stored_in_another_size_are_refused(tmp_path):
    """A chunk index saying 0 bytes for an unfiltered 400-byte chunk of a sparse dataset (which
    HDF5 reads): HDF5 took the chunk's values from uninitialised memory (other ones on each
    run), and gclip counted them."""
    src = tmp_path / "in.h5"
    with h5py.File(src, "w", libver="earliest") as f:
        ds = f.create_dataset("x", shape=(300,), chunks=(100,), dtype="<f4")
        ds[:200] = np.arange(200, dtype=np.float32)
    data = bytearray(src.read_bytes())
    node = data.find(b"TREE\x01")  # the B-tree node of the chunks: keys begin with the size
    first_key = node + 24
    assert struct.unpack("<I", data[first_key : first_key + 4]) == (400,)
    data[first_key : first_key + 4] = struct.pack("<I", 0)
    src.write_bytes(bytes(data))
    line = one_error_line(gclip("norm", src))
    assert "'x': its chunk at (0,) is stored unfiltered in 0 bytes, not 400" in line
