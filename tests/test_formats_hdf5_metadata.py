"""Values whose address points into an HDF5 file's metadata: refused before anything is
written, or written into an output that reads back with the same structure; never an
unreadable output."""

import struct

import h5py
import numpy as np
import pytest
from conftest import expected_scaled

import gclip_cli
from gclip_cli import InputError
from gclip_cli.formats.hdf5_metadata import describe_structure
from gclip_cli.options import Options


def small_file(path, libver: str) -> tuple[int, int]:
    """A file with a group, attributes and two datasets; (where x's values begin, where the
    layout message keeps their address)."""
    with h5py.File(path, "w", libver=libver) as f:
        f.attrs["note"] = "kept"
        f.create_group("g").attrs["units"] = np.arange(3)
        f["x"] = np.linspace(-4, 4, 8, dtype=np.float32)
        f["g/y"] = np.arange(6, dtype=np.int64)
        start, size = f["x"].id.get_offset(), f["x"].id.get_storage_size()
    data = path.read_bytes()
    at = data.find(struct.pack("<QQ", start, size))
    assert at > 0 and data.find(struct.pack("<QQ", start, size), at + 1) < 0
    return start, at


@pytest.mark.parametrize(("libver", "step"), [("earliest", 40), ("latest", 96)])
def test_values_pointed_into_metadata_never_give_an_unreadable_output(tmp_path, libver, step):
    """Addresses from the superblock through the metadata (groups, heaps, headers): before,
    some gave an output HDF5 could not open (or whose structure had changed), with exit 0.
    (Checksummed metadata, libver latest, is refused throughout.)"""
    seed = tmp_path / "seed.h5"
    start, at = small_file(seed, libver)
    template = bytearray(seed.read_bytes())
    refused = written = 0
    for address in range(step, min(start, 2400), step):
        src, out = tmp_path / f"in{address}.h5", tmp_path / f"out{address}.h5"
        template[at : at + 8] = struct.pack("<Q", address)
        src.write_bytes(bytes(template))
        try:
            report = gclip_cli.rescale_file(
                src, out, max_norm=1e-3, options=Options(nonfinite="keep")
            )
        except InputError as exc:
            assert "\n" not in str(exc) and not out.exists()
            refused += 1
            continue
        written += 1
        with h5py.File(src) as a, h5py.File(out) as b:
            assert describe_structure(b) == describe_structure(a), address
            assert np.array_equal(b["g/y"][()], a["g/y"][()])
            expected = expected_scaled(a["x"][()], report) if report.clipped else a["x"][()]
            assert np.array_equal(b["x"][()], expected, equal_nan=True), address
        src.unlink()
        out.unlink()
    assert refused
    assert written or libver == "latest"  # unused bytes of metadata may take values


def test_the_dataset_whose_values_lie_in_metadata_is_named(tmp_path):
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        f["a"] = np.ones(4, dtype=np.float32)
        f["x"] = np.ones(8, dtype=np.float32)
        header = h5py.h5o.get_info(f["x"].id).addr  # x's values moved onto its own header
        start, size = f["x"].id.get_offset(), f["x"].id.get_storage_size()
    data = bytearray(src.read_bytes())
    at = data.find(struct.pack("<QQ", start, size))
    data[at : at + 8] = struct.pack("<Q", header)
    src.write_bytes(bytes(data))
    with pytest.raises(InputError, match="values of dataset 'x' would lie inside the file's"):
        gclip_cli.rescale_file(
            src, tmp_path / "out.h5", max_norm=1e-3, options=Options(nonfinite="keep")
        )
    assert not (tmp_path / "out.h5").exists()


def test_an_output_whose_structure_hdf5_broke_while_writing_is_refused(tmp_path):
    """The last key of a chunk B-tree bounds its chunks; lowered to 0, HDF5 writing the last
    chunk inserted it again: the clipped output (exit 0) listed a chunk twice, and gclip
    itself refused to read it."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    values = np.random.default_rng(7).standard_normal(30).astype("f2")
    with h5py.File(src, "w", libver="earliest") as f:
        f.create_dataset("sh", data=values, chunks=(8,), shuffle=True)
    data = bytearray(src.read_bytes())
    node = data.find(b"TREE\x01")  # the B-tree node of the chunks (type 1)
    (entries,) = struct.unpack("<H", data[node + 6 : node + 8])
    last_key = node + 24 + entries * 32  # a 24-byte header, then (key, child) pairs
    data[last_key + 8 : last_key + 16] = struct.pack("<Q", 0)  # its first coordinate
    src.write_bytes(bytes(data))
    with pytest.raises(InputError, match="rewriting its values changed the file's structure"):
        gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert not out.exists()


def test_values_in_the_unused_part_of_a_chunk_index_node_are_refused(tmp_path):
    """A B-tree node has room for more chunks than it lists; reading does not depend on those
    bytes, but HDF5 writes the node back whole when it rewrites the chunks: values put there
    were overwritten (found by the structure fuzzer: an lzf chunk the output could not
    decode, exit 0)."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    values = np.random.default_rng(3).standard_normal(20).astype(np.float32)
    with h5py.File(src, "w", libver="earliest") as f:
        f.create_dataset("lzf", data=values, chunks=(5,), compression="lzf")
        first = []
        f["lzf"].id.chunk_iter(first.append)
    data = bytearray(src.read_bytes())
    node = data.find(b"TREE\x01")
    (entries,) = struct.unpack("<H", data[node + 6 : node + 8])
    unused = node + 24 + (entries + 1) * 32 + 64  # past the last key
    old = struct.pack("<Q", first[0].byte_offset)
    at = data.find(old, node)
    data[at : at + 8] = struct.pack("<Q", unused)
    data[unused : unused + first[0].size] = src.read_bytes()[
        first[0].byte_offset : first[0].byte_offset + first[0].size
    ]  # the chunk's bytes, moved there: the input reads as it did
    src.write_bytes(bytes(data))
    with h5py.File(src) as f:
        assert np.array_equal(f["lzf"][()], values)
    with pytest.raises(InputError, match="would lie inside an object header or chunk index"):
        gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert not out.exists()
