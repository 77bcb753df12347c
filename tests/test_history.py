"""history: each file's step (metadata, a step tensor, the name), the order, and NaN/Inf."""

import json
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SUFFIX, CoreOnly, exact_norm, write_tensors
from safetensors.numpy import save_file

from gclip_cli import UsageError
from gclip_cli.api import history_of
from gclip_cli.cli import main
from gclip_cli.formats import open_file
from gclip_cli.steps import FoundStep, step_in_name, step_of

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"


def exact(arrays: list[np.ndarray]):
    """The exact reference norm, to float64 rounding (gclip sums each block in float64)."""
    return pytest.approx(exact_norm(arrays), rel=1e-12)


def gclip(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("ckpt_1.h5", 1),
        ("ckpt_2.h5", 2),
        ("ckpt_10.h5", 10),
        ("lstm_grads_step12_bf16.safetensors", 12),
        ("grads_step_12.npz", 12),
        ("grads-step-12_fp16.npz", 12),
        ("run3_iter=5_v2.npz", 5),
        ("model_it7_v2.h5", 7),
        ("global_step12_part3.safetensors", 12),
        ("Step40.npz", 40),
        ("split3_part9.h5", 9),  # 'split3' is not 'it3': the stem's last number
        ("weights.h5", None),  # never the extension's 5
        ("grads.v3.npz", 3),
    ],
)
def test_step_in_name_reads_the_stem_only(name, step):
    assert step_in_name(name) == step


def write_safetensors(path: Path, values: list[float], metadata: dict[str, str] | None = None):
    save_file({"g": np.array(values, dtype=np.float32)}, str(path), metadata=metadata)
    return path


def write_hdf5(path: Path, values: list[float], attrs=(), datasets=()) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("g", data=np.array(values, dtype=np.float64))
        f.attrs.update(dict(attrs))
        for name, value in datasets:
            f.create_dataset(name, data=value)
    return path


def test_ckpt_1_2_10_are_steps_1_2_10_in_that_order(tmp_path):
    """The issue's case: all three were 'step 5' (from '.h5'), and the plot one point."""
    norms = {10: [6.0, 8.0], 1: [3.0, 4.0], 2: [0.5]}
    files = [write_hdf5(tmp_path / f"ckpt_{s}.h5", v) for s, v in norms.items()]
    history = history_of(files)
    assert [(s.step, s.step_source) for s in history.steps] == [
        (1, "name"),
        (2, "name"),
        (10, "name"),
    ]
    assert [s.file for s in history.steps] == [str(tmp_path / f"ckpt_{s}.h5") for s in (1, 2, 10)]
    assert [s.global_norm for s in history.steps] == [
        exact_norm([np.array(norms[s])]) for s in (1, 2, 10)
    ]


def test_step_in_metadata_comes_before_a_tensor_and_the_name(tmp_path):
    files = [
        # safetensors __metadata__ (strings only); the name would say 99
        write_safetensors(tmp_path / "ckpt_99.safetensors", [1.0], {"step": "7"}),
        # an HDF5 root attribute, an integer; the step dataset and the name say otherwise
        write_hdf5(
            tmp_path / "ckpt_98.h5", [2.0], {"global_step": np.int64(3)}, [("step", np.int64(97))]
        ),
        # an HDF5 root attribute as a string, as sample_data's
        write_hdf5(tmp_path / "ckpt_96.h5", [3.0], {"step": "5"}),
    ]
    history = history_of(files)
    assert [(s.step, s.step_source) for s in history.steps] == [
        (3, "metadata"),
        (5, "metadata"),
        (7, "metadata"),
    ]
    assert [Path(s.file).name for s in history.steps] == [
        "ckpt_98.h5",
        "ckpt_96.h5",
        "ckpt_99.safetensors",
    ]


def test_step_tensor_comes_before_the_name(tmp_path):
    npz = write_tensors(
        tmp_path / "grads_step50.npz", "npz", {"g": np.ones(3), "step": np.array(8, np.int32)}
    )
    h5 = write_hdf5(tmp_path / "grads_step40.h5", [1.0], datasets=[("global_step", np.uint64(9))])
    st = write_tensors(
        tmp_path / "grads_step30.safetensors",
        "safetensors",
        {"g": np.ones(2, np.float32), "step": np.array(10, np.int64)},
    )
    # a floating-point 'step' or one that is not 0-d is not a step: the name tells
    not_steps = write_tensors(
        tmp_path / "grads_step11.npz", "npz", {"g": np.ones(1), "step": np.array([2], np.int64)}
    )
    history = history_of([st, h5, npz, not_steps])
    assert [(s.step, s.step_source) for s in history.steps] == [
        (8, "tensor"),
        (9, "tensor"),
        (10, "tensor"),
        (11, "name"),
    ]


def test_a_format_without_metadata_or_whole_arrays_has_the_step_of_its_name(tmp_path):
    src = write_safetensors(tmp_path / "ckpt_5.safetensors", [1.0], {"step": "7"})
    with_step = write_tensors(
        tmp_path / "ckpt_6.safetensors", "safetensors", {"step": np.array(8, np.int64)}
    )
    with closing(open_file(src)) as tfile, closing(open_file(with_step)) as other:
        assert step_of(tfile) == FoundStep(7, "metadata")
        assert step_of(other) == FoundStep(8, "tensor")
        assert step_of(CoreOnly(tfile)) == FoundStep(5, "name")
        assert step_of(CoreOnly(other)) == FoundStep(6, "name")


@pytest.mark.parametrize(
    "sample",
    [
        "lstm_grads_step12.safetensors",  # __metadata__ step "12"
        "lstm_grads_step12_bf16.safetensors",  # ... and not 16 from "bf16"
        "lstm_grads_step12.h5",  # root attribute step "12"
        "lstm_grads_step12.npz",  # a 0-d int64 tensor step = 12
    ],
)
def test_sample_files_are_step_12(sample):
    source = "tensor" if sample.endswith(".npz") else "metadata"
    [step] = history_of([SAMPLES / sample]).steps
    assert (step.step, step.step_source) == (12, source)


def test_two_files_with_one_step_are_a_usage_error_naming_both(tmp_path):
    a = write_safetensors(tmp_path / "a.safetensors", [1.0], {"step": "4"})
    b = write_hdf5(tmp_path / "run_step4.h5", [2.0])
    c = write_hdf5(tmp_path / "c_1.h5", [3.0])
    with pytest.raises(UsageError, match="both hold step 4") as raised:
        history_of([c, a, b])
    assert str(a) in str(raised.value) and str(b) in str(raised.value)
    proc = gclip("history", c, a, b)
    assert proc.returncode == 2 and proc.stdout == ""
    assert str(a) in proc.stderr and str(b) in proc.stderr and "--as-given" in proc.stderr
    as_given = gclip("history", c, a, b, "--as-given", "--json")
    assert as_given.returncode == 0, as_given.stderr
    steps = json.loads(as_given.stdout)["steps"]
    assert [(s["file"], s["step"]) for s in steps] == [(str(c), 1), (str(a), 4), (str(b), 4)]


def test_a_file_without_a_step_is_an_error_unless_as_given(tmp_path):
    numbered = write_hdf5(tmp_path / "grads_3.h5", [1.0])
    plain = write_tensors(tmp_path / "grads.npz", "npz", {"g": np.array([2.0])})
    with pytest.raises(UsageError, match=r"no step found.*--as-given"):
        history_of([numbered, plain])
    proc = gclip("history", numbered, plain)
    assert proc.returncode == 2 and str(plain) in proc.stderr and "--as-given" in proc.stderr
    history = history_of([plain, numbered], as_given=True)
    assert [(s.step, s.step_source) for s in history.steps] == [(None, None), (3, "name")]


def test_as_given_keeps_the_command_line_order(tmp_path):
    files = [write_hdf5(tmp_path / f"s_{s}.h5", [float(s)]) for s in (3, 1, 2)]
    assert [s.step for s in history_of(files, as_given=True).steps] == [3, 1, 2]
    assert [s.step for s in history_of(files).steps] == [1, 2, 3]


def test_history_orders_steps_and_suggests_a_percentile(tmp_path):
    norms = {2: 5.0, 10: 80.0, 1: 3.0, 3: 4.0}
    files = [
        write_tensors(tmp_path / f"step_{s}.safetensors", "safetensors", {"g": np.array([n])})
        for s, n in norms.items()
    ]
    history = history_of(files, max_norm=10.0, percentile=50)
    assert [s.step for s in history.steps] == [1, 2, 3, 10]
    assert [s.global_norm for s in history.steps] == [3.0, 5.0, 4.0, 80.0]
    assert history.suggested_max_norm == float(np.percentile([3, 5, 4, 80], 50))
    assert history.percentiles["p95"] == pytest.approx(np.percentile([3, 5, 4, 80], 95))
    assert history.would_clip == 1
    result = CliRunner().invoke(main, ["history", *map(str, files), "--max-norm", "10"])
    assert result.exit_code == 0
    assert "▁▁▁█" in result.stdout and "would clip 1 of 4 steps" in result.stdout


def test_history_json_says_where_each_step_came_from(tmp_path):
    a = write_safetensors(tmp_path / "x_step8.safetensors", [1.0], {"global_step": "2"})
    b = write_hdf5(tmp_path / "x_step8.h5", [1.0])
    result = CliRunner().invoke(main, ["history", str(a), str(b), "--json"])
    assert result.exit_code == 0, result.stderr
    steps = json.loads(result.stdout)["steps"]
    assert [(s["step"], s["step_source"]) for s in steps] == [(2, "metadata"), (8, "name")]


def test_history_plot_is_drawn_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    files = [
        write_tensors(tmp_path / f"s{s}.npz", "npz", {"g": np.array([float(s)])}) for s in (1, 2, 3)
    ]
    result = CliRunner().invoke(
        main, ["history", *map(str, files), "--plot", str(tmp_path / "norms.png")]
    )
    assert result.exit_code == 0 and (tmp_path / "norms.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("how", ["a link", "the folder's file"])
def test_history_plot_onto_an_input_is_refused_before_any_work(tmp_path, how):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    files = [
        write_tensors(tmp_path / f"s{s}.npz", "npz", {"g": np.array([float(s)])}) for s in (1, 2)
    ]
    before = files[0].read_bytes()
    if how == "a link":
        plot, inputs = tmp_path / "norms.png", files
        plot.symlink_to(files[0])
    else:  # a dump whose name says png, read as one of the folder's files
        plot = files[0].rename(tmp_path / "s1.png")
        before, inputs = plot.read_bytes(), [tmp_path]
    result = gclip("history", *inputs, "--plot", plot)
    assert result.returncode == 5 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("gclip: error: --plot: is the input ")
    assert plot.read_bytes() == before


# --- NaN/Inf: the report, then exit 4 unless --nonfinite says how to count them ---------------


@pytest.fixture
def steps_with_nan(tmp_path, fmt) -> list[Path]:
    values = {1: [3.0, 4.0], 2: [np.nan, 1.0, -np.inf, 2.0], 3: [1.0]}
    return [
        write_tensors(tmp_path / f"g_{s}{SUFFIX[fmt]}", fmt, {"g": np.array(v)})
        for s, v in values.items()
    ]


def test_nonfinite_values_print_the_history_then_exit_4(steps_with_nan):
    proc = gclip("history", *steps_with_nan)
    assert proc.returncode == 4, proc.stderr
    assert "non-finite values: 2 (norms nan/inf; exit 4" in proc.stdout
    as_json = gclip("history", *steps_with_nan, "--json")
    assert as_json.returncode == 4
    steps = json.loads(as_json.stdout)["steps"]
    assert [s["global_norm"] for s in steps] == [5.0, None, 1.0]
    assert [s["nonfinite"] for s in steps] == [0, 2, 0]


@pytest.mark.parametrize("policy", ["zero", "keep"])
def test_nonfinite_zero_or_keep_count_the_finite_values_and_exit_0(steps_with_nan, policy):
    proc = gclip("history", *steps_with_nan, "--nonfinite", policy, "--json")
    assert proc.returncode == 0, proc.stderr
    history = json.loads(proc.stdout)
    assert [s["global_norm"] for s in history["steps"]] == [
        5.0,
        exact_norm([np.array([0.0, 1.0, 0.0, 2.0])]),
        1.0,
    ]
    assert history["nonfinite_policy"] == policy
    table = gclip("history", *steps_with_nan, "--nonfinite", policy)
    assert table.returncode == 0 and f"--nonfinite {policy}" in table.stdout
