"""history --by-layer: the step x layer matrix of norms, each layer's anomalies (a norm above
K x the median of its own earlier steps, from its 3rd step on) and the run's first one."""

from __future__ import annotations

import json
import math
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FORMATS, SUFFIX, exact_norm, read_tensors, write_tensors

from gclip_cli import UsageError
from gclip_cli.api import layer_history_of
from gclip_cli.layer_history import spikes
from gclip_cli.options import Options
from gclip_cli.views import layer_of


def gclip(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


# Per layer, the factor its gradients are multiplied by at each step: "h.2" leaves its history
# at step 6 (by 30x), "h.1" at step 7 (by more: 80x), so the run's first anomaly is h.2's.
STEPS = 10
FACTORS = {
    "emb": [1.0] * STEPS,
    "h.0": [1.0] * STEPS,
    "h.1": [1.0] * 7 + [80.0] * 3,
    "h.2": [1.0] * 6 + [30.0] * 4,
    "head": [1.0] * STEPS,
}


def run_of(seed: int = 0, factors=FACTORS) -> list[dict[str, np.ndarray]]:
    """One dict of tensors per step: each layer holds a weight and a bias."""
    rng = np.random.default_rng(seed)
    steps = []
    for step in range(STEPS):
        tensors = {}
        for layer, factor in factors.items():
            scale = factor[step] * rng.uniform(0.8, 1.25)
            tensors[f"{layer}.weight"] = (rng.standard_normal((6, 4)) * scale).astype(np.float32)
            tensors[f"{layer}.bias"] = (rng.standard_normal(4) * scale).astype(np.float32)
        steps.append(tensors)
    return steps


def write_run(folder: Path, steps, fmt: str) -> Path:
    folder.mkdir()
    for step, tensors in enumerate(steps):
        write_tensors(folder / f"grads_step{step}{SUFFIX[fmt]}", fmt, tensors)
    return folder


def reference(folder: Path, fmt: str, spike: float = 4.0):
    """Each layer's exact norm at each step, read back by the format's library, and its
    anomalous steps by the rule, computed here on its own."""
    norms: dict[str, list[float]] = {}
    for step in range(STEPS):
        tensors = read_tensors(folder / f"grads_step{step}{SUFFIX[fmt]}", fmt)
        layers: dict[str, list[np.ndarray]] = {}
        for name, values in tensors.items():
            layers.setdefault(layer_of(name), []).append(values)
        for layer, arrays in layers.items():
            norms.setdefault(layer, []).append(exact_norm(arrays))
    anomalies = {
        layer: [i for i in range(2, STEPS) if series[i] > spike * statistics.median(series[:i])]
        for layer, series in norms.items()
    }
    return norms, anomalies


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_layer_that_leaves_its_history_first_is_found_at_its_step(fmt, tmp_path):
    folder = write_run(tmp_path / "run", run_of(), fmt)
    norms, anomalies = reference(folder, fmt)
    found = layer_history_of([folder])
    assert [s.step for s in found.steps] == list(range(STEPS))
    assert {layer.name: list(layer.norms) for layer in found.layers} == {
        name: pytest.approx(series, rel=1e-12) for name, series in norms.items()
    }
    assert {layer.name: [a.index for a in layer.anomalies] for layer in found.layers} == anomalies
    first = found.first_anomaly
    assert (first.layer, first.step) == ("h.2", 6) == (first.layer, anomalies["h.2"][0])
    assert first.norm == pytest.approx(norms["h.2"][6], rel=1e-12)
    assert first.baseline == pytest.approx(statistics.median(norms["h.2"][:6]), rel=1e-12)
    assert [layer.name for layer in found.by_first_anomaly()][:2] == ["h.2", "h.1"]


def test_shares_are_of_the_steps_sum_of_squares(tmp_path):
    folder = write_run(tmp_path / "run", run_of(seed=3), "npz")
    norms, _ = reference(folder, "npz")
    found = layer_history_of([folder])
    for layer in found.layers:
        for step, share in enumerate(layer.shares):
            total = math.fsum(series[step] ** 2 for series in norms.values())
            assert share == pytest.approx(norms[layer.name][step] ** 2 / total, rel=1e-9)


@pytest.mark.parametrize(
    ("norms", "spike", "found"),
    [
        ([1.0, 1.0, 4.0], 4.0, []),  # exactly K x the median: not above it
        ([1.0, 1.0, 4.000001], 4.0, [(2, 1.0)]),
        ([1.0, 100.0], 4.0, []),  # its 2nd step: no median of two yet
        ([1.0, None, 2.0, 6.0], 4.0, []),  # a step without the layer is skipped: median 1.5
        ([1.0, None, 2.0, 6.5], 4.0, [(3, 1.5)]),
        ([1.0, 3.0, 2.0, 9.0, 9.0], 4.0, [(3, 2.0)]),  # median of 1, 3, 2; then of 1, 3, 2, 9
        ([1.0, math.nan, 2.0], 4.0, [(1, None)]),  # NaN: at once, whatever the step
        ([1.0, 2.0, 3.0, math.inf, 1.0], 4.0, [(3, 2.0)]),
        ([0.0, 0.0, 1e-30], 4.0, [(2, 0.0)]),  # above 4 x 0
        ([1.0, 1.0, 2.5], 2.0, [(2, 1.0)]),
    ],
)
def test_the_rule(norms, spike, found):
    assert spikes(norms, spike) == found


def test_of_layers_at_one_step_the_one_furthest_above_its_median_is_first(tmp_path):
    # both at step 6, h.2 further (80x) than h.1 (20x): not the order of their names
    factors = dict(FACTORS) | {"h.1": [1.0] * 6 + [20.0] * 4, "h.2": [1.0] * 6 + [80.0] * 4}
    folder = write_run(tmp_path / "run", run_of(seed=1, factors=factors), "safetensors")
    norms, anomalies = reference(folder, "safetensors")
    assert anomalies["h.1"][0] == anomalies["h.2"][0] == 6
    ratio = {n: norms[n][6] / statistics.median(norms[n][:6]) for n in ("h.1", "h.2")}
    assert ratio["h.2"] > ratio["h.1"]
    found = layer_history_of([folder])
    assert found.first_anomaly.layer == "h.2"
    assert [layer.name for layer in found.by_first_anomaly()][:2] == ["h.2", "h.1"]


def test_depth_and_spike_change_layers_and_anomalies(tmp_path):
    folder = write_run(tmp_path / "run", run_of(seed=2), "hdf5")
    found = layer_history_of([folder], depth=1, spike=100.0)
    assert [layer.name for layer in found.layers] == ["emb", "h", "head"]
    _, anomalies = reference(folder, "hdf5", spike=100.0)
    assert not any(anomalies.values()) and found.first_anomaly is None
    with pytest.raises(UsageError):
        layer_history_of([folder], spike=0.0)


def test_the_cli_reports_it_in_every_format(tmp_path):
    folder = write_run(tmp_path / "run", run_of(seed=4), "safetensors")
    norms, anomalies = reference(folder, "safetensors")
    proc = gclip("history", folder, "--by-layer", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["steps"] == list(range(STEPS))
    for layer in data["layers"]:
        assert layer["norms"] == pytest.approx(norms[layer["name"]], rel=1e-12)
        first = anomalies[layer["name"]][0] if anomalies[layer["name"]] else None
        assert layer["first_anomaly_step"] == first
    first = data["first_anomaly"]
    assert (first["layer"], first["step"]) == ("h.2", anomalies["h.2"][0])
    assert first["baseline"] == pytest.approx(statistics.median(norms["h.2"][:6]), rel=1e-12)

    lines = gclip("history", folder, "--by-layer", "--format", "jsonl").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    cells = [r for r in records if r["kind"] == "layer_step"]
    assert len(cells) == STEPS * len(norms) and records[-1]["first_anomaly"] == first
    flagged = {(r["layer"], r["step"]) for r in cells if r["anomaly"]}
    assert flagged == {(layer, i) for layer, steps in anomalies.items() for i in steps}

    csv = gclip("history", folder, "--by-layer", "--format", "csv").stdout.splitlines()
    assert csv[0] == "step,file,layer,norm,share,anomaly" and len(csv) == 1 + len(cells)

    table = gclip("history", folder, "--by-layer").stdout
    rows = [
        line.split()[0] for line in table.splitlines()[3 : 3 + len(norms)]
    ]  # title, header, rule
    assert rows[:2] == ["h.2", "h.1"] and sorted(rows[2:]) == ["emb", "h.0", "head"]
    assert "first anomaly: h.2 at step 6" in table


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_draws_a_heatmap_png(tmp_path):
    folder = write_run(tmp_path / "run", run_of(seed=5), "npz")
    plot = tmp_path / "layers.png"
    proc = gclip("history", folder, "--by-layer", "--plot", plot)
    assert proc.returncode == 0, proc.stderr
    width, height = png_size(plot)
    assert 400 <= width <= 2000 and 200 <= height <= 2000 and plot.stat().st_size > 5000


def test_nan_is_an_anomaly_then_exit_4(tmp_path):
    steps = run_of(seed=6)
    steps[3]["h.0.bias"][1] = np.nan
    folder = write_run(tmp_path / "run", steps, "safetensors")
    proc = gclip("history", folder, "--by-layer", "--json")
    assert proc.returncode == 4
    data = json.loads(proc.stdout)
    earlier = [exact_norm([s["h.0.weight"], s["h.0.bias"]]) for s in steps[:3]]
    first = data["first_anomaly"]
    assert (first["layer"], first["step"], first["norm"]) == ("h.0", 3, None)
    assert first["baseline"] == pytest.approx(statistics.median(earlier), rel=1e-12)
    kept = layer_history_of([folder], options=Options(nonfinite="keep"))
    assert all(math.isfinite(n) for layer in kept.layers for n in layer.norms)


def test_options_that_do_not_go_together_are_usage_errors(tmp_path):
    run = write_run(tmp_path / "run", run_of(seed=7), "npz")
    for args in (["--spike", "3"], ["--depth", "1"], ["--by-layer", "--max-norm", "1"]):
        proc = gclip("history", run, *args)
        assert proc.returncode == 2, (args, proc.stderr)
    assert gclip("history", run, "--by-layer", "--spike", "-1").returncode == 2


def test_the_bundled_run_explodes_where_the_readme_says(tmp_path):
    """sample_data/run/: real LSTM gradients, a few hundred KB, whose first anomaly the rule
    finds from the values the safetensors library reads."""
    run = Path(__file__).resolve().parent.parent / "sample_data" / "run"
    files = sorted(run.glob("*.safetensors"))
    assert len(files) >= 10 and 100_000 < sum(f.stat().st_size for f in files) < 1_000_000
    norms: dict[str, list[float]] = {}
    for path in files:
        layers: dict[str, list[np.ndarray]] = {}
        for name, values in read_tensors(path, "safetensors").items():
            layers.setdefault(layer_of(name), []).append(values)
        for layer, arrays in layers.items():
            norms.setdefault(layer, []).append(exact_norm(arrays))
    firsts = {
        layer: next((i for i in range(2, len(s)) if s[i] > 4 * statistics.median(s[:i])), None)
        for layer, s in norms.items()
    }
    found = layer_history_of([run])
    assert {
        layer.name: layer.first_anomaly and layer.first_anomaly.index for layer in found.layers
    } == firsts
    step = min(i for i in firsts.values() if i is not None)
    first = found.first_anomaly
    assert first.index == step and firsts[first.layer] == step
