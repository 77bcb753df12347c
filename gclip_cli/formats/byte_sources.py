"""Where the zip layer (ziparchive.py) reads an archive's bytes from: a local file, or a remote
object by ranges (ranged.RangedBytes).  One small protocol, so that .npz and PyTorch readers
read either the same way; a local file keeps its fast paths (``pread``, mapped windows).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

from .base import mapped


class ByteSource(Protocol):
    """The bytes of an archive, by ranges."""

    size: int  # as found when opened
    # Whether reads are costly each (a GET): the zip layer then reads ahead in windows, the
    # next fetched while one is worked on, rather than in short reads as they come.
    prefetches: bool

    def read(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) (fewer where a local file ends)."""
        ...

    def readinto(self, view: memoryview, start: int) -> int:
        """Fill *view* with the bytes from *start* on; how many were read."""
        ...

    def windows(self, pieces: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
        """Each (start, length) of *pieces* as a read-only uint8 array, in order; each is valid
        until the next is asked for."""
        ...


class LocalBytes:
    """A ByteSource over the open local file *fd*: ``pread``, windows mapped (no copy)."""

    prefetches = False

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def read(self, start: int, length: int) -> bytes:
        return os.pread(self.fd, length, start)

    def readinto(self, view: memoryview, start: int) -> int:
        return os.preadv(self.fd, [view], start)

    def windows(self, pieces: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
        for start, length in pieces:
            with mapped(self.fd, start, length) as raw:
                yield raw


def read_at(source: int | ByteSource, start: int, length: int) -> bytes:
    """Bytes [start, start + length) of the open file *source* (a descriptor) or of the
    ByteSource *source*."""
    if isinstance(source, int):
        return os.pread(source, length, start)
    return source.read(start, length)
