"""Typed access to the fields of control messages.

Every field read from a peer goes through these helpers, so a missing or
ill-typed field is a L{BadControlMessage} (the connection closes) rather than
a KeyError or TypeError somewhere deep in a daemon.
"""

from __future__ import annotations

import re
from typing import Any

from dfly.errors import BadControlMessage

_TASK_ID = re.compile(r"^[0-9a-f]{64}$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_RANGE = re.compile(r"([0-9]{1,18})(?:-([0-9]{1,18}))?")


def get_int(msg: dict[str, Any], key: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    """An integer field within [lo, hi]."""
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadControlMessage(f"{msg.get('op')}: field {key!r} must be an integer in [{lo}, {hi}]")
    return value


def get_opt_int(msg: dict[str, Any], key: str, lo: int = 0, hi: int = 2**63 - 1) -> int | None:
    """An optional integer field (absent or null gives None)."""
    if msg.get(key) is None:
        return None
    return get_int(msg, key, lo, hi)


def _text(value: Any) -> bool:
    """A str that is real Unicode text (JSON can smuggle in lone surrogates, which are not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def get_str(msg: dict[str, Any], key: str, max_len: int = 8192) -> str:
    """A string field of at most C{max_len} characters."""
    value = msg.get(key)
    if not _text(value) or len(str(value)) > max_len:
        raise BadControlMessage(f"{msg.get('op')}: field {key!r} must be a string")
    return str(value)


def get_opt_str(msg: dict[str, Any], key: str, max_len: int = 8192) -> str | None:
    """An optional string field."""
    if msg.get(key) is None:
        return None
    return get_str(msg, key, max_len)


def get_bool(msg: dict[str, Any], key: str, default: bool = False) -> bool:
    """A boolean field, C{default} when absent."""
    value = msg.get(key, default)
    if not isinstance(value, bool):
        raise BadControlMessage(f"{msg.get('op')}: field {key!r} must be a boolean")
    return value


def get_task_id(msg: dict[str, Any], key: str = "task") -> str:
    """A task id: 64 lowercase hex digits (safe to use in file names)."""
    value = get_str(msg, key, 64)
    if not _TASK_ID.match(value):
        raise BadControlMessage(f"{msg.get('op')}: field {key!r} is not a task id")
    return value


def get_md5(msg: dict[str, Any], key: str) -> str:
    """An md5 as 32 lowercase hex digits."""
    value = get_str(msg, key, 32)
    if not _MD5.match(value):
        raise BadControlMessage(f"{msg.get('op')}: field {key!r} is not an md5")
    return value


def get_str_list(msg: dict[str, Any], key: str, max_items: int = 256) -> list[str]:
    """A list of strings (absent gives an empty list)."""
    value = msg.get(key, [])
    if (
        not isinstance(value, list)
        or len(value) > max_items
        or not all(_text(v) for v in value)
    ):
        raise BadControlMessage(f"{msg.get('op')}: field {key!r} must be a list of strings")
    return value


def encode_ranges(pieces: set[int] | frozenset[int]) -> str:
    """Compact text for a set of piece numbers: C{"0-9,12,15-20"}."""
    out: list[str] = []
    run_start = prev = None
    for n in sorted(pieces):
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if run_start is not None:
            out.append(str(run_start) if run_start == prev else f"{run_start}-{prev}")
        run_start = prev = n
    if run_start is not None:
        out.append(str(run_start) if run_start == prev else f"{run_start}-{prev}")
    return ",".join(out)


def decode_ranges(text: str, limit: int, clamp: bool = False) -> set[int]:
    """Parse L{encode_ranges} text; every number must be below C{limit}.

    With C{clamp}, numbers at or above C{limit} are dropped instead of refused, so the
    result never holds more than C{limit} numbers whatever the text claims.
    """
    result: set[int] = set()
    if not text:
        return result
    for part in text.split(","):
        match = _RANGE.fullmatch(part)
        if match is None:
            raise BadControlMessage(f"bad piece range {part!r}")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if lo > hi:
            raise BadControlMessage(f"piece range {part!r} runs backwards")
        if hi >= limit:
            if not clamp:
                raise BadControlMessage(f"piece range {part!r} outside 0..{limit - 1}")
            hi = limit - 1
        result.update(range(lo, hi + 1))
    return result
