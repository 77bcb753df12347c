"""Sharded checkpoints: one global norm over every shard, the same on any executor."""

import json
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import exact_norm, exactly_scaled, read_tensors, write_tensors

import gclip_cli
from gclip_cli import InputError, api, pipeline
from gclip_cli.api import rescale_files
from gclip_cli.cli import main
from gclip_cli.executors import RETRIES, executor_for, run_all
from gclip_cli.options import Options

SHARDS = {  # file -> (format, tensors)
    "model-00001-of-00003.safetensors": ("safetensors", {"a.w": (40, 30), "a.b": (30,)}),
    "model-00002-of-00003.npz": ("npz", {"b.w": (25, 12)}),
    "model-00003-of-00003.h5": ("hdf5", {"c.w": (64,), "c.b": (8,)}),
}


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    rng = np.random.default_rng(17)
    values, weight_map = {}, {}
    for file, (fmt, shapes) in SHARDS.items():
        tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        write_tensors(folder / file, fmt, tensors)
        values |= tensors
        weight_map |= dict.fromkeys(tensors, file)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return index, values


def outputs(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    return {file: read_tensors(folder / file, fmt) for file, (fmt, _) in SHARDS.items()}


def test_one_global_norm_over_all_shards(checkpoint, tmp_path):
    index, values = checkpoint
    out = tmp_path / "clipped"
    report = rescale_files([index], out, max_norm=1.0)
    assert report.global_norm == pytest.approx(exact_norm(list(values.values())), rel=1e-12)
    assert (out / index.name).read_bytes() == index.read_bytes()
    q = Fraction(1.0) / Fraction(report.global_norm)
    for shard in outputs(out).values():
        for name, written in shard.items():
            assert np.array_equal(written, exactly_scaled(values[name], q))
    assert report.global_norm_after == pytest.approx(1.0, rel=1e-6)


def executors() -> list[dict]:
    found = [{}, {"jobs": 2}]
    try:
        import distributed  # noqa: F401

        found.append({"scheduler": "local:2"})
    except ImportError:
        pass
    return found


def test_every_executor_gives_the_same_bytes(checkpoint, tmp_path):
    index, _ = checkpoint
    results = []
    for i, executor in enumerate(executors()):
        out = tmp_path / f"out{i}"
        options = Options(chunk_size=1000 * (i + 1), jobs=executor.get("jobs"))
        report = rescale_files(
            [index], out, max_norm=0.5, options=options, scheduler=executor.get("scheduler")
        )
        raw = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".h5"}
        results.append((report.global_norm, report.global_norm_after, raw, outputs(out)))
    first = results[0]
    for other in results[1:]:
        assert other[:3] == first[:3]
        for file in SHARDS:
            for name, written in first[3][file].items():
                assert np.array_equal(other[3][file][name], written)
    assert len(results) == len(executors())


def test_out_dir_from_the_command_line(checkpoint, tmp_path):
    index, _ = checkpoint
    out = tmp_path / "clipped"
    result = CliRunner().invoke(
        main, ["rescale", str(index.parent), "--out-dir", str(out), "--max-norm", "1", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    # a folder: its other files (here the index) are copied, so the output is a checkpoint too
    assert sorted(p.name for p in out.iterdir()) == sorted([*SHARDS, index.name])
    assert (out / index.name).read_bytes() == index.read_bytes()
    report = json.loads(result.stdout)
    assert report["files"] == [str(index.parent / f) for f in sorted(SHARDS)]
    assert [n["file"] for n in report["not_read"]] == [str(index)]
    assert report["not_read"][0]["reason"].endswith("; copied unchanged")
    assert f"not read: {index}" in result.stderr
    usage = CliRunner().invoke(main, ["rescale", str(index), "a", "b", "--max-norm", "1"])
    assert usage.exit_code == 2 and "--out-dir" in usage.stderr


def die_once(marker: str) -> int:
    """A task whose first run kills its worker process outright (as an OOM killer would)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(9)
    return 42


def test_a_killed_worker_is_replaced_and_its_task_run_again(tmp_path):
    with executor_for(jobs=2) as executor:
        assert run_all(executor, die_once, [(str(tmp_path / "marker"),)]) == [42]


def test_a_failing_write_leaves_nothing_partial_in_the_output_directory(
    checkpoint, tmp_path, monkeypatch
):
    index, _ = checkpoint
    out = tmp_path / "clipped"
    attempts = tmp_path / "attempts"  # a file: each shard's work runs in a child process

    def write_half_then_fail(tfile, options, progress, tmp, *args):
        with open(attempts, "a") as log:
            log.write(f"{tfile.path.name}\n")
        tmp.write_bytes(b"half a shard")
        raise RuntimeError("worker lost")

    monkeypatch.setattr(pipeline, "write_opened", write_half_then_fail)
    with pytest.raises(RuntimeError, match="worker lost"):
        rescale_files([index], out, max_norm=1.0)
    assert len(attempts.read_text().split()) >= RETRIES + 1  # tried again before giving up
    assert list(out.iterdir()) == []  # no shard, no temporary file, no staging directory


def test_a_killed_dask_worker_is_replaced_and_its_task_run_again(tmp_path):
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    with executor_for(scheduler="local:2") as executor:
        assert run_all(executor, die_once, [(str(tmp_path / "marker"),)]) == [42]


def test_progress_is_reported_per_shard_and_phase(checkpoint, tmp_path):
    index, _ = checkpoint
    seen = []
    rescale_files(
        [index],
        tmp_path / "out",
        max_norm=1.0,
        shards=lambda phase, done, total: seen.append((phase, done, total)),
    )
    assert seen == [("measuring", i, 3) for i in range(4)] + [("writing", i, 3) for i in range(4)]


def test_shards_of_one_name_in_two_folders_keep_their_relative_paths(tmp_path):
    rng = np.random.default_rng(5)
    values = {
        run: {"w": rng.standard_normal(50).astype(np.float32) * scale}
        for run, scale in (("run1", 1.0), ("run2", 7.0))
    }
    shards = []
    for run, tensors in values.items():
        (tmp_path / run).mkdir()
        shards.append(write_tensors(tmp_path / run / "x.safetensors", "safetensors", tensors))
    out = tmp_path / "clipped"
    report = rescale_files(shards, out, max_norm=1.0)
    q = Fraction(1.0) / Fraction(report.global_norm)
    for run, tensors in values.items():
        written = read_tensors(out / run / "x.safetensors", "safetensors")
        assert np.array_equal(written["w"], exactly_scaled(tensors["w"], q))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "run1",
        "run1/x.safetensors",
        "run2",
        "run2/x.safetensors",
    ]


def test_an_index_naming_shards_in_sub_folders_is_copied_with_them(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "part").mkdir(parents=True)
    write_tensors(folder / "part" / "1.safetensors", "safetensors", {"a": np.array([3.0])})
    write_tensors(folder / "2.safetensors", "safetensors", {"b": np.array([4.0])})
    index = folder / "model.safetensors.index.json"
    weight_map = {"a": "part/1.safetensors", "b": "2.safetensors"}
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "clipped"
    rescale_files([index], out, max_norm=1.0)
    assert (out / index.name).read_bytes() == index.read_bytes()
    again = api.inspect_files([out / index.name])  # the copy names its shards right
    assert again.global_norm == pytest.approx(1.0, rel=1e-15)


def test_a_shard_changed_between_the_passes_is_refused_before_any_write(
    checkpoint, tmp_path, monkeypatch
):
    index, _ = checkpoint
    first = index.parent / next(iter(SHARDS))
    real = pipeline._measure_file

    def measure_then_touch(*args):
        measured = real(*args)
        os.utime(first, ns=(0, first.stat().st_mtime_ns + 1))  # someone rewrites a shard
        return measured

    monkeypatch.setattr(pipeline, "_measure_file", measure_then_touch)
    out = tmp_path / "clipped"
    with pytest.raises(gclip_cli.InputError, match="changed while gclip was reading it"):
        rescale_files([index], out, max_norm=1.0)
    assert not out.exists()


def test_a_shard_replaced_during_its_write_is_refused_and_not_put_in_place(
    checkpoint, tmp_path, monkeypatch
):
    index, _ = checkpoint
    real = pipeline.write_opened

    def write_then_replace(tfile, *args):
        written = real(tfile, *args)
        src = tfile.path
        copy = src.with_name("copy")
        copy.write_bytes(src.read_bytes())
        copy.replace(src)
        return written

    monkeypatch.setattr(pipeline, "write_opened", write_then_replace)
    out = tmp_path / "clipped"
    with pytest.raises(gclip_cli.InputError, match="replaced by another file"):
        rescale_files([index], out, max_norm=1.0)
    assert list(out.iterdir()) == []  # no shard, no temporary file, no staging directory


def test_ctrl_c_in_a_serial_run_stops_at_once_and_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    # A thread used to run the tasks: after Ctrl-C it went on with the next shards while the
    # staging directory was being removed, which could leave it behind.
    index, _ = checkpoint
    started = []
    real_task = pipeline.write_source

    def count(measured, *args):
        started.append(measured.path.name)
        return real_task(measured, *args)

    def interrupted(tfile, options, progress, tmp, *args):
        tmp.write_bytes(b"half a shard")
        raise KeyboardInterrupt  # Ctrl-C while the first shard is written

    monkeypatch.setattr(pipeline, "write_source", count)
    monkeypatch.setattr(pipeline, "write_opened", interrupted)
    out = tmp_path / "clipped"
    with pytest.raises(KeyboardInterrupt):
        rescale_files([index], out, max_norm=1.0)
    assert started == [next(iter(SHARDS))]  # no shard begun after Ctrl-C
    assert list(out.iterdir()) == []  # no temporary file, no staging directory


def test_an_output_folder_moved_away_mid_run_is_an_error_that_leaves_nothing(
    checkpoint, tmp_path, monkeypatch
):
    index, _ = checkpoint
    out, moved = tmp_path / "clipped", tmp_path / "moved"
    real = pipeline.write_opened

    def write_then_move(*args):
        written = real(*args)
        out.rename(moved)
        return written

    monkeypatch.setattr(pipeline, "write_opened", write_then_move)
    with pytest.raises(gclip_cli.OutputError, match="was moved or replaced"):
        rescale_files([index], out, max_norm=1.0)
    assert list(moved.iterdir()) == []


def test_two_files_whose_names_look_alike_may_not_share_an_output(tmp_path, monkeypatch):
    (tmp_path / "real" / "deep").mkdir(parents=True)
    write_tensors(tmp_path / "x.safetensors", "safetensors", {"w": np.ones(3)})
    write_tensors(tmp_path / "real" / "x.safetensors", "safetensors", {"w": np.ones(3) * 2})
    (tmp_path / "sub").symlink_to(tmp_path / "real" / "deep")  # so sub/.. is real, not here
    monkeypatch.chdir(tmp_path)
    with pytest.raises(gclip_cli.OutputError, match="would be written for both"):
        rescale_files(["x.safetensors", "sub/../x.safetensors"], "out", max_norm=1.0)
    assert not (tmp_path / "out").exists()


def stopped_executors() -> list:
    found = [pytest.param({"jobs": 2}, id="pool")]
    try:
        import distributed  # noqa: F401

        found.append(pytest.param({"scheduler": "local:2"}, id="dask"))
    except ImportError:
        pass
    return found


@pytest.mark.parametrize("executor", stopped_executors())
def test_a_failure_stops_the_other_tasks_at_once(tmp_path, executor):
    """They may be writing into the staging folder, which goes next: their workers are
    killed, not waited for."""
    marker = tmp_path / "finished"
    with executor_for(**executor) as running, pytest.raises(InputError, match="damaged"):
        run_all(running, fail_at_once_or_sleep, [(None,), (str(marker),)])
    assert not marker.exists()


def fail_at_once_or_sleep(marker: str | None) -> None:
    if marker is None:
        raise InputError("/x/s0.safetensors", "damaged")
    time.sleep(30)
    Path(marker).touch()


def test_tasks_in_this_thread_run_when_their_result_is_asked_for():
    ran = []
    with executor_for() as running:
        futures = [running.submit(ran.append, n) for n in range(3)]
        assert ran == []
        assert [f.result() for f in futures[::-1]] == [None] * 3
    assert ran == [2, 1, 0]


def test_dask_stays_quiet_while_gclip_runs_a_cluster_and_its_level_comes_back():
    """LocalCluster's silence_logs lasts only while the cluster starts: a worker stopped with
    gclip later made the client log a traceback on stderr (seen in CI)."""
    import logging

    from gclip_cli.executors import executor_for

    pytest.importorskip("distributed")
    dask_logger = logging.getLogger("distributed")
    before = dask_logger.level
    with executor_for(scheduler="local:1") as executor:
        assert executor.submit(sum, [1, 2]).result() == 3
        assert dask_logger.getEffectiveLevel() == logging.CRITICAL
    assert dask_logger.level == before
