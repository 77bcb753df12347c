"""HDF5 values read and written through HDF5: sparse datasets (storage never allocated) counted
from their fill value without visiting each value, and HDF5's failures while writing reported
in one line."""

import math
import os
import signal
import subprocess
import sys
import textwrap
from fractions import Fraction

import h5py
import numpy as np
import pytest
from conftest import expected_scaled

import gclip_cli
from gclip_cli.formats.hdf5_values import MAX_FILL_WRITTEN
from gclip_cli.norms import NormStats, measure
from gclip_cli.options import Options
from gclip_cli.strategies import GlobalNorm

TERA = 10**6  # a (TERA, TERA) dataset declares 10**12 values


def gclip(*args, timeout=60, **popen) -> subprocess.CompletedProcess:
    """Run gclip; past *timeout* seconds, end it and its children (its HDF5 child too)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def huge_sparse(path, fill: float, compression=None) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """A file of a few KB whose dataset declares 10**12 float32 values, three chunks of them
    written; the values written, by region."""
    written = [
        ((slice(0, 3), slice(0, 5)), np.full((3, 5), 2.0, np.float32)),
        ((slice(500_000, 500_001), slice(999_999, 1_000_000)), np.full((1, 1), -3.0, np.float32)),
        ((slice(999_000, 999_002), slice(0, 2)), np.array([[0.25, 1.5], [7.0, -0.5]], np.float32)),
    ]
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            "x", shape=(TERA, TERA), chunks=(1000, 1000), dtype="<f4", fillvalue=fill,
            compression=compression,
        )  # fmt: skip
        for region, values in written:
            ds[region] = values
    return written


def exact_sparse_norm(path) -> float:
    """sqrt of the exact sum of squares: allocated chunks read whole, the rest counted."""
    with h5py.File(path) as f:
        ds = f["x"]
        fill = Fraction(float(ds.fillvalue))
        total, inside = Fraction(0), 0
        infos = []
        ds.id.chunk_iter(infos.append)
        for info in infos:
            region = tuple(
                slice(o, min(o + c, n))
                for o, c, n in zip(info.chunk_offset, ds.chunks, ds.shape, strict=True)
            )
            values = ds[region].ravel()
            others = values[values != ds.fillvalue]  # the fill value inside chunks is counted
            total += sum(Fraction(float(v)) ** 2 for v in others)
            total += (values.size - others.size) * fill**2
            inside += values.size
        total += (ds.size - inside) * fill**2
    return math.sqrt(float(total))


@pytest.mark.parametrize("compression", [None, "gzip"])
@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_a_trillion_unallocated_values_are_counted_not_visited(tmp_path, fill, compression):
    """This ran past 60 s (HDF5 made every fill value, 4 TB of them)."""
    src = tmp_path / "sparse.h5"
    huge_sparse(src, fill, compression)
    assert src.stat().st_size < 16 << 20
    proc = gclip("norm", src)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == exact_sparse_norm(src)


def test_rewriting_keeps_unallocated_chunks_unallocated(tmp_path):
    src, out = tmp_path / "sparse.h5", tmp_path / "out.h5"
    written = huge_sparse(src, 0.0, "gzip")
    proc = gclip("rescale", src, out, "--max-norm", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = gclip_cli.inspect_file(src)
    with h5py.File(src) as a, h5py.File(out) as b:
        assert b["x"].id.get_num_chunks() == a["x"].id.get_num_chunks() == 3
        for region, values in written:
            q = Fraction(1) / Fraction(report.global_norm)
            assert np.array_equal(b["x"][region], _scaled(values, q)), region
        assert b["x"][123_456, 654_321] == 0.0


def _scaled(values, q):
    class Report:  # what expected_scaled reads of a report
        global_norm, strategy = float(1 / q), GlobalNorm(max_norm=1.0)

    return expected_scaled(values, Report)


def test_a_nonzero_fill_value_that_would_have_to_be_allocated_is_refused(tmp_path):
    src, out = tmp_path / "sparse.h5", tmp_path / "out.h5"
    huge_sparse(src, 0.5)
    proc = gclip("rescale", src, out, "--max-norm", "1")
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unallocated, read as its fill value 0.5" in proc.stderr
    assert f"{MAX_FILL_WRITTEN:,}" in proc.stderr and not out.exists()


def test_a_small_dataset_with_a_nonzero_fill_value_is_written_out(tmp_path):
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    with h5py.File(src, "w") as f:
        ds = f.create_dataset("x", shape=(100, 30), chunks=(10, 10), dtype="<f4", fillvalue=1.5)
        ds[40:45, 3:17] = np.arange(70, dtype=np.float32).reshape(5, 14)
        dense = ds[()]
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert report.global_norm == exact_norm_of(dense)
    with h5py.File(out) as f:
        assert np.array_equal(f["x"][()], expected_scaled(dense, report))


def exact_norm_of(values: np.ndarray) -> float:
    return math.sqrt(float(sum(Fraction(float(v)) ** 2 for v in values.ravel())))


def test_a_contiguous_dataset_never_written_is_all_fill(tmp_path):
    """Late allocation: 10**12 values, no storage at all (this took about 400 s)."""
    src = tmp_path / "late.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("x", shape=(10**12,), dtype="<f4", fillvalue=0.5)
        assert f["x"].id.get_offset() is None
    proc = gclip("norm", src)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == math.sqrt(0.25 * 10**12)


def test_counting_copies_is_exact_whatever_the_count():
    from gclip_cli.formats.hdf5_values import repeated

    value = np.float32(0.1)  # its square is exact in float64, and count times it needs partials
    one = measure(np.array([value]))
    for count in (0, 1, 3, 1000, 2**40 + 12345):
        stats = repeated(one, count)
        assert stats.numel == count
        assert stats.norm() == math.sqrt(float(count * Fraction(float(value)) ** 2))
    merged = NormStats(2.0)
    for _ in range(1000):
        merged.merge(one)
    assert repeated(one, 1000).norm() == merged.norm()
    nan = repeated(measure(np.array([np.nan])), 7)
    assert (nan.nan, nan.numel) == (7, 7)


# --- HDF5's failures while writing ---------------------------------------------------------


def growing_file(path) -> None:
    """Values that deflate well until they are scaled: rewritten chunks need more room, which
    HDF5 allocates past the end of the file."""
    values = np.random.default_rng(0).integers(0, 4, 1 << 18).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=values, chunks=(1 << 14,), compression="gzip")


def limited(size: int):
    def limit() -> None:  # writes past the limit fail with EFBIG, as on a full disk
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_hdf5_failing_to_write_is_one_line_exit_5(tmp_path, jobs):
    """This was a RuntimeError traceback, exit 1."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    growing_file(src)
    limit = limited(src.stat().st_size)
    proc = gclip("rescale", src, out, "--max-norm", "1.234567", "-j", jobs, preexec_fn=limit)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr == f"gclip: error: {out}: cannot write: {os.strerror(27)}\n"
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.h5"]


def test_hdf5_prints_nothing_even_where_its_error_printing_is_on(tmp_path):
    """h5py silences HDF5's error stack in the thread that imports it; elsewhere (another
    thread of a thread-safe HDF5) HDF5 prints it, a dozen lines for one failure."""
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    growing_file(src)
    script = textwrap.dedent(f"""
        import sys
        from h5py import _errors
        import gclip_cli
        _errors.unsilence_errors()
        try:
            gclip_cli.rescale_file({str(src)!r}, {str(out)!r}, max_norm=1.234567)
        except gclip_cli.GclipError as exc:
            print(exc.exit_code, exc, file=sys.stderr)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limited(src.stat().st_size),
    )
    assert proc.stderr == f"5 {out}: cannot write: {os.strerror(27)}\n"


def _first_nonfinite_reported(path):
    (tensor,) = gclip_cli.inspect_file(path, options=Options(nonfinite="keep")).tensors
    return tensor.first_nonfinite


def _first_nonfinite_read(path):
    with h5py.File(path) as f:
        return tuple(int(i) for i in np.argwhere(~np.isfinite(f["x"][()]))[0])


def test_the_first_nan_of_a_sparse_dataset_is_placed_in_c_order_not_chunk_order(tmp_path):
    src = tmp_path / "sparse_nan.h5"
    with h5py.File(src, "w") as f:
        x = f.create_dataset("x", shape=(4, 4), chunks=(2, 2), dtype="f4", fillvalue=0.0)
        x[1, 0] = np.nan  # chunk (0, 0), the 3rd value read; flat index 4: the first
        x[1, 2] = np.inf  # chunk (0, 1), the 7th value read; flat index 6
    assert _first_nonfinite_reported(src) == _first_nonfinite_read(src) == (1, 0)


def test_a_nan_fill_value_counts_from_the_first_unallocated_chunk(tmp_path):
    src = tmp_path / "nan_fill.h5"
    with h5py.File(src, "w") as f:
        x = f.create_dataset("x", shape=(4, 6), chunks=(2, 2), dtype="f4", fillvalue=np.nan)
        x[0:2, 0:2] = 1.0  # chunk (0, 0) allocated and finite; (0, 1) is not allocated
        x[0:2, 2:4] = 1.0  # nor is it now: the first unallocated chunk is (0, 2)
    assert _first_nonfinite_reported(src) == _first_nonfinite_read(src) == (0, 4)
