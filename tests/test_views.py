import math

import pytest

from gclip_cli.report import Report, TensorReport
from gclip_cli.views import View, by_layer, layer_of, natural_key, sort_tensors


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


def test_sort_and_top():
    r = report(("b", 1.0, 10), ("a", 3.0, 1), ("c", 2.0, 5))
    assert [t.name for t in sort_tensors(r, "norm", 2)] == ["a", "c"]
    assert [t.name for t in sort_tensors(r, "name", None)] == ["a", "b", "c"]
    assert [t.name for t in sort_tensors(r, "size", 1)] == ["b"]
    assert [t.name for t in sort_tensors(r, None, None)] == ["b", "a", "c"]
    assert View().sort is None
