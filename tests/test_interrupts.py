"""Signals and children, as real processes: Ctrl-C, SIGTERM or SIGKILL at any moment ends in
one line and the documented exit code (or, for SIGKILL, in silence), with no process of
gclip's left running."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tensors

import gclip_cli
from gclip_cli import interrupts

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds processes through Linux's /proc"
)

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
        # before gclip holds signals back, Python's handler prints a KeyboardInterrupt
        # traceback (or, earlier still, the default action kills silently)
        assert returncode in (1, -2) and before_signals_are_held(stderr), (delay, stderr)
    if not any(returncode == 130 for _, returncode, _ in outcomes):
        pytest.skip("no signal arrived while gclip was running")


FRAME = re.compile(r'\s*File "(?P<file>[^"]+)", line (?P<line>\d+)')


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
