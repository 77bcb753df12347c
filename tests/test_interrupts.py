"""Signals and children, as real processes: Ctrl-C, SIGTERM or SIGKILL at any moment ends in
one line and the documented exit code (or, for SIGKILL, in silence), with no process of
gclip's left running."""

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tensors

import gclip_cli
from gclip_cli import interrupts
from gclip_cli.isolation import TEST_DELAY

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds processes through Linux's /proc"
)

STOPPED = {
    signal.SIGINT: (130, "gclip: interrupted\n"),
    signal.SIGTERM: (143, "gclip: terminated\n"),
    signal.SIGKILL: (-signal.SIGKILL, ""),
}


def gclip(*args, delay: float | None = None, **popen) -> subprocess.Popen:
    """gclip in a process group of its own (as a shell's job), which its children join; with
    *delay*, each file's work starts that many seconds late (the test hook)."""
    env = dict(os.environ, **({TEST_DELAY: str(delay)} if delay else {}))
    return subprocess.Popen(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        **popen,
    )


def live_processes(group: int) -> list[int]:
    """The processes of process group *group* still alive (a zombie is dead, not yet reaped
    by init)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            state, _, pgrp = stat.rpartition(")")[2].split()[:3]
            if int(pgrp) == group and state != "Z":
                found.append(int(entry.name))
    return found


def eventually(condition, seconds: float = 60) -> bool:
    """Whether *condition*() holds within *seconds* (polled)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_stopped_cleanly(proc: subprocess.Popen, signum: int, group: bool = False) -> None:
    """Send *signum* to gclip (*group*: to its whole process group, as Ctrl-C at a terminal
    does): it ends as documented, and no process of its is left within 10 s."""
    (os.killpg if group else os.kill)(proc.pid, signum)
    proc.wait(timeout=120)
    # before reading stderr, which a process left behind would hold open
    left = [] if eventually(lambda: not live_processes(proc.pid), 10) else live_processes(proc.pid)
    for pid in left:  # not to outlive the test either
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == []
    assert (proc.returncode, proc.communicate(timeout=60)[1]) == STOPPED[signum]


SIGNALS = [
    pytest.param(signal.SIGKILL, False, id="SIGKILL"),
    pytest.param(signal.SIGTERM, False, id="SIGTERM"),
    pytest.param(signal.SIGINT, True, id="Ctrl-C"),
]


@pytest.mark.parametrize(("signum", "group"), SIGNALS)
def test_the_hdf5_child_dies_with_gclip(tmp_path, signum, group):
    src = write_tensors(tmp_path / "g.h5", "hdf5", {"w": np.ones(1000, dtype=np.float32)})
    proc = gclip("rescale", src, tmp_path / "out.h5", "--max-norm", "1", delay=60)
    assert eventually(lambda: len(live_processes(proc.pid)) >= 2)  # gclip and its child
    assert_stopped_cleanly(proc, signum, group)
    if signum != signal.SIGKILL:  # nobody is left to remove a temporary file after SIGKILL
        assert sorted(p.name for p in tmp_path.iterdir()) == ["g.h5"]


def shards(folder: Path, count: int = 4) -> Path:
    folder.mkdir()
    for n in range(count):
        write_tensors(folder / f"s{n}.safetensors", "safetensors", {f"w{n}": np.ones(64)})
    return folder


def staging_started(out: Path) -> bool:
    return out.is_dir() and any(p.name.startswith(".gclip-staging-") for p in out.iterdir())


def stop_while_writing(tmp_path, executor: list[str], signum: int, group: bool) -> None:
    """Stop ``rescale --out-dir`` once its workers write (each task starts 2 s late), then
    check that nothing is left: processes, partial shards, staging folder."""
    out = tmp_path / "out"
    src = shards(tmp_path / "in")
    proc = gclip("rescale", src, "--out-dir", out, "--max-norm", "1", *executor, delay=2)
    started = eventually(lambda: staging_started(out) or proc.poll() is not None)
    if proc.poll() == 0:
        pytest.skip("the machine finished the rescale before the signal arrived")
    assert started, proc.communicate()[1]
    assert_stopped_cleanly(proc, signum, group)
    assert list(out.iterdir()) == []


def kill_while_working(tmp_path, executor: list[str], processes: int) -> None:
    """SIGKILL ``rescale --out-dir`` once *processes* of its work for a minute (each task
    starts 60 s late): none may outlive it."""
    out = tmp_path / "out"
    src = shards(tmp_path / "in")
    proc = gclip("rescale", src, "--out-dir", out, "--max-norm", "1", *executor, delay=60)
    assert eventually(lambda: len(live_processes(proc.pid)) >= processes)
    assert_stopped_cleanly(proc, signal.SIGKILL)


STOPPING = [
    pytest.param(signal.SIGTERM, False, id="SIGTERM"),
    pytest.param(signal.SIGINT, True, id="Ctrl-C"),
]


@pytest.mark.parametrize(("signum", "group"), STOPPING)
def test_the_process_pool_stops_with_gclip_in_one_line(tmp_path, signum, group):
    stop_while_writing(tmp_path, ["-j", "2"], signum, group)


def test_the_process_pool_and_its_resource_tracker_die_with_a_killed_gclip(tmp_path):
    # gclip, the resource tracker, 2 workers and the child each forked for its shard
    kill_while_working(tmp_path, ["-j", "2"], processes=6)


@pytest.mark.parametrize(("signum", "group"), STOPPING)
def test_a_dask_local_cluster_stops_with_gclip_in_one_line(tmp_path, signum, group):
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    stop_while_writing(tmp_path, ["--scheduler", "local:2"], signum, group)


def test_a_dask_local_cluster_dies_with_a_killed_gclip(tmp_path):
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    # gclip, the resource tracker and 2 workers (Dask's are daemons: they fork no child)
    kill_while_working(tmp_path, ["--scheduler", "local:2"], processes=4)


@pytest.mark.parametrize("executor", [[], ["-j", "2"]], ids=["one process", "workers"])
def test_an_input_truncated_under_rescale_is_an_error_that_leaves_nothing(tmp_path, executor):
    """However the shrinking is found (mapping a window past the new end, or SIGBUS while a
    window is read), exit 3 in one line and no temporary file."""
    values = np.random.default_rng(5).standard_normal(16 << 20).astype(np.float32)
    src = write_tensors(tmp_path / "g.safetensors", "safetensors", {"w": values})
    out = tmp_path / "out.safetensors"
    for _ in range(5):  # the input is truncated once pass 2 has begun to write
        write_tensors(src, "safetensors", {"w": values})
        proc = gclip("rescale", src, out, "--max-norm", "1", "--chunk-size", "1M", *executor)
        temporary = eventually(lambda: any(temporaries(tmp_path)))
        os.truncate(src, src.stat().st_size // 2)
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode != 0 or not temporary:
            break
        out.unlink()
    else:
        pytest.skip("the machine finished every rescale before the input was truncated")
    assert proc.returncode == 3, stderr
    assert stderr.startswith(f"gclip: error: {src}: ") and stderr.count("\n") == 1
    assert "shrank" in stderr or "truncated" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]


def temporaries(folder: Path) -> list[int]:
    """The sizes of the temporary files in *folder*."""
    sizes = []
    for path in folder.glob("*.gclip-tmp"):
        with suppress(FileNotFoundError):  # renamed or removed meanwhile
            sizes.append(path.stat().st_size)
    return sizes


# --- start-up ----------------------------------------------------------------------------------


def signalled_at_start(src: Path, signum: int) -> list[tuple[int, int, str]]:
    """(delay in ms, exit status, stderr) of `gclip norm` signalled 0, 4, 8... ms after it
    started, until one run finished first."""
    outcomes = []
    for delay in range(0, 1000, 4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "gclip_cli", "norm", src],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay / 1000)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
        outcomes.append((delay, proc.returncode, stderr))
        if proc.returncode == 0:
            break
    return outcomes


def test_sigterm_at_any_moment_of_start_up_is_one_line_and_143(tmp_path):
    src = write_tensors(tmp_path / "g.npz", "npz", {"w": np.ones(8, dtype=np.float32)})
    outcomes = signalled_at_start(src, signal.SIGTERM)
    for delay, returncode, stderr in outcomes:
        # before gclip's first line runs, SIGTERM's default action: killed, silently
        assert (returncode, stderr) in [(143, "gclip: terminated\n"), (-15, ""), (0, "")], delay
    if not any(returncode == 143 for _, returncode, _ in outcomes):
        pytest.skip("no signal arrived while gclip was running")


def test_ctrl_c_at_any_moment_of_start_up_is_one_line_and_130(tmp_path):
    src = write_tensors(tmp_path / "g.npz", "npz", {"w": np.ones(8, dtype=np.float32)})
    outcomes = signalled_at_start(src, signal.SIGINT)
    for delay, returncode, stderr in outcomes:
        if (returncode, stderr) in [(130, "gclip: interrupted\n"), (0, "")]:
            continue
        if returncode == 0 and in_site_start_up(stderr):
            continue  # Python's site.py caught it, before any of gclip ran, and went on
        # before gclip holds signals back, Python's handler prints a KeyboardInterrupt
        # traceback (or, earlier still, the default action kills silently)
        assert returncode in (1, -2) and before_signals_are_held(stderr), (delay, stderr)
    if not any(returncode == 130 for _, returncode, _ in outcomes):
        pytest.skip("no signal arrived while gclip was running")


FRAME = re.compile(r'\s*File "(?P<file>[^"]+)", line (?P<line>\d+)')


def in_site_start_up(stderr: str) -> bool:
    """Whether *stderr* is only site.py's report of an error (the KeyboardInterrupt) while it
    ran a ``.pth`` file (an editable install's), which it reports and then goes on from."""
    lines = stderr.strip().splitlines()
    return (
        bool(lines)
        and lines[0].startswith("Error processing line")
        and (lines[-1] == "Remainder of file ignored")
    )


def before_signals_are_held(traceback: str) -> bool:
    """Whether *traceback* ends before gclip's launcher holds signals back: in Python's
    start-up, the package's import or the launcher's first line."""
    launcher = Path(gclip_cli.__file__).with_name("__main__.py")
    held = next(
        number
        for number, line in enumerate(launcher.read_text().splitlines(), 1)
        if "SIG_BLOCK" in line
    )
    for match in filter(None, map(FRAME.match, traceback.splitlines())):
        file, line = Path(match["file"]), int(match["line"])
        if file == launcher and line > held:
            return False
        if file.parent == launcher.parent and file.name not in ("__init__.py", "__main__.py"):
            return False
    return True


SCRIPT_INTERRUPTED_WHILE_PARSING = """
import os, signal, sys
import click
from gclip_cli.__main__ import main

def interrupted(*args, **kwargs):  # Ctrl-C while Click parses the command line
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(100_000):  # the handler runs in here
        pass

click.Group.make_context = interrupted
sys.argv = ["gclip", "norm", "x.npz"]
main()
"""


def test_ctrl_c_while_the_command_line_is_parsed_is_130_not_clicks_abort():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT_INTERRUPTED_WHILE_PARSING], capture_output=True, text=True
    )
    assert (proc.returncode, proc.stderr) == (130, "gclip: interrupted\n")


SCRIPT_SIGNALLED_DURING_AN_IMPORT = """
import sys
import gclip_cli
from gclip_cli import interrupts
from gclip_cli.errors import Terminated

interrupts.install()
sys.path.insert(0, sys.argv[1])
try:
    import signalled_while_imported
    print("imported", signalled_while_imported.DONE)
    while True:  # the signal, held back during the import, acts now
        pass
except Terminated:
    print("terminated after the import")
"""

MODULE_SIGNALLING_ITSELF = """
import os, signal
os.kill(os.getpid(), signal.SIGTERM)
for _ in range(100_000):  # the handler runs in here, inside the import
    pass
DONE = True
"""


def test_a_signal_during_an_import_acts_once_the_import_is_done(tmp_path):
    """Raised inside an import, the exception would become an ImportError, which NumPy's C
    code prints with its traceback."""
    (tmp_path / "signalled_while_imported.py").write_text(MODULE_SIGNALLING_ITSELF)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT_SIGNALLED_DURING_AN_IMPORT, tmp_path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.splitlines() == ["imported True", "terminated after the import"]


def test_processes_started_while_ctrl_c_is_withheld_never_see_it():
    probe = "import signal; print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))"
    with interrupts.withheld_from_children():
        child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    after = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert (child.stdout, after.stdout) == ("True\n", "False\n")
