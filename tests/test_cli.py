import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SUFFIX, exactly_scaled, read_tensors, write_tensors
from test_norms import reference_norm

from gclip_cli.cli import main
from gclip_cli.norms import measure

# worked examples of global-norm clipping: (gradients, c, expected result or None for unchanged)
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
        result.stderr == f"gclip: error: {junk}: is not a safetensors, .npz, HDF5 or PyTorch file "
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


@pytest.mark.parametrize(("args", "status"), [(["norm"], 0), (["rescale"], 2), (["norm", "-"], 3)])
def test_the_quick_exit_keeps_exit_handlers_output_and_status(make_file, args, status):
    """entry_point skips the interpreter's teardown, not what a normal exit does."""
    src = make_file("npz", {"a": np.array([3.0, 4.0], np.float32)})
    code = (
        "import atexit, sys\n"
        "from gclip_cli import cli\n"
        "command = cli.main.main\n"
        "def main_registering_a_handler(*args, **kwargs):\n"
        "    atexit.register(print, 'handler ran', file=sys.stderr)\n"
        "    command(*args, **kwargs)\n"
        "cli.main.main = main_registering_a_handler\n"
        "print('buffered', end='')\n"
        "cli.entry_point()\n"
    )
    argv = [*args, src] if args != ["norm", "-"] else args
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)], input=b"", capture_output=True, env=buffered
    )
    assert proc.returncode == status, proc.stderr
    assert proc.stdout.startswith(b"buffered")
    assert proc.stderr.decode().endswith("handler ran\n")
    if status == 0:
        assert float(proc.stdout.removeprefix(b"buffered")) == 5.0


def stderr_on_a_terminal(*args, env: dict[str, str]) -> tuple[int, str]:
    """Run gclip with a pseudo-terminal as its stderr: (exit status, what it wrote there)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        env={**os.environ, **env},
    )
    os.close(terminal)
    written = b""
    try:
        while select.select([controller], [], [], 60)[0]:  # a bound, should it hang
            try:
                data = os.read(controller, 1 << 16)
            except OSError:  # Linux: EIO once the process has closed its end
                break
            if not data:
                break
            written += data
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(), written.decode()


def test_rescale_on_a_terminal_shows_each_phase_with_its_percentage(make_file, tmp_path):
    src = make_file("hdf5", {"w": np.full(3000, 2.0, np.float32), "n": np.arange(5)})
    at_once = {"GCLIP_PROGRESS_DELAY": "0", "TERM": "xterm", "NO_COLOR": "1"}
    status, shown = stderr_on_a_terminal(
        "rescale", src, tmp_path / "out.h5", "--max-norm", "1", env=at_once
    )
    assert status == 0, shown
    measuring, writing = shown.find("measuring"), shown.find("writing")
    assert 0 <= measuring < writing  # each phase drawn as it begins, in order
    assert "100%" in shown[writing:]  # the last state, drawn as the display closes
    assert "12.0/12.0 kB" in shown[writing:]  # 3000 float32 values: 12,000 bytes
    assert "clipped: " in shown  # the summary follows


def test_rescale_out_dir_on_a_terminal_counts_shards_in_each_phase(tmp_path):
    shards = tmp_path / "ckpt"
    shards.mkdir()
    for n in (1, 2):
        write_tensors(shards / f"model-{n}.safetensors", "safetensors", {"w": np.ones(9) * n})
    at_once = {"GCLIP_PROGRESS_DELAY": "0", "TERM": "xterm", "NO_COLOR": "1"}
    status, shown = stderr_on_a_terminal(
        "rescale", shards, "--out-dir", tmp_path / "out", "--max-norm", "1", env=at_once
    )
    assert status == 0, shown
    measuring, writing = shown.find("measuring"), shown.find("writing")
    assert 0 <= measuring < writing
    assert "100% 2/2 shards" in shown[writing:]


GCLIP = shutil.which("gclip", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(GCLIP is None, reason="the gclip console script is not installed")
def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [GCLIP, "inspect", tmp_path / "missing.npz"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 3
    assert proc.stderr == f"gclip: error: {tmp_path / 'missing.npz'}: no such file\n"


# --- faults, as real processes -----------------------------------------------------------------


def gclip_process(*args, limit_file_size: int | None = None, **popen) -> subprocess.Popen:
    def limit() -> None:  # writes past the limit fail with EFBIG, as on a full disk
        import resource
        import signal as sig

        sig.signal(sig.SIGXFSZ, sig.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.Popen(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit if limit_file_size else None,
        **popen,
    )


def big_tensors(megabytes: int) -> dict[str, np.ndarray]:
    values = np.random.default_rng(2).standard_normal(megabytes << 18).astype(np.float32)
    return {"w": values, "n": np.arange(4)}


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".gclip-tmp"))


def test_disk_full_while_writing_leaves_nothing_behind(make_file, fmt, tmp_path):
    src = make_file(fmt, big_tensors(2))
    before = src.read_bytes()
    out = tmp_path / f"out{SUFFIX[fmt]}"
    proc = gclip_process("rescale", src, out, "--max-norm", "1", limit_file_size=1 << 20)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 5, stderr
    assert stderr.startswith(f"gclip: error: {out}: cannot write") and stderr.count("\n") == 1
    assert not out.exists() and leftovers(tmp_path) == []
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("npz", ["--chunk-size", "1M"]), ("safetensors", ["-j", "2"])],  # one process; workers
)
def test_sigterm_during_a_write_leaves_no_output(make_file, tmp_path, fmt, options):
    src = make_file(fmt, big_tensors(160))
    out = tmp_path / f"out{SUFFIX[fmt]}"
    # in a session of its own, so that its worker processes can be found afterwards
    proc = gclip_process("rescale", src, out, "--max-norm", "1", *options, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.stat().st_size for p in tmp_path.glob("*.gclip-tmp")):
            break  # pass 2 is writing
        time.sleep(0.005)
    proc.terminate()
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the machine finished the rescale before the signal arrived")
    assert proc.returncode == 143 and stderr == "gclip: terminated\n", stderr
    assert not out.exists() and leftovers(tmp_path) == []
    assert not processes_in_group(proc.pid, wait=10)


def processes_in_group(group: int, wait: float = 0) -> list[int]:
    """The live processes of process group *group*, once none is left or *wait* seconds have
    passed (a worker's own children die with it, a moment later)."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(entry.path, "stat").read_text()
                except OSError:
                    continue
                state, _, pgrp = stat.rpartition(")")[2].split()[:3]
                if int(pgrp) == group and state != "Z":  # a zombie is dead, not yet reaped
                    found.append(int(entry.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_two_writers_of_one_output_end_with_one_complete_file(make_file, fmt, tmp_path):
    src = make_file(fmt, big_tensors(8))
    out = tmp_path / f"out{SUFFIX[fmt]}"
    procs = [gclip_process("rescale", src, out, "--max-norm", "1") for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    reference = tmp_path / f"reference{SUFFIX[fmt]}"
    run("rescale", src, reference, "--max-norm", "1")
    if fmt != "hdf5":  # HDF5 files carry timestamps of their own
        assert out.read_bytes() == reference.read_bytes()
    np.testing.assert_array_equal(read_tensors(out, fmt)["w"], read_tensors(reference, fmt)["w"])
    assert leftovers(tmp_path) == []


def test_no_clobber_keeps_an_existing_output(make_file, tmp_path):
    src = make_file("safetensors", {"a": np.array([3.0, 4.0])})
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    result = run("rescale", src, out, "--max-norm", "1", "--no-clobber")
    assert result.exit_code == 5 and "exists and --no-clobber was given" in result.stderr
    assert out.read_bytes() == b"precious" and leftovers(tmp_path) == []


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gclip_cli", "--debug", "inspect", tmp_path / "missing.npz"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "no such file" in proc.stderr


# --- scripts and pipelines ---------------------------------------------------------------------


def sample(make_file, fmt="safetensors"):
    return make_file(
        fmt, {"h.0.w": np.array([3.0, 4.0]), "h.10.w": np.array([12.0]), "step": np.array(3)}
    )


def test_norm_prints_just_the_number(make_file):
    src = sample(make_file)
    result = run("norm", src)
    assert result.exit_code == 0 and result.stdout == "13.0\n" and result.stderr == ""
    other = make_file("npz", {"x": np.array([84.0])}, "other")
    assert run("norm", src, other).stdout == "85.0\n"  # one norm over both files
    assert run("norm", src, src).stdout == "13.0\n"  # a file named twice counts once


def test_norm_of_nonfinite_values_exits_4(make_file):
    src = make_file("npz", {"a": np.array([1.0, np.nan])})
    result = run("norm", src)
    assert (result.exit_code, result.stdout) == (4, "nan\n")
    assert run("norm", src, "--nonfinite", "zero").stdout == "1.0\n"


def test_check_exit_codes(make_file, tmp_path):
    src = sample(make_file)
    within = run("check", src, "--max-norm", "13")
    assert (within.exit_code, within.stdout) == (0, "ok: global L2 norm 13 <= max norm 13\n")
    over = run("check", src, "--max-norm", "1")
    assert (over.exit_code, over.stdout) == (1, "exceeds: global L2 norm 13 > max norm 1\n")
    bad = make_file("npz", {"a": np.array([np.inf])}, "bad")
    assert run("check", bad, "--max-norm", "1").exit_code == 4  # NaN/Inf: the one rule
    missing = run("check", tmp_path / "missing.npz", "--max-norm", "1")
    assert missing.exit_code == 2 and missing.stderr.startswith("gclip: error:")
    assert json.loads(run("check", src, "--max-norm", "1", "--json").stdout)["clipped"] is True


def test_check_passes_on_what_rescale_wrote(make_file, fmt, tmp_path):
    out = tmp_path / f"out{SUFFIX[fmt]}"
    assert run("rescale", sample(make_file, fmt), out, "--max-norm", "0.7").exit_code == 0
    assert run("check", out, "--max-norm", "0.7").exit_code == 0


def test_max_norm_from_the_environment(make_file):
    result = run("check", sample(make_file), env={"GCLIP_MAX_NORM": "20"})
    assert result.exit_code == 0


@pytest.mark.parametrize("output_format", ["json", "jsonl", "csv"])
def test_machine_formats_go_to_stdout_only(make_file, output_format):
    result = run("inspect", sample(make_file), "--format", output_format, "--sort", "norm")
    assert result.exit_code == 0 and result.stderr == ""
    if output_format == "json":
        data = json.loads(result.stdout)
        assert data["schema_version"] == 1
        assert [t["name"] for t in data["tensors"]] == ["h.10.w", "h.0.w", "step"]
    elif output_format == "jsonl":
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert [r["kind"] for r in rows] == ["tensor"] * 3 + ["summary"]
        assert rows[-1]["global_norm"] == 13.0
    else:
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert rows[0]["name"] == "h.10.w" and float(rows[0]["norm"]) == 12.0


def test_by_layer_and_top(make_file):
    result = run("inspect", sample(make_file), "--by-layer", "--json")
    layers = json.loads(result.stdout)["layers"]
    assert [(layer["name"], layer["norm"]) for layer in layers] == [("h.0", 5.0), ("h.10", 12.0)]
    table = run("inspect", sample(make_file), "--sort", "norm", "--top", "1").stdout
    assert "h.10.w" in table and "h.0.w" not in table


def test_rescale_json_report_goes_to_stderr_when_the_data_goes_to_stdout(make_file, tmp_path):
    src = sample(make_file)
    result = CliRunner().invoke(
        main,
        ["rescale", "-", "-", "--max-norm", "1", "--json"],
        input=src.read_bytes(),
        catch_exceptions=False,
    )
    assert result.exit_code == 0
    assert json.loads(result.stderr)["clipped"] is True
    assert result.stdout_bytes[:8] == src.read_bytes()[:8]  # the same header


def test_colour_follows_the_option_and_no_color(make_file):
    src = sample(make_file)
    assert "\x1b[" in run("--color", "always", "inspect", src).stdout
    assert "\x1b[" not in run("--color", "never", "inspect", src).stdout
    assert "\x1b[" not in run("inspect", src, env={"NO_COLOR": "1", "FORCE_COLOR": None}).stdout


def test_binary_output_to_a_terminal_is_refused(make_file, monkeypatch):
    from gclip_cli import streams

    monkeypatch.setattr(streams, "is_terminal", lambda stream: stream is sys.stdout)
    result = run("rescale", sample(make_file), "-", "--max-norm", "1")
    assert (
        result.exit_code == 2 and "refusing to write a binary file to a terminal" in result.stderr
    )


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "hdf5"])
def test_pipeline_through_stdin_and_stdout(make_file, fmt):
    src = sample(make_file, fmt)
    gclip = f"{sys.executable} -m gclip_cli"
    proc = subprocess.run(
        f"cat {src} | {gclip} rescale - - --max-norm 1 | {gclip} norm -",
        shell=True,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == pytest.approx(1.0, rel=1e-6)
    assert "clipped: <stdin> -> <stdout>" in proc.stderr


def test_a_closed_pipe_stops_quietly(make_file):
    tensors = {f"t{i}": np.ones(3) for i in range(2000)}
    src = make_file("npz", tensors)
    proc = subprocess.run(
        f"{sys.executable} -m gclip_cli inspect {src} --format jsonl | head -1",
        shell=True,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.stdout.startswith('{"kind": "tensor"') and proc.stderr == ""


def test_option_choices_match_the_library():
    # the CLI spells them out so that --help need not import numpy; they must not drift
    from gclip_cli.formats import FORMAT_NAMES
    from gclip_cli.render.machine import OUTPUT_FORMATS
    from gclip_cli.views import SORT_KEYS

    params = {p.name: p for p in main.commands["inspect"].params}
    assert tuple(params["file_format"].type.choices) == FORMAT_NAMES
    assert tuple(params["output_format"].type.choices) == OUTPUT_FORMATS
    assert tuple(params["sort"].type.choices) == SORT_KEYS


def test_every_command_is_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in main.commands:
        assert f"gclip {name}" in readme, name


@pytest.mark.parametrize(
    ("args", "needs_rich"),
    [
        (["rescale", "{src}", "{out}", "--max-norm", "1"], False),
        (["check", "{src}", "--max-norm", "1"], False),
        (["rescale", "{src}", "{out}", "--max-norm", "1", "--per-tensor"], True),
    ],
)
def test_rich_is_imported_only_for_tables(tmp_path, args, needs_rich):
    """Its import costs start-up; rescale's and check's plain lines do without."""
    src = write_tensors(tmp_path / "g.npz", "npz", {"w": np.full(4, 2.0, dtype=np.float32)})
    argv = [a.format(src=src, out=tmp_path / "o.npz") for a in args]
    code = (
        "import sys\n"
        "from gclip_cli.cli import main\n"
        "try:\n"
        f"    main({argv!r}, standalone_mode=False)\n"
        "finally:\n"
        "    print('rich' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == (1 if args[0] == "check" else 0), proc.stderr
    *printed, imported = proc.stdout.splitlines()
    assert imported == str(needs_rich)
    if args[0] == "check":
        assert printed == ["exceeds: global L2 norm 4 > max norm 1"]
        return
    lines = proc.stderr.splitlines()
    verdict = "per-tensor applied" if needs_rich else "clipped"
    assert lines[0] == f"{verdict}: {src} -> {tmp_path / 'o.npz'}"  # one line, however long
    assert "  global L2 norm after:  1" in lines
    assert any(line.split()[:2] == ["group", "tensors"] for line in lines) == needs_rich


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
def test_the_cli_starts_numpy_without_blas_helper_threads(tmp_path):
    """OpenBLAS's helper threads would spin on the cores gclip's workers need."""
    src = write_tensors(tmp_path / "g.npz", "npz", {"w": np.ones(10, dtype=np.float32)})
    code = (
        "import os, sys\n"
        "from gclip_cli.cli import main\n"
        "assert 'numpy' not in sys.modules\n"
        f"main(['norm', {str(src)!r}], standalone_mode=False)\n"
        "print(len(os.listdir('/proc/self/task')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "1"


# --- trust: what gclip did not read, it names or refuses (issue 19) -----------------------------


def gclip(*args, **popen) -> subprocess.CompletedProcess:
    """A real gclip process (text output, no check)."""
    options = {"capture_output": True, "text": True, "check": False} | popen
    return subprocess.run([sys.executable, "-m", "gclip_cli", *map(str, args)], **options)


def test_a_legacy_pytorch_file_is_refused_by_every_command_not_answered_as_empty(tmp_path):
    import torch

    src = tmp_path / "grads.pt"
    torch.save({"w": torch.ones(3) * 1e6}, src, _use_new_zipfile_serialization=False)
    for args, code in [
        (["inspect", src], 3),
        (["norm", src], 3),
        (["check", src, "--max-norm", "1e-9"], 2),  # check: every other error is 2
        (["rescale", src, tmp_path / "out.pt", "--max-norm", "1"], 3),
    ]:
        proc = gclip(*args)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stdout == "" and proc.stderr.count("\n") == 1
        assert "is a PyTorch checkpoint in the legacy" in proc.stderr and str(src) in proc.stderr
    assert not (tmp_path / "out.pt").exists()


def test_a_glob_that_matches_nothing_is_a_usage_error_that_shows_the_names(make_file, tmp_path):
    src = make_file("hdf5", {"model/layers/0/w": np.array([3.0]), "model/layers/1/w": np.ones(1)})
    for args in (
        ["check", src, "--max-norm", "1", "--include", "model.layers.12.*"],
        ["norm", src, "--exclude", "nothing.*"],
        ["rescale", src, tmp_path / "out.h5", "--max-norm", "1", "--include", "x*"],
        ["inspect", src, "--include", "x*"],
    ):
        proc = gclip(*args)
        assert proc.returncode == 2, proc.stderr
        assert "matches no tensor; names look like 'model/layers/0/w'" in proc.stderr
        assert proc.stdout == ""
    assert not (tmp_path / "out.h5").exists()
    # '.' and '/' alike: the safetensors spelling of the pattern selects the HDF5 names
    assert float(gclip("norm", src, "--include", "model.layers.0.*").stdout) == 3.0


def test_nothing_to_count_is_refused_by_norm_check_and_rescale(make_file, fmt, tmp_path):
    src = make_file(fmt, {"step": np.array(12), "ids": np.arange(3)})
    out = tmp_path / f"out{SUFFIX[fmt]}"
    for args, code in [
        (["norm", src], 3),
        (["check", src, "--max-norm", "1"], 2),
        (["rescale", src, out, "--max-norm", "1"], 3),
        (["clip-value", src, out, "--max-value", "1"], 3),
        (["norm", make_file(fmt, {"w": np.ones(2)}, "w"), "--exclude", "*"], 2),
    ]:
        proc = gclip(*args)
        assert proc.returncode == code, (args, proc.stderr)
        assert "no floating-point tensor" in proc.stderr or "leave no tensor" in proc.stderr
    assert not out.exists()
    # inspect may look, but says that nothing was counted rather than "norm 0"
    shown = gclip("inspect", src)
    assert shown.returncode == 0 and "global L2 norm: - (no tensor counted)" in shown.stdout
    assert json.loads(gclip("inspect", src, "--json").stdout)["global_norm"] is None


def test_debug_keeps_the_exit_code(tmp_path):
    proc = gclip("--debug", "inspect", tmp_path / "missing.npz")
    assert proc.returncode == 3 and "Traceback" in proc.stderr


@pytest.mark.parametrize("fmt_", ["table", "json"])
def test_every_closed_pipe_is_141(make_file, fmt_):
    src = make_file("npz", {f"t{i}": np.ones(3) for i in range(3000)})
    for command in (f"inspect {src} --format {fmt_}", f"check {src} --max-norm 1 --json"):
        proc = subprocess.run(
            f"{sys.executable} -m gclip_cli {command} | head -c 10; exit ${{PIPESTATUS[0]}}",
            shell=True,
            executable="/bin/bash",
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 141, (command, proc.stderr)
        assert proc.stderr == ""


def test_nonfinite_values_exit_4_from_every_command_after_the_report(make_file, tmp_path):
    src = make_file("safetensors", {"a": np.array([1.0, np.nan]), "b": np.array([3.0])})
    out = tmp_path / "out.safetensors"
    for args, printed in [
        (["inspect", src], "non-finite values: 1"),
        (["inspect", src, "--json"], '"nonfinite": 1'),
        (["norm", src], "nan"),
        (["check", src, "--max-norm", "1"], "non-finite"),
        (["history", src, "--as-given"], "global"),
        (["rescale", src, out, "--max-norm", "1"], ""),
    ]:
        proc = gclip(*args)
        assert proc.returncode == 4, (args, proc.stderr)
        assert printed in proc.stdout
    assert not out.exists()
    # a policy that says how to count them takes the command's own code
    assert gclip("check", src, "--max-norm", "10", "--nonfinite", "zero").returncode == 0
    assert gclip("inspect", src, "--nonfinite", "keep").returncode == 0


def test_standard_input_is_named_stdin_in_reports(make_file, tmp_path):
    src = make_file("npz", {"a": np.array([3.0, 4.0])})
    with open(src, "rb") as data:
        report = json.loads(gclip("inspect", "-", "--json", stdin=data).stdout)
    assert report["file"] == "<stdin>" and report["files"] == ["<stdin>"]
    assert {t["file"] for t in report["tensors"]} == {"<stdin>"}
    with open(src, "rb") as data:
        table = gclip("inspect", "-", stdin=data).stdout
    assert table.startswith("<stdin> (npz)") and "gclip-" not in table
    with open(src, "rb") as data:
        rescaled = gclip(
            "rescale", "-", tmp_path / "o.npz", "--max-norm", "1", "--json", stdin=data
        )
    assert json.loads(rescaled.stdout)["file"] == "<stdin>"
    with open(src, "rb") as data:
        history = json.loads(gclip("history", "-", "--as-given", "--json", stdin=data).stdout)
    assert [s["file"] for s in history["steps"]] == ["<stdin>"]
    with open(src, "rb") as data:
        diff = json.loads(gclip("diff", "-", src, "--json", stdin=data).stdout)
    assert (diff["file_a"], diff["file_b"]) == ("<stdin>", str(src))


def test_a_folder_or_index_given_as_one_file_is_a_usage_error(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_tensors(folder / "model.safetensors", "safetensors", {"w": np.ones(2)})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "model.safetensors"}}))
    for args, hint in [
        (["rescale", folder, tmp_path / "o", "--max-norm", "1"], "give --out-dir DIR"),
        (["rescale", index, tmp_path / "o", "--max-norm", "1"], "give --out-dir DIR"),
        (["clip-value", index, tmp_path / "o", "--max-value", "1"], "give --out-dir DIR"),
    ]:
        proc = gclip(*args)
        assert proc.returncode == 2 and hint in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_folder_with_out_dir_is_copied_whole(tmp_path):
    folder, out = tmp_path / "ckpt", tmp_path / "clipped"
    (folder / "sub").mkdir(parents=True)
    write_tensors(folder / "model.safetensors", "safetensors", {"w": np.array([3.0, 4.0])})
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_text(f'{{"{name}": 1}}')
    proc = gclip("rescale", folder, "--out-dir", out, "--max-norm", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    for name in ("config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    assert read_tensors(out / "model.safetensors", "safetensors")["w"].tolist() == [0.6, 0.8]
    told = {line.split(": ")[2]: line for line in proc.stderr.splitlines()}
    assert set(told) == {str(folder / n) for n in ("config.json", "sub", "tokenizer.json")}
    assert told[str(folder / "config.json")].endswith("; copied unchanged")
    assert told[str(folder / "sub")].endswith("; not copied")


def test_help_texts_belong_to_their_command():
    def help_of(command: str) -> str:
        return " ".join(run(command, "--help").stdout.split())  # unwrapped

    for command in ("norm", "check", "history", "clip-value", "diff"):
        assert "--eps" not in help_of(command), command
    assert "max_norm / (norm + eps)" in help_of("inspect")
    assert "target_norm / (norm + eps)" in help_of("normalize")
    for command in ("inspect", "norm", "check", "history"):
        assert "--out-dir" not in help_of(command), command
    for command in ("rescale", "clip-value", "normalize"):  # every strategy on shards
        assert "with --out-dir, N files at once" in help_of(command)
    for option in ("--sort", "--top", "--by-layer"):
        assert option not in help_of("rescale")
        assert run("rescale", "a", "b", "--max-norm", "1", option).exit_code == 2


def test_an_option_error_names_the_environment_only_when_the_value_came_from_it(make_file):
    src = make_file("npz", {"a": np.array([3.0])})
    typed = run("norm", src, "--norm-type", "zero")
    assert typed.exit_code == 2 and "GCLIP" not in typed.stderr
    from_env = run("norm", src, env={"GCLIP_NORM_TYPE": "zero"})
    assert from_env.exit_code == 2 and "$GCLIP_NORM_TYPE" in from_env.stderr
    typed = run("inspect", src, "--max-norm", "0")
    assert typed.exit_code == 2 and "GCLIP_MAX_NORM" not in typed.stderr


def test_rescale_writes_through_a_symbolic_link_out_as_cp_does(make_file, tmp_path):
    src = sample(make_file)
    target = tmp_path / "kept" / "real.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    assert gclip("rescale", src, link, "--max-norm", "1", "-q").returncode == 0
    direct = tmp_path / "direct.safetensors"
    assert gclip("rescale", src, direct, "--max-norm", "1", "-q").returncode == 0
    assert link.is_symlink() and target.read_bytes() == direct.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["real.safetensors"]


def test_rescale_refuses_a_device_or_fifo_out_and_leaves_it_alone(make_file, tmp_path):
    src = sample(make_file)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for dst in [fifo, *(d for d in ("/dev/null", "/dev/full") if os.path.exists(d))]:
        kind = os.stat(dst).st_mode
        result = gclip("rescale", src, dst, "--max-norm", "1", timeout=60)
        assert result.returncode == 5 and result.stderr.count("\n") == 1, result.stderr
        assert "regular files only (give - to stream to standard output)" in result.stderr
        assert os.stat(dst).st_mode == kind


def test_outputs_keep_permission_bits_as_cp_does(make_file, tmp_path):
    src = sample(make_file)
    src.chmod(0o600)
    new = tmp_path / "new.safetensors"
    assert gclip("rescale", src, new, "--max-norm", "1", "-q").returncode == 0
    assert new.stat().st_mode & 0o777 == 0o600
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"old")
    existing.chmod(0o640)
    assert gclip("rescale", src, existing, "--max-norm", "1", "-q").returncode == 0
    assert existing.stat().st_mode & 0o777 == 0o640 and existing.read_bytes() == new.read_bytes()


@pytest.mark.parametrize(
    "args",
    [
        ["rescale", "{missing}", "{out}", "--max-norm", "1"],
        ["rescale", "{missing}", "{out}", "--max-norm", "1", "--per-tensor"],
        ["rescale", "{missing}", "{out}", "--group", "a*=1"],
        ["rescale", "{missing}", "--out-dir", "{folder}", "--max-norm", "1"],
        ["clip-value", "{missing}", "{out}", "--max-value", "1"],
        ["normalize", "{missing}", "{out}", "--target-norm", "1"],
    ],
)
def test_a_missing_input_is_one_line_exit_3_for_every_rewriting_command(tmp_path, args):
    missing, out = tmp_path / "gone.safetensors", tmp_path / "out.safetensors"
    folder = tmp_path / "folder"
    folder.mkdir()
    result = gclip(*(a.format(missing=missing, out=out, folder=folder) for a in args))
    assert result.returncode == 3, result.stderr
    assert result.stderr == f"gclip: error: {missing}: no such file\n"
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


def test_an_out_name_of_250_bytes_is_written(make_file, tmp_path):
    src = sample(make_file)
    out = tmp_path / ("o" * 238 + ".safetensors")
    result = gclip("rescale", src, out, "--max-norm", "1", "-q")
    assert result.returncode == 0, result.stderr
    assert read_tensors(out, "safetensors").keys() == read_tensors(src, "safetensors").keys()


def test_an_input_truncated_before_it_is_mapped_is_one_line_exit_3(make_file, tmp_path):
    src = make_file("safetensors", big_tensors(2))
    out = tmp_path / "out.safetensors"
    script = f"""
import os, sys
import gclip_cli.pipeline as pipeline
real = pipeline.measure_tensors
def truncated_first(*args):
    os.truncate({str(src)!r}, 4096)  # someone truncates the input as pass 1 begins
    return real(*args)
pipeline.measure_tensors = truncated_first
from gclip_cli.cli import entry_point
sys.argv = ["gclip", "rescale", {str(src)!r}, {str(out)!r}, "--max-norm", "1"]
entry_point()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith(f"gclip: error: {src}: changed while gclip was reading it")
    assert proc.stderr.count("\n") == 1 and "size went from" in proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []


# --- every p, norms beyond float64 (issue 20, items 5 and 6) -------------------------------------


def gclip_run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.parametrize("p", ["1075", "1e300", "inf", "600", "0.5", "1e-5", "1e-300"])
def test_norm_takes_any_p_without_overflow(make_file, p):
    values = np.array([4.0, -2.0, 1.0])  # for p = 1075 the norm is 4 (2**1075 underflows)
    proc = gclip_run("norm", "-p", p, make_file("safetensors", {"g": values}))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert float(proc.stdout) == pytest.approx(reference_norm(values, float(p)), rel=1e-12)
    assert ("beyond float64" in proc.stderr) == (float(proc.stdout) == float("inf"))


def test_a_norm_beyond_float64_is_inf_with_a_note_and_still_clips(make_file, tmp_path):
    values = np.array([1.5e308, -1.5e308, 1e308])
    src = make_file("safetensors", {"g": values})
    norm = gclip_run("norm", src)
    assert (norm.returncode, norm.stdout.strip()) == (0, "inf")
    assert "norm is beyond float64's range; the values are finite" in norm.stderr
    check = gclip_run("check", src, "--max-norm", "1")
    assert check.returncode == 1 and "inf (beyond float64's range" in check.stdout
    shown = gclip_run("inspect", src, "--json")
    data = json.loads(shown.stdout)
    assert data["global_norm"] is None and data["global_norm_beyond_float64"] is True
    assert data["tensors"][0]["share"] == 1.0
    layers = gclip_run("inspect", src, "--by-layer", "-p", "1e-5")
    assert layers.returncode == 0 and "beyond float64" in layers.stdout
    out = tmp_path / "out.safetensors"
    clipped = gclip_run("rescale", src, out, "--max-norm", "1", "--json")
    assert clipped.returncode == 0, clipped.stderr
    report = json.loads(clipped.stdout)
    assert report["clipped"] and report["global_norm_after"] == pytest.approx(1.0, rel=1e-15)
    exact = measure(values).finite_norm_exact()
    assert np.array_equal(read_tensors(out, "safetensors")["g"], exactly_scaled(values, 1 / exact))


@pytest.mark.parametrize(
    "command", [["inspect"], ["norm"], ["check", "--max-norm", "1"], ["rescale", "-", "-"]]
)
def test_numpy_warnings_never_reach_stderr(tmp_path, command):
    """A signalling NaN cast to float64 made numpy print a two-line RuntimeWarning."""
    signalling_nan = np.array([0x7F800001, 0x3F800000], dtype="<u4").view("<f4")
    src = write_tensors(tmp_path / "in.safetensors", "safetensors", {"w": signalling_nan})
    args = [command[0], str(src), *command[1:]]
    if command[0] == "rescale":
        args = [*command, "--max-norm", "1"]
    for debug in ([], ["--debug"]):
        proc = subprocess.run(
            [sys.executable, "-m", "gclip_cli", *debug, *args],
            stdin=src.open("rb"),
            capture_output=True,
        )
        stderr = proc.stderr.decode()
        assert proc.returncode == 4, stderr
        if debug:
            assert "RuntimeWarning" in stderr  # --debug shows them
        else:
            assert "Warning" not in stderr and stderr.count("\n") <= 1, stderr
