import copyreg
import faulthandler
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gclip_cli import InputError, OutputError, isolation
from gclip_cli.formats.base import mapped
from gclip_cli.isolation import Channel, run_forked, run_isolated
from gclip_cli.progress import Phase, Progress

# A task is given its link to the parent first: a Channel (run_forked), a Progress
# (run_isolated); the tasks below that need neither take it as *_*.


def crash(_: object) -> None:
    # pytest's faulthandler, inherited by the forked child, would print a "Fatal Python error"
    # report of this deliberate crash on the suite's output
    faulthandler.disable()
    os.kill(os.getpid(), signal.SIGSEGV)


def fail(_: object) -> None:
    raise OutputError("/x/out.h5", "disk full")


def power(_: object, base: int, exponent: int) -> int:
    return base**exponent


def test_result_comes_back(tmp_path):
    assert run_isolated(tmp_path, power, 2, 10) == 1024


CRASHING_TESTS = (
    "test_a_crash_in_the_child_becomes_an_input_error",
    "test_a_child_killed_by_a_signal_names_the_signal",
    "test_a_file_that_shrinks_under_its_mapping_is_an_input_error_saying_so",
)


def test_the_deliberate_crashes_are_silent():
    """A crash report in the suite's output reads like a broken suite."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + [f"{__file__}::{name}" for name in CRASHING_TESTS],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(CRASHING_TESTS)} passed" in proc.stdout
    assert "Fatal Python error" not in proc.stdout + proc.stderr


def test_a_crash_in_the_child_becomes_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"crashed reading it \(SIGSEGV\); the file is damaged"):
        run_isolated(tmp_path / "bad.h5", crash)


def test_errors_in_the_child_come_back_whole(tmp_path):
    with pytest.raises(OutputError) as err:
        run_isolated(tmp_path, fail)
    assert (err.value.path, err.value.message) == ("/x/out.h5", "disk full")


def report_progress(channel: Channel, nbytes: int, result: str) -> str:
    channel.progress.begin(result, nbytes)
    channel.progress.advance(nbytes)
    return result


def test_several_children_return_their_results_in_order_and_their_progress(tmp_path):
    seen = []
    tasks = [(report_progress, (n, f"r{n}")) for n in (3, 5, 7)]
    results = run_forked(tmp_path, tasks, progress=Progress(seen.append))
    assert results == ["r3", "r5", "r7"]
    for n in (3, 5, 7):  # each child's phase, then its bytes (children interleave)
        phase = Phase(f"r{n}", n)
        assert phase in seen and n in seen[seen.index(phase) :]


def fork_again(progress: Progress, path: Path) -> list:
    return run_forked(path, [(report_progress, (4, "inner"))], progress=progress)


def test_progress_relayed_through_two_generations_of_children(tmp_path):
    seen = []
    result = run_isolated(tmp_path, fork_again, tmp_path, progress=Progress(seen.append))
    assert result == ["inner"] and seen == [Phase("inner", 4), 4]


def listened_to(channel: Channel) -> bool:
    return channel.progress.listening


@pytest.mark.parametrize("fork", [True, False])
def test_children_report_progress_only_when_someone_listens(tmp_path, monkeypatch, fork):
    if not fork:
        monkeypatch.setattr(isolation, "can_fork", lambda: False)
    assert run_forked(tmp_path, [(listened_to, ())]) == [False]
    assert run_forked(tmp_path, [(listened_to, ())], progress=Progress([].append)) == [True]


def sleep_then(_: object, seconds: float, marker: str) -> None:
    import time

    time.sleep(seconds)
    open(marker, "w").close()


def test_the_first_failure_stops_the_other_children(tmp_path):
    marker = tmp_path / "finished"
    with pytest.raises(OutputError):
        run_forked(tmp_path, [(sleep_then, (2.0, str(marker))), (fail, ())])
    assert not marker.exists()  # the sleeping child was stopped, not waited for


def test_a_child_killed_by_a_signal_names_the_signal(tmp_path):
    with pytest.raises(InputError, match=r"a worker process died \(SIGSEGV\)"):
        run_forked(tmp_path / "x.safetensors", [(crash, ())])


def tell_each(channel: Channel, *values: int) -> int:
    for value in values:
        channel.note(value)
    return sum(values)


@pytest.mark.parametrize("fork", [True, False])
def test_notes_reach_on_note_with_the_index_of_their_task(tmp_path, monkeypatch, fork):
    if not fork:
        monkeypatch.setattr(isolation, "can_fork", lambda: False)
    notes = []
    tasks = [(tell_each, (1, 2)), (tell_each, (10, 20, 30))]
    results = run_forked(tmp_path, tasks, on_note=lambda index, value: notes.append((index, value)))
    assert results == [3, 60]
    assert [v for i, v in notes if i == 0] == [1, 2] and [v for i, v in notes if i == 1] == [
        10,
        20,
        30,
    ]


def test_an_error_in_on_note_stops_the_children(tmp_path):
    def refuse(index, value):
        raise OutputError("/x/out.h5", f"cannot place {value}")

    with pytest.raises(OutputError, match="cannot place 1"):
        run_forked(tmp_path, [(tell_each, (1,)), (sleep_then, (60, "never"))], on_note=refuse)


def test_without_fork_a_failing_task_raises_here_after_its_notes(tmp_path, monkeypatch):
    monkeypatch.setattr(isolation, "can_fork", lambda: False)
    notes = []
    tasks = [(tell_each, (1,)), (fail, ())]
    with pytest.raises(OutputError):
        run_forked(tmp_path, tasks, on_note=lambda index, value: notes.append(value))
    assert notes == [1]


def read_while_it_shrinks(_: object, path) -> int:
    faulthandler.disable()  # as crash() does
    with open(path, "rb") as f, mapped(f.fileno(), 0, 1 << 20) as window:
        os.truncate(path, 4096)  # as another process might, while gclip reads
        return int(window.sum())  # touches the pages past the new end: SIGBUS


def test_a_file_that_shrinks_under_its_mapping_is_an_input_error_saying_so(tmp_path):
    """SIGBUS cannot be caught in Python; the child it kills can be reported."""
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"\1" * (1 << 20))
    with pytest.raises(InputError) as err:
        run_isolated(path, read_while_it_shrinks, path, crash=isolation.WORKER_CRASH)
    assert err.value.path == str(path)
    assert err.value.message == (
        "the file shrank from 1,048,576 to 4,096 bytes while gclip read it (SIGBUS)"
    )


def wait_forever(_: object) -> None:
    while True:
        time.sleep(1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_parent_even_by_sigkill(tmp_path):
    """The parent runs run_forked; killed outright, it cannot stop its child."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from gclip_cli.isolation import run_forked\n"
        "from test_isolation import wait_forever\n"
        "run_forked(Path('.'), [(wait_forever, ())])\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    deadline = time.monotonic() + 60
    while not children.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.02)
    child = int(children.read_text().split()[0])
    parent.kill()
    parent.wait()
    gone = eventually_gone(child)
    if not gone:  # not to outlive the test either
        os.kill(child, signal.SIGKILL)
    assert gone


def eventually_gone(pid: int, seconds: float = 10) -> bool:
    """Whether process *pid* is dead (gone, or a zombie) within *seconds*."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def fail_over_a_local_error(_: object) -> None:
    class Local(Exception):  # as ISA-L's errors, not to be found by its name
        pass

    try:
        raise Local("inflate")
    except Local as exc:
        raise InputError("/x/g.h5", f"chunk at (0,): {exc}") from None


def rebuild(path, message, context):
    return InputError(path, message)


def with_its_context(error):
    return rebuild, (error.path, error.message, error.__context__)


def test_an_error_comes_back_even_where_its_context_does_not_pickle(tmp_path, monkeypatch):
    """tblib, which Dask installs, pickles an exception's context along with it."""
    monkeypatch.setitem(copyreg.dispatch_table, InputError, with_its_context)
    with pytest.raises(InputError, match=r"chunk at \(0,\): inflate"):
        run_isolated(tmp_path, fail_over_a_local_error)
