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


@pytest.mark.parametrize("with_isal", [True, False])
def test_raw_deflate_is_isal_at_its_fastest_else_zipfiles_and_any_inflater_reads_it(
    monkeypatch, with_isal
):
    if not with_isal:
        monkeypatch.setattr(deflate, "isal_zlib", None)
    elif deflate.isal_zlib is None:
        pytest.skip("python-isal is not installed")
    data = b"".join(i.to_bytes(4, "little") for i in range(20_000))
    compressor = deflate.raw_deflater()
    stream = compressor.compress(data) + compressor.flush()
    if with_isal:
        reference = deflate.isal_zlib.compressobj(1, deflate.isal_zlib.DEFLATED, -15)
    else:  # zipfile's own compressor for a member of no given level
        reference = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    assert stream == reference.compress(data) + reference.flush()
    assert zlib.decompressobj(-15).decompress(stream) == data
    assert deflate.raw_inflater().decompress(stream) == data
