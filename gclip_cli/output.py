"""Writing an output file atomically: a temporary file beside it, renamed into place at the end."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

TEMP_SUFFIX = ".gclip-tmp"


def check_output_path(src: Path, dst: Path) -> None:
    """Refuse an output that is a directory, has no directory to go in, or is the input."""
    if dst.is_dir():
        raise OutputError(dst, "is a directory; give a file name for the output")
    if not dst.parent.is_dir():
        raise OutputError(dst, f"directory {str(dst.parent)!r} does not exist")
    if dst.exists() and os.path.samefile(src, dst):
        raise OutputError(dst, "is the input file; write the output to another path")


@contextmanager
def atomic_output(dst: Path) -> Iterator[Path]:
    """Yield a temporary path beside *dst*; on success it replaces *dst*, on failure it vanishes."""
    try:
        fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise OutputError(dst, f"cannot create a file here: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what a new file would get
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
