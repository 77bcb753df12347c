"""Fixtures that write real files with each format's own library, and read them back."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from fractions import Fraction
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import settings
from safetensors.numpy import load_file, save_file

# A short, fixed budget by default (CI: the same cases every run); HYPOTHESIS_PROFILE=long for a
# thorough, randomised local run.
settings.register_profile("default", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=2000, deadline=None, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

FORMATS = ("safetensors", "npz", "hdf5", "torch")
SUFFIX = {"safetensors": ".safetensors", "npz": ".npz", "hdf5": ".h5", "torch": ".pt"}

Tensors = Mapping[str, np.ndarray]


def write_tensors(path: Path, fmt: str, tensors: Tensors) -> Path:
    """Write *tensors* to *path* with the format's own library (h5py names may contain '/')."""
    if fmt == "safetensors":
        save_file(dict(tensors), str(path))
    elif fmt == "npz":
        np.savez(path, **tensors)
    elif fmt == "hdf5":
        with h5py.File(path, "w") as f:
            for name, values in tensors.items():
                f.create_dataset(name, data=values)
    elif fmt == "torch":
        torch = import_torch()
        torch.save({name: to_torch(values) for name, values in tensors.items()}, path)
    else:
        raise ValueError(fmt)
    return path


def read_tensors(path: Path, fmt: str) -> dict[str, np.ndarray]:
    """Read every array back with the format's own library, in file order."""
    if fmt == "safetensors":
        return load_file(str(path))
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if fmt == "torch":
        loaded = import_torch().load(path, weights_only=True)
        return {name: from_torch(tensor) for name, tensor in loaded.items()}
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
        )
    return out


def import_torch():
    """torch, or the test skipped (saying how to install it)."""
    return pytest.importorskip("torch", reason="torch is not installed: pip install torch==2.13.0")


def to_torch(values: np.ndarray):
    """A numpy array as a torch tensor of the same dtype (ml_dtypes' bfloat16 and float8 by
    their bits), native byte order."""
    torch = import_torch()
    values = (
        values.astype(values.dtype.newbyteorder("=")) if values.dtype.byteorder == ">" else values
    )
    if hasattr(torch, values.dtype.name) and values.dtype.kind == "V":  # ml_dtypes
        bits = torch.from_numpy(values.view(f"u{values.dtype.itemsize}").copy())
        return bits.view(getattr(torch, values.dtype.name))
    return torch.from_numpy(values.copy())


def from_torch(tensor) -> np.ndarray:
    """A torch tensor as a numpy array of the same dtype (bfloat16 and float8 as ml_dtypes')."""
    import ml_dtypes

    name = str(tensor.dtype).removeprefix("torch.")
    if hasattr(ml_dtypes, name):
        torch = import_torch()
        bits = {1: torch.uint8, 2: torch.int16}[tensor.element_size()]
        return tensor.contiguous().view(bits).numpy().view(getattr(ml_dtypes, name))
    return tensor.numpy()


def release_readers(fifo: Path, seconds: float = 5.0) -> threading.Thread:
    """Open *fifo* for writing, and close it, once a reader waits on it (within *seconds*):
    a reader that waits for a writer gets an empty file instead of hanging the test."""

    def writer() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:  # ENXIO: no reader yet
                time.sleep(0.02)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return thread


def exact_norm(arrays: list[np.ndarray], p: float = 2.0) -> float:
    """Reference global p-norm: exact rational sum of |x|**p for p = 1, 2; fsum otherwise."""
    values = [float(v) for a in arrays for v in np.asarray(a, dtype=np.float64).ravel()]
    if math.isinf(p):
        return max((abs(v) for v in values), default=0.0)
    if p in (1, 2):
        total = sum(
            (Fraction(v) ** int(p) if p == 2 else abs(Fraction(v)) for v in values), Fraction(0)
        )
        # exact rational root via scaling keeps 1e300 and 1e-300 inputs representable
        if total == 0:
            return 0.0
        if p == 1:
            return float(total)
        return _sqrt_fraction(total)
    return math.fsum(abs(v) ** p for v in values) ** (1 / p)


def neighbours(value: np.generic, dtype: np.dtype) -> list[np.generic]:
    """*value* and the values of *dtype* next to it on either side, found from the bits (where
    np.nextafter would promote bfloat16 and float8 scalars to a wider type)."""
    uint = np.dtype(f"u{dtype.itemsize}")
    sign = 1 << (8 * dtype.itemsize - 1)
    bits = int(np.array(value, dtype=dtype).view(uint))
    order = -(bits & ~sign) if bits & sign else bits  # sign and magnitude to one number line
    sides = [-step | sign if step < 0 else step for step in (order - 1, order + 1)]
    below, above = (np.array(b, dtype=uint).view(dtype)[()] for b in sides)
    return [below, value, above]


def nearest(exact: Fraction, dtype) -> float:
    """*exact* rounded to the nearest value of *dtype*, ties to an even last bit."""
    dtype = np.dtype(dtype)
    guess = np.array(float(exact)).astype(dtype)[()]
    uint = np.dtype(f"u{dtype.itemsize}")
    candidates = [c for c in neighbours(guess, dtype) if np.isfinite(float(c))]
    best = min(
        candidates,
        key=lambda c: (
            abs(Fraction(float(c)) - exact),
            int(np.array(c, dtype=dtype).view(uint)) & 1,
        ),
    )
    return float(best)


def exactly_scaled(values: np.ndarray, q: Fraction) -> np.ndarray:
    """Reference: every value times the exact fraction *q*, rounded once into its dtype."""
    flat = [
        nearest(Fraction(float(v)) * q, values.dtype) for v in values.astype(np.float64).ravel()
    ]
    return np.array(flat, dtype=np.float64).astype(values.dtype).reshape(values.shape)


def expected_scaled(values: np.ndarray, report) -> np.ndarray:
    """What rescale must have written for *values*, given its report."""
    strategy = report.strategy  # GlobalNorm
    q = Fraction(strategy.max_norm) / (Fraction(report.global_norm) + Fraction(strategy.eps))
    return exactly_scaled(values, q)


def _sqrt_fraction(x: Fraction) -> float:
    # float(x) can overflow for x ~ 1e600; take the root of a power-of-4-scaled value instead
    shift = (x.numerator.bit_length() - x.denominator.bit_length()) // 2
    scaled = x / Fraction(4) ** shift if shift >= 0 else x * Fraction(4) ** -shift
    return math.ldexp(math.sqrt(float(scaled)), shift)


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., Path]:
    """make_file(fmt, tensors, name="in") writes a real file and returns its path."""

    def make(fmt: str, tensors: Tensors, name: str = "in") -> Path:
        return write_tensors(tmp_path / f"{name}{SUFFIX[fmt]}", fmt, tensors)

    return make


def progress_by_phase(events) -> list[tuple[str, int, int]]:
    """(phase, the bytes it announced, the bytes done in it) from a progress listener's
    events, in order; bytes before any phase fail the test."""
    from gclip_cli.progress import Phase

    phases: list[tuple[str, int, int]] = []
    for event in events:
        if isinstance(event, Phase):
            phases.append((event.name, event.total, 0))
        elif isinstance(event, int):
            assert phases, f"{event} bytes done before any phase began"
            name, total, done = phases[-1]
            phases[-1] = (name, total, done + event)
    return phases


class CoreOnly:
    """A tensor file with the core protocol only (formats/base.py's TensorFile, none of its
    capabilities): the open file *tfile* through its reader's core methods.  For formats whose
    write_transformed completes the output alone (not Checksummed ones)."""

    def __init__(self, tfile) -> None:
        self._tfile = tfile
        self.path, self.format_name, self.tensors = tfile.path, tfile.format_name, tfile.tensors

    def read_chunks(self, tensor, chunk_size):
        return self._tfile.read_chunks(tensor, chunk_size)

    def write_transformed(self, out, transform, chunk_size, leave=frozenset()):
        self._tfile.write_transformed(out, transform, chunk_size, leave)

    def close(self) -> None:
        self._tfile.close()
