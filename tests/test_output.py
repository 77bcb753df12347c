import os
import shutil
import stat
from pathlib import Path

import pytest

from gclip_cli import InputError, OutputError
from gclip_cli.output import TEMP_SUFFIX, atomic_output, check_output_path


def test_output_appears_only_when_complete(tmp_path):
    dst = tmp_path / "out.bin"
    with atomic_output(dst) as tmp:
        (temporary,) = tmp_path.iterdir()  # beside the output, reached through its descriptor
        assert temporary.name.endswith(TEMP_SUFFIX) and os.path.samefile(tmp, temporary)
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
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):  # what creating a file meets in a read-only
        if flags & os.O_CREAT:  # directory (root ignores modes)
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("os.open", refuse)
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


def test_a_symbolic_link_is_written_through_to_its_target_atomically(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "real.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    with atomic_output(link) as tmp:
        # the temporary file lies beside the target (a rename cannot cross file systems)
        assert [p.name for p in elsewhere.iterdir() if p.name.endswith(TEMP_SUFFIX)]
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["real.bin"]


def special_files(tmp_path) -> list:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "to-fifo"
    link.symlink_to(fifo)
    devices = [Path(d) for d in ("/dev/null", "/dev/full") if os.path.exists(d)]
    return [fifo, link, *devices]


def test_a_device_fifo_or_link_to_one_is_refused_and_left_alone(tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(b"x")
    for dst in special_files(tmp_path):
        kind = stat.S_IFMT(os.stat(dst).st_mode)
        with pytest.raises(OutputError, match=r"regular files only \(give - to stream"):
            check_output_path(src, dst)
        with pytest.raises(OutputError, match="regular files only"), atomic_output(dst) as tmp:
            tmp.write_bytes(b"never")
        assert stat.S_IFMT(os.stat(dst).st_mode) == kind  # still a FIFO or a device


def test_a_dangling_symbolic_link_is_refused(tmp_path):
    link = tmp_path / "link.bin"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symbolic link to nothing"), atomic_output(link):
        pass
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_missing_input_is_an_input_error_not_a_crash(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        check_output_path(tmp_path / "gone.npz", tmp_path / "out.npz")


@pytest.fixture
def umask_022():
    mask = os.umask(0o022)
    yield
    os.umask(mask)


@pytest.mark.parametrize(("input_bits", "output_bits"), [(0o600, 0o600), (0o666, 0o644)])
def test_a_new_output_gets_the_inputs_permission_bits_as_cp_does(
    tmp_path, umask_022, input_bits, output_bits
):
    src = tmp_path / "in.bin"
    src.write_bytes(b"x")
    src.chmod(input_bits)
    with atomic_output(tmp_path / "out.bin", mode_from=src) as tmp:
        tmp.write_bytes(b"y")
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == output_bits


def test_a_replaced_output_keeps_its_permission_bits_and_owner(tmp_path, umask_022):
    src = tmp_path / "in.bin"
    src.write_bytes(b"x")
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")
    dst.chmod(0o640)
    owner = (dst.stat().st_uid, dst.stat().st_gid)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(dst, 1234, 5678)
        owner = (1234, 5678)
    with atomic_output(dst, mode_from=src) as tmp:
        tmp.write_bytes(b"new")
    found = dst.stat()
    assert dst.read_bytes() == b"new" and stat.S_IMODE(found.st_mode) == 0o640
    assert (found.st_uid, found.st_gid) == owner


def test_a_temporary_file_swapped_for_a_link_does_not_write_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    dst = tmp_path / "out.bin"
    with (
        pytest.raises(OutputError, match="temporary file was removed or replaced"),
        atomic_output(dst) as tmp,
    ):
        (temporary,) = tmp_path.glob(f"*{TEMP_SUFFIX}")
        temporary.unlink()
        temporary.symlink_to(victim)  # someone with write access to the folder
        tmp.write_bytes(b"output")  # as the writers do: by the name given
    assert victim.read_bytes() == b"precious" and not dst.exists()
    assert temporary.is_symlink()  # someone else's link: left alone


def test_an_output_folder_moved_away_mid_write_is_an_error_that_leaves_nothing(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with (
        pytest.raises(OutputError, match="was moved or replaced"),
        atomic_output(folder / "o.bin") as tmp,
    ):
        tmp.write_bytes(b"output")
        folder.rename(tmp_path / "moved")
    assert list((tmp_path / "moved").iterdir()) == []


def test_the_longest_legal_output_name_can_be_written(tmp_path):
    dst = tmp_path / ("o" * 255)
    with atomic_output(dst) as tmp:
        tmp.write_bytes(b"x")
    assert dst.read_bytes() == b"x"
