"""One file on several worker processes: the same bytes and the same reports as one process."""

from __future__ import annotations

import errno
import os
import signal
import zlib
from contextlib import closing
from dataclasses import replace

import h5py
import numpy as np
import pytest
from conftest import (
    SUFFIX,
    CoreOnly,
    exact_norm,
    expected_scaled,
    progress_by_phase,
    read_tensors,
    write_tensors,
)
from hypothesis import given
from hypothesis import strategies as st

from gclip_cli import InputError, OutputError, api, engine, parallel
from gclip_cli.formats import TensorInfo, base, open_file
from gclip_cli.norms import BLOCK
from gclip_cli.options import Options
from gclip_cli.parallel import Span, cut
from gclip_cli.rewriters import Rewriter


@pytest.fixture
def always_parallel(monkeypatch):
    """Hand even small files to workers (forked workers inherit the patched threshold)."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)


def gradients(seed: int = 0) -> dict[str, np.ndarray]:
    """Tensors a few blocks long, so shares are cut inside them, and some non-gradients."""
    rng = np.random.default_rng(seed)
    return {
        "emb": rng.standard_normal((3 * BLOCK + 123,)).astype(np.float32),
        "step": np.arange(7, dtype=np.int64),
        "h.0.w": (rng.standard_normal((512, 300)) * 3).astype(np.float64),
        "h.1.w": rng.standard_normal((2 * BLOCK,)).astype(np.float16),
        "tiny": np.array([1e-30, -2.5], dtype=np.float32),
    }


CUTS = np.arange(0, 4 * BLOCK, BLOCK)  # where shares may begin inside a tensor


def write_mixed_hdf5(path, tensors):
    """Contiguous datasets (read by workers) next to chunked, compressed ones (read by h5py)."""
    with h5py.File(path, "w") as f:
        for i, (name, values) in enumerate(tensors.items()):
            options = {"chunks": True, "compression": "gzip"} if i % 2 else {}
            f.create_dataset(name, data=values, **options)
    return path


def span(name: str, count: int, dtype="<f4", offset: int = 0) -> Span:
    dtype = np.dtype(dtype)
    tensor = TensorInfo(name, dtype.name, (count,), count * dtype.itemsize, dtype=dtype)
    return Span(tensor, offset, 0, count)


# --- cutting spans into shares -----------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.integers(0, 5 * BLOCK), st.sampled_from(["<f2", "<f4", "<f8"])),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 6),
)
def test_shares_cover_every_value_once_in_order_cut_at_whole_blocks(sizes, parts):
    spans, offset = [], 0
    for i, (count, dtype) in enumerate(sizes):
        spans.append(span(f"t{i}", count, dtype, offset))
        offset += spans[-1].nbytes
    spans = [s for s in spans if s.count]
    shares = cut(spans, parts)
    assert len(shares) <= parts and all(shares)
    pieces = [piece for share in shares for piece in share]
    for piece in pieces:
        assert piece.first % BLOCK == 0 and piece.count > 0
        assert piece.offset == next(
            s.offset + piece.first * s.tensor.dtype.itemsize
            for s in spans
            if s.tensor.name == piece.tensor.name
        )
    covered = [(p.tensor.name, v) for p in pieces for v in range(p.first, p.first + p.count)]
    assert covered == [(s.tensor.name, v) for s in spans for v in range(s.count)]
    total = sum(s.nbytes for s in spans)
    for share in shares:  # never more than a block (of the widest type) over an even share
        assert sum(p.nbytes for p in share) <= total / parts + 8 * BLOCK


def test_even_spans_make_even_shares():
    shares = cut([span("a", 40 * BLOCK), span("b", 24 * BLOCK, offset=160 * BLOCK)], 2)
    assert [sum(p.count for p in share) for share in shares] == [32 * BLOCK, 32 * BLOCK]


# --- checksums of the values, from pieces --------------------------------------------------------


class Negate(Rewriter):  # at module level: workers send theirs back pickled
    def rewrite(self, tensor, src, dst):
        np.negative(src, out=dst)


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_workers_checksum_the_values_they_read_and_write(tmp_path, jobs):
    """CRC-32s of checksummed spans cut across workers, combined, are those of the bytes."""
    rng = np.random.default_rng(4)
    values = {"a": rng.standard_normal(3 * BLOCK + 5), "b": rng.standard_normal(BLOCK - 9)}
    raw = b"head" + b"".join(v.astype("<f4").tobytes() for v in values.values())
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(raw)
    out.write_bytes(raw)
    offsets = {"a": 4, "b": 4 + values["a"].nbytes // 2}
    spans = [
        replace(span(name, v.size, offset=offsets[name]), checksummed=name == "a")
        for name, v in values.items()
    ]
    stats, read = parallel.measure_pieces(src, spans, 2.0, 1 << 20, jobs)
    assert set(stats) == {"a", "b"}
    assert read == {"a": zlib.crc32(raw[4 : offsets["b"]])}
    written = parallel.rewrite_spans(src, out, spans, Negate(2.0), 1 << 20, jobs)
    assert written == {"a": zlib.crc32(out.read_bytes()[4 : offsets["b"]])}
    assert out.read_bytes()[4 : offsets["b"]] == (-values["a"].astype("<f4")).tobytes()


# --- the same bytes whatever the number of jobs ------------------------------------------------


def write(fmt, path, tensors):
    if fmt == "hdf5":
        return write_mixed_hdf5(path, tensors)
    return write_tensors(path, fmt, tensors)


@pytest.mark.parametrize("chunk_size", [1 << 20, 3 * 4 * BLOCK + 8, 4100])
def test_rescale_writes_the_same_bytes_with_any_number_of_jobs(
    fmt, tmp_path, always_parallel, chunk_size
):
    tensors = gradients()
    src = write(fmt, tmp_path / f"in{SUFFIX[fmt]}", tensors)
    outputs, reports = {}, {}
    for jobs in (1, 2, 3):
        outputs[jobs] = tmp_path / f"out{jobs}{SUFFIX[fmt]}"
        reports[jobs] = api.rescale_file(
            src, outputs[jobs], max_norm=1.0, options=Options(jobs=jobs, chunk_size=chunk_size)
        )
    assert (
        reports[1]
        == replace_output(reports[2], outputs[1])
        == replace_output(reports[3], outputs[1])
    )
    written = {jobs: read_tensors(path, fmt) for jobs, path in outputs.items()}
    for name in tensors:
        for jobs in (2, 3):
            assert written[jobs][name].tobytes() == written[1][name].tobytes(), (name, jobs)
    if fmt != "hdf5":  # HDF5 files carry timestamps of their own
        assert outputs[1].read_bytes() == outputs[2].read_bytes() == outputs[3].read_bytes()
    assert reports[1].global_norm == exact_norm(
        [v for v in tensors.values() if v.dtype.kind == "f"]
    )
    for name in ("emb", "h.0.w", "h.1.w"):  # values around the cuts, against the exact product
        flat = tensors[name].reshape(-1)
        near_cuts = np.unique(np.clip(np.arange(-50, 50)[:, None] + CUTS, 0, flat.size - 1))
        np.testing.assert_array_equal(
            written[2][name].reshape(-1)[near_cuts], expected_scaled(flat[near_cuts], reports[2])
        )


def replace_output(report, output):
    return replace(report, output=str(output))


def test_inspect_measures_alike_with_any_number_of_jobs(fmt, tmp_path, always_parallel):
    src = write(fmt, tmp_path / f"in{SUFFIX[fmt]}", gradients(3))
    reports = [
        api.inspect_file(src, options=Options(jobs=jobs, norm_type=p))
        for jobs in (1, 2)
        for p in (2, 3)
    ]
    assert reports[0] == reports[2] and reports[1] == reports[3]


@pytest.mark.parametrize(
    ("call", "arguments", "nonfinite"),
    [
        (api.clip_value_file, {"max_value": 0.5}, "keep"),
        (api.normalize_file, {"target_norm": 2.0}, "zero"),
        (api.rescale_file, {"max_norm": 1.0, "per_tensor": True}, "keep"),
        (api.rescale_file, {"max_norm": 1.0}, "keep"),
        (api.rescale_file, {"max_norm": 1.0}, "zero"),
    ],
)
def test_every_strategy_gives_the_same_result_on_workers(
    tmp_path, always_parallel, call, arguments, nonfinite
):
    tensors = gradients(5)
    tensors["emb"][[5, BLOCK + 7, 3 * BLOCK]] = [np.nan, np.inf, -np.inf]
    src = write("safetensors", tmp_path / "in.safetensors", tensors)
    one, two = (Options(jobs=jobs, nonfinite=nonfinite) for jobs in (1, 2))
    serial = call(src, tmp_path / "one.safetensors", options=one, **arguments)
    workers = call(src, tmp_path / "two.safetensors", options=two, **arguments)
    assert replace_output(workers, serial.output) == serial
    assert (tmp_path / "one.safetensors").read_bytes() == (
        tmp_path / "two.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("fmt", ["safetensors", "hdf5"])
def test_a_format_without_capabilities_is_read_serially_to_the_same_bits(
    fmt, tmp_path, always_parallel, monkeypatch
):
    """The engine asks for what a format can do besides the core protocol: without
    PlainValues or ChunkedPieces, nothing goes to workers, and every bit comes out the same."""
    src = write(fmt, tmp_path / f"in{SUFFIX[fmt]}", gradients())
    forked = []
    real = parallel.run_forked

    def counted(path, tasks, *args, **kwargs):
        forked.extend(task.__name__ for task, _ in tasks)
        return real(path, tasks, *args, **kwargs)

    monkeypatch.setattr(parallel, "run_forked", counted)
    measured, written, forks = {}, {}, {}
    for kind, wrap in (("capable", lambda tfile: tfile), ("core", CoreOnly)):
        forked.clear()
        out = tmp_path / f"{kind}{SUFFIX[fmt]}"
        with closing(wrap(open_file(src))) as tfile:
            stats = engine.measure_tensors(tfile, 2.0, 4100, jobs=3)
            after = engine.rewrite(tfile, out, Negate(2.0), 4100, jobs=3)
        measured[kind] = [s and (s.norm(), s.numel, s.max_abs) for s in stats]
        written[kind] = [s and (s.norm(), s.numel) for s in after], read_tensors(out, fmt)
        forks[kind] = set(forked)
    assert forks["capable"] >= {"_measure_share"} and forks["core"] == set()
    assert measured["core"] == measured["capable"]
    assert written["core"][0] == written["capable"][0]
    for name, values in gradients().items():
        expected = -values if values.dtype.kind == "f" else values
        assert written["core"][1][name].tobytes() == expected.tobytes(), name
        assert written["capable"][1][name].tobytes() == expected.tobytes(), name
    if fmt == "safetensors":
        assert (tmp_path / "core.safetensors").read_bytes() == (
            tmp_path / "capable.safetensors"
        ).read_bytes()


def test_cli_jobs_option_reaches_the_engine(tmp_path, always_parallel, monkeypatch):
    from click.testing import CliRunner

    from gclip_cli.cli import main

    src = write("safetensors", tmp_path / "in.safetensors", gradients())
    seen = tmp_path / "parts"  # a file: the file's work runs in a child process
    real = parallel.cut

    def cut(spans, parts):
        seen.write_text(f"{seen.read_text() if seen.exists() else ''}{parts}\n")
        return real(spans, parts)

    monkeypatch.setattr(parallel, "cut", cut)
    result = CliRunner().invoke(main, ["norm", str(src), "-j", "3"])
    assert result.exit_code == 0 and seen.read_text().split() == ["3"]


def write_layout(layout, path, tensors):
    """A file whose gradients workers read in each way: plain spans, deflated npz members,
    or (HDF5, in its isolation child) contiguous spans and chunked gzip bands."""
    if layout == "npz-deflated":
        np.savez_compressed(path, **tensors)
        return path
    return write(layout, path, tensors)


@pytest.mark.parametrize("layout", ["safetensors", "npz", "npz-deflated", "hdf5"])
def test_the_workers_progress_reaches_the_listener_in_its_phases(
    layout, tmp_path, always_parallel, monkeypatch
):
    tensors = gradients()
    src = write_layout(layout, tmp_path / f"in{SUFFIX[layout.split('-')[0]]}", tensors)
    forks = tmp_path / "forks"  # a file: the HDF5 work forks its workers in a child process
    real = parallel.run_forked

    def counted(path, tasks, *args, **kwargs):
        with open(forks, "a") as log:
            log.write(f"{tasks[0][0].__name__}\n")
        return real(path, tasks, *args, **kwargs)

    monkeypatch.setattr(parallel, "run_forked", counted)
    seen = []
    out = tmp_path / "out"
    api.rescale_file(
        src, out, max_norm=1.0, progress=seen.append, options=Options(jobs=2, chunk_size=4100)
    )
    float_bytes = sum(v.nbytes for v in tensors.values() if v.dtype.kind == "f")
    forked = set(forks.read_text().split())
    assert "_measure_share" in forked  # deflated npz members are written in one process
    assert layout == "npz-deflated" or forked & {"_rewrite_share", "_encode_share"}
    assert progress_by_phase(seen) == [
        ("measuring", float_bytes, float_bytes),
        ("writing", float_bytes, float_bytes),
    ]


# --- failures in workers -----------------------------------------------------------------------


def test_a_write_error_in_a_worker_fails_the_whole_rescale(tmp_path, always_parallel, monkeypatch):
    src = write("safetensors", tmp_path / "in.safetensors", gradients())
    before = src.read_bytes()

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(base, "write_all_at", disk_full)
    out = tmp_path / "out.safetensors"
    with pytest.raises(OutputError, match="No space left on device"):
        api.rescale_file(src, out, max_norm=1.0, options=Options(jobs=2))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
    assert src.read_bytes() == before


def test_a_worker_killed_by_a_signal_becomes_one_error(tmp_path, always_parallel, monkeypatch):
    src = write("safetensors", tmp_path / "in.safetensors", gradients())

    def killed(*args):
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(parallel, "_measure_share", killed)
    with pytest.raises(InputError, match=r"a worker process died \(SIGKILL\)"):
        api.inspect_file(src, options=Options(jobs=2))
