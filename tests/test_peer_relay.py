"""Relaying a piece while it is still arriving (cut-through), in memory.

The slice producer and the slice server alone, following a L{GrowingRange}
the test writes to, over a C{StringTransport} whose consumer asks for bytes
only when the test says so.
"""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from typing import Any

from memhelpers import FrameCollector, PieceInfo, body, pieces_of
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport

from dfly.peer.fetch import FetchSession
from dfly.peer.link import LinkSession
from dfly.peer.node import DownloadRequest, PeerNode, hash_range
from dfly.pieces import MIB, OVERHEAD, TAIL, SliceHeader
from dfly.wire.framing import encode_control
from dfly.wire.protocol import CHUNK, FileRangeProducer, FramedProtocol, GrowingRange, SliceSource
from dfly.wire.serve import SliceServerSession

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


# -- the downloader -------------------------------------------------------------------


def sync_hash(path: str, offset: int, length: int, md5: Any) -> Deferred[None]:
    """The node's whole-file hasher, run inline (a memory reactor has no thread pool)."""
    try:
        hash_range(path, offset, length, md5)
    except Exception:
        return fail()
    return succeed(None)


def test_downloader_asks_for_relay_exactly_when_assigned(tmp_path: Any) -> None:
    """D's get carries "relay": true when its assignment did and is otherwise byte for byte
    the get of before; a relay field that is not a boolean is a protocol error on the link."""
    clock = MemoryReactorClock()
    node = PeerNode(clock, str(tmp_path / "d"), [("127.0.0.1", 8002)], peer_id="d", hasher=sync_hash)
    link_transport = StringTransport()
    link = FramedProtocol(lambda wire: LinkSession(wire, node.link))
    link.makeConnection(link_transport)
    assert isinstance(link.session, LinkSession)
    node.link.session = link.session
    node.link.address = ("127.0.0.1", 8002)
    outcome: list[Any] = []
    node.download(DownloadRequest(URL)).addBoth(outcome.append)
    link.dataReceived(encode_control({
        "op": "registered", "req": 1, "task": TID, "state": "running", "length": len(CONTENT),
        "piece_size": P, "piece_count": len(INFOS), "md5": hashlib.md5(CONTENT).hexdigest(),
    }))
    source_transport = StringTransport()
    source = FramedProtocol(lambda wire: FetchSession(wire, node.sources, RELAY))
    source.makeConnection(source_transport)
    assert isinstance(source.session, FetchSession)
    node.sources._sessions[RELAY] = source.session
    try:
        for piece, extra in ((0, {"relay": True}), (1, {}), (2, {"relay": False})):
            info = INFOS[piece]
            link.dataReceived(encode_control({
                "op": "assign", "task": TID, "piece": piece, "len": info.data_len, "piece_size": P,
                "md5": info.md5, "source": {"id": "r", "host": RELAY[0], "port": RELAY[1]}, **extra,
            }))
        assert source_transport.value() == (
            encode_control({"op": "get", "task": TID, "piece": 0, "relay": True})
            + encode_control({"op": "get", "task": TID, "piece": 1})
            + encode_control({"op": "get", "task": TID, "piece": 2})
        )
        link.dataReceived(encode_control({
            "op": "assign", "task": TID, "piece": 0, "len": INFOS[0].data_len, "piece_size": P,
            "md5": INFOS[0].md5, "source": {"id": "r", "host": RELAY[0], "port": RELAY[1]}, "relay": "yes",
        }))
        assert link_transport.disconnecting
    finally:
        node.stop()
    assert len(outcome) == 1


