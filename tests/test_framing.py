"""Tests for dfly.wire.framing: control frames and slices on one byte stream."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfly.errors import (
    BadControlMessage,
    MalformedSlice,
    OversizeFrame,
    PieceDigestMismatch,
    ProtocolError,
)
from dfly.pieces import MIB, TAIL, SliceHeader, wrap
from dfly.wire.framing import MAX_CONTROL, FrameParser, decode_control, encode_control
from dfly.wire.messages import get_int, get_md5

P = 1 * MIB


class Recorder:
    """A FrameHandler that records every event and asks for the slices control frames announce."""

    def __init__(self, max_control: int = MAX_CONTROL) -> None:
        self.parser = FrameParser(self, max_control)
        self.events: list[tuple[Any, ...]] = []
        self.views_ok = True

    def control_received(self, msg: dict[str, Any]) -> None:
        self.events.append(("control", msg))
        if msg["op"] == "slice":
            md5 = get_md5(msg, "md5") if msg.get("md5") is not None else None
            self.parser.expect_slice(
                get_int(msg, "piece_size", MIB, 15 * MIB), get_int(msg, "data_len"), md5
            )

    def slice_data(self, data: memoryview) -> None:
        if not isinstance(data, memoryview) or len(data) == 0:
            self.views_ok = False
        self.events.append(("data", bytes(data)))

    def slice_finished(self) -> None:
        self.events.append(("end",))

    def merged(self) -> list[tuple[Any, ...]]:
        """Events with runs of consecutive data chunks joined into one."""
        out: list[tuple[Any, ...]] = []
        for ev in self.events:
            if ev[0] == "data" and out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + ev[1])
            else:
                out.append(ev)
        return out


def slice_msg(data: bytes, piece_size: int = P, md5: str | None = "auto", **extra: Any) -> dict[str, Any]:
    """The control message announcing a slice of C{data}."""
    if md5 == "auto":
        md5 = hashlib.md5(wrap(data, piece_size)).hexdigest()
    return {"op": "slice", "piece_size": piece_size, "data_len": len(data), "md5": md5, **extra}


def build(units: list[Any]) -> tuple[bytes, list[tuple[Any, ...]]]:
    """Encode a list of control dicts and ('slice', data) pairs; return the stream and expected merged events."""
    stream = b""
    expected: list[tuple[Any, ...]] = []
    for unit in units:
        if isinstance(unit, dict):
            stream += encode_control(unit)
            expected.append(("control", unit))
        else:
            data = unit
            msg = slice_msg(data)
            stream += encode_control(msg) + wrap(data, P)
            expected.append(("control", msg))
            if data:
                expected.append(("data", data))
            expected.append(("end",))
    return stream, expected


SAMPLE_UNITS: list[Any] = [
    {"op": "hello", "peer": "a", "n": 1},
    {"op": "ping"},
    bytes(range(256)) * 5,
    b"",
    {"op": "between", "list": [1, 2, 3], "nested": {"x": None}},
    b"x",
    b"\x7f" * 300,
    {"op": "bye"},
]


def feed_chunks(parser: FrameParser, stream: bytes, cuts: list[int]) -> None:
    """Feed C{stream} split at the sorted positions C{cuts}."""
    prev = 0
    for c in sorted(set(cuts)) + [len(stream)]:
        parser.feed(stream[prev:c])
        prev = c


# -- well-formed streams --------------------------------------------------------


def test_control_round_trip() -> None:
    """encode_control gives a 4-byte BE length + compact JSON, and the parser hands back an equal dict."""
    msg = {"op": "register", "task": "t", "pieces": [1, 2], "ok": True, "s": "é\u2603"}
    frame = encode_control(msg)
    (length,) = struct.unpack("!I", frame[:4])
    assert length == len(frame) - 4
    assert json.loads(frame[4:].decode("utf-8")) == msg
    rec = Recorder()
    rec.parser.feed(frame)
    assert rec.events == [("control", msg)]
    assert not rec.parser.in_slice


def test_encode_control_rejects_oversize() -> None:
    """encode_control raises OversizeFrame for a body longer than max_control but accepts exactly max_control."""
    body_len = len(encode_control({"op": "x", "pad": ""})) - 4
    msg = {"op": "x", "pad": "a" * (100 - body_len)}
    assert len(encode_control(msg, max_control=100)) == 104
    with pytest.raises(OversizeFrame):
        encode_control({"op": "x", "pad": "a" * (101 - body_len)}, max_control=100)


def test_control_frame_at_max_length_accepted() -> None:
    """A control frame of exactly max_control bytes is parsed."""
    body_len = len(encode_control({"op": "x", "pad": ""})) - 4
    msg = {"op": "x", "pad": "a" * (100 - body_len)}
    rec = Recorder(max_control=100)
    rec.parser.feed(encode_control(msg, max_control=100))
    assert rec.events == [("control", msg)]


def test_sequence_all_at_once() -> None:
    """Control frames and slices fed in one chunk come out in order with the data intact and md5s checked."""
    stream, expected = build(SAMPLE_UNITS)
    rec = Recorder()
    rec.parser.feed(stream)
    assert rec.merged() == expected
    assert rec.views_ok
    assert not rec.parser.in_slice


def test_sequence_one_byte_at_a_time() -> None:
    """Feeding the same stream one byte at a time gives the same events, one data byte per chunk."""
    stream, expected = build(SAMPLE_UNITS)
    rec = Recorder()
    for i in range(len(stream)):
        rec.parser.feed(stream[i : i + 1])
    assert rec.merged() == expected
    assert rec.views_ok
    assert all(len(ev[1]) == 1 for ev in rec.events if ev[0] == "data")


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_sequence_random_chunking(data: st.DataObject) -> None:
    """Any chunking of the stream (including empty chunks) gives the same events as feeding it whole."""
    stream, expected = build(SAMPLE_UNITS)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=40))
    rec = Recorder()
    prev = 0
    for c in sorted(cuts) + [len(stream)]:  # duplicates give empty feeds
        rec.parser.feed(stream[prev:c])
        prev = c
    assert rec.merged() == expected
    assert rec.views_ok


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=600),
            st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=8), max_size=3).map(
                lambda d: {**d, "op": "ctl"}
            ),
        ),
        max_size=6,
    ),
    st.data(),
)
def test_random_units_random_chunking(units: list[Any], data: st.DataObject) -> None:
    """Random sequences of control frames and slices survive any chunking intact."""
    stream, expected = build(units)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=20))
    rec = Recorder()
    feed_chunks(rec.parser, stream, cuts)
    assert rec.merged() == expected
    assert rec.views_ok


def test_zero_byte_slice() -> None:
    """A 0-byte slice (header + tail only) finishes with no slice_data calls and checks its md5."""
    stream, _ = build([b"", {"op": "after"}])
    assert len(stream) - len(encode_control(slice_msg(b""))) - len(encode_control({"op": "after"})) == 5
    rec = Recorder()
    rec.parser.feed(stream)
    assert rec.events == [("control", slice_msg(b"")), ("end",), ("control", {"op": "after"})]


def test_full_piece_slice_in_large_chunks() -> None:
    """A slice of exactly P-5 bytes is streamed as memoryviews that reassemble to the data."""
    payload = bytes(i % 251 for i in range(P - 5))
    msg = slice_msg(payload)
    stream = encode_control(msg) + wrap(payload, P)
    rec = Recorder()
    for i in range(0, len(stream), 65536):
        rec.parser.feed(stream[i : i + 65536])
    merged = rec.merged()
    assert merged == [("control", msg), ("data", payload), ("end",)]
    assert rec.views_ok


def test_slice_without_md5_is_not_checked() -> None:
    """With md5 None announced, a slice is accepted without a digest check."""
    msg = slice_msg(b"abc", md5=None)
    rec = Recorder()
    rec.parser.feed(encode_control(msg) + wrap(b"abc", P))
    assert rec.merged() == [("control", msg), ("data", b"abc"), ("end",)]


def test_in_slice_tracks_state() -> None:
    """in_slice is true from the announcing control frame until the tail, false otherwise."""
    rec = Recorder()
    msg = slice_msg(b"abcd")
    rec.parser.feed(encode_control(msg))
    assert rec.parser.in_slice
    rec.parser.feed(wrap(b"abcd", P)[:-1])
    assert rec.parser.in_slice
    rec.parser.feed(TAIL)
    assert not rec.parser.in_slice


# -- malformed streams ------------------------------------------------------------

GOOD_TAIL = encode_control({"op": "ping"}) + encode_control(slice_msg(b"q")) + wrap(b"q", P)


def frame_raw(body: bytes) -> bytes:
    """A control frame with an arbitrary body."""
    return struct.pack("!I", len(body)) + body


def hdr(value: int) -> bytes:
    """A raw slice header word."""
    return struct.pack("!I", value)


DATA = b"hello"
ANNOUNCE = encode_control(slice_msg(DATA))
HEADER_OK = SliceHeader(len(DATA), P).encode()

MALFORMED: list[tuple[str, bytes, type[ProtocolError]]] = [
    ("oversize control length", struct.pack("!I", 101) + b"{}", OversizeFrame),
    ("huge control length", b"\xff\xff\xff\xff", OversizeFrame),
    ("zero-length control", b"\x00\x00\x00\x00", BadControlMessage),
    ("non-JSON body", frame_raw(b"not json"), BadControlMessage),
    ("invalid UTF-8 body", frame_raw(b'{"op":"\xff"}'), BadControlMessage),
    ("JSON array", frame_raw(b'["op"]'), BadControlMessage),
    ("JSON string", frame_raw(b'"op"'), BadControlMessage),
    ("JSON number", frame_raw(b"5"), BadControlMessage),
    ("JSON null", frame_raw(b"null"), BadControlMessage),
    ("object without op", frame_raw(b'{"x":"y"}'), BadControlMessage),
    ("op is a number", frame_raw(b'{"op":1}'), BadControlMessage),
    ("op is null", frame_raw(b'{"op":null}'), BadControlMessage),
    ("op is a list", frame_raw(b'{"op":["a"]}'), BadControlMessage),
    ("unterminated JSON array", frame_raw(b"[" * 100), BadControlMessage),
    ("wrong tail", ANNOUNCE + HEADER_OK + DATA + b"\x00", MalformedSlice),
    ("tail 0x7e", ANNOUNCE + HEADER_OK + DATA + b"\x7e", MalformedSlice),
    ("reserved bit", ANNOUNCE + hdr(0x80000000 | 0x01000005) + DATA + TAIL, MalformedSlice),
    ("unknown version", ANNOUNCE + hdr(0x10000000 | 0x01000005) + DATA + TAIL, MalformedSlice),
    ("P = 0", ANNOUNCE + hdr(0x00000005) + DATA + TAIL, MalformedSlice),
    ("dataLen > P-5", ANNOUNCE + hdr(0x01000000 | (P - 4)), MalformedSlice),
    ("dataLen disagrees", ANNOUNCE + SliceHeader(4, P).encode() + DATA[:4] + TAIL, MalformedSlice),
    ("dataLen larger than asked", ANNOUNCE + SliceHeader(6, P).encode(), MalformedSlice),
    ("piece size disagrees", ANNOUNCE + SliceHeader(5, 2 * P).encode() + DATA + TAIL, MalformedSlice),
    (
        "md5 mismatch",
        encode_control(slice_msg(DATA, md5="0" * 32)) + wrap(DATA, P),
        PieceDigestMismatch,
    ),
    ("corrupted data", ANNOUNCE + HEADER_OK + b"hellO" + TAIL, PieceDigestMismatch),
]


@pytest.mark.parametrize(("stream", "error"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_raises_then_ignores(stream: bytes, error: type[ProtocolError]) -> None:
    """Each violation raises its ProtocolError subclass; afterwards the parser ignores all input."""
    rec = Recorder(max_control=100)
    with pytest.raises(error):
        rec.parser.feed(stream + GOOD_TAIL)
    before = list(rec.events)
    rec.parser.feed(GOOD_TAIL)
    rec.parser.feed(encode_control({"op": "more"}))
    assert rec.events == before
    assert not any(ev == ("control", {"op": "ping"}) for ev in rec.events)


@pytest.mark.parametrize(("stream", "error"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_byte_at_a_time(stream: bytes, error: type[ProtocolError]) -> None:
    """Fed one byte at a time, each violation is still detected with the same error class."""
    rec = Recorder(max_control=100)
    with pytest.raises(error):
        for i in range(len(stream)):
            rec.parser.feed(stream[i : i + 1])
    rec.parser.feed(GOOD_TAIL)
    assert ("control", {"op": "ping"}) not in rec.events


def test_md5_mismatch_after_data_delivered() -> None:
    """On md5 mismatch the data was streamed but slice_finished is never called."""
    rec = Recorder()
    with pytest.raises(PieceDigestMismatch):
        rec.parser.feed(encode_control(slice_msg(DATA, md5="f" * 32)) + wrap(DATA, P))
    assert ("end",) not in rec.events
    assert rec.merged()[-1] == ("data", DATA)


def test_decode_control_deep_nesting() -> None:
    """A deeply nested JSON body (within max_control) is a BadControlMessage, not a RecursionError."""
    with pytest.raises(BadControlMessage):
        decode_control(b"[" * 60000)
    with pytest.raises(BadControlMessage):
        decode_control(b'{"op":"x","a":' + b"[" * 60000 + b"]" * 60000 + b"}")


# -- fuzzing ----------------------------------------------------------------------


def _feed_expecting_only_protocol_errors(stream: bytes, cuts: list[int]) -> None:
    rec = Recorder(max_control=1000)
    prev = 0
    for c in sorted(cuts) + [len(stream)]:
        try:
            rec.parser.feed(stream[prev:c])
        except ProtocolError:
            pass
        prev = c


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_fuzz_random_bytes(stream: bytes, cuts: list[int]) -> None:
    """Random bytes in random chunks never raise anything but ProtocolError subclasses."""
    _feed_expecting_only_protocol_errors(stream, [c for c in cuts if c <= len(stream)])


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=6,
    ),
    st.integers(min_value=0, max_value=10**6),
    st.lists(st.integers(min_value=0, max_value=10**6), max_size=10),
)
def test_fuzz_mutated_stream(flips: list[tuple[int, int]], cut: int, chunks: list[int]) -> None:
    """A valid stream with random bytes overwritten and a random truncation raises only ProtocolErrors."""
    stream, _ = build(SAMPLE_UNITS)
    buf = bytearray(stream)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    buf = buf[: cut % (len(buf) + 1)]
    n = len(buf) + 1
    _feed_expecting_only_protocol_errors(bytes(buf), [c % n for c in chunks])


def test_slice_without_an_md5_up_front_is_hashed_for_a_later_check() -> None:
    """A slice announced with no md5 (a piece the supernode was still receiving) is not
    checked by the parser, but its md5 is there when the slice ends, fed one byte at a
    time: the receiver compares it with the md5 announced later."""
    data = bytes(range(256)) * 9
    rec = Recorder()
    stream = encode_control(slice_msg(data, md5=None)) + wrap(data, P)
    for i in range(len(stream)):
        rec.parser.feed(stream[i : i + 1])
        if rec.events and rec.events[-1] == ("end",):
            break
    assert rec.events[-1] == ("end",)
    assert rec.parser.last_md5 == hashlib.md5(wrap(data, P)).hexdigest()
