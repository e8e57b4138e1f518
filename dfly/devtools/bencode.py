"""Bencoding (BitTorrent's serialisation), for the benchmark's tracker and .torrent writer.

Integers, byte strings, lists and dictionaries (keys sorted as raw bytes, as
the format requires).  C{str} is written as UTF-8 bytes.  L{decode} accepts
only canonical input and raises L{BencodeError} on anything else.
"""

from __future__ import annotations

from typing import Any

from dfly.errors import BencodeError

__all__ = ["BencodeError", "decode", "encode"]


def encode(value: Any) -> bytes:
    """Bencode C{value} (int, bytes, str, list/tuple, dict with str or bytes keys)."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: Any, out: list[bytes]) -> None:
    if isinstance(value, bool):
        raise BencodeError("booleans have no bencoding")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out.append(b"%d:" % len(data))
        out.append(data)
    elif isinstance(value, str):
        _encode(value.encode("utf-8"), out)
    elif isinstance(value, list | tuple):
        out.append(b"l")
        for item in value:
            _encode(item, out)
        out.append(b"e")
    elif isinstance(value, dict):
        keys = {(k.encode("utf-8") if isinstance(k, str) else k): v for k, v in value.items()}
        if len(keys) != len(value) or not all(isinstance(k, bytes) for k in keys):
            raise BencodeError("dictionary keys must be distinct strings")
        out.append(b"d")
        for key in sorted(keys):
            _encode(key, out)
            _encode(keys[key], out)
        out.append(b"e")
    else:
        raise BencodeError(f"cannot bencode {type(value).__name__}")


def decode(data: bytes) -> Any:
    """The one value in C{data}; dictionary keys and strings stay bytes."""
    value, end = _decode(data, 0)
    if end != len(data):
        raise BencodeError(f"trailing bytes after offset {end}")
    return value


def _decode(data: bytes, i: int) -> tuple[Any, int]:
    if i >= len(data):
        raise BencodeError("truncated")
    c = data[i : i + 1]
    if c == b"i":
        end = data.find(b"e", i)
        if end < 0:
            raise BencodeError("unterminated integer")
        text = data[i + 1 : end]
        if not text or text in (b"-", b"-0") or (text[:1] == b"0" and len(text) > 1) or text[:2] == b"-0":
            raise BencodeError(f"bad integer {text!r}")
        try:
            return int(text), end + 1
        except ValueError as e:
            raise BencodeError(f"bad integer {text!r}") from e
    if c == b"l":
        items = []
        i += 1
        while data[i : i + 1] != b"e":
            item, i = _decode(data, i)
            items.append(item)
        return items, i + 1
    if c == b"d":
        result: dict[bytes, Any] = {}
        i += 1
        last: bytes | None = None
        while data[i : i + 1] != b"e":
            key, i = _decode(data, i)
            if not isinstance(key, bytes):
                raise BencodeError("dictionary key is not a string")
            if last is not None and key <= last:
                raise BencodeError("dictionary keys not sorted")
            last = key
            result[key], i = _decode(data, i)
        return result, i + 1
    if c.isdigit():
        colon = data.find(b":", i)
        text = data[i:colon]
        if colon < 0 or not text.isdigit() or (text[:1] == b"0" and len(text) > 1):
            raise BencodeError("bad string length")
        start = colon + 1
        end = start + int(text)
        if end > len(data):
            raise BencodeError("truncated string")
        return data[start:end], end
    raise BencodeError(f"unexpected byte {c!r} at offset {i}")
