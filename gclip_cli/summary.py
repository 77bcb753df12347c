"""Plain-text lines for people that need no Rich (render.py has the tables): the commands that
print only these start without importing it."""

from __future__ import annotations

import math
import unicodedata

from .report import Report


def rescale_summary(report: Report) -> str:
    """Before and after, each labelled: users easily mistake the pre-clip norm for the result."""
    norm = norm_label(report.norm_type)
    verdict = "clipped" if report.clipped else "unchanged (copied as is)"
    if report.strategy != "global-norm":
        verdict = f"{report.strategy} {'applied' if report.clipped else verdict}"
    skipped = len(report.tensors) - len(report.counted)
    rows = [(f"global {norm} before", global_norm_text(report))]
    rows += _strategy_rows(report)
    rows += [
        (f"global {norm} after", number(report.global_norm_after)),
        ("tensors", f"{len(report.counted)} rewritten, {skipped} copied untouched"),
    ]
    width = max(len(label) for label, _ in rows) + 1
    lines = [f"{verdict}: {printable(report.path)} -> {printable(str(report.output))}"]
    lines += [f"  {label + ':':<{width}} {value}" for label, value in rows]
    return "\n".join(lines)


def has_groups_table(report: Report) -> bool:
    """Whether the report comes with a table of groups (render.print_groups)."""
    return report.strategy in ("per-tensor", "groups") and bool(report.groups)


def _strategy_rows(report: Report) -> list[tuple[str, str]]:
    if report.strategy == "clip-value":
        clamped = [t for t in report.counted if t.clamped]
        total = sum(t.clamped for t in clamped)
        return [
            ("max value", number(report.max_value)),
            ("values clamped", f"{total:,} in {len(clamped)} tensors"),
        ]
    if report.strategy == "normalize":
        return [
            ("target norm", number(report.target_norm)),
            ("scale factor", number(report.scale)),
        ]
    if report.strategy == "global-norm":
        return [("max norm", number(report.max_norm)), ("scale factor", number(report.scale))]
    scaled = sum(1 for g in report.groups if g.scale != 1.0)
    return [("groups clipped", f"{scaled} of {len(report.groups)}")]


def check_line(report: Report) -> str:
    """One line saying whether the global norm is within max_norm."""
    norm = f"global {norm_label(report.norm_type)} {global_norm_text(report)}"
    files = f" ({len(report.files)} files)" if len(report.files) > 1 else ""
    if report.nonfinite and report.nonfinite_policy == "error":
        return f"non-finite: {report.nonfinite:,} NaN/Inf values{files}"
    if report.clipped:
        return f"exceeds: {norm} > max norm {number(report.max_norm)}{files}"
    return f"ok: {norm} <= max norm {number(report.max_norm)}{files}"


def global_norm_text(report: Report) -> str:
    """The global norm as shown, saying so where it is inf only because float64 cannot hold it."""
    return number(report.global_norm) + (f" ({BEYOND_FLOAT64})" if report.beyond_float64 else "")


BEYOND_FLOAT64 = "beyond float64's range; the values are finite"


def norm_label(norm_type: float) -> str:
    if math.isinf(norm_type):
        return "inf-norm"
    return f"L{norm_type:g} norm"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def printable(name: str) -> str:
    """*name* with control characters shown as escapes, so it cannot move the cursor or recolour."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch).startswith("C")
        else ch
        for ch in name
    )
