"""The compiled kernels (gclip_cli/_kernels.c) give the numpy code paths' results bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
from conftest import exactly_scaled

from gclip_cli import kernels
from gclip_cli.norms import BLOCK, NormAccumulator, measure
from gclip_cli.rounding import ScaleFactor, ScratchBuffers, scale

compiled = pytest.importorskip("gclip_cli._kernels", reason="built without the C kernels")

SIZES = [1, 7, 8, 9, 127, 128, 129, 136, 1000, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 77]


def wide_range_float32(n: int, seed: int) -> np.ndarray:
    """float32 values of every magnitude, subnormals and signed zeros among them."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n) * 10.0 ** rng.integers(-45, 38, n)
    values = values.astype(np.float32)
    values[rng.integers(0, n, max(1, n // 50))] = rng.choice([0.0, -0.0, 1e-45, -3e-39])
    return values


def numpy_block_sums(values: np.ndarray) -> tuple[list[float], list[float]]:
    squares = np.square(values, dtype=np.float64)
    blocks = [squares[i : i + BLOCK] for i in range(0, values.size, BLOCK)]
    return [float(np.add.reduce(b)) for b in blocks], [float(b.max()) for b in blocks]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", range(3))
def test_block_sums_are_numpys_pairwise_sums_bit_for_bit(n, seed):
    values = wide_range_float32(n, seed)
    blocks = -(-n // BLOCK)
    sums, peaks = np.empty(blocks), np.empty(blocks)
    compiled.square_sums(values, sums, peaks, BLOCK)
    expected_sums, expected_peaks = numpy_block_sums(values)
    assert sums.tolist() == expected_sums
    assert peaks.tolist() == expected_peaks


def unaligned(values: np.ndarray) -> np.ndarray:
    """A copy of float32 *values* one byte past an aligned address (as a stored .npz member's
    values can be, mapped from the archive)."""
    raw = np.zeros(values.nbytes + 1, dtype=np.uint8)
    copy = raw[1:].view(np.float32)
    copy[:] = values
    return copy


def test_the_kernels_read_and_write_values_at_any_address(monkeypatch):
    values = wide_range_float32(BLOCK + 1001, 6)
    src, dst = unaligned(values), unaligned(np.zeros_like(values))
    assert kernels.handle(src, dst)
    factor = ScaleFactor.of(0.3)
    stats = measure(src)
    scale(src, dst, factor, ScratchBuffers())
    monkeypatch.setattr(kernels, "compiled", None)
    assert stats == measure(values)
    assert np.array_equal(
        dst.view(np.uint32), numpy_scaled(values, factor, monkeypatch).view(np.uint32)
    )


def accumulated(values: np.ndarray, chunks: list[int]) -> object:
    accumulator = NormAccumulator(2.0)
    start = 0
    for size in chunks:
        accumulator.add(values[start : start + size])
        start += size
    accumulator.add(values[start:])
    return accumulator.finish()


@pytest.mark.parametrize("chunks", [[], [5], [BLOCK - 3, 10], [100, BLOCK, 2 * BLOCK + 1]])
def test_accumulated_stats_match_numpys_including_nan_and_inf(chunks, monkeypatch):
    values = wide_range_float32(4 * BLOCK + 123, 1)
    values[[7, BLOCK + 1, 3 * BLOCK]] = [np.nan, np.inf, -np.inf]
    with_kernels = accumulated(values, chunks)
    monkeypatch.setattr(kernels, "compiled", None)
    assert with_kernels == accumulated(values, chunks)
    assert (with_kernels.nan, with_kernels.inf) == (1, 2)


def numpy_scaled(values: np.ndarray, factor: ScaleFactor, monkeypatch) -> np.ndarray:
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "compiled", None)
        out = np.empty_like(values)
        scale(values, out, factor, ScratchBuffers())
    return out


@pytest.mark.parametrize("alpha", [0.3, 1 / 3, 0.123456789012345, 2.0**-120, 3.75e9])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 100_003])
def test_scaling_matches_numpys_bit_for_bit(alpha, n, monkeypatch):
    values = wide_range_float32(n, 2)
    values[: min(n, 3)] = [np.nan, np.inf, -0.0][: min(n, 3)]
    factor = ScaleFactor.of(alpha)
    out = np.empty_like(values)
    with np.errstate(over="ignore"):
        scale(values, out, factor, ScratchBuffers())
        expected = numpy_scaled(values, factor, monkeypatch)
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))


def powers_of_two_on_midpoints(n: int) -> tuple[np.ndarray, ScaleFactor]:
    """v * (1 + 2**-24) for v a power of two lies exactly on a float32 midpoint: every value
    is undecided by the bracket and must be recomputed exactly (ties to even: v itself)."""
    exponents = np.random.default_rng(3).integers(-120, 120, n)
    signs = np.where(np.arange(n) % 2, -1.0, 1.0)
    values = (signs * np.ldexp(1.0, exponents)).astype(np.float32)
    return values, ScaleFactor(1 + Fraction(1, 2**24))


@pytest.mark.parametrize("in_place", [False, True])
def test_undecided_values_beyond_the_room_for_them_are_all_recomputed(in_place):
    values, factor = powers_of_two_on_midpoints(3000)  # 3000 > the 1024 noted per call
    expected = exactly_scaled(values, factor.exact)
    out = values.copy() if in_place else np.empty_like(values)
    scale(out if in_place else values, out, factor, ScratchBuffers())
    assert np.array_equal(out, expected)
    assert np.array_equal(out, values)  # the ties went to the even neighbour, v itself


def test_scale_bracketed_stops_when_its_notes_are_full():
    values, factor = powers_of_two_on_midpoints(1000)
    out = np.zeros_like(values)
    indices, originals = np.empty(300, dtype=np.int64), np.empty(300, dtype=np.float32)
    done, found = compiled.scale_bracketed(
        values, out, factor.below, factor.above, indices, originals
    )
    assert (done, found) == (256, 256)  # a second tile of 256 would not fit in 300
    assert indices[:found].tolist() == list(range(256))
    assert np.array_equal(originals[:found], values[:256])
    assert not out[256:].any()


def scaling_four_values(out_size: int, room: int) -> Callable[[], object]:
    """A call of scale_bracketed on 4 values into *out_size* with notes for *room* values."""
    return lambda: compiled.scale_bracketed(
        np.ones(4, np.float32),
        np.ones(out_size, np.float32),
        0.5,
        0.5,
        np.empty(room, np.int64),
        np.empty(256, np.float32),
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: compiled.square_sums(b"\0" * 6, np.empty(1), np.empty(1), BLOCK), "whole"),
        (lambda: compiled.square_sums(b"\0" * 8, np.empty(0), np.empty(0), BLOCK), "per block"),
        (lambda: compiled.square_sums(b"\0" * 8, np.empty(1), np.empty(1), 0), "positive"),
        (scaling_four_values(3, 256), "differ in size"),
        (scaling_four_values(4, 255), "room"),
    ],
)
def test_kernels_refuse_buffers_that_do_not_fit(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_numpy_only_in_the_environment_leaves_the_kernels_out(monkeypatch):
    monkeypatch.setenv("GCLIP_NUMPY_ONLY", "1")
    assert kernels._load() is None
    monkeypatch.delenv("GCLIP_NUMPY_ONLY")
    assert kernels._load() is compiled


def test_rescale_writes_the_same_bytes_and_report_with_or_without_kernels(fmt, make_file):
    rng = np.random.default_rng(4)
    src = make_file(
        fmt,
        {
            "w": (rng.standard_normal((300, 700)) * 50).astype(np.float32),
            "b": rng.standard_normal(1000).astype(np.float32),
        },
    )
    results = []
    for numpy_only in ("", "1"):
        out = src.with_name(f"out{numpy_only}{src.suffix}")
        env = {**os.environ, "GCLIP_NUMPY_ONLY": numpy_only}
        proc = subprocess.run(
            [sys.executable, "-m", "gclip_cli", "rescale", src, out, "--max-norm", "1", "--json"],
            capture_output=True,
            env=env,
            check=True,
        )
        report = json.loads(proc.stdout)
        for volatile in ("input", "output", "seconds"):
            report.pop(volatile, None)
        results.append((out.read_bytes(), report))
    assert results[0] == results[1]
    assert results[0][1]["scale"] < 1


@pytest.mark.parametrize(
    ("numpy_only", "says"), [("", "compiled float32 kernels"), ("1", "numpy only")]
)
def test_version_says_which_code_computes(numpy_only, says):
    env = {**os.environ, "GCLIP_NUMPY_ONLY": numpy_only}
    proc = subprocess.run(
        [sys.executable, "-m", "gclip_cli", "--version"], capture_output=True, env=env, text=True
    )
    assert proc.stdout.strip().endswith(f"({says})")
