"""Plain-text lines for people that need no Rich (tables.py has the tables): the commands that
print only these start without importing it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .text import BEYOND_FLOAT64, norm_label, number, printable

if TYPE_CHECKING:
    from ..reports import InspectReport, Report, RewriteReport
    from ..watch import Skipped, StepRecord, WatchSummary


def rescale_summary(report: RewriteReport) -> str:
    """Before and after, each labelled: users easily mistake the pre-clip norm for the result."""
    norm = norm_label(report.norm_type)
    strategy = report.strategy
    verdict = "clipped" if report.clipped else "unchanged (copied as is)"
    if strategy.name != "global-norm":
        verdict = f"{strategy.name} {'applied' if report.clipped else verdict}"
    skipped = len(report.tensors) - len(report.counted)
    rows = [(f"global {norm} before", global_norm_text(report))]
    rows += strategy.summary_rows(report)
    rows += [
        (f"global {norm} after", number(report.global_norm_after)),
        ("tensors", f"{len(report.counted)} rewritten, {skipped} copied untouched"),
    ]
    width = max(len(label) for label, _ in rows) + 1
    lines = [f"{verdict}: {printable(report.path)} -> {printable(str(report.output))}"]
    lines += [f"  {label + ':':<{width}} {value}" for label, value in rows]
    return "\n".join(lines)


def has_groups_table(report: RewriteReport) -> bool:
    """Whether the report comes with a table of groups (tables.print_groups)."""
    return report.strategy.groups_table and bool(report.groups)


def check_line(report: InspectReport) -> str:
    """One line saying whether the global norm is within max_norm."""
    norm = f"global {norm_label(report.norm_type)} {global_norm_text(report)}"
    files = f" ({len(report.files)} files)" if len(report.files) > 1 else ""
    if report.refuses_nonfinite:
        return f"non-finite: {report.nonfinite:,} NaN/Inf values{files}"
    if report.clipped:
        return f"exceeds: {norm} > max norm {number(report.max_norm)}{files}"
    return f"ok: {norm} <= max norm {number(report.max_norm)}{files}"


def global_norm_text(report: Report) -> str:
    """The global norm as shown, saying so where it is inf only because float64 cannot hold it."""
    return number(report.global_norm) + (f" ({BEYOND_FLOAT64})" if report.beyond_float64 else "")


WATCH_HEADER = f"{'step':>8}  {'global norm':>12}  {'p50':>10}  {'p95':>10}  file  notes"


def watch_line(record: StepRecord) -> str:
    """A step as watch prints it: its norm, the running median and p95, what stands out."""
    marks = record.percentiles
    step = "-" if record.step is None else str(record.step)
    return (
        f"{step:>8}  {number(record.global_norm):>12}  {number(marks.get('p50')):>10}  "
        f"{number(marks.get('p95')):>10}  {printable(record.file)}  {watch_notes(record)}"
    ).rstrip()


def watch_notes(record: StepRecord) -> str:
    """What stands out in a step: over --max-norm, its anomalous layers, NaN/Inf."""
    notes = []
    if record.over_max_norm:
        notes.append("over --max-norm")
    if record.anomalies:
        listed = ", ".join(
            printable(a.layer)
            + (f" ({a.ratio:.3g}x its median)" if math.isfinite(a.ratio) else f" ({a.norm})")
            for a in record.anomalies
        )
        notes.append(f"anomalous: {listed}")
    if record.nonfinite:
        notes.append(f"NaN/Inf: {record.nonfinite:,}")
    return "; ".join(notes)


def skipped_line(record: Skipped) -> str:
    return f"gclip: skipped: {printable(record.file)}: {record.reason}"


def watch_summary(summary: WatchSummary) -> str:
    marks = ", ".join(f"{k} {number(v)}" for k, v in summary.percentiles.items()) or "-"
    lines = [
        f"watched {summary.steps} steps, skipped {summary.skipped} dumps; percentiles: {marks}"
    ]
    if summary.max_norm is not None:
        first = summary.first_over
        at = "" if first is None else f" (first: step {first.step}, {printable(first.file)})"
        lines.append(
            f"over --max-norm {number(summary.max_norm)}: {summary.over_max_norm} steps{at}"
        )
    anomaly = summary.first_anomaly
    if anomaly is None:
        lines.append("first anomaly: none")
    else:
        lines.append(
            f"first anomaly: {printable(anomaly.layer)} at step {anomaly.step}: "
            f"norm {number(anomaly.norm)}, median before {number(anomaly.baseline)}"
        )
    return "\n".join(lines)
