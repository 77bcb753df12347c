"""Turning reports into output for people: Rich tables and their summaries (machine.py has the
formats for programs)."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from ..compare import Diff, TensorDiff
from ..history import History, log_sparkline, sparkline
from ..layer_history import LayerHistory, LayerSeries
from ..options import NonFinite
from ..reports import InspectReport, Report, RewriteReport, TensorReport
from ..views import PLAIN, View, layer_rows, tensor_rows
from ..watch import StepRecord, WatchSummary
from .fitted import BarCell, FittedTable
from .lines import global_norm_text, watch_notes, watch_summary
from .text import norm_label, number, printable

_BAR_WIDTH = 5


def print_inspect(report: InspectReport, console: Console, view: View = PLAIN) -> None:
    """The per-tensor (or per-layer) table, then the totals and the clip factor if asked."""
    table = _layer_table(report, view) if view.by_layer else _tensor_table(report, view)
    console.print(table)
    console.print(_summary(report))


def print_groups(report: RewriteReport, console: Console) -> None:
    """The groups of per-tensor or group clipping, each with its max norm, norm and factor."""
    table = _table(report, ["group", "tensors", "max norm", "norm", "scale factor"])
    for group in report.groups:
        table.add_row(
            Text(printable(group.name)),
            str(group.tensors),
            number(group.max_norm),
            number(group.norm),
            number(group.scale),
        )
    console.print(table)


def print_history(history: History, console: Console) -> None:
    nonfinite = history.nonfinite > 0
    headers = ["step", "from", "file", "global norm"] + (["NaN/Inf"] if nonfinite else [])
    table = _plain_table(f"global {norm_label(history.norm_type)} per step", headers)
    for step in history.steps:
        cells = [
            "-" if step.step is None else str(step.step),
            step.step_source or "-",
            Text(printable(step.file)),
            number(step.global_norm),
        ]
        table.add_row(*cells, *([f"{step.nonfinite:,}"] if nonfinite else []))
    console.print(table)
    norms = [s.global_norm for s in history.steps]
    marks = ", ".join(f"{k} {number(v)}" for k, v in history.percentiles.items())
    lines = [f"norms:   {sparkline(norms)}", f"percentiles: {marks or '-'}"]
    if history.max_norm is not None:
        lines.append(
            f"--max-norm {number(history.max_norm)} would clip {history.would_clip} of "
            f"{len(history.steps)} steps"
        )
    lines.append(
        f"suggested --max-norm (p{history.percentile:g}): {number(history.suggested_max_norm)}"
    )
    if nonfinite:
        lines.append(_nonfinite_line(history.nonfinite, history.nonfinite_policy))
    console.print(Text("\n".join(lines)))


def print_layer_history(history: LayerHistory, console: Console) -> None:
    """A row per layer, those anomalous first first: its norms as a sparkline on a log scale
    (anomalies in red), its first, last and largest norm and its first anomaly; then the
    run's first anomaly."""
    steps = [s.step for s in history.steps]
    headers = ["layer", "norms (log scale)", "first", "last", "max", "first anomaly", "norm"]
    table = _plain_table(
        f"{norm_label(history.norm_type)} per layer over {len(steps)} steps "
        f"({_step_label(steps[0])} to {_step_label(steps[-1])})",
        [*headers, "x median"],
    )
    for layer in history.by_first_anomaly():
        present = [n for n in layer.norms if n is not None]
        first = layer.first_anomaly
        table.add_row(
            Text(printable(layer.name)),
            _spiked_sparkline(layer),
            number(present[0]),
            number(present[-1]),
            number(max(present, key=_largest_known)),
            "-" if first is None else _step_label(first.step),
            "-" if first is None else number(first.norm),
            "-" if first is None else _times(first.ratio),
        )
    console.print(table)
    console.print(Text("\n".join(_layer_summary(history))))


def _spiked_sparkline(layer: LayerSeries) -> Text:
    line = Text(log_sparkline(layer.norms))
    for anomaly in layer.anomalies:
        line.stylize("bold red", anomaly.index, anomaly.index + 1)
    return line


def _largest_known(norm: float) -> float:
    """NaN counts as the largest: the norm to show is the one that broke."""
    return math.inf if math.isnan(norm) else norm


def _step_label(step: int | None) -> str:
    return "-" if step is None else str(step)


def _times(ratio: float) -> str:
    return "-" if math.isinf(ratio) else f"{ratio:.3g}x"


def _layer_summary(history: LayerHistory) -> list[str]:
    lines = [
        f"anomaly: a layer's norm above {history.spike:g}x the median of its earlier steps "
        "(from its 3rd step on), or NaN/Inf"
    ]
    first = history.first_anomaly
    if first is None:
        lines.append("first anomaly: none")
    else:
        baseline = "" if first.baseline is None else f" = {_times(first.ratio)} its median "
        baseline += "" if first.baseline is None else number(first.baseline)
        lines.append(
            f"first anomaly: {printable(first.layer)} at step {_step_label(first.step)}: "
            f"norm {number(first.norm)}{baseline}"
        )
    if history.nonfinite:
        lines.append(_nonfinite_line(history.nonfinite, history.nonfinite_policy))
    return lines


class WatchDisplay:
    """watch on a terminal: a table of the latest steps and the summary so far, redrawn in
    place as steps come (Rich Live; what is printed meanwhile, as skipped dumps on stderr,
    appears above it)."""

    def __init__(self, console: Console, folder: str) -> None:
        self._title = f"watching {printable(folder)}"
        self._rows: deque[StepRecord] = deque(maxlen=max(5, console.height - 8))
        self._live = Live(console=console, auto_refresh=False, transient=False)
        self._summary: WatchSummary | None = None

    def __enter__(self) -> WatchDisplay:
        self._live.start()
        self._live.update(Text(f"{self._title}: waiting for dumps"), refresh=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()

    def show(self, record: StepRecord, summary: WatchSummary) -> None:
        self._rows.append(record)
        self.finish(summary)

    def finish(self, summary: WatchSummary) -> None:
        """Show *summary* under the table (the last one stays on the screen)."""
        shown = Group(self._table(), Text(watch_summary(summary))) if self._rows else None
        self._live.update(shown or Text(watch_summary(summary)), refresh=True)

    def _table(self) -> FittedTable:
        table = _plain_table(self._title, ["step", "global norm", "p50", "p95", "file", "note"])
        for record in self._rows:
            marks = record.percentiles
            table.add_row(
                _step_label(record.step),
                number(record.global_norm),
                number(marks.get("p50")),
                number(marks.get("p95")),
                Text(printable(Path(record.file).name)),  # all in the folder of the title
                Text(watch_notes(record)),
                style="bold red" if record.over_max_norm or record.anomalies else None,
            )
        return table


def _nonfinite_line(count: int, policy: NonFinite) -> str:
    if policy is NonFinite.ERROR:
        return f"non-finite values: {count:,} (norms nan/inf; exit 4; see --nonfinite)"
    if policy is NonFinite.ZERO:
        return f"non-finite values: {count:,} (--nonfinite zero: counted as 0)"
    return f"non-finite values: {count:,} (--nonfinite keep: norms of the finite values)"


def print_diff(diff: Diff, console: Console) -> None:
    """A row per tensor (norms, B / A, cosine, how it compares), then what was covered: each
    file's own norm, the shared tensors' norms, the counts and the verdict."""
    table = _plain_table(
        f"{diff.file_a} (A) vs {diff.file_b} (B)",
        ["tensor", "norm A", "norm B", "B / A", "cosine", "note"],
    )
    for t in diff.tensors:
        table.add_row(
            Text(printable(t.name)),
            number(t.norm_a),
            number(t.norm_b),
            number(t.ratio),
            _cosine(t.cosine),
            Text(printable(_diff_note(t))),
            style=None if t.status in ("same", "differs") else "dim",
        )
    console.print(table)
    console.print(Text("\n".join(_diff_summary(diff))))


def _diff_note(t: TensorDiff) -> str:
    note = t.note or t.status
    if t.status == "not compared":
        note = f"not compared: {t.note}"
    return f"{note} (B: {t.name_b})" if t.name_b else note


def _diff_summary(diff: Diff) -> list[str]:
    counts = diff.counts
    lines = [
        f"global L2 norm: A {number(diff.global_norm_a)}, B {number(diff.global_norm_b)} "
        "(each over all its tensors counted)",
        f"shared {counts['shared']} tensors: A {number(diff.shared_norm_a)}, "
        f"B {number(diff.shared_norm_b)}; B / A {number(diff.ratio)}; "
        f"cosine {_cosine(diff.cosine)}",
        f"{counts['compared']} compared: {counts['same']} same, {counts['differ']} differ; "
        f"{counts['only_in_a']} only in A, {counts['only_in_b']} only in B, "
        f"{counts['not_compared']} not compared",
    ]
    if diff.nonfinite:
        lines.append(
            f"non-finite values: A {diff.nonfinite_a:,}, B {diff.nonfinite_b:,} "
            + _NONFINITE_DIFF[diff.nonfinite_policy]
        )
    verdict = (
        "A and B hold the same tensors with the same values" if diff.same else ("A and B differ")
    )
    if diff.rtol or diff.atol:
        verdict += f" (values compared with rtol {number(diff.rtol)}, atol {number(diff.atol)})"
    left = f" ({counts['not_compared']} not compared)" if counts["not_compared"] else ""
    lines.append(verdict + left)
    return lines


_NONFINITE_DIFF = {
    "error": "(norms nan/inf; exit 4; see --nonfinite)",
    "zero": "(--nonfinite zero: as 0)",
    "keep": "(--nonfinite keep: NaN matches NaN, Inf the same Inf)",
}


def _cosine(value: float | None) -> str:
    return "-" if value is None else f"{value:.9f}"


def _tensor_table(report: Report, view: View) -> FittedTable:
    several = len(report.files) > 1
    nonfinite = report.nonfinite > 0
    headers = [
        "file / tensor" if several else "tensor",
        "dtype",
        "shape",
        "values",
        "norm",
        "share",
        "max |x|",
    ] + (_NONFINITE_HEADERS if nonfinite else [])
    table = _table(report, headers)
    for t in tensor_rows(report, view):
        style = "dim" if t.skipped else ("bold red" if t.nonfinite else None)
        name = f"{t.file}: {t.name}" if several else t.name
        cells = [
            Text(printable(name)),
            t.dtype,
            "x".join(map(str, t.shape)) or "scalar",
            f"{t.numel:,}",
            "skipped" if t.skipped else number(t.norm),
            _share(t.share),
            "" if t.max_abs is None else number(t.max_abs),
        ]
        if nonfinite:
            cells += ["" for _ in _NONFINITE_HEADERS] if t.skipped else _nonfinite_cells(t)
        table.add_row(*cells, style=style)
    return table


_NONFINITE_HEADERS = ["NaN", "+Inf", "-Inf", "first NaN/Inf at"]


def _nonfinite_cells(t: TensorReport) -> list[str]:
    """Its NaN, +Inf and -Inf counts and the index of the first of them (C order)."""
    first = t.first_nonfinite
    at = "" if first is None else "[" + ", ".join(map(str, first)) + "]"
    return [f"{t.nan:,}", f"{t.posinf:,}", f"{t.neginf:,}", at]


def _layer_table(report: Report, view: View) -> FittedTable:
    nonfinite = report.nonfinite > 0
    headers = ["layer", "tensors", "values", "norm", "share"] + (["NaN/Inf"] if nonfinite else [])
    table = _table(report, headers)
    for layer in layer_rows(report, view):
        cells = [
            Text(printable(layer.name)),
            str(layer.tensors),
            f"{layer.numel:,}",
            number(layer.norm),
            _share(layer.share),
        ]
        table.add_row(*cells, *([f"{layer.nonfinite:,}"] if nonfinite else []))
    return table


def _table(report: Report, headers: list[str]) -> FittedTable:
    return _plain_table(f"{report.path} ({report.file_format})", headers)


def _plain_table(title: str, headers: list[str]) -> FittedTable:
    """A table whose rows stay one line each: on a narrow terminal its names are shortened in
    the middle, and its numbers are never cut (tables.FittedTable)."""
    return FittedTable(printable(title), headers)


def _share(share: float | None) -> Text | BarCell:
    """The share of the global norm (squared), with a bar so that the outlier stands out."""
    if share is None:
        return Text("")
    eighths = round(max(0.0, min(1.0, share)) * _BAR_WIDTH * 8)
    full, part = divmod(eighths, 8)
    bar = ("█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")).ljust(_BAR_WIDTH)
    return BarCell(Text(f"{share:6.1%}"), Text(f" {bar}", style="cyan"))


def _summary(report: Report) -> Text:
    skipped = len(report.tensors) - len(report.counted)
    files = f" in {len(report.files)} files" if len(report.files) > 1 else ""
    norm = global_norm_text(report) if report.counted else "- (no tensor counted)"
    lines = [
        f"global {norm_label(report.norm_type)}: {norm}",
        f"{len(report.counted)} tensors counted, {skipped} skipped{files}; "
        f"{report.total_numel:,} values; {_bytes(report.total_bytes)}",
    ]
    if report.nonfinite:
        if report.refuses_nonfinite:
            treatment = "rescale refuses this file; see --nonfinite"
        else:
            treatment = (
                f"--nonfinite {report.nonfinite_policy.value}: the norm counts finite values"
            )
        lines.append(f"non-finite values: {report.nonfinite:,} ({treatment})")
    if report.max_norm is not None:
        factor = "n/a (non-finite norm)" if report.scale is None else number(report.scale)
        verdict = "would clip" if report.clipped else "within max norm, would not clip"
        lines.append(f"clip factor for max norm {number(report.max_norm)}: {factor} ({verdict})")
    return Text("\n".join(lines))


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    exponent = min(3, int(math.log(n, 1024)))
    return f"{n / 1024**exponent:.2f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


__all__ = [
    "WatchDisplay",
    "print_diff",
    "print_groups",
    "print_history",
    "print_inspect",
    "print_layer_history",
]
