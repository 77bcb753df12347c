"""The progress display on stderr: a progress.Tally drawn by Rich as events arrive.

Drawn from the events themselves, not by Rich's refresh thread: gclip forks children while
the display runs, and a fork copies any lock a thread holds at that moment.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .progress import Event, File, Phase, Tally

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import ProgressColumn

REDRAW_EVERY = 0.1  # seconds between redraws (Rich's own default rate)


class ProgressDisplay:
    """Phase, percentage, done of total, throughput and time left, from *delay* seconds
    after it was made; counts bytes, or with *unit* "shards" whole files."""

    def __init__(self, console: Console, *, unit: str = "bytes", delay: float = 1.0) -> None:
        from rich.progress import Progress

        self.tally = Tally()
        self._bar = Progress(
            *_columns(unit),
            console=console,
            transient=True,
            auto_refresh=False,
            redirect_stdout=False,  # stdout is data: never through the display
        )
        self._task = self._bar.add_task("", total=None)
        self._show_from = time.monotonic() + delay
        self._drawn = 0.0

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.stop()  # draws the last state, then clears it (transient)

    def __call__(self, event: Event) -> None:
        """Take in *event* (a progress.Listener)."""
        self.tally(event)
        tally = self.tally
        if isinstance(event, Phase):  # a new clock and speed for each phase (redrawn if shown)
            self._bar.reset(self._task, total=tally.total, description=tally.label)
        else:
            self._bar.update(
                self._task, total=tally.total, completed=tally.done, description=tally.label
            )
        if not isinstance(event, File):  # the phase that follows it shows it
            self._draw()

    def shards(self, phase: str, done: int, total: int) -> None:
        """*done* of *total* shards of *phase* are done (the callback of api.rescale_files)."""
        if phase != self.tally.phase:
            self(Phase(phase, total))
        if done > self.tally.done:
            self(done - self.tally.done)

    @property
    def shown(self) -> tuple[float, float | None]:
        """(done, total) as the bar holds them."""
        task = self._bar.tasks[0]
        return task.completed, task.total

    def _draw(self) -> None:
        now = time.monotonic()
        if not self._bar.live.is_started:
            if now >= self._show_from:
                self._bar.start()
                self._drawn = now
        elif now - self._drawn >= REDRAW_EVERY:
            self._bar.refresh()
            self._drawn = now


def _columns(unit: str) -> list[ProgressColumn | str]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    head = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    if unit == "shards":
        return [*head, MofNCompleteColumn(), TextColumn("shards"), TimeRemainingColumn()]
    return [*head, DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
