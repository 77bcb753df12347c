"""Writing an output file atomically: a temporary file beside it, renamed into place at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

TEMP_SUFFIX = ".gclip-tmp"


def check_output_path(src: Path, dst: Path, clobber: bool = True) -> None:
    """Refuse, before any work, an output that cannot or may not be written.

    That is: a directory, a path whose directory is missing, the input itself (or a hard link
    to it), an existing file when *clobber* is off, or one that would not fit on its disk (the
    output is as large as the input, and the old output is only freed after the new one is
    complete).
    """
    if dst.is_dir():
        raise OutputError(dst, "is a directory; give a file name for the output")
    if not dst.parent.is_dir():
        raise OutputError(dst, f"directory {str(dst.parent)!r} does not exist")
    if dst.exists() and os.path.samefile(src, dst):
        raise OutputError(dst, "is the input file; write the output to another path")
    if not clobber and dst.exists():
        raise OutputError(dst, "exists and --no-clobber was given")
    needed, free = src.stat().st_size, shutil.disk_usage(dst.parent).free
    if needed > free:
        raise OutputError(dst, f"needs {needed:,} bytes but only {free:,} are free on its disk")


@contextmanager
def atomic_output(dst: Path, clobber: bool = True, temp_dir: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside *dst* (or in *temp_dir*, on the same filesystem); on
    success it becomes *dst*, on failure it vanishes.

    With *clobber* off the temporary file is linked to *dst*, which fails if *dst* has appeared
    meanwhile, so an existing file is never replaced, even by a concurrent writer.
    """
    try:
        fd, name = tempfile.mkstemp(
            dir=temp_dir or dst.parent, prefix=f".{dst.name}.", suffix=TEMP_SUFFIX
        )
    except OSError as exc:
        raise OutputError(dst, f"cannot create a file here: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what a new file would get
        if clobber:
            os.replace(tmp, dst)
        else:
            _link_new(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link_new(tmp: Path, dst: Path) -> None:
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise OutputError(dst, "exists and --no-clobber was given") from None
    tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
