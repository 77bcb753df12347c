"""One file on several cores: values stored as plain bytes are cut into shares, which forked
worker processes measure (pass 1) and rewrite in place with pwrite (pass 2); where the file
keeps CRC-32s of those values (.npz), the workers checksum their parts as read and as written,
and the parts' checksums are combined here.  Values a format stores otherwise (compressed
HDF5 chunks) come as pieces the format cuts, which workers measure and encode into spool files
that one process then places in the output.

Processes, not threads: the numpy calls on cache-sized blocks are too short to give up the GIL
for long, and two threads ran slower than one here.  Shares are cut at whole blocks of values
(``norms.BLOCK``) counted from each tensor's start, so every block sum is the same as in one
process and the exact merged norm is identical to the last bit whatever the number of jobs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .formats import Checksummed, ChunkedPieces, PlainValues, TensorFile, TensorInfo
from .formats.base import (
    MAX_WINDOW,
    EncodablePiece,
    ValuePiece,
    mapped,
    rewrite_at,
    window_buffer,
    window_pieces,
)
from .formats.deflate import crc32, crc32_combine
from .isolation import Channel, can_fork, run_forked
from .norms import BLOCK, NormAccumulator, NormStats
from .progress import SILENT, Progress
from .rewriters import counted

if TYPE_CHECKING:
    from .rewriters import Rewriter

# Below this many bytes of values, forking workers costs more than it saves.
MIN_PARALLEL_BYTES = 64 << 20
# Each worker maps and buffers this much at a time: workers together stay within one window.
_WORKER_WINDOW = MAX_WINDOW // 4

P = TypeVar("P", bound="ValuePiece")


@dataclass(frozen=True)
class Span:
    """Values [first, first + count) of a gradient tensor, stored as plain bytes from *offset*
    in the input and at the same offset in the output.  *checksummed*: the file keeps CRC-32s
    of its plain values, so those of the span's bytes as read and as written are wanted."""

    tensor: TensorInfo
    offset: int
    first: int
    count: int
    checksummed: bool = False

    @property
    def nbytes(self) -> int:
        return self.count * self.tensor.dtype.itemsize

    def part(self, start: int, stop: int) -> Span:
        """Values [start, stop) of this span (counted from the span's first value)."""
        offset = self.offset + start * self.tensor.dtype.itemsize
        return replace(self, offset=offset, first=self.first + start, count=stop - start)

    def measure_and_checksum(
        self, fd: int, norm_type: float, chunk_size: int, progress: Progress
    ) -> tuple[NormStats, int | None]:
        """The statistics of the span's values and, if checksummed, the CRC-32 of its bytes;
        *progress* is told of the bytes read."""
        accumulator = NormAccumulator.for_tensor(self.tensor, norm_type, self.first)
        crc = 0 if self.checksummed else None
        itemsize = self.tensor.dtype.itemsize
        for offset, nbytes in window_pieces(self.offset, self.nbytes, itemsize, chunk_size):
            with mapped(fd, offset, nbytes) as raw:
                accumulator.add(raw.view(self.tensor.dtype))
                if crc is not None:
                    crc = crc32(raw, crc)
            progress.advance(nbytes)
        return accumulator.finish(), crc


def parallel_spans(tfile: TensorFile, jobs: int) -> list[Span]:
    """The spans worth handing to *jobs* workers to measure and rewrite: every gradient tensor
    the format stores as plain bytes (none when one process would do as well)."""
    return _worth_sharing(_plain_spans(tfile)) if _can_share(jobs) else []


def measurable_pieces(tfile: TensorFile, jobs: int) -> list[ValuePiece | Span]:
    """The pieces worth handing to *jobs* workers to measure: the plain spans and the pieces
    of chunked tensors (none when one process would do as well)."""
    if not _can_share(jobs):
        return []
    return _worth_sharing([*_plain_spans(tfile), *_chunked_pieces(tfile)])


def encodable_pieces(tfile: TensorFile, jobs: int) -> list[EncodablePiece]:
    """The chunked pieces worth handing to *jobs* workers to encode (none when one process
    would do as well)."""
    if not _can_share(jobs):
        return []
    return _worth_sharing([p for p in _chunked_pieces(tfile) if isinstance(p, EncodablePiece)])


def _can_share(jobs: int) -> bool:
    return jobs >= 2 and can_fork()


def _plain_spans(tfile: TensorFile) -> list[Span]:
    """Every gradient tensor the format stores as plain bytes, whole (none for a format
    without PlainValues)."""
    if not isinstance(tfile, PlainValues):
        return []
    offsets = tfile.plain_offsets()
    checksummed = isinstance(tfile, Checksummed)
    return [
        Span(t, offsets[t.name], 0, t.numel, checksummed)
        for t in tfile.tensors
        if t.is_gradient and t.name in offsets
    ]


def _chunked_pieces(tfile: TensorFile) -> list[ValuePiece]:
    """The format's pieces of its other gradient tensors (none without ChunkedPieces)."""
    return tfile.chunked_pieces() if isinstance(tfile, ChunkedPieces) else []


def _worth_sharing(pieces: list[P]) -> list[P]:
    return pieces if sum(p.nbytes for p in pieces) >= MIN_PARALLEL_BYTES else []


def cut(spans: Sequence[Span], parts: int) -> list[list[Span]]:
    """*spans* in order, cut into at most *parts* shares of about equal bytes; cuts fall on
    whole blocks of values."""
    total = sum(s.nbytes for s in spans)
    shares: list[list[Span]] = [[] for _ in range(parts)]
    position = 0  # bytes of the spans before this one
    for span in spans:
        itemsize, start = span.tensor.dtype.itemsize, 0
        while start < span.count:
            share = min(parts - 1, (position + start * itemsize) * parts // total)
            stop = span.count
            if share < parts - 1:
                boundary = -(-(share + 1) * total // parts)  # where the share ends, in bytes
                wanted = -(-(boundary - position) // itemsize)
                stop = min(stop, -(-wanted // BLOCK) * BLOCK)
            shares[share].append(span.part(start, stop))
            start = stop
        position += span.nbytes
    return [share for share in shares if share]


def deal(pieces: Sequence[P], jobs: int) -> list[list[P]]:
    """*pieces* in at most *jobs* shares of about equal bytes, each in order: spans are cut
    (see cut()), the other pieces, which cannot be, go whole, in order, to the share with the
    fewest bytes so far (so that shares progress through the file together)."""
    spans = [p for p in pieces if isinstance(p, Span)]
    shares: list[list[P]] = [*cut(spans, jobs)] if spans else []
    shares += [[] for _ in range(jobs - len(shares))]
    loads = [sum(p.nbytes for p in share) for share in shares]
    for piece in (p for p in pieces if not isinstance(p, Span)):
        lightest = loads.index(min(loads))
        shares[lightest].append(piece)
        loads[lightest] += piece.nbytes
    return [share for share in shares if share]


# Where a CRC-32 was taken: (tensor name, first value, bytes, CRC-32 of those bytes).
CrcPart = tuple[str, int, int, int]


def measure_pieces(
    path: Path,
    pieces: Sequence[ValuePiece | Span],
    norm_type: float,
    chunk_size: int,
    jobs: int,
    progress: Progress = SILENT,
) -> tuple[dict[str, NormStats], dict[str, int]]:
    """The NormStats of the values *pieces* cover, per tensor name, measured by *jobs*
    workers (their progress told to *progress*); and the CRC-32s of the values of the tensors
    whose spans are checksummed."""
    per_worker = min(chunk_size, _WORKER_WINDOW)
    tasks = [(_measure_share, (path, share, norm_type, per_worker)) for share in deal(pieces, jobs)]
    merged: dict[str, NormStats] = {}
    crcs: list[CrcPart] = []
    for results, crc_parts in run_forked(path, tasks, progress=progress):
        crcs += crc_parts
        for name, stats in results:
            merged.setdefault(name, NormStats(norm_type)).merge(stats)
    return merged, _combined_crcs(crcs)


def _combined_crcs(parts: Sequence[CrcPart]) -> dict[str, int]:
    """The CRC-32 of each tensor's values from those of its parts (which cover them all)."""
    crcs: dict[str, int] = {}
    for name, _, nbytes, crc in sorted(parts):
        crcs[name] = crc32_combine(crcs[name], crc, nbytes) if name in crcs else crc
    return crcs


def rewrite_spans(
    path: Path,
    out: Path,
    spans: Sequence[Span],
    rewriter: Rewriter,
    chunk_size: int,
    jobs: int,
    progress: Progress = SILENT,
) -> dict[str, int]:
    """Write *spans* of *path* through *rewriter* into the same places of *out*, by *jobs*
    workers (their progress told to *progress*); what they measured is merged into
    *rewriter*.  Returns the CRC-32s of the values written of the tensors whose spans are
    checksummed."""
    per_worker = min(chunk_size, _WORKER_WINDOW)
    tasks = [
        (_rewrite_share, (path, out, share, rewriter, per_worker)) for share in cut(spans, jobs)
    ]
    crcs: list[CrcPart] = []
    for done, crc_parts in run_forked(path, tasks, progress=progress):
        rewriter.merge(done)
        crcs += crc_parts
    return _combined_crcs(crcs)


def encode_pieces(
    path: Path,
    out: Path,
    pieces: Sequence[EncodablePiece],
    rewriter: Rewriter,
    jobs: int,
    progress: Progress = SILENT,
) -> None:
    """Encode *pieces* of *path* through *rewriter* by *jobs* workers (their progress told to
    *progress*), each into a spool file of its own beside *out* (unnamed: it goes away with
    its last descriptor), and place them into *out* in order as they are done; what the
    workers measured is merged into *rewriter*."""
    number = {id(piece): n for n, piece in enumerate(pieces)}
    shares = [[(number[id(p)], p) for p in share] for share in deal(pieces, jobs)]
    with ExitStack() as stack:
        spools = [stack.enter_context(_spool(out)) for _ in shares]
        place = stack.enter_context(type(pieces[0]).placing(out))
        waiting: dict[int, tuple[int, object]] = {}  # piece number -> (spool, its encoding)
        placed = 0

        def place_in_order(share: int, note: tuple[int, object]) -> None:
            nonlocal placed
            number, encoded = note
            waiting[number] = (spools[share], encoded)
            while placed in waiting:
                place(pieces[placed], *waiting.pop(placed))
                placed += 1

        tasks = [
            (_encode_share, (path, share, rewriter, spool))
            for share, spool in zip(shares, spools, strict=True)
        ]
        for worker in run_forked(path, tasks, on_note=place_in_order, progress=progress):
            rewriter.merge(worker)


@contextmanager
def _spool(out: Path) -> Iterator[int]:
    """An unnamed scratch file beside *out* (on the same file system), as a descriptor."""
    import tempfile  # here: only chunked files need it, and start-up counts

    # *out* may be the name of a descriptor (/proc/self/fd/N, see output.py): its real folder
    with tempfile.TemporaryFile(dir=Path(os.path.realpath(out)).parent) as spool:
        yield spool.fileno()


def _encode_share(
    channel: Channel,
    path: Path,
    numbered: Sequence[tuple[int, EncodablePiece]],
    template: Rewriter,
    spool: int,
) -> Rewriter:
    rewriter = template.blank()
    transform = counted(rewriter, channel.progress)
    with open(path, "rb") as src:
        for n, piece in numbered:
            channel.note((n, piece.encode(src.fileno(), transform, spool)))
    rewriter.finish()
    return rewriter


def _measure_share(
    channel: Channel,
    path: Path,
    pieces: Sequence[ValuePiece | Span],
    norm_type: float,
    chunk_size: int,
) -> tuple[list[tuple[str, NormStats]], list[CrcPart]]:
    results, crcs = [], []
    progress = channel.progress
    with open(path, "rb") as src:
        for piece in pieces:
            if isinstance(piece, Span):
                stats, crc = piece.measure_and_checksum(
                    src.fileno(), norm_type, chunk_size, progress
                )
                if crc is not None:
                    crcs.append((piece.tensor.name, piece.first, piece.nbytes, crc))
            else:
                stats = piece.measure(src.fileno(), norm_type, chunk_size, progress)
            results.append((piece.tensor.name, stats))
    return results, crcs


def _rewrite_share(
    channel: Channel,
    path: Path,
    out: Path,
    spans: Sequence[Span],
    template: Rewriter,
    chunk_size: int,
) -> tuple[Rewriter, list[CrcPart]]:
    rewriter = template.blank()
    transform = counted(rewriter, channel.progress)
    buffer = window_buffer(chunk_size)
    crcs = []
    with open(path, "rb") as src, open(out, "r+b") as dst:
        for span in spans:
            where = (span.tensor, span.offset, span.nbytes)
            crc = rewrite_at(
                src.fileno(), dst.fileno(), *where, transform, chunk_size, buffer, span.checksummed
            )
            if crc is not None:
                crcs.append((span.tensor.name, span.first, span.nbytes, crc))
    rewriter.finish()
    return rewriter, crcs
