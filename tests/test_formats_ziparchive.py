"""The zip layer on its own: archives written as zipfile writes them and read back by zipfile
and numpy; members read as zipfile reads them; stored members rewritten in place."""

import io
import itertools
import os
import struct
import tracemalloc
import zipfile
import zlib
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gclip_cli import InputError
from gclip_cli.formats import deflate, ziparchive
from gclip_cli.formats.ziparchive import (
    ZipArchive,
    ZipWriter,
    copy_info,
    in_place,
    member_bytes,
    stored_crc,
)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def members() -> list[tuple[zipfile.ZipInfo, bytes]]:
    """Members of every method gclip writes, with a comment, attributes and a UTF-8 name."""
    rng = np.random.default_rng(3)
    made = []
    for name, method, data in [
        ("stored.npy", zipfile.ZIP_STORED, npy_bytes(rng.standard_normal(700))),
        ("deflated.npy", zipfile.ZIP_DEFLATED, npy_bytes(np.arange(900, dtype="<f4"))),
        ("größen/notes.txt", zipfile.ZIP_DEFLATED, b"words and words " * 300),
        ("b.npy", zipfile.ZIP_BZIP2, npy_bytes(rng.standard_normal(300))),
        ("l.npy", zipfile.ZIP_LZMA, npy_bytes(rng.standard_normal(200).astype("<f2"))),
        ("empty.txt", zipfile.ZIP_DEFLATED, b""),
    ]:
        info = zipfile.ZipInfo(name, date_time=(2021, 3, 4, 5, 6, 8))
        info.compress_type = method
        info.external_attr = 0o644 << 16 if "txt" in name else 0
        info.comment = b"a member's comment" if method == zipfile.ZIP_BZIP2 else b""
        info.file_size = len(data)  # declared, as gclip declares it
        made.append((info, data))
    return made


def pieces(data: bytes) -> list[bytes]:
    """*data* cut as writes come: unevenly."""
    cuts = [0, 1, 7, 1000, 1003, 5000, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts) if a < len(data)]


def write_with_zipfile(path, entries, comment: bytes) -> bytes:
    with zipfile.ZipFile(path, "w") as archive:
        archive.comment = comment
        for info, data in entries:
            with archive.open(copy_info(info), "w") as member:
                for piece in pieces(data):
                    member.write(piece)
    return path.read_bytes()


def write_with_ziparchive(path, entries, comment: bytes, **limit) -> bytes:
    with open(path, "wb") as file, ZipWriter(file, comment, **limit) as archive:
        for info, data in entries:
            with archive.member(copy_info(info)) as member:
                for piece in pieces(data):
                    member.write(memoryview(piece))
    return path.read_bytes()


@pytest.mark.parametrize("zip64_limit", [zipfile.ZIP64_LIMIT, 3000])
def test_the_writer_writes_the_bytes_zipfile_writes(tmp_path, monkeypatch, zip64_limit):
    """Deflate by zlib at its default level (no ISA-L), as zipfile's: then every byte is the
    same, zip64 records included (a lowered limit makes them for small members)."""
    monkeypatch.setattr(deflate, "isal_zlib", None)
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", zip64_limit)  # zipfile reads it as it writes
    entries, comment = members(), b"an archive's comment"
    ours = write_with_ziparchive(tmp_path / "ours.zip", entries, comment, zip64_limit=zip64_limit)
    assert ours == write_with_zipfile(tmp_path / "zipfile.zip", entries, comment)
    assert (b"PK\x06\x06" in ours) == (zip64_limit < len(ours))  # a zip64 end record
    with zipfile.ZipFile(tmp_path / "ours.zip") as archive:
        assert archive.testzip() is None and archive.comment == comment
        assert [archive.read(info) for info in archive.infolist()] == [d for _, d in entries]


def test_members_deflated_by_isal_are_read_by_zipfile_and_numpy(tmp_path):
    pytest.importorskip("isal", reason="the fast extra is not installed")
    values = np.random.default_rng(5).standard_normal(100_000).astype(np.float32)
    entries = [(info, data) for info, data in members() if info.filename.endswith(".npy")]
    entries.append((copy_info(entries[1][0]), npy_bytes(values)))
    entries[-1][0].filename = "values.npy"
    entries[-1][0].file_size = len(entries[-1][1])
    path = tmp_path / "isal.npz"
    written = write_with_ziparchive(path, entries, b"")
    assert written != write_with_zipfile(tmp_path / "zlib.npz", entries, b"")  # ISA-L's deflate
    with zipfile.ZipFile(path) as archive:  # inflated by the standard library's zlib
        assert archive.testzip() is None
        assert archive.getinfo("values.npy").compress_type == zipfile.ZIP_DEFLATED
    with np.load(path) as arrays:
        assert np.array_equal(arrays["values"], values)
        assert np.array_equal(arrays["deflated"], np.arange(900, dtype="<f4"))


def archive_with_odd_headers(path) -> dict[str, bytes]:
    """Members of every method, each followed by a data descriptor, one with an extra field."""
    entries = members()
    entries[0][0].extra = b"\xca\xfe\x04\x00abcd"  # an unknown extra field
    stream = io.BytesIO()

    class Unseekable(io.RawIOBase):  # zipfile then writes a data descriptor after a member
        def writable(self):
            return True

        def write(self, data):
            return stream.write(data)

    with zipfile.ZipFile(Unseekable(), "w") as archive:
        for info, data in entries:
            copy = copy_info(info)
            copy.extra = info.extra
            archive.writestr(copy, data)
    path.write_bytes(stream.getvalue())
    return {info.filename: data for info, data in entries}


@pytest.mark.parametrize("with_isal", [True, False])
def test_members_read_here_are_what_zipfile_reads(tmp_path, monkeypatch, with_isal):
    if not with_isal:
        monkeypatch.setattr(deflate, "isal_zlib", None)
    elif deflate.isal_zlib is None:
        pytest.skip("python-isal is not installed")
    path = tmp_path / "odd.zip"
    expected = archive_with_odd_headers(path)
    with closing(ZipArchive(path, "zip")) as archive:
        archive.check_members()
        assert archive.names == list(expected)
        for info in archive.members:
            assert info.flag_bits & 0x08  # data descriptors
            with archive.open_member(info) as member:
                got = b"".join(iter(lambda m=member: m.read(777), b""))
            assert got == expected[info.filename]
            with (
                open(path, "rb") as file,
                member_bytes(path, file.fileno(), info, archive.data_start(info)) as member,
            ):
                assert member.read() == expected[info.filename]


def test_a_damaged_deflated_member_is_refused_and_none_inflates_past_its_size(tmp_path):
    data = npy_bytes(np.zeros(4000, dtype="<f4"))
    path = tmp_path / "in.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.npy", data)
        archive.writestr("bomb.npy", data + bytes(1 << 20))
    raw = bytearray(path.read_bytes())
    # the bomb declares the size and CRC-32 of its first len(data) bytes: a reader that stops
    # there, as zipfile does, reads a valid member
    for old, new in [
        (len(data) + (1 << 20), len(data)),
        (zlib.crc32(data + bytes(1 << 20)), zlib.crc32(data)),
    ]:
        assert raw.count(struct.pack("<I", old)) == 2  # local header and central directory
        raw = raw.replace(struct.pack("<I", old), struct.pack("<I", new))
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as listing:
        a = listing.getinfo("a.npy")
        assert listing.read("bomb.npy") == data
    raw[a.header_offset + 30 + len("a.npy") + a.compress_size // 2] ^= 0x55
    path.write_bytes(bytes(raw))
    with closing(ZipArchive(path, "zip")) as archive:
        a, bomb = archive.members
        with pytest.raises((zipfile.BadZipFile, zlib.error, *deflate.ERRORS)):
            archive.open_member(a).read()
        member = archive.open_member(bomb)
        buffer = bytearray(len(data) + 4096)
        assert member.readinto(buffer) == len(data) and buffer[: len(data)] == data
        assert member.read() == b""


def test_stored_members_take_new_data_in_place_and_their_crcs_are_patched(tmp_path):
    rng = np.random.default_rng(9)
    arrays = {"w": rng.standard_normal(5000), "v": rng.standard_normal(30).astype(np.float32)}
    src, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, **arrays)
    out.write_bytes(src.read_bytes())
    new = {"w": -arrays["w"], "v": arrays["v"] * 2}
    with closing(ZipArchive(src, ".npz")) as archive:
        assert archive.members_apart() and all(in_place(i) for i in archive.members)
        crcs = {}
        with open(out, "r+b") as copy:
            for info in archive.members:
                data = npy_bytes(new[info.filename[:-4]])
                assert len(data) == info.file_size
                os.pwrite(copy.fileno(), data, archive.data_start(info))
                crcs[info.filename] = stored_crc(copy.fileno(), archive.data_start(info), len(data))
                assert crcs[info.filename] == zlib.crc32(data)
        archive.patch_crcs(out, crcs)
    with zipfile.ZipFile(out) as patched:
        assert patched.testzip() is None
    with np.load(out) as written:
        assert all(np.array_equal(written[name], values) for name, values in new.items())


def test_stored_windows_map_a_members_values_and_check_its_crc_once(tmp_path):
    values = np.arange(10_000, dtype="<f4")
    path = tmp_path / "in.npz"
    np.savez(path, v=values)
    with closing(ZipArchive(path, ".npz")) as archive:
        info = archive.members[0]
        skip = info.file_size - values.nbytes  # the .npy header
        windows = list(archive.stored_windows(info, skip, 4, 4096))
        assert max(w.size for w in windows) <= 4096
        assert np.array_equal(np.concatenate(windows).view("<f4"), values)
    raw = bytearray(path.read_bytes())
    raw[raw.find(values[5000:5001].tobytes())] ^= 1
    path.write_bytes(bytes(raw))
    with (
        closing(ZipArchive(path, ".npz")) as archive,
        pytest.raises(InputError, match=r"member 'v\.npy': bad CRC-32"),
    ):
        list(archive.stored_windows(archive.members[0], skip, 4, 4096))


def test_a_member_after_a_data_descriptor_is_not_rewritten_in_place(tmp_path):
    path = tmp_path / "odd.zip"
    archive_with_odd_headers(path)
    with closing(ZipArchive(path, "zip")) as archive:
        assert not any(in_place(info) for info in archive.members)


def test_an_unreadable_archive_is_named_by_its_kind(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x05\x06" + bytes(10))
    with pytest.raises(InputError, match=r"not a readable \.npz \(zip\) file"):
        ZipArchive(path, ".npz")
    assert ziparchive.MAX_ZIP_DIRECTORY == 100_000_000


# --- remote archives, by ranges (ranged.RangedBytes) -----------------------------------------


@pytest.fixture
def remote_archive(monkeypatch):
    """put(bytes) -> a RangedBytes over a new memory:// object holding them, and the (start,
    end) of every ranged GET made from then on."""
    fsspec = pytest.importorskip("fsspec", reason="needs gclip[remote]")
    from fsspec.implementations.memory import MemoryFileSystem

    from gclip_cli.formats.ranged import RangedBytes, StandIn
    from gclip_cli.urls import open_remote, version_of

    fetched: list[tuple[int, int]] = []
    real = MemoryFileSystem.cat_file

    def cat_file(self, path, start=None, end=None, **kwargs):
        fetched.append((start, end))
        return real(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    opened = []

    def put(data: bytes) -> RangedBytes:
        url = f"memory://zip-{os.urandom(4).hex()}/g.npz"
        fsspec.filesystem("memory").pipe_file(url, data)
        version = version_of(open_remote(url, {}))
        opened.append(RangedBytes(StandIn(url, "npz", len(data), version), {}))
        fetched.clear()
        return opened[-1]

    yield put, fetched
    for ranged in opened:
        ranged.stop()


def test_a_remote_archive_is_listed_and_opened_in_few_gets(remote_archive):
    put, fetched = remote_archive
    stream = io.BytesIO()
    big = np.arange(6 << 20, dtype="<f4")  # 24 MiB
    with zipfile.ZipFile(stream, "w") as archive:
        archive.writestr("big.npy", npy_bytes(big))
        for n in range(300):
            archive.writestr(f"m{n}.npy", npy_bytes(np.full(10, n, dtype="<f4")))
    ranged = put(stream.getvalue())
    with closing(ZipArchive(Path("g.npz"), ".npz", ranged)) as archive:
        archive.check_members()  # every local header read
        starts = [archive.data_start(info) for info in archive.members]
        assert len(archive.names) == 301
        with archive.open_member(archive.members[-1]) as member:
            assert np.lib.format.read_array(member).tolist() == [299] * 10
    assert starts[0] < big.nbytes < starts[1]
    # end records, directory, and 64 KiB blocks of headers: not a GET per member
    assert len(fetched) <= 8, fetched
    assert sum(end - start for start, end in fetched) < 1 << 20  # nothing of big's values


def test_a_remote_deflated_member_is_inflated_from_bounded_reads(remote_archive):
    put, fetched = remote_archive
    values = np.random.default_rng(9).standard_normal(24 << 20).astype("<f2")  # 48 MiB
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("v.npy", npy_bytes(values))
    ranged = put(stream.getvalue())
    with closing(ZipArchive(Path("g.npz"), ".npz", ranged)) as archive:
        info = archive.members[0]
        assert info.compress_size > 32 << 20  # many windows
        tracemalloc.start()
        try:
            with archive.open_member(info) as member:
                np.lib.format.read_magic(member)
                np.lib.format.read_array_header_1_0(member)
                crc, equal, at = 0, True, 0
                buffer = bytearray(1 << 20)
                while got := member.readinto(buffer):
                    piece = np.frombuffer(buffer, "<f2", got // 2)
                    equal &= np.array_equal(piece, values[at : at + piece.size])
                    at += piece.size
                    crc = zlib.crc32(buffer[:got], crc)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert equal and at == values.size
    assert max(end - start for start, end in fetched) <= 4 << 20
    assert peak < 24 << 20, peak  # never the member (48 MiB, 40 compressed) in memory


# --- a byte copy written in order, its CRC-32s patched on the way --------------------------


@given(
    st.lists(st.integers(0, 60), min_size=1, max_size=6, unique=True),
    st.lists(st.integers(1, 64), min_size=1, max_size=12),
)
def test_crc_fields_are_patched_whichever_way_the_bytes_come(field_offsets, cuts):
    data = bytes(range(64))
    fields = sorted((offset, index) for index, offset in enumerate(field_offsets))
    fields = [f for i, f in enumerate(fields) if i == 0 or f[0] >= fields[i - 1][0] + 4]
    fields = [f for f in fields if f[0] + 4 <= len(data)]
    crcs = {index: 0x01020304 * (index + 1) & 0xFFFFFFFF for _, index in fields}
    expected = bytearray(data)
    for offset, index in fields:
        expected[offset : offset + 4] = struct.pack("<I", crcs[index])
    patches = ziparchive._Patches(fields)
    pieces, start = [], 0
    for cut in [*sorted(set(cuts)), len(data)]:  # the bytes in pieces, cut anywhere
        if cut > start:
            piece = np.frombuffer(data[start:cut], dtype=np.uint8)
            pieces.append(bytes(patches.applied(start, piece, crcs.__getitem__)))
            start = cut
    assert b"".join(pieces) == bytes(expected)


def _rewrite_in_order(path: Path, factor: float) -> bytes:
    """The archive *path* (an .npz) written in order through a pipe, its float values times
    *factor*: the bytes that come out."""
    import threading

    from gclip_cli.formats.npz import NpzFile

    def scale(tensor, src, dst):
        np.multiply(src, src.dtype.type(factor), out=dst)

    npz = NpzFile(path)
    read, write = os.pipe()
    got = []
    reader = threading.Thread(target=lambda: got.append(os.fdopen(read, "rb").read()))
    reader.start()
    try:
        assert npz.writes_in_order()
        npz.write_in_order(Path(f"/proc/self/fd/{write}"), scale, scale, 1 << 20)
    finally:
        os.close(write)
        reader.join()
        npz.close()
    return got[0]


def test_an_npz_written_in_order_is_the_archive_numpy_reads(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {f"m{i}": rng.standard_normal(1000 * i + 3).astype(np.float32) for i in range(5)}
    path = tmp_path / "g.npz"
    np.savez(path, **arrays)
    out = tmp_path / "out.npz"
    out.write_bytes(_rewrite_in_order(path, 0.5))
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None  # every member's CRC-32, in the directory
        for info in archive.infolist():  # and in the local headers
            with open(out, "rb") as raw:
                raw.seek(info.header_offset + 14)
                assert struct.unpack("<I", raw.read(4))[0] == info.CRC
    with np.load(out) as loaded:
        for name, values in arrays.items():
            assert np.array_equal(loaded[name], values * np.float32(0.5))


def test_a_damaged_member_written_in_order_is_refused(tmp_path):
    path = tmp_path / "g.npz"
    np.savez(path, a=np.ones(1000, dtype=np.float32))
    data = bytearray(path.read_bytes())
    data[200] ^= 0x10  # a value's bit, inside the stored member
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="CRC"):
        _rewrite_in_order(path, 2.0)
