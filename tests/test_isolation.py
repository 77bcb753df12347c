import os
import signal

import pytest

from gclip_cli import InputError, OutputError
from gclip_cli.isolation import run_isolated


def crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def fail() -> None:
    raise OutputError("/x/out.h5", "disk full")


def test_result_comes_back(tmp_path):
    assert run_isolated(tmp_path, pow, 2, 10) == 1024


def test_a_crash_in_the_child_becomes_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"crashed reading it \(SIGSEGV\); the file is damaged"):
        run_isolated(tmp_path / "bad.h5", crash)


def test_errors_in_the_child_come_back_whole(tmp_path):
    with pytest.raises(OutputError) as err:
        run_isolated(tmp_path, fail)
    assert (err.value.path, err.value.message) == ("/x/out.h5", "disk full")
