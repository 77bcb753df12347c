"""Progress of the passes, in bytes: the engine reports, whoever listens (the CLI) shows it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_listener: Callable[[int], None] | None = None


def advance(nbytes: int) -> None:
    """*nbytes* more of some pass are done."""
    if _listener is not None:
        _listener(nbytes)


@contextmanager
def listening(listener: Callable[[int], None] | None) -> Iterator[None]:
    """Call *listener*(nbytes) as work is done, while the block runs."""
    global _listener
    before, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = before


def relay(send: Callable[[int], None]) -> None:
    """Report to *send* instead (in a child process, whose parent owns the display), if
    anyone was listening."""
    global _listener
    if _listener is not None:
        _listener = send
