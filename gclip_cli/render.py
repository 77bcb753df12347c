"""Turning reports into text: a Rich table for people, JSON for programs."""

from __future__ import annotations

import json
import math
import unicodedata

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .report import Report


def report_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, allow_nan=False)


def print_inspect(report: Report, console: Console) -> None:
    """The per-tensor table, then the totals and (with --max-norm) the factor rescale would use."""
    console.print(_tensor_table(report))
    console.print(_summary(report))


def print_rescale(report: Report, console: Console) -> None:
    """Before and after, each labelled: users easily mistake the pre-clip norm for the result."""
    norm = _norm_label(report.norm_type)
    verdict = "clipped" if report.clipped else "unchanged (within max norm, copied as is)"
    skipped = len(report.tensors) - len(report.counted)
    rows = [
        (f"global {norm} before", _number(report.global_norm)),
        ("max norm", _number(report.max_norm)),
        ("scale factor", _number(report.scale)),
        (f"global {norm} after", _number(report.global_norm_after)),
        ("tensors", f"{len(report.counted)} scaled, {skipped} copied untouched"),
    ]
    width = max(len(label) for label, _ in rows) + 1
    lines = [f"{verdict}: {report.path} -> {report.output}"]
    lines += [f"  {label + ':':<{width}} {value}" for label, value in rows]
    console.print(Text("\n".join(lines)))


def _tensor_table(report: Report) -> Table:
    table = Table(title=Text(f"{report.path} ({report.file_format})"), title_justify="left")
    for header in ("tensor", "dtype", "shape"):
        table.add_column(header, overflow="fold")
    for header in ("values", "norm", "share", "max |x|", "non-finite"):
        table.add_column(header, justify="right")
    for t in report.tensors:
        style = "dim" if t.skipped else ("bold red" if t.nonfinite else None)
        table.add_row(
            Text(printable(t.name)),
            t.dtype,
            "x".join(map(str, t.shape)) or "scalar",
            f"{t.numel:,}",
            "skipped" if t.skipped else _number(t.norm),
            "" if t.share is None else f"{t.share:.1%}",
            "" if t.max_abs is None else _number(t.max_abs),
            "" if t.skipped else f"{t.nonfinite:,}",
            style=style,
        )
    return table


def _summary(report: Report) -> Text:
    skipped = len(report.tensors) - len(report.counted)
    lines = [
        f"global {_norm_label(report.norm_type)}: {_number(report.global_norm)}",
        f"{len(report.counted)} tensors counted, {skipped} skipped; "
        f"{report.total_numel:,} values; {_bytes(report.total_bytes)}",
    ]
    if report.nonfinite:
        if report.nonfinite_policy == "error":
            treatment = "rescale refuses this file; see --nonfinite"
        else:
            treatment = f"--nonfinite {report.nonfinite_policy}: the norm counts finite values"
        lines.append(f"non-finite values: {report.nonfinite:,} ({treatment})")
    if report.max_norm is not None:
        factor = "n/a (non-finite norm)" if report.scale is None else _number(report.scale)
        verdict = "would clip" if report.clipped else "within max norm, would not clip"
        lines.append(f"clip factor for max norm {_number(report.max_norm)}: {factor} ({verdict})")
    return Text("\n".join(lines))


def printable(name: str) -> str:
    """*name* with control characters shown as escapes, so it cannot move the cursor or recolour."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch).startswith("C")
        else ch
        for ch in name
    )


def _norm_label(norm_type: float) -> str:
    if math.isinf(norm_type):
        return "inf-norm"
    return f"L{norm_type:g} norm"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    exponent = min(3, int(math.log(n, 1024)))
    return f"{n / 1024**exponent:.2f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"
