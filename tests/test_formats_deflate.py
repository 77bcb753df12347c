import zlib

import pytest

from gclip_cli.formats import deflate


@pytest.mark.parametrize("with_isal", [True, False])
@pytest.mark.parametrize(
    ("first", "second"), [(0, 0), (1, 0), (0, 1), (5, 7), (4096, 1), (3, 70001)]
)
def test_crc32_combine_gives_the_checksum_of_the_whole(monkeypatch, with_isal, first, second):
    if not with_isal:
        monkeypatch.setattr(deflate, "isal_zlib", None)
    elif deflate.isal_zlib is None:
        pytest.skip("python-isal is not installed")
    data = bytes(range(256)) * ((first + second) // 256 + 1)
    a, b = data[:first], data[first : first + second]
    assert deflate.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_crc32_combine_folds_many_pieces_in_order():
    pieces = [bytes([i]) * (i * 37 % 101) for i in range(40)]
    crc = 0
    for piece in pieces:
        crc = deflate.crc32_combine(crc, zlib.crc32(piece), len(piece))
    assert crc == zlib.crc32(b"".join(pieces))
