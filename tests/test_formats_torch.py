"""PyTorch checkpoints, against torch itself: what torch.save writes is read without torch, and
what gclip writes loads with torch.load(weights_only=True) and with mmap=True."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import exact_norm, exactly_scaled, expected_scaled, from_torch

import gclip_cli
from gclip_cli.errors import InputError
from gclip_cli.formats import detect_format, open_file
from gclip_cli.options import Options

torch = pytest.importorskip("torch", reason="torch is not installed: pip install torch==2.13.0")


def gclip(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *map(str, args)], capture_output=True, text=True
    )


class SmallLSTM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.lstm = torch.nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(16, 20)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0])


def trained_model(dtype=torch.float32, tied: bool = False) -> torch.nn.Module:
    """A small model after one backward pass: real gradients (tied: head shares embed's)."""
    torch.manual_seed(0)
    model = SmallLSTM()
    if tied:
        model.head = torch.nn.Linear(16, 8)
        model.embed = torch.nn.Embedding(8, 16)
        model.lstm = torch.nn.LSTM(16, 16, num_layers=2, batch_first=True)
        model.head.weight = model.embed.weight
    model = model.to(dtype)
    tokens = torch.randint(0, 8, (4, 12))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1)
    )
    (loss * 1000).backward()
    return model


def grads_of(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


def as_float64(tensor) -> np.ndarray:
    return from_torch(tensor).astype(np.float64)


# --- reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_real_gradients_norms_and_clipping_against_torch(tmp_path, dtype):
    model = trained_model(dtype)
    grads = grads_of(model)
    src, out = tmp_path / "grads.pt", tmp_path / "clipped.pt"
    torch.save(grads, src)
    assert detect_format(src) == "torch"
    report = gclip_cli.inspect_file(src)
    assert [t.name for t in report.tensors] == list(grads)
    assert [t.dtype for t in report.tensors] == [str(dtype).removeprefix("torch.")] * len(grads)
    for row, grad in zip(report.tensors, grads.values(), strict=True):
        assert row.norm == pytest.approx(exact_norm([as_float64(grad)]), rel=1e-13)
    reference = math.fsum(float(v) ** 2 for g in grads.values() for v in as_float64(g).ravel())
    assert report.global_norm == pytest.approx(math.sqrt(reference), rel=1e-13)
    params = [torch.nn.Parameter(torch.zeros_like(g, dtype=torch.float64)) for g in grads.values()]
    for p, g in zip(params, grads.values(), strict=True):
        p.grad = g.double()
    torch_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    assert report.global_norm == pytest.approx(torch_norm, rel=1e-12)

    rewritten = gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert rewritten.clipped
    for loaded in (
        torch.load(out, weights_only=True),
        torch.load(out, weights_only=True, mmap=True),
    ):
        assert list(loaded) == list(grads)
        for name, grad in grads.items():
            assert loaded[name].dtype == dtype and loaded[name].shape == grad.shape
            np.testing.assert_array_equal(
                from_torch(loaded[name]), expected_scaled(from_torch(grad), rewritten)
            )
    assert zipfile.ZipFile(out).testzip() is None  # every CRC-32 right
    assert len(out.read_bytes()) == len(src.read_bytes())
    assert gclip_cli.inspect_file(out).global_norm == pytest.approx(1.0, rel=1e-2)


def test_the_output_keeps_every_byte_but_the_values_and_their_crcs(tmp_path):
    grads = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)}
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(grads, src)
    gclip_cli.rescale_file(src, out, max_norm=1.0)
    before, after = zipfile.ZipFile(src), zipfile.ZipFile(out)
    assert [i.filename for i in before.infolist()] == [i.filename for i in after.infolist()]
    changed = set()
    for a, b in zip(before.infolist(), after.infolist(), strict=True):
        assert (a.header_offset, a.file_size, a.flag_bits, a.extra) == (
            b.header_offset,
            b.file_size,
            b.flag_bits,
            b.extra,
        )
        if before.read(a) != after.read(b):
            changed.add(a.filename.rpartition("/")[2])
            assert a.CRC != b.CRC
        else:
            assert a.CRC == b.CRC
    assert changed == {"0", "1"}  # only the two storages
    storages = [i for i in after.infolist() if "/data/" in i.filename]
    starts = [i.header_offset + 30 + len(i.filename) + len(_local_extra(out, i)) for i in storages]
    assert all(start % 64 == 0 for start in starts)  # aligned for mmap=True, as torch made them
    loaded = torch.load(out, weights_only=True)
    q = Fraction(1) / Fraction(exact_norm([np.array([3.0, 4.0, 0.0, 0.5, 1.0])]))
    np.testing.assert_array_equal(
        loaded["w"].numpy(), exactly_scaled(np.array([3.0, 4.0], "f4"), q)
    )


def _local_extra(path: Path, info: zipfile.ZipInfo) -> bytes:
    raw = path.read_bytes()[info.header_offset : info.header_offset + 30]
    name_length, extra_length = (
        int.from_bytes(raw[26:28], "little"),
        int.from_bytes(raw[28:30], "little"),
    )
    start = info.header_offset + 30 + name_length
    return path.read_bytes()[start : start + extra_length]


def test_an_adam_state_names_its_tensors_by_path_and_skips_steps_and_settings(tmp_path):
    model = trained_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.step()
    state = optimizer.state_dict()
    src = tmp_path / "optimizer.pt"
    torch.save(state, src)
    report = gclip_cli.inspect_file(src)
    names = [t.name for t in report.tensors]
    expected = [
        f"state.{i}.{key}" for i in state["state"] for key in ("step", "exp_avg", "exp_avg_sq")
    ]
    assert names == expected  # param_groups (lr, betas, params) are not tensors
    skipped = {t.name: t.skipped for t in report.tensors if t.skipped}
    assert skipped == {f"state.{i}.step": "an optimizer's step count" for i in state["state"]}
    counted = [state["state"][i][k] for i in state["state"] for k in ("exp_avg", "exp_avg_sq")]
    assert report.global_norm == exact_norm([t.numpy() for t in counted])


def test_a_model_state_dict_and_an_optimizer_with_two_groups(tmp_path):
    model = trained_model()
    state = model.state_dict()  # an OrderedDict with a _metadata attribute
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    report = gclip_cli.inspect_file(src)
    assert [t.name for t in report.tensors] == list(state)
    assert "lstm.weight_hh_l1" in state
    assert report.global_norm == pytest.approx(
        exact_norm([t.numpy() for t in state.values()]), rel=1e-15
    )
    groups = [{"params": [p]} for p in model.parameters()]
    optimizer = torch.optim.Adam(groups, lr=1e-3)  # the groups share one tuple of betas
    optimizer.step()
    saved = optimizer.state_dict()
    assert saved["param_groups"][0]["betas"] is saved["param_groups"][1]["betas"]
    torch.save(saved, tmp_path / "optimizer.pt")
    names = [t.name for t in gclip_cli.inspect_file(tmp_path / "optimizer.pt").tensors]
    assert len(names) == 3 * len(groups)


def test_tied_weights_are_one_tensor_counted_and_scaled_once_as_torch_does(tmp_path):
    model = trained_model(tied=True)
    grads = grads_of(model)  # named_parameters() lists the tied parameter once
    saved = {name: p.grad for name, p in model.named_parameters(remove_duplicate=False)}
    assert saved["head.weight"] is saved["embed.weight"]
    src, out = tmp_path / "tied.pt", tmp_path / "clipped.pt"
    torch.save(saved, src)
    report = gclip_cli.inspect_file(src)
    names = [t.name for t in report.tensors]
    assert "embed.weight (= head.weight)" in names and "head.weight" not in names
    params = [torch.nn.Parameter(torch.zeros_like(g, dtype=torch.float64)) for g in grads.values()]
    for p, g in zip(params, grads.values(), strict=True):
        p.grad = g.double()
    torch_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    assert report.global_norm == pytest.approx(torch_norm, rel=1e-12)
    assert report.global_norm == exact_norm([g.numpy() for g in grads.values()])
    rewritten = gclip_cli.rescale_file(src, out, max_norm=1.0)
    loaded = torch.load(out, weights_only=True)
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()  # still tied
    np.testing.assert_array_equal(
        loaded["head.weight"].numpy(), expected_scaled(saved["embed.weight"].numpy(), rewritten)
    )  # scaled once, not twice


def test_a_tensor_saved_under_many_names_names_a_few(tmp_path):
    weight = torch.tensor([3.0, 4.0])
    src = tmp_path / "many.pt"
    torch.save({f"block.{i}.w": weight for i in range(1000)}, src)
    report = gclip_cli.inspect_file(src)
    others = ", ".join(f"block.{i}.w" for i in range(1, 9))
    assert [t.name for t in report.tensors] == [f"block.0.w (= {others} and 991 more)"]
    assert report.global_norm == 5.0


def test_a_saved_slice_is_its_view_the_rest_of_its_storage_untouched(tmp_path):
    whole = torch.arange(1.0, 11.0)
    src, out = tmp_path / "slice.pt", tmp_path / "out.pt"
    torch.save({"part": whole[3:7], "other": torch.tensor([0.5])}, src)
    report = gclip_cli.inspect_file(src)
    assert report.tensors[0].name == "part" and report.tensors[0].shape == (4,)
    assert report.global_norm == exact_norm([np.arange(4.0, 8.0), np.array([0.5])])
    rewritten = gclip_cli.rescale_file(src, out, max_norm=1.0)
    loaded = torch.load(out, weights_only=True, mmap=True)
    np.testing.assert_array_equal(
        loaded["part"].numpy(), expected_scaled(np.arange(4.0, 8.0, dtype="f4"), rewritten)
    )
    storage = torch.tensor([], dtype=torch.float32).set_(loaded["part"].untyped_storage())
    np.testing.assert_array_equal(storage[:3].numpy(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(storage[7:].numpy(), [8.0, 9.0, 10.0])


def test_a_transposed_view_is_read_in_storage_order_and_scaled_alike(tmp_path):
    rng = np.random.default_rng(1)
    matrix = torch.from_numpy(rng.standard_normal((5, 3)).astype(np.float32))
    counts = torch.arange(6).reshape(2, 3)
    src, out = tmp_path / "t.pt", tmp_path / "out.pt"
    torch.save({"wt": matrix.t(), "counts": counts.t()}, src)
    report = gclip_cli.inspect_file(src)
    assert report.tensors[0].shape == (3, 5)
    assert report.global_norm == exact_norm([matrix.numpy()])
    rewritten = gclip_cli.rescale_file(src, out, max_norm=1.0)
    loaded = torch.load(out, weights_only=True)
    np.testing.assert_array_equal(
        loaded["wt"].numpy(), expected_scaled(matrix.t().contiguous().numpy(), rewritten)
    )


def test_views_with_gaps_are_read_and_written_through_their_strides(tmp_path):
    rng = np.random.default_rng(2)
    matrix = torch.from_numpy(rng.standard_normal((70, 9)).astype(np.float32))
    vector = torch.from_numpy(rng.standard_normal(1001).astype(np.float64))
    cube = torch.from_numpy(rng.standard_normal((4, 5, 6)).astype(np.float32)).to(torch.bfloat16)
    saved = {
        "columns": matrix[:, 2:5],  # rows of 3 values, 9 apart
        "every_third": vector[1::3],
        "corner": cube[1:3, ::2, 3:].transpose(0, 2),
    }
    src, out = tmp_path / "strided.pt", tmp_path / "out.pt"
    torch.save(saved, src)
    arrays = {name: from_torch(t) for name, t in saved.items()}
    report = gclip_cli.inspect_file(src, options=Options(chunk_size=64))  # pieces of a window
    assert [t.shape for t in report.tensors] == [tuple(t.shape) for t in saved.values()]
    assert report.global_norm == pytest.approx(exact_norm(list(arrays.values())), rel=1e-15)
    for chunk_size in (64, 1 << 20):
        out = tmp_path / f"out{chunk_size}.pt"
        rewritten = gclip_cli.rescale_file(
            src, out, max_norm=1.0, options=Options(chunk_size=chunk_size)
        )
        loaded = torch.load(out, weights_only=True, mmap=True)
        for name, values in arrays.items():
            np.testing.assert_array_equal(
                from_torch(loaded[name]), expected_scaled(values, rewritten)
            )
        # the storages' other values are untouched
        whole = torch.tensor([], dtype=torch.float32).set_(loaded["columns"].untyped_storage())
        kept = np.ones((70, 9), bool)
        kept[:, 2:5] = False
        np.testing.assert_array_equal(whole.reshape(70, 9).numpy()[kept], matrix.numpy()[kept])
        assert zipfile.ZipFile(out).testzip() is None


@pytest.mark.parametrize("jobs", [1, 2])
def test_the_first_nan_of_a_view_stored_in_another_order_is_placed_in_c_order(tmp_path, jobs):
    matrix, cube = torch.randn(3, 5), torch.randn(2, 3, 4)
    matrix[2, 1] = float("nan")  # the 12th value stored; (1, 2) of the transposed view
    matrix[0, 4] = float("inf")  # the 5th stored; (4, 0) of the view: later in C order
    cube[1, 0, 3] = float("-inf")
    big, wide = torch.randn(64, 300), torch.randn(64, 300)  # large enough for workers to split
    big[40, 7] = big[3, 200] = wide[9, 6] = wide[2, 7] = float("nan")
    saved = {
        "t": matrix.t(),
        "permuted": cube.permute(2, 0, 1),
        "columns": wide[:, 5:9],
        "big": big.t(),
    }
    src = tmp_path / "orders.pt"
    torch.save(saved, src)
    report = gclip_cli.inspect_file(src, options=Options(nonfinite="keep", jobs=jobs))
    for tensor in report.tensors:
        values = from_torch(saved[tensor.name])
        bad = np.argwhere(~np.isfinite(values))
        expected = tuple(int(i) for i in bad[0]) if len(bad) else None
        assert tensor.first_nonfinite == expected, tensor.name


def test_views_with_gaps_that_interleave_are_refused(tmp_path):
    matrix = torch.arange(12.0).reshape(3, 4)
    src = tmp_path / "halves.pt"
    torch.save({"left": matrix[:, :2], "right": matrix[:, 2:]}, src)
    with pytest.raises(InputError, match="share values of storage"):
        gclip_cli.inspect_file(src)


def test_whole_arrays_of_integers_follow_their_strides(tmp_path):
    counts = torch.arange(6).reshape(2, 3)
    src = tmp_path / "c.pt"
    torch.save({"counts": counts.t(), "flags": torch.tensor([True, False])}, src)
    tfile = open_file(src)
    try:
        arrays = {t.name: tfile.read_array(t) for t in tfile.tensors}
        assert all(t.skip_reason for t in tfile.tensors)
    finally:
        tfile.close()
    np.testing.assert_array_equal(arrays["counts"], counts.t().numpy())
    np.testing.assert_array_equal(arrays["flags"], [True, False])


def test_float8_tensors_are_gradients(tmp_path):
    values = torch.tensor([0.5, -2.0, 3.0]).to(torch.float8_e4m3fn)
    src, out = tmp_path / "f8.pt", tmp_path / "out.pt"
    torch.save({"w": values}, src)
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert report.tensors[0].dtype == "float8_e4m3fn"
    loaded = torch.load(out, weights_only=True)
    np.testing.assert_array_equal(
        from_torch(loaded["w"]).astype(np.float64),
        expected_scaled(from_torch(values), report).astype(np.float64),
    )


def test_a_lone_tensor_is_named_after_the_archive(tmp_path):
    src = tmp_path / "grads.pt"
    torch.save(torch.tensor([3.0, 4.0]), src)
    report = gclip_cli.inspect_file(src)
    assert [t.name for t in report.tensors] == ["grads"] and report.global_norm == 5.0


# --- sharded checkpoints ----------------------------------------------------------------------


def test_sharded_bin_checkpoint_with_its_index(tmp_path):
    grads = grads_of(trained_model())
    names = list(grads)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:3],
        "pytorch_model-00002-of-00002.bin": names[3:],
    }
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for shard, members in shards.items():
        torch.save({n: grads[n] for n in members}, folder / shard)
    index = folder / "pytorch_model.bin.index.json"
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    report = gclip_cli.inspect_files([index])
    assert report.global_norm == exact_norm([g.numpy() for g in grads.values()])
    assert gclip_cli.inspect_files([folder]).global_norm == report.global_norm
    rewritten = gclip_cli.rescale_files([index], tmp_path / "out", max_norm=1.0)
    for shard, members in shards.items():
        loaded = torch.load(tmp_path / "out" / shard, weights_only=True)
        for name in members:
            np.testing.assert_array_equal(
                loaded[name].numpy(), expected_scaled(grads[name].numpy(), rewritten)
            )
    weight_map[names[0]] = "pytorch_model-00002-of-00002.bin"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError, match="listed for"):
        gclip_cli.inspect_files([index])


# --- no torch, no code run --------------------------------------------------------------------


def test_the_cli_never_imports_torch(tmp_path):
    src, out = tmp_path / "grads.pt", tmp_path / "out.pt"
    torch.save(grads_of(trained_model()), src)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "from gclip_cli.cli import main\n"
        "sys.argv = ['gclip', *sys.argv[1:]]\n"
        "main()\n"
    )
    for args in (["inspect", src], ["rescale", src, out, "--max-norm", "1", "-j", "2"]):
        proc = subprocess.run(
            [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
    assert torch.load(out, weights_only=True).keys() == torch.load(src, weights_only=True).keys()
    blocked = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; import torch"],
        capture_output=True,
    )
    assert blocked.returncode != 0  # the wrapper does block torch


def replaced_pickle(src: Path, dst: Path, data: bytes) -> Path:
    """A copy of the torch archive *src* whose data.pkl is *data*."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            new.writestr(
                info.filename, data if info.filename.endswith("/data.pkl") else old.read(info)
            )
    return dst


class RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


class Evaluates:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: {"w": RunsCommand(f"touch {marker}")},
        lambda marker: {"w": Evaluates(f"open({str(marker)!r}, 'w')")},
        lambda marker: [RunsCommand(f"touch {marker}")],
        lambda marker: {"model": torch.nn.Linear(2, 2)},  # a whole module: exotic globals
        lambda marker: {"w": torch.ones(2), "f": Path(marker)},
    ],
    ids=["os.system", "eval", "in-list", "module", "pathlib"],
)
def test_a_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    real = tmp_path / "real.pt"
    torch.save({"w": torch.ones(2)}, real)
    data = pickle.dumps(payload(marker), protocol=2)
    src = replaced_pickle(real, tmp_path / "evil.pt", data)
    out = tmp_path / "out.pt"
    for args in (["inspect", src], ["rescale", src, out, "--max-norm", "1"]):
        proc = gclip(*args)
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"gclip: error: {src}: ")
        assert "refused; nothing was run" in proc.stderr
    assert not marker.exists() and not out.exists()


class Forged:
    """A tensor description pickled as torch.save would, with any arguments."""

    def __init__(self, key, storage_type, numel, offset, size, stride, function=None, extra=()):
        self.storage = ("storage", storage_type, key, "cpu", numel)
        self.args = (offset, tuple(size), tuple(stride), False, OrderedDict(), *extra)
        self.function = function or torch._utils._rebuild_tensor_v2


class ForgingPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, Forged):
            return obj.function, (StorageId(obj.storage), *obj.args)
        return NotImplemented

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, StorageId) else None


class StorageId:
    def __init__(self, pid) -> None:
        self.pid = pid


def forged(
    path: Path, obj, storages: dict[str, bytes], extra_members=(), byteorder: str = "little"
) -> Path:
    """A torch-like archive: data.pkl pickling *obj* (Forged tensors in it), the storages."""
    import io

    buffer = io.BytesIO()
    ForgingPickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", byteorder)
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
        for name, data in extra_members:
            archive.writestr(name, data)
        archive.writestr("archive/version", "3\n")
    return path


FLOATS = np.arange(1.0, 9.0, dtype="<f4").tobytes()  # 8 float32


@pytest.mark.parametrize(
    ("tensors", "storages", "message"),
    [
        ({"w": Forged("0", torch.FloatStorage, 8, 0, [4], [1])}, {"0": FLOATS}, None),
        (
            {"w": Forged("0", torch.FloatStorage, 8, 6, [4], [1])},
            {"0": FLOATS},
            "runs past the end",
        ),
        ({"w": Forged("0", torch.FloatStorage, 8, 0, [3, 3], [3, 1])}, {"0": FLOATS}, "runs past"),
        ({"w": Forged("0", torch.FloatStorage, 9, 0, [4], [1])}, {"0": FLOATS}, "holds 9 float32"),
        ({"w": Forged("0", torch.DoubleStorage, 8, 0, [4], [1])}, {"0": FLOATS}, "holds 8 float64"),
        ({"w": Forged("1", torch.FloatStorage, 8, 0, [4], [1])}, {"0": FLOATS}, "archive lacks"),
        (
            {
                "a": Forged("0", torch.FloatStorage, 8, 0, [4], [1]),
                "b": Forged("0", torch.FloatStorage, 8, 2, [4], [1]),
            },
            {"0": FLOATS},
            "partly overlapping",
        ),
        (
            {
                "a": Forged("0", torch.FloatStorage, 8, 0, [4], [1]),
                "b": Forged("0", torch.HalfStorage, 16, 0, [4], [1]),
            },
            {"0": FLOATS},
            "described twice",
        ),
        (
            {"w": Forged("0", torch.FloatStorage, 8, 0, [2, 3], [1, 1])},
            {"0": FLOATS},
            "more than once",
        ),
        ({"w": Forged("0", torch.FloatStorage, 8, 0, [4, 2], [0, 1])}, {"0": FLOATS}, "broadcast"),
        (
            {"w": Forged("0", torch.FloatStorage, 8, 0, [2], [-1])},
            {"0": FLOATS},
            "not a tuple of counts",
        ),
        ({"w": Forged("0", "FloatStorage", 8, 0, [4], [1])}, {"0": FLOATS}, "not a storage type"),
        (
            {"w": Forged("0", torch.FloatStorage, 8, 0, [4], [1], extra=({"neg": 1},))},
            {"0": FLOATS},
            "metadata",
        ),
    ],
    ids=[
        "valid",
        "offset-past-end",
        "shape-past-end",
        "numel-vs-size",
        "dtype-vs-size",
        "missing-storage",
        "partial-overlap",
        "two-types",
        "overlapping-rows",
        "broadcast",
        "negative-stride",
        "string-type",
        "bad-metadata",
    ],
)
def test_forged_tensor_descriptions_are_checked_before_any_value_is_read(
    tmp_path, tensors, storages, message
):
    src = forged(tmp_path / "forged.pt", tensors, storages)
    out = tmp_path / "out.pt"
    proc = gclip("rescale", src, out, "--max-norm", "1")
    if message is None:
        assert proc.returncode == 0, proc.stderr
        loaded = torch.load(out, weights_only=True)
        assert loaded["w"].shape == (4,)
        return
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and not out.exists()


def test_damaged_archives_are_one_line_exit_3(tmp_path):
    real = tmp_path / "real.pt"
    torch.save({"w": torch.arange(1000.0)}, real)
    raw = real.read_bytes()
    cases = {
        "truncated.pt": raw[: len(raw) // 2],
        "bad_crc.pt": _corrupt_storage(real),
    }
    duplicate = forged(
        tmp_path / "duplicate.pt",
        {"w": Forged("0", torch.FloatStorage, 8, 0, [8], [1])},
        {"0": FLOATS},
        extra_members=[("archive/data/0", FLOATS)],
    )
    junk_pickle = replaced_pickle(real, tmp_path / "junk_pickle.pt", b"\x80\x02}q\x00(X")
    paths = [duplicate, junk_pickle]
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    # detected as a PyTorch checkpoint even where the zip directory is gone
    assert detect_format(tmp_path / "truncated.pt") == "torch"
    for src in paths:
        out = tmp_path / f"out_{src.name}"
        proc = gclip("rescale", src, out, "--max-norm", "1", "--file-format", "torch")
        assert proc.returncode == 3 and proc.stderr.count("\n") == 1, (src.name, proc.stderr)
        assert str(src) in proc.stderr and not out.exists()


def _corrupt_storage(path: Path) -> bytes:
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{path.stem}/data/0")
    at = info.header_offset + 30 + len(info.filename) + len(_local_extra(path, info)) + 100
    raw[at] ^= 0xFF
    return bytes(raw)


def test_a_big_endian_checkpoint_is_refused(tmp_path):
    tensors = {"w": Forged("0", torch.FloatStorage, 8, 0, [8], [1])}
    src = forged(tmp_path / "big.pt", tensors, {"0": FLOATS}, byteorder="big")
    with pytest.raises(InputError, match="big-endian"):
        gclip_cli.inspect_file(src)
    assert gclip_cli.inspect_file(forged(tmp_path / "little.pt", tensors, {"0": FLOATS})).tensors


def test_a_container_graph_whose_paths_explode_is_refused(tmp_path):
    level: object = {"w": Forged("0", torch.FloatStorage, 8, 0, [8], [1])}
    for _ in range(64):  # 2**64 paths if followed
        level = {"a": level, "b": level}
    src = forged(tmp_path / "bomb.pt", level, {"0": FLOATS})
    with pytest.raises(InputError, match="twice"):
        gclip_cli.inspect_file(src)


def test_tensors_nested_too_deep_are_refused_and_deep_nesting_without_them_is_read(tmp_path):
    deep: object = {"w": Forged("0", torch.FloatStorage, 8, 0, [8], [1])}
    for _ in range(1500):
        deep = [deep]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # pickling nests as deep as the lists
    try:
        src = forged(tmp_path / "deep.pt", deep, {"0": FLOATS})
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(InputError, match="more than 1000 containers deep"):
        gclip_cli.inspect_file(src)
    real = tmp_path / "real.pt"
    torch.save({"w": torch.tensor([3.0, 4.0])}, real)
    with zipfile.ZipFile(real) as archive:
        saved = archive.read("real/data.pkl")
    depth = 100_000  # lists in lists, no tensor in them: not entered (pickle.dumps cannot)
    nested = b"]" * depth + b"a" * (depth - 1)
    key = b"X" + len(b"config").to_bytes(4, "little") + b"config"
    data = saved[:-1] + key + nested + b"s."  # {"w": ..., "config": [[[...]]]}
    assert gclip_cli.inspect_file(replaced_pickle(real, tmp_path / "c.pt", data)).global_norm == 5


def test_keys_that_join_to_one_name_are_refused(tmp_path):
    src = tmp_path / "dots.pt"
    torch.save({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, src)
    with pytest.raises(InputError, match=r"two tensors are named 'a\.b'"):
        gclip_cli.inspect_file(src)


# --- detection --------------------------------------------------------------------------------


def test_detection_tells_torch_keras_npz_torchscript_and_legacy_apart(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    np.savez(tmp_path / "b.npz", w=np.ones(2))
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(tmp_path / "m.keras", "w") as z:
        for name in ("config.json", "metadata.json", "model.weights.h5"):
            z.writestr(name, b"{}")
    assert detect_format(tmp_path / "a.pt") == "torch"
    assert detect_format(tmp_path / "b.npz") == "npz"
    with pytest.raises(InputError, match="legacy"):
        detect_format(tmp_path / "old.pt")
    with pytest.raises(InputError, match="Keras"):
        detect_format(tmp_path / "m.keras")
    for other, message in (("b.npz", "an .npz"), ("m.keras", "Keras"), ("old.pt", "legacy")):
        with pytest.raises(InputError, match=message):
            open_file(tmp_path / other, "torch")
