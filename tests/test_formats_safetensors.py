import json
import os
import struct
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import expected_scaled, release_readers
from safetensors import safe_open
from safetensors.numpy import save_file

import gclip_cli
from gclip_cli import InputError
from gclip_cli.formats import detect_format, open_file
from gclip_cli.options import Options


def raw_file(path, header: dict | str, data: bytes = b"", pad: bool = False):
    text = header if isinstance(header, str) else json.dumps(header)
    blob = text.encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_header_is_copied_byte_for_byte_and_values_scaled(tmp_path):
    values = {
        "w": np.arange(1, 7, dtype=np.float32).reshape(2, 3),
        "h": np.array([1.0, -2.0], dtype=np.float16),
        "b": np.array([0.5, 0.25], dtype=ml_dtypes.bfloat16),
        "i": np.array([7, 8], dtype=np.int64),
        "e": np.zeros((2, 0), dtype=np.float32),
        "s": np.array(3.0, dtype=np.float64),
    }
    src = tmp_path / "in.safetensors"
    save_file(values, str(src), metadata={"step": "12", "format": "pt"})
    out = tmp_path / "out.safetensors"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    n = struct.unpack("<Q", src.read_bytes()[:8])[0]
    assert out.read_bytes()[: 8 + n] == src.read_bytes()[: 8 + n]
    assert out.stat().st_size == src.stat().st_size
    with safe_open(str(out), framework="np") as f:
        assert f.metadata() == {"step": "12", "format": "pt"}
        np.testing.assert_array_equal(f.get_tensor("i"), values["i"])
        assert f.get_tensor("e").shape == (2, 0)
        w = f.get_tensor("w")
    assert np.array_equal(w, expected_scaled(values["w"], report))


def test_float8_tensor_is_scaled_and_e8m0_passed_through(tmp_path):
    f8 = np.array([1.0, -0.5, 2.0], dtype=ml_dtypes.float8_e4m3fn)
    e8 = np.array([1, 2], dtype=np.uint8)
    src = raw_file(
        tmp_path / "in.safetensors",
        {"a": entry("F8_E4M3", [3], 0, 3), "scale": entry("F8_E8M0", [2], 3, 5)},
        f8.tobytes() + e8.tobytes(),
    )
    report = gclip_cli.rescale_file(src, tmp_path / "out.safetensors", max_norm=0.5)
    by_name = {t.name: t for t in report.tensors}
    assert by_name["scale"].skipped and by_name["a"].norm == pytest.approx(np.sqrt(5.25))
    data = (tmp_path / "out.safetensors").read_bytes()[-5:]
    assert data[3:] == e8.tobytes()
    scaled = np.frombuffer(data[:3], dtype=ml_dtypes.float8_e4m3fn).astype(np.float64)
    assert np.allclose(scaled, f8.astype(np.float64) * report.scale, rtol=2**-3)


def test_key_order_differs_from_offset_order_and_unpadded_header(tmp_path):
    a, b = np.array([3.0], np.float32), np.array([4.0], np.float32)
    src = raw_file(
        tmp_path / "in.safetensors",
        {"second": entry("F32", [1], 4, 8), "first": entry("F32", [1], 0, 4)},
        a.tobytes() + b.tobytes(),
    )
    out = tmp_path / "out.safetensors"
    report = gclip_cli.rescale_file(src, out, max_norm=1.0)
    assert [t.name for t in report.tensors] == ["second", "first"]
    with safe_open(str(out), framework="np") as f:
        assert f.get_tensor("first")[0] == np.float32(0.6)
        assert f.get_tensor("second")[0] == np.float32(0.8)


def test_empty_header_is_a_file_with_no_tensors(tmp_path):
    src = raw_file(tmp_path / "in.safetensors", {}, pad=True)
    report = gclip_cli.inspect_file(src, max_norm=1.0)
    assert report.tensors == () and report.to_dict()["global_norm"] is None
    # nothing to clip is not "unchanged": there was nothing to measure
    with pytest.raises(InputError, match="holds no tensors"):
        gclip_cli.rescale_file(src, tmp_path / "out.safetensors", max_norm=1.0)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": entry("F32", [1], 0, 4), "__metadata__": {"n": 1}}, b"\0" * 4, "strings to strings"),
        ({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, b"\0" * 12, "hole"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}, b"\0" * 8, "overlaps"),
        ({"a": entry("F32", [1], 0, 4)}, b"\0" * 5, "trailing bytes"),
        ({"a": entry("F32", [2], 0, 8)}, b"\0" * 6, "truncated"),
        ({"a": entry("F32", [3], 0, 8)}, b"\0" * 8, "needs 12 bytes"),
        ({"a": entry("F4", [3], 0, 2)}, b"\0" * 2, "needs 1.5 bytes"),
        ({"a": entry("Q7", [1], 0, 1)}, b"\0", "unknown dtype"),
        ({"a": entry("F32", [-1], 0, 4)}, b"\0" * 4, "integers from 0 to"),
        (
            '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": '
            '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            b"\0" * 4,
            "repeats the key",
        ),
        ("[1, 2]", b"", "not a JSON object"),
        ('{"a": ', b"", "not valid JSON"),
    ],
)
def test_invalid_headers_are_refused_before_reading_data(tmp_path, header, data, message):
    src = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InputError, match=message) as err:
        gclip_cli.rescale_file(
            src,
            tmp_path / "out.safetensors",
            max_norm=1.0,
            options=Options(file_format="safetensors"),
        )
    assert str(src) in str(err.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_header_length_limits(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(InputError, match="exceeds the limit"):
        open_file(huge, "safetensors")
    past = tmp_path / "past.safetensors"
    past.write_bytes(struct.pack("<Q", 50) + b"{}")
    with pytest.raises(InputError, match="runs past the end"):
        open_file(past, "safetensors")


def test_format_is_detected_from_content_not_extension(tmp_path):
    src = tmp_path / "grads.bin"
    save_file({"a": np.ones(2, np.float32)}, str(src))
    assert detect_format(src) == "safetensors"


def gclip(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gclip_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_refusal(proc: subprocess.CompletedProcess, path, *words: str) -> None:
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith(f"gclip: error: {path}: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr) < 400
    for word in words:
        assert word in proc.stderr


F32 = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", ["levels deep"]),
        ('{"a": {"x": ' + "{" * 100_000 + "}" * 100_000 + "}}", ["levels deep"]),
        ('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}', []),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + "9" * 5000 + "]}}", []),
        ('{"__metadata__": {"n": ' + "1" * 5000 + '}, "a": ' + F32 + "}", ["digits"]),
        ('{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', ["unknown dtype"]),
        ('{"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}', ["unknown dtype"]),
        ('{"a": {"dtype": 32, "shape": [1], "data_offsets": [0, 4]}}', ["unknown dtype"]),
        ('{"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}', ["shape"]),
        ('{"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', ["shape"]),
        ('{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', ["shape"]),
        ('{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', ["1e400"]),
        ('{"a": {"dtype": "F32", "shape": {"0": 1}, "data_offsets": [0, 4]}}', ["shape"]),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": {"0": 4}}}', ["data_offsets"]),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}', ["data_offsets"]),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}', ["data_offsets"]),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}', ["NaN"]),
        ('{"a": ' + F32 + ', "\\udcff": ' + F32 + "}", ["surrogate"]),
        (
            '{"a": {"dtype": "F32", "shape": [0, 9223372036854775808], "data_offsets": [0, 0]}}',
            ["shape"],
        ),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}', ["data_offsets"]),
        (
            '{"a": {"dtype": "F32", "shape": [' + "9" * 20 + '], "data_offsets": [0, 4]}}',
            ["integers from 0 to 2**63 - 1"],
        ),
        (
            '{"a": {"dtype": "F32", "shape": [' + ", ".join(["99999999999"] * 64) + "], "
            '"data_offsets": [0, 4]}}',
            ["more than 2**64"],
        ),
        (
            '{"a": {"dtype": "F32", "shape": [' + ", ".join(["1"] * 65) + "], "
            '"data_offsets": [0, 4]}}',
            ["dimensions"],
        ),
        ('{"a": ' + F32 + ', "a": ' + F32 + "}", ["repeats the key 'a'"]),
        ('{"' + "n" * 100_000 + '": {"dtype": "Q"}}', ["unknown dtype"]),
        ('{"a": ' + F32, ["brackets do not match"]),
    ],
)
def test_hostile_headers_are_one_line_errors(tmp_path, header, words):
    """Each was a traceback (RecursionError, ValueError of int conversion, unhashable list,
    OverflowError) or a line of megabytes; the limits are checked before parsing."""
    src = raw_file(tmp_path / "bad.safetensors", header, b"\0" * 4)
    assert_one_line_refusal(gclip("inspect", src), src, *words)
    out = tmp_path / "out.safetensors"
    assert_one_line_refusal(gclip("rescale", src, out, "--max-norm", "1"), src, *words)
    assert not out.exists()


def many_tensors(path, count: int, duplicate: bool = False):
    """A header of *count* one-value F32 tensors (the last name repeated if *duplicate*)."""
    entries = [
        f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(count)
    ]
    if duplicate:
        entries[-1] = entries[-1].replace(f'"t{count - 1}"', '"t0"', 1)
    return raw_file(path, "{" + ",".join(entries) + "}", b"\0" * 4 * count)


def test_a_header_of_80000_tensors_is_read_in_linear_time(tmp_path):
    """Refusing repeated keys took 113 s for 80,000 tensors (list.count per key); now well
    under a second of work (the bound leaves room for a loaded machine)."""
    src = many_tensors(tmp_path / "many.safetensors", 80_000)
    started = time.perf_counter()
    with closing(open_file(src)) as tfile:
        assert [t.name for t in tfile.tensors[:3]] == ["t0", "t1", "t2"]
        assert len(tfile.tensors) == 80_000
    assert time.perf_counter() - started < 10
    repeated = many_tensors(tmp_path / "repeated.safetensors", 80_000, duplicate=True)
    started = time.perf_counter()
    with pytest.raises(InputError, match="repeats the key 't0'"):
        open_file(repeated)
    assert time.perf_counter() - started < 10


def test_a_pipe_or_a_device_is_refused_by_the_library(tmp_path):
    fifo = tmp_path / "grads.safetensors"
    os.mkfifo(fifo)  # no writer: opening it must not wait for one
    release_readers(fifo)
    with pytest.raises(InputError, match="is a pipe"):
        open_file(fifo, "safetensors")
    with pytest.raises(InputError, match="is a character device"):
        open_file(Path("/dev/zero"), "safetensors")
