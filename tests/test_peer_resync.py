"""A peer node and its supernode getting back in step, in memory: what a finished download
becomes when the link comes back or its content version changes, and the revalidation of a
held copy before it is served again.

The node is a real L{PeerNode} on a L{MemoryReactorClock}; its supernode link is a
L{StringTransport} the test reads frames from and writes frames to, and its one source is
a L{FetchSession} on another transport, answered by the test with slices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from memhelpers import body, pieces_of
from peerhelpers import P, Peer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dfly.peer.node import DownloadRequest, DownloadResult
from dfly.pieces import OVERHEAD

OLD = body(2 * (P - OVERHEAD) + 1000, seed=21)
NEW = body(P - OVERHEAD + 77, seed=22)
URL = "http://origin.example/resync.bin"


@pytest.fixture
def peer(tmp_path: Any) -> Iterator[Peer]:
    p = Peer(tmp_path)
    yield p
    p.close()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- a finished download when the supernode comes back -------------------------------------


def test_reconnect_announces_finished_downloads_as_seeds(peer: Peer) -> None:
    """After a reconnect a finished download is registered with "seed": true (with every
    piece and its generation): an announcement of what is held, not a request, so the
    supernode fetches nothing for it.  An unfinished download registers as a request."""
    request = DownloadRequest(URL)
    peer.finish(request, OLD)
    other = DownloadRequest(URL + "?other")
    peer.node.download(other).addErrback(lambda _: None)
    peer.sent()
    peer.node._link_up()
    regs = {m["url"]: m for m in peer.sent() if m["op"] == "register"}
    assert regs[URL]["seed"] is True
    assert regs[URL]["have"] == "0-2" and regs[URL]["generation"] == "g1"
    assert "seed" not in regs[URL + "?other"]


def test_finished_download_of_a_gone_version_is_dropped_and_leaves_its_task(peer: Peer) -> None:
    """A task description naming another generation than a finished download's makes the node
    drop the file and tell the supernode it leaves the task (so it is not assigned pieces of
    the new version it will not fetch); an assignment that still comes is answered
    "not downloading"."""
    request = DownloadRequest(URL)
    tid = request.task_id
    peer.finish(request, OLD)
    peer.control({"op": "task_info", "task": tid, "state": "running", "generation": "g2", "length": None,
                  "piece_size": None, "piece_count": None, "md5": None})
    assert tid not in peer.node.downloads and peer.node.store.get(tid) is None
    assert peer.sent() == [{"op": "leave", "task": tid}]
    info = pieces_of(NEW, P)[0]
    peer.control({"op": "assign", "task": tid, "piece": 0, "len": info.data_len, "piece_size": P,
                  "md5": info.md5, "source": "cdn", "attempt": 7})
    (answer,) = peer.sent()
    assert (answer["op"], answer["reason"], answer["attempt"]) == ("fail", "not downloading", 7)


def test_finished_download_answers_done_for_a_piece_it_holds(peer: Peer) -> None:
    """An assignment of a piece a finished download holds (the supernode did not know it
    had it) is answered done, not "not downloading": the node stays a source of the task."""
    request = DownloadRequest(URL)
    peer.finish(request, OLD)
    info = pieces_of(OLD, P)[1]
    peer.control({"op": "assign", "task": request.task_id, "piece": 1, "len": info.data_len, "piece_size": P,
                  "md5": info.md5, "source": "cdn", "attempt": 3})
    assert peer.sent() == [{"op": "done", "task": request.task_id, "piece": 1, "source": "cdn", "attempt": 3}]


# -- revalidating a held copy ----------------------------------------------------------------


def test_held_copy_within_the_supernodes_window_is_served_at_once(peer: Peer) -> None:
    """Within the time the supernode said it trusts the version (fresh_ms), a request for a
    held file is answered at once, without a message to the supernode."""
    request = DownloadRequest(URL)
    first = peer.finish(request, OLD, fresh_ms=5000)
    peer.clock.advance(4.9)
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    assert len(out) == 1 and out[0].path == first.path
    assert peer.sent() == []


def test_held_copy_after_the_window_is_revalidated_then_served(peer: Peer) -> None:
    """After the window a request waits for one round trip: the node registers the task again
    as a request (with what it holds and its generation); the supernode's answer with the
    same generation serves the held file, and its fresh_ms starts a new window."""
    request = DownloadRequest(URL)
    first = peer.finish(request, OLD, fresh_ms=5000)
    peer.clock.advance(5.0)
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    assert out == []
    (reg,) = peer.sent()
    assert reg["op"] == "register" and "seed" not in reg
    assert (reg["have"], reg["generation"]) == ("0-2", "g1")
    peer.control({"op": "registered", "req": reg["req"], "task": request.task_id, **peer.info(OLD, "g1", 3000)})
    assert len(out) == 1 and out[0].path == first.path and read(first.path) == OLD
    assert peer.node.verified_prefix(request.task_id) is not None
    peer.clock.advance(2.9)
    again: list[Any] = []
    peer.node.download(request).addBoth(again.append)
    assert len(again) == 1 and peer.sent() == []


def test_changed_version_is_downloaded_for_the_waiting_request(peer: Peer) -> None:
    """When the answer to a revalidation names another generation, the held file is dropped
    and the new version is downloaded for the waiting request, which gets the new bytes; in
    the meantime nothing of the old file is offered for early copying."""
    request = DownloadRequest(URL)
    tid = request.task_id
    peer.finish(request, OLD, fresh_ms=5000)
    epoch = peer.node.downloads[tid].epoch
    peer.clock.advance(6.0)
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    (reg,) = peer.sent()
    assert peer.node.verified_prefix(tid) is None
    peer.control({"op": "registered", "req": reg["req"], "task": tid, **peer.info(NEW, "g2", 5000, state="running")})
    dl = peer.node.downloads[tid]
    assert out == [] and dl.state == "registered" and dl.epoch == epoch + 1 and dl.generation == "g2"
    peer.deliver(tid, NEW)
    assert len(out) == 1 and isinstance(out[0], DownloadResult), out
    assert out[0].md5 == hashlib.md5(NEW).hexdigest() and read(out[0].path) == NEW


def test_revalidation_not_known_yet_downloads_again(peer: Peer) -> None:
    """An answer without a generation (the supernode has to fetch the file first, e.g. it lost
    its cache) cannot confirm the held file: it is dropped and the download starts over, the
    version arriving with the next task description."""
    request = DownloadRequest(URL)
    tid = request.task_id
    peer.finish(request, OLD)
    peer.clock.advance(6.0)
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    (reg,) = peer.sent()
    peer.control({"op": "registered", "req": reg["req"], "task": tid, "state": "waiting", "generation": None,
                  "fresh_ms": 0, "length": None, "piece_size": None, "piece_count": None, "md5": None})
    assert peer.node.store.get(tid) is None and peer.node.downloads[tid].state == "registered"
    peer.control({"op": "task_info", "task": tid, **peer.info(OLD, "g3", 5000)})
    peer.deliver(tid, OLD)
    assert len(out) == 1 and read(out[0].path) == OLD


def test_revalidation_without_a_supernode_serves_the_held_copy(peer: Peer) -> None:
    """If the supernode link is lost while a request waits for a revalidation, or is down when
    the request comes, the held file is served."""
    request = DownloadRequest(URL)
    first = peer.finish(request, OLD)
    peer.clock.advance(6.0)
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    assert out == []
    link = peer.node.link
    assert link.session is not None
    link.session_lost(link.session, Failure(ConnectionDone()))
    assert len(out) == 1 and out[0].path == first.path
    later: list[Any] = []
    peer.node.download(request).addBoth(later.append)
    assert len(later) == 1 and later[0].path == first.path


def test_content_named_by_digest_is_never_revalidated(peer: Peer) -> None:
    """A task named by its content digest (a registry blob) cannot change: however old the
    held copy, a request is answered at once."""
    digest = "sha256:" + hashlib.sha256(OLD).hexdigest()
    request = DownloadRequest("http://reg.example/v2/x/blobs/" + digest, digest=digest)
    peer.finish(request, OLD, fresh_ms=0)
    peer.clock.advance(10_000.0)
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    assert len(out) == 1 and peer.sent() == []


def test_stream_of_a_held_copy_waits_for_its_revalidation(peer: Peer) -> None:
    """A stream (the proxy's way in) of a held file past its window does not open the held
    file before the revalidation answered; when the version changed it delivers the new
    bytes, whole and verified."""
    request = DownloadRequest(URL)
    tid = request.task_id
    peer.finish(request, OLD)
    peer.clock.advance(6.0)
    ready: list[Any] = []
    peer.node.stream(request).addBoth(ready.append)
    assert ready == []
    (reg,) = peer.sent()
    peer.control({"op": "registered", "req": reg["req"], "task": tid, **peer.info(NEW, "g2", 5000, state="running")})
    assert len(ready) == 1 and ready[0].length == len(NEW)
    stream = ready[0]
    consumer = StringTransport()
    done: list[Any] = []
    stream.finished.addBoth(done.append)
    stream.start(consumer)
    peer.deliver(tid, NEW)
    assert done == [len(NEW)] and consumer.value() == NEW


class PausingConsumer:
    """A consumer that pauses its producer after every write, like a slow client."""

    def __init__(self) -> None:
        self.data = b""
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data
        self.producer.pauseProducing()


def test_stream_of_a_verified_file_finishes_it_when_a_new_version_replaces_it(peer: Peer) -> None:
    """A stream reading a held, verified file when the task's version changes (here: a task
    description of another generation drops the file) finishes that file from its own
    descriptor: its client gets one whole version, never a mix and never a cut."""
    request = DownloadRequest(URL)
    tid = request.task_id
    peer.finish(request, OLD)
    ready: list[Any] = []
    peer.node.stream(request).addBoth(ready.append)
    (stream,) = ready
    consumer = PausingConsumer()
    done: list[Any] = []
    stream.finished.addBoth(done.append)
    stream.start(consumer)
    assert 0 < len(consumer.data) < len(OLD)
    peer.control({"op": "task_info", "task": tid, "state": "running", "generation": "g2", "length": None,
                  "piece_size": None, "piece_count": None, "md5": None})
    assert peer.node.store.get(tid) is None
    while not done:
        stream.resumeProducing()
    assert done == [len(OLD)] and consumer.data == OLD
