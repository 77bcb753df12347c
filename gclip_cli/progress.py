"""Progress of the passes: the engine reports events, whoever listens (the CLI) shows them.

Events: a Phase begins (with the bytes it will read or write, known before it starts), ints
are bytes of it done, a File says which of several inputs is being read.  Work reports them
to the Progress it is given; children relay theirs to the parent process (isolation.py), which
owns the display.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

MEASURING = "measuring"  # pass 1: reading the gradient tensors' values
WRITING = "writing"  # pass 2: writing them transformed
COPYING = "copying"  # no value changes: the output is a byte copy of the input
SENDING = "sending"  # an output staged in a temporary file, copied into its upload's stream


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


@dataclass(frozen=True, eq=False)
class Progress:
    """Where work reports how far it got: each event goes to *listener* (None: nowhere).

    Handed explicitly to whatever does the work (the passes, the formats' pieces, the
    workers); a forked child gets one that sends to its parent (isolation.Channel).
    """

    listener: Listener | None = None

    @property
    def listening(self) -> bool:
        """Whether events go anywhere (children relay theirs only then)."""
        return self.listener is not None

    def advance(self, nbytes: int) -> None:
        """*nbytes* more of the current phase are done."""
        if self.listener is not None:
            self.listener(nbytes)

    def begin(self, name: str, total: int) -> None:
        """Phase *name* begins; it will read or write *total* bytes."""
        if self.listener is not None:
            self.listener(Phase(name, total))

    def forward(self, event: Event) -> None:
        """Pass on an event that arrived from a child process."""
        if self.listener is not None:
            self.listener(event)

    def each_file(self, files: Iterable[T]) -> Iterator[T]:
        """*files* one by one, telling the listener which of how many is next."""
        files = list(files)
        for number, file in enumerate(files, 1):
            self.forward(File(number, len(files)))
            yield file


SILENT = Progress()  # reports to nobody (the default where no one listens)


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
