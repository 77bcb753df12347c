"""Progress of the passes: the engine reports events, whoever listens (the CLI) shows them.

Events: a Phase begins (with the bytes it will read or write, known before it starts), ints
are bytes of it done, a File says which of several inputs is being read.  Children relay
their events to the parent process (isolation.py), which owns the display.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

MEASURING = "measuring"  # pass 1: reading the gradient tensors' values
WRITING = "writing"  # pass 2: writing them transformed
COPYING = "copying"  # no value changes: the output is a byte copy of the input


@dataclass(frozen=True)
class Phase:
    """A pass begins that will read or write *total* bytes."""

    name: str
    total: int


@dataclass(frozen=True)
class File:
    """Input *number* (from 1) of *count* is next."""

    number: int
    count: int


Event = int | Phase | File  # an int: that many more bytes of the phase are done
Listener = Callable[[Event], None]

_listener: Listener | None = None


def advance(nbytes: int) -> None:
    """*nbytes* more of the current phase are done."""
    if _listener is not None:
        _listener(nbytes)


def begin(name: str, total: int) -> None:
    """Phase *name* begins; it will read or write *total* bytes."""
    if _listener is not None:
        _listener(Phase(name, total))


def forward(event: Event) -> None:
    """Pass on an event that arrived from a child process."""
    if _listener is not None:
        _listener(event)


def each_file(files: Iterable[T]) -> Iterator[T]:
    """*files* one by one, telling the listener which of how many is next."""
    files = list(files)
    for number, file in enumerate(files, 1):
        if _listener is not None:
            _listener(File(number, len(files)))
        yield file


@contextmanager
def listening(listener: Listener | None) -> Iterator[None]:
    """Call *listener*(event) as work is done, while the block runs."""
    global _listener
    before, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = before


def relay(send: Listener) -> None:
    """Report to *send* instead (in a child process, whose parent owns the display), if
    anyone was listening."""
    global _listener
    if _listener is not None:
        _listener = send


class Tally:
    """What a display shows: the phase, which file, bytes done of the phase's total.

    Done never exceeds the total: should a phase do more than it announced, its total is
    raised to what was done.
    """

    def __init__(self) -> None:
        self.phase: str | None = None
        self.total: int | None = None  # None until a phase announces it
        self.done = 0
        self.file: File | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Phase):
            self.phase, self.total, self.done = event.name, event.total, 0
        elif isinstance(event, File):
            self.file = event
        else:
            self.done += event
            if self.total is not None and self.done > self.total:
                self.total = self.done

    @property
    def label(self) -> str:
        """The phase, and which file when there are several: 'measuring, file 2 of 5'."""
        words = [self.phase or "working"]
        if self.phase == COPYING:
            words.append("(no value changes)")
        if self.file is not None and self.file.count > 1:
            words[-1] += ","
            words.append(f"file {self.file.number} of {self.file.count}")
        return " ".join(words)
