import io
import resource
import struct
import subprocess
import sys
import zipfile
from contextlib import closing

import numpy as np
import pytest
from conftest import expected_scaled

import gclip_cli
from gclip_cli import InputError, parallel
from gclip_cli.formats import open_file, signatures, ziparchive
from gclip_cli.norms import BLOCK, measure
from gclip_cli.options import Options


def npy_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, **kwargs)
    return buffer.getvalue()


def tricky_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    return {
        "big_endian": rng.standard_normal(10).astype(">f4"),
        "fortran": np.asfortranarray(rng.standard_normal((4, 3))),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 5), dtype=np.float16),
        "ints": np.arange(6, dtype=np.int16),
        "words": np.array(["a", "bc"]),
        "records": np.zeros(2, dtype=[("x", "<f4"), ("n", "<i4")]),
    }


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_members_keep_order_names_compression_headers_and_layout(tmp_path, save):
    arrays = tricky_arrays()
    src = tmp_path / "in.npz"
    save(src, **arrays)
    out = tmp_path / "out.npz"
    report = gclip_cli.rescale_file(src, out, max_norm=0.1)
    assert report.clipped
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(out) as b:
        assert [i.filename for i in a.infolist()] == [i.filename for i in b.infolist()]
        for ia, ib in zip(a.infolist(), b.infolist(), strict=True):
            assert (ia.compress_type, ia.date_time, ia.external_attr, ia.file_size) == (
                ib.compress_type,
                ib.date_time,
                ib.external_attr,
                ib.file_size,
            )
            header_a = a.read(ia)[:64]
            header_b = b.read(ib)[:64]
            assert header_a.split(b"}")[0] == header_b.split(b"}")[0]  # .npy header unchanged
    with np.load(out) as z:
        for name, original in arrays.items():
            written = z[name]
            assert written.dtype == original.dtype and written.shape == original.shape
            if original.dtype.kind == "f":
                assert np.array_equal(written, expected_scaled(original, report))
            else:
                assert np.array_equal(written, original)
        assert z["fortran"].flags.f_contiguous


def test_non_array_members_and_sub_directories_are_copied(tmp_path):
    src = tmp_path / "in.npz"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("README.txt", b"gradients of step 7\n")
        z.writestr("model/layer.0/w.npy", npy_bytes(np.array([3.0, 4.0])))
    out = tmp_path / "out.npz"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert [t.name for t in report.tensors] == ["model/layer.0/w"]
    with zipfile.ZipFile(out) as z:
        assert z.read("README.txt") == b"gradients of step 7\n"
    with np.load(out) as z:
        assert z["model/layer.0/w"].tolist() == [0.6, 0.8]


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    src = tmp_path / "in.npz"
    np.savez(src, grads=np.ones(3), obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match=r"'obj\.npy' holds Python objects"):
        gclip_cli.inspect_file(src)


def test_header_shape_larger_than_the_member_is_refused(tmp_path):
    data = npy_bytes(np.zeros(4, dtype="<f4"))
    lying = data.replace(b"(4,)", b"(9,)")
    src = tmp_path / "in.npz"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("a.npy", lying)
    with pytest.raises(InputError, match=r"'a.npy' is \d+ bytes but its .npy header"):
        gclip_cli.inspect_file(src)


def test_corrupted_crc_is_detected(tmp_path):
    src = tmp_path / "in.npz"
    np.savez(src, a=np.arange(1000, dtype=np.float32))
    raw = bytearray(src.read_bytes())
    position = raw.rfind(np.arange(1000, dtype=np.float32)[500:501].tobytes())
    raw[position] ^= 0xFF  # stored member: flip a data byte, the CRC no longer matches
    src.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"CRC|Bad"):
        gclip_cli.rescale_file(src, tmp_path / "out.npz", max_norm=1.0)
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("jobs", [1, 2, 3])
@pytest.mark.parametrize("flipped", [0, 4 * BLOCK - 1, 4 * (2 * BLOCK + 3) - 1])
def test_damaged_stored_values_are_refused_whoever_reads_them(tmp_path, monkeypatch, jobs, flipped):
    """Workers checksum the parts of a member they read; combined, the damage shows."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    values = np.random.default_rng(2).standard_normal(2 * BLOCK + 3).astype(np.float32)
    src = tmp_path / "in.npz"
    np.savez(src, w=values, v=values[:100])
    raw = bytearray(src.read_bytes())
    raw[raw.find(values.tobytes()) + flipped] ^= 0x01
    src.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"member 'w\.npy': bad CRC-32"):
        gclip_cli.inspect_file(src, options=Options(jobs=jobs))
    with pytest.raises(InputError, match=r"member 'w\.npy': bad CRC-32"):
        gclip_cli.rescale_file(src, tmp_path / "out.npz", max_norm=1.0, options=Options(jobs=jobs))
    assert not (tmp_path / "out.npz").exists()
    assert src.read_bytes() == raw


def test_repeated_member_names_are_refused(tmp_path):
    src = tmp_path / "in.npz"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(src, "w") as z:
        z.writestr("a.npy", npy_bytes(np.ones(2)))
        z.writestr("a.npy", npy_bytes(np.ones(3)))
    with pytest.raises(InputError, match="appears more than once"):
        gclip_cli.inspect_file(src)


def test_npy_version_2_and_3_headers_are_read(tmp_path):
    src = tmp_path / "in.npz"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("v2.npy", npy_bytes(np.array([3.0]), version=(2, 0)))
        z.writestr("v3.npy", npy_bytes(np.array([4.0]), version=(3, 0)))
    report = gclip_cli.inspect_file(src)
    assert report.global_norm == 5.0


def test_member_inflating_beyond_its_declared_size_is_refused(tmp_path):
    """A zip bomb: the deflate stream holds far more than the sizes in the zip headers say."""
    declared = npy_bytes(np.zeros(16, dtype="<f4"))
    bomb = declared + b"\0" * (8 << 20)  # 8 MiB more in the stream than declared
    src = tmp_path / "bomb.npz"
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.npy", bomb)
    raw = bytearray(src.read_bytes())
    size = len(bomb).to_bytes(4, "little")
    assert raw.count(size) == 2  # local header and central directory
    src.write_bytes(bytes(raw).replace(size, len(declared).to_bytes(4, "little")))
    with pytest.raises(InputError, match=r"'a\.npy'"):
        gclip_cli.rescale_file(src, tmp_path / "out.npz", max_norm=1e-9)
    assert not (tmp_path / "out.npz").exists()


def test_directory_entry_pointing_past_the_end_is_refused(tmp_path):
    src = tmp_path / "in.npz"
    array = io.BytesIO()
    np.save(array, np.ones(2))
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("a.npy", array.getvalue())
        z.writestr("notes.txt", b"hello")  # its directory entry (the last) is damaged below
    raw = bytearray(src.read_bytes())
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 42 : central + 46] = (1 << 24).to_bytes(4, "little")  # local header offset
    src.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"'notes\.txt'"):
        gclip_cli.rescale_file(src, tmp_path / "out.npz", max_norm=1.0)


def test_isal_deflate_is_ordinary_deflate(tmp_path):
    pytest.importorskip("isal", reason="the fast extra is not installed")
    values = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)
    src = tmp_path / "in.npz"
    np.savez_compressed(src, g=values)
    out = tmp_path / "out.npz"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    with zipfile.ZipFile(out) as z:  # inflated here by the standard library's zlib
        assert z.getinfo("g.npy").compress_type == zipfile.ZIP_DEFLATED
        assert z.testzip() is None
    with np.load(out) as z:
        assert np.array_equal(z["g"], expected_scaled(values, report))


def test_stored_archives_are_copied_byte_for_byte_but_values_and_crcs(tmp_path):
    rng = np.random.default_rng(8)
    arrays = {"w": rng.standard_normal(5000).astype(np.float32), "n": np.arange(9)}
    src = tmp_path / "in.npz"
    with zipfile.ZipFile(src, "w") as z:  # a comment, extra fields, a deflated non-array
        z.comment = b"made by hand"
        for name, values in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(2020, 1, 2, 3, 4, 6))
            info.extra = b"\xca\xfe\x04\x00abcd"  # an unknown extra field
            z.writestr(info, npy_bytes(values))
        z.writestr("notes.txt", "deflated words " * 100, compress_type=zipfile.ZIP_DEFLATED)
    out = tmp_path / "out.npz"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    before, after = src.read_bytes(), out.read_bytes()
    with zipfile.ZipFile(src) as z:
        info, start_dir = z.getinfo("w.npy"), z.start_dir
    name_length, extra_length = struct.unpack("<HH", before[info.header_offset + 26 :][:4])
    data = info.header_offset + 30 + name_length + extra_length
    values = data + info.file_size - arrays["w"].nbytes
    central = before.index(b"PK\x01\x02", start_dir)  # w.npy's entry comes first
    allowed = np.zeros(len(before), dtype=bool)  # the bytes that may change
    allowed[values : values + arrays["w"].nbytes] = True
    allowed[info.header_offset + 14 : info.header_offset + 18] = True  # local CRC-32
    allowed[central + 16 : central + 20] = True  # central directory CRC-32
    assert len(after) == len(before)
    changed = np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8)
    assert not np.any(changed & ~allowed)
    assert np.any(changed[values:]) and np.any(changed[central + 16 : central + 20])
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None and z.comment == b"made by hand"
        assert z.getinfo("w.npy").extra == b"\xca\xfe\x04\x00abcd"
    with np.load(out) as z:
        assert np.array_equal(z["w"], expected_scaled(arrays["w"], report))
        assert np.array_equal(z["n"], arrays["n"])


def test_members_with_data_descriptors_go_through_zipfile(tmp_path):
    values = np.random.default_rng(9).standard_normal(3000).astype(np.float32)
    buffer = io.BytesIO()

    class Unseekable(io.RawIOBase):  # zipfile then writes a data descriptor after each member
        def writable(self):
            return True

        def write(self, data):
            return buffer.write(data)

    with zipfile.ZipFile(Unseekable(), "w") as z:
        z.writestr("g.npy", npy_bytes(values))
    src = tmp_path / "in.npz"
    src.write_bytes(buffer.getvalue())
    with zipfile.ZipFile(src) as z:
        assert z.getinfo("g.npy").flag_bits & 0x08
    out = tmp_path / "out.npz"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    with np.load(out) as z:
        assert np.array_equal(z["g"], expected_scaled(values, report))


def compressed_archive(path):
    rng = np.random.default_rng(8)
    arrays = {
        "emb": rng.standard_normal((300, 70)).astype(np.float32),
        "bias": rng.standard_normal(50).astype(np.float16),
        "step": np.arange(3),
        "w": rng.standard_normal(2 * BLOCK + 3),
    }
    np.savez_compressed(path, **arrays)
    return arrays


def test_workers_inflate_deflated_members_to_the_same_norms(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    src = tmp_path / "in.npz"
    arrays = compressed_archive(src)
    for jobs in (1, 2, 3):
        report = gclip_cli.inspect_file(src, options=Options(jobs=jobs))
        norms = {t.name: t.norm for t in report.tensors if t.skipped is None}
        assert norms == {n: measure(a).norm() for n, a in arrays.items() if n != "step"}, jobs
        out = tmp_path / f"out{jobs}.npz"
        rescaled = gclip_cli.rescale_file(src, out, max_norm=1.0, options=Options(jobs=jobs))
        with np.load(out) as z:
            assert np.array_equal(z["emb"], expected_scaled(arrays["emb"], rescaled))


def test_zipfile_is_left_as_it_is_while_archives_are_read_and_written(tmp_path):
    """No patching of zipfile's module (test_house reads the source for it; this runs it)."""
    src, out = tmp_path / "in.npz", tmp_path / "out.npz"
    arrays = compressed_archive(src)
    original = (zipfile._get_compressor, zipfile._get_decompressor, zipfile.crc32)
    seen = []

    def negate(tensor, values, target):
        seen.append((zipfile._get_compressor, zipfile._get_decompressor, zipfile.crc32))
        np.negative(values, out=target)

    with closing(open_file(src)) as tfile:
        for tensor in tfile.tensors:
            if tensor.is_gradient:
                for _ in tfile.read_chunks(tensor, 4100):
                    seen.append((zipfile._get_compressor, zipfile._get_decompressor, zipfile.crc32))
        tfile.write_transformed(out, negate, 4100)
    assert seen and all(state == original for state in seen)
    with np.load(out) as written:
        assert np.array_equal(written["emb"], -arrays["emb"])
        assert np.array_equal(written["step"], arrays["step"])


def test_a_bad_crc_found_by_a_worker_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    src = tmp_path / "in.npz"
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("w.npy", npy_bytes(np.ones(1000, dtype=np.float32)))
        z.writestr("v.npy", npy_bytes(np.ones(1000, dtype=np.float32)))
    with zipfile.ZipFile(src) as z:
        info = z.getinfo("w.npy")
    data = bytearray(src.read_bytes())
    data[info.header_offset + 30 + len("w.npy") + info.compress_size // 2] ^= 0xFF
    src.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"member 'w\.npy'"):
        gclip_cli.inspect_file(src, options=Options(jobs=2))


def gclip(*args, memory: int | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (with at most *memory* bytes of address space)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit if memory else None,
    )


def assert_one_line_refusal(proc: subprocess.CompletedProcess, path, *words: str) -> None:
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith(f"gclip: error: {path}: ") and proc.stderr.count("\n") == 1
    assert len(proc.stderr) < 500
    for word in words:
        assert word in proc.stderr


def raw_npy(version: tuple[int, int], header: bytes, data: bytes = b"") -> bytes:
    """A .npy member with the header text *header* as given (no padding or checks)."""
    length = struct.pack("<H" if version == (1, 0) else "<I", len(header))
    return b"\x93NUMPY" + bytes(version) + length + header + data


def member_archive(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize(
    ("member", "words"),
    [
        # numpy refuses it with a three-line message
        (
            raw_npy(
                (2, 0),
                b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"
                + b" " * 20_000
                + b"\n",
                b"\0" * 12,
            ),
            ["20058 bytes", "limit"],
        ),
        # numpy tokenizes headers it cannot parse (from Python 2): TokenError, a traceback
        (
            raw_npy((1, 0), b"{'descr': '<f4', 'fortran_order': False, 'shape': (3L,), 'x': '''\n"),
            ["EOF in multi-line string"],
        ),
        # ast.literal_eval: SyntaxError, MemoryError or RecursionError
        (
            raw_npy((1, 0), b"{'descr': '<f4', 'shape': " + b"(" * 5000 + b"\n"),
            ["not a valid .npy"],
        ),
        (
            raw_npy(
                (1, 0),
                b"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3, 4, 5, "
                + b"1, " * 70
                + b")}\n",
            ),
            ["shape"],
        ),
        (
            raw_npy(
                (1, 0),
                b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1, -4), }\n",
                b"\0" * 16,
            ),
            ["shape (-1, -4)"],
        ),
        (
            raw_npy((1, 0), b"{'descr': '<f4', 'fortran_order': False, 'shape': (2**70,), }\n"),
            ["not a valid .npy"],
        ),
        (
            raw_npy((3, 0), b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }\n")[:12],
            ["ends within the .npy header"],
        ),
    ],
)
def test_damaged_npy_headers_are_one_line_errors(tmp_path, member, words):
    src = member_archive(tmp_path / "in.npz", {"a.npy": member})
    assert_one_line_refusal(gclip("inspect", src), src, "'a.npy'", *words)


def test_headers_from_python_2_are_read_without_a_warning(tmp_path):
    values = np.array([3.0, 4.0], dtype="<f4")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2L,), }"
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    src = member_archive(tmp_path / "in.npz", {"a.npy": raw_npy((1, 0), header, values.tobytes())})
    with pytest.warns(UserWarning, match="Python 2"):  # numpy reads it, warning
        np.testing.assert_array_equal(np.load(src)["a"], values)
    proc = gclip("norm", src)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "5.0\n", "")


def test_a_huge_npy_header_length_is_refused_before_it_is_read(tmp_path):
    """numpy reads as many bytes as the header claims (up to 4 GiB) before checking its
    length: a small deflated member could fill the memory."""
    src = tmp_path / "bomb.npz"
    padding = 256 << 20
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as z, z.open("a.npy", "w") as member:
        member.write(b"\x93NUMPY\x02\x00" + struct.pack("<I", padding))
        for _ in range(padding >> 20):
            member.write(b" " * (1 << 20))
    assert src.stat().st_size < 2 << 20
    proc = gclip("inspect", src, memory=1 << 30)  # 256 MiB read would not fit beside numpy
    assert_one_line_refusal(proc, src, f"header of {padding} bytes", "limit")


def test_an_lzma_member_with_bad_properties_is_one_line(tmp_path):
    src = member_archive(tmp_path / "in.npz", {"a.npy": npy_bytes(np.ones(3))}, zipfile.ZIP_LZMA)
    raw = bytearray(src.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[26:30])
    raw[30 + name_length + extra_length + 4] = 0xFF  # lc/lp/pb byte of the LZMA properties
    src.write_bytes(bytes(raw))
    assert_one_line_refusal(gclip("inspect", src), src, "'a.npy'", "unsupported options")


@pytest.mark.parametrize("device", ["/dev/urandom", "/dev/zero"])
def test_a_device_forced_to_be_an_npz_is_refused_at_once(device):
    """zipfile read /dev/urandom to its (missing) end looking for the end record: 22 GiB."""
    proc = gclip("inspect", "--file-format", "npz", device, memory=1 << 30, timeout=30)
    assert_one_line_refusal(proc, device, "is a character device, not a regular file")


def directory_of(path) -> int:
    """The central directory's size, from zipfile: from its start to the (zip64) end record."""
    with zipfile.ZipFile(path) as z:
        start = z.start_dir
    raw = path.read_bytes()
    zip64_end = raw.rfind(b"PK\x06\x06")
    return (zip64_end if zip64_end > start else raw.rfind(b"PK\x05\x06")) - start


def test_a_central_directory_over_the_limit_is_refused_before_zipfile_reads_it(
    tmp_path, monkeypatch
):
    """zipfile keeps about 9 bytes of memory per byte of directory (a million members: 1 GB)."""
    src = tmp_path / "in.npz"
    np.savez(src, **{f"t{i}": np.ones(2) for i in range(20)})
    size = directory_of(src)
    with open(src, "rb") as file:
        assert signatures.zip_directory_size(file) == size
    monkeypatch.setattr(signatures, "MAX_ZIP_DIRECTORY", size - 1)
    monkeypatch.setattr(ziparchive, "MAX_ZIP_DIRECTORY", size - 1)
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda _: pytest.fail("read"))
    with pytest.raises(InputError, match=f"central directory of {size:,} bytes exceeds"):
        gclip_cli.inspect_file(src)


def test_the_directory_size_of_a_zip64_archive_is_read_from_its_zip64_end_record(tmp_path):
    src = tmp_path / "many.npz"
    with zipfile.ZipFile(src, "w") as z:
        for i in range(70_000):  # more than 65,535 members: zipfile writes a zip64 end record
            z.writestr(f"{i}.txt", b"")
    size = directory_of(src)
    raw = bytearray(src.read_bytes())
    end = raw.rfind(b"PK\x05\x06")
    raw[end + 12 : end + 16] = b"\xff\xff\xff\xff"  # the size is in the zip64 record only
    with open(src, "rb") as file:
        assert signatures.zip_directory_size(io.BytesIO(bytes(raw))) == size
        assert signatures.zip_directory_size(file) == size
