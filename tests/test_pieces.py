"""Tests for dfly.pieces: piece-size rule, slice header format and piece layout."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfly.errors import MalformedSlice, ProtocolError
from dfly.pieces import (
    MIB,
    OVERHEAD,
    TAIL,
    Layout,
    SliceHeader,
    check_piece_size,
    default_piece_size,
    wrap,
)


def word(value: int) -> bytes:
    """Pack a 32-bit header word big-endian."""
    return struct.pack("!I", value)


# -- default_piece_size -------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected_mib"),
    [
        (None, 4),
        (0, 4),
        (1, 4),
        (200 * MIB, 4),
        (200 * MIB + 1, 4),  # 200 MiB // 100 MiB + 2 = 4
        (300 * MIB - 1, 4),
        (300 * MIB, 5),
        (1000 * MIB, 12),
        (1300 * MIB - 1, 14),
        (1300 * MIB, 15),
        (1400 * MIB, 15),
        (1 << 50, 15),
    ],
)
def test_default_piece_size(length: int | None, expected_mib: int) -> None:
    """The default piece size is 4 MiB up to 200 MiB (or unknown), else min(L//100MiB + 2, 15) MiB."""
    assert default_piece_size(length) == expected_mib * MIB


@given(st.one_of(st.none(), st.integers(min_value=0, max_value=1 << 60)))
def test_default_piece_size_is_always_valid(length: int | None) -> None:
    """Whatever the file length, the default piece size passes check_piece_size."""
    size = default_piece_size(length)
    assert check_piece_size(size) == size


# -- check_piece_size ---------------------------------------------------------


@pytest.mark.parametrize("mib", range(1, 16))
def test_check_piece_size_accepts_1_to_15_mib(mib: int) -> None:
    """Every whole number of MiB from 1 to 15 is a valid piece size and is returned unchanged."""
    assert check_piece_size(mib * MIB) == mib * MIB


@pytest.mark.parametrize(
    "size", [0, -MIB, 1, MIB - 1, MIB + 1, 4 * MIB + 5, 16 * MIB, 32 * MIB, 15 * MIB + 1]
)
def test_check_piece_size_rejects(size: int) -> None:
    """Zero, negative, non-whole-MiB and > 15 MiB piece sizes raise ValueError."""
    with pytest.raises(ValueError):
        check_piece_size(size)


# -- SliceHeader --------------------------------------------------------------


@st.composite
def valid_headers(draw: st.DrawFn) -> SliceHeader:
    """Any header the format can carry."""
    mib = draw(st.integers(min_value=1, max_value=15))
    piece_size = mib * MIB
    data_len = draw(
        st.one_of(
            st.integers(min_value=0, max_value=piece_size - OVERHEAD),
            st.sampled_from([0, 1, piece_size - OVERHEAD - 1, piece_size - OVERHEAD]),
        )
    )
    return SliceHeader(data_len=data_len, piece_size=piece_size)


@given(valid_headers())
def test_header_round_trip(header: SliceHeader) -> None:
    """encode then decode gives back the same header, always 4 bytes with the top 4 bits clear."""
    raw = header.encode()
    assert len(raw) == 4
    assert raw[0] & 0xF0 == 0
    assert SliceHeader.decode(raw) == header


@given(valid_headers())
def test_header_bit_compatible_with_dragonfly(header: SliceHeader) -> None:
    """A version-0 header equals the original Dragonfly word dataLen | (P_bytes << 4)."""
    expected = header.data_len | (header.piece_size << 4)
    assert header.encode() == word(expected)
    assert SliceHeader.decode(word(expected)) == header


def test_header_exact_bit_layout() -> None:
    """The header for dataLen=5, P=4 MiB is 0x04000005; dataLen sits in bits 0-23, P/MiB in 24-27."""
    assert SliceHeader(5, 4 * MIB).encode() == bytes([0x04, 0x00, 0x00, 0x05])
    assert SliceHeader(0, 1 * MIB).encode() == word(0x01000000)
    assert SliceHeader(15 * MIB - 5, 15 * MIB).encode() == word(0x0F000000 | (15 * MIB - 5))
    assert SliceHeader(0x123456, 2 * MIB).encode() == word(0x02123456)


def test_header_decode_exact_value() -> None:
    """Decoding 0x0A000010 gives dataLen 16, P 10 MiB, version 0."""
    assert SliceHeader.decode(word(0x0A000010)) == SliceHeader(16, 10 * MIB, 0)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (word(0x80000000 | 0x04000005), "reserved bit 31 set"),
        (word(0x80000000), "reserved bit with everything else zero"),
        (word(0x10000000 | 0x04000005), "version 1"),
        (word(0x20000000 | 0x04000005), "version 2"),
        (word(0x40000000 | 0x04000005), "version 4"),
        (word(0x70000000 | 0x04000005), "version 7"),
        (word(0x00000000), "P = 0, dataLen 0"),
        (word(0x00000005), "P = 0, dataLen 5"),
        (word(0x01000000 | (MIB - 4)), "dataLen = P - 4 for 1 MiB"),
        (word(0x04000000 | (4 * MIB - 4)), "dataLen = P - 4 for 4 MiB"),
        (word(0x01FFFFFF), "dataLen 2^24 - 1 with P = 1 MiB"),
        (word(0x0FFFFFFF), "dataLen 2^24 - 1 with P = 15 MiB"),
        (b"", "empty"),
        (b"\x04\x00\x00", "3 bytes"),
        (b"\x04\x00\x00\x05\x00", "5 bytes"),
    ],
)
def test_header_decode_rejects(raw: bytes, why: str) -> None:
    """decode raises MalformedSlice (a ProtocolError) for every malformed case the spec names."""
    with pytest.raises(MalformedSlice):
        SliceHeader.decode(raw)
    assert issubclass(MalformedSlice, ProtocolError)


@given(
    st.integers(min_value=0, max_value=0xFFFFFFFF).filter(
        lambda w: w & 0xF0000000 != 0 or (w >> 24) & 0xF == 0
    )
)
def test_header_decode_rejects_any_bad_high_bits(value: int) -> None:
    """Any word with bits 28-31 set or P = 0 is rejected, whatever its dataLen."""
    with pytest.raises(MalformedSlice):
        SliceHeader.decode(word(value))


@given(st.integers(min_value=1, max_value=15), st.integers(min_value=0, max_value=0xFFFFFF))
def test_header_decode_data_len_bound(mib: int, data_len: int) -> None:
    """With a valid P, decode accepts dataLen exactly when dataLen <= P - 5."""
    raw = word((mib << 24) | data_len)
    if data_len <= mib * MIB - OVERHEAD:
        assert SliceHeader.decode(raw) == SliceHeader(data_len, mib * MIB)
    else:
        with pytest.raises(MalformedSlice):
            SliceHeader.decode(raw)


@pytest.mark.parametrize(
    "header",
    [
        SliceHeader(-1, 4 * MIB),
        SliceHeader(4 * MIB - 4, 4 * MIB),
        SliceHeader(0, 0),
        SliceHeader(0, 16 * MIB),
        SliceHeader(0, 4 * MIB + 1),
        SliceHeader(0, 4 * MIB, version=1),
    ],
)
def test_header_encode_rejects_unrepresentable(header: SliceHeader) -> None:
    """encode raises ValueError for a dataLen, piece size or version the format cannot carry."""
    with pytest.raises(ValueError):
        header.encode()


def test_wrap_builds_a_whole_slice() -> None:
    """wrap gives header + data + 0x7F, dataLen + 5 bytes long."""
    s = wrap(b"hello", 4 * MIB)
    assert s == word(0x04000005) + b"hello" + TAIL
    assert len(s) == 5 + OVERHEAD


# -- Layout -------------------------------------------------------------------


def test_layout_empty_file() -> None:
    """A 0-byte file has exactly one piece with dataLen 0 (a 5-byte slice)."""
    lay = Layout(0, MIB)
    assert lay.count == 1
    assert lay.data_start(0) == 0
    assert lay.data_len(0) == 0
    assert lay.slice_len(0) == OVERHEAD


def test_layout_one_byte_file() -> None:
    """A 1-byte file has one piece carrying that byte."""
    lay = Layout(1, 4 * MIB)
    assert lay.count == 1
    assert lay.data_start(0) == 0
    assert lay.data_len(0) == 1
    assert lay.slice_len(0) == 6


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("mib", [1, 4, 15])
def test_layout_exact_multiple(k: int, mib: int) -> None:
    """A file of exactly k*(P-5) bytes has k full pieces and no empty trailing piece."""
    p = mib * MIB
    lay = Layout(k * (p - OVERHEAD), p)
    assert lay.piece_data == p - OVERHEAD
    assert lay.count == k
    for n in range(k):
        assert lay.data_start(n) == n * (p - OVERHEAD)
        assert lay.data_len(n) == p - OVERHEAD
        assert lay.slice_len(n) == p
    with pytest.raises(IndexError):
        lay.data_len(k)


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("mib", [1, 4, 15])
def test_layout_one_past_multiple(k: int, mib: int) -> None:
    """A file of k*(P-5)+1 bytes has k full pieces and a last piece of 1 byte."""
    p = mib * MIB
    lay = Layout(k * (p - OVERHEAD) + 1, p)
    assert lay.count == k + 1
    assert lay.data_len(k - 1) == p - OVERHEAD
    assert lay.data_start(k) == k * (p - OVERHEAD)
    assert lay.data_len(k) == 1
    assert lay.slice_len(k) == 1 + OVERHEAD


@given(
    st.integers(min_value=0, max_value=50 * MIB),
    st.integers(min_value=1, max_value=15),
)
def test_layout_pieces_tile_the_file(length: int, mib: int) -> None:
    """Pieces are contiguous, cover [0, L) exactly, count = max(1, ceil(L/(P-5))), none but the last short."""
    p = mib * MIB
    lay = Layout(length, p)
    expected_count = max(1, -(-length // (p - OVERHEAD)))
    assert lay.count == expected_count
    pos = 0
    for n in range(lay.count):
        assert lay.data_start(n) == pos
        dl = lay.data_len(n)
        assert 0 <= dl <= p - OVERHEAD
        if n < lay.count - 1:
            assert dl == p - OVERHEAD
        assert lay.slice_len(n) == dl + OVERHEAD <= p
        pos += dl
    assert pos == length


@pytest.mark.parametrize(("length", "bad"), [(0, 1), (0, -1), (1, 1), (10 * MIB, 3), (10 * MIB, -1)])
def test_layout_out_of_range_piece(length: int, bad: int) -> None:
    """data_len and slice_len raise IndexError for a piece number outside 0..count-1."""
    lay = Layout(length, 4 * MIB)
    with pytest.raises(IndexError):
        lay.data_len(bad)
    with pytest.raises(IndexError):
        lay.slice_len(bad)
