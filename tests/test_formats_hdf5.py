import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import expected_scaled

import gclip_cli
from gclip_cli import InputError
from gclip_cli.formats import detect_format
from gclip_cli.norms import measure
from gclip_cli.options import Options


def build_tree(path):
    rng = np.random.default_rng(9)
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = '{"name": "tiny"}'
        enc = f.create_group("model_weights/encoder")
        enc.attrs["weight_names"] = np.array([b"kernel", b"bias"])
        kernel = enc.create_dataset(
            "kernel",
            data=rng.standard_normal((100, 7)).astype(np.float32),
            chunks=(16, 7),
            compression="gzip",
            compression_opts=4,
            shuffle=True,
            fletcher32=True,
            fillvalue=0.0,
            maxshape=(None, 7),
        )
        kernel.attrs["units"] = "grad"
        enc.create_dataset("bias", data=rng.standard_normal(7).astype(">f4"))
        f.create_dataset("lzf", data=rng.standard_normal(50).astype(np.float16), compression="lzf")
        f.create_dataset("scalar", data=np.float64(2.5))
        f.create_dataset("empty_rows", data=np.zeros((0, 3), dtype=np.float32))
        f.create_dataset("null", data=h5py.Empty("f4"))
        f.create_dataset("ints", data=np.arange(5, dtype=np.int64))
        f.create_dataset("text", data="step 42", dtype=h5py.string_dtype())
        f.create_dataset("pairs", data=np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")]))
        f.create_dataset("complex", data=np.array([1 + 2j]))
        f["optimizer_weights/iterations"] = np.int64(42)
        f["aliases/kernel_again"] = enc["kernel"]  # hard link: one object, two paths
        f["aliases/soft"] = h5py.SoftLink("/model_weights/encoder/bias")
        f["aliases/dangling"] = h5py.SoftLink("/nowhere")
    return path


def test_tree_filters_links_and_attributes_survive(tmp_path):
    src = build_tree(tmp_path / "in.h5")
    out = tmp_path / "out.h5"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert report.clipped
    names = {t.name for t in report.tensors}
    # the hard-linked dataset is one object: counted and scaled once, under its first path
    assert len(names & {"aliases/kernel_again", "model_weights/encoder/kernel"}) == 1
    with h5py.File(src) as a, h5py.File(out) as b:
        assert b.attrs["model_config"] == a.attrs["model_config"]
        assert list(b["model_weights/encoder"].attrs["weight_names"]) == [b"kernel", b"bias"]
        k_a, k_b = a["model_weights/encoder/kernel"], b["model_weights/encoder/kernel"]
        for prop in (
            "dtype",
            "shape",
            "maxshape",
            "chunks",
            "compression",
            "compression_opts",
            "shuffle",
            "fletcher32",
            "fillvalue",
        ):
            assert getattr(k_b, prop) == getattr(k_a, prop), prop
        assert k_b.attrs["units"] == "grad"
        assert b["aliases/kernel_again"].id == b["model_weights/encoder/kernel"].id
        assert b.get("aliases/soft", getlink=True).path == "/model_weights/encoder/bias"
        assert b.get("aliases/dangling", getlink=True).path == "/nowhere"
        assert b["model_weights/encoder/bias"].dtype == np.dtype(">f4")
        assert b["lzf"].compression == "lzf"
        assert b["null"].shape is None
        assert b["empty_rows"].shape == (0, 3)
        for name in ("ints", "text", "pairs", "complex", "optimizer_weights/iterations"):
            assert np.array_equal(b[name][()], a[name][()]), name
        for name in ("model_weights/encoder/kernel", "model_weights/encoder/bias", "lzf", "scalar"):
            assert np.array_equal(b[name][()], expected_scaled(a[name][()], report)), name


def test_skipped_datasets_are_reported_with_a_reason(tmp_path):
    report = gclip_cli.inspect_file(build_tree(tmp_path / "in.h5"))
    skipped = {t.name: t.skipped for t in report.tensors if t.skipped}
    assert set(skipped) == {
        "ints",
        "text",
        "pairs",
        "complex",
        "optimizer_weights/iterations",
        "null",
    }


def test_sparse_chunked_dataset_stays_sparse(tmp_path):
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        ds = f.create_dataset("sparse", shape=(1000, 10), chunks=(10, 10), dtype="f4")
        ds[500:510] = 3.0
        allocated = ds.id.get_num_chunks()
    out = tmp_path / "out.h5"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0, options=Options(chunk_size=4096))
    assert report.clipped
    with h5py.File(out) as f:
        assert f["sparse"].id.get_num_chunks() == allocated == 1
        assert f["sparse"][505, 0] == pytest.approx(3.0 * report.scale)


def test_datasets_wider_than_a_chunk_are_read_in_order(tmp_path):
    values = np.random.default_rng(1).standard_normal((3, 4, 1000)).astype(np.float32)
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("w", data=values, chunks=(1, 2, 100))
    norms = {
        gclip_cli.inspect_file(src, options=Options(chunk_size=c)).global_norm
        for c in (64, 1000, 8192, 1 << 26)
    }
    assert len(norms) == 1
    out = tmp_path / "out.h5"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0, options=Options(chunk_size=100))
    with h5py.File(out) as f:
        assert np.array_equal(f["w"][()], expected_scaled(values, report))


def test_external_links_are_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["g"] = np.ones(3)
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        f["local"] = np.ones(3)
        f["remote"] = h5py.ExternalLink(str(other), "/g")
    with pytest.raises(InputError, match="external link"):
        gclip_cli.inspect_file(src)


def test_virtual_datasets_are_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["g"] = np.ones(4)
    src = tmp_path / "in.h5"
    layout = h5py.VirtualLayout(shape=(4,), dtype="f8")
    layout[:] = h5py.VirtualSource(str(other), "g", shape=(4,))
    with h5py.File(src, "w") as f:
        f.create_virtual_dataset("v", layout)
    with pytest.raises(InputError, match="virtual"):
        gclip_cli.inspect_file(src)


def test_external_storage_is_refused(tmp_path):
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.ones(4).tobytes())
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("e", shape=(4,), dtype="f8", external=[(str(raw), 0, 32)])
    with pytest.raises(InputError, match="external files"):
        gclip_cli.rescale_file(src, tmp_path / "out.h5", max_norm=1.0)
    assert raw.read_bytes() == np.ones(4).tobytes()


def test_user_block_files_are_detected(tmp_path):
    src = tmp_path / "ub.h5"
    with h5py.File(src, "w", userblock_size=512) as f:
        f["a"] = np.array([3.0, 4.0])
    assert detect_format(src) == "hdf5"
    report = gclip_cli.rescale_file(src, tmp_path / "out.h5", max_norm=1.0)
    with h5py.File(tmp_path / "out.h5") as f:
        assert f.userblock_size == 512
        assert f["a"][()].tolist() == [0.6, 0.8]
    assert report.global_norm == 5.0


def test_contiguous_values_are_read_at_their_place_after_a_user_block(tmp_path):
    """Data follows, so reading 512 bytes too far would still be inside the file."""
    src, out = tmp_path / "ub.h5", tmp_path / "out.h5"
    first, second = np.arange(1000, dtype=np.float32), np.ones(100_000, dtype=np.float32)
    with h5py.File(src, "w", userblock_size=512) as f:
        f["a"], f["b"] = first, second
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert [t.norm for t in report.tensors] == [measure(first).norm(), measure(second).norm()]
    with h5py.File(out) as f:
        assert np.array_equal(f["a"][()], expected_scaled(first, report))


# --- floats whose bit layout is not IEEE 754 ---------------------------------------------------


def custom_float(base, fields, ebias, size=None, order=None):
    """An HDF5 float type of other sizes or positions of sign, exponent and mantissa, as
    h5py's low-level API makes one."""
    kind = base.copy()
    if size:
        kind.set_fields(*fields)  # shrink the fields first, then the type
        kind.set_precision(size * 8)
        kind.set_size(size)
    kind.set_fields(*fields)
    kind.set_ebias(ebias)
    if order is not None:
        kind.set_order(order)
    return kind


CUSTOM_FLOATS = {  # name: HDF5 type
    # IEEE's size, not its fields: the exponent below the mantissa
    "f32_swapped": lambda: custom_float(h5py.h5t.IEEE_F32LE, (31, 0, 8, 8, 23), 127),
    # IEEE's size, a 7-bit exponent: h5py reads it as float64
    "f32_e7m24": lambda: custom_float(h5py.h5t.IEEE_F32LE, (31, 24, 7, 0, 24), 63),
    "f24": lambda: custom_float(h5py.h5t.IEEE_F32LE, (23, 16, 7, 0, 16), 63, size=3),
    "bf16_layout": lambda: custom_float(h5py.h5t.IEEE_F32LE, (15, 7, 8, 0, 7), 127, size=2),
}


def write_custom(path, name, kind, values, chunked=False):
    with h5py.File(path, "a") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if chunked:
            dcpl.set_chunk((4,))
            dcpl.set_deflate(4)
        space = h5py.h5s.create_simple(values.shape)
        dsid = h5py.h5d.create(f.id, name.encode(), kind, space, dcpl=dcpl)
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, values)  # HDF5 converts float64 to the type


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", list(CUSTOM_FLOATS))
def test_floats_of_another_layout_are_read_as_hdf5_converts_them(tmp_path, name, chunked):
    """ "f32_swapped" was read as IEEE bytes (norm 1.07e8 for values near 1): HDF5's own
    conversion of the values is the reference."""
    src = tmp_path / "in.h5"
    values = np.array([0.5, -1.25, 3.0, 4.0, 0.1, 2.5, -0.75, 1.0, 6.0, -2.0], dtype=np.float64)
    write_custom(src, name, CUSTOM_FLOATS[name](), values, chunked)
    with h5py.File(src) as f:
        converted = f[name][()]  # HDF5 converts into the numpy dtype h5py chose
    report = gclip_cli.inspect_file(src, options=Options(chunk_size=16))
    (tensor,) = report.tensors
    assert tensor.norm == measure(converted).norm()
    assert tensor.norm == pytest.approx(np.linalg.norm(values), rel=1e-2)  # the format's precision


@pytest.mark.parametrize("name", ["f32_swapped", "f24"])
def test_floats_of_another_layout_are_not_rewritten(tmp_path, name):
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_custom(src, name, CUSTOM_FLOATS[name](), np.linspace(1, 8, 8))
    proc = subprocess.run(
        [sys.executable, "-m", "gclip_cli", "rescale", src, out, "--max-norm", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"dataset {name!r} holds floats that are not IEEE 754" in proc.stderr
    assert "nothing written" in proc.stderr and not out.exists()


def test_vax_order_floats_are_read_as_hdf5_converts_them(tmp_path):
    src = tmp_path / "in.h5"
    kind = custom_float(h5py.h5t.IEEE_F32LE, (31, 23, 8, 0, 23), 129, order=h5py.h5t.ORDER_VAX)
    write_custom(src, "vax", kind, np.linspace(-3, 3, 7))
    with h5py.File(src) as f:
        converted = f["vax"][()]
    assert gclip_cli.inspect_file(src).global_norm == measure(converted).norm()
