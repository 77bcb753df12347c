import csv
import io
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from gclip_cli.errors import UsageError
from gclip_cli.reports import InspectReport as Report
from gclip_cli.reports import TensorReport
from gclip_cli.views import (
    LayerReport,
    View,
    by_layer,
    layer_of,
    natural_key,
    sort_layers,
    sort_tensors,
)


@pytest.mark.parametrize(
    ("name", "depth", "layer"),
    [
        ("encoder.layer.5.attention.self.query.weight", None, "encoder.layer.5"),
        ("h.3.mlp.c_fc.bias", None, "h.3"),
        ("model/h/12/attn/c_attn/kernel", None, "model/h/12"),
        ("wte.weight", None, "wte"),
        ("lm_head", None, "lm_head"),
        ("encoder.layer.5.attention.self.query.weight", 2, "encoder.layer"),
        ("h.3.mlp.c_fc.bias", 3, "h.3.mlp"),
        ("a.b", 9, "a.b"),
    ],
)
def test_layer_of(name, depth, layer):
    assert layer_of(name, depth) == layer


def test_numbers_sort_as_numbers():
    assert sorted(["h.10", "h.2", "h.1"], key=natural_key) == ["h.1", "h.2", "h.10"]


def report(*tensors: tuple[str, float, int]) -> Report:
    total = math.sqrt(sum(n * n for _, n, _ in tensors))
    rows = tuple(
        TensorReport(
            name,
            "float32",
            (size,),
            size,
            4 * size,
            None,
            norm=n,
            share=(n / total) ** 2,
            file=f"f{i % 2}",
        )
        for i, (name, n, size) in enumerate(tensors)
    )
    return Report("x", "npz", 2.0, total, rows)


def test_by_layer_combines_norms_and_shares_in_natural_order():
    r = report(("h.10.w", 3.0, 5), ("h.2.w", 1.0, 2), ("h.2.b", 2.0, 1), ("wte", 4.0, 9))
    layers = by_layer(r)
    assert [layer.name for layer in layers] == ["h.2", "h.10", "wte"]
    h2 = layers[0]
    assert (h2.tensors, h2.numel) == (2, 3)
    assert h2.norm == pytest.approx(math.sqrt(5))
    assert h2.share == pytest.approx(5 / 30)
    assert sum(layer.share for layer in layers) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("p", "norms", "expected"),
    [
        (2.0, [1.5e308, 1.5e308], math.inf),  # beyond float64: inf, not OverflowError
        (1e-5, [3.0, 4.0], math.inf),  # (3**p + 4**p) ** (1/p) is about 2**100000
        (1e-5, [3.0, 0.0], 3.0),
        (1075.0, [4.0, 2.0], 4.0),  # 2**1075 and 4**1075 overflow; their ratio does not
        (1e300, [4.0, 4.0], 4.0),
        (0.5, [1e-300, 4e-300], 9e-300),
    ],
)
def test_layer_norms_combine_for_any_p_without_overflow(p, norms, expected):
    rows = tuple(
        TensorReport(f"h.0.t{i}", "float64", (1,), 1, 8, None, norm=n, share=None)
        for i, n in enumerate(norms)
    )
    (layer,) = by_layer(Report("x", "npz", p, math.inf, rows))
    assert layer.norm == pytest.approx(expected, rel=1e-15)


def test_sort_and_top():
    r = report(("b", 1.0, 10), ("a", 3.0, 1), ("c", 2.0, 5))
    assert [t.name for t in sort_tensors(r, "norm", 2)] == ["a", "c"]
    assert [t.name for t in sort_tensors(r, "name", None)] == ["a", "b", "c"]
    assert [t.name for t in sort_tensors(r, "size", 1)] == ["b"]
    assert [t.name for t in sort_tensors(r, None, None)] == ["b", "a", "c"]
    assert View().sort is None


# --- --by-layer with --sort and --top ----------------------------------------------------------


def layer(name: str, norm: float | None, numel: int) -> LayerReport:
    return LayerReport(name, 1, numel, norm, None)


def test_layers_sort_like_tensors_unknown_norms_last_ties_in_their_order():
    layers = [
        layer("h.2", math.nan, 5),
        layer("h.10", 3.0, 9),
        layer("wte", None, 9),
        layer("h.1", 3.0, 1),
        layer("h.0", 7.0, 2),
    ]
    names = lambda rows: [row.name for row in rows]  # noqa: E731
    assert names(sort_layers(layers, "norm", None)) == ["h.0", "h.10", "h.1", "h.2", "wte"]
    assert names(sort_layers(layers, "size", 3)) == ["h.10", "wte", "h.2"]
    assert names(sort_layers(layers, "name", 2)) == ["h.0", "h.1"]
    assert names(sort_layers(layers, None, 1)) == ["h.2"]


def test_sorting_layers_by_file_is_a_usage_error():
    with pytest.raises(UsageError, match="--sort file has no meaning with --by-layer"):
        View(sort="file", by_layer=True)
    with pytest.raises(UsageError):
        sort_layers([], "file", None)
    assert View(sort="file").sort == "file"


def layered_tensors() -> dict[str, np.ndarray]:
    """Twelve layers of two tensors, each layer of its own size and scale, and an embedding."""
    rng = np.random.default_rng(7)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((6, 4)).astype(np.float32)}
    for i in range(12):
        scale, rows = (i * 7919) % 13 + 1, (i * 5) % 7 + 1
        for part in ("q_proj", "k_proj"):
            values = rng.standard_normal((rows, 3)) * scale
            tensors[f"model.layers.{i}.self_attn.{part}.weight"] = values.astype(np.float32)
    return tensors


def expected_layers(tensors: dict[str, np.ndarray]) -> dict[str, tuple[float, int]]:
    """Each layer's L2 norm (fsum of the squares of its values) and size, computed here."""
    members: dict[str, list[np.ndarray]] = {}
    for name, values in tensors.items():
        match = re.match(r"model\.layers\.\d+", name)
        members.setdefault(match[0] if match else "model", []).append(values)
    return {
        name: (
            math.sqrt(math.fsum(float(v) ** 2 for a in arrays for v in a.astype(np.float64).flat)),
            sum(a.size for a in arrays),
        )
        for name, arrays in members.items()
    }


def gclip(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("sort", "top", "order"),
    [
        ("norm", 4, lambda norm, size, name: -norm),
        ("size", 3, lambda norm, size, name: -size),
        ("name", 5, lambda norm, size, name: tuple(map(int, re.findall(r"\d+", name)))),
        (None, 13, lambda norm, size, name: tuple(map(int, re.findall(r"\d+", name)))),
    ],
)
def test_by_layer_honours_sort_and_top_in_every_format(make_file, sort, top, order):
    tensors = layered_tensors()
    src = make_file("safetensors", tensors)
    layers = expected_layers(tensors)
    ranked = sorted(layers, key=lambda name: order(*layers[name], name))[:top]
    assert len(set(ranked)) == top
    args = ("inspect", src, "--by-layer", "--top", top, *(("--sort", sort) if sort else ()))

    table = gclip(*args)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line) == {"─"})
    rows = [line.split() for line in lines[rule + 1 : rule + 1 + top + 1]]
    assert [(row[0], row[3]) for row in rows[:top]] == [
        (name, f"{layers[name][0]:.6g}") for name in ranked
    ]
    assert rows[top][0] == "global"  # the summary follows: only the top rows are shown

    data = json.loads(gclip(*args, "--format", "json").stdout)
    assert [row["name"] for row in data["layers"]] == ranked
    for row in data["layers"]:
        assert row["norm"] == pytest.approx(layers[row["name"]][0], rel=1e-12)
        assert row["numel"] == layers[row["name"]][1]
    plain = json.loads(gclip("inspect", src, "--format", "json").stdout)
    assert data["tensors"] == plain["tensors"]  # every tensor, in file order

    records = [json.loads(line) for line in gclip(*args, "--format", "jsonl").stdout.splitlines()]
    assert [r["name"] for r in records if r["kind"] == "layer"] == ranked
    assert records[-1]["kind"] == "summary"

    rows = list(csv.DictReader(io.StringIO(gclip(*args, "--format", "csv").stdout)))
    assert [row["name"] for row in rows] == ranked
    assert [float(row["norm"]) for row in rows] == pytest.approx(
        [layers[name][0] for name in ranked], rel=1e-12
    )


def test_by_layer_refuses_sort_file_before_reading(tmp_path):
    proc = gclip("inspect", tmp_path / "absent.safetensors", "--by-layer", "--sort", "file")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--sort file has no meaning with --by-layer" in proc.stderr
