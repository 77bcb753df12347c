"""Reports for programs: JSON, JSON Lines and CSV (without Rich, which loads slowly and
would wrap or colour them).  JSON is always written with the json module."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict

from .report import SCHEMA_VERSION, Report
from .views import LayerReport, View, by_layer, sort_tensors

OUTPUT_FORMATS = ("table", "json", "jsonl", "csv")
PLAIN = View()


def report_json(report: Report, view: View = PLAIN) -> str:
    data = report.to_dict()
    data["tensors"] = [report.tensor_dict(t) for t in sort_tensors(report, view.sort, view.top)]
    if view.by_layer:
        data["layers"] = [_layer_dict(layer) for layer in by_layer(report, view.depth)]
    return json.dumps(data, indent=2, allow_nan=False)


def report_jsonl(report: Report, view: View = PLAIN) -> str:
    """One record a line: every tensor (or layer), then a summary."""
    if view.by_layer:
        rows = [{"kind": "layer", **_layer_dict(layer)} for layer in by_layer(report, view.depth)]
    else:
        rows = [
            {"kind": "tensor", **report.tensor_dict(t)}
            for t in sort_tensors(report, view.sort, view.top)
        ]
    summary = {k: v for k, v in report.to_dict().items() if k != "tensors"}
    rows.append({"kind": "summary", **summary})
    return "\n".join(json.dumps(row, allow_nan=False) for row in rows)


def report_csv(report: Report, view: View = PLAIN) -> str:
    buffer = io.StringIO()
    if view.by_layer:
        rows = [_layer_dict(layer) for layer in by_layer(report, view.depth)]
        fields = list(asdict(LayerReport("", 0, 0, None, None)))
    else:
        rows = [report.tensor_dict(t) for t in sort_tensors(report, view.sort, view.top)]
        for row in rows:
            row["shape"] = "x".join(map(str, row["shape"]))
        fields = list(rows[0]) if rows else ["file", "name"]
    writer = csv.DictWriter(buffer, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().rstrip("\n")


def _layer_dict(layer: LayerReport) -> dict:
    return asdict(layer) | {"norm": _json_number(layer.norm)}


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


__all__ = ["OUTPUT_FORMATS", "SCHEMA_VERSION", "report_csv", "report_json", "report_jsonl"]
