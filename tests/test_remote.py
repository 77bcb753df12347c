"""URLs as inputs and outputs (remote.py): memory:// in this process for the pieces, and a real
S3 API (moto's server on 127.0.0.1, started here on a free port) for the commands, run as
subprocesses, compared byte for byte with the same commands on local files."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import progress_by_phase, write_tensors

from gclip_cli import inspect_files, remote, rescale_file, rescale_files, urls
from gclip_cli.errors import InputError, OutputError
from gclip_cli.formats import PlainValues, open_file
from gclip_cli.progress import Progress

fsspec = pytest.importorskip("fsspec", reason="needs gclip[remote-test]")
pytest.importorskip("s3fs", reason="needs gclip[remote-test]")
pytest.importorskip("moto", reason="needs gclip[remote-test]")
boto3 = pytest.importorskip("boto3", reason="needs gclip[remote-test]")

SECRET = "gclip-test-secret-Zq8v"  # the dummy secret key: it must never be printed
# A client that gives up at once on an endpoint that does not answer (a test must not hang).
NO_RETRIES = ("--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}}')


# --- memory:// in this process ----------------------------------------------------------


@pytest.fixture
def memory():
    fs = fsspec.filesystem("memory")
    root = f"/gclip-{uuid.uuid4().hex[:8]}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_an_object_asked_to_be_copied_is_read_as_a_local_copy_shown_by_its_url(
    memory, make_file, monkeypatch
):
    fs, root = memory
    monkeypatch.setenv("GCLIP_REMOTE_COPY", "1")  # every format is read by ranges otherwise
    local = make_file("hdf5", {"w": np.arange(6, dtype=np.float32)})
    fs.pipe_file(f"{root}/g.h5", local.read_bytes())
    url = f"memory://{root}/g.h5"
    with remote.staged_inputs([url, str(local)], {}) as (paths, shown):
        assert Path(paths[0]).read_bytes() == local.read_bytes()
        assert Path(paths[0]).name == "g.h5"  # history reads steps from names
        assert paths[1] == str(local)
        assert shown == {paths[0]: url}
        staged = Path(paths[0])
    assert not staged.exists()  # removed afterwards


def test_a_safetensors_object_is_read_by_ranges_through_a_stand_in(memory, make_file):
    fs, root = memory
    values = np.random.default_rng(3).standard_normal(300_000).astype(np.float32)
    local = make_file("safetensors", {"w": values, "n": np.arange(3)})
    fs.pipe_file(f"{root}/g.safetensors", local.read_bytes())
    url = f"memory://{root}/g.safetensors"
    with remote.staged_inputs([url], {}) as ((path,), shown):
        stand_in = Path(path)
        assert shown == {path: url}
        assert stand_in.stat().st_size == local.stat().st_size  # as checks of space see it
        assert stand_in.stat().st_blocks * 512 < 64 << 10  # but no copy: sparse
        with closing(open_file(stand_in)) as tfile:
            assert not isinstance(tfile, PlainValues)  # one process, in order
            tensor = next(t for t in tfile.tensors if t.name == "w")
            chunks = list(tfile.read_chunks(tensor, 100_000))
            assert tfile.attribute("missing") is None
            assert tfile.read_array(next(t for t in tfile.tensors if t.name == "n")).tolist() == [
                0,
                1,
                2,
            ]
        assert len(chunks) == 12
        assert np.array_equal(np.concatenate(chunks), values)


def test_gclip_remote_copy_asks_for_local_copies(memory, make_file, monkeypatch):
    fs, root = memory
    local = make_file("safetensors", {"w": np.arange(6, dtype=np.float32)})
    fs.pipe_file(f"{root}/g.safetensors", local.read_bytes())
    monkeypatch.setenv("GCLIP_REMOTE_COPY", "1")
    with remote.staged_inputs([f"memory://{root}/g.safetensors"], {}) as ((path,), _):
        assert Path(path).read_bytes() == local.read_bytes()


@pytest.mark.parametrize("fmt_in", ["safetensors", "npz"])
def test_the_library_takes_urls(memory, make_file, fmt_in, tmp_path):
    fs, root = memory
    local = make_file(fmt_in, {"w": np.arange(1, 7, dtype=np.float32)})
    fs.pipe_file(f"{root}/g", local.read_bytes())
    url = f"memory://{root}/g"
    report = inspect_files([url])
    assert report.files == (url,)
    assert report.global_norm == inspect_files([local]).global_norm
    reference = tmp_path / "reference"
    rescale_file(local, reference, max_norm=1.0)
    rewritten = rescale_file(url, f"memory://{root}/out", max_norm=1.0)
    assert rewritten.output == f"memory://{root}/out"
    assert fs.cat_file(f"{root}/out") == reference.read_bytes()


def test_a_stand_in_is_sent_to_a_worker_as_what_it_names(memory, make_file):
    fs, root = memory
    local = make_file("safetensors", {"w": np.arange(6, dtype=np.float32)})
    fs.pipe_file(f"{root}/g.safetensors", local.read_bytes())
    url = f"memory://{root}/g.safetensors"
    with remote.staged_inputs([url, str(local)], {}) as ((stand_in, plain), _):
        sent = pickle.loads(pickle.dumps(remote.portable(Path(stand_in))))
        assert isinstance(sent, remote.ObjectSource) and sent.stand_in.url == url
        assert remote.portable(Path(plain)) == Path(plain)  # a file: its path, as before
        with remote.reachable(sent) as there:
            assert there != Path(stand_in)  # a stand-in of the worker's own
            with closing(open_file(there)) as tfile:
                assert tfile.read_array(tfile.tensors[0]).tolist() == list(range(6))
        assert not there.exists()


def test_an_error_about_a_local_copy_names_the_url(memory):
    fs, root = memory
    fs.pipe_file(f"{root}/g.safetensors", b"x")
    url = f"memory://{root}/g.safetensors"
    with (
        pytest.raises(InputError) as caught,
        remote.staged_inputs([url], {}) as (paths, _),
    ):
        raise InputError(paths[0], "not a safetensors file")
    assert caught.value.path == url


def test_a_missing_object_is_an_input_error(memory):
    _, root = memory
    with (
        pytest.raises(InputError, match="no such object"),
        remote.staged_inputs([f"memory://{root}/absent.npz"], {}),
    ):
        pass


def test_an_output_url_appears_only_when_complete(memory):
    fs, root = memory
    url = f"memory://{root}/out.bin"
    with remote.uploaded_file(url, {}) as local:
        local.write_bytes(b"complete")
        assert not fs.exists(f"{root}/out.bin")
    assert fs.cat_file(f"{root}/out.bin") == b"complete"


@pytest.mark.parametrize("failure", [OutputError("x", "full"), KeyboardInterrupt()])
def test_a_failure_before_the_upload_leaves_no_object(memory, failure):
    fs, root = memory
    with pytest.raises(type(failure)), remote.uploaded_file(f"memory://{root}/o.bin", {}) as p:
        p.write_bytes(b"half")
        raise failure
    assert not fs.exists(f"{root}/o.bin")


def test_a_failure_during_the_upload_leaves_no_object(memory, tmp_path):
    fs, root = memory
    local = tmp_path / "big.bin"
    local.write_bytes(b"y" * (20 << 20))

    def interrupt_after_one_piece(event):  # Ctrl-C, once the first piece is sent
        if isinstance(event, int):
            raise KeyboardInterrupt

    target = urls.open_remote(f"memory://{root}/big.bin", {})
    with pytest.raises(KeyboardInterrupt):
        remote.upload(local, target, {}, Progress(interrupt_after_one_piece))
    assert not fs.exists(f"{root}/big.bin")


def test_downloads_and_uploads_report_their_bytes(memory, tmp_path):
    fs, root = memory
    fs.pipe_file(f"{root}/in.bin", b"z" * 1000)
    events = []
    with remote.staged_inputs([f"memory://{root}/in.bin"], {}, events.append) as (paths, _):
        assert Path(paths[0]).stat().st_size == 1000
    with remote.uploaded_file(f"memory://{root}/o.bin", {}, progress=events.append) as local:
        local.write_bytes(b"w" * 300)
    assert progress_by_phase(events) == [("downloading", 1000, 1000), ("uploading", 300, 300)]


def test_no_clobber_refuses_an_existing_object_before_any_work(memory):
    fs, root = memory
    fs.pipe_file(f"{root}/o.bin", b"old")
    url = f"memory://{root}/o.bin"
    with (
        pytest.raises(OutputError, match="--no-clobber"),
        remote.uploaded_file(url, {}, clobber=False),
    ):
        pytest.fail("the work began")
    assert fs.cat_file(f"{root}/o.bin") == b"old"


# --- a real S3 API: moto's server ---------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    client: object
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def put(self, path: Path, key: str) -> str:
        self.client.upload_file(str(path), self.name, key)
        return f"{self.url}/{key}"

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def listed(self) -> list[str]:
        found = self.client.list_objects_v2(Bucket=self.name).get("Contents", [])
        return sorted(o["Key"] for o in found)

    def open_uploads(self) -> list[str]:
        found = self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])
        return [u["Key"] for u in found]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(port: int, server: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail("moto's server stopped at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail("moto's server did not start")


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free port of 127.0.0.1, stopped after this module's tests."""
    port = _free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(port, server)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> Bucket:
    """A new bucket; the endpoint and dummy credentials in the environment, as boto3, the AWS
    CLI and gclip's subprocesses read them."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    client = boto3.client("s3")
    name = f"gclip-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(client, name)


def gclip(*args: str, **settings) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gclip_cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, **settings)


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.0.weight": rng.standard_normal((64, 33)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(33).astype(np.float16),
        "step": np.array(7, dtype=np.int64),
    }


def _without_names(report: dict) -> dict:
    """A JSON report with the file names left out (the rest must match exactly)."""
    text = json.dumps(report)
    for name in [report.get("file"), *report.get("files", []), report.get("output")]:
        if name:
            text = text.replace(json.dumps(name)[1:-1], "NAME")
    return json.loads(text)


def test_inspect_of_an_object_matches_inspect_of_the_file(bucket, make_file, fmt):
    local = make_file(fmt, _tensors())
    url = bucket.put(local, f"dumps/{local.name}")
    here = gclip("inspect", "--format", "json", str(local))
    there = gclip("inspect", "--format", "json", url)
    assert here.returncode == there.returncode == 0, there.stderr
    report = json.loads(there.stdout)
    assert report["file"] == url
    assert _without_names(report) == _without_names(json.loads(here.stdout))


@pytest.mark.parametrize("direction", ["remote->remote", "remote->local", "local->remote"])
def test_rescale_through_s3_writes_the_bytes_of_the_local_run(
    bucket, make_file, fmt, tmp_path, direction
):
    local = make_file(fmt, _tensors())
    reference = tmp_path / f"reference{local.suffix}"
    assert gclip("rescale", str(local), str(reference), "--max-norm", "1").returncode == 0
    source = str(local) if direction.startswith("local") else bucket.put(local, "in/g")
    out_local = tmp_path / f"out{local.suffix}"
    target = str(out_local) if direction.endswith("local") else f"{bucket.url}/out/g"
    done = gclip("rescale", source, target, "--max-norm", "1", "--format", "json")
    assert done.returncode == 0, done.stderr
    written = out_local.read_bytes() if direction.endswith("local") else bucket.get("out/g")
    assert written == reference.read_bytes()
    assert json.loads(done.stdout)["output"] == target
    assert bucket.open_uploads() == []


def _checkpoint(folder: Path, make_file, fmt: str = "safetensors") -> Path:
    """A sharded checkpoint of two shards of format *fmt* (80 KB each) and its index, plus a
    config file."""
    folder.mkdir()
    weight_map = {}
    suffix = {"safetensors": ".safetensors", "npz": ".npz", "torch": ".pt", "hdf5": ".h5"}[fmt]
    for n in (1, 2):
        name = f"model-{n:05d}-of-00002{suffix}"
        tensors = {f"h.{n}.w": np.full((100, 200), n / 3, dtype=np.float32)}
        shutil.move(make_file(fmt, tensors, name=f"shard{n}"), folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    index = folder / f"model{suffix}.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return index


@pytest.mark.parametrize("scheduler", [None, "local:2"])
def test_a_sharded_checkpoint_goes_from_s3_to_s3(bucket, make_file, tmp_path, scheduler):
    if scheduler:
        pytest.importorskip("distributed", reason="needs gclip[dask]")
    index = _checkpoint(tmp_path / "ckpt", make_file)
    for path in index.parent.iterdir():
        bucket.put(path, f"ckpt/{path.name}")
    reference = tmp_path / "reference"
    local_run = gclip("rescale", str(index), "--out-dir", str(reference), "--max-norm", "1")
    assert local_run.returncode == 0, local_run.stderr
    args = [f"{bucket.url}/ckpt/{index.name}", "--out-dir", f"{bucket.url}/out/"]
    done = gclip(
        "rescale", *args, "--max-norm", "1", *(["--scheduler", scheduler] * bool(scheduler))
    )
    assert done.returncode == 0, done.stderr
    expected = sorted(p.name for p in reference.iterdir())
    assert bucket.listed()[-len(expected) :] == [f"out/{name}" for name in expected]
    for name in expected:
        assert bucket.get(f"out/{name}") == (reference / name).read_bytes(), name
    assert bucket.open_uploads() == []


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "torch"])
def test_dask_workers_read_and_write_the_objects_themselves(
    bucket, make_file, tmp_path, monkeypatch, fmt
):
    # The workers' temporary folder is not the client's: a stand-in the client made is then not
    # honoured by a worker (as on another machine, where it does not exist), so a task that
    # named the client's stand-in instead of the object would fail.  And the client uploads
    # only what it writes itself (the index): the shards come from the workers.  No copy of
    # a shard is made on the client either (the spool limit refuses one): a worker on another
    # machine could not read it.
    pytest.importorskip("distributed", reason="needs gclip[dask]")
    index = _checkpoint(tmp_path / "ckpt", make_file, fmt)
    for path in index.parent.iterdir():
        bucket.put(path, f"ckpt/{path.name}")
    reference = tmp_path / "reference"
    rescale_files([index], reference, max_norm=1.0)
    (tmp_path / "client").mkdir()
    (tmp_path / "workers").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "client"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "workers"))  # what the spawned workers read
    uploaded_here = []
    real_upload = remote.upload

    def upload(local, target, *args):
        uploaded_here.append(target.url)
        real_upload(local, target, *args)

    monkeypatch.setattr(remote, "upload", upload)
    monkeypatch.setenv("GCLIP_SPOOL_LIMIT", "64K")  # less than a shard
    url = f"{bucket.url}/ckpt/{index.name}"
    rescale_files([url], f"{bucket.url}/out/", max_norm=1.0, scheduler="local:2")
    for path in reference.iterdir():
        assert bucket.get(f"out/{path.name}") == path.read_bytes(), path.name
    assert uploaded_here == [f"{bucket.url}/out/{index.name}"]
    assert list((tmp_path / "workers").iterdir()) == []  # their stand-ins and outputs removed
    assert bucket.open_uploads() == []


def test_dask_workers_read_hdf5_objects_by_their_urls(bucket, make_file, tmp_path, monkeypatch):
    # As above, but HDF5 outputs are staged by the workers (no spool limit): the client is
    # checked to download nothing, and its stand-ins are not the workers' (another folder).
    pytest.importorskip("distributed", reason="needs gclip[dask]")
    index = _checkpoint(tmp_path / "ckpt", make_file, "hdf5")
    for path in index.parent.iterdir():
        bucket.put(path, f"ckpt/{path.name}")
    reference = tmp_path / "reference"
    rescale_files([index], reference, max_norm=1.0)
    (tmp_path / "client").mkdir()
    (tmp_path / "workers").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "client"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "workers"))
    downloaded = []
    real_make_room = remote._make_room

    def make_room(url, folder, size, output=False):
        if not output:  # room for a download
            downloaded.append(url)
        real_make_room(url, folder, size, output)

    monkeypatch.setattr(remote, "_make_room", make_room)
    url = f"{bucket.url}/ckpt/{index.name}"
    rescale_files([url], f"{bucket.url}/out/", max_norm=1.0, scheduler="local:2")
    for path in reference.iterdir():
        assert bucket.get(f"out/{path.name}") == path.read_bytes(), path.name
    assert downloaded == [url]  # the index only: the shards are read by the workers
    assert list((tmp_path / "workers").iterdir()) == []
    assert bucket.open_uploads() == []


def test_dask_workers_refuse_to_write_over_an_input(bucket, make_file, tmp_path):
    pytest.importorskip("distributed", reason="needs gclip[dask]")
    index = _checkpoint(tmp_path / "ckpt", make_file)
    for path in index.parent.iterdir():
        bucket.put(path, f"ckpt/{path.name}")
    before = {key: bucket.get(key) for key in bucket.listed()}
    url = f"{bucket.url}/ckpt/{index.name}"
    with pytest.raises(OutputError, match="is an input"):
        rescale_files([url], f"{bucket.url}/ckpt/", max_norm=1e-3, scheduler="local:2")
    assert {key: bucket.get(key) for key in bucket.listed()} == before


def test_an_out_dir_over_the_inputs_replaces_none(bucket, make_file, tmp_path):
    index = _checkpoint(tmp_path / "ckpt", make_file)
    for path in index.parent.iterdir():
        bucket.put(path, f"ckpt/{path.name}")
    before = {key: bucket.get(key) for key in bucket.listed()}
    args = [f"{bucket.url}/ckpt/{index.name}", "--out-dir", f"{bucket.url}/ckpt/"]
    done = gclip("rescale", *args, "--max-norm", "1e-3")
    assert done.returncode == 5 and "is an input" in done.stderr, done.stderr
    assert {key: bucket.get(key) for key in bucket.listed()} == before
    assert bucket.open_uploads() == []


def test_a_prefix_is_read_as_a_folder(bucket, make_file, tmp_path):
    index = _checkpoint(tmp_path / "ckpt", make_file)
    for path in index.parent.iterdir():
        bucket.put(path, f"ckpt/{path.name}")
    (index.parent / "inner").mkdir()
    bucket.put(index, "ckpt/inner/x.json")
    here = gclip("inspect", "--format", "json", str(index.parent))
    there = gclip("inspect", "--format", "json", f"{bucket.url}/ckpt/")
    assert there.returncode == 0, there.stderr
    local, remote = json.loads(here.stdout), json.loads(there.stdout)
    assert remote["global_norm"] == local["global_norm"]
    shown = json.dumps(remote).replace(f"{bucket.url}/ckpt", str(index.parent))
    assert json.loads(shown) == local  # the inner folder too, listed as not read


def test_a_missing_object_is_one_line_and_exit_3(bucket):
    done = gclip("inspect", f"{bucket.url}/absent.safetensors")
    assert done.returncode == 3
    assert done.stderr == f"gclip: error: {bucket.url}/absent.safetensors: no such object\n"


def test_a_missing_bucket_for_the_output_is_exit_5(bucket, make_file):
    local = make_file("npz", _tensors())
    done = gclip("rescale", str(local), f"s3://{bucket.name}-absent/o.npz", "--max-norm", "1")
    assert done.returncode == 5, done.stderr
    assert done.stderr.startswith("gclip: error: s3://") and done.stderr.count("\n") == 1


def test_an_unreachable_endpoint_is_one_line_and_leaves_nothing(bucket, make_file):
    local = make_file("safetensors", _tensors())
    url = bucket.put(local, "g.safetensors")
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    env = {**os.environ, "AWS_ENDPOINT_URL": closed}
    started = time.monotonic()
    reading = gclip("inspect", url, *NO_RETRIES, env=env)
    writing = gclip(
        "rescale", str(local), f"{bucket.url}/o", "--max-norm", "1", *NO_RETRIES, env=env
    )
    assert time.monotonic() - started < 60
    assert reading.returncode == 3 and "cannot read" in reading.stderr
    assert writing.returncode == 5 and "cannot write" in writing.stderr
    for done in (reading, writing):
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert bucket.listed() == ["g.safetensors"]


def test_a_refused_input_leaves_no_object(bucket, make_file, fmt):
    local = make_file(fmt, {"g": np.array([1.0, np.nan], dtype=np.float32)})
    done = gclip("rescale", str(local), f"{bucket.url}/o", "--max-norm", "1")
    assert done.returncode == 4
    assert bucket.listed() == [] and bucket.open_uploads() == []


def test_no_clobber_keeps_an_existing_object(bucket, make_file):
    local = make_file("safetensors", _tensors())
    url = bucket.put(local, "o.safetensors")
    done = gclip("rescale", str(local), url, "--max-norm", "1e-3", "--no-clobber")
    assert done.returncode == 5 and "--no-clobber" in done.stderr
    assert bucket.get("o.safetensors") == local.read_bytes()


def test_the_input_object_is_never_the_output(bucket, make_file):
    local = make_file("safetensors", _tensors())
    url = bucket.put(local, "g.safetensors")
    done = gclip("rescale", url, url, "--max-norm", "1e-3")
    assert done.returncode == 5 and "is the input" in done.stderr
    assert bucket.get("g.safetensors") == local.read_bytes()


def test_an_upload_goes_in_parts_of_8_mib(bucket, tmp_path):
    # s3fs's own parts are 50 MiB, and an upload held several of them in memory at once.
    local = tmp_path / "big.bin"
    local.write_bytes(np.random.default_rng(5).bytes(20 << 20))
    target = urls.open_remote(f"{bucket.url}/big.bin", {})
    remote.upload(local, target, {})
    assert bucket.get("big.bin") == local.read_bytes()
    first = bucket.client.head_object(Bucket=bucket.name, Key="big.bin", PartNumber=1)
    assert first["PartsCount"] == 3 and first["ContentLength"] == 8 << 20
    assert remote.part_size(1 << 40) * 10_000 >= 1 << 40  # S3's most parts: still enough


def test_ctrl_c_during_the_upload_aborts_it(bucket, make_file, tmp_path):
    values = np.random.default_rng(1).standard_normal(12 << 20).astype(np.float32)  # 48 MiB
    local = make_file("safetensors", {"g": values})
    args = ["rescale", str(local), f"{bucket.url}/big.safetensors", "--max-norm", "1"]
    five_mib_parts = ("--storage-option", f"default_block_size={5 << 20}")
    returncode, stderr = _interrupted_once_uploading(bucket, [*args, *five_mib_parts])
    assert returncode == 130, stderr
    assert bucket.listed() == [] and bucket.open_uploads() == []


def test_secrets_are_never_printed(bucket, make_file):
    local = make_file("npz", _tensors())
    closed = f"http://127.0.0.1:{_free_port()}"
    given = ("--storage-option", f"secret={SECRET}x", "--storage-option", f"endpoint_url={closed}")
    runs = [
        gclip("inspect", f"{bucket.url}/absent.npz"),
        gclip("inspect", f"{bucket.url}/absent.npz", *given, *NO_RETRIES),
        gclip("rescale", str(local), f"{bucket.url}/o.npz", "--max-norm", "1", *given, *NO_RETRIES),
        gclip("inspect", f"{bucket.url}/x.npz", "--storage-option", f"no-value-{SECRET}"),
    ]
    for done in runs:
        assert done.returncode != 0
        assert SECRET not in done.stdout + done.stderr


def test_local_paths_import_no_fsspec(make_file):
    local = make_file("safetensors", _tensors())
    code = (
        "import sys; sys.argv = ['gclip', 'inspect', sys.argv[1]]\n"
        "from gclip_cli.__main__ import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('fsspec' in sys.modules, 'botocore' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(local)], capture_output=True, text=True)
    assert done.stderr.strip().splitlines()[-1] == "False False"


@pytest.mark.parametrize("command", [("inspect", "--format", "json"), ("norm",)])
def test_objects_need_no_local_copy(bucket, make_file, fmt, command):
    values = np.random.default_rng(2).standard_normal(1 << 16).astype(np.float32)
    local = make_file(fmt, {"g": values})
    url = bucket.put(local, f"g.{fmt}")
    env = {**os.environ, "GCLIP_SPOOL_LIMIT": "64K"}  # less than the object: no copy may be made
    here = gclip(*command, str(local))
    there = gclip(*command, url, env=env)
    assert there.returncode == 0, there.stderr
    copied = gclip(*command, url, env={**env, "GCLIP_REMOTE_COPY": "1"})  # the control
    assert copied.returncode == 3 and "GCLIP_SPOOL_LIMIT" in copied.stderr
    if command == ("norm",):
        assert there.stdout == here.stdout
    else:
        assert _without_names(json.loads(there.stdout)) == _without_names(json.loads(here.stdout))


def _peak_rss(*args: str, env: dict[str, str] | None = None) -> int:
    """The largest resident set, in bytes, of gclip *args* and the processes it starts."""
    code = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run([sys.executable, '-m', 'gclip_cli', *sys.argv[1:]])\n"
        "assert done.returncode == 0\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]) * 1024  # Linux counts KiB


def test_memory_stays_bounded_for_a_large_object(bucket, make_file, tmp_path):
    values = np.random.default_rng(4).standard_normal(48 << 20).astype(np.float32)  # 192 MiB
    local = make_file("safetensors", {"g": values})
    del values
    url = bucket.put(local, "big.safetensors")
    options = ("--chunk-size", "8M", "-j", "1", "--max-norm", "1")
    here = _peak_rss("rescale", str(local), str(tmp_path / "o.safetensors"), *options)
    there = _peak_rss("rescale", url, str(tmp_path / "r.safetensors"), *options)
    assert (tmp_path / "r.safetensors").read_bytes() == (tmp_path / "o.safetensors").read_bytes()
    # fsspec, s3fs and botocore loaded, two 8 MiB windows: well under the object's 192 MiB
    assert there < here + (96 << 20), (here, there)


def test_memory_stays_bounded_for_a_large_npz_object(bucket, tmp_path):
    local = tmp_path / "big.npz"
    values = np.random.default_rng(5).standard_normal(64 << 20).astype(np.float32)  # 256 MiB
    np.savez(local, g=values, step=np.arange(3))
    del values
    url = bucket.put(local, "big.npz")
    options = ("--chunk-size", "8M", "-j", "1", "--max-norm", "1")
    here = _peak_rss("rescale", str(local), str(tmp_path / "o.npz"), *options)
    no_copy = {**os.environ, "GCLIP_SPOOL_LIMIT": "1M"}  # a local copy of the object is refused
    there = _peak_rss("rescale", url, str(tmp_path / "r.npz"), *options, env=no_copy)
    assert (tmp_path / "r.npz").read_bytes() == (tmp_path / "o.npz").read_bytes()
    # fsspec, s3fs and botocore loaded, two 16 MiB windows: well under the object's 256 MiB
    assert there < here + (96 << 20), (here, there)


def test_a_deflated_npz_object_rescales_as_its_file(bucket, tmp_path):
    local = tmp_path / "g.npz"
    rng = np.random.default_rng(8)
    np.savez_compressed(local, a=rng.standard_normal((300, 70)).astype(np.float32), n=np.arange(5))
    reference = tmp_path / "reference.npz"
    assert gclip("rescale", str(local), str(reference), "--max-norm", "1").returncode == 0
    url = bucket.put(local, "in/g.npz")
    # read by ranges: no copy (the output, rebuilt, is staged: it goes to a local file here)
    env = {**os.environ, "GCLIP_SPOOL_LIMIT": "1K"}
    out = tmp_path / "out.npz"
    done = gclip("rescale", url, str(out), "--max-norm", "1", env=env)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == reference.read_bytes()
    done = gclip("rescale", url, f"{bucket.url}/out/g.npz", "--max-norm", "1")
    assert done.returncode == 0, done.stderr
    assert bucket.get("out/g.npz") == reference.read_bytes()


@pytest.mark.parametrize("fmt", ["npz", "torch"])
def test_a_truncated_zip_object_is_one_line_and_exit_3(bucket, make_file, tmp_path, fmt):
    local = make_file(fmt, _tensors())
    cut = tmp_path / "cut"
    cut.write_bytes(local.read_bytes()[:-40])  # its end record lost
    env = {**os.environ, "GCLIP_SPOOL_LIMIT": "1K"}  # refused as read by ranges, not copied
    url = bucket.put(cut, "cut")
    done = gclip("rescale", url, f"{bucket.url}/out", "--max-norm", "1", env=env)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gclip: error: s3://")
    assert "zip" in done.stderr and "Traceback" not in done.stderr
    assert "out" not in bucket.listed() and bucket.open_uploads() == []


def test_a_truncated_hdf5_object_is_one_line_and_exit_3(bucket, make_file, tmp_path):
    local = make_file("hdf5", _tensors())
    cut = tmp_path / "cut"
    cut.write_bytes(local.read_bytes()[: local.stat().st_size // 2])
    env = {**os.environ, "GCLIP_SPOOL_LIMIT": "1K"}  # refused as read by ranges, not copied
    url = bucket.put(cut, "cut")
    # (the rescale writes a local file: an HDF5 output to upload would be refused first, for
    # want of room to stage it under this limit)
    for command in (("inspect",), ("rescale", "--max-norm", "1", str(tmp_path / "out.h5"))):
        done = gclip(command[0], url, *command[1:], env=env)
        assert done.returncode == 3, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("gclip: error: s3://")
        assert "HDF5" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize(
    "command",
    [
        ("norm",),
        ("check", "--max-norm", "1", "--json"),
        ("history", "--format", "json"),
        ("diff", "--format", "json"),
    ],
)
def test_every_reading_command_reads_objects_as_files(bucket, make_file, fmt, command):
    files = [make_file(fmt, _tensors(seed), name=f"step_{seed}") for seed in (1, 2)]
    urls = [bucket.put(path, f"run/{path.name}") for path in files]
    here = gclip(*command, *map(str, files))
    there = gclip(*command, *urls)
    assert there.returncode == here.returncode, there.stderr
    shown = there.stdout
    for path, url in zip(files, urls, strict=True):
        shown = shown.replace(url, str(path))
    assert shown == here.stdout


@pytest.mark.parametrize(
    "command", [("clip-value", "--max-value", "0.5"), ("normalize", "--target-norm", "3")]
)
def test_every_rewriting_command_writes_objects_as_files(bucket, make_file, fmt, tmp_path, command):
    local = make_file(fmt, _tensors())
    reference = tmp_path / f"reference{local.suffix}"
    assert gclip(*command, str(local), str(reference)).returncode == 0
    done = gclip(*command, bucket.put(local, "in/g"), f"{bucket.url}/out/g")
    assert done.returncode == 0, done.stderr
    assert bucket.get("out/g") == reference.read_bytes()


# --- outputs streamed into their uploads ----------------------------------------------------


def _file_size_limit(limit: int):
    """For a subprocess: no file it writes may grow past *limit* bytes (a pipe may)."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limited


def test_outputs_are_streamed_with_no_local_copy(bucket, make_file, tmp_path):
    values = np.random.default_rng(6).standard_normal(3 << 20).astype(np.float32)  # 12 MiB
    done = {}
    compressed = tmp_path / "big_compressed.npz"  # rebuilt: each member rehearsed first
    np.savez_compressed(compressed, g=values, step=np.array(3))
    for fmt in ("safetensors", "npz", "torch", "compressed npz", "hdf5"):
        if fmt == "compressed npz":
            local = compressed
        else:
            local = make_file(fmt, {"g": values, "step": np.array(3)}, name=f"big_{fmt}")
        reference = tmp_path / f"reference{local.suffix}"
        assert gclip("rescale", str(local), str(reference), "--max-norm", "1").returncode == 0
        key = f"out_{fmt.replace(' ', '_')}{local.suffix}"
        args = ("rescale", str(local), f"{bucket.url}/{key}", "--max-norm", "1")
        # no file of this process may pass 1 MiB: a local copy of the output would be killed
        done[fmt] = gclip(*args, preexec_fn=_file_size_limit(1 << 20))
        if fmt != "hdf5":
            assert done[fmt].returncode == 0, (fmt, done[fmt].stderr)
            assert bucket.get(key) == reference.read_bytes(), fmt
    assert done["hdf5"].returncode != 0  # staged locally (HDF5 writes anywhere): the control
    assert "out_hdf5.h5" not in bucket.listed() and bucket.open_uploads() == []


def test_a_streamed_upload_appears_only_when_complete(bucket):
    data = np.random.default_rng(7).bytes(20 << 20)
    url = f"{bucket.url}/o.bin"
    with remote.streamed_upload(url, {}, size=len(data)) as path:
        child = os.fork()  # written by a forked child, as pass 2 of a lone file is
        if child == 0:
            try:
                Path(path).write_bytes(data)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        assert bucket.listed() == []
    assert bucket.get("o.bin") == data
    assert bucket.open_uploads() == []


def test_a_failure_while_streaming_aborts_the_upload(bucket):
    with pytest.raises(OutputError), remote.streamed_upload(f"{bucket.url}/o.bin", {}) as path:
        with open(path, "wb") as out:
            out.write(b"x" * (20 << 20))  # two parts sent, the third begun
        assert bucket.open_uploads() == ["o.bin"]
        raise OutputError("o.bin", "the writer failed")
    assert bucket.listed() == [] and bucket.open_uploads() == []


def test_a_failed_upload_never_blocks_the_writer(memory, monkeypatch):
    fs, root = memory

    class Failing(io.BytesIO):
        def write(self, data):
            if self.tell() > (8 << 20):
                raise ConnectionError("the store went away")
            return super().write(data)

        def discard(self):
            self.discarded = True

    failing = Failing()
    monkeypatch.setattr(remote, "_uncommitted", lambda *args: failing)
    url = f"memory://{root}/o.bin"
    with (
        pytest.raises(OutputError, match="went away"),
        remote.streamed_upload(url, {}) as path,
        open(path, "wb") as out,
    ):
        for _ in range(8):  # far more than the pipe holds: read and dropped
            out.write(b"y" * (4 << 20))
    assert failing.discarded and not fs.exists(f"{root}/o.bin")


def test_an_output_staged_first_is_refused_where_the_disk_has_no_room(bucket, make_file):
    values = np.random.default_rng(8).standard_normal(1 << 16).astype(np.float32)  # 256 KiB
    local = make_file("hdf5", {"g": values})
    url = f"{bucket.url}/o.h5"
    env = {**os.environ, "GCLIP_SPOOL_LIMIT": "64K"}  # HDF5 is staged: less than it needs
    done = gclip("rescale", str(local), url, "--max-norm", "1", env=env)
    assert done.returncode == 5, done.stderr
    assert done.stderr.startswith(f"gclip: error: {url}: needs ") and "TMPDIR" in done.stderr
    assert bucket.listed() == [] and bucket.open_uploads() == []
    streamed = make_file("safetensors", {"g": values})  # streamed: needs no room
    target = f"{bucket.url}/o.safetensors"
    done = gclip("rescale", str(streamed), target, "--max-norm", "1", env=env)
    assert done.returncode == 0, done.stderr


def test_an_hdf5_output_reports_its_upload(memory, make_file):
    # HDF5's writer needs a named file: this process's temporary file, uploaded when complete
    fs, root = memory
    local = make_file("hdf5", _tensors())
    events = []
    rescale_file(local, f"memory://{root}/o.h5", max_norm=1e-3, progress=events.append)
    phases = [phase for phase, _, _ in progress_by_phase(events)]
    size = fs.size(f"{root}/o.h5")
    assert phases[-2:] == ["writing", "uploading"]
    assert progress_by_phase(events)[-1] == ("uploading", size, size)


def _interrupted_once_uploading(bucket, command, env=None) -> tuple[int, str]:
    """Run gclip *command*, Ctrl-C it once a multipart upload has begun; its exit status
    and stderr."""
    running = subprocess.Popen(
        [sys.executable, "-m", "gclip_cli", *command], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not bucket.open_uploads():  # the multipart upload has begun
            assert running.poll() is None, "gclip finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        running.send_signal(signal.SIGINT)
        _, stderr = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            running.kill()
    return running.returncode, stderr


def test_ctrl_c_aborts_the_uploads_of_pool_workers(bucket, make_file, tmp_path):
    # -j 2 over several files: each output is uploaded by the worker process writing it, and
    # stopped workers must abort their uploads (killed outright, they left them open)
    folder = tmp_path / "run"
    folder.mkdir()
    for index in range(2):
        values = np.random.default_rng(index).standard_normal(12 << 20).astype(np.float32)
        write_tensors(folder / f"g{index}.safetensors", "safetensors", {"g": values})
    command = ["rescale", str(folder), "--out-dir", f"{bucket.url}/out/", "--max-norm", "1"]
    returncode, stderr = _interrupted_once_uploading(bucket, [*command, "-j", "2"])
    assert returncode == 130, stderr
    assert bucket.open_uploads() == []


def test_ctrl_c_leaves_no_staged_output_behind(bucket, make_file, tmp_path):
    values = np.random.default_rng(9).standard_normal(12 << 20).astype(np.float32)  # 48 MiB
    local = make_file("hdf5", {"g": values})
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary)}
    command = ["rescale", str(local), f"{bucket.url}/o.h5", "--max-norm", "1"]
    five_mib_parts = ("--storage-option", f"default_block_size={5 << 20}")
    returncode, stderr = _interrupted_once_uploading(bucket, [*command, *five_mib_parts], env)
    assert returncode == 130, stderr
    assert bucket.listed() == [] and bucket.open_uploads() == []
    assert list(temporary.iterdir()) == []


def test_ctrl_c_stops_gclip_while_the_store_does_not_answer(make_file, tmp_path):
    # A store that stops answering mid-upload must not keep Ctrl-C from stopping gclip (it
    # waits remote._GIVE_UP_AFTER for the upload to end, then goes without): a server of
    # its own here, frozen with SIGSTOP.
    port = _free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(port, server)
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key=SECRET,
        )
        client.create_bucket(Bucket="frozen")
        frozen = Bucket(client, "frozen")
        values = np.random.default_rng(10).standard_normal(12 << 20).astype(np.float32)
        local = make_file("safetensors", {"g": values})
        args = ["rescale", str(local), "s3://frozen/o.st", "--max-norm", "1", *NO_RETRIES]
        running = subprocess.Popen(
            [sys.executable, "-m", "gclip_cli", *args],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + 120
        while not frozen.open_uploads():
            assert running.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        server.send_signal(signal.SIGSTOP)
        time.sleep(0.5)
        running.send_signal(signal.SIGINT)
        try:
            _, stderr = running.communicate(timeout=45)
        finally:
            if running.poll() is None:
                running.kill()
        assert running.returncode == 130, stderr
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(timeout=30)
