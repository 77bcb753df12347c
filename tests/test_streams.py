"""Streams: standard input and pipes given as FILE are spooled to temporary files, within a
size limit, and shown by the names given; standard output is never written onto an input,
and never ends short with exit 0."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from conftest import SUFFIX, exact_norm, progress_by_phase, read_tensors, write_tensors

from gclip_cli import UsageError, streams
from gclip_cli.progress import Progress

TENSORS = {"w": np.array([[3.0, 0.5], [-2.0, 1.0]], np.float32), "b": np.array([4.0, 1.5])}


def feed(fd: int, data: bytes) -> threading.Thread:
    """Write *data* to the pipe *fd* on a thread, then close it (a reader that stops early
    ends the writing)."""

    def write() -> None:
        try:
            with open(fd, "wb") as pipe:
                pipe.write(data)
        except BrokenPipeError:
            pass

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def gclip_from_pipe(data: bytes, *args: str, env=None, stdin=None) -> subprocess.CompletedProcess:
    """The CLI with ``PIPE`` in *args* replaced by /dev/fd/N, a pipe holding *data* (as
    ``<(...)`` gives)."""
    read_end, write_end = os.pipe()
    feed(write_end, data)
    try:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "gclip_cli",
                *(a.replace("PIPE", f"/dev/fd/{read_end}") for a in args),
            ],
            capture_output=True,
            pass_fds=(read_end,),
            env=env,
            input=stdin,
            timeout=60,
        )
    finally:
        os.close(read_end)


def private_tmp(tmp_path) -> dict[str, str]:
    """An environment whose temporary folder is a fresh one, to see what is left in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    return {**os.environ, "TMPDIR": str(folder)}


def test_a_pipe_given_as_a_file_is_read_like_the_file(tmp_path, fmt):
    """safetensors gave a traceback (not seekable), npz 'not a zip file', HDF5 'Illegal seek'."""
    src = write_tensors(tmp_path / f"in{SUFFIX[fmt]}", fmt, TENSORS)
    env = private_tmp(tmp_path)
    proc = gclip_from_pipe(src.read_bytes(), "norm", "PIPE", env=env)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == pytest.approx(exact_norm(list(TENSORS.values())), rel=1e-15)
    proc = gclip_from_pipe(src.read_bytes(), "inspect", "PIPE", "--format", "json", env=env)
    report = json.loads(proc.stdout)
    assert report["file"].startswith("/dev/fd/") and report["files"] == [report["file"]]
    assert os.listdir(env["TMPDIR"]) == []  # the spool is gone


def test_a_pipe_is_rescaled_into_a_file(tmp_path, fmt):
    src = write_tensors(tmp_path / f"in{SUFFIX[fmt]}", fmt, TENSORS)
    out = tmp_path / f"out{SUFFIX[fmt]}"
    proc = gclip_from_pipe(src.read_bytes(), "rescale", "PIPE", str(out), "--max-norm", "1")
    assert proc.returncode == 0, proc.stderr
    assert b"clipped: /dev/fd/" in proc.stderr and b"gclip-" not in proc.stderr
    written = read_tensors(out, fmt)
    assert exact_norm(list(written.values())) == pytest.approx(1.0, rel=1e-6)


def test_a_named_pipe_is_spooled_and_shown_by_its_name(tmp_path):
    src = write_tensors(tmp_path / "in.npz", "npz", TENSORS)
    fifo = tmp_path / "step_7.npz"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(src.read_bytes()), daemon=True)
    writer.start()
    proc = subprocess.run(
        [sys.executable, "-m", "gclip_cli", "history", str(fifo), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    (step,) = json.loads(proc.stdout)["steps"]
    assert (step["file"], step["step"]) == (str(fifo), 7)


@pytest.mark.parametrize("given", ["PIPE", "-"])
def test_a_stream_longer_than_the_spool_limit_is_refused(tmp_path, given):
    env = {**private_tmp(tmp_path), "GCLIP_SPOOL_LIMIT": "1M"}
    endless = b"\0" * (3 << 20)  # stands for /dev/zero behind a pipe
    proc = gclip_from_pipe(endless, "inspect", given, env=env, stdin=endless)
    stderr = proc.stderr.decode()
    name = "<stdin>" if given == "-" else "/dev/fd/"
    assert proc.returncode == 3, stderr
    assert stderr.startswith(f"gclip: error: {name}") and stderr.count("\n") == 1
    assert f"holds more than the {1 << 20:,} bytes gclip may spool to {env['TMPDIR']}" in stderr
    assert os.listdir(env["TMPDIR"]) == []


def test_a_spool_leaves_a_share_of_its_disk_free(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1000 << 20, 0, 200 << 20))
    monkeypatch.delenv("GCLIP_SPOOL_LIMIT", raising=False)
    assert streams.spool_limit(tmp_path) == (200 << 20) - (50 << 20)  # 5% of 1000 MiB kept
    monkeypatch.setenv("GCLIP_SPOOL_LIMIT", "64K")
    assert streams.spool_limit(tmp_path) == 64 << 10
    monkeypatch.setenv("GCLIP_SPOOL_LIMIT", "1T")
    assert streams.spool_limit(tmp_path) == 150 << 20
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1000 << 20, 0, 10 << 20))
    assert streams.spool_limit(tmp_path) == 0
    monkeypatch.setenv("GCLIP_SPOOL_LIMIT", "lots")
    with pytest.raises(UsageError, match="GCLIP_SPOOL_LIMIT='lots' is not a size"):
        streams.spool_limit(tmp_path)


GCLIP = [sys.executable, "-m", "gclip_cli"]


@pytest.fixture
def src(make_file):
    return make_file("safetensors", {"w": np.array([3.0, 4.0]), "b": np.array([12.0])})


def gclip(*args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) -> tuple[int, str]:
    proc = subprocess.run(
        [*GCLIP, *map(str, args)], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, check=False
    )
    return proc.returncode, proc.stderr.decode()


@pytest.mark.parametrize("mode", ["ab", "r+b"])  # gclip ... >> IN, gclip ... 1<> IN
@pytest.mark.parametrize(
    "args",
    [
        ["rescale", "{src}", "-", "--max-norm", "1"],
        ["inspect", "{src}", "--json"],
        ["norm", "{src}"],
    ],
)
def test_standard_output_redirected_onto_an_input_is_refused(src, mode, args):
    before = src.read_bytes()
    with open(src, mode) as stdout:
        status, stderr = gclip(*(a.format(src=src) for a in args), stdout=stdout)
    assert (
        status == 5
        and stderr == f"gclip: error: <stdout>: is the input {src}; redirect it to another file\n"
    )
    assert src.read_bytes() == before


def test_standard_output_onto_standard_inputs_file_is_refused(src):
    before = src.read_bytes()
    with open(src, "rb") as stdin, open(src, "r+b") as stdout:  # gclip ... < IN 1<> IN
        status, stderr = gclip("rescale", "-", "-", "--max-norm", "1", stdin=stdin, stdout=stdout)
    assert status == 5 and "<stdout>: is standard input's file" in stderr
    assert src.read_bytes() == before


def test_an_output_through_a_link_onto_an_input_is_refused(src, tmp_path):
    link = tmp_path / "alias.safetensors"
    link.symlink_to(src)
    with open(link, "ab") as stdout:
        status, stderr = gclip("rescale", src, "-", "--max-norm", "1", stdout=stdout)
    assert status == 5 and "is the input" in stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    "args",
    [
        ["rescale", "{src}", "-", "--max-norm", "1", "-q"],
        ["inspect", "{src}", "--json"],
        ["norm", "{src}"],
    ],
)
def test_a_full_standard_output_is_exit_5_in_one_line(src, args):
    with open("/dev/full", "wb") as full:
        status, stderr = gclip(*(a.format(src=src) for a in args), stdout=full)
    assert status == 5, stderr
    assert stderr == "gclip: error: <stdout>: cannot write: No space left on device\n"


def test_a_closed_standard_output_is_141(src):
    read, write = os.pipe()
    os.close(read)  # nobody will ever read
    try:
        status, stderr = gclip("rescale", src, "-", "--max-norm", "1", "-q", stdout=write)
    finally:
        os.close(write)
    assert status == 141 and stderr == ""


def test_standard_output_to_an_unrelated_file_works(src, tmp_path):
    out = tmp_path / "out.safetensors"
    with open(out, "ab") as stdout:
        status, stderr = gclip("rescale", src, "-", "--max-norm", "1", "-q", stdout=stdout)
    assert status == 0, stderr
    status, _ = gclip("check", out, "--max-norm", "1.000001")
    assert status == 0


def test_an_output_staged_for_a_stream_is_sent_whole_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    read, write = os.pipe()
    events = []
    with streams.staged_into(Path(f"/proc/self/fd/{write}"), 10, Progress(events.append)) as path:
        with open(path, "r+b") as staged:  # written anywhere, as HDF5 or torch views write
            staged.write(b"0123456789")
            staged.seek(2)
            staged.write(b"ab")
        assert list(tmp_path.iterdir()) == []  # no name: freed whatever stops the writer
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        assert pipe.read() == b"01ab456789"
    assert progress_by_phase(events) == [("sending", 10, 10)]
