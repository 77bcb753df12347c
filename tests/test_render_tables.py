import io
import math

from rich.console import Console

from gclip_cli.render.tables import print_groups, print_inspect
from gclip_cli.reports import InspectReport, RewriteReport, TensorReport
from gclip_cli.strategies import GroupReport, Groups


def sample_report(**overrides) -> InspectReport:
    tensors = (
        TensorReport("w", "float32", (2, 3), 6, 24, None, norm=3.0, max_abs=2.0, share=0.36),
        TensorReport(
            "bad", "float16", (2,), 2, 4, None, norm=math.nan, max_abs=1.0, nan=1, share=None
        ),
        TensorReport("step", "int64", (), 1, 8, "int64 is not a floating-point type"),
    )
    fields = dict(
        path="g.npz", file_format="npz", norm_type=2.0, global_norm=math.nan, tensors=tensors
    )
    kind = RewriteReport if "strategy" in overrides else InspectReport
    return kind(**(fields | overrides))


def render(function, report) -> str:
    buffer = io.StringIO()
    function(report, Console(file=buffer, width=120, color_system=None))
    return buffer.getvalue()


def test_inspect_table_shows_nonfinite_and_skipped_rows():
    text = render(print_inspect, sample_report())
    assert "skipped" in text and "2x3" in text and "scalar" in text
    assert "non-finite values: 1 (rescale refuses this file; see --nonfinite)" in text


def test_groups_table_has_a_row_per_group():
    groups = (GroupReport("a.*", 1.0, 4.0, 0.25, 2), GroupReport("(the rest)", None, 0.5, 1.0, 1))
    report = sample_report(
        global_norm=5.0,
        clipped=True,
        output="o.npz",
        global_norm_after=1.1,
        strategy=Groups(groups=(("a.*", 1.0),)),
        groups=groups,
    )
    lines = render(print_groups, report).splitlines()
    assert lines[0].split() == ["g.npz", "(npz)"]
    assert lines[1].split() == ["group", "tensors", "max", "norm", "norm", "scale", "factor"]
    rows = [line.split() for line in lines if line.startswith(("a.*", "(the rest)"))]
    assert rows == [["a.*", "2", "1", "4", "0.25"], ["(the", "rest)", "1", "-", "0.5", "1"]]
