"""Tables for people that never break a name or cut a number.

Rich fits a table to its console by folding names over several lines and, when that is not
enough, by cutting every column, numbers included.  A FittedTable instead keeps each row on one
line at its natural width.  When that is wider than the console (a narrow terminal) it leaves
out the bars beside numbers, then shortens the names in the middle, just enough to fit.
Numbers, dtypes and shapes stay whole: if names shortened to MIN_NAME_WIDTH still do not fit,
the table is printed wider than the terminal (TableConsole does not crop).  Off a terminal the
console has no width (cli._console), so every row is one line that grep can find.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.style import StyleType
from rich.table import Table
from rich.text import Text

UNLIMITED_WIDTH = sys.maxsize  # the console width off a terminal: no line is ever wrapped
MIN_NAME_WIDTH = 12  # names are not shortened below this (or their header) to fit a terminal
ELLIPSIS = "…"

# The column that gives way on a narrow terminal: the first with one of these headers.
NAME_HEADERS = ("tensor", "file / tensor", "layer", "group", "file")
_LEFT_HEADERS = ("dtype", "shape", "file", "note")  # besides the first column; numbers go right


class TableConsole(Console):
    """A console that never crops a line at its width: FittedTable chooses its own width, and
    is wider than the terminal only when nothing else keeps every number whole."""

    def print(self, *objects: Any, crop: bool = False, **options: Any) -> None:
        super().print(*objects, crop=crop, **options)

    def on_broken_pipe(self) -> None:
        """A closed output is a BrokenPipeError, which the CLI reports as 141 like every
        closed pipe (Rich's own reaction is to exit with 1)."""
        raise BrokenPipeError


@dataclass(frozen=True)
class BarCell:
    """A number with a bar after it, which is left out when the table is too wide."""

    number: Text
    bar: Text


Cell = RenderableType | BarCell


class FittedTable:
    """A table of names and numbers, laid out when printed (see the module's docstring)."""

    def __init__(self, title: str, headers: Sequence[str]) -> None:
        self.title = title
        self.headers = list(headers)
        self.rows: list[tuple[tuple[Cell, ...], StyleType | None]] = []
        self.name_column = next((i for i, h in enumerate(headers) if h in NAME_HEADERS), None)

    def add_row(self, *cells: Cell, style: StyleType | None = None) -> None:
        self.rows.append((cells, style))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table, width = self._fitted(console, options)
        yield Text(self.title, style="table.title")
        yield from console.render(table, options.update_width(max(width, options.max_width)))

    def _fitted(self, console: Console, options: ConsoleOptions) -> tuple[Table, int]:
        """The first layout that fits *options*' width, and its width: as it is, without bars,
        then with names shortened (this last one even if it does not fit)."""
        table = self._table(bars=True)
        if options.max_width >= UNLIMITED_WIDTH:  # off a terminal: nothing to fit, no measuring
            return table, options.max_width
        width = _natural_width(console, options, table)
        if width > options.max_width:
            table = self._table(bars=False)
            width = _natural_width(console, options, table)
        if width > options.max_width and self.name_column is not None:
            name_width = self._name_width(excess=width - options.max_width)
            table = self._table(bars=False, name_width=name_width)
            width = _natural_width(console, options, table)
        return table, width

    def _name_width(self, excess: int) -> int:
        """The width of the name column once *excess* cells are taken from it, within limits."""
        names = [_plain(cells[self.name_column]) for cells, _ in self.rows]
        header = cell_len(self.headers[self.name_column])
        widest = max([header, *(cell_len(name) for name in names)])
        return min(widest, max(widest - excess, MIN_NAME_WIDTH, header))

    def _table(self, bars: bool, name_width: int | None = None) -> Table:
        """The Rich table, with or without *bars*, its names shortened to *name_width* cells if
        given."""
        table = Table(
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            collapse_padding=True,
        )
        for i, header in enumerate(self.headers):
            left = i == 0 or header in _LEFT_HEADERS
            table.add_column(header, justify="left" if left else "right", no_wrap=True)
        for cells, style in self.rows:
            if name_width is not None:
                name = _shortened(cells[self.name_column], name_width)
                cells = _with_cell(cells, self.name_column, name)
            table.add_row(*(_with_bar(cell, bars) for cell in cells), style=style)
        return table


def shorten_middle(text: str, width: int) -> str:
    """*text* in at most *width* cells: its start and its end around an ellipsis."""
    if cell_len(text) <= width:
        return text
    room = max(0, width - cell_len(ELLIPSIS))
    head = _longest_start(text, room // 2)
    tail = _longest_start(text[::-1], room - cell_len(head))[::-1]
    return f"{head}{ELLIPSIS}{tail}"


def _longest_start(text: str, width: int) -> str:
    """The longest start of *text* that takes at most *width* cells."""
    used = 0
    for i, char in enumerate(text):
        used += cell_len(char)
        if used > width:
            return text[:i]
    return text


def _natural_width(console: Console, options: ConsoleOptions, table: Table) -> int:
    """The width of *table* with every column as wide as its widest cell."""
    return Measurement.get(console, options.update_width(UNLIMITED_WIDTH), table).maximum


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def _with_bar(cell: Cell, bar: bool) -> RenderableType:
    if not isinstance(cell, BarCell):
        return cell
    return Text.assemble(cell.number, cell.bar) if bar else cell.number


def _shortened(cell: Cell, width: int) -> Cell:
    if isinstance(cell, Text):
        return Text(shorten_middle(cell.plain, width), style=cell.style)
    return shorten_middle(cell, width) if isinstance(cell, str) else cell


def _with_cell(cells: tuple[Cell, ...], index: int, cell: Cell) -> tuple[Cell, ...]:
    return (*cells[:index], cell, *cells[index + 1 :])
