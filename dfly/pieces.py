"""Piece arithmetic and the slice header (normative: the dfly slice format).

A file of L bytes is cut into pieces of piece size P (1..15 MiB).  Piece n
carries raw bytes [n*(P-5), min((n+1)*(P-5), L)) wrapped as a slice:
a 4-byte big-endian header, the data, and a one-byte tail 0x7F.  A 0-byte file
has exactly one piece with no data.

Header bits (0 = least significant): 0-23 dataLen, 24-27 P in MiB,
28-30 version (0 here), 31 reserved (0).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dfly.errors import MalformedSlice

MIB = 1 << 20
HEADER_LEN = 4
TAIL = b"\x7f"
OVERHEAD = HEADER_LEN + len(TAIL)
KNOWN_VERSIONS = frozenset({0})
MIN_PIECE_MIB = 1
MAX_PIECE_MIB = 15

_HEADER = struct.Struct("!I")


def default_piece_size(length: int | None) -> int:
    """Piece size in bytes for a file of C{length} bytes (None: unknown).

    4 MiB when L <= 200 MiB or unknown, else min(L / 100 MiB + 2, 15) MiB.
    """
    if length is None or length < 0 or length <= 200 * MIB:
        return 4 * MIB
    return min(length // (100 * MIB) + 2, MAX_PIECE_MIB) * MIB


def check_piece_size(piece_size: int) -> int:
    """Return C{piece_size} if it is a whole number of MiB in 1..15, else raise ValueError."""
    mib, rest = divmod(piece_size, MIB)
    if rest or not MIN_PIECE_MIB <= mib <= MAX_PIECE_MIB:
        raise ValueError(f"piece size must be a whole number of MiB from 1 to 15, not {piece_size}")
    return piece_size


@dataclass(frozen=True)
class SliceHeader:
    """The decoded 4-byte header of one slice."""

    data_len: int
    piece_size: int
    version: int = 0

    def encode(self) -> bytes:
        """The 4 header bytes; raises ValueError for values the format cannot carry."""
        check_piece_size(self.piece_size)
        if not 0 <= self.data_len <= self.piece_size - OVERHEAD:
            raise ValueError(f"dataLen {self.data_len} does not fit piece size {self.piece_size}")
        if self.version not in KNOWN_VERSIONS:
            raise ValueError(f"unknown slice version {self.version}")
        word = self.data_len | ((self.piece_size // MIB) << 24) | (self.version << 28)
        return _HEADER.pack(word)

    @classmethod
    def decode(cls, raw: bytes) -> SliceHeader:
        """Parse 4 header bytes, raising L{MalformedSlice} for any rule the spec names."""
        if len(raw) != HEADER_LEN:
            raise MalformedSlice(f"slice header must be 4 bytes, got {len(raw)}")
        (word,) = _HEADER.unpack(raw)
        if word & 0x80000000:
            raise MalformedSlice("slice header has the reserved bit set")
        version = (word >> 28) & 0x7
        if version not in KNOWN_VERSIONS:
            raise MalformedSlice(f"slice version {version} is unknown")
        mib = (word >> 24) & 0xF
        if mib == 0:
            raise MalformedSlice("slice header gives piece size 0")
        data_len = word & 0xFFFFFF
        piece_size = mib * MIB
        if data_len > piece_size - OVERHEAD:
            raise MalformedSlice(f"slice dataLen {data_len} exceeds piece size {mib} MiB - 5")
        return cls(data_len=data_len, piece_size=piece_size, version=version)


@dataclass(frozen=True)
class Layout:
    """Where each piece of a file of known C{length} lies, for piece size C{piece_size}."""

    length: int
    piece_size: int

    @property
    def piece_data(self) -> int:
        """Raw data bytes in every piece but the last."""
        return self.piece_size - OVERHEAD

    @property
    def count(self) -> int:
        """Number of pieces; a 0-byte file has one (empty) piece."""
        return max(1, -(-self.length // self.piece_data))

    def data_start(self, piece: int) -> int:
        """Raw file offset of the first data byte of C{piece}."""
        return piece * self.piece_data

    def data_len(self, piece: int) -> int:
        """Raw data bytes carried by C{piece}."""
        if not 0 <= piece < self.count:
            raise IndexError(piece)
        return min(self.piece_data, self.length - self.data_start(piece))

    def slice_len(self, piece: int) -> int:
        """Bytes the slice of C{piece} occupies (data + 5)."""
        return self.data_len(piece) + OVERHEAD


def wrap(data: bytes, piece_size: int) -> bytes:
    """A whole slice for small C{data}: used by tests and by tools, never on a hot path."""
    return SliceHeader(len(data), piece_size).encode() + bytes(data) + TAIL


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of C{data} at C{offset}: a short write (a filling disk) is retried, and
    an error such as ENOSPC is raised rather than silently losing bytes."""
    import os

    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(28, "No space left on device")
        view = view[n:]
        offset += n
