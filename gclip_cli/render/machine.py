"""Reports for programs: JSON, JSON Lines and CSV, the same way for every kind of report (without
Rich, which loads slowly and would wrap or colour them).  JSON is always written with the json
module; JSON has no NaN, so non-finite numbers are null.

A report gives ``to_dict(view)``, its one JSON object, and ``rows(view)``: the kind of its rows
("tensor", "layer", "step") and the rows as dicts.  JSON Lines is a record per row, then one
``{"kind": "summary", ...}`` (the object without its lists); CSV is a header and a row each.
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..views import View

OUTPUT_FORMATS = ("table", "json", "jsonl", "csv")


class MachineReport(Protocol):
    def to_dict(self, view: View | None = None) -> dict: ...

    def rows(self, view: View | None = None) -> tuple[str, list[dict]]: ...


def as_json(report: MachineReport, view: View | None = None) -> str:
    return json.dumps(report.to_dict(view), indent=2, allow_nan=False)


def as_jsonl(report: MachineReport, view: View | None = None) -> str:
    """One record a line: every row, then a summary (the report without its lists)."""
    kind, rows = report.rows(view)
    whole = report.to_dict(view)
    summary = {k: v for k, v in whole.items() if not isinstance(v, list) or k in _SUMMARY_LISTS}
    records = [{"kind": kind, **row} for row in rows] + [{"kind": "summary", **summary}]
    return "\n".join(json.dumps(record, allow_nan=False) for record in records)


# lists that are part of a summary, not rows: which files were read, which were not, groups
_SUMMARY_LISTS = frozenset({"files", "not_read", "groups"})


def as_csv(report: MachineReport, view: View | None = None) -> str:
    """A header and one line per row; lists (a tensor's shape, a step's index) joined by x."""
    _, rows = report.rows(view)
    flat = [{k: _cell(v) for k, v in row.items()} for row in rows]
    fields = list(flat[0]) if flat else ["name"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue().rstrip("\n")


def _cell(value: object) -> object:
    if isinstance(value, list):
        return "x".join(map(str, value))
    return value


def json_line(record: dict) -> str:
    """One record of a stream (watch) as a line of JSON."""
    return json.dumps(record, allow_nan=False)


RENDERERS = {"json": as_json, "jsonl": as_jsonl, "csv": as_csv}


def render(report: MachineReport, output_format: str, view: View | None = None) -> str:
    """The report as *output_format* (json, jsonl or csv)."""
    return RENDERERS[output_format](report, view)
