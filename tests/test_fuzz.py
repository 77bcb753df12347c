"""Mutated files of every format: gclip either succeeds with output that reads back, or fails
with a GclipError (one clean line in the CLI).  Any other exception is a crash.

The default profile runs a short budget; ``HYPOTHESIS_PROFILE=long`` runs 2,000 cases each.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import FORMATS, SUFFIX, read_tensors, write_tensors
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import gclip_cli
from gclip_cli import GclipError


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
    if fmt == "hdf5":
        with h5py.File(path, "a") as f:
            f.create_dataset(
                "g/c", data=np.ones((20, 3), np.float32), chunks=(5, 3), compression="gzip"
            )
            f.attrs["note"] = "seed"
    return path.read_bytes()


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


def check_one(fmt: str, data: bytes, folder: Path) -> str:
    """Run inspect and rescale on *data*; return 'ok' or 'refused', fail on anything else."""
    src = folder / f"case{SUFFIX[fmt]}"
    out = folder / f"out{SUFFIX[fmt]}"
    src.write_bytes(data)
    out.unlink(missing_ok=True)
    try:
        gclip_cli.inspect_file(src, chunk_size=64)
        report = gclip_cli.rescale_file(src, out, max_norm=0.5, chunk_size=64)
    except GclipError as exc:
        assert str(src) in str(exc) or str(out) in str(exc)
        assert "\n" not in str(exc)
        assert not out.exists()
        assert src.read_bytes() == data  # the input is never touched
        return "refused"
    # success: the output reads back, with gclip and with the format's own library
    again = gclip_cli.inspect_file(out)
    assert len(again.tensors) == len(report.tensors)
    if report.clipped and not report.nonfinite:
        assert again.global_norm <= 0.5 * (1 + 1e-3)
    read_tensors(out, fmt)
    assert src.read_bytes() == data
    return "ok"


@pytest.mark.parametrize("fmt", FORMATS)
def test_unmutated_seed_is_accepted(fmt, tmp_path):
    assert check_one(fmt, seed_file(fmt, tmp_path), tmp_path) == "ok"


@pytest.mark.parametrize("fmt", FORMATS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_files_never_crash(fmt, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    seed = seed_file(fmt, folder)
    steps = data.draw(mutations(len(seed)))
    event(check_one(fmt, mutate(seed, steps), folder))


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
