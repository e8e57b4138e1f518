"""Write a single-file .torrent (BitTorrent v1 metainfo) for the benchmark's aria2c swarm.

The file is read once in C{piece_length} steps (never whole) to compute the
SHA-1 of every piece; the info-hash is the SHA-1 of the bencoded C{info}
dictionary, exactly as clients compute it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from dfly.devtools import bencode


def piece_hashes(path: str, piece_length: int) -> bytes:
    """Concatenated 20-byte SHA-1 digests of the pieces of the file at C{path}."""
    if piece_length <= 0 or piece_length % 16384:
        raise ValueError("piece length must be a positive multiple of 16 KiB")
    out = []
    with open(path, "rb") as f:
        while True:
            h = hashlib.sha1()
            left = piece_length
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            if left == piece_length:
                break
            out.append(h.digest())
            if left:
                break
    return b"".join(out)


def info_dict(path: str, piece_length: int, name: str | None = None) -> dict[str, Any]:
    """The C{info} dictionary for one file."""
    return {
        "name": name or os.path.basename(path),
        "length": os.path.getsize(path),
        "piece length": piece_length,
        "pieces": piece_hashes(path, piece_length),
    }


def info_hash(info: dict[str, Any]) -> bytes:
    """The 20-byte info-hash of an C{info} dictionary."""
    return hashlib.sha1(bencode.encode(info)).digest()


def make_torrent(path: str, announce: str, piece_length: int, name: str | None = None) -> tuple[bytes, bytes]:
    """(metainfo bytes, info-hash) of a single-file torrent of C{path} tracked at C{announce}."""
    info = info_dict(path, piece_length, name)
    return bencode.encode({"announce": announce, "info": info}), info_hash(info)


def write_torrent(path: str, out: str, announce: str, piece_length: int, name: str | None = None) -> bytes:
    """Write the .torrent of C{path} to C{out}; return its info-hash."""
    data, digest = make_torrent(path, announce, piece_length, name)
    with open(out, "wb") as f:
        f.write(data)
    return digest
