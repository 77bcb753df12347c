"""watch: gclip follows a folder that another process writes dumps into (temporary names,
a half-written dump, one deleted while read), a record per step with its exact global norm
and the layers anomalous in it, --exit-on-exceed, and Ctrl-C's summary."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import exact_norm
from safetensors.numpy import load_file

from gclip_cli.watch import Poller, is_temporary

INTERVAL = "0.1"

# The writer: dumps of a run in which layer h.1 explodes at step 6 (x50), each written under
# a temporary name and renamed, but for the ones its arguments name: "half" is written half,
# left for a while under its final name, then completed; "doomed" is deleted soon after it
# appears; "slow-part" lingers under its temporary name.  (The watcher, started with a delay
# of 1.5 s before each read, reads "half" while it is half-written and "doomed" once it is
# gone.)
WRITER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from safetensors.numpy import save

    folder, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    special = dict(arg.split("=") for arg in sys.argv[4:])
    for step in range(first, last + 1):
        rng = np.random.default_rng(step)
        tensors = {}
        for layer in range(3):
            scale = 50.0 if layer == 1 and step >= 6 else 1.0
            tensors[f"h.{layer}.w"] = (rng.standard_normal((16, 8)) * scale).astype(np.float32)
        data = save(tensors, metadata={"step": str(step)})
        final = os.path.join(folder, f"grads_step{step:02d}.safetensors")
        how = special.get(str(step), "renamed")
        if how == "half":
            with open(final, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(2.5)
                f.write(data[len(data) // 2 :])
        elif how == "doomed":
            with open(final, "wb") as f:
                f.write(data)
            time.sleep(0.6)
            os.remove(final)
        else:
            temporary = final + ".part"
            with open(temporary, "wb") as f:
                f.write(data)
            time.sleep(1.0 if how == "slow-part" else 0.05)
            os.rename(temporary, final)
        time.sleep(0.05)
    """
)


def writer(folder: Path, first: int, last: int, *special: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder), str(first), str(last), *special]
    )


def watcher(folder: Path, *args: str, delay: float | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GCLIP_")}
    if delay is not None:  # each dump's reading starts that late: it can be deleted meanwhile
        env["GCLIP_TEST_WORK_DELAY"] = str(delay)
    return subprocess.Popen(
        [sys.executable, "-m", "gclip_cli", "watch", str(folder), "--interval", INTERVAL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def records_until(proc: subprocess.Popen, done, seconds: float = 60.0) -> list[dict]:
    """JSON records from *proc*'s stdout until done(records) or the process ends."""
    records: list[dict] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done(records):
        line = proc.stdout.readline()
        if not line:
            break
        records.append(json.loads(line))
    return records


def steps_seen(records: list[dict]) -> set[int]:
    return {r["step"] for r in records if r["kind"] == "step"}


def exact_global_norm(path: Path) -> float:
    return exact_norm(list(load_file(path).values()))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "dumps").mkdir()
    return tmp_path / "dumps"


def test_a_live_run_is_followed_step_by_step_until_ctrl_c(folder):
    proc = watcher(folder, "--format", "jsonl", "--max-norm", "1000", delay=1.5)
    try:
        writer(folder, 0, 4, "3=slow-part").wait(timeout=60)
        records = records_until(proc, lambda r: steps_seen(r) >= set(range(5)))
        writer(folder, 5, 5, "5=half").wait(timeout=60)  # read half-written: skipped, then read
        records += records_until(proc, lambda r: 5 in steps_seen(r))
        writer(folder, 6, 6, "6=doomed").wait(timeout=60)
        records += records_until(proc, lambda r: any(x["kind"] == "skipped" for x in r[-1:]))
        writer(folder, 7, 8).wait(timeout=60)
        records += records_until(proc, lambda r: steps_seen(r) >= {7, 8})
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    records += [json.loads(line) for line in out.splitlines()]
    assert proc.returncode == 130 and "gclip: interrupted" in err

    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4, 5, 7, 8]  # each once, in order
    for record in steps:
        path = Path(record["file"])
        assert path.parent == folder and not is_temporary(path.name)
        assert record["global_norm"] == pytest.approx(exact_global_norm(path), rel=1e-12)
    skipped = [Path(r["file"]).name for r in records if r["kind"] == "skipped"]
    assert skipped == ["grads_step05.safetensors", "grads_step06.safetensors"]
    assert "step06.safetensors: no such file" in err  # reported on stderr too
    anomalies = {r["step"]: [a["layer"] for a in r["anomalies"]] for r in steps}
    assert anomalies[7] == ["h.1"] and not any(anomalies[s] for s in range(6))
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["stopped"] == "interrupted"
    assert summary["steps"] == 8 and summary["first_anomaly"]["layer"] == "h.1"
    norms = sorted(r["global_norm"] for r in steps)
    assert summary["percentiles"]["p50"] == pytest.approx(float(np.percentile(norms, 50)))


def test_exit_on_exceed_stops_at_the_first_step_over_max_norm(folder):
    # steps 0-5 have norms near 11, steps from 6 on near 400 (h.1 x 50)
    proc = watcher(folder, "--format", "jsonl", "--max-norm", "100", "--exit-on-exceed")
    try:
        writer(folder, 0, 9).wait(timeout=60)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    records = [json.loads(line) for line in out.splitlines()]
    assert proc.returncode == 1, err
    steps = [r for r in records if r["kind"] == "step"]
    over = [exact_global_norm(Path(r["file"])) > 100 for r in steps]
    assert over[-1] and not any(over[:-1]) and steps[-1]["over_max_norm"]
    assert records[-1]["stopped"] == "exceeded" and records[-1]["first_over"]["step"] == 6


def test_the_table_has_a_line_per_step_and_a_summary(folder):
    writer(folder, 0, 7).wait(timeout=60)  # already there when watching starts
    proc = watcher(folder)
    try:
        lines = []
        while len(lines) < 9:  # the header, 8 steps
            lines.append(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert lines[0].split()[:2] == ["step", "global"]
    for step, line in enumerate(lines[1:]):
        assert line.split()[0] == str(step)
    assert "anomalous: h.1" in lines[7] and proc.returncode == 130
    assert out.startswith("watched 8 steps") and "first anomaly: h.1 at step 6" in out


@pytest.mark.parametrize(
    ("name", "temporary"),
    [
        ("grads_step1.safetensors", False),
        ("grads_step1.safetensors.part", True),
        ("grads_step1.safetensors.tmp", True),
        ("grads_step1.tmp.safetensors", True),
        (".grads_step1.safetensors", True),
        ("grads_step1.safetensors~", True),
        ("grads_step1.safetensors.tmp_a8f3", True),
        ("template_step1.npz", False),
        ("partial_step1.h5", False),
    ],
)
def test_temporary_names(name, temporary):
    assert is_temporary(name) == temporary


def test_a_dump_is_ready_once_it_stays_the_same_for_a_poll(tmp_path):
    poller = Poller(tmp_path)
    dump = tmp_path / "a.npz"
    dump.write_bytes(b"x" * 10)
    assert poller.ready() == []  # seen once
    with dump.open("ab") as f:
        f.write(b"y")
    assert poller.ready() == []  # it changed
    ready = poller.ready()
    assert ready == [dump]
    poller.done(dump, (lambda s: (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns))(dump.stat()))
    assert poller.ready() == []  # read as it is
    dump.write_bytes(b"z" * 20)
    poller.ready()
    assert poller.ready() == [dump]  # changed since: read again


def test_on_a_terminal_the_table_is_redrawn_live(folder):
    writer(folder, 0, 7).wait(timeout=60)
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GCLIP_")}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gclip_cli", "watch", str(folder), "--interval", INTERVAL],
        stdout=child,
        stderr=subprocess.PIPE,
        env=env | {"TERM": "xterm"},
    )
    os.close(child)
    seen = ""

    def read_until(text: str) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while text not in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen):
            assert time.monotonic() < deadline, seen
            try:
                seen += os.read(main, 65536).decode(errors="replace")
            except OSError:  # the terminal closed: gclip ended
                break

    try:
        read_until("grads_step07")
        assert "\x1b[" in seen  # drawn in place, with the cursor moved back over it
        proc.send_signal(signal.SIGINT)
        read_until("first anomaly: h.1 at step 6")
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
        os.close(main)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen)
    assert "watched 8 steps" in plain and "anomalous: h.1" in plain


@pytest.mark.parametrize(
    ("arguments", "code"),
    [(["/nonexistent/dumps"], 3), (["{folder}", "--exit-on-exceed"], 2)],
)
def test_what_cannot_be_watched_is_one_line_and_no_header(folder, arguments, code):
    given = [a.format(folder=folder) for a in arguments]
    done = subprocess.run(
        [sys.executable, "-m", "gclip_cli", "watch", *given],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code
    assert done.stdout == ""
    assert "error" in done.stderr.lower()
