"""One pipeline for one file and for shards: every strategy gives the same values whether the
tensors lie in one file or in the shards of a checkpoint, and the same bytes whatever runs the
shards (this thread, a process pool, a Dask cluster)."""

import json

import numpy as np
import pytest
from conftest import exact_norm, read_tensors, write_tensors

from gclip_cli.api import rewrite_file, rewrite_files
from gclip_cli.options import Options
from gclip_cli.strategies import ClipValue, GlobalNorm, Groups, Normalize, PerTensor

STRATEGIES = [
    GlobalNorm(max_norm=0.5),
    PerTensor(max_norm=0.5, eps=1e-6),
    Groups(groups=(("layers.0.*", 0.3), ("head.*", 5.0)), default=1.0),
    Normalize(target_norm=2.0),
    ClipValue(max_value=0.05),
]
SHARDS = {  # file -> tensors, formats mixed as a converted checkpoint may be
    "model-1.safetensors": ("layers.0.w", "layers.0.b"),
    "model-2.h5": ("layers.1.w", "layers.1.b"),
    "model-3.npz": ("head.w", "step"),
}


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {
        "layers.0.w": rng.standard_normal((40, 16)).astype(np.float32),
        "layers.0.b": rng.standard_normal(16).astype(np.float64) * 3,
        "layers.1.w": rng.standard_normal((16, 16)).astype(np.float16),
        "layers.1.b": rng.standard_normal(16).astype(np.float32) * 0.01,
        "head.w": rng.standard_normal((16, 5)).astype(np.float32) * 7,
        "step": np.array(12),
    }


def executors() -> list[dict]:
    found = [{"jobs": 1}, {"jobs": 2}]
    try:
        import distributed  # noqa: F401

        found.append({"jobs": 2, "scheduler": "local:2"})
    except ImportError:
        pass
    return found


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint in three shards of three formats, with its index, and one file holding
    the same tensors."""
    folder = tmp_path_factory.mktemp("ckpt")
    values = tensors()
    weight_map = {}
    for shard, names in SHARDS.items():
        fmt = {"safetensors": "safetensors", "h5": "hdf5", "npz": "npz"}[shard.rpartition(".")[2]]
        write_tensors(folder / shard, fmt, {name: values[name] for name in names})
        weight_map |= dict.fromkeys(names, shard)
    index = folder / "model.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    whole = write_tensors(tmp_path_factory.mktemp("whole") / "all.h5", "hdf5", values)
    return index, whole, values


def read_all(folder) -> dict[str, np.ndarray]:
    fmts = {".safetensors": "safetensors", ".h5": "hdf5", ".npz": "npz"}
    return {
        name: values
        for shard in sorted(folder.iterdir())
        if shard.suffix in fmts
        for name, values in read_tensors(shard, fmts[shard.suffix]).items()
    }


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_every_strategy_gives_one_file_and_its_shards_the_same_values(
    strategy, checkpoint, tmp_path
):
    index, whole, values = checkpoint
    alone = rewrite_file(whole, tmp_path / "all.h5", strategy)
    expected = read_tensors(tmp_path / "all.h5", "hdf5")
    runs = []
    for n, executor in enumerate(executors()):
        out = tmp_path / f"out{n}"
        options = Options(jobs=executor["jobs"], chunk_size=256 * (n + 1))
        report = rewrite_files(
            [index], out, strategy, options=options, scheduler=executor.get("scheduler")
        )
        written = read_all(out)
        assert written.keys() == values.keys()
        for name, array in written.items():  # bit for bit the one file's values
            assert array.dtype == expected[name].dtype
            assert array.tobytes() == expected[name].tobytes(), (executor, name)
        assert report.global_norm == alone.global_norm
        assert report.global_norm_after == alone.global_norm_after
        assert report.clipped == alone.clipped
        runs.append({p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".h5"})
    assert all(run == runs[0] for run in runs[1:])  # HDF5 files differ in their timestamps
    floats = [v for v in values.values() if v.dtype.kind == "f"]
    assert alone.global_norm == pytest.approx(exact_norm(floats), rel=1e-12)
    assert alone.clipped  # every strategy here changes values: the comparison means something


def test_per_tensor_and_group_reports_agree_between_one_file_and_shards(checkpoint, tmp_path):
    index, whole, _ = checkpoint
    strategy = Groups(groups=(("layers.0.*", 0.3),), default=1.0)
    alone = rewrite_file(whole, tmp_path / "all.h5", strategy)
    sharded = rewrite_files([index], tmp_path / "out", strategy)
    assert [(g.name, g.norm, g.scale, g.tensors) for g in sharded.groups] == [
        (g.name, g.norm, g.scale, g.tensors) for g in alone.groups
    ]
    scales = {t.name: t.scale for t in sharded.tensors}
    assert scales == {t.name: t.scale for t in alone.tensors}


def test_clip_value_counts_the_same_values_on_shards(checkpoint, tmp_path):
    index, whole, _ = checkpoint
    strategy = ClipValue(max_value=0.05)
    alone = rewrite_file(whole, tmp_path / "all.h5", strategy)
    sharded = rewrite_files([index], tmp_path / "out", strategy, options=Options(jobs=2))
    assert {t.name: t.clamped for t in sharded.tensors} == {
        t.name: t.clamped for t in alone.tensors
    }
    assert sum(t.clamped or 0 for t in sharded.tensors) > 0


@pytest.mark.parametrize(
    "args",
    [
        ["rescale", "--per-tensor", "--max-norm", "0.5"],
        ["rescale", "--group", "layers.0.*=0.3", "--max-norm", "1"],
        ["clip-value", "--max-value", "0.05"],
        ["normalize", "--target-norm", "2", "-j", "2"],
    ],
)
def test_every_strategy_takes_out_dir_on_the_command_line(args, checkpoint, tmp_path):
    from click.testing import CliRunner

    from gclip_cli.cli import main

    index, whole, _ = checkpoint
    command, *strategy = args
    out = tmp_path / "out"
    sharded = CliRunner().invoke(main, [command, str(index), "--out-dir", str(out), *strategy])
    assert sharded.exit_code == 0, sharded.stderr
    alone = CliRunner().invoke(main, [command, str(whole), str(tmp_path / "all.h5"), *strategy])
    assert alone.exit_code == 0, alone.stderr
    expected = read_tensors(tmp_path / "all.h5", "hdf5")
    assert {k: v.tobytes() for k, v in read_all(out).items()} == {
        k: v.tobytes() for k, v in expected.items()
    }
    assert sorted(p.name for p in out.iterdir()) == sorted([*SHARDS, index.name])
