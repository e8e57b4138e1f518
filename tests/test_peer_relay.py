"""Relaying a piece while it is still arriving (cut-through), in memory.

First the slice producer and the slice server alone, following a
L{GrowingRange} the test writes to, over a C{StringTransport} whose consumer
asks for bytes only when the test says so.

Then three parties, no sockets: upstream sources (slice servers over their own
stores), a relay R (a real L{PeerNode} whose supernode link is a
C{StringTransport} and whose fetch sessions talk to the upstreams through
iosim), and a downloader D (a L{FetchSession} of its own pool, connected
through iosim to R's upload server).  Bytes move only when the test pumps a
connection, time only when it advances the shared L{MemoryReactorClock}.
"""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memhelpers import FrameCollector, PieceInfo, body, fill_task, pieces_of
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim

from dfly.devtools.fuzz import LogWatch
from dfly.peer.fetch import FetchSession, PieceRequest, SourcePool
from dfly.peer.link import LinkSession
from dfly.peer.node import RELAY_GRACE, DownloadRequest, PeerNode, hash_range
from dfly.peer.store import PeerStore, StoredTask
from dfly.pieces import MIB, OVERHEAD, TAIL, SliceHeader
from dfly.wire.framing import encode_control
from dfly.wire.protocol import CHUNK, FileRangeProducer, FramedProtocol, GrowingRange, SliceSource
from dfly.wire.serve import MAX_PENDING, SliceServerSession

P = 1 * MIB
# Two full pieces and a short last one.
CONTENT = body(2 * (P - OVERHEAD) + 54321, seed=11)
INFOS = pieces_of(CONTENT, P)
URL = "http://origin.example/relay.bin"
TID = DownloadRequest(URL).task_id
GOOD = ("good.example", 15001)
OTHER = ("other.example", 15001)
RELAY = ("relay.example", 15002)
STALL = 30.0


# -- the growing producer on its own -------------------------------------------------------


def growing_source(tmp_path: Any, info: PieceInfo) -> tuple[int, GrowingRange, SliceSource, list[tuple[bool, int]]]:
    path = tmp_path / "data"
    path.write_bytes(b"")
    fd = os.open(str(path), os.O_RDWR)
    growing = GrowingRange()
    done: list[tuple[bool, int]] = []
    header = SliceHeader(info.data_len, P).encode()
    source = SliceSource(fd, 0, info.data_len, header, TAIL, on_done=lambda ok, n: done.append((ok, n)), growing=growing)
    return fd, growing, source, done


def test_paused_relay_reader_does_not_buffer_and_resumes(tmp_path: Any) -> None:
    """A relay reader whose consumer stops asking for bytes writes at most one read chunk
    after it caught up, however much more the writer adds (nothing is buffered in memory);
    when the consumer asks again it goes on, chunk by chunk, and sends the tail only once the
    writer has finished."""
    info = INFOS[0]
    fd, growing, source, done = growing_source(tmp_path, info)
    try:
        proto = FramedProtocol(lambda wire: SliceServerSession(wire, lambda t, p, w: (source, P, info.data_len)))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode_control({"op": "get", "task": TID, "piece": 0}))
        producer = transport.producer
        assert producer is not None
        start = len(transport.value())
        producer.resumeProducing()  # the transport asks: nothing there yet, so nothing written
        producer.resumeProducing()  # and asks again (a transport may): still one wait only
        assert len(transport.value()) == start

        tracemalloc.start()
        try:
            for pos in range(0, info.data_len, 64 * 1024):  # the writer adds all the data
                chunk = info.data[pos : pos + 64 * 1024]
                os.pwrite(fd, chunk, pos)
                growing.grew(pos + len(chunk))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # Only the one wake-up wrote, what was there then (the first 64 KiB): the rest waits on
        # disk until the consumer asks, nothing is held in memory by the producer.
        assert len(transport.value()) - start == 64 * 1024
        assert peak < CHUNK + 256 * 1024

        resumes = 0
        while len(transport.value()) - start < info.data_len:
            before = len(transport.value())
            producer.resumeProducing()
            assert len(transport.value()) - before <= CHUNK
            resumes += 1
            assert resumes < 50
        assert transport.producer is producer and done == []  # no tail before the writer finished
        producer.resumeProducing()  # caught up: waits
        growing.finish()
        assert transport.producer is None and done == [(True, 4 + info.data_len + 1)]
        assert transport.value()[start:] == info.data + b"\x7f"
    finally:
        os.close(fd)


def test_relay_reader_waits_for_the_rate_limit_too(tmp_path: Any) -> None:
    """With an upload bucket, a relay reader takes tokens like any other: bytes that arrived
    are sent only as the bucket allows, and the transfer still ends whole."""
    from dfly.ratelimit import TokenBucket

    info = INFOS[2]
    clock = MemoryReactorClock()
    bucket = TokenBucket(clock, rate=64 * 1024, depth=16 * 1024)
    fd, growing, source, done = growing_source(tmp_path, info)
    try:
        proto = FramedProtocol(
            lambda wire: SliceServerSession(wire, lambda t, p, w: (source, P, info.data_len)), upload=bucket
        )
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode_control({"op": "get", "task": TID, "piece": 2}))
        producer = transport.producer
        assert producer is not None
        os.pwrite(fd, info.data, 0)
        growing.grew(info.data_len)
        growing.finish()
        for _ in range(400):
            if transport.producer is None:
                break
            producer.resumeProducing()
            clock.advance(0.05)
        assert done and done[0][0]
        assert FrameCollector().feed(transport.value()).events[-1] == ("slice", info.data)
        assert clock.seconds() >= info.data_len / (64 * 1024) - 1
    finally:
        os.close(fd)


def test_failed_range_stops_a_queued_relay_answer(tmp_path: Any) -> None:
    """A relay answer still queued behind another slice is cut off as soon as its range fails:
    the connection is aborted then, and no byte of it is ever read."""
    info = INFOS[2]
    fd, growing, source, done = growing_source(tmp_path, info)
    try:
        os.pwrite(fd, b"\x00" * info.data_len, 0)
        held = SliceSource(fd, 0, 10, b"H", b"\x7f")
        answers = iter([(held, P, 10), (source, P, info.data_len)])
        proto = FramedProtocol(lambda wire: SliceServerSession(wire, lambda t, p, w: next(answers)))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode_control({"op": "get", "task": TID, "piece": 0}))
        proto.dataReceived(encode_control({"op": "get", "task": TID, "piece": 2}))
        growing.grew(info.data_len)
        growing.fail()
        assert transport.disconnecting and transport.producer is None
        proto.connectionLost()  # what the transport does next
        assert done == [(False, 0)]
        assert FrameCollector().feed(transport.value()).kinds() == ["slice"]  # the first only
    finally:
        os.close(fd)


def test_failed_range_is_never_read_again(tmp_path: Any) -> None:
    """A producer following a range that failed reads nothing more, even if the range's count
    goes on (the writer gave the bytes up), and finishes unsuccessfully at its next turn."""
    info = INFOS[2]
    fd, growing, source, done = growing_source(tmp_path, info)
    try:
        os.pwrite(fd, info.data, 0)
        transport = StringTransport()
        finished: list[bool] = []
        producer = FileRangeProducer(transport, source, finished.append)
        producer.start()
        growing.grew(1000)
        producer.resumeProducing()
        assert transport.value() == source.prefix + info.data[:1000]
        growing.fail()
        growing.grew(info.data_len)
        producer.resumeProducing()
        assert transport.value() == source.prefix + info.data[:1000]
        assert finished == [False] and done == [(False, 4 + 1000)] and transport.producer is None
    finally:
        os.close(fd)


# -- a relay between two peers ------------------------------------------------------------


def sync_hash(path: str, offset: int, length: int, md5: Any) -> Deferred[None]:
    """The node's whole-file hasher, run inline (a memory reactor has no thread pool)."""
    try:
        hash_range(path, offset, length, md5)
    except Exception:
        return fail()
    return succeed(None)


class Pipe:
    """One iosim connection: its two protocols and the pump that moves bytes between them."""

    def __init__(self, clock: MemoryReactorClock, server: FramedProtocol, client: FramedProtocol) -> None:
        self.server = server
        self.client = client
        self.pump = iosim.connect(
            server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), clock=clock
        )

    @property
    def aborted(self) -> bool:
        """The server side closed (or aborted) the connection."""
        transport: Any = self.server.transport
        return bool(transport.disconnecting)

    @property
    def fetch(self) -> FetchSession:
        assert isinstance(self.client.session, FetchSession)
        return self.client.session


class World:
    """The relay R, its upstreams, and a downloader D."""

    def __init__(self, root: Any, stall: float = STALL) -> None:
        self.root = root
        self.clock = MemoryReactorClock()
        self.r = PeerNode(
            self.clock, str(root / "r"), [("127.0.0.1", 8002)], peer_id="relay",
            stall_timeout=stall, min_rate=1.0, hasher=sync_hash,
        )
        self.link_transport = StringTransport()
        self.link = FramedProtocol(lambda wire: LinkSession(wire, self.r.link))
        self.link.makeConnection(self.link_transport)
        assert isinstance(self.link.session, LinkSession)
        self.r.link.session = self.link.session
        self.r.link.address = ("127.0.0.1", 8002)
        self.upstream_stores: list[PeerStore] = []
        self.upstreams: dict[tuple[str, int], Pipe] = {}
        self.d_store = PeerStore(str(root / "d"))
        self.d_task: StoredTask = self.d_store.open(TID, P, 0.0)
        self.d_pool = SourcePool(self.clock, stall_timeout=STALL, min_rate=1.0)
        self.results: list[tuple[int, str | None]] = []
        self.outcome: list[Any] = []
        self.r.download(DownloadRequest(URL)).addBoth(self.outcome.append)

    def close(self) -> None:
        self.r.stop()
        self.d_store.close()
        for store in self.upstream_stores:
            store.close()

    # -- R's supernode
    def control(self, msg: dict[str, Any]) -> None:
        self.link.dataReceived(encode_control(msg))

    def registered(self, length: int | None = len(CONTENT)) -> None:
        """The supernode accepts R's registration (with the task's length, if C{length})."""
        self.control({
            "op": "registered", "req": 1, "task": TID, "state": "running", "generation": "g1",
            "length": length, "piece_size": P, "piece_count": len(INFOS),
            "md5": hashlib.md5(CONTENT).hexdigest(),
        })

    def assign(self, piece: int, key: tuple[str, int], md5: str | None = None) -> None:
        info = INFOS[piece]
        self.control({
            "op": "assign", "task": TID, "piece": piece, "len": info.data_len, "piece_size": P,
            "md5": md5 or info.md5, "source": {"id": key[0], "host": key[0], "port": key[1]},
        })

    def reports(self) -> list[dict[str, Any]]:
        """What R told its supernode about pieces (done / fail), in order."""
        events = FrameCollector().feed(self.link_transport.value()).events
        return [m for kind, m in events if kind == "control" and m["op"] in ("done", "fail")]

    # -- R's sources
    def upstream(self, key: tuple[str, int], content: bytes = CONTENT) -> Pipe:
        """A source at C{key} holding every piece of C{content}, connected to R's pool."""
        store = PeerStore(str(self.root / f"up-{len(self.upstream_stores)}"))
        self.upstream_stores.append(store)
        fill_task(store, TID, content, P)
        server = FramedProtocol(lambda wire: SliceServerSession(wire, store.lookup))
        client = FramedProtocol(lambda wire: FetchSession(wire, self.r.sources, key))
        pipe = Pipe(self.clock, server, client)
        self.r.sources._sessions[key] = pipe.fetch
        self.upstreams[key] = pipe
        return pipe

    @property
    def r_task(self) -> StoredTask:
        task = self.r.store.get(TID)
        assert task is not None
        return task

    def r_attempt(self, piece: int) -> PieceRequest:
        return self.r.downloads[TID].running[piece]

    # -- D
    def downstream(self) -> Pipe:
        """A new connection from D to R's upload server."""
        server = FramedProtocol(self.r.upload_session)
        client = FramedProtocol(lambda wire: FetchSession(wire, self.d_pool, RELAY))
        return Pipe(self.clock, server, client)

    def d_get(self, pipe: Pipe, piece: int, relay: bool = True) -> PieceRequest:
        info = INFOS[piece]
        req = PieceRequest(
            self.d_task, piece, info.data_len, info.md5,
            lambda r, error: self.results.append((r.piece, error)), relay=relay,
        )
        pipe.fetch.request(req)
        return req

    def d_bytes(self, piece: int, length: int | None = None) -> bytes:
        info = INFOS[piece]
        n = info.data_len if length is None else length
        return os.pread(self.d_task.fd, n, self.d_task.data_offset(piece))


@pytest.fixture
def world(tmp_path: Any) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


@pytest.fixture
def log_watch() -> Iterator[LogWatch]:
    watch = LogWatch()
    globalLogPublisher.addObserver(watch)
    yield watch
    globalLogPublisher.removeObserver(watch)


def flush_all(world: World, *pipes: Pipe) -> None:
    """Pump every connection until none moves any byte."""
    for _ in range(2000):
        moved = False
        for pipe in (*world.upstreams.values(), *pipes):
            moved = pipe.pump.pump() or moved
        if not moved:
            return
    raise AssertionError("the connections never went quiet")


# -- streaming ---------------------------------------------------------------------------


def test_relay_streams_a_piece_while_it_arrives(world: World, log_watch: LogWatch) -> None:
    """A relay get for a piece R is receiving slowly is answered at once: D has its first data
    bytes while R is still short of the piece, the slice verifies at D against the md5 of D's
    own assignment, its bytes are the original's, and both sides count the bytes as usual."""
    world.registered()
    up = world.upstream(GOOD)
    world.assign(0, GOOD)
    attempt = world.r_attempt(0)
    while attempt.received == 0:
        assert up.pump.pump()
    down = world.downstream()
    req = world.d_get(down, 0)
    down.pump.flush()
    assert 0 < req.received == attempt.received < INFOS[0].data_len
    assert world.results == [] and 0 not in world.r_task.have

    steps = 0
    while not world.results:
        up.pump.pump()
        down.pump.pump()
        steps += 1
        assert steps < 100
        # D never gets ahead of what R has written.
        assert req.received <= attempt.received
    assert world.results == [(0, None)]
    assert world.d_bytes(0) == INFOS[0].data
    assert 0 in world.r_task.have
    assert world.reports() == [{"op": "done", "task": TID, "piece": 0, "source": GOOD[0]}]
    assert world.r_task.uploaded_bytes == INFOS[0].data_len + OVERHEAD
    assert world.r.downloads[TID].from_peers == INFOS[0].data_len
    assert down.client.connected_open and not down.aborted
    assert log_watch.failures == []


def test_several_readers_follow_one_attempt(world: World) -> None:
    """Two relay gets of the same piece on two connections follow the same attempt; both
    slices verify, and a later relay get of the piece once it is held is served from disk."""
    world.registered()
    up = world.upstream(GOOD)
    world.assign(1, GOOD)
    up.pump.pump()
    first, second = world.downstream(), world.downstream()
    world.d_get(first, 1)
    world.d_get(second, 1)
    flush_all(world, first, second)
    assert world.results == [(1, None), (1, None)]
    assert world.d_bytes(1) == INFOS[1].data
    third = world.downstream()
    world.d_get(third, 1)
    third.pump.flush()
    assert world.results[-1] == (1, None)
    assert world.r_task.uploaded_bytes == 3 * (INFOS[1].data_len + OVERHEAD)


def test_relay_get_before_the_attempt_waits_then_streams(world: World) -> None:
    """A relay get that arrives before R's own assignment gets the slice frame and header at
    once (R knows the task's length, so the piece's size), waits, and streams once R's
    attempt starts within the grace; the slice verifies."""
    world.registered()
    down = world.downstream()
    req = world.d_get(down, 2)
    down.pump.flush()
    assert down.fetch.current is req and req.received == 0
    world.clock.advance(RELAY_GRACE - 0.5)
    down.pump.flush()
    assert world.results == [] and not down.aborted

    world.upstream(GOOD)
    world.assign(2, GOOD)
    assert world.r.downloads[TID].relay_waits == {}
    flush_all(world, down)
    assert world.results == [(2, None)]
    assert world.d_bytes(2) == INFOS[2].data
    assert 2 in world.r_task.have
    world.clock.advance(RELAY_GRACE)  # the grace timer is gone: nothing fires
    flush_all(world, down)
    assert world.results == [(2, None)] and down.client.connected_open


def test_relay_get_without_an_attempt_fails_after_the_grace(world: World, log_watch: LogWatch) -> None:
    """With no attempt of R's own within the grace, the waiting answer is cut off: D's
    connection is aborted and its request fails, not before the grace; R's download carries
    on, forgets the wait, and a later assignment of that piece works as usual."""
    world.registered()
    down = world.downstream()
    world.d_get(down, 0)
    down.pump.flush()
    world.clock.advance(RELAY_GRACE - 0.1)
    down.pump.flush()
    assert world.results == [] and not down.aborted

    world.clock.advance(0.2)
    down.pump.flush()
    assert down.aborted and not down.client.connected_open
    assert len(world.results) == 1
    piece, error = world.results[0]
    assert piece == 0 and error is not None and "lost" in error
    dl = world.r.downloads[TID]
    assert dl.state == "registered" and dl.relay_waits == {}
    assert world.clock.getDelayedCalls() == []  # no timer left behind (no stall, no grace)

    world.upstream(GOOD)
    world.assign(0, GOOD)
    flush_all(world)
    assert 0 in world.r_task.have
    assert log_watch.failures == []


def test_relay_get_without_a_known_length_nacks(world: World) -> None:
    """If R does not know the task's length it cannot know the piece's size: a relay get for
    a piece it has not started is nacked as before, and the connection stays usable."""
    world.registered(length=None)
    down = world.downstream()
    world.d_get(down, 0)
    down.pump.flush()
    assert len(world.results) == 1 and "refused" in str(world.results[0][1])
    assert down.client.connected_open and not down.aborted
    assert world.r.downloads[TID].relay_waits == {}


def test_relay_get_for_a_piece_past_the_end_nacks(world: World) -> None:
    """A relay get for a piece number the task does not have is nacked, with no wait set up."""
    world.registered()
    down = world.downstream()
    req = PieceRequest(world.d_task, len(INFOS), 10, "0" * 32, lambda r, e: world.results.append((r.piece, e)), relay=True)
    down.fetch.request(req)
    down.pump.flush()
    assert len(world.results) == 1 and "refused" in str(world.results[0][1])
    assert world.r.downloads[TID].relay_waits == {}


# -- R's attempt goes wrong ----------------------------------------------------------------


def test_failed_attempt_aborts_the_relay_reader(world: World, log_watch: LogWatch) -> None:
    """R's source sends bytes that fail R's md5 check: the relay reader, which has every data
    byte but is held before the tail, has its connection aborted, and D's request fails.  R
    reports the failure, keeps its download, its held pieces and its other connections."""
    world.registered()
    world.upstream(GOOD)
    world.assign(1, GOOD)
    flush_all(world)
    assert 1 in world.r_task.have
    liar = bytearray(CONTENT)
    liar[100] ^= 0xFF
    world.upstream(OTHER, bytes(liar))
    world.assign(0, OTHER)
    world.upstreams[OTHER].pump.pump()
    down = world.downstream()
    bystander = world.downstream()  # another reader, of a held piece
    req = world.d_get(down, 0)
    flush_all(world, down, bystander)

    assert req.received == INFOS[0].data_len  # all data, and no tail
    assert down.aborted
    assert world.results == [(0, world.results[0][1])]
    assert world.results[0][1] is not None and "lost" in world.results[0][1]
    assert 0 not in world.d_task.have
    fails = [m for m in world.reports() if m["op"] == "fail"]
    assert [m["piece"] for m in fails] == [0] and "md5" in fails[0]["reason"]
    dl = world.r.downloads[TID]
    assert dl.state == "registered" and set(world.r_task.have) == {1} and dl.running == {}
    world.d_get(bystander, 1)
    bystander.pump.flush()
    assert world.results[-1] == (1, None) and not bystander.aborted
    assert world.link.connected_open
    assert log_watch.failures == []


def test_reassigned_attempt_stops_readers_before_the_new_attempt_writes(world: World) -> None:
    """When the supernode gives R's piece to another source, the relay readers of the old
    attempt are stopped (their producer finished, their connection aborted) before the new
    attempt writes its first byte at that piece's offset; D only ever got bytes of the old
    attempt, and its request fails."""
    world.registered()
    world.upstream(GOOD)
    world.assign(0, GOOD)
    world.upstreams[GOOD].pump.pump()
    world.upstreams[GOOD].pump.pump()
    down = world.downstream()
    req = world.d_get(down, 0)
    down.pump.flush()
    assert req.received > 0

    other = bytes(b ^ 0x5A for b in CONTENT)  # whatever the new source sends, D must never see it
    world.upstream(OTHER, other)
    writes: list[tuple[int, bool, bool]] = []
    task = world.r_task
    original = task.write

    def recording(piece: int, pos: int, data: memoryview) -> None:
        if bytes(data[:16]) == other[task.data_offset(piece) + pos :][:16]:
            server: Any = down.server
            writes.append((piece, bool(server.transport.disconnecting), server._producer is None))
        original(piece, pos, data)

    task.write = recording  # type: ignore[method-assign]
    world.assign(0, OTHER)
    assert down.aborted  # at once, not at the next pump
    flush_all(world, down)
    assert writes and all(w == (0, True, True) for w in writes)
    assert len(world.results) == 1 and world.results[0][1] is not None
    assert CONTENT[: req.received] == world.d_bytes(0, req.received)


@pytest.mark.parametrize("how", ["task_reset", "task_failed", "stopped"])
def test_attempt_given_up_with_the_task_cuts_readers(world: World, how: str) -> None:
    """A reset, failed or stopped task cuts every relay reader off at once: readers of the
    running attempt and readers still waiting for an attempt; D's requests fail."""
    world.registered()
    world.upstream(GOOD)
    world.assign(0, GOOD)
    world.upstreams[GOOD].pump.pump()
    world.upstreams[GOOD].pump.pump()
    following, waiting = world.downstream(), world.downstream()
    world.d_get(following, 0)
    world.d_get(waiting, 1)  # not assigned yet: waits in the grace
    following.pump.flush()
    waiting.pump.flush()
    assert not following.aborted and not waiting.aborted
    if how == "stopped":
        world.r.stop()
    else:
        world.control({"op": how, "task": TID, "reason": "gone", "kind": "OriginError"})
    assert following.aborted and waiting.aborted
    flush_all(world, following, waiting)
    assert sorted(p for p, _ in world.results) == [0, 1]
    assert all(e is not None for _, e in world.results)
    assert not [c for c in world.clock.getDelayedCalls() if "relay" in repr(c.func)]  # no grace timer
    dl = world.r.downloads.get(TID)
    assert dl is None or dl.relay_waits == {}


def test_removed_task_cuts_a_reader_of_a_finished_attempt(world: World) -> None:
    """A reader that is still sending a piece whose attempt completed is cut off when the
    task's store goes, before its file is closed."""
    world.registered()
    world.upstream(GOOD)
    world.assign(0, GOOD)
    world.upstreams[GOOD].pump.pump()
    transport = StringTransport()
    proto = FramedProtocol(world.r.upload_session)
    proto.makeConnection(transport)
    proto.dataReceived(encode_control({"op": "get", "task": TID, "piece": 0, "relay": True}))
    flush_all(world)
    assert 0 in world.r_task.have and transport.producer is not None  # nobody read yet
    world.r.store.remove(TID)
    assert transport.disconnecting and transport.producer is None


# -- what stays as it was ------------------------------------------------------------------


def test_plain_get_of_a_piece_in_progress_nacks(world: World) -> None:
    """Without relay, a get for a piece R is receiving is nacked as before, and nothing
    follows R's attempt."""
    world.registered()
    world.upstream(GOOD)
    world.assign(0, GOOD)
    world.upstreams[GOOD].pump.pump()
    down = world.downstream()
    world.d_get(down, 0, relay=False)
    down.pump.flush()
    assert len(world.results) == 1 and "not held" in str(world.results[0][1])
    assert world.r_attempt(0).feed is None
    assert down.client.connected_open


def test_relay_get_of_a_held_piece_is_served_normally(world: World) -> None:
    """A relay get for a piece R already holds is answered from disk like a plain get."""
    world.registered()
    world.upstream(GOOD)
    world.assign(2, GOOD)
    flush_all(world)
    down = world.downstream()
    world.d_get(down, 2)
    down.pump.flush()
    assert world.results == [(2, None)] and world.d_bytes(2) == INFOS[2].data
    assert down.client.connected_open


def test_answers_keep_request_order_behind_a_waiting_relay(world: World) -> None:
    """A relay answer that waits for bytes holds up the answers behind it on its connection,
    which still come in request order (a nack and a held slice after it)."""
    world.registered()
    world.upstream(GOOD)
    world.assign(2, GOOD)
    flush_all(world)
    world.assign(0, GOOD)
    down = world.downstream()
    world.d_get(down, 0)  # relay, R's attempt not started on the wire yet
    world.d_get(down, 1, relay=False)  # not held: a nack
    world.d_get(down, 2, relay=False)  # held
    down.pump.flush()
    assert world.results == []
    flush_all(world, down)
    assert [p for p, _ in world.results] == [0, 1, 2]
    assert world.results[0][1] is None and world.results[2][1] is None
    assert "not held" in str(world.results[1][1])


def test_downloader_asks_for_relay_exactly_when_assigned(tmp_path: Any) -> None:
    """D's get carries "relay": true when its assignment did and is otherwise byte for byte
    the get of before; a relayed piece goes over a connection of its own (the relay may
    cut it), the others share one; a relay field that is not a boolean is a protocol error
    on the link."""
    env = LateMd5Env(tmp_path)
    try:
        for piece, relay in ((0, True), (1, False), (2, False)):
            env.assign(piece, INFOS[piece].md5, relay=relay)
        relayed, shared = env.connections
        assert relayed[1].value() == encode_control({"op": "get", "task": TID, "piece": 0, "relay": True})
        assert shared[1].value() == (
            encode_control({"op": "get", "task": TID, "piece": 1})
            + encode_control({"op": "get", "task": TID, "piece": 2})
        )
        env.link.dataReceived(encode_control({
            "op": "assign", "task": TID, "piece": 0, "len": INFOS[0].data_len, "piece_size": P,
            "md5": INFOS[0].md5, "source": {"id": "r", "host": RELAY[0], "port": RELAY[1]}, "relay": "yes",
        }))
        assert env.link_transport.disconnecting
    finally:
        env.node.stop()


def test_a_cut_relay_takes_nothing_else_with_it(tmp_path: Any) -> None:
    """When a relay cuts the connection of a piece it was relaying (its own attempt failed),
    only that piece fails: the pieces asked of the same peer as a holder, on their shared
    connection, arrive and are reported done.  The relayed connection closes after its one
    answer when all goes well."""
    from dfly.pieces import wrap

    env = LateMd5Env(tmp_path)
    try:
        env.assign(0, INFOS[0].md5, relay=True)
        env.assign(1, INFOS[1].md5, relay=False)
        (relayed, rt), (shared, st) = env.connections
        shared.dataReceived(
            encode_control({"op": "slice", "task": TID, "piece": 1, "len": INFOS[1].data_len, "piece_size": P})
            + wrap(INFOS[1].data, P)
        )
        relayed.dataReceived(
            encode_control({"op": "slice", "task": TID, "piece": 0, "len": INFOS[0].data_len, "piece_size": P})
            + wrap(INFOS[0].data, P)[:1000]
        )
        relayed.connectionLost(Failure(ConnectionError("cut by the relay")))
        assert sorted(r[:2] for r in env.reports()) == [("done", 1), ("fail", 0)]
        env.assign(0, INFOS[0].md5, relay=True)
        again, at = env.connections[-1]
        again.dataReceived(
            encode_control({"op": "slice", "task": TID, "piece": 0, "len": INFOS[0].data_len, "piece_size": P})
            + wrap(INFOS[0].data, P)
        )
        assert ("done", 0, None) in env.reports()
        assert at.disconnecting and not st.disconnecting
    finally:
        env.node.stop()


# -- garbage -----------------------------------------------------------------------------


GARBAGE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([TID, "0" * 64, "F" * 64, "../../etc/passwd", 0, 1, 2, 3, 2**24, 2**24 + 1, -1, 10**30]),
)
RELAY_GETS = st.fixed_dictionaries(
    {"op": st.just("get"), "task": GARBAGE_VALUES, "piece": GARBAGE_VALUES, "relay": GARBAGE_VALUES},
    optional={"len": GARBAGE_VALUES, "piece_size": GARBAGE_VALUES, "x": GARBAGE_VALUES},
)


@pytest.fixture(scope="module")
def busy_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A relay holding piece 2, receiving piece 0 (from a source that never times out here),
    not yet assigned piece 1."""
    w = World(tmp_path_factory.mktemp("busy-relay"), stall=1e9)
    w.registered()
    w.upstream(GOOD)
    w.assign(2, GOOD)
    flush_all(w)
    w.assign(0, GOOD)
    w.upstreams[GOOD].pump.pump()
    yield w
    w.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(msgs=st.lists(RELAY_GETS, min_size=1, max_size=MAX_PENDING + 3))
def test_relay_gets_with_garbage_get_a_nack_or_a_protocol_error(
    busy_relay: World, log_watch: LogWatch, msgs: list[dict[str, Any]]
) -> None:
    """Relay gets with wrong types, huge or negative piece numbers and unknown tasks, against a
    relay that holds, receives and waits for pieces, are answered (nack or slice) or close the
    connection as a protocol error; nothing escapes dataReceived, closing the connection and
    running the grace timers raise nothing, and nothing is logged as a failure."""
    transport = StringTransport()
    proto = FramedProtocol(busy_relay.r.upload_session)
    proto.makeConnection(transport)
    for msg in msgs:
        proto.dataReceived(encode_control(msg))  # must not raise
        if transport.disconnecting:
            break
    collector = FrameCollector()
    collector.parser.feed(transport.value())  # a valid stream (possibly cut inside a slice)
    producer = transport.producer
    proto.connectionLost()
    if producer is not None:
        producer.stopProducing()
    busy_relay.clock.advance(RELAY_GRACE + 1)
    dl = busy_relay.r.downloads[TID]
    assert dl.relay_waits == {} and dl.state == "registered"
    feed = busy_relay.r_attempt(0).feed  # still receiving, and nobody left attached to it
    assert feed is None or (feed._cuts == [] and feed._waiting == [] and not feed.ended)
    assert log_watch.failures == []


def test_results_name_the_attempt_they_report_on(tmp_path: Any) -> None:
    """A done or fail report carries the attempt number of the assign it answers (the
    supernode tells late reports of a withdrawn attempt from current ones by it); an
    assign without one gets a report without one, as before."""
    from dfly.pieces import wrap

    clock = MemoryReactorClock()
    node = PeerNode(clock, str(tmp_path / "d"), [("127.0.0.1", 8002)], peer_id="d", hasher=sync_hash)
    link_transport = StringTransport()
    link = FramedProtocol(lambda wire: LinkSession(wire, node.link))
    link.makeConnection(link_transport)
    assert isinstance(link.session, LinkSession)
    node.link.session = link.session
    node.link.address = ("127.0.0.1", 8002)
    node.download(DownloadRequest(URL)).addErrback(lambda _: None)
    link.dataReceived(encode_control({
        "op": "registered", "req": 1, "task": TID, "state": "running", "length": len(CONTENT),
        "piece_size": P, "piece_count": len(INFOS), "md5": hashlib.md5(CONTENT).hexdigest(),
    }))
    source_transport = StringTransport()
    source = FramedProtocol(lambda wire: FetchSession(wire, node.sources, RELAY))
    source.makeConnection(source_transport)
    assert isinstance(source.session, FetchSession)
    node.sources._sessions[RELAY] = source.session
    sent = FrameCollector()
    try:
        for piece, extra in ((0, {"attempt": 41}), (1, {"attempt": 42}), (2, {})):
            info = INFOS[piece]
            link.dataReceived(encode_control({
                "op": "assign", "task": TID, "piece": piece, "len": info.data_len, "piece_size": P,
                "md5": info.md5, "source": {"id": "r", "host": RELAY[0], "port": RELAY[1]}, **extra,
            }))
        link_transport.clear()
        answer = {"task": TID, "len": INFOS[0].data_len, "piece_size": P}
        source.dataReceived(
            encode_control({"op": "slice", "piece": 0, **answer}) + wrap(INFOS[0].data, P)
            + encode_control({"op": "nack", "task": TID, "piece": 1, "reason": "gone"})
            + encode_control({"op": "slice", "piece": 2, **answer, "len": INFOS[2].data_len}) + wrap(INFOS[2].data, P)
        )
        sent.feed(link_transport.value())
        reports = [m for kind, m in sent.events if kind == "control" and m["op"] in ("done", "fail")]
        assert [(m["op"], m["piece"], m.get("attempt")) for m in reports] == [
            ("done", 0, 41), ("fail", 1, 42), ("done", 2, None),
        ]
    finally:
        node.stop()


class LateMd5Env:
    """A node downloading TID, its supernode link and one source connection, in memory."""

    def __init__(self, tmp_path: Any) -> None:
        self.clock = MemoryReactorClock()
        self.node = PeerNode(self.clock, str(tmp_path / "d"), [("127.0.0.1", 8002)], peer_id="d", hasher=sync_hash)
        self.link_transport = StringTransport()
        self.link = FramedProtocol(lambda wire: LinkSession(wire, self.node.link))
        self.link.makeConnection(self.link_transport)
        assert isinstance(self.link.session, LinkSession)
        self.node.link.session = self.link.session
        self.node.link.address = ("127.0.0.1", 8002)
        self.outcome: list[Any] = []
        self.node.download(DownloadRequest(URL)).addBoth(self.outcome.append)
        self.link.dataReceived(encode_control({
            "op": "registered", "req": 1, "task": TID, "state": "running", "length": len(CONTENT),
            "piece_size": P, "piece_count": len(INFOS), "md5": hashlib.md5(CONTENT).hexdigest(),
        }))
        self.connections: list[tuple[FramedProtocol, StringTransport]] = []
        self.node.sources.connect = self._connect

    def _connect(self, host: str, port: int, factory: Any) -> Deferred[Any]:
        """Each connection the node opens to a source: a protocol over a StringTransport."""
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.connections.append((proto, transport))
        return succeed(proto)

    @property
    def source(self) -> FramedProtocol:
        return self.connections[-1][0]

    def assign(self, piece: int, md5: str | None, relay: bool = True) -> None:
        info = INFOS[piece]
        self.link.dataReceived(encode_control({
            "op": "assign", "task": TID, "piece": piece, "len": info.data_len, "piece_size": P, "md5": md5,
            "source": {"id": "r", "host": RELAY[0], "port": RELAY[1]}, "relay": relay, "attempt": 7,
        }))

    def answer(self, piece: int, data: bytes | None = None) -> None:
        from dfly.pieces import wrap

        info = INFOS[piece]
        self.source.dataReceived(
            encode_control({"op": "slice", "task": TID, "piece": piece, "len": info.data_len, "piece_size": P})
            + wrap(info.data if data is None else data, P)
        )

    def piece_md5(self, piece: int, md5: str) -> None:
        self.link.dataReceived(encode_control({"op": "piece_md5", "task": TID, "piece": piece, "md5": md5}))

    def reports(self) -> list[tuple[str, int, str | None]]:
        sent = FrameCollector()
        sent.feed(self.link_transport.value())
        return [
            (m["op"], m["piece"], m.get("reason"))
            for kind, m in sent.events
            if kind == "control" and m["op"] in ("done", "fail")
        ]


def test_a_piece_assigned_before_its_md5_is_held_only_once_the_md5_matches(tmp_path: Any) -> None:
    """A relay assignment of a piece the supernode was still receiving carries no md5: the
    slice is received and kept aside, unheld and unreported, until the supernode's piece_md5
    arrives; then it is checked and reported done.  Its relay readers wait for that verdict
    before they may send the tail."""
    env = LateMd5Env(tmp_path)
    try:
        env.assign(0, None)
        env.answer(0)
        store = env.node.store.get(TID)
        assert store is not None and 0 not in store.have
        assert env.reports() == []
        source, _, _ = env.node.relay_lookup(TID, 0, "x")
        assert source.growing is not None and not source.growing.ended
        env.piece_md5(0, INFOS[0].md5)
        assert env.reports() == [("done", 0, None)]
        assert 0 in store.have and source.growing.complete
    finally:
        env.node.stop()


def test_a_late_md5_that_arrives_first_is_used_when_the_slice_ends(tmp_path: Any) -> None:
    """The piece_md5 may overtake the slice: the slice is then checked as soon as it ends."""
    env = LateMd5Env(tmp_path)
    try:
        env.assign(0, None)
        env.piece_md5(0, INFOS[0].md5)
        env.answer(0)
        assert env.reports() == [("done", 0, None)]
    finally:
        env.node.stop()


def test_a_late_md5_that_does_not_match_fails_the_piece_and_cuts_its_readers(tmp_path: Any) -> None:
    """A slice whose late md5 does not match is reported failed (against its source), never
    held, and whoever relays it from us is cut off."""
    env = LateMd5Env(tmp_path)
    try:
        env.assign(0, None)
        bad = bytes(b ^ 1 for b in INFOS[0].data[:10]) + INFOS[0].data[10:]
        env.answer(0, bad)
        source, _, _ = env.node.relay_lookup(TID, 0, "x")
        env.piece_md5(0, INFOS[0].md5)
        ((op, piece, reason),) = env.reports()
        assert (op, piece) == ("fail", 0) and reason is not None and "md5" in reason
        store = env.node.store.get(TID)
        assert store is not None and 0 not in store.have
        assert source.growing is not None and source.growing.failed
    finally:
        env.node.stop()


def test_a_missing_md5_outside_a_relay_assignment_is_a_protocol_error(tmp_path: Any) -> None:
    """Only a relay assignment may leave the md5 for later; any other without one closes
    the supernode link as a protocol error."""
    env = LateMd5Env(tmp_path)
    try:
        env.assign(0, None, relay=False)
        assert env.link_transport.disconnecting
    finally:
        env.node.stop()
