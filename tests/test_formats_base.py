"""The helpers the formats share: pipelined writes, positional copies and rewrites."""

import errno
import os
import pickle
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from conftest import CoreOnly, release_readers
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

import gclip_cli
from gclip_cli import InputError
from gclip_cli.formats import open_file
from gclip_cli.formats.base import (
    Checksummed,
    ChunkedPieces,
    FileShrank,
    Metadata,
    PipelinedWriter,
    PlainValues,
    TensorFile,
    TensorInfo,
    WholeArrays,
    copy_range,
    gaps,
    mapped,
    one_line,
    open_regular,
    reserve,
    rewrite_at,
    window_buffer,
)


def test_pipelined_writes_arrive_in_order():
    written = []
    with PipelinedWriter(lambda data, tag: written.append((tag, bytes(data))), 4) as writer:
        for i in range(5):
            target = writer.buffer(3)
            target[:] = i
            writer.submit(target, i)
    assert written == [(i, bytes([i] * 3)) for i in range(5)]


def test_a_failing_block_keeps_its_own_error_over_a_failed_write():
    def broken(data):
        raise OSError(errno.ENOSPC, "disk full")

    writer = PipelinedWriter(broken, 4)
    with pytest.raises(KeyError), writer, writer.drained():
        writer.submit(writer.buffer(2))
        raise KeyError("interrupted")


def test_a_failed_write_surfaces_when_the_writes_are_drained():
    def broken(data):
        raise OSError(errno.ENOSPC, "disk full")

    writer = PipelinedWriter(broken, 4)
    with pytest.raises(OSError, match="disk full"), writer, writer.drained():
        writer.submit(writer.buffer(2))


def test_copy_range_puts_bytes_at_the_same_place(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(bytes(range(256)) * 40)
    with open(src, "rb") as a, open(dst, "wb") as b:
        reserve(b.fileno(), src.stat().st_size)
        copy_range(a.fileno(), b.fileno(), 1000, 3000)
    data = dst.read_bytes()
    assert data[1000:4000] == src.read_bytes()[1000:4000]
    assert data[:1000] == bytes(1000) and data[4000:] == bytes(len(data) - 4000)


def test_copy_range_falls_back_to_reading_and_writing(tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(errno.EINVAL, "sendfile not supported here")

    monkeypatch.setattr(os, "sendfile", unsupported)
    test_copy_range_puts_bytes_at_the_same_place(tmp_path)


def test_copy_range_past_the_end_of_the_input_fails(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 10)
    with open(src, "rb") as a, open(tmp_path / "dst", "wb") as b, pytest.raises(EOFError):
        copy_range(a.fileno(), b.fileno(), 5, 10)


def test_rewrite_at_transforms_values_in_place_window_by_window(tmp_path):
    values = np.arange(1000, dtype=np.float32)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"head" + values.tobytes())
    dst.write_bytes(bytes(4 + values.nbytes))
    tensor = TensorInfo("t", "float32", (1000,), values.nbytes, dtype=np.dtype(np.float32))
    windows = []

    def double(t, s, d):
        windows.append(s.size)
        np.multiply(s, 2, out=d)

    with open(src, "rb") as a, open(dst, "r+b") as b:
        rewrite_at(
            a.fileno(), b.fileno(), tensor, 4, values.nbytes, double, 400, window_buffer(400)
        )
    assert np.array_equal(np.frombuffer(dst.read_bytes()[4:], np.float32), values * 2)
    assert windows == [100] * 10


def test_reserve_without_fallocate_makes_a_sparse_file(tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    with open(tmp_path / "f", "wb") as f:
        reserve(f.fileno(), 12345)
    assert (tmp_path / "f").stat().st_size == 12345


@given(st.lists(st.tuples(st.integers(0, 120), st.integers(0, 30)), max_size=12))
def test_gaps_are_exactly_the_bytes_no_block_covers(blocks):
    size = 128
    covered = np.zeros(size, dtype=bool)
    for start, length in blocks:
        covered[start : start + length] = True
    found = np.zeros(size, dtype=bool)
    rows = np.array(blocks, dtype=np.int64).reshape(-1, 2)
    previous_end = -1
    for start, length in gaps(rows, size):
        assert length > 0 and start >= previous_end  # in order, disjoint
        found[start : start + length] = True
        previous_end = start + length
    assert np.array_equal(found, ~covered)


def test_a_window_past_the_end_of_a_shrunk_file_is_file_shrank(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(8192))
    with open(path, "rb") as f:
        os.truncate(path, 100)  # after its header was checked against the size, say
        with pytest.raises(FileShrank) as err, mapped(f.fileno(), 4096, 4096):
            pass
    shrank = "the file shrank while gclip read it: it ends at byte 100, before byte 8,192"
    assert str(err.value) == shrank
    assert err.value.concerns(path) and not err.value.concerns(tmp_path)
    back = pickle.loads(pickle.dumps(err.value))  # from the child process that read
    assert (type(back), str(back), back.concerns(path)) == (FileShrank, str(err.value), True)


def test_only_regular_files_are_opened(tmp_path):
    regular = tmp_path / "a.bin"
    regular.write_bytes(b"abc")
    with open_regular(regular) as file:
        assert file.read() == b"abc"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: opening must not wait for one
    release_readers(fifo)
    refusals = {
        fifo: "is a pipe (FIFO), not a regular file",
        Path("/dev/zero"): "is a character device, not a regular file",
        tmp_path: "is a directory, not a file",
        tmp_path / "missing": "no such file",
        tmp_path / "a\0b": "cannot read: embedded null byte",
    }
    for path, message in refusals.items():
        with pytest.raises(InputError) as refused:
            open_regular(path)
        assert (refused.value.path, refused.value.message) == (str(path), message)


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "hdf5"])
def test_a_device_or_a_pipe_forced_into_a_format_is_refused(tmp_path, fmt):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    release_readers(fifo)
    for path, kind in ((Path("/dev/zero"), "character device"), (fifo, "pipe")):
        with pytest.raises(InputError, match=f"is a {kind}"):
            open_file(path, fmt)


def test_a_pipe_in_a_folder_is_listed_as_not_read_without_waiting_for_it(tmp_path):
    os.mkfifo(tmp_path / "incoming.safetensors")  # detection used to wait for a writer
    release_readers(tmp_path / "incoming.safetensors")
    save_file({"w": np.array([3.0, 4.0], np.float32)}, str(tmp_path / "w.safetensors"))
    report = gclip_cli.inspect_files([tmp_path])
    assert report.global_norm == 5.0
    assert dict(report.not_read) == {
        str(tmp_path / "incoming.safetensors"): "is a pipe (FIFO), not a regular file"
    }


def test_messages_are_one_line_and_bounded():
    assert one_line(ValueError("a\nb\n  c")) == "a b c"
    assert one_line(ValueError("x" * 1000), limit=10) == "xxxxxxxxxx..."
    assert one_line(KeyError()) == "KeyError"


CAPABILITIES = (PlainValues, Checksummed, ChunkedPieces, Metadata, WholeArrays)


@pytest.mark.parametrize(
    ("fmt", "offered"),
    [
        ("safetensors", {PlainValues, Metadata, WholeArrays}),
        ("npz", {PlainValues, Checksummed, ChunkedPieces, WholeArrays}),
        ("hdf5", {PlainValues, ChunkedPieces, Metadata, WholeArrays}),
    ],
)
def test_each_format_offers_the_capabilities_it_has_and_no_stubs(make_file, fmt, offered):
    """safetensors and HDF5 keep no checksums, npz no metadata, safetensors no chunks: none
    of them carries a method that does nothing."""
    src = make_file(fmt, {"w": np.ones(3, dtype=np.float32)})
    with closing(open_file(src)) as tfile:
        assert isinstance(tfile, TensorFile)
        assert {c for c in CAPABILITIES if isinstance(tfile, c)} == offered
        assert not hasattr(tfile, "checksummed")
        assert all(not isinstance(CoreOnly(tfile), c) for c in CAPABILITIES)
