"""Tests for dfly.wire.messages: typed field access and piece-range text."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfly.errors import BadControlMessage
from dfly.wire.messages import (
    decode_ranges,
    encode_ranges,
    get_bool,
    get_int,
    get_md5,
    get_opt_int,
    get_opt_str,
    get_str,
    get_str_list,
    get_task_id,
)

TASK = "0123456789abcdef" * 4
MD5 = "0123456789abcdef" * 2


def m(**fields: Any) -> dict[str, Any]:
    """A control message with op 'test' and the given fields."""
    return {"op": "test", **fields}


# -- get_int ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "lo", "hi"), [(0, 0, 10), (10, 0, 10), (5, 5, 5), (-3, -5, 0), (2**63 - 1, 0, 2**63 - 1)])
def test_get_int_accepts_in_range(value: int, lo: int, hi: int) -> None:
    """get_int returns an int within [lo, hi], bounds included."""
    assert get_int(m(x=value), "x", lo, hi) == value


@pytest.mark.parametrize("value", [True, False, 1.0, 1.5, "1", None, [1], {"a": 1}])
def test_get_int_rejects_wrong_types(value: Any) -> None:
    """get_int rejects bools, floats (even integral ones), strings, null, lists and objects."""
    with pytest.raises(BadControlMessage):
        get_int(m(x=value), "x")


@pytest.mark.parametrize(("value", "lo", "hi"), [(-1, 0, 10), (11, 0, 10), (2**63, 0, 2**63 - 1), (4, 5, 9)])
def test_get_int_rejects_out_of_range(value: int, lo: int, hi: int) -> None:
    """get_int rejects integers outside [lo, hi]; the default range excludes negatives and >= 2**63."""
    with pytest.raises(BadControlMessage):
        get_int(m(x=value), "x", lo, hi)


def test_get_int_default_range_and_missing() -> None:
    """With default bounds -1 is rejected, and a missing field is rejected."""
    with pytest.raises(BadControlMessage):
        get_int(m(x=-1), "x")
    with pytest.raises(BadControlMessage):
        get_int(m(), "x")


def test_get_opt_int() -> None:
    """get_opt_int gives None for absent or null, checks the value otherwise."""
    assert get_opt_int(m(), "x") is None
    assert get_opt_int(m(x=None), "x") is None
    assert get_opt_int(m(x=7), "x") == 7
    with pytest.raises(BadControlMessage):
        get_opt_int(m(x=True), "x")
    with pytest.raises(BadControlMessage):
        get_opt_int(m(x=100), "x", 0, 99)


# -- get_str / get_bool / get_str_list -----------------------------------------------


def test_get_str_accepts_up_to_max_len() -> None:
    """get_str returns strings of at most max_len characters, including the empty string."""
    assert get_str(m(s=""), "s") == ""
    assert get_str(m(s="abc"), "s", 3) == "abc"
    assert get_str(m(s="é" * 8192), "s") == "é" * 8192


@pytest.mark.parametrize("value", [None, 1, True, b"abc", ["a"], {"a": "b"}])
def test_get_str_rejects_wrong_types(value: Any) -> None:
    """get_str rejects anything that is not a str."""
    with pytest.raises(BadControlMessage):
        get_str(m(s=value), "s")


def test_get_str_rejects_too_long_and_missing() -> None:
    """get_str rejects a string longer than max_len (default 8192) and a missing field."""
    with pytest.raises(BadControlMessage):
        get_str(m(s="abcd"), "s", 3)
    with pytest.raises(BadControlMessage):
        get_str(m(s="a" * 8193), "s")
    with pytest.raises(BadControlMessage):
        get_str(m(), "s")


def test_get_opt_str() -> None:
    """get_opt_str gives None for absent or null and checks type otherwise."""
    assert get_opt_str(m(), "s") is None
    assert get_opt_str(m(s=None), "s") is None
    assert get_opt_str(m(s="x"), "s") == "x"
    with pytest.raises(BadControlMessage):
        get_opt_str(m(s=3), "s")


def test_get_bool() -> None:
    """get_bool returns true booleans, the default when absent, and rejects 0/1/strings/null."""
    assert get_bool(m(b=True), "b") is True
    assert get_bool(m(b=False), "b", default=True) is False
    assert get_bool(m(), "b") is False
    assert get_bool(m(), "b", default=True) is True
    for bad in (0, 1, "true", None, [True]):
        with pytest.raises(BadControlMessage):
            get_bool(m(b=bad), "b")


def test_get_str_list() -> None:
    """get_str_list accepts a list of strings (absent: empty) and rejects non-lists, non-strings and too many items."""
    assert get_str_list(m(), "l") == []
    assert get_str_list(m(l=["a", ""]), "l") == ["a", ""]
    assert get_str_list(m(l=["x"] * 3), "l", max_items=3) == ["x"] * 3
    for bad in ("abc", ["a", 1], [None], [["a"]], {"a": "b"}, None, ("a",)):
        with pytest.raises(BadControlMessage):
            get_str_list(m(l=bad), "l")
    with pytest.raises(BadControlMessage):
        get_str_list(m(l=["x"] * 4), "l", max_items=3)
    with pytest.raises(BadControlMessage):
        get_str_list(m(l=["x"] * 257), "l")


# -- get_task_id / get_md5 -------------------------------------------------------------


def test_get_task_id_accepts_64_lower_hex() -> None:
    """A task id of 64 lowercase hex digits is accepted, under 'task' by default or another key."""
    assert get_task_id(m(task=TASK)) == TASK
    assert get_task_id(m(other=TASK), "other") == TASK


@pytest.mark.parametrize(
    "value",
    [
        "../..",
        "../" + TASK[:61],
        TASK[:63] + "/",
        "/" + TASK[1:],
        TASK[:32] + ".." + TASK[34:],
        TASK[:-1] + "\x00",
        TASK.upper(),
        TASK[:63],
        TASK + "0",
        TASK + "\n",
        "g" * 64,
        "",
        " " + TASK[1:],
        64,
        None,
        True,
    ],
)
def test_get_task_id_rejects(value: Any) -> None:
    """Path-traversal-like, wrong-length, uppercase, non-hex, trailing-newline and non-string ids are rejected."""
    with pytest.raises(BadControlMessage):
        get_task_id(m(task=value))


def test_get_task_id_missing() -> None:
    """A message without a task id is rejected."""
    with pytest.raises(BadControlMessage):
        get_task_id(m())


def test_get_md5() -> None:
    """get_md5 accepts 32 lowercase hex digits and rejects everything else."""
    assert get_md5(m(h=MD5), "h") == MD5
    for bad in (MD5.upper(), MD5[:31], MD5 + "0", MD5[:31] + "\n", "z" * 32, "", None, 5, "../" + MD5[3:]):
        with pytest.raises(BadControlMessage):
            get_md5(m(h=bad), "h")


# -- ranges ------------------------------------------------------------------------------


def test_encode_ranges_examples() -> None:
    """encode_ranges compresses runs: empty set -> '', singletons and runs joined by commas, sorted."""
    assert encode_ranges(set()) == ""
    assert encode_ranges({0}) == "0"
    assert encode_ranges({0, 1}) == "0-1"
    assert encode_ranges(frozenset({15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17, 18, 19, 20})) == "0-9,12,15-20"
    assert encode_ranges({3, 5, 7}) == "3,5,7"


@settings(max_examples=200)
@given(st.sets(st.integers(min_value=0, max_value=499)), st.integers(min_value=500, max_value=2000))
def test_ranges_round_trip(pieces: set[int], limit: int) -> None:
    """decode_ranges(encode_ranges(s), limit) == s for every set of ints below limit."""
    text = encode_ranges(pieces)
    assert decode_ranges(text, limit) == pieces


@given(st.sets(st.integers(min_value=0, max_value=200), min_size=1))
def test_ranges_limit_is_exclusive(pieces: set[int]) -> None:
    """decode_ranges accepts a set whose maximum is limit-1 and rejects it with limit = maximum."""
    text = encode_ranges(pieces)
    top = max(pieces)
    assert decode_ranges(text, top + 1) == pieces
    with pytest.raises(BadControlMessage):
        decode_ranges(text, top)


@pytest.mark.parametrize(
    "text",
    [
        ",",
        "1,",
        ",1",
        "1,,2",
        "-",
        "-1",
        "1-",
        "1--2",
        "1-2-3",
        "3-1",
        "a",
        "1-b",
        " 1",
        "1 ",
        "+1",
        "1.0",
        "0x1",
        "\u00b2",  # superscript two: str.isdigit() is true, int() fails
        "1-\u00b2",
        "\u0661",  # Arabic-Indic digit one
        "9" * 5000,  # more digits than int() converts by default
        "10",
        "5-10",
        "0-99999999999999999999999999",
    ],
)
def test_decode_ranges_rejects(text: str) -> None:
    """Malformed, reversed, non-ASCII-digit or out-of-limit (limit 10) range text raises BadControlMessage only."""
    with pytest.raises(BadControlMessage):
        decode_ranges(text, 10)


def test_decode_ranges_empty() -> None:
    """An empty string is the empty set."""
    assert decode_ranges("", 0) == set()
    assert decode_ranges("", 10) == set()


@settings(max_examples=300)
@given(st.text(max_size=30))
def test_decode_ranges_fuzz(text: str) -> None:
    """Arbitrary text either decodes to a set of ints in [0, limit) or raises BadControlMessage."""
    try:
        result = decode_ranges(text, 1000)
    except BadControlMessage:
        return
    assert all(isinstance(n, int) and 0 <= n < 1000 for n in result)
