"""Chunked HDF5 datasets that gclip decodes and encodes itself (shuffle, deflate), checked
against what h5py and HDF5's own filters read and write."""

import zlib
from collections import Counter

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import expected_scaled

import gclip_cli
from gclip_cli import InputError, parallel
from gclip_cli.cli import main
from gclip_cli.formats import deflate, hdf5_chunks, open_file
from gclip_cli.formats.hdf5_chunks import Filter, Pipeline, raw_chunks
from gclip_cli.formats.hdf5_storage import read_chunk_index
from gclip_cli.norms import BLOCK, measure
from gclip_cli.options import Options

LAYOUTS = {  # name: (values, create_dataset options)
    "gzip_edges": ((37, 70), "<f4", {"chunks": (8, 16), "compression": "gzip"}),
    "shuffle_gzip": ((50, 9, 5), "<f8", {"chunks": (7, 4, 5), "compression": 9, "shuffle": True}),
    "big_endian": ((1000,), ">f4", {"chunks": (64,), "compression": "gzip", "shuffle": True}),
    "half_shuffle": ((300, 3), "<f2", {"chunks": (32, 2), "shuffle": True}),
    "unfiltered": ((20, 20), "<f4", {"chunks": (6, 20)}),
    "one_chunk": ((5,), "<f4", {"chunks": (100,), "maxshape": (None,), "compression": "gzip"}),
    "lzf": ((40, 10), "<f4", {"chunks": (8, 10), "compression": "lzf"}),  # HDF5 filters it
}


def write_layouts(path, names=tuple(LAYOUTS)):
    rng = np.random.default_rng(4)
    arrays = {}
    with h5py.File(path, "w") as f:
        for name in names:
            shape, dtype, options = LAYOUTS[name]
            arrays[name] = (rng.standard_normal(shape) * 10).astype(dtype)
            f.create_dataset(name, data=arrays[name], **options)
    return arrays


def _raw(dataset):
    return raw_chunks(dataset, read_chunk_index(dataset, 0))


def test_layouts_are_read_by_gclip_itself(tmp_path):
    src = tmp_path / "in.h5"
    write_layouts(src)
    with h5py.File(src) as f:
        for name in LAYOUTS:
            assert (_raw(f[name]) is None) == (name == "lzf"), name


def test_norms_are_those_of_the_values_in_c_order(tmp_path):
    src = tmp_path / "in.h5"
    arrays = write_layouts(src)
    for chunk_size in (64, 4096, 1 << 20):
        for jobs in (1, 2):
            report = gclip_cli.inspect_file(src, options=Options(chunk_size=chunk_size, jobs=jobs))
            norms = {t.name: t.norm for t in report.tensors}
            for name, values in arrays.items():
                assert norms[name] == measure(values).norm(), (name, chunk_size, jobs)


@pytest.mark.parametrize("jobs", [1, 2])
def test_rescaled_values_and_dataset_properties(tmp_path, jobs):
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    arrays = write_layouts(src)
    report = gclip_cli.rescale_file(
        src, out, max_norm=1.0, options=Options(chunk_size=256, jobs=jobs)
    )
    assert report.clipped
    with h5py.File(src) as a, h5py.File(out) as b:
        for name, values in arrays.items():
            assert np.array_equal(b[name][()], expected_scaled(values, report)), name
            for prop in ("dtype", "shape", "maxshape", "chunks", "compression", "shuffle"):
                assert getattr(b[name], prop) == getattr(a[name], prop), (name, prop)
            assert b[name].compression_opts == a[name].compression_opts
    after = gclip_cli.inspect_file(out)
    assert after.global_norm == report.global_norm_after


def test_output_is_the_same_whatever_jobs_and_chunk_size(tmp_path):
    src = tmp_path / "in.h5"
    write_layouts(src)
    outputs = set()
    for jobs, chunk_size in ((1, 64), (2, 64), (2, 1 << 20), (3, 4096)):
        out = tmp_path / f"out-{jobs}-{chunk_size}.h5"
        report = gclip_cli.rescale_file(
            src, out, max_norm=1.0, options=Options(chunk_size=chunk_size, jobs=jobs)
        )
        outputs.add((out.read_bytes(), report.global_norm, report.global_norm_after))
    assert len(outputs) == 1


def test_edge_chunks_keep_the_bytes_beyond_the_dataset(tmp_path):
    """HDF5 stores edge chunks whole: what lies beyond the extent is not a value, and stays."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    with h5py.File(src, "w") as f:
        ds = f.create_dataset("w", shape=(10,), chunks=(8,), dtype="<f4", compression="gzip")
        ds[:8] = np.arange(1, 9, dtype=np.float32)
        tail = np.array([9, 10, 111, 222, 333, 444, 555, 666], dtype="<f4")  # 2 values, 6 beyond
        ds.id.write_direct_chunk((8,), zlib.compress(tail.tobytes()))
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    with h5py.File(out) as f:
        _, data = f["w"].id.read_direct_chunk((8,))
        stored = np.frombuffer(zlib.decompress(data), dtype="<f4")
        assert np.array_equal(stored[2:], tail[2:])
        assert np.array_equal(f["w"][()], expected_scaled(np.arange(1, 11, dtype="<f4"), report))


def test_chunks_stored_with_a_filter_skipped_keep_their_mask(tmp_path):
    """Filter mask bit 0 set: this chunk skipped deflate (as HDF5 does when it cannot help)."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    values = np.linspace(-3, 3, 16, dtype="<f4")
    with h5py.File(src, "w") as f:
        ds = f.create_dataset("w", shape=(16,), chunks=(8,), dtype="<f4", compression="gzip")
        ds.id.write_direct_chunk((0,), zlib.compress(values[:8].tobytes()))
        ds.id.write_direct_chunk((8,), values[8:].tobytes(), filter_mask=1)
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    with h5py.File(out) as f:
        assert f["w"].id.read_direct_chunk((8,))[0] == 1
        assert f["w"].id.read_direct_chunk((0,))[0] == 0
        assert np.array_equal(f["w"][()], expected_scaled(values, report))


def test_rewritten_chunks_leave_no_unscaled_bytes_behind(tmp_path):
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_layouts(src, ["gzip_edges"])
    with h5py.File(src) as f:
        old = [f["gzip_edges"].id.read_direct_chunk((row, 0))[1] for row in range(0, 37, 8)]
    gclip_cli.rescale_file(src, out, max_norm=1.0)
    data = out.read_bytes()
    assert not [chunk for chunk in old if chunk in data]


def test_user_block_offsets(tmp_path):
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    values = np.random.default_rng(2).standard_normal((40, 30)).astype(np.float32)
    with h5py.File(src, "w", userblock_size=512) as f:
        f.create_dataset("w", data=values, chunks=(8, 8), compression="gzip")
    with open(src, "r+b") as raw:
        raw.write(b"not HDF5: a user block")
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert report.tensors[0].norm == measure(values).norm()
    assert out.read_bytes()[:22] == b"not HDF5: a user block"
    with h5py.File(out) as f:
        assert np.array_equal(f["w"][()], expected_scaled(values, report))


def test_other_filters_and_sparse_datasets_go_through_hdf5(tmp_path):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("lzf", data=np.ones(100, "f4"), chunks=(10,), compression="lzf")
        f.create_dataset("checked", data=np.ones(100, "f4"), chunks=(10,), fletcher32=True)
        f.create_dataset("sparse", shape=(100,), chunks=(10,), dtype="f4")[:10] = 1.0
        f.create_dataset("contiguous", data=np.ones(100, "f4"))
        f.create_dataset("wide_band", shape=(2, 1 << 22), chunks=(2, 1), dtype="f4")
        for name in ("lzf", "checked", "sparse", "wide_band"):
            assert _raw(f[name]) is None, name


def test_a_damaged_chunk_is_one_error_line_naming_dataset_and_chunk(tmp_path):
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_layouts(src, ["gzip_edges"])
    with h5py.File(src) as f:
        info = f["gzip_edges"].id.get_chunk_info_by_coord((8, 16))
    with open(src, "r+b") as raw:
        raw.seek(info.byte_offset + 2)
        raw.write(b"\xff" * 16)
    before = src.read_bytes()
    result = CliRunner().invoke(main, ["rescale", str(src), str(out), "--max-norm", "1"])
    assert result.exit_code != 0
    message = result.output.strip().splitlines()
    assert len(message) == 1 and "in.h5" in message[0]
    assert "'gzip_edges', chunk at (8, 16)" in message[0]
    assert not out.exists() and src.read_bytes() == before


def test_pipeline_reads_the_filters_and_their_parameters(tmp_path):
    with h5py.File(tmp_path / "in.h5", "w") as f:
        ds = f.create_dataset(
            "w", shape=(10,), chunks=(5,), dtype="<f8", compression=7, shuffle=True
        )
        pipeline = Pipeline.of(ds)
    assert [(s.code, s.parameter) for s in pipeline.filters] == [
        (h5py.h5z.FILTER_SHUFFLE, 8),
        (h5py.h5z.FILTER_DEFLATE, 7),
    ]


def test_shuffle_groups_bytes_by_position_and_round_trips():
    shuffle = Filter(h5py.h5z.FILTER_SHUFFLE, 4)
    data = np.array([0x04030201, 0x08070605, 0x0C0B0A09], dtype="<u4").tobytes() + b"\xee"
    shuffled = shuffle.encode(data)
    assert shuffled == bytes([1, 5, 9, 2, 6, 10, 3, 7, 11, 4, 8, 12, 0xEE])  # tail stays
    assert shuffle.decode(shuffled, len(data)) == data


def test_without_isal_zlib_deflates_at_the_dataset_level(tmp_path, monkeypatch):
    monkeypatch.setattr(deflate, "isal_zlib", None)
    data = np.arange(1000, dtype="<f4").tobytes()
    assert deflate.deflate(data, 7) == zlib.compress(data, 7)
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    arrays = write_layouts(src, ["shuffle_gzip"])
    report = gclip_cli.rescale_file(src, out, max_norm=1.0, options=Options(jobs=1))
    with h5py.File(out) as f:
        assert np.array_equal(
            f["shuffle_gzip"][()], expected_scaled(arrays["shuffle_gzip"], report)
        )


def test_pieces_begin_where_a_band_and_a_block_of_values_begin(tmp_path):
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("aligned", data=np.ones((300, 512), "f4"), chunks=(16, 64))
        f.create_dataset("never", data=np.ones((37, 70), "f4"), chunks=(8, 16))
    file = open_file(src)
    try:
        pieces = {t.name: [] for t in file.tensors}
        for piece in file.chunked_pieces():
            pieces[piece.tensor.name].append(piece.rows)
    finally:
        file.close()
    # 512 values a row: a block of 65,536 starts every 128 rows, and 128 is a multiple of 16
    assert [(r.start, r.stop, r.step) for r in pieces["aligned"]] == [(0, 300, 16)]
    assert [(r.start, r.stop) for r in pieces["never"]] == [(0, 37)]


def test_workers_measure_pieces_to_the_same_norms(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(hdf5_chunks, "PIECE_BYTES", 1)  # as many pieces as there can be
    rng = np.random.default_rng(5)
    arrays = {
        "aligned": rng.standard_normal((300, 512)).astype("f4"),
        "never": rng.standard_normal((37, 70)).astype("f8"),
        "flat": rng.standard_normal(3 * BLOCK + 5).astype("f2"),
    }
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("aligned", data=arrays["aligned"], chunks=(16, 64), compression="gzip")
        f.create_dataset("never", data=arrays["never"], chunks=(8, 16), shuffle=True)
        f.create_dataset("flat", data=arrays["flat"], chunks=(BLOCK // 2,), compression="gzip")
    file = open_file(src)
    try:
        counts = Counter(piece.tensor.name for piece in file.chunked_pieces())
    finally:
        file.close()
    assert counts == {"aligned": 3, "never": 1, "flat": 4}
    for jobs in (2, 3):
        report = gclip_cli.inspect_file(src, options=Options(jobs=jobs))
        for tensor in report.tensors:
            assert tensor.norm == measure(arrays[tensor.name]).norm(), (tensor.name, jobs)


def test_workers_encode_pieces_into_the_same_file(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(hdf5_chunks, "PIECE_BYTES", 1)
    src = tmp_path / "in.h5"
    arrays = write_layouts(src)
    results = []
    for jobs in (1, 2, 3):
        out = tmp_path / f"out{jobs}.h5"
        report = gclip_cli.rescale_file(src, out, max_norm=1.0, options=Options(jobs=jobs))
        after = [(t.name, t.norm_after) for t in report.tensors]
        results.append((out.read_bytes(), report.global_norm_after, after))
        with h5py.File(out) as f:
            for name, values in arrays.items():
                assert np.array_equal(f[name][()], expected_scaled(values, report)), name
    assert results[1] == results[0] and results[2] == results[0]
    assert not [p for p in tmp_path.iterdir() if p.suffix not in (".h5",)]  # no spool left


def _chunk_infos(dataset):
    found = []
    dataset.id.chunk_iter(found.append)
    return found


def test_inflating_stops_at_the_expected_size_and_refuses_truncated_streams():
    stream = zlib.compress(bytes(1000))
    assert deflate.inflate(stream, 1000) == bytes(1000)
    with pytest.raises(ValueError, match="more than the 999 bytes"):
        deflate.inflate(stream, 999)
    with pytest.raises(ValueError, match="truncated"):
        deflate.inflate(stream[:-4], 1000)  # the Adler-32 at the end is missing


def test_a_chunk_inflating_beyond_its_size_is_refused(tmp_path):
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        ds = f.create_dataset("w", shape=(16,), chunks=(8,), dtype="<f4", compression="gzip")
        ds.id.write_direct_chunk((0,), zlib.compress(bytes(32)))
        ds.id.write_direct_chunk((8,), zlib.compress(bytes(1 << 20)))  # a 1 MiB "chunk"
    with pytest.raises(InputError, match=r"chunk at \(8,\): deflate stream holds more"):
        gclip_cli.inspect_file(src)
