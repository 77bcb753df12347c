import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import exact_norm, release_readers, write_tensors

import gclip_cli
from gclip_cli import InputError, sources
from gclip_cli.options import Options
from gclip_cli.sources import Identity, resolve


def test_directories_and_index_files_expand_to_their_shards(tmp_path):
    shards = tmp_path / "ckpt"
    shards.mkdir()
    write_tensors(shards / "b.safetensors", "safetensors", {"w": np.ones(2)})
    write_tensors(shards / "a.npz", "npz", {"w": np.ones(2)})
    (shards / "README.txt").write_text("not data")
    (shards / "model.safetensors.index.json").write_text("{}")
    assert [p.name for p in resolve([shards]).files] == ["a.npz", "b.safetensors"]
    index = shards / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {"x": "b.safetensors", "y": "a.npz", "z": "b.safetensors"},
            }
        )
    )
    assert resolve([index]).files == (shards / "b.safetensors", shards / "a.npz")
    index.write_text("{}")
    with pytest.raises(InputError, match="not a sharded checkpoint index"):
        resolve([index])


def test_a_folder_lists_what_it_does_not_read_and_why(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    write_tensors(folder / "model.safetensors", "safetensors", {"w": np.array([3.0, 4.0])})
    torch.save({"state": {}}, folder / "optimizer.pt", _use_new_zipfile_serialization=False)
    (folder / "config.json").write_text("{}")
    (folder / ".hidden.npz").write_bytes(b"")
    (folder / "model.safetensors.index.json").write_text("{}")
    inputs = resolve([folder])
    assert inputs.files == (folder / "model.safetensors",)
    why = {n.path.name: n.reason for n in inputs.not_read}
    assert set(why) == {
        ".hidden.npz",
        "config.json",
        "model.safetensors.index.json",
        "optimizer.pt",
        "sub",
    }
    assert why["optimizer.pt"].startswith("is a PyTorch checkpoint")
    assert why[".hidden.npz"] == "is empty"
    assert "directory" in why["sub"] and "index" in why["model.safetensors.index.json"]
    report = gclip_cli.inspect_files([folder])
    assert report.global_norm == 5.0
    assert dict(report.not_read) == {str(n.path): n.reason for n in inputs.not_read}


def test_a_folder_without_tensor_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="holds no tensor files"):
        resolve([tmp_path])


def _sharded(tmp_path, weight_map, shards):
    """A checkpoint folder: *shards* (file name -> tensors) and an index of *weight_map*."""
    for name, tensors in shards.items():
        write_tensors(tmp_path / name, "safetensors", tensors)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


ONE, TWO = {"a": np.array([3.0])}, {"b": np.array([4.0])}


@pytest.mark.parametrize(
    ("weight_map", "shards", "problem"),
    [
        # a tensor in two shards would be counted twice
        (
            {"a": "1.st", "b": "2.st"},
            {"1.st": ONE, "2.st": {**TWO, **ONE}},
            "'a' in 2.st but listed for 1.st",
        ),
        # a tensor the index lists is not there
        (
            {"a": "1.st", "b": "2.st", "c": "2.st"},
            {"1.st": ONE, "2.st": TWO},
            "'c' listed for 2.st but not in it",
        ),
        # a tensor nobody listed
        ({"a": "1.st"}, {"1.st": {**ONE, **TWO}}, "'b' in 1.st but not in the index"),
    ],
)
def test_an_index_must_agree_with_its_shards(tmp_path, weight_map, shards, problem):
    index = _sharded(tmp_path, weight_map, shards)
    with pytest.raises(InputError, match=problem) as refused:
        gclip_cli.inspect_files([index])
    assert refused.value.path == str(index)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=problem):
        gclip_cli.api.rescale_files([index], out, max_norm=1.0)
    assert not out.exists()


def test_an_index_that_agrees_is_read_and_its_names_may_use_slashes(tmp_path):
    index = _sharded(tmp_path, {"a": "1.st", "b": "2.st"}, {"1.st": ONE, "2.st": TWO})
    assert gclip_cli.inspect_files([index]).global_norm == 5.0


def test_torchscript_and_keras_archives_and_zips_without_arrays_are_named_and_refused(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "grads.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(tmp_path / "model.keras", "w") as z:
        for name in ("config.json", "metadata.json", "model.weights.h5"):
            z.writestr(name, b"{}")
    with zipfile.ZipFile(tmp_path / "notes.npz", "w") as z:
        z.writestr("notes.txt", b"no arrays here")
    expected = {
        "script.pt": "is a TorchScript archive",
        "old.pt": "legacy",
        "model.keras": "is a Keras archive",
        "notes.npz": "is a zip archive without .npy arrays",
    }
    for name, message in expected.items():
        with pytest.raises(InputError, match=message):
            gclip_cli.inspect_file(tmp_path / name)
        # --file-format npz does not make them archives of nothing
        with pytest.raises(InputError, match="not a readable" if name == "old.pt" else message):
            gclip_cli.inspect_file(tmp_path / name, options=Options(file_format="npz"))
    # a PyTorch checkpoint is read as one, and named when forced into another format
    assert gclip_cli.inspect_file(tmp_path / "grads.pt").global_norm == pytest.approx(3**0.5)
    with pytest.raises(InputError, match=r"is a PyTorch checkpoint .* --file-format torch"):
        gclip_cli.inspect_file(tmp_path / "grads.pt", options=Options(file_format="npz"))


def test_one_file_named_several_ways_is_counted_once(tmp_path, monkeypatch):
    values = {"w": np.array([3.0, 4.0]), "b": np.array([12.0])}
    src = write_tensors(tmp_path / "x.safetensors", "safetensors", values)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(src)
    (tmp_path / "hard.safetensors").hardlink_to(src)
    monkeypatch.chdir(tmp_path)
    names = ["x.safetensors", str(src), "sub/../x.safetensors", "link.safetensors"]
    inputs = resolve([*names, "hard.safetensors"])
    assert inputs.files == (Path("x.safetensors"),)
    dropped = {str(n.path): n for n in inputs.not_read}
    assert set(dropped) == {*names[1:], "hard.safetensors"}
    assert all(n.same_as == Path("x.safetensors") for n in dropped.values())
    assert all("the same file as x.safetensors" in n.reason for n in dropped.values())
    report = gclip_cli.inspect_files([*names, "hard.safetensors"])
    assert report.global_norm == exact_norm(list(values.values())) == 13.0


def test_a_folder_holding_a_link_to_its_own_file_counts_it_once(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_tensors(folder / "model.safetensors", "safetensors", {"w": np.array([3.0, 4.0])})
    (folder / "zlink.safetensors").symlink_to("model.safetensors")
    report = gclip_cli.inspect_files([folder])
    assert report.global_norm == 5.0 and report.files == (str(folder / "model.safetensors"),)
    out = tmp_path / "out"
    done = gclip_cli.api.rescale_files([folder], out, max_norm=1.0)
    assert done.global_norm == 5.0 and [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert dict(done.not_read)[str(folder / "zlink.safetensors")].endswith("; not copied")


def test_an_index_and_its_shard_given_by_two_names_are_checked_once(tmp_path):
    index = _sharded(tmp_path, {"a": "1.st", "b": "2.st"}, {"1.st": ONE, "2.st": TWO})
    report = gclip_cli.inspect_files([tmp_path.resolve() / "1.st", index])
    assert report.global_norm == 5.0 and len(report.files) == 2


@pytest.mark.parametrize(
    "shard",
    ["../secret/x.safetensors", "{secret}/x.safetensors", "/etc/passwd", "link/x.safetensors"],
)
def test_an_index_may_name_only_files_in_its_own_folder(tmp_path, shard):
    secret = tmp_path / "secret"
    secret.mkdir()
    write_tensors(secret / "x.safetensors", "safetensors", ONE)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "link").symlink_to(secret)  # a folder inside that leads out
    shard = shard.format(secret=secret)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"a": shard}}))
    with pytest.raises(InputError, match=f"shard '{shard}' lies outside the index's folder"):
        resolve([index])
    out = tmp_path / "out"
    with pytest.raises(InputError, match="outside the index's folder"):
        gclip_cli.api.rescale_files([index], out, max_norm=1.0)
    assert not out.exists()


def test_an_index_may_name_files_in_folders_inside_its_own_and_links_of_a_cache(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "part").mkdir(parents=True)
    write_tensors(folder / "part" / "1.st", "safetensors", ONE)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"a": "part/1.st"}}))
    assert resolve([index]).files == (folder / "part" / "1.st",)
    # the Hugging Face cache: every file of a snapshot links into one folder of blobs
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    write_tensors(blobs / "f00d", "safetensors", ONE)
    (blobs / "cafe").write_text(index.read_text().replace("part/1.st", "1.st"))
    (snapshot / "1.st").symlink_to(blobs / "f00d")
    (snapshot / "model.safetensors.index.json").symlink_to(blobs / "cafe")
    report = gclip_cli.inspect_files([snapshot / "model.safetensors.index.json"])
    assert report.global_norm == 3.0


def test_an_identity_tells_a_file_replaced_modified_truncated_or_removed(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"12345678")
    identity = Identity.of(path)
    identity.check(path)
    other = tmp_path / "other.bin"
    other.write_bytes(b"12345678")
    os.utime(other, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    other.replace(path)
    with pytest.raises(InputError, match="replaced by another file"):
        identity.check(path)
    identity = Identity.of(path)
    os.truncate(path, 4)
    with pytest.raises(InputError, match="size went from 8 to 4 bytes"):
        identity.check(path)
    identity = Identity.of(path)
    os.utime(path, ns=(0, identity.mtime_ns + 1))
    with pytest.raises(InputError, match="modified"):
        identity.check(path)
    path.unlink()
    with pytest.raises(InputError, match="was removed while gclip was reading it"):
        identity.check(path)


WEIGHT_MAP = '{"metadata": {"total_size": 8}, "weight_map": {"w": "a.safetensors"}'


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (WEIGHT_MAP + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "levels deep"),
        ('{"weight_map": ' + "{" * 100_000 + "}" * 100_000 + "}", "levels deep"),
        ('{"weight_map": {"w": 5}}', "gives tensor 'w' the shard 5, not a file name"),
        ('{"weight_map": {"w": ["a.safetensors"]}}', "the shard ['a.safetensors']"),
        ('{"weight_map": {"w": {"f": 1}}}', "the shard {'f': 1}"),
        ('{"weight_map": {"w": null}}', "the shard None"),
        ('{"weight_map": {"w": ""}}', "the shard ''"),
        ('{"weight_map": {"w": "' + "x" * 70_000 + '"}}', "the shard 'xxxxxxxx"),
        ('{"weight_map": {"w": "a/' + "x" * 256 + '.safetensors"}}', "not a file name"),
        ('{"weight_map": {"w": "a\\u0000.safetensors"}}', "the shard 'a\\x00.safetensors'"),
        (
            '{"weight_map": {"w": "a.safetensors", "' + "y" * 70_000 + '": "a.safetensors"}}',
            "tensor 'yyyyyy",
        ),
        ('{"weight_map": ["a.safetensors"]}', "no weight_map object"),
        ("[1]", "no weight_map object"),
        ('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}', "digits"),
        (WEIGHT_MAP + ', "weight_map": {}}', "repeats the key 'weight_map'"),
        ('{"weight_map": {"w": "a.safetensors"}', "brackets do not match"),
        ('{"weight_map": {"w": "a.safetensors",}}', "not valid JSON"),
    ],
)
def test_hostile_indexes_are_one_line_errors(tmp_path, text, problem):
    """Each was a traceback (RecursionError, TypeError of a path joined to a number) or a
    message naming a Python error."""
    write_tensors(tmp_path / "a.safetensors", "safetensors", {"w": np.ones(2)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "gclip_cli", "norm", str(index)], capture_output=True, text=True
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith(f"gclip: error: {index}: ") and proc.stderr.count("\n") == 1
    assert problem in proc.stderr and len(proc.stderr) < 400


def test_an_index_is_read_within_a_size_limit(tmp_path, monkeypatch):
    write_tensors(tmp_path / "a.safetensors", "safetensors", {"w": np.ones(2)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"w": "a.safetensors"}}')
    assert resolve([index]).files == (tmp_path / "a.safetensors",)
    monkeypatch.setattr(sources, "MAX_INDEX_BYTES", 30)
    with pytest.raises(InputError, match="larger than the limit of 30 bytes"):
        resolve([index])


def test_an_index_that_is_a_pipe_is_refused(tmp_path):
    """Its shards are found beside it: an index must be a regular file (gclip used to wait for
    a writer, then read all it wrote)."""
    index = tmp_path / "model.safetensors.index.json"
    os.mkfifo(index)
    release_readers(index)
    with pytest.raises(InputError, match="is a pipe"):
        resolve([index])
