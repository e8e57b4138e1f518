"""A bounded fuzzer for the framed protocol and every kind of session behind it.

    python -m dfly.devtools.fuzz --frames 1000000 --seconds 300 [--seed N] [--jobs 2]

Hostile and half-valid input is generated (random bytes; control frames with
mutated JSON: wrong types, missing fields, unknown ops, huge and negative
numbers, deep nesting, path-traversal task ids, unicode; truncations; oversize
length prefixes; C{slice} announcements followed by slices with a wrong tail,
an unknown version, the reserved bit, P = 0, a dataLen too large or not the one
asked for, a wrong md5) and fed, in random chunkings, to real
L{FramedProtocol}s over C{StringTransport}s, one fresh protocol per
I{connection} of 1..50 frames.  The session kinds:

* C{supernode}: L{SupernodeSession} of a L{Supernode} on a C{MemoryReactorClock}
  with an in-memory origin (two real cached files, 404s, a silent origin);
* C{slice_server}: L{SliceServerSession} over a L{PeerStore} holding a real task;
* C{fetch}: L{FetchSession} with 0..8 outstanding piece requests;
* C{link}: L{LinkSession} driving a L{PeerNode}'s handling of supernode messages;
* C{localapi}: L{LocalApiSession} of a L{PeerNode}.

A I{crash} is: an exception escaping C{dataReceived} (only L{ProtocolError}s
may be raised by sessions, and the adapter turns those into a closed
connection), a protocol error after which the connection stays open, an
exception from C{connectionLost}, from the timers the session armed, or from
tearing the session down, a failure logged through the Twisted logger, output
that is not a valid frame stream, a broken invariant (a piece request never
answered or answered with the wrong bytes, a download whose Deferred never
fires), a single C{dataReceived} slower than C{--slow-feed} (the reactor would
stall), or a connection that does not finish within C{--hang-seconds}.

The summary gives, per kind, connections, frames and bytes fed, connections
closed for protocol errors, crashes, the slowest single feed, and the
resident memory at the start and at its peak; the exit status is 1 if any
crash was seen.  Crashes are deduplicated by where they happened, the
exception type and the innermost dfly frame; the first few are printed with
the frames that led to them.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import hashlib
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogBeginner, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from dfly.errors import ProtocolError
from dfly.peer.fetch import FetchSession, PieceRequest, SourcePool
from dfly.peer.link import LinkSession
from dfly.peer.localapi import LocalApiSession
from dfly.peer.node import DownloadRequest, PeerNode, hash_range
from dfly.peer.store import PeerStore, StoredTask
from dfly.pieces import MIB, OVERHEAD, TAIL, SliceHeader
from dfly.supernode.service import Supernode
from dfly.urls import task_id_for
from dfly.wire.framing import MAX_CONTROL, FrameParser
from dfly.wire.protocol import FramedProtocol, Session
from dfly.wire.serve import SliceServerSession

KINDS = ("supernode", "slice_server", "fetch", "link", "localapi")
P = MIB
_LEN = struct.Struct("!I")

ORIGIN = "http://origin.fuzz"
FILE_URL = f"{ORIGIN}/file.bin"
BIG_URL = f"{ORIGIN}/big.bin"
CHUNKED_URL = f"{ORIGIN}/chunked.bin"
MISSING_URL = f"{ORIGIN}/missing.bin"
SILENT_URL = f"{ORIGIN}/silent.bin"
URLS = [FILE_URL, BIG_URL, CHUNKED_URL, MISSING_URL, SILENT_URL, FILE_URL + "?sig=abc&x=1"]
BAD_URLS = [
    "http://[::1", "http://a\uff03b/", f"{ORIGIN}/\ud800", "http://\u2603.fuzz/x", f"{ORIGIN}/" + "a" * 8000,
    "file:///etc/passwd", f"{ORIGIN}/../../etc/passwd", "http://", "https://u:p@origin.fuzz:99999/x",
    "HTTP://ORIGIN.FUZZ/file.bin", f"{ORIGIN}/x?%zz&sig", "http://[::1]:0/x", "http://origin.fuzz:-1/",
    "http://ori gin.fuzz/", "http://origin.fuzz/\r\nX: y", "//origin.fuzz/x", "http:origin.fuzz",
]
# md5s and identifiers that are strings but not plain text.
ODD_SIGNS = ["\ud800", "\udfff" * 32, "é☃", "x" * 600, "", "G" * 32]
HEADER_LISTS = [
    ["X-A: b"], ["Bad"], [": x"], ["Range: bytes=0-1"], ["X: a\r\nY: b"], ["A: b"] * 65, [],
    ["\u2603: x"], ["X: \u2603"], ["X: \ud800"], ["X\x00: y"], ["Host: evil.example"],
]

# Task ids the worlds hold (deterministic, so tests can aim at them).
SLICE_TASKS = (hashlib.sha256(b"fuzz-full").hexdigest(), hashlib.sha256(b"fuzz-half").hexdigest())
FETCH_TASK = hashlib.sha256(b"fuzz-fetch").hexdigest()

ALL_OPS = [
    "hello", "register", "done", "fail", "leave", "get", "slice", "nack", "welcome",
    "registered", "refused", "task_info", "task_failed", "assign", "task_reset",
    "download", "progress", "failed", "check", "lost",
]

INTS = [
    0, -1, 1, 2, 5, 31, 32, 33, 255, 65535, 65536, 2**24 - 1, 2**24, 2**31, 2**32,
    2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, MIB, MIB - 5, MIB - 4, 15 * MIB, 16 * MIB,
    10**30, -(10**30),
]
FLOATS = [0.0, -0.0, 1.0, 1.5, 1e308, -1e308, math.inf, -math.inf, math.nan]
STRINGS = [
    "", " ", "cdn", "../../etc/passwd", "..", "/", "/etc/passwd", "..\\..\\windows\\win.ini",
    "%2e%2e%2f%2e%2e%2f", "\x00", "\n", "\r\n", "é☃𝄞", "\ud800", "\udfff", "\u202e", "\uff03",
    "\ufeff", "0" * 64, "F" * 64, "a" * 65, "g" * 64, "../" * 21 + "x", "http://[::1",
    "http://a\uff03b/", "file:///etc/passwd", f"{ORIGIN}/../../etc/passwd", "http://",
    "http:///x", "https://user:pw@origin.fuzz:99999/x", "ftp://origin.fuzz/x", "javascript:1",
    "0-16777215", "0-99999999999999999", "5-1", "1,1,1", "-1", ",", "0x10", "1e3",
    "\u2603: x", "Host: evil", "X: a\r\nY: b", "X:\u2603", ":", "x" * 300, "NaN", "null", "true",
    *BAD_URLS,
]


class Hang(BaseException):
    """A connection did not finish within its time bound (raised from SIGALRM)."""


# -- small helpers ----------------------------------------------------------------


def frame(msg: Any) -> bytes:
    """A control frame for C{msg} as the wire would carry it, whatever its size."""
    body = json.dumps(msg, separators=(",", ":")).encode("utf-8")
    return _LEN.pack(len(body)) + body


def raw_frame(body: bytes) -> bytes:
    """A control frame around arbitrary C{body} bytes."""
    return _LEN.pack(len(body)) + body


def slice_bytes(data: bytes, piece_size: int = P) -> bytes:
    """A well-formed slice of C{data}."""
    return SliceHeader(len(data), piece_size).encode() + data + TAIL


def piece_md5(data: bytes, piece_size: int = P) -> str:
    return hashlib.md5(slice_bytes(data, piece_size)).hexdigest()


def rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _hex_task(rng: random.Random) -> str:
    return rng.randbytes(32).hex()


def _sync_hash(path: str, offset: int, length: int, md5: Any) -> Deferred[None]:
    """The PeerNode hasher, run inline (a memory reactor has no thread pool)."""
    try:
        hash_range(path, offset, length, md5)
    except Exception:
        return fail()
    return succeed(None)


# -- hostile values and mutations ------------------------------------------------


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value chosen to break naive field handling."""
    r = rng.randrange(15)
    if r == 0:
        return None
    if r == 1:
        return rng.choice([True, False])
    if r == 2:
        return rng.choice(INTS)
    if r == 3:
        return rng.randint(-(2**70), 2**70)
    if r == 4:
        return rng.choice(FLOATS)
    if r in (5, 6):
        return rng.choice(STRINGS)
    if r == 7:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x10FFFF)])) for _ in range(rng.randrange(1, 40)))
    if r == 8 and depth < 3:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if r == 9 and depth < 3:
        return {rng.choice(["id", "host", "port", "op", "x", ""]): hostile_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    if r == 10:
        nested: Any = rng.choice([1, "x", None])
        for _ in range(rng.randrange(5, 60)):
            nested = [nested] if rng.random() < 0.5 else {"a": nested}
        return nested
    if r == 11:
        return "x" * rng.choice([1000, 8192, 8193, 20000, MAX_CONTROL])
    if r == 12:
        return str(rng.choice(INTS))
    if r == 13:
        return [rng.choice(STRINGS) for _ in range(rng.choice([1, 2, 64, 65, 300]))]
    return rng.randbytes(32).hex().upper()


def mutate(msg: dict[str, Any], rng: random.Random, vocab: list[Any]) -> dict[str, Any]:
    """C{msg} with one to three fields broken."""
    m = dict(msg)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        keys = list(m)
        key = rng.choice(keys) if keys else "op"
        r = rng.randrange(10)
        if r == 0 and keys:
            del m[key]
        elif r in (1, 2):
            m[key] = hostile_value(rng)
        elif r == 3:
            m["op"] = rng.choice(ALL_OPS + ["", "GET", "get\x00", "hello ", "☃", "x" * 100, "__proto__"])
        elif r == 4:
            m[rng.choice(["task", "piece", "req", "url", "peer", "port", "source", "md5", "len", "x"])] = hostile_value(rng)
        elif r == 5 and vocab:
            m[key] = rng.choice(vocab)
        elif r == 6 and key in m:
            v = m[key]
            m[key] = str(v) if not isinstance(v, str) else [v]
        elif r == 7 and key in m:
            m[key] = rng.choice([[m[key]], {"v": m[key]}])
        elif r == 8 and isinstance(m.get(key), int) and not isinstance(m.get(key), bool):
            m[key] = rng.choice([-m[key] - 1, m[key] + 2 ** rng.randrange(0, 70), m[key] * 1.0])
        elif r == 9:
            m = {"op": m.get("op")}
    return m


SLICE_FAULTS = ("tail", "version", "reserved", "p0", "too_long", "len_mismatch", "piece_size", "md5", "truncate")


def bad_slice(data: bytes, rng: random.Random, fault: str | None = None, piece_size: int = P) -> bytes:
    """A slice of C{data} broken in one of the ways the wire format forbids."""
    fault = fault or rng.choice(SLICE_FAULTS)
    mib = piece_size // MIB
    word = len(data) | (mib << 24)
    body, tail = data, TAIL
    if fault == "tail":
        tail = bytes([rng.choice([0x00, 0x7E, 0x80, 0xFF, 0x7F ^ (1 << rng.randrange(8))])])
    elif fault == "version":
        word |= rng.randrange(1, 8) << 28
    elif fault == "reserved":
        word |= 1 << 31
    elif fault == "p0":
        word &= ~(0xF << 24)
    elif fault == "too_long":
        word = (mib << 24) | rng.randint(piece_size - OVERHEAD + 1, 0xFFFFFF)
        body = body[: rng.randrange(len(body) + 1)]
    elif fault == "len_mismatch":
        delta = rng.choice([-1, 1, 2, 100, -len(data)]) if data else rng.choice([1, 2, 100])
        new_len = max(0, len(data) + delta)
        word = new_len | (mib << 24)
        body = (data + rng.randbytes(max(0, new_len - len(data))))[:new_len]
    elif fault == "piece_size":
        word = len(data) | (rng.choice([m for m in range(1, 16) if m != mib]) << 24)
    elif fault == "md5":
        if data:
            i = rng.randrange(len(data))
            body = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
        else:
            tail = b"\x00"
    whole = _LEN.pack(word) + body + tail
    if fault == "truncate":
        whole = slice_bytes(data, piece_size)
        whole = whole[: rng.randrange(len(whole))]
    return whole


def hostile_unit(world: World, conn: Conn, rng: random.Random) -> bytes:
    """One unit of framing-level junk, or a broken slice."""
    r = rng.randrange(17)
    if r == 0:
        return rng.randbytes(rng.choice([rng.randint(1, 8), rng.randint(1, 64), rng.randint(1, 4096)]))
    if r == 1:
        length = rng.choice([MAX_CONTROL + 1, MAX_CONTROL + 2, 2**31, 2**32 - 1, rng.randint(MAX_CONTROL + 1, 2**32 - 1)])
        return _LEN.pack(length) + rng.randbytes(rng.randrange(0, 100))
    if r == 2:
        return b"\x00\x00\x00\x00" + rng.randbytes(rng.randrange(0, 8))
    if r == 3:
        return raw_frame(rng.choice([b'{"op":"\xff\xfe"}', b"\xff" * 8, b'{"op":"get","task":"\xc3\x28"}', b"\xed\xa0\x80"]))
    if r == 4:
        return raw_frame(rng.choice([
            b"[]", b"5", b'"op"', b"null", b"true", b'["op","get"]', b"{}", b'{"op":1}',
            b'{"op":null}', b'{"op":["get"]}', b'{"op":{"op":"get"}}', b"{", b'{"op":"get"', b" ",
        ]))
    if r == 5:
        d = rng.choice([100, 1000, 5000, 30000])
        op = rng.choice(ALL_OPS).encode()
        return raw_frame(rng.choice([
            b'{"op":"' + op + b'","task":' + b"[" * d + b"]" * d + b"}",
            b"[" * d,
            b'{"op":"' + op + b'","x":' + b'{"a":' * (d // 6) + b"1" + b"}" * (d // 6) + b"}",
        ]))
    if r == 6:
        digits = rng.choice([20, 4300, 4301, 20000])
        return raw_frame(b'{"op":"' + rng.choice(ALL_OPS).encode() + b'","piece":' + b"9" * digits + b',"task":"' + world.some_task(rng).encode() + b'"}')
    if r == 7:
        return raw_frame(rng.choice([b'{"op":"get","piece":NaN}', b'{"op":"get","piece":Infinity}', b'{"op":"get","piece":-Infinity}', b'{"op":"get","piece":1e999}', b'{"op":"hello","port":1.0e2}']))
    if r == 8:
        return raw_frame(rng.choice([b'{"op":"get","op":"hello","peer":"x","port":1}', b'{"op":"hello","peer":"a","peer":"b","port":1,"port":2}']))
    if r == 9:
        whole = world.unit(conn, rng, False)
        return whole[: rng.randrange(len(whole))] if whole else b""
    if r == 10:
        buf = bytearray(world.unit(conn, rng, False))
        for _ in range(rng.randint(1, 4)):
            if buf:
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if r in (11, 12):
        return world.slice_unit(conn, rng, rng.choice(SLICE_FAULTS))
    if r == 13:
        msg = world.message(conn, rng)
        base = len(json.dumps({**msg, "pad": ""}, separators=(",", ":")).encode())
        pad = MAX_CONTROL - base + rng.choice([0, 0, 1])
        return frame({**msg, "pad": "x" * max(0, pad)})
    if r == 14:
        body = json.dumps(world.message(conn, rng), separators=(",", ":")).encode()
        return raw_frame(rng.choice([b"\xef\xbb\xbf" + body, b" " + body + b" ", body + b"x", body + b"{}", b"\n" + body]))
    if r == 15:
        msg = world.message(conn, rng)
        for _ in range(rng.randint(2, 4)):
            msg = mutate(msg, rng, world.vocab)
        return frame(msg)
    return frame({"op": rng.choice(STRINGS + ["x" * 5000]), **{rng.choice(STRINGS): hostile_value(rng)}})


# -- the in-memory origin ----------------------------------------------------------


class BodyTransport:
    """What a response body protocol sees as its transport."""

    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class _Response:
    """Enough of a treq response for the CDN; the body is delivered at once."""

    def __init__(self, code: int, body: bytes = b"", length: Any = None, headers: dict[bytes, bytes] | None = None) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Whatever"
        self.length = len(body) if length is None else length
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        transport = BodyTransport()
        protocol.makeConnection(transport)
        for i in range(0, len(self._body), 256 * 1024):
            if transport.stopped:
                break
            protocol.dataReceived(self._body[i : i + 256 * 1024])
        protocol.connectionLost(Failure(ResponseDone()))


class FuzzHttp:
    """An origin answering on the next reactor turn: known files, 404s, and one that never answers."""

    ETAG = b'"fuzz-etag"'

    def __init__(self, clock: MemoryReactorClock, files: dict[str, bytes]) -> None:
        self._clock = clock
        self._files = files

    def request(self, method: str, url: str, headers: Any = None, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if url != SILENT_URL:
            self._clock.callLater(0, self._answer, d, url, headers or {})
        return d

    def _answer(self, d: Deferred[Any], url: str, headers: dict[bytes, list[bytes]]) -> None:
        if d.called:
            return
        content = self._files.get(url.split("?", 1)[0])
        if content is None:
            d.callback(_Response(404, b"not found"))
        elif headers.get(b"If-None-Match") == [self.ETAG]:
            d.callback(_Response(304))
        elif url.startswith(CHUNKED_URL):
            d.callback(_Response(200, content, length=UNKNOWN_LENGTH))
        else:
            d.callback(_Response(200, content, headers={b"etag": self.ETAG}))


# -- watching the log and the output ------------------------------------------------


@implementer(ILogObserver)
class LogWatch:
    """A log observer that keeps every logged failure (and critical event).

    Each entry is (exception type, innermost dfly frame, text).
    """

    def __init__(self) -> None:
        self.failures: list[tuple[str, str, str]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            try:
                text = failure.getTraceback()
            except Exception:
                text = repr(failure)
            location = ""
            for fr in reversed(getattr(failure, "frames", None) or []):
                if "/dfly/" in fr[1] and "/devtools/fuzz.py" not in fr[1]:
                    location = f"{os.path.basename(fr[1])}:{fr[0]}:{fr[2]}"
                    break
            kind = getattr(failure.type, "__name__", str(failure.type))
            self.failures.append((kind, location, f"{event.get('log_format')}\n{text}"))
        elif event.get("log_level") is LogLevel.critical:
            self.failures.append(("critical", "", str(event.get("log_format"))))


class OutputChecker:
    """Parses what a session sent: it must be a valid stream of control frames and slices."""

    def __init__(self, keep: bool = False) -> None:
        self.parser = FrameParser(self)
        self.error: str | None = None
        self.keep = keep
        self.messages: list[dict[str, Any]] = []

    def feed(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self.parser.feed(data)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def control_received(self, msg: dict[str, Any]) -> None:
        if self.keep and len(self.messages) < 1000:
            self.messages.append(msg)
        if msg["op"] == "slice":
            self.parser.expect_slice(int(msg["piece_size"]), int(msg["len"]), None)

    def slice_data(self, data: memoryview) -> None:
        pass

    def slice_finished(self) -> None:
        pass


# -- connections and worlds ------------------------------------------------------------


class Conn:
    """One connection: a real FramedProtocol over a StringTransport, around one session."""

    def __init__(self, make_session: Callable[[FramedProtocol], Any], port: int = 40000, keep_output: bool = False) -> None:
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8002), peerAddress=IPv4Address("TCP", "10.9.8.7", port)
        )
        self.errors: list[ProtocolError] = []
        self.checker = OutputChecker(keep_output)
        self.state: dict[str, Any] = {}
        self.lost = False

        def make(wire: FramedProtocol) -> Session:
            session = make_session(wire)
            inner = session.protocol_error

            def recorded(error: ProtocolError) -> None:
                self.errors.append(error)
                inner(error)

            setattr(session, "protocol_error", recorded)  # noqa: B010 - instance override on purpose
            return session

        self.proto = FramedProtocol(make)
        self.proto.makeConnection(self.transport)

    @property
    def session(self) -> Any:
        return self.proto.session

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def feed(self, data: bytes) -> None:
        """Deliver bytes; whatever escapes is a crash."""
        self.proto.dataReceived(data)

    def control(self, msg: dict[str, Any]) -> ProtocolError | None:
        """Hand one decoded message straight to the session; a ProtocolError is returned."""
        try:
            self.session.control_received(msg)
        except ProtocolError as e:
            return e
        return None

    def pump(self, limit: int = 2000) -> None:
        """Let a slice being sent run to its end, and check all output so far."""
        for _ in range(limit):
            producer = self.transport.producer
            if producer is None or self.transport.disconnecting:
                break
            producer.resumeProducing()
        out = self.transport.value()
        if out:
            self.transport.clear()
            self.checker.feed(out)

    def lose(self) -> None:
        """The connection goes away, as a reactor would report it."""
        if self.lost:
            return
        self.lost = True
        self.transport.disconnecting = True
        producer = self.transport.producer
        if producer is not None:
            producer.stopProducing()
        self.proto.connectionLost(Failure(ConnectionDone()))


class World:
    """The long-lived state one kind of session works on, and how to talk to it."""

    kind = ""
    lifetime = 400  # connections before the world is rebuilt

    def __init__(self, root: str, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.clock = MemoryReactorClock()
        self.vocab: list[Any] = []

    # -- connections
    def open(self, rng: random.Random) -> Conn:
        raise NotImplementedError

    def script_length(self, conn: Conn, rng: random.Random) -> int:
        return rng.choice([1, 2, 3, 5, 8, 13, 21, 34, 50])

    def finish(self, conn: Conn) -> list[str]:
        """Tear down what the connection left; return broken invariants."""
        return []

    def after(self) -> None:
        """Between connections."""

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- generation
    def some_task(self, rng: random.Random) -> str:
        return _hex_task(rng)

    def message(self, conn: Conn, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError

    def unit(self, conn: Conn, rng: random.Random, mutated: bool) -> bytes:
        msg = self.message(conn, rng)
        return frame(mutate(msg, rng, self.vocab) if mutated else msg)

    def slice_unit(self, conn: Conn, rng: random.Random, fault: str | None) -> bytes:
        data = rng.randbytes(rng.choice([0, 1, 100, 3000]))
        announce = {"op": "slice", "task": self.some_task(rng), "piece": rng.randrange(4), "len": len(data), "piece_size": P}
        return frame(announce) + (bad_slice(data, rng, fault) if fault else slice_bytes(data))


FILE_CONTENT = random.Random(1).randbytes(3000)
_BIG: list[bytes] = []


def big_content() -> bytes:
    """One full piece and a short one (computed once)."""
    if not _BIG:
        _BIG.append(random.Random(2).randbytes(P - OVERHEAD + 1000))
    return _BIG[0]


class SupernodeWorld(World):
    """A supernode with two cached files, a resident peer holding pieces, and an origin."""

    kind = "supernode"

    def __init__(self, root: str, rng: random.Random) -> None:
        super().__init__(root, rng)
        self.http = FuzzHttp(self.clock, {FILE_URL: FILE_CONTENT, BIG_URL: big_content(), CHUNKED_URL: FILE_CONTENT[:777]})
        self.node = Supernode(self.clock, self.http, os.path.join(root, "home"), piece_size=P, origin_idle_timeout=30.0)
        self.tids = [task_id_for(u) for u in (FILE_URL, BIG_URL, CHUNKED_URL)]
        self.resident: Conn | None = None
        self._resident_up()
        self.clock.advance(0)
        self._resident_serve()
        task = self.node.tasks.get(self.tids[0])
        md5s = [task.file_md5, *task.piece_md5.values()] if task is not None else []
        self.vocab = [*self.tids, *URLS, "resident", "p1", "cdn", 0, 1, 2, *md5s]

    def _resident_up(self) -> None:
        conn = Conn(self.node.make_session, port=4000, keep_output=True)
        conn.feed(frame({"op": "hello", "peer": "resident", "port": 4000}))
        for req, url in enumerate((FILE_URL, BIG_URL), 1):
            conn.feed(frame({"op": "register", "req": req, "url": url}))
        self.resident = conn

    def _resident_serve(self) -> None:
        """The resident peer reports every piece it is assigned as done, so it becomes a source."""
        conn = self.resident
        assert conn is not None
        conn.pump()
        msgs, conn.checker.messages = conn.checker.messages, []
        for msg in msgs:
            if msg.get("op") == "assign" and not conn.closed:
                conn.feed(frame({"op": "done", "task": msg["task"], "piece": msg["piece"], "source": "cdn"}))

    def after(self) -> None:
        conn = self.resident
        if conn is not None and conn.closed:
            conn.lose()
            self._resident_up()
        self._resident_serve()

    def close(self) -> None:
        if self.resident is not None:
            self.resident.lose()
        for task in list(self.node.tasks.values()):
            task.close()
        super().close()

    def open(self, rng: random.Random) -> Conn:
        return Conn(self.node.make_session, port=rng.randrange(1024, 65536))

    def some_task(self, rng: random.Random) -> str:
        return rng.choice(self.tids) if rng.random() < 0.8 else _hex_task(rng)

    def message(self, conn: Conn, rng: random.Random) -> dict[str, Any]:
        if not conn.state.get("hello") and rng.random() < 0.85:
            conn.state["hello"] = True
            peer = rng.choice(["p1", "p2", "resident", f"p{rng.randrange(1000)}", "é☃", "\ud800", "cdn", "x" * 200])
            return {"op": "hello", "peer": peer, "port": rng.choice([0, 4001, 65535]), **({"host": "10.0.0.7"} if rng.random() < 0.3 else {})}
        op = rng.choices(["register", "done", "fail", "leave", "get", "hello", "lost"], [4, 3, 1, 1, 3, 0.3, 0.3])[0]
        task = self.some_task(rng)
        piece = rng.choice([0, 0, 1, 2, 5])
        if op == "register":
            url = rng.choice(URLS + [f"{ORIGIN}/r{rng.randrange(50)}.bin"]) if rng.random() < 0.9 else rng.choice(BAD_URLS)
            msg: dict[str, Any] = {"op": "register", "req": rng.randrange(100), "url": url}
            if rng.random() < 0.5:
                t = self.node.tasks.get(task_id_for(url)) if url in URLS else None
                msg["have"] = rng.choices(["", "0", "0-1", "1", "0,1", "0-9", "0-16777215"], [5, 5, 3, 3, 2, 1, 0.005])[0]
                msg["generation"] = t.generation if t is not None and rng.random() < 0.7 else rng.choice([None, "g"])
            if rng.random() < 0.2:
                msg["headers"] = rng.choice(HEADER_LISTS)
            if rng.random() < 0.1:
                msg["filter"] = ["sig"]
            if rng.random() < 0.1:
                msg["md5"] = rng.choice([hashlib.md5(FILE_CONTENT).hexdigest(), "0" * 32, *ODD_SIGNS])
            if rng.random() < 0.1:
                msg["identifier"] = rng.choice(["v1", "v1", *ODD_SIGNS])
            return msg
        if op in ("done", "fail"):
            msg = {"op": op, "task": task, "piece": piece, "source": rng.choice(["cdn", "resident", "p1", "nobody"])}
            if op == "fail":
                msg["reason"] = "md5 mismatch"
                if rng.random() < 0.5:
                    msg["kind"] = "md5"  # may ask the source to check its copy
            return msg
        if op == "leave":
            return {"op": "leave", "task": task}
        if op == "lost":
            return {"op": "lost", "task": task, "piece": piece}
        if op == "get":
            # piece 0 of big.bin is a whole MiB: ask for it rarely.
            if task == self.tids[1] and piece == 0 and rng.random() < 0.9:
                piece = 1
            return {"op": "get", "task": task, "piece": piece}
        return {"op": "hello", "peer": "p3", "port": 1}


class SliceServerWorld(World):
    """A peer's upload server over a store holding one whole task and half of another."""

    kind = "slice_server"
    lifetime = 2000

    def __init__(self, root: str, rng: random.Random) -> None:
        super().__init__(root, rng)
        self.store = PeerStore(os.path.join(root, "home"))
        self.tids = list(SLICE_TASKS)
        content = big_content()
        for tid, held in ((self.tids[0], (0, 1)), (self.tids[1], (1,))):
            task = self.store.open(tid, P, 0.0)
            for n in held:
                data = content[n * (P - OVERHEAD) : (n + 1) * (P - OVERHEAD)]
                task.write(n, 0, memoryview(data))
                task.mark(n, len(data))
        self.vocab = [*self.tids, 0, 1, 2]

    def close(self) -> None:
        self.store.close()
        super().close()

    def open(self, rng: random.Random) -> Conn:
        conn = Conn(lambda wire: SliceServerSession(wire, self.store.lookup))
        conn.state["pump"] = rng.random() < 0.7  # without pumping, requests pile up to the limit
        return conn

    def some_task(self, rng: random.Random) -> str:
        return rng.choice(self.tids) if rng.random() < 0.8 else _hex_task(rng)

    def message(self, conn: Conn, rng: random.Random) -> dict[str, Any]:
        task = self.some_task(rng)
        piece = rng.choice([1, 1, 1, 2, 3, 0]) if rng.random() < 0.98 else 0
        if piece == 0 and rng.random() < 0.95:
            piece = 1
        return {"op": "get", "task": task, "piece": piece, **({"relay": True} if rng.random() < 0.2 else {})}


@dataclass
class _Spec:
    piece: int
    data: bytes
    md5: str
    calls: int = 0
    error: str | None = None


class FetchWorld(World):
    """A downloader with pending piece requests, talking to whatever answers."""

    kind = "fetch"
    lifetime = 2000

    def __init__(self, root: str, rng: random.Random) -> None:
        super().__init__(root, rng)
        self.store = PeerStore(os.path.join(root, "home"))
        self.tid = FETCH_TASK
        self.task: StoredTask = self.store.open(self.tid, P, 0.0)
        self.pool = SourcePool(self.clock, stall_timeout=5.0, idle_timeout=10.0)
        self.vocab = [self.tid, 0, 1, 2, 3]

    def close(self) -> None:
        self.store.close()
        super().close()

    def open(self, rng: random.Random) -> Conn:
        key = ("10.9.8.7", 15001)
        conn = Conn(lambda wire: FetchSession(wire, self.pool, key))
        specs: list[_Spec] = []
        bad: list[str] = []
        conn.state.update(specs=specs, queue=list(specs), bad=bad)
        for _ in range(rng.choice([0, 1, 1, 2, 3, 5, 8])):
            size = rng.choice([0, 1, rng.randint(2, 300), rng.randint(300, 5000), rng.randint(5000, 70000)])
            data = rng.randbytes(size)
            spec = _Spec(rng.randrange(4), data, piece_md5(data))
            specs.append(spec)

            def result(req: PieceRequest, error: str | None, spec: _Spec = spec) -> None:
                spec.calls += 1
                spec.error = error
                if error is None:
                    got = os.pread(self.task.fd, len(spec.data), self.task.data_offset(spec.piece))
                    if got != spec.data:
                        bad.append(f"piece {spec.piece} accepted but the store holds other bytes")

            conn.session.request(PieceRequest(self.task, spec.piece, len(data), spec.md5, result))
        conn.state["queue"] = list(specs)
        return conn

    def script_length(self, conn: Conn, rng: random.Random) -> int:
        return len(conn.state["specs"]) + rng.choice([0, 0, 1, 2, 5])

    def finish(self, conn: Conn) -> list[str]:
        problems = list(conn.state["bad"])
        for spec in conn.state["specs"]:
            if spec.calls != 1:
                problems.append(f"piece request answered {spec.calls} times (must be once)")
        return problems

    def message(self, conn: Conn, rng: random.Random) -> dict[str, Any]:
        queue: list[_Spec] = conn.state["queue"]
        spec = queue[0] if queue else _Spec(rng.randrange(4), b"", "")
        return {"op": "nack", "task": self.tid, "piece": spec.piece, "reason": "not held"}

    def unit(self, conn: Conn, rng: random.Random, mutated: bool) -> bytes:
        queue: list[_Spec] = conn.state["queue"]
        if not queue or rng.random() < 0.25:
            msg = self.message(conn, rng)
            if queue:
                queue.pop(0)
            return frame(mutate(msg, rng, self.vocab) if mutated else msg)
        if mutated and rng.random() < 0.5:
            return self.slice_unit(conn, rng, rng.choice(SLICE_FAULTS))
        spec = queue.pop(0)
        announce = {"op": "slice", "task": self.tid, "piece": spec.piece, "len": len(spec.data), "piece_size": P}
        if mutated:
            announce = mutate(announce, rng, self.vocab)
        return frame(announce) + slice_bytes(spec.data)

    def slice_unit(self, conn: Conn, rng: random.Random, fault: str | None) -> bytes:
        queue: list[_Spec] = conn.state["queue"]
        spec = queue.pop(0) if queue else _Spec(rng.randrange(4), rng.randbytes(10), "")
        announce = {"op": "slice", "task": self.tid, "piece": spec.piece, "len": len(spec.data), "piece_size": P}
        return frame(announce) + (bad_slice(spec.data, rng, fault) if fault else slice_bytes(spec.data))


class _PeerWorld(World):
    """Shared by the kinds that need a whole PeerNode (a fresh one per connection)."""

    lifetime = 5000

    def __init__(self, root: str, rng: random.Random) -> None:
        super().__init__(root, rng)
        self.home = os.path.join(root, "home")
        self.node: PeerNode | None = None
        self.tids = [task_id_for(u) for u in (FILE_URL, BIG_URL)]
        self.vocab = [*self.tids, *URLS, 1, 2, 0, P, "cdn", hashlib.md5(FILE_CONTENT).hexdigest()]

    def new_node(self) -> PeerNode:
        if self.node is not None:  # left over from a connection that crashed
            self._stop(self.node)
        node = self.node = PeerNode(
            self.clock, self.home, [("127.0.0.1", 8002)], peer_id="fuzz-peer",
            stall_timeout=5.0, link_timeout=3.0, hasher=_sync_hash,
        )
        node.upload_port = 15001
        return node

    @staticmethod
    def _stop(node: PeerNode) -> None:
        try:
            node.stop()
        except Exception:
            node.store.close()

    def close(self) -> None:
        if self.node is not None:
            self._stop(self.node)
            self.node = None
        super().close()

    def watch(self, conn: Conn, d: Deferred[Any]) -> None:
        """Keep the outcome of a download Deferred (and consume its failure)."""
        outcomes: list[Any] = conn.state.setdefault("outcomes", [])
        slot: list[Any] = []
        outcomes.append(slot)

        def got(result: Any) -> None:
            slot.append(result)

        d.addBoth(got)

    def finish(self, conn: Conn) -> list[str]:
        node: PeerNode = conn.state["node"]
        link: Conn | None = conn.state.get("link")
        if link is not None:
            link.lose()
        self.node = None
        node.stop()
        problems = []
        for slot in conn.state.get("outcomes", []):
            if len(slot) != 1:
                problems.append(f"download Deferred fired {len(slot)} times after the node stopped")
        return problems

    def some_task(self, rng: random.Random) -> str:
        return rng.choice(self.tids) if rng.random() < 0.85 else _hex_task(rng)

    def task_info(self, rng: random.Random) -> dict[str, Any]:
        return {
            "task": self.some_task(rng),
            "state": rng.choice(["running", "done", "failed", "waiting", None]),
            "generation": rng.choice(["g1", "g2", None]),
            "length": rng.choice([len(FILE_CONTENT), 0, None, 5]),
            "piece_size": rng.choice([P, P, P, 2 * P, 3, None]),
            "piece_count": rng.choice([1, 2, None]),
            "md5": rng.choice([hashlib.md5(FILE_CONTENT).hexdigest(), None, "0" * 32]),
            "reason": rng.choice([None, "origin answered 404"]),
            "kind": rng.choice([None, "OriginError", "IntegrityError", "StorageError", "Bogus"]),
            "status": rng.choice([None, 404, 500]),
        }


class LinkWorld(_PeerWorld):
    """A PeerNode downloading one or two files, its supernode link being the fuzzed connection."""

    kind = "link"

    def open(self, rng: random.Random) -> Conn:
        node = self.new_node()
        conn = Conn(lambda wire: LinkSession(wire, node.link), port=8002)
        conn.state["node"] = node
        node.link.session = conn.session
        node.link.address = ("127.0.0.1", 8002)
        for url in rng.sample([FILE_URL, BIG_URL], rng.choice([0, 1, 2, 2])):
            self.watch(conn, node.download(DownloadRequest(url)))
        return conn

    def message(self, conn: Conn, rng: random.Random) -> dict[str, Any]:
        op = rng.choices(
            ["welcome", "registered", "refused", "task_info", "task_failed", "assign", "task_reset", "check"],
            [0.5, 3, 0.5, 2, 0.5, 4, 0.5, 0.5],
        )[0]
        if op == "welcome":
            return {"op": "welcome", "version": 1}
        if op in ("registered", "refused"):
            req = rng.choice([1, 2, 1, 2, 3, 0])
            if op == "refused":
                return {"op": "refused", "req": req, "reason": "not an http(s) URL"}
            return {"op": "registered", "req": req, **self.task_info(rng)}
        if op in ("task_info", "task_failed"):
            return {"op": op, **self.task_info(rng)}
        if op == "task_reset":
            return {"op": "task_reset", "task": self.some_task(rng)}
        if op == "check":
            md5 = piece_md5(FILE_CONTENT) if rng.random() < 0.5 else rng.choice(["0" * 32, "x", None])
            return {"op": "check", "task": self.some_task(rng), "piece": rng.choice([0, 0, 1, -1]), "md5": md5}
        host = rng.choice(["10.0.0.5", "peer.fuzz", "::1"]) if rng.random() < 0.9 else rng.choice(["", "\ud800", "a" * 255, "../../etc", "\u2603", "x\x00y"])
        source: Any = "cdn" if rng.random() < 0.5 else {"id": rng.choice(["p9", "cdn", "\ud800"]), "host": host, "port": rng.choice([15001, 1, 65535])}
        data_len = rng.choice([len(FILE_CONTENT), 0, P - OVERHEAD])
        return {
            "op": "assign", "task": self.some_task(rng), "piece": rng.choice([0, 0, 1]), "source": source,
            "md5": piece_md5(FILE_CONTENT), "len": data_len, "piece_size": P,
            **({"relay": True} if rng.random() < 0.2 else {}),
        }


class LocalApiWorld(_PeerWorld):
    """A PeerNode's local API; the node's supernode link is up half of the time."""

    kind = "localapi"

    def open(self, rng: random.Random) -> Conn:
        node = self.new_node()
        conn = Conn(lambda wire: LocalApiSession(wire, node))
        conn.state["node"] = node
        if rng.random() < 0.5:
            link = Conn(lambda wire: LinkSession(wire, node.link), port=8002)
            node.link.session = link.session
            node.link.address = ("127.0.0.1", 8002)
            conn.state["link"] = link
        return conn

    def finish(self, conn: Conn) -> list[str]:
        link: Conn | None = conn.state.get("link")
        problems = []
        if link is not None:
            link.pump()
            if link.checker.error:
                problems.append(f"the node sent its supernode an invalid stream: {link.checker.error}")
        return problems + super().finish(conn)

    def message(self, conn: Conn, rng: random.Random) -> dict[str, Any]:
        url = rng.choice(URLS) if rng.random() < 0.9 else rng.choice(BAD_URLS)
        msg: dict[str, Any] = {"op": "download", "url": url}
        if rng.random() < 0.3:
            msg["headers"] = rng.choice(HEADER_LISTS)
        if rng.random() < 0.2:
            msg["filter"] = ["sig"]
        if rng.random() < 0.2:
            msg["md5"] = rng.choice([hashlib.md5(FILE_CONTENT).hexdigest().upper(), "0" * 32, None, *ODD_SIGNS])
        if rng.random() < 0.2:
            msg["identifier"] = rng.choice(["v1", "v1", *ODD_SIGNS])
        return msg


WORLDS: dict[str, type[World]] = {
    "supernode": SupernodeWorld,
    "slice_server": SliceServerWorld,
    "fetch": FetchWorld,
    "link": LinkWorld,
    "localapi": LocalApiWorld,
}


def make_world(kind: str, root: str, seed: int = 0) -> World:
    """A fresh world of C{kind} under C{root} (which it owns and removes on close)."""
    os.makedirs(root, exist_ok=True)
    return WORLDS[kind](root, random.Random(seed))


# -- running ---------------------------------------------------------------------------


@dataclass
class CrashInfo:
    """One deduplicated crash: how often, and the first examples.

    C{exc_type} and C{location} (C{file:function:line} of the innermost dfly
    frame) are empty for crashes that are not exceptions (broken invariants,
    invalid output, an unclosed connection).
    """

    where: str
    error: str
    exc_type: str = ""
    location: str = ""
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class KindReport:
    kind: str
    connections: int = 0
    frames: int = 0
    bytes: int = 0
    protocol_closes: int = 0
    error_classes: Counter[str] = field(default_factory=Counter)
    crashes: dict[str, CrashInfo] = field(default_factory=dict)
    max_feed: float = 0.0
    seconds: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    traced_peak: int | None = None
    stopped_by_time: bool = False

    @property
    def crash_count(self) -> int:
        return sum(c.count for c in self.crashes.values())


def dfly_frame(exc: BaseException) -> str:
    """The innermost frame of dfly code (outside this fuzzer) in C{exc}'s traceback."""
    for fs in reversed(traceback.extract_tb(exc.__traceback__)):
        if "/dfly/" in fs.filename and "/devtools/fuzz.py" not in fs.filename:
            return f"{os.path.basename(fs.filename)}:{fs.name}:{fs.lineno}"
    return ""


def _describe_frames(units: list[bytes], upto: int) -> str:
    lines = []
    for unit in units[: max(upto, 1)][-8:]:
        text = unit[4:].decode("utf-8", "replace") if len(unit) >= 4 else ""
        if len(unit) >= 4 and _LEN.unpack(unit[:4])[0] == len(unit) - 4 and text.startswith("{"):
            shown = text if len(text) <= 300 else text[:300] + f"... ({len(text)} chars)"
            lines.append(f"    frame {shown}")
        else:
            b64 = base64.b64encode(unit[:200]).decode()
            lines.append(f"    raw   {len(unit)} bytes, base64 {b64}{'...' if len(unit) > 200 else ''}")
    return "\n".join(lines)


class Runner:
    """Drives connections of one kind and records what happens."""

    def __init__(self, kind: str, seed: int, root: str, hang_seconds: float, watch: LogWatch, slow_feed: float = 1.0) -> None:
        self.kind = kind
        self.slow_feed = slow_feed
        self.rng = random.Random(f"{seed}:{kind}")
        self.root = root
        self.hang_seconds = hang_seconds
        self.watch = watch
        self.report = KindReport(kind)
        self.world: World | None = None
        self._world_conns = 0
        self._worlds = 0
        self._alarm = hang_seconds > 0 and threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")

    def crash(
        self,
        where: str,
        exc: BaseException | None,
        detail: str,
        units: list[bytes] | None = None,
        upto: int = 0,
        exc_type: str = "",
        location: str = "",
    ) -> None:
        """Record one crash, grouped by where it happened, the exception type and the dfly frame."""
        if exc is not None:
            tb_text = "".join(traceback.format_exception(exc))
            exc_type, location = type(exc).__name__, dfly_frame(exc)
            error = f"{exc_type}: {exc}"
        else:
            tb_text = detail
            error = detail.strip().splitlines()[-1][:200] if detail.strip() else where
        sig = f"{where}|{exc_type}|{location}" if exc_type else f"{where}|{error[:120]}"
        info = self.report.crashes.get(sig)
        if info is None:
            info = self.report.crashes[sig] = CrashInfo(where, error, exc_type, location)
        info.count += 1
        if len(info.examples) < 2:
            frames = _describe_frames(units, upto) if units else "    (no frames)"
            info.examples.append(f"{tb_text.rstrip()}\n  last frames fed (oldest first):\n{frames}")

    def _new_world(self) -> World:
        self._worlds += 1
        root = os.path.join(self.root, f"{self.kind}-{self._worlds}")
        os.makedirs(root, exist_ok=True)
        self._world_conns = 0
        return WORLDS[self.kind](root, random.Random(self.rng.random()))

    def _drop_world(self) -> None:
        if self.world is not None:
            try:
                self.world.close()
            except Exception as e:
                self.crash("world close", e, "")
            self.world = None

    def _chunks(self, units: list[bytes], rng: random.Random) -> list[bytes]:
        stream = b"".join(units)
        r = rng.random()
        if r < 0.3:
            return [stream]
        if r < 0.55:
            return [u for u in units if u]
        if r < 0.62 and len(stream) <= 400:
            return [stream[i : i + 1] for i in range(len(stream))]
        cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.randint(1, 12)))
        out, prev = [], 0
        for c in [*cuts, len(stream)]:
            out.append(stream[prev:c])
            prev = c
        return out

    @contextmanager
    def _bounded(self) -> Iterator[None]:
        if not self._alarm:
            yield
            return

        def ring(signum: int, frame: Any) -> None:
            raise Hang(f"connection not done within {self.hang_seconds:g} s")

        old = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, self.hang_seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def connection(self) -> None:
        """One connection: open, feed a script in chunks, close, tear down, run timers."""
        if self.world is None:
            self.world = self._new_world()
        world, rng, report = self.world, self.rng, self.report
        report.connections += 1
        self._world_conns += 1
        units: list[bytes] = []
        delivered = 0
        starts: list[int] = []
        where = "open"
        feeding = 0
        broken = False
        try:
            with self._bounded():
                conn = world.open(rng)
                n = world.script_length(conn, rng)
                hostility = rng.choice([0.0, 0.02, 0.1, 0.3, 0.7, 1.0])
                for _ in range(n):
                    if rng.random() < hostility:
                        units.append(hostile_unit(world, conn, rng))
                    else:
                        units.append(world.unit(conn, rng, rng.random() < 0.25))
                pos = 0
                for u in units:
                    starts.append(pos)
                    pos += len(u)
                pump_each = world.kind != "slice_server" or conn.state.get("pump", True)
                for chunk in self._chunks(units, rng):
                    where = "dataReceived"
                    feeding = delivered + len(chunk)
                    t0 = time.perf_counter()
                    conn.feed(chunk)
                    took = time.perf_counter() - t0
                    report.max_feed = max(report.max_feed, took)
                    if took > self.slow_feed:
                        self.crash("slow feed", None, f"one dataReceived took {took:.1f} s (the reactor stalls)", units, bisect.bisect_left(starts, feeding))
                    delivered = feeding
                    if conn.closed:
                        break
                    if rng.random() < 0.05:
                        where = "timers"
                        world.clock.advance(rng.choice([0.0, 0.5, 3.5, 31.0]))
                        if conn.closed:
                            break
                    if pump_each:
                        where = "sending"
                        conn.pump()
                        if conn.closed:
                            break
                if conn.errors:
                    report.protocol_closes += 1
                    report.error_classes[type(conn.errors[0]).__name__] += 1
                    if not conn.closed:
                        self.crash("unclosed", None, f"{conn.errors[0]!r} did not close the connection", units, len(units))
                where = "sending"
                conn.pump()
                where = "connectionLost"
                conn.lose()
                where = "teardown"
                for problem in world.finish(conn):
                    self.crash("invariant", None, problem, units, len(units))
                where = "timers"
                world.clock.advance(rng.choice([0.0, 1.0, 65.0]))
                where = "sending"
                conn.pump()
                if conn.checker.error:
                    self.crash("output", None, f"invalid output: {conn.checker.error}", units, len(units))
                where = "between connections"
                world.after()
        except Hang as e:
            broken = True
            self.crash(f"hang in {where}", e, "", units, bisect.bisect_left(starts, feeding) if where == "dataReceived" else len(units))
        except Exception as e:
            broken = True
            self.crash(where, e, "", units, bisect.bisect_left(starts, feeding) if where == "dataReceived" else len(units))
        total = sum(map(len, units))
        fed = len(units) if delivered >= total else bisect.bisect_left(starts, delivered)
        report.frames += fed
        report.bytes += delivered
        if self.watch.failures:
            failures, self.watch.failures[:] = list(self.watch.failures), []
            for exc_type, location, text in failures:
                self.crash("logged", None, text, units, len(units), exc_type, location)
        if broken or self._world_conns >= world.lifetime:
            self._drop_world()

    def run(self, frames: int, deadline: float) -> KindReport:
        report = self.report
        t0 = time.monotonic()
        report.rss_start = report.rss_peak = rss_bytes()
        traced = _tracemalloc_on()
        if traced:
            import tracemalloc

            tracemalloc.reset_peak()
        try:
            while report.frames < frames:
                if time.monotonic() > deadline:
                    report.stopped_by_time = True
                    break
                self.connection()
                if report.connections % 64 == 0:
                    report.rss_peak = max(report.rss_peak, rss_bytes())
        finally:
            self._drop_world()
        report.rss_peak = max(report.rss_peak, rss_bytes())
        if traced:
            import tracemalloc

            report.traced_peak = tracemalloc.get_traced_memory()[1]
        report.seconds = time.monotonic() - t0
        return report


def _tracemalloc_on() -> bool:
    if "tracemalloc" not in sys.modules:
        return False
    import tracemalloc

    return tracemalloc.is_tracing()


@contextmanager
def _memory_limit(mib: int | None) -> Iterator[None]:
    """Cap the address space so a runaway allocation is a MemoryError, not an OOM kill."""
    if not mib:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/statm") as f:
            vsz = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        vsz = 0
    limit = vsz + mib * MIB
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_kind(
    kind: str,
    frames: int,
    seed: int = 0,
    seconds: float = 300.0,
    root: str | None = None,
    hang_seconds: float = 10.0,
    max_memory_mib: int | None = None,
    slow_feed: float = 1.0,
) -> KindReport:
    """Fuzz one kind of session for C{frames} frames or C{seconds}, whichever ends first."""
    watch = LogWatch()
    globalLogPublisher.addObserver(watch)
    own_root = root is None
    base = tempfile.mkdtemp(prefix="dfly-fuzz-") if root is None else root
    try:
        with _memory_limit(max_memory_mib):
            runner = Runner(kind, seed, base, hang_seconds, watch, slow_feed)
            return runner.run(frames, time.monotonic() + seconds)
    finally:
        globalLogPublisher.removeObserver(watch)
        if own_root:
            shutil.rmtree(base, ignore_errors=True)


def _job(args: tuple[str, int, int, float, float, int | None, bool, float]) -> KindReport:
    kind, frames, seed, seconds, hang, mem, traced, slow = args
    if traced:
        import tracemalloc

        tracemalloc.start()
    return run_kind(kind, frames, seed, seconds, hang_seconds=hang, max_memory_mib=mem, slow_feed=slow)


def fuzz(
    frames: int,
    seconds: float = 300.0,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
    jobs: int = 1,
    hang_seconds: float = 10.0,
    max_memory_mib: int | None = None,
    tracemalloc_on: bool = False,
    progress: Callable[[KindReport], None] | None = None,
    slow_feed: float = 1.0,
) -> list[KindReport]:
    """Fuzz every kind in C{kinds}, C{frames} frames in all, split evenly; one report per kind."""
    share = [frames // len(kinds) + (1 if i < frames % len(kinds) else 0) for i in range(len(kinds))]
    rounds = math.ceil(len(kinds) / max(1, jobs))
    per_kind = seconds / rounds
    args = [
        (k, n, seed, per_kind, hang_seconds, max_memory_mib, tracemalloc_on, slow_feed)
        for k, n in zip(kinds, share, strict=True)
    ]
    reports: dict[str, KindReport] = {}
    if jobs <= 1:
        for a in args:
            reports[a[0]] = _job(a)
            if progress:
                progress(reports[a[0]])
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs, maxtasksperchild=1) as pool:
            for report in pool.imap_unordered(_job, args):
                reports[report.kind] = report
                if progress:
                    progress(report)
    return [reports[k] for k in kinds]


# -- reporting --------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / MIB:.0f}"


def summary(reports: list[KindReport], elapsed: float) -> str:
    head = f"{'kind':<13}{'conns':>8}{'frames':>10}{'MiB fed':>9}{'proto-closed':>14}{'crashes':>9}{'max feed ms':>13}{'RSS start/peak MiB':>20}"
    traced = any(r.traced_peak is not None for r in reports)
    if traced:
        head += f"{'py peak MiB':>13}"
    lines = [head, "-" * len(head)]
    total = KindReport("total")
    for r in reports:
        row = (
            f"{r.kind:<13}{r.connections:>8}{r.frames:>10}{r.bytes / MIB:>9.1f}{r.protocol_closes:>14}"
            f"{r.crash_count:>9}{r.max_feed * 1000:>13.1f}{_mib(r.rss_start) + ' / ' + _mib(r.rss_peak):>20}"
        )
        if traced:
            row += f"{(r.traced_peak or 0) / MIB:>13.1f}"
        if r.stopped_by_time:
            row += "  (time limit)"
        lines.append(row)
        total.connections += r.connections
        total.frames += r.frames
        total.bytes += r.bytes
        total.protocol_closes += r.protocol_closes
        total.max_feed = max(total.max_feed, r.max_feed)
        total.rss_peak = max(total.rss_peak, r.rss_peak)
    crashes = sum(r.crash_count for r in reports)
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<13}{total.connections:>8}{total.frames:>10}{total.bytes / MIB:>9.1f}{total.protocol_closes:>14}"
        f"{crashes:>9}{total.max_feed * 1000:>13.1f}{'peak ' + _mib(total.rss_peak):>20}"
    )
    rate = total.frames / elapsed if elapsed > 0 else 0.0
    lines.append(f"{total.frames} frames in {elapsed:.1f} s wall: {rate:,.0f} frames/s")
    closes: Counter[str] = Counter()
    for r in reports:
        closes.update(r.error_classes)
    if closes:
        lines.append("protocol errors that closed connections: " + ", ".join(f"{k} {v}" for k, v in closes.most_common()))
    return "\n".join(lines)


def crash_details(reports: list[KindReport], limit: int = 5) -> str:
    out = []
    for r in reports:
        for sig, info in sorted(r.crashes.items(), key=lambda kv: -kv[1].count):
            out.append(f"=== {r.kind}: {info.count} x [{sig}] {info.error}")
            for example in info.examples[:1]:
                out.append(example)
    if not out:
        return "no crashes"
    shown = [o for o in out if o.startswith("=== ")]
    text = []
    count = 0
    for o in out:
        if o.startswith("=== "):
            count += 1
            if count > limit:
                break
        text.append(o)
    if len(shown) > limit:
        text.append(f"... and {len(shown) - limit} more crash signatures:")
        text.extend(shown[limit:])
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfly.devtools.fuzz", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames to feed in all (split over the kinds)")
    parser.add_argument("--seconds", type=float, default=300.0, help="wall-clock bound for the whole run")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--hang-seconds", type=float, default=10.0, help="bound on one connection")
    parser.add_argument("--slow-feed", type=float, default=1.0, help="seconds one dataReceived may take")
    parser.add_argument("--max-memory", type=int, default=2048, help="MiB of address space a worker may add (0: no cap)")
    parser.add_argument("--tracemalloc", action="store_true", help="also report the Python heap peak (slower)")
    parser.add_argument("--show", type=int, default=5, help="crash signatures to print in full")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in WORLDS]
    if unknown or not kinds:
        parser.error(f"unknown kinds: {unknown}")
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    # Daemon log lines go nowhere; logged failures are caught by each run's own observer.
    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False, discardBuffer=True)
    print(f"fuzzing {','.join(kinds)}: {args.frames} frames, <= {args.seconds:g} s, seed {seed}, {args.jobs} job(s)", flush=True)
    t0 = time.monotonic()

    def progress(r: KindReport) -> None:
        print(f"  {r.kind}: {r.frames} frames in {r.seconds:.1f} s, {r.crash_count} crashes", flush=True)

    reports = fuzz(
        args.frames, args.seconds, seed, kinds, args.jobs, args.hang_seconds,
        args.max_memory or None, args.tracemalloc, progress, args.slow_feed,
    )
    elapsed = time.monotonic() - t0
    print()
    print(summary(reports, elapsed))
    print()
    print(crash_details(reports, args.show))
    return 1 if any(r.crash_count for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
