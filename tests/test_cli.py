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
from conftest import SUFFIX, read_tensors, write_tensors

from gclip_cli.cli import main

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
    assert not processes_in_group(proc.pid)


def processes_in_group(group: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[2]) == group:
                found.append(int(entry.name))
    return found


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
    from gclip_cli.export import OUTPUT_FORMATS
    from gclip_cli.formats import FORMAT_NAMES
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
