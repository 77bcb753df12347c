import ml_dtypes
import numpy as np
import pytest

from gclip_cli.dtypes import describe_dtype, is_gradient_dtype


@pytest.mark.parametrize(
    "dtype",
    [
        "<f2",
        "<f4",
        ">f4",
        "<f8",
        ml_dtypes.bfloat16,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
    ],
)
def test_gradient_dtypes(dtype):
    assert is_gradient_dtype(np.dtype(dtype))


@pytest.mark.parametrize(
    "dtype",
    [
        "<i8",
        "?",
        "<c8",
        "<U3",
        "V2",
        "<f16" if np.dtype("g").itemsize == 16 else "<i4",
        ml_dtypes.float8_e8m0fnu,
        [("a", "<f4")],
    ],
)
def test_non_gradient_dtypes(dtype):
    assert not is_gradient_dtype(np.dtype(dtype))


def test_describe_marks_big_endian():
    assert describe_dtype(np.dtype(">f4")) == "float32 BE"
    assert describe_dtype(np.dtype("<f4")) == "float32"
    assert describe_dtype(np.dtype(ml_dtypes.bfloat16)) == "bfloat16"
