"""The supernode's core (dfly.supernode.service) with a fake origin and fake peers.

The HTTP client is a L{FakeHttp}; each origin request's Deferred is fired by the
test with a L{FakeResponse} that delivers its body synchronously.  Peers are
L{SupernodeSession}s over L{StubWire}s (and, where the bytes matter, over a real
L{FramedProtocol} on a L{StringTransport}).  Time is a L{MemoryReactorClock}.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from memhelpers import (
    FakeHttp,
    FakeRequest,
    FakeResponse,
    FrameCollector,
    StubWire,
    body,
    chunked,
    md5,
    pieces_of,
)
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from dfly.errors import BadControlMessage, PieceUnavailable, StorageError
from dfly.pieces import MIB, OVERHEAD, TAIL, SliceHeader, wrap
from dfly.supernode.scheduler import CDN, Scheduler
from dfly.supernode.service import PROTOCOL_VERSION, Supernode, SupernodeSession
from dfly.urls import digest_task_id, task_id_for
from dfly.wire.framing import encode_control
from dfly.wire.protocol import FramedProtocol

P = 1 * MIB
URL = "http://origin.example/files/blob.bin"
# Two full pieces and a short third one.
CONTENT = body(2 * (P - OVERHEAD) + 12345, seed=3)


@dataclass
class Env:
    clock: MemoryReactorClock
    http: FakeHttp
    node: Supernode
    home: str


def _close_tasks(node: Supernode) -> None:
    for task in list(node.tasks.values()):
        task.close()


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    clock = MemoryReactorClock()
    http = FakeHttp()
    home = str(tmp_path / "home")
    # Limits with room for several pieces per peer at once, so that one event shows many
    # assignments (the defaults allow one download and one upload per peer); store and
    # forward, so that each assignment's source holds the piece (relays: their own test).
    scheduler = Scheduler(down_limit=4, up_limit=5, relay=False)
    node = Supernode(clock, http, home, scheduler=scheduler, piece_size=P)
    yield Env(clock, http, node, home)
    _close_tasks(node)


def connect(
    node: Supernode, peer_id: str, port: int = 4000, host: str | None = None, addr: str | None = None
) -> tuple[SupernodeSession, StubWire]:
    """A peer session that has said hello (from C{addr}, by default an address of its own)."""
    wire = StubWire(host=addr or f"10.0.0.{len(node.sessions) + 1}")
    session = SupernodeSession(wire, node)  # type: ignore[arg-type]
    session.connection_made()
    hello: dict[str, Any] = {"op": "hello", "peer": peer_id, "port": port}
    if host is not None:
        hello["host"] = host
    session.control_received(hello)
    assert wire.ops("welcome") == [{"op": "welcome", "version": PROTOCOL_VERSION}]
    return session, wire


def register(session: SupernodeSession, url: str = URL, req: int = 1, **extra: Any) -> None:
    session.control_received({"op": "register", "req": req, "url": url, **extra})


def cache_bytes(env: Env, tid: str) -> bytes:
    with open(env.node.cdn.cache_path(tid), "rb") as f:
        return f.read()


def check_cache(env: Env, tid: str, content: bytes, piece_size: int = P) -> list[str]:
    """The cache file holds every slice of C{content} at n*P; returns the piece md5s in order."""
    raw = cache_bytes(env, tid)
    infos = pieces_of(content, piece_size)
    last = infos[-1]
    assert len(raw) == (len(infos) - 1) * piece_size + last.data_len + OVERHEAD
    out = []
    for info in infos:
        base = info.piece * piece_size
        header = SliceHeader.decode(raw[base : base + 4])
        assert header == SliceHeader(info.data_len, piece_size)
        assert raw[base + 4 : base + 4 + info.data_len] == info.data
        assert raw[base + 4 + info.data_len : base + 5 + info.data_len] == TAIL
        whole = raw[base : base + info.data_len + OVERHEAD]
        assert whole == wrap(info.data, piece_size)
        out.append(hashlib.md5(whole).hexdigest())
    return out


# -- registration and the origin fetch ----------------------------------------------------


def test_relay_assignments_name_their_attempt_and_late_reports_are_ignored(tmp_path: Any) -> None:
    """With relays on, a piece goes out while it still arrives from the origin: the CDN
    streams it to one peer and the other is sent to that peer, both assigns say relay: true
    and carry no md5, and each peer is sent the piece's md5 (piece_md5) once it is whole.
    Every assign carries an attempt number, and a failure report naming another attempt
    changes nothing (no error counted, nothing withdrawn)."""
    clock, http = MemoryReactorClock(), FakeHttp()
    node = Supernode(clock, http, str(tmp_path / "home"), scheduler=Scheduler(), piece_size=P)
    try:
        s1, w1 = connect(node, "p1", port=5001, host="192.0.2.1")
        s2, w2 = connect(node, "p2", port=5002, host="192.0.2.2")
        register(s1)
        register(s2)
        tid = task_id_for(URL)
        http.respond(0, FakeResponse(200, chunked(CONTENT[: P - 5], 100_000)))  # piece 0 only
        first, second = (w1, w2) if w1.ops("assign")[0]["source"] == CDN else (w2, w1)
        (a1,) = first.ops("assign")
        (a2,) = second.ops("assign")
        assert a1["source"] == CDN and a1["relay"] is True and a1["md5"] is None
        assert a2["relay"] is True and a2["md5"] is None and a2["source"]["port"] in (5001, 5002)
        assert a1["len"] == a2["len"] == P - 5
        md5 = node.tasks[tid].piece_md5[0]
        for wire in (first, second):
            assert wire.ops("piece_md5") == [{"op": "piece_md5", "task": tid, "piece": 0, "md5": md5}]
        assert isinstance(a1["attempt"], int) and a2["attempt"] != a1["attempt"]
        session2 = s2 if second is w2 else s1
        source_id = a2["source"]["id"]
        late = {"op": "fail", "task": tid, "piece": 0, "source": source_id, "reason": "x"}
        session2.control_received({**late, "attempt": a2["attempt"] + 1000})
        member = node.scheduler.tasks[tid].members[session2.peer_id or ""]
        assert member.running == {0: source_id}
        assert node.scheduler.peers[source_id].service_errors == 0
    finally:
        _close_tasks(node)


def test_two_peers_one_task_one_origin_request(env: Env) -> None:
    """Two peers registering the same URL share one task and cause one origin GET, which
    carries the client's headers minus hop headers and asks for an unbuffered body; each
    registration is answered with its own req and the task id."""
    s1, w1 = connect(env.node, "p1")
    s2, w2 = connect(env.node, "p2")
    register(s1, req=7, headers=["X-Token: abc", "Range: bytes=0-9"])
    register(s2, req=9, headers=["X-Token: abc"])

    assert len(env.http.requests) == 1
    assert len(env.node.tasks) == 1
    tid = task_id_for(URL)
    assert list(env.node.tasks) == [tid]
    req = env.http.requests[0]
    assert (req.method, req.url) == ("GET", URL)
    assert req.headers == {b"X-Token": [b"abc"]}
    assert req.kwargs.get("unbuffered") is True
    (r1,) = w1.ops("registered")
    (r2,) = w2.ops("registered")
    assert (r1["req"], r1["task"], r1["state"]) == (7, tid, "running")
    assert (r2["req"], r2["task"]) == (9, tid)
    assert set(env.node.scheduler.tasks[tid].members) == {"p1", "p2"}
    assert w1.ops("assign") == [] and w2.ops("assign") == []  # nothing cached yet


def test_pieces_become_assignments_and_task_info(env: Env) -> None:
    """As the origin body arrives, each cached piece is pushed as an 'assign' whose md5, len
    and piece_size match the slice in the cache; once the body ends every member gets a
    task_info with length, piece_count and the file md5; a peer that reports a piece done
    becomes the source of that piece for the other peer (host and port from its hello)."""
    s1, w1 = connect(env.node, "p1", port=5001, host="192.0.2.1")
    s2, w2 = connect(env.node, "p2", port=5002)
    register(s1)
    register(s2)
    tid = task_id_for(URL)
    env.http.respond(0, FakeResponse(200, chunked(CONTENT, 100_000)))

    cached = check_cache(env, tid, CONTENT)
    task = env.node.tasks[tid]
    assert [task.piece_md5[n] for n in range(3)] == cached
    assigns = w1.ops("assign") + w2.ops("assign")
    assert sorted({a["piece"] for a in assigns}) == [0, 1, 2]
    for a in assigns:
        assert a["task"] == tid and a["source"] == CDN
        assert a["md5"] == cached[a["piece"]]
        assert a["len"] == task.piece_len[a["piece"]]
        assert a["piece_size"] == P
    for wire in (w1, w2):
        final = wire.ops("task_info")[-1]
        assert final["state"] == "done"
        assert final["length"] == len(CONTENT)
        assert final["piece_count"] == 3
        assert final["piece_size"] == P
        assert final["md5"] == md5(CONTENT)
    assert task.source_bytes == len(CONTENT)
    meta = json.loads(open(env.node.cdn.cache_path(tid) + ".meta").read())
    assert meta["piece_md5"] == cached and meta["file_md5"] == md5(CONTENT)

    # Whoever got piece 0 from the CDN reports it done; the other peer is then sent to it.
    holder, holder_session, other = (
        ("p1", s1, w2) if any(a["piece"] == 0 for a in w1.ops("assign")) else ("p2", s2, w1)
    )
    before = len(other.ops("assign"))
    holder_session.control_received({"op": "done", "task": tid, "piece": 0, "source": CDN})
    new = [a for a in other.ops("assign")[before:] if a["piece"] == 0]
    assert len(new) == 1
    expected_host = "192.0.2.1" if holder == "p1" else holder_session.wire.peer_host
    assert new[0]["source"] == {
        "id": holder,
        "host": expected_host,
        "port": 5001 if holder == "p1" else 5002,
    }
    assert new[0]["md5"] == cached[0]


def test_lookup_serves_cached_slices(env: Env) -> None:
    """Supernode.lookup hands out exactly the cached slice bytes (header, data, tail) for a
    cached piece, counts them as served, and refuses an unknown task or piece."""
    s1, _ = connect(env.node, "p1")
    register(s1)
    tid = task_id_for(URL)
    env.http.respond(0, FakeResponse(200, [CONTENT]))
    infos = pieces_of(CONTENT, P)
    for info in infos:
        source, piece_size, data_len = env.node.lookup(tid, info.piece, "x")
        assert (piece_size, data_len) == (P, info.data_len)
        assert os.pread(source.fd, source.total, source.offset) == wrap(info.data, P)
        assert source.on_done is not None
        source.on_done(True, source.total)
    assert env.node.tasks[tid].served_bytes == len(CONTENT) + 3 * OVERHEAD
    with pytest.raises(PieceUnavailable):
        env.node.lookup(tid, 3, "x")
    with pytest.raises(PieceUnavailable):
        env.node.lookup("0" * 64, 0, "x")


def test_empty_body_is_one_empty_piece(env: Env) -> None:
    """A 0-byte origin body makes one piece with dataLen 0: a 5-byte slice in the cache, an
    assign with len 0 and the md5 of that slice, and the md5 of the empty file."""
    s1, w1 = connect(env.node, "p1")
    register(s1)
    tid = task_id_for(URL)
    env.http.respond(0, FakeResponse(200, [], length=0))
    assert cache_bytes(env, tid) == wrap(b"", P)
    (assign,) = w1.ops("assign")
    assert (assign["piece"], assign["len"]) == (0, 0)
    assert assign["md5"] == md5(wrap(b"", P))
    final = w1.ops("task_info")[-1]
    assert (final["state"], final["length"], final["piece_count"]) == ("done", 0, 1)
    assert final["md5"] == md5(b"")


@pytest.mark.parametrize(
    "reason", [None, Failure(PotentialDataLoss())], ids=["response-done", "potential-data-loss"]
)
def test_chunked_body(env: Env, reason: Failure | None) -> None:
    """A body of unknown length (chunked, or ended by closing the connection) is sliced the
    same way: the first task_info has no length, the final one has the real length, and the
    cache holds the right slices."""
    s1, w1 = connect(env.node, "p1")
    register(s1)
    tid = task_id_for(URL)
    env.http.respond(
        0, FakeResponse(200, chunked(CONTENT, 65536), length=UNKNOWN_LENGTH, reason=reason)
    )
    infos = w1.ops("task_info")
    assert infos[0]["length"] is None and infos[0]["piece_size"] == P
    assert (infos[-1]["state"], infos[-1]["length"], infos[-1]["piece_count"]) == (
        "done",
        len(CONTENT),
        3,
    )
    assert infos[-1]["md5"] == md5(CONTENT)
    check_cache(env, tid, CONTENT)


def test_unknown_length_default_piece_size(tmp_path: Any) -> None:
    """Without a configured piece size, a body of unknown length is cut into 4 MiB pieces."""
    http = FakeHttp()
    node = Supernode(MemoryReactorClock(), http, str(tmp_path), piece_size=None)
    try:
        s1, w1 = connect(node, "p1")
        register(s1)
        small = body(1000, seed=1)
        http.respond(0, FakeResponse(200, [small], length=UNKNOWN_LENGTH))
        (assign,) = w1.ops("assign")
        assert assign["piece_size"] == 4 * MIB and assign["len"] == 1000
        assert assign["md5"] == md5(wrap(small, 4 * MIB))
    finally:
        _close_tasks(node)


# -- failures ---------------------------------------------------------------------------


def test_origin_404_fails_task_then_fresh_task(env: Env) -> None:
    """An origin 404 sends task_failed (status 404, kind OriginError) to every registered peer,
    removes the task and its cache file, consumes the error body; the next registration of the
    same URL creates a fresh task with a new origin request."""
    s1, w1 = connect(env.node, "p1")
    s2, w2 = connect(env.node, "p2")
    register(s1)
    register(s2)
    tid = task_id_for(URL)
    first = env.node.tasks[tid]
    response = env.http.respond(0, FakeResponse(404, [b"no such file"], phrase=b"Not Found"))
    assert response.delivered_to is not None  # the error body was read and discarded
    for wire in (w1, w2):
        (failed,) = wire.ops("task_failed")
        assert failed["task"] == tid
        assert failed["status"] == 404
        assert failed["state"] == "failed"
        assert failed["kind"] == "OriginError"
        assert "404" in failed["reason"]
        assert wire.ops("assign") == []
    assert tid not in env.node.tasks and tid not in env.node.scheduler.tasks
    assert not os.path.exists(env.node.cdn.cache_path(tid))
    assert first.fd is None

    register(s1, req=2)
    assert len(env.http.requests) == 2
    assert env.node.tasks[tid] is not first and env.node.tasks[tid].state == "running"
    env.http.respond(1, FakeResponse(200, [CONTENT]))
    assert w1.ops("task_info")[-1]["state"] == "done"


@pytest.mark.parametrize(
    "chunks, length, words",
    [
        (chunked(CONTENT[:-1000], 300_000), len(CONTENT), "Content-Length"),
        (chunked(CONTENT, 300_000), len(CONTENT) - 1000, "Content-Length"),
    ],
    ids=["short-body", "long-body"],
)
def test_body_length_mismatch_fails_task(
    env: Env, chunks: list[bytes], length: int, words: str
) -> None:
    """A body shorter (or longer) than its Content-Length fails the task: peers get
    task_failed naming the reason, the cache file and metadata are removed, and the pieces
    already assigned can no longer be served."""
    s1, w1 = connect(env.node, "p1")
    register(s1)
    tid = task_id_for(URL)
    path = env.node.cdn.cache_path(tid)
    assert os.path.exists(path)
    env.http.respond(0, FakeResponse(200, chunks, length=length))
    assert w1.ops("assign"), "full pieces are assigned before the body ends"
    (failed,) = w1.ops("task_failed")
    assert words in failed["reason"]
    assert not os.path.exists(path) and not os.path.exists(path + ".meta")
    with pytest.raises(PieceUnavailable):
        env.node.lookup(tid, 0, "x")
    assert [m for m in w1.ops("task_info") if m["state"] == "done"] == []


def test_origin_connection_error_fails_task(env: Env) -> None:
    """A request that errbacks (the origin is unreachable) fails the task with the error's
    text and no status."""
    s1, w1 = connect(env.node, "p1")
    register(s1)
    env.http.requests[0].deferred.errback(ConnectionRefusedError("connection refused"))
    (failed,) = w1.ops("task_failed")
    assert failed["status"] is None and "refused" in failed["reason"]


def test_origin_timeout_cancels_request(env: Env) -> None:
    """An origin that never answers is given up after the idle timeout: the request is
    cancelled and the task fails."""
    s1, w1 = connect(env.node, "p1")
    register(s1)
    env.clock.advance(59)
    assert w1.ops("task_failed") == []
    env.clock.advance(2)
    (failed,) = w1.ops("task_failed")
    assert "did not answer within 60 s" in failed["reason"]


def test_origin_timeout_through_an_agent_is_a_timeout(tmp_path: Any) -> None:
    """Cancelled by the origin timeout, Twisted's Agent fails the request with
    ResponseNeverReceived wrapping the CancelledError: the peers are still told that the
    origin did not answer within the timeout, naming --origin-timeout, as a DownloadTimeout
    (dfget's exit 5), never as a bare 'CancelledError' origin error."""

    class AgentLikeHttp(FakeHttp):
        def request(self, method: str, url: str, headers: Any = None, **kwargs: Any) -> Deferred[Any]:
            def cancel(d: Deferred[Any]) -> None:
                d.errback(Failure(ResponseNeverReceived([Failure(CancelledError())])))

            req = FakeRequest(method, url, headers, kwargs, Deferred(cancel))
            self.requests.append(req)
            return req.deferred

    clock = MemoryReactorClock()
    node = Supernode(clock, AgentLikeHttp(), str(tmp_path / "home"), piece_size=P, origin_idle_timeout=60.0)
    try:
        s1, w1 = connect(node, "p1")
        register(s1)
        clock.advance(59)
        assert w1.ops("task_failed") == []
        clock.advance(2)
        (failed,) = w1.ops("task_failed")
        assert failed["kind"] == "DownloadTimeout", failed
        assert "did not answer within 60 s" in failed["reason"] and "--origin-timeout" in failed["reason"]
        assert "CancelledError" not in failed["reason"]
    finally:
        _close_tasks(node)


# -- peers coming and going ---------------------------------------------------------------


def test_lost_peer_dropped_and_work_reoffered(env: Env) -> None:
    """When a peer's connection is lost it leaves the scheduler's members and the session
    table, and pieces it was fetching from the CDN are offered to the remaining peer."""
    s1, w1 = connect(env.node, "p1")
    s2, w2 = connect(env.node, "p2")
    register(s1)
    register(s2)
    tid = task_id_for(URL)
    env.http.respond(0, FakeResponse(200, [CONTENT]))
    running_p1 = {a["piece"] for a in w1.ops("assign")}
    assert running_p1, "p1 was given CDN pieces"
    before = len(w2.ops("assign"))

    s1.connection_lost(Failure(ConnectionDone()))

    assert "p1" not in env.node.sessions
    assert "p1" not in env.node.scheduler.tasks[tid].members
    assert set(env.node.scheduler.tasks[tid].members) == {"p2"}
    offered = {a["piece"] for a in w2.ops("assign")[before:] if a["source"] == CDN}
    assert running_p1 - {a["piece"] for a in w2.ops("assign")[:before]} <= offered
    assert offered


def test_reconnect_replaces_old_session(env: Env) -> None:
    """A second hello with the same peer id from the same host closes the old connection; the
    old session's later loss does not drop the new one."""
    old, old_wire = connect(env.node, "p1", addr="10.0.0.7")
    new, _ = connect(env.node, "p1", addr="10.0.0.7")
    assert old_wire.closed == "close"
    assert env.node.sessions["p1"] is new
    old.connection_lost(Failure(ConnectionDone()))
    assert env.node.sessions["p1"] is new


def test_register_before_hello_is_protocol_error(env: Env) -> None:
    """A register (or done) before hello is a BadControlMessage; over a real FramedProtocol the
    connection is aborted and no origin request is made."""
    session = SupernodeSession(StubWire(), env.node)  # type: ignore[arg-type]
    with pytest.raises(BadControlMessage):
        register(session)
    with pytest.raises(BadControlMessage):
        session.control_received({"op": "done", "task": "0" * 64, "piece": 0, "source": CDN})

    proto = FramedProtocol(env.node.make_session)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(encode_control({"op": "register", "req": 1, "url": URL}))
    assert transport.disconnected
    assert transport.value() == b""
    assert env.http.requests == [] and env.node.tasks == {}


def test_hello_and_register_over_framed_protocol(env: Env) -> None:
    """Over a real FramedProtocol a hello gets a welcome and a register a registered frame;
    a second hello on the same connection closes it."""
    proto = FramedProtocol(env.node.make_session)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(
        encode_control({"op": "hello", "peer": "p1", "port": 4000})
        + encode_control({"op": "register", "req": 3, "url": URL})
    )
    frames = FrameCollector().feed(transport.value())
    assert frames.kinds() == ["welcome", "registered"]
    assert frames.events[1][1]["req"] == 3
    session = env.node.sessions["p1"]
    assert session.host == "192.168.1.1"  # StringTransport's default peer address
    proto.dataReceived(encode_control({"op": "hello", "peer": "p1", "port": 4000}))
    assert transport.disconnected


def test_refused_bad_url(env: Env) -> None:
    """A register with a URL that is not http(s) is refused (not a protocol error) and makes
    no task."""
    s1, w1 = connect(env.node, "p1")
    register(s1, url="ftp://origin.example/x", req=4)
    (refused,) = w1.ops("refused")
    assert refused["req"] == 4 and "ftp" in refused["reason"]
    assert env.node.tasks == {} and env.http.requests == []


def test_filter_keys_collapse_urls(env: Env) -> None:
    """URLs that differ only in query keys named in the register's filter are one task with
    one origin request; without the filter they are different tasks."""
    s1, w1 = connect(env.node, "p1")
    s2, w2 = connect(env.node, "p2")
    s3, w3 = connect(env.node, "p3")
    base = "http://origin.example/f.bin?v=1&token="
    register(s1, url=base + "aaa", filter=["token"])
    register(s2, url=base + "bbb&sig=x", filter=["token", "sig"])
    assert len(env.http.requests) == 1 and len(env.node.tasks) == 1
    assert w1.ops("registered")[0]["task"] == w2.ops("registered")[0]["task"]
    (task,) = env.node.tasks.values()
    assert task.task_url == "http://origin.example/f.bin?v=1"
    assert env.http.requests[0].url == base + "aaa"  # the origin gets the full URL

    register(s3, url=base + "ccc")
    assert len(env.http.requests) == 2 and len(env.node.tasks) == 2
    assert w3.ops("registered")[0]["task"] != w1.ops("registered")[0]["task"]


def test_md5_and_identifier_split_tasks(env: Env) -> None:
    """The same URL registered with different expected md5s (or identifiers) makes different
    tasks; an origin body whose md5 differs from the expected one fails its task with
    kind IntegrityError."""
    s1, w1 = connect(env.node, "p1")
    register(s1, req=1, md5="0" * 32)
    register(s1, req=2, identifier="build-42")
    register(s1, req=3)
    assert len(env.node.tasks) == 3 and len(env.http.requests) == 3
    env.http.respond(0, FakeResponse(200, [b"hello"]))
    (failed,) = w1.ops("task_failed")
    assert failed["kind"] == "IntegrityError" and failed["task"] == task_id_for(URL, "0" * 32)


def test_live_peer_id_cannot_be_taken_from_another_host(env: Env) -> None:
    """A hello reusing the id of a live peer from another host is refused (the connection is
    closed by the protocol error); the live peer keeps its session."""
    live, live_wire = connect(env.node, "p1", addr="10.0.0.7")
    thief = SupernodeSession(StubWire(host="10.0.0.66"), env.node)  # type: ignore[arg-type]
    with pytest.raises(BadControlMessage):
        thief.control_received({"op": "hello", "peer": "p1", "port": 4000})
    assert env.node.sessions["p1"] is live and not live_wire.closed


def test_stats_of_gone_peers_are_dropped(env: Env) -> None:
    """Peers that register and disconnect leave no per-peer statistics behind."""
    for i in range(50):
        session, _ = connect(env.node, f"p{i}")
        register(session)
        session.connection_lost(Failure(ConnectionDone()))
    assert env.node.stats == {}


# -- content named by its digest ------------------------------------------------------------


def test_digest_names_one_task_per_registry_with_credentials_and_one_without(env: Env) -> None:
    """Registrations with the same digest share one task (one origin GET): without
    credentials whatever the registry or repository; with credentials, every client of the
    same registry (whatever its credentials or repository), the first registrant's
    Authorization being used - but a registration with credentials naming another registry
    is another task, so it can never be served what the first registry handed out."""
    digest = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
    s1, w1 = connect(env.node, "p1")
    s2, w2 = connect(env.node, "p2")
    s3, w3 = connect(env.node, "p3")
    register(s1, url=f"http://reg-a.example/v2/x/blobs/{digest}", headers=["Authorization: Bearer a"], digest=digest)
    register(s2, url=f"http://reg-a.example/v2/y/blobs/{digest}", headers=["Authorization: Bearer b"], digest=digest)
    assert len(env.http.requests) == 1
    assert env.http.requests[0].headers == {b"Authorization": [b"Bearer a"]}
    tid = digest_task_id(digest, "http://reg-a.example:80")
    assert list(env.node.tasks) == [tid]
    assert w1.ops("registered")[0]["task"] == w2.ops("registered")[0]["task"] == tid
    env.http.respond(0, FakeResponse(200, [CONTENT]))
    assert env.node.tasks[tid].state == "done"

    register(s3, url=f"http://reg-b.example/v2/x/blobs/{digest}", headers=["Authorization: Bearer a"], digest=digest)
    assert len(env.http.requests) == 2 and str(env.http.requests[1].url).startswith("http://reg-b.example/")
    assert w3.ops("registered")[0]["task"] == digest_task_id(digest, "http://reg-b.example:80") != tid

    s4, w4 = connect(env.node, "p4")
    s5, w5 = connect(env.node, "p5")
    register(s4, url=f"http://reg-c.example/v2/x/blobs/{digest}", digest=digest)
    register(s5, url=f"http://reg-d.example/v2/z/blobs/{digest}", digest=digest)
    assert len(env.http.requests) == 3
    assert w4.ops("registered")[0]["task"] == w5.ops("registered")[0]["task"] == digest_task_id(digest)


def test_digest_mismatch_fails_the_task(env: Env) -> None:
    """When the origin's bytes do not hash to the registered digest the task fails as an
    IntegrityError and its cache is removed: it is never served as done."""
    digest = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    s1, w1 = connect(env.node, "p1")
    register(s1, url=f"http://reg.example/v2/x/blobs/{digest}", digest=digest)
    tid = digest_task_id(digest)
    env.http.respond(0, FakeResponse(200, [CONTENT]))
    (failed,) = w1.ops("task_failed")
    assert failed["kind"] == "IntegrityError" and "sha256" in failed["reason"]
    assert tid not in env.node.tasks
    assert not os.path.exists(env.node.cdn.cache_path(tid))


def test_bad_digest_is_refused(env: Env) -> None:
    """A malformed digest is refused; the link stays up."""
    s1, w1 = connect(env.node, "p1")
    register(s1, url="http://reg.example/v2/x/blobs/sha256:abc", digest="sha256:abc")
    (refused,) = w1.ops("refused")
    assert "digest" in refused["reason"]
    assert env.http.requests == []



@pytest.mark.parametrize("tail_ok", [True, False], ids=["right-tail", "wrong-tail"])
def test_resumed_digest_task_checks_sha256_of_the_whole_file(tmp_path: Any, tail_ok: bool) -> None:
    """A digest task cut short after its first piece, resumed by a restarted supernode with
    a Range request, is checked against the digest over the whole file (the intact prefix
    is re-hashed from the cache): a right tail makes it done, a wrong tail fails it."""
    from twisted.internet.error import ConnectionLost

    clock = MemoryReactorClock()
    home = str(tmp_path / "home")
    digest = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
    url = f"http://reg.example/v2/x/blobs/{digest}"
    tid = digest_task_id(digest)
    http1 = FakeHttp()
    first = Supernode(clock, http1, home, piece_size=P)
    # Like a process killed mid-fetch: nothing is cleaned up after the cut.
    first.cdn.discard = lambda task: task.close()  # type: ignore[method-assign]
    sa, _ = connect(first, "pa")
    register(sa, url=url, digest=digest)
    cut = FakeResponse(200, [CONTENT[: P - OVERHEAD]], length=len(CONTENT), reason=Failure(ConnectionLost()))
    http1.respond(0, cut)
    _close_tasks(first)

    http2 = FakeHttp()
    second = Supernode(clock, http2, home, piece_size=P)
    assert second.tasks[tid].state == "partial"
    sb, wb = connect(second, "pb")
    register(sb, url=url, digest=digest)
    (req,) = http2.requests
    assert req.headers[b"Range"] == [f"bytes={P - OVERHEAD}-".encode()]
    tail = CONTENT[P - OVERHEAD :] if tail_ok else b"x" * len(CONTENT[P - OVERHEAD :])
    resumed = FakeResponse(206, [tail])
    resumed.headers.setRawHeaders(b"content-range", [f"bytes {P - OVERHEAD}-{len(CONTENT) - 1}/{len(CONTENT)}".encode()])
    http2.respond(0, resumed)
    if tail_ok:
        assert second.tasks[tid].state == "done"
        assert check_cache(Env(clock, http2, second, home), tid, CONTENT)
    else:
        (failed,) = wb.ops("task_failed")
        assert failed["kind"] == "IntegrityError" and tid not in second.tasks
    _close_tasks(second)


def test_file_md5_is_taken_piece_by_piece_off_the_reactor_and_gates_done(env: Env) -> None:
    """The file md5 is fed one finished piece at a time, in file order, by the (here
    hand-driven) hasher; the task is done, with the right md5, only once the last piece
    is in it, and the hasher's descriptor is closed afterwards."""
    calls: list[tuple[int, int, int, Any, Deferred[None]]] = []

    def hasher(fd: int, offset: int, length: int, md5: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        calls.append((fd, offset, length, md5, d))
        return d

    env.node.cdn.hash_range = hasher
    s1, w1 = connect(env.node, "p1")
    register(s1)
    env.http.respond(0, FakeResponse(200, chunked(CONTENT, 100_000)))
    tid = task_id_for(URL)
    task = env.node.tasks[tid]
    # Only the first piece's hash has been started: the others wait for it, in order.
    assert [(c[1], c[2]) for c in calls] == [(4, P - OVERHEAD)]
    assert task.state == "running" and all(m["md5"] is None for m in w1.ops("task_info"))
    fd = calls[0][0]
    for i in range(3):
        _, offset, length, md5, d = calls[i]
        assert offset == i * P + 4
        os_md5_feed(fd, offset, length, md5)
        d.callback(None)
    assert [c[2] for c in calls] == [P - OVERHEAD, P - OVERHEAD, 12345]
    assert task.state == "done"
    assert task.file_md5 == hashlib.md5(CONTENT).hexdigest()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_file_md5_read_error_fails_the_task(env: Env) -> None:
    """If the cache cannot be read back for the file md5, the task fails with a storage error."""

    def hasher(fd: int, offset: int, length: int, md5: Any) -> Deferred[None]:
        return fail(StorageError("read error"))

    env.node.cdn.hash_range = hasher
    s1, w1 = connect(env.node, "p1")
    register(s1)
    env.http.respond(0, FakeResponse(200, [CONTENT]))
    assert tid_state(env) is None  # failed and forgotten
    (failed,) = w1.ops("task_failed")
    assert (failed["kind"], failed["reason"]) == ("StorageError", "read error")


def os_md5_feed(fd: int, offset: int, length: int, md5: Any) -> None:
    md5.update(os.pread(fd, length, offset))


def tid_state(env: Env) -> str | None:
    task = env.node.tasks.get(task_id_for(URL))
    return task.state if task is not None else None


class SteppedResponse(FakeResponse):
    """A response whose body arrives when the test says (L{step}), not all at once."""

    def deliverBody(self, protocol: Any) -> None:
        self.delivered_to = protocol
        protocol.makeConnection(self.transport)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            if self.chunks:
                chunk = self.chunks.pop(0)
                self.delivered_bytes += len(chunk)
                self.delivered_to.dataReceived(chunk)

    def end(self, reason: Failure | None = None) -> None:
        self.delivered_to.connectionLost(reason or self.reason)


def test_a_piece_still_arriving_is_streamed_to_relay_gets(env: Env) -> None:
    """A relay get for the piece the origin fetch is writing gets its header at once (the
    length is known), then the data as it is written, then the tail once the piece is whole;
    the API counts it as streamed.  A plain get for it is still refused."""
    s1, w1 = connect(env.node, "p1")
    register(s1)
    tid = task_id_for(URL)
    body = SteppedResponse(200, chunked(CONTENT, 100_000))
    env.http.respond(0, body)
    body.step(3)
    with pytest.raises(PieceUnavailable):
        env.node.lookup(tid, 0, "x")
    source, piece_size, data_len = env.node.relay_lookup(tid, 0, "x")
    assert (piece_size, data_len) == (P, P - 5)
    assert source.prefix == SliceHeader(P - 5, P).encode() and source.suffix == TAIL
    growing = source.growing
    assert growing is not None and growing.available == 300_000 and not growing.ended
    body.step(2)
    assert growing.available == 500_000
    body.step(len(body.chunks))
    body.end()
    assert growing.complete and not growing.failed
    task = env.node.tasks[tid]
    assert os.pread(task.fd or -1, data_len, source.offset) == CONTENT[:data_len]
    (info,) = [t for t in env.node.describe() if t["id"] == tid]
    assert info["streamed"] == 1


def test_a_failed_origin_fetch_cuts_the_readers_of_a_piece_in_progress(env: Env) -> None:
    """When the origin connection fails mid-piece, every relay reader of that piece is cut
    off at once (the task fails; nothing half-written is ever completed)."""
    s1, w1 = connect(env.node, "p1")
    register(s1)
    tid = task_id_for(URL)
    body = SteppedResponse(200, chunked(CONTENT, 100_000), reason=Failure(ConnectionError("reset")))
    env.http.respond(0, body)
    body.step(2)
    source, _, _ = env.node.relay_lookup(tid, 0, "x")
    assert source.growing is not None
    body.end()
    assert source.growing.failed
    assert w1.ops("task_failed") and tid not in env.node.tasks


def test_a_resumed_fetch_that_finds_a_new_version_starts_the_swarm_over(tmp_path: Any) -> None:
    """A restarted supernode resumes a partial task; a peer re-registers holding its first
    piece (old version); the origin answers the Range with a whole new file.  The peer is
    told to reset, the scheduler forgets the old pieces (no member counts as holding them),
    and once the peer registers again it is assigned the new pieces: nobody waits forever
    for pieces that no longer exist."""
    from twisted.internet.error import ConnectionLost

    clock = MemoryReactorClock()
    home = str(tmp_path / "home")
    tid = task_id_for(URL)
    http1 = FakeHttp()
    first = Supernode(clock, http1, home, piece_size=P, scheduler=Scheduler(relay=False))
    first.cdn.discard = lambda task: task.close()  # type: ignore[method-assign]
    sa, wa = connect(first, "pa")
    register(sa)
    cut = FakeResponse(200, [CONTENT[: P - OVERHEAD]], length=len(CONTENT), reason=Failure(ConnectionLost()))
    cut.headers.setRawHeaders(b"etag", [b'"v1"'])
    http1.respond(0, cut)
    generation = wa.ops("task_info")[0]["generation"]
    _close_tasks(first)

    http2 = FakeHttp()
    second = Supernode(clock, http2, home, piece_size=P, scheduler=Scheduler(relay=False))
    assert second.tasks[tid].state == "partial"
    sb, wb = connect(second, "pa")
    register(sb, have="0", generation=generation)
    new = bytes(reversed(CONTENT))
    fresh = FakeResponse(200, [new])
    fresh.headers.setRawHeaders(b"etag", [b'"v2"'])
    http2.respond(0, fresh)
    assert wb.ops("task_reset") == [{"op": "task_reset", "task": tid}]
    sched = second.scheduler.tasks[tid]
    assert "pa" not in sched.members or not sched.members["pa"].has
    before = len(wb.ops("assign"))
    register(sb, req=2)  # what the peer does after a reset
    (assign,) = wb.ops("assign")[before:]  # one download at a time, of the new version
    assert assign["md5"] == second.tasks[tid].piece_md5[assign["piece"]]
    assert second.tasks[tid].state == "done"
    _close_tasks(second)
