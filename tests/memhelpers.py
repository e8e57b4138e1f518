"""Shared in-memory test doubles: no sockets, no global reactor.

* L{StubWire}: what a session sees of its L{FramedProtocol}; records what it sends.
* L{FakeHttp} / L{FakeResponse}: the slice of the treq client API the CDN uses.
* L{FrameCollector}: decodes a captured byte stream of control frames and slices.
* L{fill_task} / L{task_id} / L{body}: stored tasks with known pieces and md5s.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from dfly.devtools.fuzz import BodyTransport
from dfly.peer.store import PeerStore, StoredTask
from dfly.pieces import Layout, wrap
from dfly.wire.framing import FrameParser, decode_control, encode_control
from dfly.wire.protocol import SliceSource


def task_id(name: str) -> str:
    """A valid task id (64 lowercase hex digits) derived from C{name}."""
    return hashlib.sha256(name.encode()).hexdigest()


def body(length: int, seed: int = 0) -> bytes:
    """C{length} deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(length)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class PieceInfo:
    """One piece of a file: where its data lies, and the piece md5 (of the whole slice)."""

    piece: int
    data: bytes
    md5: str

    @property
    def data_len(self) -> int:
        return len(self.data)


def pieces_of(content: bytes, piece_size: int) -> list[PieceInfo]:
    """The pieces of C{content} cut with C{piece_size}, with their piece md5s."""
    layout = Layout(len(content), piece_size)
    out = []
    for n in range(layout.count):
        start = layout.data_start(n)
        data = content[start : start + layout.data_len(n)]
        out.append(PieceInfo(n, data, md5(wrap(data, piece_size))))
    return out


def fill_task(
    store: PeerStore, tid: str, content: bytes, piece_size: int, held: set[int] | None = None
) -> tuple[StoredTask, list[PieceInfo]]:
    """Open C{tid} in C{store} and write + mark every piece of C{content} (or those in C{held})."""
    task = store.open(tid, piece_size, 0.0)
    infos = pieces_of(content, piece_size)
    for info in infos:
        if held is None or info.piece in held:
            task.write(info.piece, 0, memoryview(info.data))
            task.mark(info.piece, info.data_len)
    return task, infos


class StubWire:
    """Stands in for a L{FramedProtocol} under a session: records frames, never touches I/O.

    Every control message goes through the real codec, so an unencodable or
    oversize message fails here as it would on the wire.
    """

    def __init__(self, host: str = "10.0.0.9", port: int = 40000) -> None:
        self.sent: list[dict[str, Any]] = []
        self.slices: list[tuple[dict[str, Any], SliceSource]] = []
        self.closed: str | None = None
        self.peer_host = host
        self.peer_label = f"{host}:{port}"
        self.connected_open = True

    def send_control(self, msg: dict[str, Any]) -> None:
        self.sent.append(decode_control(encode_control(msg)[4:]))

    def send_slice(self, msg: dict[str, Any], source: SliceSource) -> None:
        self.slices.append((decode_control(encode_control(msg)[4:]), source))

    def expect_slice(self, piece_size: int, data_len: int, md5_hex: str | None) -> None:
        raise AssertionError("a StubWire carries no slices")

    def close(self, abort: bool = False) -> None:
        self.closed = "abort" if abort else "close"
        self.connected_open = False

    def ops(self, op: str) -> list[dict[str, Any]]:
        """Messages sent with C{op}, in order."""
        return [m for m in self.sent if m["op"] == op]


# -- HTTP ----------------------------------------------------------------------------


_AUTO: Any = object()


class FakeResponse:
    """A treq/Agent response whose body is delivered synchronously by L{deliverBody}.

    C{length} defaults to the real body length; pass an int to lie, or
    C{twisted.web.iweb.UNKNOWN_LENGTH} for a chunked body.
    """

    def __init__(
        self,
        code: int = 200,
        chunks: list[bytes] | tuple[bytes, ...] = (),
        length: Any = _AUTO,
        phrase: bytes = b"OK",
        reason: Failure | None = None,
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.chunks = list(chunks)
        self.length = sum(map(len, self.chunks)) if length is _AUTO else length
        self.headers = Headers()
        self.reason = reason if reason is not None else Failure(ResponseDone())
        self.transport = BodyTransport()
        self.delivered_to: Any = None
        self.delivered_bytes = 0

    def deliverBody(self, protocol: Any) -> None:
        self.delivered_to = protocol
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            if self.transport.stopped:
                break
            self.delivered_bytes += len(chunk)
            protocol.dataReceived(chunk)
        protocol.connectionLost(self.reason)


@dataclass
class FakeRequest:
    method: str
    url: str
    headers: Any
    kwargs: dict[str, Any]
    deferred: Deferred[Any] = field(default_factory=Deferred)


class FakeHttp:
    """Records C{request} calls; the test fires each one's Deferred with a L{FakeResponse}."""

    def __init__(self) -> None:
        self.requests: list[FakeRequest] = []

    def request(self, method: str, url: str, headers: Any = None, **kwargs: Any) -> Deferred[Any]:
        req = FakeRequest(method, url, headers, kwargs)
        self.requests.append(req)
        return req.deferred

    def respond(self, index: int, response: FakeResponse) -> FakeResponse:
        self.requests[index].deferred.callback(response)
        return response


def chunked(content: bytes, size: int) -> list[bytes]:
    """C{content} cut into chunks of C{size} bytes (the last may be shorter)."""
    return [content[i : i + size] for i in range(0, len(content), size)]


# -- decoding captured wire bytes ---------------------------------------------------


class FrameCollector:
    """Decodes a byte stream of control frames and the slices C{slice} frames announce.

    C{events} holds ("control", msg), ("slice", bytes_of_whole_slice_data) in order.
    """

    def __init__(self) -> None:
        self.parser = FrameParser(self)
        self.events: list[tuple[str, Any]] = []
        self._data = bytearray()

    def feed(self, data: bytes) -> FrameCollector:
        self.parser.feed(data)
        return self

    def control_received(self, msg: dict[str, Any]) -> None:
        self.events.append(("control", msg))
        if msg["op"] == "slice":
            self.parser.expect_slice(msg["piece_size"], msg["len"], None)

    def slice_data(self, data: memoryview) -> None:
        self._data += data

    def slice_finished(self) -> None:
        self.events.append(("slice", bytes(self._data)))
        self._data.clear()

    def kinds(self) -> list[str]:
        """A compact view: the op of each control frame, or 'data' for a slice."""
        return [e[1]["op"] if e[0] == "control" else "data" for e in self.events]
