"""The small interface every file format implements, and helpers they share."""

from __future__ import annotations

import errno
import lzma
import math
import mmap
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

import numpy as np

from ..dtypes import describe_dtype, is_gradient_dtype, is_opaque_dtype
from ..errors import InputError
from ..norms import BLOCK, NormStats
from .deflate import ERRORS as DEFLATE_ERRORS
from .deflate import crc32

if TYPE_CHECKING:
    from ..progress import Progress

# What reading a damaged or truncated input raises, from the OS, zipfile, zlib, numpy or h5py.
READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    KeyError,
    TypeError,
    IndexError,
    NotImplementedError,
    SystemError,  # how h5py reports an error inside one of HDF5's callbacks (visits)
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,  # an LZMA member with bad properties (zipfile imports lzma anyway)
    struct.error,  # a zip record shorter than its fixed part
    *DEFLATE_ERRORS,
)


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Report a failure to read *what* of the input *path* as one InputError."""
    try:
        yield
    except READ_ERRORS as exc:
        raise InputError(path, f"{what}: {one_line(exc)}") from None


# Called with each chunk of a gradient tensor as *src* (1-D, the file's dtype, maybe read-only)
# and *dst*, where the values to write go (same dtype and size; may be the same array as src).
Transform = Callable[["TensorInfo", np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class TensorInfo:
    """One named array of a file, as its header describes it (no data read)."""

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    nbytes: int
    dtype: np.dtype | None = None  # set only when the values are gradients gclip scales
    skip_reason: str | None = None  # why the values are copied through untouched
    # The format's handle on the values: a safetensors.DataOffsets, an npz.NpyMember, the
    # HDF5 dataset's path in the file.  Only the format reads it.
    location: object = field(default=None, repr=False, compare=False)
    fortran_order: bool = False  # values stored column-major (npz); else in C order
    # Values stored in the C order of these axes, outermost first (a transposed PyTorch view);
    # None: as fortran_order says.
    axes: tuple[int, ...] | None = None
    # Raw 1- or 2-byte values whose type the file does not record (numpy's |V2, HDF5's opaque
    # type): how np.savez and h5py store bfloat16 and float8.  Their item size; else 0.
    opaque_itemsize: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_axes(self) -> tuple[int, ...] | None:
        """The axes, outermost first, in whose C order the stored values come; None when
        they come in C order."""
        if self.axes is not None:
            return self.axes
        return tuple(reversed(range(len(self.shape)))) if self.fortran_order else None

    @property
    def is_gradient(self) -> bool:
        return self.dtype is not None


def describe_array(
    name: str, dtype: np.dtype, shape: tuple[int, ...], location: object = None
) -> TensorInfo:
    """TensorInfo for an array of a numpy *dtype*, marked skipped unless it holds gradients."""
    gradient = is_gradient_dtype(dtype)
    opaque = dtype.itemsize if is_opaque_dtype(dtype) else 0
    return TensorInfo(
        name=name,
        dtype_name=describe_dtype(dtype),
        shape=shape,
        nbytes=math.prod(shape) * dtype.itemsize,
        dtype=dtype if gradient else None,
        skip_reason=None if gradient else _skip_reason(dtype, opaque),
        location=location,
        opaque_itemsize=opaque,
    )


def _skip_reason(dtype: np.dtype, opaque: int) -> str:
    if opaque:
        return f"raw {opaque}-byte values ({dtype.str}) of unrecorded type"
    return f"{dtype.name} is not a floating-point type"


class ValuePiece(Protocol):
    """Some values of a gradient tensor that a worker process can measure on its own, from
    the open input file.  A piece begins at a whole block of values (norms.BLOCK) counted from
    the tensor's start, so its blocks are those one process would sum."""

    tensor: TensorInfo

    @property
    def nbytes(self) -> int: ...

    def measure(self, fd: int, norm_type: float, chunk_size: int, progress: Progress) -> NormStats:
        """The statistics of the piece's values, read from *fd* at most *chunk_size* bytes at a
        time; *progress* is told of the bytes read."""
        ...


@runtime_checkable
class EncodablePiece(ValuePiece, Protocol):
    """A piece a worker process can also rewrite: it encodes its transformed values as the
    format stores them into a spool file, and one process then places them in the output (in
    the order of the pieces, so the output does not depend on the number of workers)."""

    def encode(self, fd: int, transform: Transform, spool: int) -> object:
        """Read the values from *fd*, pass them through *transform*, append them encoded to
        the file *spool*; return what place() needs to find them there (picklable)."""
        ...

    @staticmethod
    def placing(out: Path) -> AbstractContextManager[Callable[[EncodablePiece, int, object], None]]:
        """A context in which place(piece, spool, what encode() returned) writes an encoded
        piece of this format into the output *out*; pieces are placed in order."""
        ...


@runtime_checkable
class TensorFile(Protocol):
    """An open input file: its tensors, their values in chunks, and a faithful rewrite.  What
    every format is; what some can do besides, the engine, history and diff ask for with
    isinstance() on the capabilities below (PlainValues, Checksummed, ChunkedPieces, Metadata,
    WholeArrays): a format without one is read and written by this protocol alone."""

    path: Path
    format_name: str
    tensors: Sequence[TensorInfo]

    def read_chunks(self, tensor: TensorInfo, chunk_size: int) -> Iterator[np.ndarray]:
        """Yield the values of gradient *tensor* as 1-D arrays of at most *chunk_size* bytes."""
        ...

    def write_transformed(
        self, out: Path, transform: Transform, chunk_size: int, leave: Set[str] = frozenset()
    ) -> None:
        """Copy the file to *out*, every gradient chunk passed through *transform*.

        The values of the tensors named in *leave* are not written: the caller fills them in
        (only tensors a capability offered: PlainValues' plain_offsets() or ChunkedPieces'
        pieces; a format without them is never asked to leave any).
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class PlainValues(Protocol):
    """Gradient tensors stored as plain bytes, which write_transformed keeps at the same
    offsets: worker processes measure them and rewrite them there (parallel.py)."""

    def plain_offsets(self) -> dict[str, int]:
        """Where gradient tensors stored as plain bytes begin, in this file and in what
        write_transformed writes (by name; tensors stored otherwise are not listed)."""
        ...


@runtime_checkable
class FinishesOutput(Protocol):
    """A file whose output needs work once every value is in place (checksums written over
    the values, a structure checked)."""

    def finish_output(self, out: Path, crcs: Mapping[str, int]) -> None:
        """Complete or check *out*; *crcs*: the CRC-32s of plain values as written, by tensor
        name, where workers wrote them."""
        ...


@runtime_checkable
class WritesInOrder(Protocol):
    """A file that can write its output front to back with plain writes (no seeking, nothing
    patched afterwards): into a stream, such as the pipe an upload reads (remote.py)."""

    def writes_in_order(self) -> bool:
        """Whether this file's output can be so written (by write_in_order)."""
        ...

    def write_in_order(
        self, out: Path, transform: Transform, rehearsal: Transform, chunk_size: int
    ) -> None:
        """Write the output into *out* front to back, whole (no finish_output), every gradient
        chunk passed through *transform*; *rehearsal* computes the same values and counts
        nothing, for a format that must know what it will write before it writes it (a zip
        member's CRC-32 in its local header, before its data)."""
        ...


@runtime_checkable
class Checksummed(PlainValues, FinishesOutput, Protocol):
    """Plain values the file keeps CRC-32s of (.npz): the workers that read or write them
    compute theirs, checked here as read and written into the output (finish_output)."""

    def verify_checksums(self, crcs: Mapping[str, int]) -> None:
        """Check the CRC-32s of plain values as read, by tensor name (from workers)."""
        ...


@runtime_checkable
class ChunkedPieces(Protocol):
    """Gradient tensors not stored as plain bytes that worker processes can measure piece by
    piece (compressed .npz members, HDF5 chunks), and encode too where the pieces are
    EncodablePieces."""

    def chunked_pieces(self) -> list[ValuePiece]:
        """Those pieces ([] when there are none)."""
        ...


@runtime_checkable
class Metadata(Protocol):
    """File-level metadata (a safetensors ``__metadata__``, HDF5 root attributes)."""

    def attribute(self, key: str) -> object | None:
        """The metadata entry *key*; None when absent."""
        ...


@runtime_checkable
class WholeArrays(Protocol):
    """Tensors of any element type read whole (a step counter, the integers diff compares)."""

    def read_array(self, tensor: TensorInfo) -> np.ndarray | None:
        """All values of *tensor*, whatever its element type, in memory (so only for small
        tensors); None when they are not a numpy array (packed 4- and 6-bit floats, an HDF5
        null dataspace)."""
        ...


@runtime_checkable
class SelfMeasuring(Protocol):
    """A file that can measure some tensors without reading every value (an HDF5 dataset's
    unallocated chunks are its fill value, however many there are)."""

    def measure_tensor(
        self, tensor: TensorInfo, norm_type: float, chunk_size: int, progress: Progress
    ) -> NormStats | None:
        """The statistics of gradient *tensor*, or None when read_chunks() is the way; tells
        *progress* of the bytes of values it covers."""
        ...


# Mapped pages count in RSS while mapped: keep windows small (mapping more often costs little).
MAX_WINDOW = 16 << 20


def window_pieces(
    start: int, nbytes: int, itemsize: int, chunk_size: int
) -> Iterator[tuple[int, int]]:
    """(file offset, length) of the pieces of the byte range [start, start + nbytes) to map:
    whole items, at most *chunk_size* and MAX_WINDOW long."""
    step = items_per_chunk(itemsize, min(chunk_size, MAX_WINDOW)) * itemsize
    for offset in range(0, nbytes, step):
        yield start + offset, min(step, nbytes - offset)


def items_per_chunk(itemsize: int, chunk_size: int) -> int:
    """How many items of *itemsize* bytes one chunk holds: at least one, whole blocks if it can."""
    items = max(1, chunk_size // itemsize)
    return items - items % BLOCK if items > BLOCK else items


class FileShrank(EOFError):
    """A file ends before bytes it was found to hold: it shrank while gclip read it (its
    headers were checked against its size when it was opened)."""

    def __init__(self, file_id: tuple[int, int], size: int, end: int) -> None:
        self.file_id, self.size, self.end = file_id, size, end
        super().__init__(
            f"the file shrank while gclip read it: it ends at byte {size:,}, before byte {end:,}"
        )

    def __reduce__(self) -> tuple[object, ...]:  # picklable, from the child that read
        return type(self), (self.file_id, self.size, self.end)

    @classmethod
    def of(cls, fd: int, end: int) -> FileShrank:
        """The file open as *fd* ends before byte *end*."""
        stat = os.fstat(fd)
        return cls((stat.st_dev, stat.st_ino), stat.st_size, end)

    def concerns(self, path: Path) -> bool:
        """Whether the file that shrank is *path*."""
        try:
            stat = os.stat(path)
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == self.file_id


@contextmanager
def mapped(fd: int, start: int, length: int) -> Iterator[np.ndarray]:
    """Bytes [start, start + length) of the open file *fd* as a read-only uint8 array.

    Mapping avoids copying through a read buffer; mapping one window at a time keeps the pages
    counted in RSS bounded.  (A view still alive at exit keeps its window until it dies.)  A
    file that no longer holds the window raises FileShrank; one that shrinks while the window
    is read kills this process with SIGBUS (isolation.py turns that into an error).
    """
    if length == 0:
        yield np.empty(0, dtype=np.uint8)
        return
    skip = start % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | mmap.MAP_POPULATE  # populate: one call instead of page faults
    try:
        window = mmap.mmap(fd, length + skip, flags=flags, prot=mmap.PROT_READ, offset=start - skip)
    except ValueError:  # "mmap length is greater than file size"
        raise FileShrank.of(fd, start + length) from None
    try:
        yield np.frombuffer(window, dtype=np.uint8, count=length, offset=skip)
    finally:
        with suppress(BufferError):
            window.close()


class PipelinedWriter:
    """Double-buffered output: *write* runs on a background thread while the caller fills the
    next buffer.  write() releases the GIL, so copying into the page cache overlaps with the
    computing of the next piece.  Use as a context manager; write errors surface in the caller.
    """

    def __init__(self, write: Callable[..., object], size: int, count: int = 2) -> None:
        self._write = write
        self._buffers = [np.empty(size, dtype=np.uint8) for _ in range(count)]
        self._pending: list[Future[object] | None] = [None] * count
        self._turn = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gclip-writer")

    def buffer(self, nbytes: int) -> np.ndarray:
        """The next free buffer, *nbytes* long, once its previous write has finished."""
        pending = self._pending[self._turn]
        if pending is not None:
            pending.result()
            self._pending[self._turn] = None
        return self._buffers[self._turn][:nbytes]

    def submit(self, filled: np.ndarray, *where: object) -> None:
        """write(*filled*, *where) in the background (*filled*: the array buffer() returned)."""
        raw = memoryview(filled.view(np.uint8))  # ml_dtypes types have no buffer format
        self._pending[self._turn] = self._pool.submit(self._write, raw, *where)
        self._turn = (self._turn + 1) % len(self._buffers)

    @contextmanager
    def drained(self) -> Iterator[None]:
        """On leaving the block, wait until every write submitted has finished (when the
        block fails, its error is the one raised, not a write's)."""
        try:
            yield
        except BaseException:
            self._wait(raise_errors=False)
            raise
        self._wait(raise_errors=True)

    def _wait(self, raise_errors: bool) -> None:
        for turn, pending in enumerate(self._pending):
            if pending is not None:
                self._pending[turn] = None
                error = pending.exception()
                if error is not None and raise_errors:
                    raise error

    def __enter__(self) -> PipelinedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            self._wait(raise_errors=exc_type is None)
        finally:
            self._pool.shutdown(wait=True)


def copy_stream(src: BinaryIO, dst: BinaryIO, nbytes: int, chunk_size: int, path: Path) -> None:
    """Copy exactly *nbytes* from *src* to *dst* through one reused buffer.

    Read failures become InputError naming *path*; write failures propagate as they are.
    """
    buffer = bytearray(min(nbytes, chunk_size))
    view = memoryview(buffer)
    left = nbytes
    while left:
        try:
            got = src.readinto(view[: min(left, len(buffer))])
        except READ_ERRORS as exc:
            raise InputError(path, f"cannot read: {exc}") from None
        if not got:
            raise InputError(path, f"file ends {left} bytes early")
        dst.write(view[:got])
        left -= got


def rewrite_in_place(
    src: int,
    out: Path,
    plain: Mapping[TensorInfo, int],
    transform: Transform,
    chunk_size: int,
    leave: Set[str] = frozenset(),
    holes: Sequence[tuple[int, int]] | np.ndarray = (),
) -> None:
    """Write *out* as a byte copy of file *src* in which the values of the *plain* tensors
    (each at its offset) are passed through *transform*; those of the tensors named in *leave*
    are not written, nor the byte ranges (start, length) *holes*: the caller fills them in."""
    size = os.fstat(src).st_size
    blocks = np.array([*((s, t.nbytes) for t, s in plain.items()), *holes], dtype=np.int64)
    with open(out, "wb") as copy:
        reserve(copy.fileno(), size)
        for start, nbytes in gaps(blocks.reshape(-1, 2), size):
            copy_range(src, copy.fileno(), start, nbytes)
        buffer = window_buffer(chunk_size)
        for tensor, start in plain.items():
            if tensor.name not in leave:
                where = (tensor, start, tensor.nbytes)
                rewrite_at(src, copy.fileno(), *where, transform, chunk_size, buffer)


def gaps(blocks: np.ndarray, size: int) -> Iterator[tuple[int, int]]:
    """(start, length) of the bytes of a *size*-byte file outside the (start, length) rows of
    *blocks* (in any order, maybe overlapping)."""
    blocks = blocks[np.argsort(blocks[:, 0], kind="stable")]
    starts = np.append(blocks[:, 0], size)
    covered = np.maximum.accumulate(np.concatenate([[0], blocks[:, 0] + blocks[:, 1]]))
    for start, end in zip(covered.tolist(), starts.tolist(), strict=True):
        if end > start:
            yield start, end - start


def rewrite_at(
    src: int,
    dst: int,
    tensor: TensorInfo,
    start: int,
    nbytes: int,
    transform: Transform,
    chunk_size: int,
    buffer: np.ndarray,
    checksum: bool = False,
) -> int | None:
    """Pass the values of *tensor* at bytes [start, start + nbytes) of file *src* through
    *transform* into the same place of file *dst*, a window at a time through *buffer*
    (uint8, at least one window or one item long).  Returns the CRC-32 of the bytes written
    if *checksum*, else None."""
    dtype = tensor.dtype
    crc = 0 if checksum else None
    for offset, length in window_pieces(start, nbytes, dtype.itemsize, chunk_size):
        target = buffer[:length]
        with mapped(src, offset, length) as raw:
            transform(tensor, raw.view(dtype), target.view(dtype))
        if crc is not None:
            crc = crc32(target, crc)
        write_all_at(dst, memoryview(target), offset)
    return crc


def window_buffer(chunk_size: int) -> np.ndarray:
    """A buffer for rewrite_at with windows of at most *chunk_size*."""
    return np.empty(max(min(chunk_size, MAX_WINDOW), 8), dtype=np.uint8)


def write_all_at(fd: int, data: memoryview, offset: int) -> None:
    """pwrite() until every byte is written (it may write fewer than asked)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def write_all(fd: int, data: memoryview) -> None:
    """write() until every byte is written (it may write fewer than asked)."""
    while data:
        data = data[os.write(fd, data) :]


class InOrder:
    """write_all_at for a stream (a pipe): each write must begin where the last ended, as the
    bytes of a file written front to back do."""

    def __init__(self, fd: int, position: int = 0) -> None:
        self._fd, self._position = fd, position

    def __call__(self, data: memoryview, offset: int) -> None:
        if offset != self._position:
            raise ValueError(f"a stream written at {offset:,} after {self._position:,} bytes")
        write_all(self._fd, data)
        self._position += len(data)


def reserve(fd: int, size: int) -> None:
    """Make the open file *fd* *size* bytes long, its blocks allocated where the file system
    can (so a full disk fails here, before any work, and writes need not allocate), else as
    a sparse file."""
    try:
        os.posix_fallocate(fd, 0, size)
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _NO_FALLOCATE:
            raise
        os.ftruncate(fd, size)


_NO_FALLOCATE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def copy_range(src: int, dst: int, start: int, nbytes: int) -> None:
    """Copy bytes [start, start + nbytes) of file *src* to the same place in file *dst*,
    inside the kernel where it can (sendfile), else through a buffer."""
    end = start + nbytes
    try:
        os.lseek(dst, start, os.SEEK_SET)  # sendfile writes at dst's position
        while start < end:
            sent = os.sendfile(dst, src, start, end - start)
            if not sent:
                raise EOFError(f"file ends at byte {start}, before {end}")
            start += sent
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _NO_SENDFILE:
            raise
        while start < end:
            data = os.pread(src, min(end - start, MAX_WINDOW), start)
            if not data:
                raise EOFError(f"file ends at byte {start}, before {end}") from None
            write_all_at(dst, memoryview(data), start)
            start += len(data)


_NO_SENDFILE = _NO_FALLOCATE


def open_regular(path: Path) -> BinaryIO:
    """*path* open for reading, refused (one line) unless it is a regular file.

    Every format seeks and maps its input, and memory must not depend on how long an input is:
    a pipe or a device (``/dev/zero``, ``/dev/urandom``) never ends.  Opening does not wait for
    a FIFO's writer, and the check is made on the file opened, not on the name.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise InputError(path, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        kind = _not_regular(os.fstat(fd).st_mode)
        if kind:
            raise InputError(path, kind)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _not_regular(mode: int) -> str | None:
    """Why a file of *mode* is not read as a tensor file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    kinds = {
        stat.S_ISFIFO: "a pipe (FIFO)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "a special file")
    return f"is {kind}, not a regular file"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The message of *exc* on one line (numpy, zipfile and HDF5 messages span several), cut
    after about *limit* characters (numpy quotes a whole damaged header)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else f"{text[:limit]}..."
