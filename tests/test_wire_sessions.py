"""Protocol-logic tests: a slice server and a fetch session talking over iosim.

The server is a L{FramedProtocol} whose session is a L{SliceServerSession} over
a real L{PeerStore}; the client is a L{FramedProtocol} whose session is a
L{FetchSession} of a L{SourcePool}.  Bytes move only when the test pumps them,
time only when it advances a L{MemoryReactorClock}.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from memhelpers import FrameCollector, PieceInfo, body, fill_task, pieces_of, task_id
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.test import iosim

from dfly.errors import ProtocolError
from dfly.peer.fetch import FetchSession, PieceRequest, SourcePool
from dfly.peer.store import PeerStore, StoredTask
from dfly.pieces import MIB, OVERHEAD
from dfly.wire.framing import MAX_CONTROL, encode_control
from dfly.wire.protocol import CHUNK, FramedProtocol, SliceSource
from dfly.wire.serve import SliceServerSession

P = 1 * MIB
TID = task_id("wire-sessions")
# Two full pieces and a short last one.
CONTENT = body(2 * (P - OVERHEAD) + 54321, seed=7)
KEY = ("source.example", 15001)
STALL = 5.0
# Low enough that the per-piece deadline (stall + size / min_rate) stays out of these tests.
MIN_RATE = 1.0


class RecordingServerSession(SliceServerSession):
    """A slice server that also remembers the protocol errors it was told about."""

    def __init__(self, wire: FramedProtocol, lookup: Any) -> None:
        super().__init__(wire, lookup)
        self.errors: list[ProtocolError] = []
        self.lost = False

    def protocol_error(self, error: ProtocolError) -> None:
        self.errors.append(error)

    def connection_lost(self, reason: Any) -> None:
        self.lost = True


class SilentSession(RecordingServerSession):
    """A source that accepts requests and never answers them."""

    def __init__(self, wire: FramedProtocol) -> None:
        super().__init__(wire, None)
        self.requests: list[dict[str, Any]] = []

    def control_received(self, msg: dict[str, Any]) -> None:
        self.requests.append(msg)


@dataclass
class Pair:
    clock: MemoryReactorClock
    pool: SourcePool
    server: FramedProtocol
    client: FramedProtocol
    pump: iosim.IOPump
    server_task: StoredTask
    client_task: StoredTask
    infos: list[PieceInfo]
    results: list[tuple[int, str | None]]

    @property
    def session(self) -> FetchSession:
        assert isinstance(self.client.session, FetchSession)
        return self.client.session

    @property
    def server_session(self) -> RecordingServerSession:
        assert isinstance(self.server.session, RecordingServerSession)
        return self.server.session

    def request(
        self, piece: int, md5: str | None = None, data_len: int | None = None
    ) -> PieceRequest:
        """A request for C{piece} into the client's store, recording its outcome in C{results}."""
        info = self.infos[piece] if piece < len(self.infos) else None
        return PieceRequest(
            self.client_task,
            piece,
            data_len if data_len is not None else (info.data_len if info else 10),
            md5 if md5 is not None else (info.md5 if info else "0" * 32),
            lambda req, error: self.results.append((req.piece, error)),
        )

    def client_bytes(self, piece: int) -> bytes:
        """What the client's data file holds where C{piece}'s data belongs."""
        info = self.infos[piece]
        return os.pread(self.client_task.fd, info.data_len, self.client_task.data_offset(piece))


@pytest.fixture
def stores(tmp_path: Any) -> Iterator[tuple[PeerStore, PeerStore]]:
    server_store = PeerStore(str(tmp_path / "server"))
    client_store = PeerStore(str(tmp_path / "client"))
    yield server_store, client_store
    server_store.close()
    client_store.close()


def make_pair(
    stores: tuple[PeerStore, PeerStore], held: set[int] | None = None, silent: bool = False
) -> Pair:
    server_store, client_store = stores
    server_task, infos = fill_task(server_store, TID, CONTENT, P, held)
    client_task = client_store.open(TID, P, 0.0)
    clock = MemoryReactorClock()
    pool = SourcePool(clock, stall_timeout=STALL, min_rate=MIN_RATE)

    def server_session(wire: FramedProtocol) -> RecordingServerSession:
        if silent:
            return SilentSession(wire)
        return RecordingServerSession(wire, server_store.lookup)

    server = FramedProtocol(server_session)
    client = FramedProtocol(lambda wire: FetchSession(wire, pool, KEY))
    pump = iosim.connect(
        server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), clock=clock
    )
    assert isinstance(client.session, FetchSession)
    pool._sessions[KEY] = client.session
    return Pair(clock, pool, server, client, pump, server_task, client_task, infos, [])


def disconnected(proto: FramedProtocol) -> bool:
    transport: Any = proto.transport
    return bool(transport.disconnecting)


# -- (a) pipelined requests ------------------------------------------------------------


def test_pipelined_requests_arrive_intact(stores: tuple[PeerStore, PeerStore]) -> None:
    """Three requests sent back to back (no answer in between) each get their own slice, in
    order, written at the right offsets of the client's store; the md5 check passes; afterwards
    the idle connection outlives several stall timeouts."""
    pair = make_pair(stores)
    for n in range(3):
        pair.pool.fetch(*KEY, pair.request(n))
    assert len(pair.session.sent) == 3  # all three are outstanding before any answer
    pair.pump.flush()

    assert pair.results == [(0, None), (1, None), (2, None)]
    for info in pair.infos:
        assert pair.client_bytes(info.piece) == info.data
    # Raw bytes of the pieces back to back are the original file.
    assert os.pread(pair.client_task.fd, len(CONTENT) + 1, 0) == CONTENT
    assert not pair.session.sent and pair.session.current is None
    # Nothing outstanding, so no stall can fail anything: the connection stays up.
    pair.clock.advance(STALL * 2)
    pair.pump.flush()
    assert len(pair.results) == 3
    assert pair.client.connected_open and not disconnected(pair.client)
    # The server accounted every byte it sent and has nothing pending.
    assert pair.server_task.uploaded_bytes == len(CONTENT) + 3 * OVERHEAD
    assert pair.server_session._pending == 0


def test_requests_received_counts_bytes(stores: tuple[PeerStore, PeerStore]) -> None:
    """A finished request has received exactly its dataLen bytes (a zero-length last piece
    included: a 0-byte file's only piece arrives with no data at all)."""
    server_store, client_store = stores
    pair = make_pair(stores)
    req = pair.request(2)
    pair.session.request(req)
    pair.pump.flush()
    assert req.finished and req.received == pair.infos[2].data_len

    empty_tid = task_id("empty")
    _, empty_infos = fill_task(server_store, empty_tid, b"", P)
    empty_task = client_store.open(empty_tid, P, 0.0)
    got: list[str | None] = []
    req0 = PieceRequest(empty_task, 0, 0, empty_infos[0].md5, lambda r, e: got.append(e))
    pair.session.request(req0)
    pair.pump.flush()
    assert got == [None] and req0.received == 0


# -- (b) nack ----------------------------------------------------------------------------


def test_nack_fails_request_and_connection_stays_usable(
    stores: tuple[PeerStore, PeerStore],
) -> None:
    """A request for a piece the source does not hold gets a nack: its on_result receives an
    error string naming the refusal, the connection stays open, and a following request on the
    same connection succeeds."""
    pair = make_pair(stores, held={0})
    pair.session.request(pair.request(1))
    pair.pump.flush()
    assert len(pair.results) == 1
    piece, error = pair.results[0]
    assert piece == 1
    assert isinstance(error, str) and "refused" in error and "not held" in error
    assert pair.client.connected_open and not disconnected(pair.client)
    assert not disconnected(pair.server)
    assert pair.pool._sessions.get(KEY) is pair.session

    pair.pool.fetch(*KEY, pair.request(0))
    pair.pump.flush()
    assert pair.results[1] == (0, None)
    assert pair.client_bytes(0) == pair.infos[0].data


def test_nack_between_slices_keeps_order(stores: tuple[PeerStore, PeerStore]) -> None:
    """Pipelined get(0), get(unknown piece), get(2): the nack is matched to the middle
    request and the slices around it to theirs."""
    pair = make_pair(stores, held={0, 2})
    for n in (0, 1, 2):
        pair.session.request(pair.request(n))
    pair.pump.flush()
    assert [p for p, _ in pair.results] == [0, 1, 2]
    assert pair.results[0][1] is None and pair.results[2][1] is None
    assert pair.results[1][1] is not None
    assert pair.client_bytes(2) == pair.infos[2].data


# -- (c) md5 mismatch -------------------------------------------------------------------


def test_wrong_md5_fails_request_and_closes(stores: tuple[PeerStore, PeerStore]) -> None:
    """A slice whose md5 is not the expected one fails the request with a message about md5,
    fails the other outstanding request too, aborts the connection and drops it from the
    pool; the server side finishes sending normally and logs no failure."""
    pair = make_pair(stores)
    failures: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        pair.session.request(pair.request(0, md5="f" * 32))
        pair.session.request(pair.request(1))
        pair.pump.flush()  # would raise if either side's dataReceived raised
    finally:
        globalLogPublisher.removeObserver(observer)

    assert [p for p, _ in pair.results] == [0, 1]
    for _, error in pair.results:
        assert error is not None and "md5" in error
    assert not pair.client.connected_open
    assert KEY not in pair.pool._sessions
    assert pair.server_session.errors == []  # the server saw no protocol error
    assert pair.server_session.lost
    assert pair.server_session._pending == 0
    assert failures == []
    assert 0 not in pair.client_task.have


def test_wrong_length_is_protocol_error(stores: tuple[PeerStore, PeerStore]) -> None:
    """A slice whose dataLen differs from what the request expected closes the connection and
    fails the request with the parser's reason."""
    pair = make_pair(stores)
    pair.session.request(pair.request(0, data_len=pair.infos[0].data_len - 1))
    pair.pump.flush()
    assert len(pair.results) == 1
    error = pair.results[0][1]
    assert error is not None and "dataLen" in error
    assert not pair.client.connected_open


# -- (d) stale requests -------------------------------------------------------------------


def test_stale_request_bytes_not_written(stores: tuple[PeerStore, PeerStore]) -> None:
    """Marking an outstanding request stale means its slice is still read off the connection
    (so the stream stays in step) but nothing is written to the store and on_result is never
    called; the next request on the connection is unaffected."""
    pair = make_pair(stores)
    stale = pair.request(0)
    pair.session.request(stale)
    pair.session.request(pair.request(1))
    stale.stale = True
    pair.pump.flush()

    assert pair.results == [(1, None)]
    assert stale.finished and stale.received == pair.infos[0].data_len
    assert pair.client_bytes(0) == bytes(pair.infos[0].data_len)  # a hole: zeros only
    assert pair.client_bytes(1) == pair.infos[1].data
    assert pair.client.connected_open


def test_held_piece_never_rewritten(stores: tuple[PeerStore, PeerStore]) -> None:
    """Once a piece is marked held, a later fetch of it does not write over it."""
    pair = make_pair(stores)
    pair.client_task.write(0, 0, memoryview(b"\x01" * 10))
    pair.client_task.mark(0, pair.infos[0].data_len)
    pair.session.request(pair.request(0))
    pair.pump.flush()
    assert pair.results == [(0, None)]
    # The file still holds just the 10 bytes written before: the slice's data was dropped.
    assert os.fstat(pair.client_task.fd).st_size == 10
    assert os.pread(pair.client_task.fd, 100, 0) == b"\x01" * 10


# -- (e) garbage to a server ---------------------------------------------------------------


def _frame(raw: bytes) -> bytes:
    return len(raw).to_bytes(4, "big") + raw


GARBAGE = {
    "oversize-length": (MAX_CONTROL + 1).to_bytes(4, "big") + b"{}",
    "huge-length": b"\xff\xff\xff\xff",
    "zero-length": b"\x00\x00\x00\x00",
    "not-json": _frame(b"hello there"),
    "not-utf8": _frame(b"\xff\xfe\xfd"),
    "json-array": _frame(b'["get"]'),
    "op-not-string": _frame(b'{"op": 5}'),
    "unknown-op": encode_control({"op": "frobnicate"}),
    "get-bad-task": encode_control({"op": "get", "task": "../../etc/passwd", "piece": 0}),
    "get-negative-piece": encode_control({"op": "get", "task": TID, "piece": -1}),
}


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_closes_server_connection(
    stores: tuple[PeerStore, PeerStore], garbage: bytes
) -> None:
    """Bytes that break the protocol abort the connection: dataReceived returns normally, the
    session is told the reason, nothing is written back, and later bytes are ignored."""
    server_store, _ = stores
    fill_task(server_store, TID, CONTENT, P)
    proto = FramedProtocol(lambda wire: RecordingServerSession(wire, server_store.lookup))
    transport = StringTransport()
    proto.makeConnection(transport)

    proto.dataReceived(garbage)  # must not raise

    assert transport.disconnecting and transport.disconnected  # aborted, not a polite close
    assert not proto.connected_open
    session = proto.session
    assert isinstance(session, RecordingServerSession)
    assert len(session.errors) == 1 and isinstance(session.errors[0], ProtocolError)
    assert transport.value() == b""
    # A valid request after the violation is ignored: the parser is dead.
    proto.dataReceived(encode_control({"op": "get", "task": TID, "piece": 0}))
    assert transport.value() == b"" and transport.producer is None
    assert len(session.errors) == 1


def test_garbage_split_across_reads(stores: tuple[PeerStore, PeerStore]) -> None:
    """A valid get followed by garbage in the same read: the request before the garbage is
    answered (its nack is on the wire), then the garbage aborts the connection."""
    server_store, _ = stores
    fill_task(server_store, TID, CONTENT, P)
    proto = FramedProtocol(lambda wire: RecordingServerSession(wire, server_store.lookup))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(
        encode_control({"op": "get", "task": TID, "piece": 99}) + b"\x00\x00\x00\x00"
    )
    assert transport.disconnected
    frames = FrameCollector().feed(transport.value())
    assert frames.kinds() == ["nack"]


# -- (f) stall timer ------------------------------------------------------------------------


def test_stall_timer_fails_unanswered_request(stores: tuple[PeerStore, PeerStore]) -> None:
    """A request the source never answers fails once stall_timeout passes with no bytes: not
    before; the failure says the source sent nothing, and the connection is aborted."""
    pair = make_pair(stores, silent=True)
    pair.session.request(pair.request(0))
    pair.session.request(pair.request(1))
    pair.pump.flush()
    server_session = pair.server.session
    assert isinstance(server_session, SilentSession)
    assert [m["piece"] for m in server_session.requests] == [0, 1]

    pair.clock.advance(STALL - 0.01)
    pair.pump.flush()
    assert pair.results == [] and pair.client.connected_open

    pair.clock.advance(0.02)
    pair.pump.flush()
    assert [p for p, _ in pair.results] == [0, 1]
    for _, error in pair.results:
        assert error is not None and "sent nothing" in error
    assert not pair.client.connected_open
    assert KEY not in pair.pool._sessions
    assert pair.clock.getDelayedCalls() == []


def test_stall_timer_restarts_on_progress(stores: tuple[PeerStore, PeerStore]) -> None:
    """Each answer re-arms the stall timer: a source that answers one request, then goes
    quiet, is given a full stall_timeout from its last answer, not from the first request."""
    pair = make_pair(stores)
    pair.session.request(pair.request(0))
    pair.clock.advance(STALL - 1)
    pair.pump.flush()  # the answer arrives 1 s before the deadline
    assert pair.results == [(0, None)]
    # A new request, never delivered (not pumped): it must get its own full timeout.
    pair.session.request(pair.request(1))
    pair.clock.advance(STALL - 0.5)
    assert len(pair.results) == 1 and pair.client.connected_open
    pair.clock.advance(1)
    assert pair.session.error is not None and "sent nothing" in pair.session.error


def test_slow_slice_data_keeps_request_alive(stores: tuple[PeerStore, PeerStore]) -> None:
    """A slice whose chunks arrive slowly, each within stall_timeout of the previous one but
    the whole slice taking longer than stall_timeout, completes: every chunk re-arms the timer."""
    pair = make_pair(stores)
    pair.session.request(pair.request(0))
    steps = 0
    while not pair.results:
        assert pair.pump.pump(), "the transfer stopped moving"
        pair.clock.advance(STALL * 0.6)
        steps += 1
        assert steps < 50
    assert pair.clock.seconds() > STALL * 1.5  # longer than one timeout overall
    assert pair.results == [(0, None)]
    assert pair.client_bytes(0) == pair.infos[0].data
    assert pair.client.connected_open


class NackFirstSession(SilentSession):
    """A source that refuses the first request and then goes quiet."""

    def control_received(self, msg: dict[str, Any]) -> None:
        super().control_received(msg)
        if len(self.requests) == 1:
            self.wire.send_control(
                {"op": "nack", "task": msg["task"], "piece": msg["piece"], "reason": "no"}
            )


def test_nack_rearms_stall_timer(stores: tuple[PeerStore, PeerStore]) -> None:
    """A nack is progress too: the requests still outstanding behind it get a full
    stall_timeout from the nack, not from when they were sent."""
    server_store, client_store = stores
    clock = MemoryReactorClock()
    pool = SourcePool(clock, stall_timeout=STALL, min_rate=MIN_RATE)
    client_task = client_store.open(TID, P, 0.0)
    server = FramedProtocol(NackFirstSession)
    client = FramedProtocol(lambda wire: FetchSession(wire, pool, KEY))
    pump = iosim.connect(
        server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), clock=clock
    )
    session = client.session
    assert isinstance(session, FetchSession)
    results: list[tuple[int, str | None]] = []
    for n in (0, 1):
        session.request(
            PieceRequest(client_task, n, 10, "0" * 32, lambda r, e: results.append((r.piece, e)))
        )
    clock.advance(STALL - 1)
    pump.flush()  # the nack for piece 0 arrives 1 s before the first deadline
    assert [p for p, _ in results] == [0]
    clock.advance(STALL - 0.5)
    pump.flush()
    assert [p for p, _ in results] == [0] and client.connected_open
    clock.advance(1)
    pump.flush()
    assert [p for p, _ in results] == [0, 1]
    assert results[1][1] is not None and "sent nothing" in results[1][1]


# -- (g) outbound ordering, StringTransport --------------------------------------------------


def test_control_frames_wait_behind_streaming_slice(stores: tuple[PeerStore, PeerStore]) -> None:
    """While a slice streams from disk (a pull producer, one chunk per resumeProducing), a
    nack and a second slice requested after it go out only after its tail, in request order;
    no resume writes more than one read chunk."""
    server_store, _ = stores
    fill_task(server_store, TID, CONTENT, P, held={0, 1})
    infos = pieces_of(CONTENT, P)
    proto = FramedProtocol(lambda wire: RecordingServerSession(wire, server_store.lookup))
    transport = StringTransport()
    proto.makeConnection(transport)

    proto.dataReceived(encode_control({"op": "get", "task": TID, "piece": 0}))
    assert transport.producer is not None and not transport.streaming
    proto.dataReceived(encode_control({"op": "get", "task": TID, "piece": 2}))  # not held: nack
    proto.dataReceived(encode_control({"op": "get", "task": TID, "piece": 1}))
    # So far only the first slice frame and its 4-byte header are written.
    assert b"nack" not in transport.value()
    assert FrameCollector().feed(transport.value()).kinds() == ["slice"]

    resumes = 0
    while transport.producer is not None:
        before = len(transport.value())
        transport.producer.resumeProducing()
        resumes += 1
        assert resumes < 100
        written = len(transport.value()) - before
        # One chunk, plus on the last resume the tail and the next unit's frame and header.
        assert written <= CHUNK + 1 + 512

    frames = FrameCollector().feed(transport.value())
    assert frames.kinds() == ["slice", "data", "nack", "slice", "data"]
    assert frames.events[1][1] == infos[0].data
    assert frames.events[2][1]["piece"] == 2
    assert frames.events[4][1] == infos[1].data
    assert resumes >= 2 * (len(infos[0].data) // CHUNK)


def test_queued_slices_released_when_connection_lost(tmp_path: Any) -> None:
    """Slices still queued when the connection goes away get on_done(False, 0), and one queued
    after the loss too: nothing waits forever for a dead connection."""
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100)
    fd = os.open(str(path), os.O_RDONLY)
    try:
        outcomes: list[tuple[str, bool, int]] = []

        def source(name: str) -> SliceSource:
            return SliceSource(
                fd, 0, 100, on_done=lambda ok, sent: outcomes.append((name, ok, sent))
            )

        proto = FramedProtocol(lambda wire: RecordingServerSession(wire, None))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.send_slice({"op": "slice"}, source("first"))
        proto.send_slice({"op": "slice"}, source("second"))
        producer = transport.producer
        assert producer is not None
        proto.connectionLost()
        producer.stopProducing()  # what a real transport does with its producer
        proto.send_slice({"op": "slice"}, source("late"))
        assert sorted(outcomes) == [("first", False, 0), ("late", False, 0), ("second", False, 0)]
    finally:
        os.close(fd)


def test_trickling_source_is_given_up_at_the_piece_deadline(stores: tuple[PeerStore, PeerStore]) -> None:
    """A source that keeps the stall timer alive (bytes now and then) but is too slow is
    given up once the oldest piece misses stall_timeout + size / min_rate."""
    pair = make_pair(stores, silent=True)
    pair.pool.min_rate = 1024 * 1024  # the ~1 MiB piece gets about STALL + 1 s
    pair.session.request(pair.request(0))
    for _ in range(3):
        pair.clock.advance(STALL * 0.5)
        pair.session._arm()  # as if a few bytes had arrived: the stall timer starts over
        pair.pump.flush()
    assert pair.results, "the piece was never given up"
    error = pair.results[0][1]
    assert error is not None and "too slow" in error
    assert disconnected(pair.client)
