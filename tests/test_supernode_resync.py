"""The supernode and peers getting back in step, with a fake origin and fake peers: seeds
announcing what they hold after a restart, peers that answer "not downloading", and how long
a content version stays trusted.

Same doubles as test_supernode_unit.py: a L{FakeHttp} origin whose responses the test fires,
L{SupernodeSession}s over L{StubWire}s, a L{MemoryReactorClock}.
"""

from __future__ import annotations

import hashlib
from typing import Any

from memhelpers import FakeHttp, FakeResponse, StubWire, body, chunked
from twisted.internet.testing import MemoryReactorClock

from dfly.pieces import MIB, OVERHEAD
from dfly.supernode.scheduler import CDN, Scheduler
from dfly.supernode.service import Supernode, SupernodeSession
from dfly.urls import digest_task_id, task_id_for

P = 1 * MIB
URL = "http://origin.example/files/resync.bin"
CONTENT = body(2 * (P - OVERHEAD) + 4321, seed=8)
TID = task_id_for(URL)


def connect(node: Supernode, peer_id: str) -> tuple[SupernodeSession, StubWire]:
    wire = StubWire(host=f"10.0.1.{len(node.sessions) + 1}")
    session = SupernodeSession(wire, node)  # type: ignore[arg-type]
    session.connection_made()
    session.control_received({"op": "hello", "peer": peer_id, "port": 4000})
    return session, wire


def register(session: SupernodeSession, req: int = 1, url: str = URL, **extra: Any) -> None:
    session.control_received({"op": "register", "req": req, "url": url, **extra})


def response(content: bytes = CONTENT, etag: str | None = None) -> FakeResponse:
    r = FakeResponse(200, chunked(content, 100_000))
    if etag is not None:
        r.headers.setRawHeaders(b"etag", [etag.encode()])
    return r


class OpenBody(FakeResponse):
    """A response whose body has delivered its chunks and is still open (more to come)."""

    def deliverBody(self, protocol: Any) -> None:
        self.delivered_to = protocol
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            protocol.dataReceived(chunk)


def cached(tmp_path: Any, etag: str | None = None, revalidate_after: float = 5.0) -> tuple[MemoryReactorClock, str, str]:
    """A supernode home holding CONTENT for URL (fetched at clock 100); (clock, home, generation)."""
    clock = MemoryReactorClock()
    clock.advance(100.0)
    home = str(tmp_path / "home")
    http = FakeHttp()
    node = Supernode(clock, http, home, piece_size=P, revalidate_after=revalidate_after)
    s, _ = connect(node, "first")
    register(s)
    http.respond(0, response(etag=etag))
    task = node.tasks[TID]
    assert task.state == "done" and task.generation is not None
    generation = task.generation
    for t in node.tasks.values():
        t.close()
    return clock, home, generation


def close(node: Supernode) -> None:
    for t in node.tasks.values():
        t.close()


# -- seeds ---------------------------------------------------------------------------------


def test_restarted_supernode_takes_a_seed_without_asking_the_origin(tmp_path: Any) -> None:
    """After a restart a peer announces the finished file it holds (seed: true, every piece,
    its generation) from an origin without validators: the supernode asks the origin nothing,
    the peer joins the task holding every piece and is assigned nothing.  A later request by
    another peer is what revalidates (and, without validators, fetches again)."""
    clock, home, generation = cached(tmp_path)
    clock.advance(60.0)
    http = FakeHttp()
    node = Supernode(clock, http, home, piece_size=P)
    try:
        s, w = connect(node, "seed")
        register(s, have="0-2", generation=generation, seed=True)
        assert http.requests == []
        (reg,) = w.ops("registered")
        assert (reg["state"], reg["generation"]) == ("done", generation)
        assert reg["fresh_ms"] == 0  # not confirmed by the origin since the restart
        assert node.scheduler.tasks[TID].members["seed"].has == {0, 1, 2}
        assert w.ops("assign") == [] and w.ops("task_reset") == []
        s2, _ = connect(node, "asker")
        register(s2)
        assert len(http.requests) == 1  # no validators: only a fetch can tell
        assert w.ops("task_reset") == [{"op": "task_reset", "task": TID}]
    finally:
        close(node)


def test_seed_of_an_unknown_task_fetches_nothing(tmp_path: Any) -> None:
    """A seed announcement of a task the supernode does not know (its cache was lost, or
    another supernode fetched it) is answered as unknown: no fetch, no task, no member."""
    http = FakeHttp()
    node = Supernode(MemoryReactorClock(), http, str(tmp_path / "home"), piece_size=P)
    s, w = connect(node, "seed")
    register(s, req=4, have="0-2", generation="g-elsewhere", seed=True)
    assert http.requests == [] and node.tasks == {} and node.scheduler.tasks == {}
    assert w.ops("registered") == [{"op": "registered", "req": 4, "task": TID, "state": "unknown"}]


def test_seed_of_another_generation_does_not_join(tmp_path: Any) -> None:
    """A seed holding another version than the task's is told the task's generation (so it
    drops its copy) and does not join: nothing of its copy is offered, nothing assigned."""
    clock, home, generation = cached(tmp_path, etag='"v2"')
    http = FakeHttp()
    node = Supernode(clock, http, home, piece_size=P)
    try:
        s, w = connect(node, "seed")
        register(s, have="0-2", generation="g-old", seed=True)
        (reg,) = w.ops("registered")
        assert reg["generation"] == generation
        assert "seed" not in node.scheduler.tasks[TID].members
        assert http.requests == [] and w.ops("assign") == []
    finally:
        close(node)


# -- "not downloading" -------------------------------------------------------------------------


def test_not_downloading_answer_is_leaving_not_a_failure_to_retry(tmp_path: Any) -> None:
    """A peer that answers an assignment with "not downloading" (it dropped the task) leaves
    the task: it is not assigned the piece again, nothing counts against it, and the piece
    goes to another member.  Without that, the two would ping-pong the piece at full speed."""
    clock = MemoryReactorClock()
    http = FakeHttp()
    node = Supernode(clock, http, str(tmp_path / "home"), scheduler=Scheduler(relay=False), piece_size=P)
    try:
        s1, w1 = connect(node, "gone")
        register(s1)
        http.respond(0, OpenBody(200, [CONTENT[: P - OVERHEAD]], length=len(CONTENT)))  # piece 0 so far
        answered = 0
        for _ in range(50):  # the peer answers every assignment the same way, at once
            assigns = w1.ops("assign")
            if answered == len(assigns):
                break
            for m in assigns[answered:]:
                assert (m["piece"], m["source"]) == (0, CDN)
                s1.control_received({"op": "fail", "task": TID, "piece": 0, "source": CDN,
                                     "reason": "not downloading", "attempt": m["attempt"]})
            answered = len(assigns)
        assert len(w1.ops("assign")) == 1
        sched = node.scheduler.tasks[TID]
        assert "gone" not in sched.members and TID not in s1.tasks
        assert node.scheduler.peers["gone"].client_errors == 0
        s2, w2 = connect(node, "other")
        register(s2)
        (b,) = w2.ops("assign")
        assert (b["piece"], b["source"]) == (0, CDN)
    finally:
        close(node)


# -- how long a version is trusted ------------------------------------------------------------


def test_answers_say_how_long_the_version_stays_trusted(tmp_path: Any) -> None:
    """Every registration answer carries fresh_ms, what is left of --revalidate-after since
    the origin last confirmed the version: a peer asks again only once it ran out.  Within it
    a registration is answered from the cache; after it the origin is asked (If-None-Match),
    and a 304 starts a new window."""
    clock = MemoryReactorClock()
    clock.advance(100.0)
    http = FakeHttp()
    node = Supernode(clock, http, str(tmp_path / "home"), piece_size=P, revalidate_after=5.0)
    try:
        s, w = connect(node, "p")
        register(s, req=1)
        assert w.ops("registered")[-1]["fresh_ms"] == 0  # nothing known yet
        http.respond(0, response(etag='"e1"'))
        assert w.ops("task_info")[-1]["fresh_ms"] == 5000
        clock.advance(2.0)
        register(s, req=2)
        assert len(http.requests) == 1 and w.ops("registered")[-1]["fresh_ms"] == 3000
        clock.advance(3.5)
        register(s, req=3)
        (check,) = http.requests[1:]
        assert check.headers[b"If-None-Match"] == [b'"e1"']
        assert [m["req"] for m in w.ops("registered")] == [1, 2]  # waits for the origin
        http.respond(1, FakeResponse(304))
        assert w.ops("registered")[-1]["req"] == 3 and w.ops("registered")[-1]["fresh_ms"] == 5000
    finally:
        close(node)


def test_content_named_by_digest_is_never_revalidated(tmp_path: Any) -> None:
    """A cached task named by a content digest cannot change: a registration long after the
    fetch is answered from the cache without asking the origin."""
    clock = MemoryReactorClock()
    http = FakeHttp()
    node = Supernode(clock, http, str(tmp_path / "home"), piece_size=P, revalidate_after=5.0)
    digest = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
    url = f"http://reg.example/v2/x/blobs/{digest}"
    try:
        s, w = connect(node, "p")
        register(s, url=url, digest=digest)
        http.respond(0, response(etag='"d"'))
        assert node.tasks[digest_task_id(digest)].state == "done"
        clock.advance(3600.0)
        s2, w2 = connect(node, "q")
        register(s2, url=url, digest=digest)
        assert len(http.requests) == 1
        assert w2.ops("registered")[-1]["state"] == "done"
    finally:
        close(node)
