import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SUFFIX, read_tensors

from gclip_cli.cli import main

# CLIPPING.md's worked examples: (gradients, c, expected result or None for unchanged)
WORKED_EXAMPLES = [
    ({"a": [3, 4], "b": [0, 0]}, 1.0, {"a": [0.6, 0.8], "b": [0, 0]}),
    ({"a": [0.3, 0.4], "b": [0, 0]}, 1.0, None),
    ({"a": [1, 2, 2], "b": [4, 0]}, 2.5, {"a": [0.5, 1, 1], "b": [2, 0]}),
]


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("grads", "c", "expected"), WORKED_EXAMPLES)
def test_worked_examples_of_clipping_md(make_file, fmt, tmp_path, dtype, grads, c, expected):
    src = make_file(fmt, {k: np.array(v, dtype=dtype) for k, v in grads.items()})
    out = tmp_path / f"out{SUFFIX[fmt]}"
    result = run("rescale", src, out, "--max-norm", c)
    assert result.exit_code == 0, result.stderr
    if expected is None:
        assert out.read_bytes() == src.read_bytes()
        return
    written = read_tensors(out, fmt)
    for name, values in expected.items():
        assert written[name].dtype == dtype
        assert written[name].tolist() == np.array(values, dtype=dtype).tolist()


def test_rescale_json_goes_to_stdout_and_nothing_else(make_file, fmt, tmp_path):
    src = make_file(fmt, {"a": np.array([3.0, 4.0]), "n": np.array([1, 2])})
    result = run("rescale", src, tmp_path / f"o{SUFFIX[fmt]}", "--max-norm", "1", "--json")
    assert result.exit_code == 0 and result.stderr == ""
    report = json.loads(result.stdout)
    assert report["global_norm"] == 5.0 and report["norm_type"] == 2.0
    assert report["max_norm"] == 1.0 and report["scale"] == 0.2 and report["clipped"] is True
    assert report["global_norm_after"] == pytest.approx(1.0, rel=1e-15)
    tensors = {t["name"]: t for t in report["tensors"]}
    assert tensors["a"] | {"norm": 5.0, "shape": [2], "numel": 2} == tensors["a"]
    assert tensors["n"]["skipped"] and tensors["n"]["norm"] is None


def test_rescale_human_summary_labels_before_and_after_on_stderr(make_file, tmp_path):
    src = make_file("npz", {"a": np.array([3.0, 4.0])})
    result = run("rescale", src, tmp_path / "o.npz", "--max-norm", "1")
    assert result.exit_code == 0 and result.stdout == ""
    assert "global L2 norm before: 5" in result.stderr
    assert "global L2 norm after:  1" in result.stderr
    assert "scale factor:          0.2" in result.stderr


def test_inspect_table_and_clip_factor(make_file, fmt):
    src = make_file(fmt, {"layer.0.w": np.array([3.0, 4.0], np.float32), "steps": np.array([7])})
    result = run("inspect", src, "--max-norm", "1")
    assert result.exit_code == 0 and result.stderr == ""
    for text in (
        "layer.0.w",
        "float32",
        "skipped",
        "global L2 norm: 5",
        "clip factor for max norm 1: 0.2 (would clip)",
    ):
        assert text in result.stdout


def test_inspect_json_with_other_norm_types(make_file):
    src = make_file("safetensors", {"a": np.array([3.0, -4.0]), "b": np.array([[12.0, -13.0]])})
    report = json.loads(run("inspect", src, "--json", "--norm-type", "inf").stdout)
    assert report["global_norm"] == 13.0 and report["norm_type"] == "inf"
    report = json.loads(run("inspect", src, "--json", "-p", "1").stdout)
    assert report["global_norm"] == 32.0


def test_names_are_shown_literally(make_file):
    src = make_file("npz", {"[bold red]x[/]\x1b[2J": np.array([1.0])})
    result = run("inspect", src, env={"COLUMNS": "200"})
    assert "[bold red]x[/]\\x1b[2J" in result.stdout
    assert "\x1b" not in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--max-norm", "0"],
        ["--max-norm", "-1"],
        ["--max-norm", "inf"],
        ["--max-norm", "nan"],
        ["--max-norm", "1", "--norm-type", "0"],
        ["--max-norm", "1", "--norm-type", "two"],
        ["--max-norm", "1", "--chunk-size", "0"],
        ["--max-norm", "1", "--eps", "-1"],
        [],
    ],
)
def test_usage_errors_exit_2(make_file, tmp_path, args):
    src = make_file("npz", {"a": np.array([3.0, 4.0])})
    result = run("rescale", src, tmp_path / "o.npz", *args)
    assert result.exit_code == 2
    assert "Error" in result.stderr and result.stdout == ""
    assert not (tmp_path / "o.npz").exists()


def test_bad_input_is_one_line_naming_the_file_exit_3(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a gradient dump")
    result = run("rescale", junk, tmp_path / "o.npz", "--max-norm", "1")
    assert result.exit_code == 3
    assert (
        result.stderr == f"gclip: error: {junk}: is not a safetensors, .npz or HDF5 file "
        "(unrecognised content)\n"
    )
    missing = run("inspect", tmp_path / "nope.h5")
    assert missing.exit_code == 3 and missing.stderr.startswith("gclip: error: ")
    assert "Traceback" not in missing.stderr


def test_nonfinite_input_exits_4_and_writes_nothing(make_file, tmp_path):
    src = make_file("safetensors", {"bad": np.array([1.0, np.nan]), "ok": np.array([1.0])})
    result = run("rescale", src, tmp_path / "o.safetensors", "--max-norm", "1")
    assert result.exit_code == 4
    assert "'bad' (1 NaN, 0 Inf)" in result.stderr
    assert list(tmp_path.iterdir()) == [src]


def test_output_problems_exit_5(make_file, tmp_path):
    src = make_file("npz", {"a": np.array([3.0, 4.0])})
    same = run("rescale", src, src, "--max-norm", "1")
    assert same.exit_code == 5 and "is the input file" in same.stderr
    nowhere = run("rescale", src, tmp_path / "no" / "such" / "o.npz", "--max-norm", "1")
    assert nowhere.exit_code == 5 and "does not exist" in nowhere.stderr
    into_dir = run("rescale", src, tmp_path, "--max-norm", "1")
    assert into_dir.exit_code == 5 and "is a directory" in into_dir.stderr


def test_help_lists_exit_codes_and_version():
    assert "Exit codes" in run("--help").stdout
    assert run("--version").stdout.startswith("gclip, version ")


# --- as a real process -------------------------------------------------------------------------


def test_python_dash_m_runs_the_cli(make_file, tmp_path):
    src = make_file("hdf5", {"a": np.array([3.0, 4.0], np.float32)})
    out = tmp_path / "out.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "gclip_cli", "rescale", src, out, "--max-norm", "1", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["clipped"] is True and proc.stderr == ""
    assert read_tensors(out, "hdf5")["a"].tolist() == [np.float32(0.6), np.float32(0.8)]


GCLIP = shutil.which("gclip", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(GCLIP is None, reason="the gclip console script is not installed")
def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [GCLIP, "inspect", tmp_path / "missing.npz"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 3
    assert proc.stderr == f"gclip: error: {tmp_path / 'missing.npz'}: no such file\n"
