"""The supernode and peers getting back in step, with a fake origin and fake peers: peers
that answer "not downloading".

Same doubles as test_supernode_unit.py: a L{FakeHttp} origin whose responses the test fires,
L{SupernodeSession}s over L{StubWire}s, a L{MemoryReactorClock}.
"""

from __future__ import annotations

from typing import Any

from memhelpers import FakeHttp, FakeResponse, StubWire, body, chunked
from twisted.internet.testing import MemoryReactorClock

from dfly.pieces import MIB, OVERHEAD
from dfly.supernode.scheduler import CDN, Scheduler
from dfly.supernode.service import Supernode, SupernodeSession
from dfly.urls import task_id_for

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


