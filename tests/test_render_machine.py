import json

from test_render_tables import sample_report

from gclip_cli.render.machine import as_json


def test_json_has_no_nan_and_marks_skipped_tensors():
    data = json.loads(as_json(sample_report()))
    assert data["global_norm"] is None and data["nonfinite"] == 1
    tensors = {t["name"]: t for t in data["tensors"]}
    assert tensors["bad"]["norm"] is None and tensors["bad"]["nan"] == 1
    assert tensors["step"]["skipped"] == "int64 is not a floating-point type"
    assert data["tensor_count"] == 2 and data["skipped_count"] == 1 and data["nbytes"] == 36
