import math

from gclip_cli.render.lines import check_line, has_groups_table, rescale_summary
from gclip_cli.render.text import printable
from gclip_cli.reports import InspectReport, RewriteReport, TensorReport
from gclip_cli.strategies import ClipValue, GlobalNorm, GroupReport, Groups

TENSORS = (
    TensorReport("w", "float32", (2, 3), 6, 24, None, norm=3.0, max_abs=2.0, share=0.36),
    TensorReport("step", "int64", (), 1, 8, "int64 is not a floating-point type"),
)
FIELDS = dict(path="g.npz", file_format="npz", norm_type=2.0, global_norm=5.0, tensors=TENSORS)


def sample_report(**overrides) -> InspectReport:
    return InspectReport(**(FIELDS | overrides))


def rewrite_report(**overrides) -> RewriteReport:
    fields = dict(strategy=GlobalNorm(max_norm=1.0), output="o.npz", global_norm_after=1.0)
    return RewriteReport(**(FIELDS | fields | overrides))


def test_rescale_summary_labels_before_and_after():
    report = rewrite_report(scale=0.2, clipped=True)
    assert rescale_summary(report).splitlines() == [
        "clipped: g.npz -> o.npz",
        "  global L2 norm before: 5",
        "  max norm:              1",
        "  scale factor:          0.2",
        "  global L2 norm after:  1",
        "  tensors:               1 rewritten, 1 copied untouched",
    ]


def test_rescale_summary_keeps_long_paths_on_one_line():
    long = "/data/" + "x" * 150 + ".safetensors"
    report = rewrite_report(path=long, output=long + ".out", scale=1.0)
    first = rescale_summary(report).splitlines()[0]
    assert first == f"unchanged (copied as is): {long} -> {long}.out"


def test_rescale_summary_escapes_control_characters_in_paths():
    report = rewrite_report(path="a\x1b[2Jb.npz", output="o\rut.npz", scale=1.0)
    first = rescale_summary(report).splitlines()[0]
    assert first == "unchanged (copied as is): a\\x1b[2Jb.npz -> o\\rut.npz"


def test_clip_value_summary_counts_the_values_clamped():
    tensors = (
        TensorReport("a", "float32", (4,), 4, 16, None, norm=3.0, max_abs=2.0, clamped=3),
        TensorReport("b", "float32", (4,), 4, 16, None, norm=1.0, max_abs=0.5, clamped=0),
    )
    report = rewrite_report(tensors=tensors, strategy=ClipValue(max_value=0.5), clipped=True)
    lines = rescale_summary(report).splitlines()
    assert lines[0] == "clip-value applied: g.npz -> o.npz"
    assert "  values clamped:        3 in 1 tensors" in lines


def test_only_per_tensor_and_group_clipping_come_with_a_table():
    groups = (GroupReport("a.*", 1.0, 4.0, 0.25, 1),)
    by_groups = Groups(groups=(("a.*", 1.0),))
    assert has_groups_table(rewrite_report(strategy=by_groups, groups=groups))
    assert not has_groups_table(rewrite_report(strategy=by_groups))
    assert not has_groups_table(rewrite_report(groups=groups))


def test_check_line_says_within_exceeds_or_nonfinite():
    assert check_line(sample_report(max_norm=6.0)) == "ok: global L2 norm 5 <= max norm 6"
    over = sample_report(max_norm=1.0, clipped=True, files=("a", "b"))
    assert check_line(over) == "exceeds: global L2 norm 5 > max norm 1 (2 files)"
    with_nan = TensorReport("w", "float32", (4,), 4, 16, None, norm=math.nan, nan=2, posinf=1)
    bad = sample_report(global_norm=math.nan, tensors=(with_nan,), nonfinite_policy="error")
    assert check_line(bad) == "non-finite: 3 NaN/Inf values"


def test_printable_escapes_control_characters_only():
    assert printable("layer.0/w") == "layer.0/w"
    assert printable("a\x1b[31mb\nc\u200bd") == "a\\x1b[31mb\\nc\\u200bd"
    assert printable("gewicht_ä") == "gewicht_ä"
