"""Standard input and output as files: never written onto an input, never a short output
with exit 0."""

import os
import subprocess
import sys

import numpy as np
import pytest

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
