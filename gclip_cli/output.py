"""Writing an output file atomically: a temporary file beside it, renamed into place at the end.

The temporary file is created with O_EXCL in the output's folder and the writers reach it
through its descriptor (``/proc/self/fd/N`` where the system has it): someone who swaps its
name for a link meanwhile does not make gclip write through the link.  The rename goes through
a descriptor of the folder, after checking that the name is still gclip's file and the folder
still where it was.  A symbolic link OUT is written through to its target (as ``cp`` does);
a device, FIFO or socket OUT is refused.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from . import interrupts
from .errors import InputError, OutputError

TEMP_SUFFIX = ".gclip-tmp"
# Where an open descriptor can be reopened by name (Linux): the writers then open the file
# gclip created, whatever its name has become.
_DESCRIPTORS = Path("/proc/self/fd")
_STREAM_HINT = "gclip writes regular files only (give - to stream to standard output)"


def check_output_path(src: Path, dst: Path, clobber: bool = True) -> None:
    """Refuse, before any work, an output that cannot or may not be written.

    That is: a missing input (InputError), a directory, a device, FIFO or socket, a dangling
    symbolic link, a path whose directory is missing, the input itself (or a link to it), an
    existing file when *clobber* is off, or one that would not fit on its disk (the output is
    as large as the input, and the old output is only freed after the new one is complete).
    """
    needed = _input_size(src)
    target = output_target(dst)
    if not target.parent.is_dir():
        raise OutputError(dst, f"directory {str(target.parent)!r} does not exist")
    if target.exists() and os.path.samefile(src, target):
        raise OutputError(dst, "is the input file; write the output to another path")
    if not clobber and target.exists():
        raise OutputError(dst, "exists and --no-clobber was given")
    free = shutil.disk_usage(target.parent).free
    if needed > free:
        raise OutputError(dst, f"needs {needed:,} bytes but only {free:,} are free on its disk")


def _input_size(src: Path) -> int:
    try:
        return src.stat().st_size
    except FileNotFoundError:
        raise InputError(src, "no such file") from None
    except OSError as exc:
        raise InputError(src, f"cannot read: {exc.strerror or exc}") from None


def is_stream(path: Path) -> bool:
    """Whether *path* (an output being written) is a pipe, to be written front to back."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def output_target(dst: Path) -> Path:
    """The file that writing *dst* replaces: *dst*, or the file its symbolic links lead to.

    Refuses a dangling link, a directory and whatever is not a regular file (a device, FIFO or
    socket: replacing /dev/full by a file is no way to write to it).
    """
    target = dst
    if dst.is_symlink():
        try:
            target = Path(os.path.realpath(dst, strict=True))
        except OSError:
            raise OutputError(
                dst, "is a symbolic link to nothing (dangling, or a loop): remove it first"
            ) from None
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise OutputError(dst, f"cannot use it: {exc.strerror or exc}") from None
    _refuse_special(dst, mode)
    return target


def _refuse_special(dst: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise OutputError(dst, "is a directory; give a file name for the output")
    if not stat.S_ISREG(mode):
        raise OutputError(dst, f"is {_kind(mode)}; {_STREAM_HINT}")


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def refuse_if_input(dst: Path, inputs: Iterable[str | Path], what: str | None = None) -> None:
    """Refuse to write *dst* when it is one of the files *inputs* name (a file, the files a
    folder holds, those beside an index), whatever the name or link it is reached by."""
    try:
        written = _file_id(os.stat(dst))
    except OSError:
        return  # a new file is nobody's input
    for path, found in _input_ids(inputs):
        if found == written:
            raise OutputError(what or dst, f"is the input {path}; write to another file")


def refuse_stream_onto_inputs(fd: int, inputs: Iterable[str | Path], name: str) -> None:
    """Refuse when the open file *fd* (standard output redirected with >> or <>) is one of the
    files *inputs* name: writing it would change an input."""
    found = os.fstat(fd)
    if stat.S_ISREG(found.st_mode):
        for path, input_id in _input_ids(inputs):
            if input_id == _file_id(found):
                raise OutputError(name, f"is the input {path}; redirect it to another file")


def _input_ids(inputs: Iterable[str | Path]) -> Iterator[tuple[Path, tuple[int, int]]]:
    """(path, identity) of every file *inputs* name: files, the entries of folders, and the
    files beside an index (the only ones it may name)."""
    for given in map(Path, inputs):
        folder = given if given.is_dir() else given.parent if given.name.endswith(".json") else None
        candidates = [given] if folder is None else [given, *_entries(folder)]
        for path in candidates:
            try:
                yield path, _file_id(os.stat(path))
            except OSError:
                continue


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _file_id(found: os.stat_result) -> tuple[int, int]:
    return found.st_dev, found.st_ino


@contextmanager
def atomic_output(
    dst: Path,
    clobber: bool = True,
    temp_dir: Path | None = None,
    mode_from: Path | None = None,
) -> Iterator[Path]:
    """Yield a path to write the output to; on success it becomes *dst* (or the file *dst*
    links to), on failure it vanishes.

    The temporary file lies beside the target (or in *temp_dir*, on the same file system).  It
    gets the permission bits of *mode_from* (the input, as cp gives them: without the umask's),
    or, replacing a file, that file's bits and owner (the owner where allowed).  With *clobber*
    off the file is linked to *dst*, which fails if *dst* has appeared meanwhile.
    """
    target = output_target(dst)
    with ExitStack() as stack:
        folder = stack.enter_context(_folder(target.parent, dst))
        temps = stack.enter_context(_folder(temp_dir, dst)) if temp_dir else folder
        fd = None
        try:
            # a signal is held while the file is made, and acts inside this try: which then
            # removes it (the file cannot be made inside the try and known to the except)
            with interrupts.deferred():
                fd, name = _create_temporary(temps, dst)
                stack.callback(os.close, fd)
            yield _reachable(fd, temp_dir or target.parent, name)
            with _finishing(dst):
                _check_ours(fd, temps, name, dst)
                _set_mode(fd, folder, target.name, mode_from)
                _check_in_place(folder, target.parent, dst)
                _refuse_special_entry(folder, target.name, dst)
                _publish(temps, name, folder, target.name, clobber, dst)
        except BaseException:
            if fd is not None:
                _remove_if_ours(fd, temps, name)
            raise


@contextmanager
def _finishing(dst: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise OutputError(dst, f"cannot put it in place: {exc.strerror or exc}") from None


@contextmanager
def _folder(path: Path, dst: Path) -> Iterator[int]:
    """A descriptor of the folder *path*: names inside it are created and renamed through it,
    so they stay in this folder even if it is moved."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OutputError(dst, f"cannot use folder {str(path)!r}: {exc.strerror or exc}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _create_temporary(folder: int, dst: Path) -> tuple[int, str]:
    """A new, empty, private file in *folder* with a short random name (a long OUT name plus
    a suffix could pass the 255-byte limit on names)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        name = f".{os.urandom(4).hex()}{TEMP_SUFFIX}"
        try:
            return os.open(name, flags, 0o600, dir_fd=folder), name
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(dst, f"cannot create a file here: {exc.strerror or exc}") from None
    raise OutputError(dst, "cannot create a file here: no free temporary name")


def _reachable(fd: int, folder: Path, name: str) -> Path:
    """A name the writers can open the temporary file by: its descriptor's, else its own."""
    if _DESCRIPTORS.is_dir():
        return _DESCRIPTORS / str(fd)
    return folder / name


def _check_ours(fd: int, folder: int, name: str, dst: Path) -> None:
    """The temporary name must still be the file gclip wrote: it is about to become OUT."""
    try:
        named = _file_id(os.stat(name, dir_fd=folder, follow_symlinks=False))
    except OSError:
        named = None
    if named != _file_id(os.fstat(fd)):
        raise OutputError(dst, "its temporary file was removed or replaced while gclip wrote it")


def _check_in_place(folder: int, path: Path, dst: Path) -> None:
    """The output's folder must still be reachable by its name: else the output would land
    where nobody asked for it."""
    try:
        here = _file_id(os.stat(path))
    except OSError:
        here = None
    if here != _file_id(os.fstat(folder)):
        raise OutputError(dst, f"folder {str(path)!r} was moved or replaced while gclip wrote")


def _refuse_special_entry(folder: int, name: str, dst: Path) -> None:
    """What the rename replaces must (still) be a regular file, or nothing."""
    try:
        mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise OutputError(dst, "became a symbolic link while gclip wrote; nothing replaced")
    _refuse_special(dst, mode)


def _set_mode(fd: int, folder: int, name: str, mode_from: Path | None) -> None:
    """The replaced file's bits and owner, else *mode_from*'s bits, less the umask's (as cp)."""
    try:
        old = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISREG(old.st_mode):
        _keep_owner(fd, old)
        os.fchmod(fd, stat.S_IMODE(old.st_mode))  # after chown, which clears set-id bits
        return
    bits = 0o666
    if mode_from is not None:
        with suppress(OSError):  # gone: a new file's bits, then
            bits = stat.S_IMODE(os.stat(mode_from).st_mode) & 0o777
    os.fchmod(fd, bits & ~_umask())


def _keep_owner(fd: int, old: os.stat_result) -> None:
    found = os.fstat(fd)
    if (found.st_uid, found.st_gid) != (old.st_uid, old.st_gid):
        # only root may give a file away; else the file stays the writer's, as cp's would
        with suppress(PermissionError):
            os.fchown(fd, old.st_uid, old.st_gid)


def _publish(temps: int, name: str, folder: int, target: str, clobber: bool, dst: Path) -> None:
    if clobber:
        os.replace(name, target, src_dir_fd=temps, dst_dir_fd=folder)
        return
    try:
        os.link(name, target, src_dir_fd=temps, dst_dir_fd=folder, follow_symlinks=False)
    except FileExistsError:
        raise OutputError(dst, "exists and --no-clobber was given") from None
    os.unlink(name, dir_fd=temps)


def _remove_if_ours(fd: int, folder: int, name: str) -> None:
    with suppress(OSError):  # gone already
        named = os.stat(name, dir_fd=folder, follow_symlinks=False)
        if _file_id(named) == _file_id(os.fstat(fd)):  # else not gclip's to remove
            os.unlink(name, dir_fd=folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
