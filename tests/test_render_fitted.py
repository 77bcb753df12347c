import fcntl
import io
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest
from rich.text import Text

from gclip_cli.render.fitted import (
    ELLIPSIS,
    MIN_NAME_WIDTH,
    BarCell,
    FittedTable,
    TableConsole,
    shorten_middle,
)

# Environment of a child gclip: no width or colour settings inherited from the test's own.
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TERM")
}


def long_name(layer: int, part: str) -> str:
    """A Hugging Face name as PEFT wraps it: over 60 characters."""
    return f"base_model.model.model.layers.{layer}.self_attn.{part}_proj.lora_A.weight"


def long_named_tensors() -> dict[str, np.ndarray]:
    """Six tensors in the order --sort name shows them (numbers compare as numbers)."""
    rng = np.random.default_rng(19)
    return {
        long_name(layer, part): (rng.standard_normal((4, 3)) * 0.03).astype(np.float32)
        for layer in (1, 2, 12)
        for part in ("k", "q")
    }


def expected_cells(values: np.ndarray) -> dict[str, str]:
    """The table's cells for *values*, from numbers computed here (fsum of the squares)."""
    flat = [float(v) for v in values.astype(np.float64).ravel()]
    return {
        "dtype": str(values.dtype),
        "shape": "x".join(map(str, values.shape)),
        "values": f"{values.size:,}",
        "norm": f"{math.sqrt(math.fsum(v * v for v in flat)):.6g}",
        "max |x|": f"{max(abs(v) for v in flat):.6g}",
    }


def row_cells(line: str) -> dict[str, str]:
    """A tensor row's cells (the share, with or without its bar, sits before max |x|)."""
    name, dtype, shape, values, norm, *_, max_abs = line.split()
    return {
        "name": name,
        "dtype": dtype,
        "shape": shape,
        "values": values,
        "norm": norm,
        "max |x|": max_abs,
    }


def gclip(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=CLEAN_ENV | (env or {}),
        stdin=subprocess.DEVNULL,
    )


def on_terminal(columns: int, *args) -> str:
    """What gclip prints to a terminal *columns* wide (a pseudo-terminal of that size)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gclip_cli", "--color", "never", *map(str, args)],
        stdin=subprocess.DEVNULL,  # Rich would take a terminal's size from stdin first
        stdout=slave,
        stderr=subprocess.PIPE,
        env=CLEAN_ENV | {"TERM": "xterm"},
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    stderr = proc.communicate()[1]
    assert proc.returncode == 0, stderr
    return b"".join(chunks).decode().replace("\r\n", "\n")


def shortened_from(shown: str, name: str) -> bool:
    """Whether *shown* is *name* cut in its middle: its start, an ellipsis, its end."""
    head, ellipsis, tail = shown.partition(ELLIPSIS)
    return bool(ellipsis) and name.startswith(head) and name.endswith(tail) and head and tail


# --- off a terminal ----------------------------------------------------------------------------


def test_off_a_terminal_each_tensor_is_one_line_with_every_number_whole(make_file):
    tensors = long_named_tensors()
    src = make_file("safetensors", tensors)
    proc = gclip("inspect", src, env={"COLUMNS": "40"})  # a pipe has no width, whatever COLUMNS
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, values in tensors.items():
        rows = [line for line in lines if name in line]
        assert len(rows) == 1, name
        assert row_cells(rows[0]) == {"name": name} | expected_cells(values)
    global_norm = math.sqrt(
        math.fsum(float(v) ** 2 for a in tensors.values() for v in a.astype(np.float64).ravel())
    )
    assert f"global L2 norm: {global_norm:.6g}" in lines


def test_colour_forced_on_a_pipe_keeps_the_pipe_unlimited(make_file):
    tensors = long_named_tensors()
    proc = gclip("--color", "always", "inspect", make_file("npz", tensors), env={"COLUMNS": "40"})
    assert "\x1b[" in proc.stdout
    lines = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout).splitlines()
    for name, values in tensors.items():
        rows = [line for line in lines if name in line]
        assert len(rows) == 1 and row_cells(rows[0]) == {"name": name} | expected_cells(values)


def test_off_a_terminal_history_diff_and_group_tables_keep_rows_whole(make_file, tmp_path):
    tensors = long_named_tensors()
    src = make_file("safetensors", tensors)
    steps = [
        make_file("npz", {"g": np.array([3.0 * s, 4.0 * s])}, f"run_{'x' * 70}_step{s}")
        for s in (1, 2)
    ]
    history = gclip("history", *steps, env={"COLUMNS": "40"})
    assert history.returncode == 0, history.stderr
    for s, path in enumerate(steps, 1):
        rows = [line for line in history.stdout.splitlines() if str(path) in line]
        assert len(rows) == 1 and f"{5 * s:.6g}" in rows[0].split()

    clipped = tmp_path / "clipped.safetensors"
    rescale = gclip("rescale", src, clipped, "--group", f"{long_name(1, 'q')}=0.01")
    diff = gclip("diff", src, clipped, env={"COLUMNS": "40"})
    assert rescale.returncode == 0, rescale.stderr
    group_rows = [line for line in rescale.stderr.splitlines() if long_name(1, "q") in line]
    assert len(group_rows) == 1
    assert expected_cells(tensors[long_name(1, "q")])["norm"] in group_rows[0].split()
    for name, values in tensors.items():
        rows = [line for line in diff.stdout.splitlines() if name in line]
        assert len(rows) == 1 and rows[0].split()[1] == expected_cells(values)["norm"]


# --- on a terminal -----------------------------------------------------------------------------


def table_rows(text: str, names: list[str]) -> list[str]:
    """The table's rows: the lines after the header's rule, one per name."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line) == {"─"}) + 1
    return lines[start : start + len(names)]


def test_a_70_column_terminal_shortens_names_in_the_middle_and_keeps_numbers(make_file):
    tensors = long_named_tensors()
    text = on_terminal(70, "inspect", make_file("safetensors", tensors), "--sort", "name")
    rows = table_rows(text, list(tensors))
    for row, (name, values) in zip(rows, tensors.items(), strict=True):
        assert len(row) <= 70
        cells = row_cells(row)
        assert shortened_from(cells.pop("name"), name)
        assert cells == expected_cells(values)
    assert max(len(line) for line in text.splitlines()) <= 70


def test_a_60_column_terminal_gets_names_of_the_minimum_width_and_whole_numbers(make_file):
    """The tensor table needs more than 60 columns even with the shortest names: it is printed
    wider rather than cut."""
    tensors = long_named_tensors()
    text = on_terminal(60, "inspect", make_file("safetensors", tensors), "--sort", "name")
    rows = table_rows(text, list(tensors))
    for row, (name, values) in zip(rows, tensors.items(), strict=True):
        cells = row_cells(row)
        shown = cells.pop("name")
        assert len(shown) == MIN_NAME_WIDTH and shortened_from(shown, name)
        assert cells == expected_cells(values)
    summary = text.splitlines()[-2:]
    assert all(len(line) <= 60 for line in summary)  # the summary fits: it wraps between words


def test_a_60_column_terminal_fits_the_layer_table(make_file):
    """With --depth 9 each layer is a whole long name; five columns fit in 60."""
    tensors = long_named_tensors()
    src = make_file("safetensors", tensors)
    text = on_terminal(60, "inspect", src, "--by-layer", "--depth", 9)
    assert max(len(line) for line in text.splitlines()) == 60
    rows = table_rows(text, list(tensors))
    for row, name in zip(rows, tensors, strict=True):
        shown, count, values, norm, *_ = row.split()
        assert shortened_from(shown, name) and count == "1"
        assert (values, norm) == (f"{tensors[name].size:,}", expected_cells(tensors[name])["norm"])


# --- the layout rules --------------------------------------------------------------------------


def render(table: FittedTable, width: int) -> list[str]:
    buffer = io.StringIO()
    TableConsole(file=buffer, width=width, color_system=None).print(table)
    return buffer.getvalue().splitlines()


def numbers_table(name: str) -> FittedTable:
    table = FittedTable("title", ["tensor", "norm", "share"])
    table.add_row(Text(name), "0.0679419", BarCell(Text(" 55.3%"), Text(" ██▊  ")))
    table.add_row(Text("b"), "12345.6", BarCell(Text("  2.1%"), Text(" ▏    ")))
    return table


def test_a_table_that_fits_is_left_as_it_is():
    lines = render(numbers_table("a" * 30), 80)
    assert lines[3].split() == ["a" * 30, "0.0679419", "55.3%", "██▊"]


def test_bars_go_before_names_are_shortened():
    lines = render(numbers_table("a" * 30), 50)
    assert lines[3].split() == ["a" * 30, "0.0679419", "55.3%"]
    assert max(map(len, lines)) <= 50


def test_names_give_way_just_enough_then_the_table_grows_past_the_console():
    lines = render(numbers_table("abcdefghij" * 3), 40)
    name, norm, share = lines[3].split()
    assert (norm, share) == ("0.0679419", "55.3%")
    assert max(map(len, lines)) == 40 and shortened_from(name, "abcdefghij" * 3)
    lines = render(numbers_table("abcdefghij" * 3), 20)
    name, norm, share = lines[3].split()
    assert (len(name), norm, share) == (MIN_NAME_WIDTH, "0.0679419", "55.3%")
    assert max(map(len, lines[1:])) > 20  # wider than the console, never cropped


@pytest.mark.parametrize("width", [2, 5, 12, 13, 38])
def test_shorten_middle_keeps_both_ends_within_the_width(width):
    name = "model.layers.12.self_attn.q_proj.weight"
    short = shorten_middle(name, width)
    assert len(short) == width and short.count(ELLIPSIS) == 1
    head, _, tail = short.partition(ELLIPSIS)
    assert name.startswith(head) and name.endswith(tail) and len(tail) - len(head) in (0, 1)


def test_shorten_middle_leaves_what_fits():
    name = "model.layers.12.self_attn.q_proj.weight"
    assert shorten_middle(name, len(name)) == shorten_middle(name, 80) == name


def test_shorten_middle_counts_wide_characters_by_their_cells():
    assert shorten_middle("層" * 10, 7) == "層…層層"  # 2 + 1 + 4 cells
