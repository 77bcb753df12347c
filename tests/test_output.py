import os
import shutil
import stat

import pytest

from gclip_cli import OutputError
from gclip_cli.output import TEMP_SUFFIX, atomic_output, check_output_path


def test_output_appears_only_when_complete(tmp_path):
    dst = tmp_path / "out.bin"
    with atomic_output(dst) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(TEMP_SUFFIX)
        tmp.write_bytes(b"data")
        assert not dst.exists()
    assert dst.read_bytes() == b"data"
    assert list(tmp_path.iterdir()) == [dst]


def test_failure_leaves_neither_output_nor_temporary_file(tmp_path):
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(dst) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk on fire")
    assert dst.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [dst]


def test_new_file_gets_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644


def test_read_only_directory_is_an_output_error(tmp_path, monkeypatch):
    def refuse(**kwargs):  # what mkstemp meets in a read-only directory (root ignores modes)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with (
        pytest.raises(OutputError, match="cannot create a file here: Permission denied"),
        atomic_output(tmp_path / "o"),
    ):
        pass


def test_check_output_path(tmp_path):
    src = tmp_path / "in.npz"
    src.write_bytes(b"x")
    with pytest.raises(OutputError, match="is the input file"):
        check_output_path(src, tmp_path / "." / "in.npz")
    link = tmp_path / "alias.npz"
    link.hardlink_to(src)
    with pytest.raises(OutputError, match="is the input file"):
        check_output_path(src, link)
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(src, tmp_path)
    check_output_path(src, tmp_path / "new.npz")


def test_no_clobber_refuses_a_file_that_appears_meanwhile(tmp_path):
    dst = tmp_path / "out.bin"
    with pytest.raises(OutputError, match="exists"), atomic_output(dst, clobber=False) as tmp:
        tmp.write_bytes(b"new")
        dst.write_bytes(b"someone else's")  # a concurrent writer got there first
    assert dst.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_output_that_cannot_fit_is_refused_before_any_work(tmp_path, monkeypatch):
    src = tmp_path / "in.npz"
    src.write_bytes(b"x" * 1000)
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 0, 999))
    with pytest.raises(OutputError, match="needs 1,000 bytes but only 999 are free"):
        check_output_path(src, tmp_path / "out.npz")
