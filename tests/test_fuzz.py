"""Mutated files of every format: gclip either succeeds with output that reads back, or fails
with a GclipError (one clean line in the CLI).  Any other exception is a crash.

Byte mutations (flips, truncations, overwrites, insertions) and structure-aware ones
(fuzz_structures.py: safetensors header trees, zip records, .npy headers, indexes, HDF5 object
headers).  The default profile runs a short budget; ``HYPOTHESIS_PROFILE=long`` runs 2,000
cases a test.  For a long run that counts outcomes without stopping at the first bad one:

    nice -n 19 python tests/test_fuzz.py --cases 20000 [--only NAME ...] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import io
import math
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import FORMATS, SUFFIX, expected_scaled, read_tensors, write_tensors
from fuzz_structures import (
    SHARD_NAMES,
    dumps,
    h5_object_headers,
    index_tree,
    mutate_h5_object_header,
    mutate_index,
    mutate_npy,
    mutate_safetensors,
    mutate_zip,
    npz_seed,
    write_index_case,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from safetensors.numpy import save as safetensors_bytes

import gclip_cli
from gclip_cli import GclipError
from gclip_cli.api import rescale_files
from gclip_cli.options import Options

MAX_MESSAGE = 1000  # characters in one error line: a hostile name must not make it megabytes


def seed_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "w": rng.standard_normal((6, 5)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float16),
        "d": rng.standard_normal(4),
        "n": np.arange(3, dtype=np.int32),
    }


def seed_file(fmt: str, folder: Path) -> bytes:
    path = write_tensors(folder / f"seed{SUFFIX[fmt]}", fmt, seed_tensors())
    if fmt == "npz":  # also a deflated member and a non-array member
        with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
            buffer = io.BytesIO()
            np.save(buffer, np.linspace(-1, 1, 50, dtype=np.float32))
            z.writestr("z.npy", buffer.getvalue())
            z.writestr("notes.txt", b"hello")
    if fmt == "torch":  # also a slice of a storage and a view with gaps
        import torch

        extra = {
            "s": torch.arange(12.0)[2:9],
            "c": torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(4, 6)[:, 1:3],
        }
        tensors = {name: torch.from_numpy(v) for name, v in seed_tensors().items()}
        torch.save({**tensors, **extra}, path)
    if fmt == "hdf5":
        with h5py.File(path, "a") as f:
            f.create_dataset(
                "g/c", data=np.ones((20, 3), np.float32), chunks=(5, 3), compression="gzip"
            )
            f.attrs["note"] = "seed"
    return path.read_bytes()


@cache
def seed_bytes(fmt: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return seed_file(fmt, Path(folder))


@cache
def h5_messages() -> list[tuple[int, int]]:
    """Where the messages of the HDF5 seed's object headers lie."""
    data = seed_bytes("hdf5")
    with h5py.File(io.BytesIO(data), "r") as f:
        addresses = [h5py.h5o.get_info(f.id).addr]
        f.visititems(lambda _, obj: addresses.append(h5py.h5o.get_info(obj.id).addr))
    return h5_object_headers(data, addresses)


@st.composite
def mutations(draw, size: int) -> list[tuple[str, int, bytes]]:
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "insert"]))
        position = draw(st.integers(0, max(size - 1, 0)))
        if kind == "flip":
            steps.append((kind, position, bytes([1 << draw(st.integers(0, 7))])))
        elif kind == "truncate":
            steps.append((kind, position, b""))
        else:
            steps.append((kind, position, draw(st.binary(min_size=1, max_size=16))))
    return steps


def mutate(data: bytes, steps: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, position, payload in steps:
        position = min(position, max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[position] ^= payload[0]
        elif kind == "truncate":
            del out[position:]
        elif kind == "overwrite":
            out[position : position + len(payload)] = payload
        elif kind == "insert":
            out[position:position] = payload
    return bytes(out)


def mutate_torch_pickle(rng: random.Random) -> bytes:
    """The torch seed with its data.pkl mutated (and its CRC-32 right, so the unpickler reads
    the mutation), or the pickle of a random Python object instead."""
    seed = seed_bytes("torch")
    with zipfile.ZipFile(io.BytesIO(seed)) as old:
        members = [(info.filename, old.read(info)) for info in old.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as new:
        for name, data in members:
            if name.endswith("/data.pkl"):
                data = byte_mutations(rng, data)
            new.writestr(name, data)
    return out.getvalue()


def byte_mutations(rng: random.Random, data: bytes) -> bytes:
    """mutations(), drawn from *rng* (for the long runner)."""
    steps = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "truncate", "overwrite", "insert"])
        position = rng.randrange(max(len(data), 1))
        payload = bytes([1 << rng.randrange(8)]) if kind == "flip" else rng.randbytes(16)
        steps.append((kind, position, payload[: rng.randint(1, 16)]))
    return mutate(data, steps)


def assert_clean_refusal(exc: GclipError, paths: list[Path]) -> None:
    text = str(exc)
    assert any(str(p) in text for p in paths), text[:MAX_MESSAGE]
    assert "\n" not in text and len(text) < MAX_MESSAGE, text[:MAX_MESSAGE]


def reference_read(path: Path, fmt: str) -> dict[str, np.ndarray] | None:
    """Every array of *path* read by the format's own library, or None if it refuses.  (Not
    for damaged HDF5 inputs: the HDF5 library can crash on them.)"""
    try:
        return read_tensors(path, fmt)
    except Exception:  # whatever the reference raises, it refused
        return None


def same_bits(a: object, b: object) -> bool:
    """Whether two arrays (or the bytes of non-array members) are the same, bit for bit."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes())
    return a == b


def check_one(fmt: str, data: bytes, folder: Path) -> str:
    """Run inspect and rescale on *data*; return what happened, fail on a bad outcome.

    Refused: a GclipError of one line naming the file, no output, the input untouched.
    Succeeded: an output that gclip and the format's own library read back, with the norm
    asked for; what the library read of the input it reads the same in the output, but the
    scaled floats.
    """
    src = folder / f"case{SUFFIX[fmt]}"
    out = folder / f"out{SUFFIX[fmt]}"
    src.write_bytes(data)
    out.unlink(missing_ok=True)
    try:
        gclip_cli.inspect_file(src, options=Options(chunk_size=64))
        report = gclip_cli.rescale_file(src, out, max_norm=0.5, options=Options(chunk_size=64))
    except GclipError as exc:
        assert_clean_refusal(exc, [src, out])
        assert not out.exists()
        assert src.read_bytes() == data  # the input is never touched
        return "refused"
    again = gclip_cli.inspect_file(out)
    assert len(again.tensors) == len(report.tensors)
    if report.clipped and not report.nonfinite:
        assert again.global_norm <= 0.5 * (1 + 1e-3)
    assert src.read_bytes() == data
    if fmt == "hdf5":  # what HDF5 reads of the input it reads of the output (values scaled)
        same_hdf5_tree(src, out, report)
        return "ok"
    original = reference_read(src, fmt)
    if original is None:
        return "ok, the reference library refuses the input"
    written = read_tensors(out, fmt)
    assert list(written) == list(original)
    scaled = {t.name for t in report.tensors if t.skipped is None}
    for name, values in original.items():
        if name not in scaled:
            assert same_bits(written[name], values), name
    return "ok"


def check_index(index: bytes, folder: Path) -> str:
    """An index (with its shards beside it) through inspect and rescale --out-dir."""
    shards = shard_bytes()
    path = write_index_case(folder, shards, index)
    before = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    out = folder / "out"
    try:
        gclip_cli.inspect_files([path], options=Options(chunk_size=64))
        report = rescale_files([path], out, max_norm=0.5, options=Options(jobs=1))
    except GclipError as exc:
        assert_clean_refusal(exc, [folder])  # the index, a shard or a file it names
        assert not out.exists() or not any(out.iterdir())
        assert {p: p.read_bytes() for p in before} == before
        return "refused"
    assert {p: p.read_bytes() for p in before} == before
    values = [v for p in sorted(out.glob("*.safetensors")) for v in load_file(p).values()]
    assert values, "nothing written"
    if report.clipped and not report.nonfinite:
        floats = [v.astype(np.float64) for v in values if v.dtype.kind == "f"]
        norm = math.sqrt(sum(float(np.sum(v * v)) for v in floats))
        assert norm <= 0.5 * (1 + 1e-3)
    return "ok"


@cache
def shard_bytes() -> dict[str, bytes]:
    tensors = seed_tensors()
    return {
        SHARD_NAMES[0]: safetensors_bytes({"w": tensors["w"], "b": tensors["b"]}),
        SHARD_NAMES[1]: safetensors_bytes({"d": tensors["d"]}),
    }


# What each mutator writes, from a random.Random, and the check its cases go through.
FUZZERS: dict[str, tuple[Callable[[random.Random], bytes], Callable[[bytes, Path], str]]] = {
    "safetensors-bytes": (
        lambda rng: byte_mutations(rng, seed_bytes("safetensors")),
        lambda data, folder: check_one("safetensors", data, folder),
    ),
    "npz-bytes": (
        lambda rng: byte_mutations(rng, seed_bytes("npz")),
        lambda data, folder: check_one("npz", data, folder),
    ),
    "hdf5-bytes": (
        lambda rng: byte_mutations(rng, seed_bytes("hdf5")),
        lambda data, folder: check_one("hdf5", data, folder),
    ),
    "torch-bytes": (
        lambda rng: byte_mutations(rng, seed_bytes("torch")),
        lambda data, folder: check_one("torch", data, folder),
    ),
    "torch-pickle": (mutate_torch_pickle, lambda data, folder: check_one("torch", data, folder)),
    "safetensors-header": (
        lambda rng: mutate_safetensors(seed_bytes("safetensors"), rng),
        lambda data, folder: check_one("safetensors", data, folder),
    ),
    "zip-records": (
        lambda rng: mutate_zip(npz_seed(), rng),
        lambda data, folder: check_one("npz", data, folder),
    ),
    "npy-header": (mutate_npy, lambda data, folder: check_one("npz", data, folder)),
    "index": (mutate_index, check_index),
    "hdf5-object-header": (
        lambda rng: mutate_h5_object_header(seed_bytes("hdf5"), h5_messages(), rng),
        lambda data, folder: check_one("hdf5", data, folder),
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_unmutated_seed_is_accepted(fmt, tmp_path):
    assert check_one(fmt, seed_file(fmt, tmp_path), tmp_path) == "ok"


def test_unmutated_structures_are_accepted(tmp_path):
    assert check_one("npz", npz_seed(), tmp_path) == "ok"
    (tmp_path / "index").mkdir()
    assert check_index(dumps(index_tree()).encode(), tmp_path / "index") == "ok"
    assert h5_messages(), "no object header found in the HDF5 seed"


@pytest.mark.parametrize("fmt", FORMATS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_files_never_crash(fmt, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    seed = seed_bytes(fmt)
    steps = data.draw(mutations(len(seed)))
    event(check_one(fmt, mutate(seed, steps), folder))


@pytest.mark.parametrize(
    "name",
    [
        "safetensors-header",
        "torch-pickle",
        "zip-records",
        "npy-header",
        "index",
        "hdf5-object-header",
    ],
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False))
def test_structure_aware_mutations_never_crash(name, tmp_path_factory, rng):
    write, check = FUZZERS[name]
    event(check(write(rng), tmp_path_factory.mktemp("fuzz")))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.recursive(
        st.none() | st.booleans() | st.integers(-2, 2**65) | st.text(max_size=6),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=12,
    ),
    data=st.binary(max_size=32),
)
def test_random_safetensors_headers_never_crash(tmp_path_factory, header, data):
    import json
    import struct

    folder = tmp_path_factory.mktemp("hdr")
    blob = json.dumps({"t": header} if not isinstance(header, dict) else header).encode()
    event(check_one("safetensors", struct.pack("<Q", len(blob)) + blob + data, folder))


# --- HDF5 structure: addresses, sizes, dimensions and object headers -------------------------


@dataclass(frozen=True)
class Hdf5Seed:
    """A valid HDF5 file and where it keeps what a mutation goes at: (position, width) of the
    fields holding addresses, sizes and dimensions, and (start, length) of object headers."""

    data: bytes
    addresses: tuple[tuple[int, int], ...]
    sizes: tuple[tuple[int, int], ...]
    dims: tuple[tuple[int, int], ...]
    headers: tuple[tuple[int, int], ...]


def hdf5_seed(folder: Path, libver: str) -> Hdf5Seed:
    """Every layout gclip reads (plain, gzip/shuffle raw chunks, lzf and Fletcher-32 through
    HDF5, sparse, compact), groups, attributes and a non-float dataset."""
    path = folder / f"structure-{libver}.h5"
    rng = np.random.default_rng(7)
    with h5py.File(path, "w", libver=libver) as f:
        f.attrs["note"] = "seed"
        f["plain"] = rng.standard_normal(40).astype(np.float32)
        g = f.create_group("g")
        g.attrs["units"] = np.arange(3)
        g.create_dataset("gz", data=rng.standard_normal((12, 5)), chunks=(4, 5), compression=1)
        g.create_dataset("sh", data=rng.standard_normal(30).astype("f2"), chunks=(8,), shuffle=True)
        f.create_dataset(
            "lzf", data=rng.standard_normal(20).astype("f4"), chunks=(5,), compression="lzf"
        )
        f.create_dataset(
            "fl", data=rng.standard_normal(20).astype("f4"), chunks=(5,), fletcher32=True
        )
        sparse = f.create_dataset("sparse", shape=(1000,), chunks=(100,), dtype="f4", fillvalue=0.0)
        sparse[200:210] = 1.5
        f["ints"] = np.arange(12, dtype=np.int32)
        objects = [f, g, *(f[n] for n in ("plain", "g/gz", "g/sh", "lzf", "fl", "sparse", "ints"))]
        addresses = {h5py.h5o.get_info(o.id).addr for o in objects}
        headers = {
            (h5py.h5o.get_info(o.id).addr, h5py.h5o.get_info(o.id).hdr.space.total) for o in objects
        }
        sizes, dims = set(), set()
        for o in objects[2:]:
            dims.update(o.shape)
            if o.chunks is None:
                addresses.add(o.id.get_offset())
                sizes.add(o.id.get_storage_size())
            else:
                found = []
                o.id.chunk_iter(found.append)
                addresses.update(i.byte_offset for i in found)
                sizes.update(i.size for i in found)
    data = path.read_bytes()

    def places(values: set[int], widths: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        found = set()
        for value in values:
            for width in widths:
                needle = value.to_bytes(width, "little")
                start = data.find(needle)
                while start >= 0:
                    found.add((start, width))
                    start = data.find(needle, start + 1)
        return tuple(sorted(found))

    return Hdf5Seed(
        data,
        places({a for a in addresses if a and a > 255}, (8,)),
        places({s for s in sizes if s > 255}, (4, 8)),
        places({d for d in dims if d > 255}, (8,)),
        tuple(sorted(headers)),
    )


@st.composite
def hdf5_mutations(draw, seed: Hdf5Seed) -> list[tuple[str, int, bytes]]:
    """1-3 overwrites aimed at the seed's structures: (what, position, new bytes)."""
    size = len(seed.data)
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["address", "size", "dims", "header"]))
        if kind == "header":
            start, length = draw(st.sampled_from(seed.headers))
            offset = draw(st.integers(0, max(min(length, 96) - 1, 0)))
            steps.append((kind, start + offset, draw(st.binary(min_size=1, max_size=4))))
            continue
        targets = {"address": seed.addresses, "size": seed.sizes, "dims": seed.dims}[kind]
        if not targets:
            continue
        position, width = draw(st.sampled_from(targets))
        old = int.from_bytes(seed.data[position : position + width], "little")
        other = draw(st.sampled_from(seed.addresses))[0] if seed.addresses else 0
        value = draw(
            st.sampled_from(
                [0, 1, 40, 96, size, size - 8, other, 2**31 - 1, 2**32 - 1, 2**62, 2**63,
                 2**64 - 1, 2**64 - 16]
            )
            | st.integers(-64, 64).map(lambda d, old=old: old + d)
            | st.integers(0, size)
        )  # fmt: skip
        steps.append((kind, position, (value % (1 << 8 * width)).to_bytes(width, "little")))
    return steps


def apply_overwrites(data: bytes, steps: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for _, position, payload in steps:
        out[position : position + len(payload)] = payload
    return bytes(out[: len(data)])


class Hung(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail a case that takes longer than *seconds* (HDF5 looping on a crafted structure)."""

    def hung(signum: int, frame: object) -> None:
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_hdf5_case(data: bytes, folder: Path) -> str:
    """inspect and rescale *data*: 'refused' with one line, nothing written and the input
    untouched, or 'ok' with an output that holds what the input held, rescaled."""
    src, out = folder / "case.h5", folder / "out.h5"
    src.write_bytes(data)
    out.unlink(missing_ok=True)
    try:
        gclip_cli.inspect_file(src, options=Options(chunk_size=64))
        report = gclip_cli.rescale_file(src, out, max_norm=0.5, options=Options(chunk_size=64))
    except GclipError as exc:
        assert str(src) in str(exc) or str(out) in str(exc)
        assert "\n" not in str(exc) and not out.exists()
        assert src.read_bytes() == data
        return "refused"
    assert src.read_bytes() == data
    again = gclip_cli.inspect_file(out)
    assert [t.name for t in again.tensors] == [t.name for t in report.tensors]
    if report.clipped:
        assert again.global_norm <= 0.5 * (1 + 1e-3)
    same_hdf5_tree(src, out, report)
    return "ok"


def same_hdf5_tree(src: Path, out: Path, report: gclip_cli.RewriteReport) -> None:
    """The output holds the input's datasets with their dtypes and shapes; those gclip scaled
    hold the input's values scaled (where h5py reads them), the others the same values (or
    fail to read alike)."""
    scaled = {t.name for t in report.tensors if not t.skipped}
    with h5py.File(src) as a, h5py.File(out) as b:
        assert _datasets(a) == _datasets(b)
        for name in _datasets(a):
            before, after = _outcome(a[name]), _outcome(b[name])
            if name not in scaled:
                assert _bytes(after) == _bytes(before), name
            elif isinstance(before, np.ndarray):
                expected = expected_scaled(before, report) if report.clipped else before
                assert np.array_equal(after, expected), name


def _datasets(root: h5py.File) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    found: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    root.visititems(
        lambda n, o: (
            found.__setitem__(n, (o.dtype.str, o.shape)) if isinstance(o, h5py.Dataset) else None
        )
    )
    return found


def _outcome(dataset: h5py.Dataset) -> object:
    if (dataset.size or 0) * dataset.dtype.itemsize > 64 << 20:  # a mutated shape: not read
        return ("declared", dataset.shape)
    try:
        return np.asarray(dataset[()])
    except Exception as exc:  # a damaged dataset gclip does not read is copied as it is
        return type(exc).__name__


def _bytes(outcome: object) -> object:
    return outcome.tobytes() if isinstance(outcome, np.ndarray) else outcome


@pytest.mark.parametrize("libver", ["earliest", "latest"])
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hdf5_structure_mutations_give_one_line_or_a_correct_output(libver, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("hdf5-structure")
    seed = hdf5_seed(folder, libver)
    steps = data.draw(hdf5_mutations(seed))
    event(f"{libver}: " + "+".join(sorted({kind for kind, _, _ in steps})))
    with time_limit(120):
        event(check_hdf5_case(apply_overwrites(seed.data, steps), folder))


def run_long(names: list[str], cases: int, seed: str, keep: Path | None) -> int:
    """Run *cases* cases of each fuzzer in *names*; print what happened; the number of bad
    outcomes (each kept in *keep*, with its traceback, when given)."""
    bad_total = 0
    print(
        f"{'mutator':<20} {'cases':>7} {'refused':>8} {'ok':>7} {'ok, ref.':>8} {'bad':>5} "
        f"{'s':>6} {'slowest':>8}"
    )
    for name in names:
        write, check = FUZZERS[name]
        outcomes: Counter[str] = Counter()
        started, slowest = time.monotonic(), 0.0
        for i in range(cases):
            rng = random.Random(f"{seed}/{name}/{i}")
            data = write(rng)
            folder = Path(tempfile.mkdtemp(prefix="gclip-fuzz-"))
            case_started = time.monotonic()
            try:
                outcomes[check(data, folder)] += 1
            except Exception:  # a bad outcome: counted and kept, the run goes on
                outcomes["bad"] += 1
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / f"{name}-{i}.bin").write_bytes(data)
                    (keep / f"{name}-{i}.txt").write_text(traceback.format_exc()[-5000:])
            finally:
                slowest = max(slowest, time.monotonic() - case_started)
                shutil.rmtree(folder, ignore_errors=True)
        bad_total += outcomes["bad"]
        reference = outcomes["ok, the reference library refuses the input"]
        print(
            f"{name:<20} {cases:>7} {outcomes['refused']:>8} {outcomes['ok']:>7} "
            f"{reference:>8} {outcomes['bad']:>5} {time.monotonic() - started:>6.0f} "
            f"{slowest:>8.2f}",
            flush=True,
        )
    return bad_total


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per mutator")
    parser.add_argument("--only", nargs="*", default=list(FUZZERS), choices=list(FUZZERS))
    parser.add_argument("--seed", default="gclip")
    parser.add_argument("--keep", type=Path, help="folder for the bad cases")
    parser.add_argument(
        "--memory", type=float, default=4.0, help="GiB of address space (a MemoryError is bad)"
    )
    arguments = parser.parse_args()
    limit = int(arguments.memory * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.exit(min(run_long(arguments.only, arguments.cases, arguments.seed, arguments.keep), 1))
