"""Reports for programs: JSON, JSON Lines and CSV (without Rich, which loads slowly and
would wrap or colour them).  JSON is always written with the json module."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict

from .report import SCHEMA_VERSION, Report
from .views import LayerReport, View, layer_rows, tensor_rows

OUTPUT_FORMATS = ("table", "json", "jsonl", "csv")
PLAIN = View()


def report_json(report: Report, view: View = PLAIN) -> str:
    """The report as one object: its tensors as the view orders and cuts them; with --by-layer,
    its layers so, and every tensor in file order."""
    data = report.to_dict()
    if view.by_layer:
        data["layers"] = [_layer_dict(layer) for layer in layer_rows(report, view)]
    else:
        data["tensors"] = [report.tensor_dict(t) for t in tensor_rows(report, view)]
    return json.dumps(data, indent=2, allow_nan=False)


def report_jsonl(report: Report, view: View = PLAIN) -> str:
    """One record a line: every tensor (or layer), then a summary."""
    if view.by_layer:
        rows = [{"kind": "layer", **_layer_dict(layer)} for layer in layer_rows(report, view)]
    else:
        rows = [{"kind": "tensor", **report.tensor_dict(t)} for t in tensor_rows(report, view)]
    summary = {k: v for k, v in report.to_dict().items() if k != "tensors"}
    rows.append({"kind": "summary", **summary})
    return "\n".join(json.dumps(row, allow_nan=False) for row in rows)


def report_csv(report: Report, view: View = PLAIN) -> str:
    buffer = io.StringIO()
    if view.by_layer:
        rows = [_layer_dict(layer) for layer in layer_rows(report, view)]
        fields = list(asdict(LayerReport("", 0, 0, None, None)))
    else:
        rows = [report.tensor_dict(t) for t in tensor_rows(report, view)]
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
