"""Copies damaged on a peer's disk after they were verified, in memory.

* The supernode asks a source to check its copy of a piece when a downloader got that
  piece from it with another md5 (and only then), and forgets a piece a peer lost.
* The peer checks what it is asked to (off the reactor thread in the daemon; inline
  here): a damaged finished copy is dropped and its task left, a damaged piece of an
  unfinished download is fetched again, a piece that checks out changes nothing, and
  garbage costs nothing.
* A held file whose identity on disk (inode, size, mtime) changed since it was verified is
  hashed again before it is served; a stream that reads a verified copy and finds it
  wrong makes the node drop it, so that the client's next request gets the right bytes.

The peer is a real L{PeerNode} on a L{MemoryReactorClock} (L{peerhelpers.Peer}); the
supernode is a real L{Supernode} with a fake origin and L{StubWire} sessions; the proxy
runs over treq's StubTreq with a L{FakeNode} swarm.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
from memhelpers import FakeHttp, FakeResponse, StubWire, body, chunked, pieces_of
from peerhelpers import SOURCE, P, Peer, sync_hash
from proxyhelpers import BLOB, BLOB_PATH, DIGEST, TID, Env
from proxyhelpers import P as BLOB_PIECE_SIZE
from streamhelpers import FakeNode, Sink
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from dfly.errors import IntegrityError, TaskFailed
from dfly.peer.node import MAX_CHECKS, DownloadRequest, DownloadResult
from dfly.pieces import OVERHEAD, wrap
from dfly.supernode.scheduler import CDN, Scheduler
from dfly.supernode.service import CHECK_INTERVAL, PROTOCOL_VERSION, Supernode, SupernodeSession
from dfly.urls import task_id_for
from dfly.wire.framing import encode_control

CONTENT = body(2 * (P - OVERHEAD) + 4321, seed=41)  # two full pieces and a short third
URL = "http://origin.example/damaged.bin"


def damage(path: str, offset: int, silent: bool = False) -> None:
    """Flip the byte at C{offset} of C{path}.  Silent: the file keeps its mtime, as damage
    below the filesystem would; otherwise its mtime moves on, as after any later write."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    mtime = st.st_mtime_ns if silent else st.st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(st.st_atime_ns, mtime))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- the supernode ------------------------------------------------------------------------


class Swarm:
    """A supernode (store and forward, room for every piece at once) with peer p1 holding
    the whole file (fetched from the CDN) and p2 sent to p1 for every piece."""

    def __init__(self, root: Any) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000.0)
        self.http = FakeHttp()
        scheduler = Scheduler(down_limit=4, up_limit=5, relay=False, blacklist_limit=100)
        self.node = Supernode(self.clock, self.http, str(root / "sn"), scheduler=scheduler, piece_size=P)
        self.tid = task_id_for(URL)
        self.s1, self.w1 = self.connect("p1")
        self.s1.control_received({"op": "register", "req": 1, "url": URL})
        self.http.respond(0, FakeResponse(200, chunked(CONTENT, 100_000)))
        assigns = self.w1.ops("assign")
        assert sorted(a["piece"] for a in assigns) == [0, 1, 2] and {a["source"] for a in assigns} == {CDN}
        for a in assigns:
            self.s1.control_received({"op": "done", "task": self.tid, "piece": a["piece"], "source": CDN,
                                      "attempt": a["attempt"]})
        self.s2, self.w2 = self.connect("p2")
        self.s2.control_received({"op": "register", "req": 1, "url": URL})
        self.assigns = {a["piece"]: a for a in self.w2.ops("assign")}
        assert sorted(self.assigns) == [0, 1, 2] and {a["source"]["id"] for a in self.assigns.values()} == {"p1"}

    def connect(self, peer_id: str) -> tuple[SupernodeSession, StubWire]:
        wire = StubWire(host=f"10.0.0.{len(self.node.sessions) + 1}")
        session = SupernodeSession(wire, self.node)  # type: ignore[arg-type]
        session.connection_made()
        session.control_received({"op": "hello", "peer": peer_id, "port": 4000})
        assert wire.ops("welcome") == [{"op": "welcome", "version": PROTOCOL_VERSION}]
        return session, wire

    def fail(self, session: SupernodeSession, assign: dict[str, Any], reason: str, **extra: Any) -> None:
        session.control_received({"op": "fail", "task": self.tid, "piece": assign["piece"],
                                  "source": assign["source"]["id"] if assign["source"] != CDN else CDN,
                                  "attempt": assign["attempt"], "reason": reason, **extra})

    def md5(self, piece: int) -> str:
        return self.node.tasks[self.tid].piece_md5[piece]

    def close(self) -> None:
        for task in list(self.node.tasks.values()):
            task.close()


@pytest.fixture
def sn(tmp_path: Any) -> Iterator[Swarm]:
    s = Swarm(tmp_path)
    yield s
    s.close()


def test_md5_mismatch_report_asks_the_source_to_check_its_copy(sn: Swarm) -> None:
    """A downloader's report that a slice from a peer arrived with another md5 (kind md5,
    for the assignment on record) makes the supernode send that peer one 'check' naming
    the task, the piece and the md5 the supernode computed from the origin's bytes (not
    the downloader's word); the failure still counts against the source as before."""
    sn.fail(sn.s2, sn.assigns[1], "slice md5 " + "a" * 32 + " is not the announced " + sn.md5(1), kind="md5")
    assert sn.w1.ops("check") == [{"op": "check", "task": sn.tid, "piece": 1, "md5": sn.md5(1)}]
    assert sn.node.scheduler.peers["p1"].service_errors == 1
    assert sn.w2.ops("check") == []


def test_other_failures_and_made_up_reports_ask_for_no_check(sn: Swarm) -> None:
    """No check is asked for a failure that is not an md5 mismatch (a lost connection, a
    refusal, even if its reason text looks like one), for an md5 report on an attempt that
    is not the one on record, or for a piece fetched from the CDN (the CDN repairs its own
    cache)."""
    sn.fail(sn.s2, sn.assigns[0], "connection to source lost: reset")
    sn.fail(sn.s2, sn.assigns[1], "slice md5 " + "a" * 32 + " is not the announced " + sn.md5(1))
    stale = dict(sn.assigns[2], attempt=sn.assigns[2]["attempt"] + 1000)
    sn.fail(sn.s2, stale, "slice md5 mismatch", kind="md5")
    assert sn.w1.ops("check") == []
    # p2 avoids p1 now, so pieces 0 and 1 come from the CDN; a mismatch from there asks no peer.
    from_cdn = [a for a in sn.w2.ops("assign") if a["source"] == CDN]
    assert sorted(a["piece"] for a in from_cdn) == [0, 1]
    sn.fail(sn.s2, from_cdn[0], "slice md5 mismatch", kind="md5")
    assert sn.w1.ops("check") == [] and sn.w2.ops("check") == []


def test_checks_are_not_repeated_within_the_interval(sn: Swarm) -> None:
    """A second mismatch on the same piece of the same source within CHECK_INTERVAL asks
    for no second check (the source is reading it, or found it fine); after the interval it
    is asked again."""
    sn.fail(sn.s2, sn.assigns[0], "slice md5 mismatch", kind="md5")
    s3, w3 = sn.connect("p3")
    s3.control_received({"op": "register", "req": 1, "url": URL})
    a3 = {a["piece"]: a for a in w3.ops("assign")}
    assert a3[0]["source"]["id"] == "p1"
    sn.fail(s3, a3[0], "slice md5 mismatch", kind="md5")
    assert len(sn.w1.ops("check")) == 1
    s4, w4 = sn.connect("p4")
    s4.control_received({"op": "register", "req": 1, "url": URL})
    a4 = {a["piece"]: a for a in w4.ops("assign")}
    assert a4[0]["source"]["id"] == "p1"
    sn.clock.advance(CHECK_INTERVAL)
    sn.fail(s4, a4[0], "slice md5 mismatch", kind="md5")
    assert [m["piece"] for m in sn.w1.ops("check")] == [0, 0]


def test_a_piece_lost_by_a_peer_is_assigned_to_it_again_and_not_from_it(sn: Swarm) -> None:
    """A peer that says it lost a piece (its copy failed a check) is no holder of it any
    more: the download of that piece from it is withdrawn and given another source (the
    CDN), the peer itself is assigned the piece again, and the API counts one piece less.
    A 'lost' for a task or piece it has nothing of changes nothing."""
    before = {"p1": len(sn.w1.ops("assign")), "p2": len(sn.w2.ops("assign"))}
    sn.s1.control_received({"op": "lost", "task": sn.tid, "piece": 1})
    sched = sn.node.scheduler.tasks[sn.tid]
    assert 1 not in sched.members["p1"].has and "p1" not in sched.holders[1]
    assert sched.members["p2"].running.get(1) != "p1", "p2's download of piece 1 from p1 is withdrawn"
    (peer,) = [p for p in sn.node.describe()[0]["peers"] if p["id"] == "p1"]
    assert peer["pieces"] == 2 and not peer["done"]
    # Nobody holds piece 1 now: one of the two gets it from the CDN, then the other from it.
    wires = {"p1": (sn.s1, sn.w1), "p2": (sn.s2, sn.w2)}
    new = {pid: [a for a in w.ops("assign")[before[pid]:] if a["piece"] == 1] for pid, (_, w) in wires.items()}
    ((first, (a,)),) = [(pid, got) for pid, got in new.items() if got]
    assert a["source"] == CDN
    other = "p2" if first == "p1" else "p1"
    session, wire = wires[other]
    seen = len(wire.ops("assign"))
    wires[first][0].control_received({"op": "done", "task": sn.tid, "piece": 1, "source": CDN, "attempt": a["attempt"]})
    (b,) = [x for x in wire.ops("assign")[seen:] if x["piece"] == 1]
    assert b["source"]["id"] == first
    before = (len(sn.w1.ops("assign")), len(sn.w2.ops("assign")))
    sn.s1.control_received({"op": "lost", "task": sn.tid, "piece": 1})
    sn.s1.control_received({"op": "lost", "task": "0" * 64, "piece": 0})
    sn.s1.control_received({"op": "lost", "task": sn.tid, "piece": 99})
    assert (len(sn.w1.ops("assign")), len(sn.w2.ops("assign"))) == before
    assert sn.w1.closed is None


# -- the peer: checks it is asked for ---------------------------------------------------------


@pytest.fixture
def peer(tmp_path: Any) -> Iterator[Peer]:
    p = Peer(tmp_path)
    yield p
    p.close()


def piece_md5(n: int) -> str:
    return pieces_of(CONTENT, P)[n].md5


def check(peer: Peer, tid: str, n: int, md5: str | None = None) -> None:
    peer.control({"op": "check", "task": tid, "piece": n, "md5": md5 or piece_md5(n)})


def test_check_of_a_damaged_piece_drops_a_finished_copy_and_leaves_the_task(peer: Peer) -> None:
    """A finished peer asked to check a piece whose bytes on disk changed since they were
    verified reads it back, finds another md5, drops the whole copy (its file is gone) and
    leaves the task, so the supernode stops offering it; the next request for the file
    registers afresh (a new download through the swarm) and gets the right bytes."""
    request = DownloadRequest(URL)
    tid = request.task_id
    result = peer.finish(request, CONTENT)
    damage(result.path, (P - OVERHEAD) + 100, silent=True)
    check(peer, tid, 1)
    assert peer.sent() == [{"op": "leave", "task": tid}]
    assert tid not in peer.node.downloads and peer.node.store.get(tid) is None
    assert not os.path.exists(result.path)
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    (reg,) = peer.sent()
    assert reg["op"] == "register" and reg["have"] == "" and not reg.get("seed")
    peer.control({"op": "registered", "req": reg["req"], "task": tid, **peer.info(CONTENT, "g1", 5000)})
    peer.deliver(tid, CONTENT)
    assert len(out) == 1 and isinstance(out[0], DownloadResult) and read(out[0].path) == CONTENT


def test_check_of_a_piece_that_checks_out_changes_nothing(peer: Peer) -> None:
    """A piece whose bytes on disk still have the md5 the supernode names is kept: nothing
    is sent, the copy stays, and the next request is answered at once without reading the
    file (the downloader's own link or disk may have been at fault)."""
    request = DownloadRequest(URL)
    tid = request.task_id
    result = peer.finish(request, CONTENT)
    for n in range(3):
        check(peer, tid, n)
    assert peer.sent() == []
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    assert len(out) == 1 and out[0].path == result.path and read(result.path) == CONTENT
    assert peer.sent() == []


def test_check_of_an_unfinished_download_fetches_the_piece_again(peer: Peer) -> None:
    """An unfinished download whose held piece 0 fails its check stops holding it: the
    supernode is told ('lost'), early copiers see a new epoch with nothing final yet, the
    piece is fetched again when assigned, and the download finishes verified with the
    right bytes."""
    request = DownloadRequest(URL)
    tid = request.task_id
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    (reg,) = peer.sent()
    peer.control({"op": "registered", "req": reg["req"], "task": tid, **peer.info(CONTENT, "g1", 5000)})
    infos = pieces_of(CONTENT, P)
    for info in infos[:2]:
        assign(peer, tid, info.piece)
        slice_from_source(peer, tid, info.piece, info.data)
    dl = peer.node.downloads[tid]
    epoch = dl.epoch
    path, ready, _ = peer.node.verified_prefix(tid) or ("", 0, 0)
    assert ready == 2 * (P - OVERHEAD)
    peer.sent()
    damage(path, 10, silent=True)
    check(peer, tid, 0)
    assert peer.sent() == [{"op": "lost", "task": tid, "piece": 0}]
    assert 0 not in dl.store.have and 1 in dl.store.have
    assert peer.node.verified_prefix(tid) == (path, 0, epoch + 1)
    for info in (infos[0], infos[2]):
        assign(peer, tid, info.piece)
        slice_from_source(peer, tid, info.piece, info.data)
    assert len(out) == 1 and isinstance(out[0], DownloadResult), out
    assert read(out[0].path) == CONTENT


def assign(peer: Peer, tid: str, n: int) -> None:
    info = pieces_of(CONTENT, P)[n]
    peer.control({"op": "assign", "task": tid, "piece": n, "len": info.data_len, "piece_size": P,
                  "md5": info.md5, "source": {"id": "s", "host": SOURCE[0], "port": SOURCE[1]}})


def slice_from_source(peer: Peer, tid: str, n: int, data: bytes) -> None:
    peer.source.dataReceived(
        encode_control({"op": "slice", "task": tid, "piece": n, "len": len(data), "piece_size": P}) + wrap(data, P)
    )


def test_garbage_and_repeated_checks_are_harmless(tmp_path: Any) -> None:
    """Checks the peer cannot use cost nothing: malformed ones (no md5, a bad task id, a
    piece number out of range, wrong types), ones for unknown tasks or pieces it does not
    hold are ignored without closing the supernode link; a check of a piece already being
    checked starts no second read, and at most MAX_CHECKS reads run at once.  The copy is
    served as before."""
    reads: list[tuple[Deferred[None], int]] = []

    def slow_hash(path: str, offset: int, length: int, md5: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        reads.append((d, offset))
        return d

    peer = Peer(tmp_path)
    try:
        request = DownloadRequest(URL)
        tid = request.task_id
        peer.finish(request, CONTENT)
        others = [DownloadRequest(f"{URL}?n={n}") for n in range(MAX_CHECKS + 4)]
        for other in others:
            peer.finish(other, CONTENT)
        node = peer.node
        node._hash_range = slow_hash  # the piece checks wait until the test fires them
        for bad in (
            {"op": "check", "task": tid, "piece": 0},
            {"op": "check", "task": "not-a-task", "piece": 0, "md5": piece_md5(0)},
            {"op": "check", "task": tid, "piece": -1, "md5": piece_md5(0)},
            {"op": "check", "task": tid, "piece": 1 << 40, "md5": piece_md5(0)},
            {"op": "check", "task": tid, "piece": "0", "md5": piece_md5(0)},
            {"op": "check", "task": tid, "piece": 0, "md5": "zz" * 16},
            {"op": "check", "task": tid, "piece": 0, "md5": ["x"]},
            {"op": "check"},
            {"op": "check", "task": "0" * 64, "piece": 0, "md5": piece_md5(0)},
            {"op": "check", "task": tid, "piece": 3, "md5": piece_md5(0)},
        ):
            peer.control(bad)
        assert reads == [] and peer.sent() == []
        assert peer.link.connected_open and peer.node.link.connected
        for _ in range(5):
            check(peer, tid, 0, md5="0" * 32)
        assert len(reads) == 1, "one read per piece at a time"
        # Many tasks' pieces at once: at most MAX_CHECKS reads run.
        for other in others:
            check(peer, other.task_id, 0, md5="0" * 32)
        assert len(reads) == MAX_CHECKS
        assert peer.sent() == []
        d, _ = reads[0]
        d.callback(None)  # the first read ends: its md5 is not the "0" * 32 named, so: damaged
        assert peer.sent() == [{"op": "leave", "task": tid}]
        for d, _ in reads[1:]:
            d.errback(Failure(PermissionError(13, "Permission denied")))  # cannot check: no verdict
        assert peer.sent() == [] and len(node.downloads) == MAX_CHECKS + 4
        assert node._checks == set()
        out: list[Any] = []
        node.download(DownloadRequest(f"{URL}?n=0")).addBoth(out.append)
        assert len(out) == 1 and isinstance(out[0], DownloadResult)
    finally:
        peer.close()


def test_fail_report_says_when_a_slice_had_another_md5(peer: Peer) -> None:
    """The downloader's report of a slice that arrived whole with another md5 carries
    kind md5 (the supernode then asks the source to check); the other request cut off
    with that connection carries no kind."""
    request = DownloadRequest(URL)
    tid = request.task_id
    peer.node.download(request)
    (reg,) = peer.sent()
    peer.control({"op": "registered", "req": reg["req"], "task": tid, **peer.info(CONTENT, "g1", 5000)})
    info = pieces_of(CONTENT, P)[0]
    assign(peer, tid, 0)
    assign(peer, tid, 1)
    wrong = bytes(len(info.data))
    slice_from_source(peer, tid, 0, wrong)  # the parser finds the md5 wrong and closes
    peer.source.connectionLost(Failure(ConnectionDone()))
    fails = {m["piece"]: m for m in peer.sent() if m["op"] == "fail"}
    assert fails[0]["kind"] == "md5" and "is not the announced" in fails[0]["reason"]
    # Piece 1 fails with the connection, whatever its reason text says: not a mismatch.
    assert "kind" not in fails[1]


# -- the peer: a held file changed on disk ------------------------------------------------------


class CountingHasher:
    """The inline hasher, counting the bytes it was asked to read."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, path: str, offset: int, length: int, md5: Any) -> Deferred[None]:
        self.bytes += length
        return sync_hash(path, offset, length, md5)


def test_unchanged_held_file_is_served_without_reading_it(peer: Peer) -> None:
    """The fast path: a request for a held file whose inode, size and mtime are those it
    had when it was verified is answered at once, without reading a byte of it."""
    request = DownloadRequest(URL)
    peer.finish(request, CONTENT)
    hasher = CountingHasher()
    peer.node._hash_range = hasher
    for _ in range(3):
        out: list[Any] = []
        peer.node.download(request).addBoth(out.append)
        assert len(out) == 1 and isinstance(out[0], DownloadResult)
    assert hasher.bytes == 0 and peer.sent() == []


def test_touched_but_intact_held_file_is_verified_once_and_served(peer: Peer) -> None:
    """A held file whose mtime changed but whose bytes did not is hashed once (the whole
    file), then served; its new identity is remembered, so the next request reads nothing."""
    request = DownloadRequest(URL)
    result = peer.finish(request, CONTENT)
    hasher = CountingHasher()
    peer.node._hash_range = hasher
    st = os.stat(result.path)
    os.utime(result.path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    for _ in range(2):
        out: list[Any] = []
        peer.node.download(request).addBoth(out.append)
        assert len(out) == 1 and out[0].path == result.path
    assert hasher.bytes == len(CONTENT) and peer.sent() == []


def test_held_file_changed_on_disk_is_downloaded_again_for_the_request(peer: Peer) -> None:
    """A held file written to since it was verified (another mtime) is hashed again before
    it is served: its md5 is wrong, so the copy is dropped, the task left and registered
    again, and the request that found it (a dfget, a proxy client) waits for the new
    download and gets the right bytes; it is never handed the damaged file."""
    request = DownloadRequest(URL)
    tid = request.task_id
    result = peer.finish(request, CONTENT)
    damage(result.path, 7)
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    assert out == []
    leave, reg = peer.sent()
    assert leave == {"op": "leave", "task": tid}
    assert reg["op"] == "register" and reg["have"] == ""
    assert peer.node.verified_prefix(tid) is None
    peer.control({"op": "registered", "req": reg["req"], "task": tid, **peer.info(CONTENT, "g1", 5000)})
    peer.deliver(tid, CONTENT)
    assert len(out) == 1 and isinstance(out[0], DownloadResult) and read(out[0].path) == CONTENT


def test_held_file_removed_from_disk_is_downloaded_again(peer: Peer) -> None:
    """A held file deleted from under the daemon is not handed out as a path that is not
    there: the request downloads it again."""
    request = DownloadRequest(URL)
    tid = request.task_id
    result = peer.finish(request, CONTENT)
    os.unlink(result.path)
    out: list[Any] = []
    peer.node.download(request).addBoth(out.append)
    assert out == [] and [m["op"] for m in peer.sent()] == ["leave", "register"]
    assert peer.node.downloads[tid].state == "waiting"  # for the supernode's answer


# -- readers of a held copy -------------------------------------------------------------------


def test_stream_over_a_silently_damaged_copy_drops_it_and_the_next_gets_the_right_bytes(peer: Peer) -> None:
    """Damage the filesystem does not show (same mtime) is found by the stream's own digest
    check: the stream fails with its last chunk withheld, the node drops the copy and
    leaves the task, and the next stream of the blob is served by a new download through
    the swarm, whole and right."""
    digest = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
    request = DownloadRequest("http://reg.example/v2/x/blobs/" + digest, digest=digest)
    tid = request.task_id
    result = peer.finish(request, CONTENT)
    damage(result.path, len(CONTENT) - 10, silent=True)
    first = open_and_run(peer, request, digest)
    assert isinstance(first[1], Failure) and first[1].check(IntegrityError)
    assert len(first[0]) < len(CONTENT)
    assert peer.sent() == [{"op": "leave", "task": tid}] and tid not in peer.node.downloads
    ready: list[Any] = []
    peer.node.stream(request, 0, None, digest).addBoth(ready.append)
    (reg,) = peer.sent()
    peer.control({"op": "registered", "req": reg["req"], "task": tid, **peer.info(CONTENT, "g1", 5000)})
    (stream,) = ready
    sink = Sink()
    done: list[Any] = []
    stream.finished.addBoth(done.append)
    stream.start(sink)
    peer.deliver(tid, CONTENT)
    assert done == [len(CONTENT)] and sink.data == CONTENT


def open_and_run(peer: Peer, request: DownloadRequest, digest: str | None) -> tuple[bytes, Any]:
    """Stream all of C{request} from the node into a sink: (bytes written, outcome)."""
    ready: list[Any] = []
    peer.node.stream(request, 0, None, digest).addBoth(ready.append)
    (stream,) = ready
    sink = Sink()
    done: list[Any] = []
    stream.finished.addBoth(done.append)
    stream.start(sink)
    assert len(done) == 1
    return sink.data, done[0]


def test_stream_of_a_held_file_without_a_digest_checks_its_md5(peer: Peer) -> None:
    """A stream with no digest to check (a --p2p-rule file) hashes what it reads with md5
    and releases the last chunk only if that is the verified file md5: silent damage to
    the held copy cuts the stream and drops the copy; an intact copy streams whole."""
    request = DownloadRequest(URL)
    tid = request.task_id
    result = peer.finish(request, CONTENT)
    data, outcome = open_and_run(peer, request, None)
    assert (data, outcome) == (CONTENT, len(CONTENT))
    damage(result.path, 3, silent=True)
    data, outcome = open_and_run(peer, request, None)
    assert isinstance(outcome, Failure) and outcome.check(IntegrityError) and "md5" in outcome.getErrorMessage()
    assert len(data) < len(CONTENT)
    assert peer.sent() == [{"op": "leave", "task": tid}] and tid not in peer.node.downloads


def test_stream_of_a_copy_dropped_as_damaged_fails_at_once(tmp_path: Any) -> None:
    """Two streams read one held copy; when the first finds it wrong and the node drops it,
    the second (still reading, paused by its client) fails at once rather than carrying
    on over bytes known to be wrong."""
    node = FakeNode(str(tmp_path))
    digest = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
    request = DownloadRequest("http://reg.example/v2/x/blobs/" + digest, digest=digest)
    node.download(request)
    node.deliver(request.task_id, CONTENT, P)
    store = node.store.get(request.task_id)
    assert store is not None
    damage(store.data_path, 5, silent=True)
    streams: list[Any] = []
    for _ in range(2):
        node.stream(request, 0, None, digest).addCallback(streams.append)
    slow, fast = Sink(pause_after=1), Sink()
    outcomes: list[list[Any]] = [[], []]
    for stream, sink, out in zip(streams, (slow, fast), outcomes, strict=True):
        stream.finished.addBoth(out.append)
        stream.start(sink)
    assert outcomes[1] and outcomes[1][0].check(IntegrityError)
    assert len(node.dropped) == 1
    assert outcomes[0] and outcomes[0][0].check(IntegrityError), "the paused stream fails at once"
    node.store.close()


def test_unverified_stream_mismatch_drops_nothing(tmp_path: Any) -> None:
    """A digest mismatch while the download is still unverified is the swarm's problem
    (the supernode fails such a task), not a damaged copy: the stream fails and nothing
    is dropped."""
    node = FakeNode(str(tmp_path))
    digest = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    request = DownloadRequest("http://reg.example/v2/x/blobs/" + digest, digest=digest)
    streams: list[Any] = []
    node.stream(request, 0, None, digest).addCallback(streams.append)
    tid = request.task_id
    node.info(tid, len(CONTENT), P)
    (stream,) = streams
    out: list[Any] = []
    stream.finished.addBoth(out.append)
    stream.start(Sink())
    for n in range(3):
        node.piece(tid, n, CONTENT)
    assert out and out[0].check(IntegrityError)
    assert node.dropped == []
    node.store.close()


def test_stream_that_read_a_piece_found_damaged_fails(peer: Peer) -> None:
    """A stream of an unfinished download that has already read a piece which then fails
    a check (the piece is fetched again) fails at once (what it read cannot be trusted;
    the proxy continues or cuts as for any swarm failure) instead of ending on a mismatch
    that would make the node drop a copy that is by then right."""
    request = DownloadRequest(URL)
    tid = request.task_id
    ready: list[Any] = []
    peer.node.stream(request).addBoth(ready.append)
    (reg,) = peer.sent()
    peer.control({"op": "registered", "req": reg["req"], "task": tid, **peer.info(CONTENT, "g1", 5000)})
    (stream,) = ready
    sink = Sink()
    done: list[Any] = []
    stream.finished.addBoth(done.append)
    stream.start(sink)
    info = pieces_of(CONTENT, P)[0]
    assign(peer, tid, 0)
    slice_from_source(peer, tid, 0, info.data)
    assert len(sink.data) > 0 and done == []
    check(peer, tid, 0, md5="0" * 32)
    assert len(done) == 1 and done[0].check(TaskFailed)


def test_proxy_client_retry_after_a_damaged_copy_gets_the_blob(tmp_path: Any) -> None:
    """Through the proxy: the first pull of a blob whose held copy is silently damaged is
    cut (never a wrong blob delivered whole); the copy is dropped at that moment, so the
    client's retry is served by a new download through the swarm, whole and right."""
    env = Env(str(tmp_path))
    try:
        env.node.download(DownloadRequest("http://registry.example/v2/lib/app/blobs/x", digest=DIGEST))
        env.node.deliver(TID, BLOB, BLOB_PIECE_SIZE)
        store = env.node.store.get(TID)
        assert store is not None
        damage(store.data_path, 500, silent=True)
        (r,) = env.get(BLOB_PATH)
        assert r.code == 200
        cut = env.body(r)
        assert len(cut) == 1 and isinstance(cut[0], Failure)
        assert [t for t, _ in env.node.dropped] == [TID]
        got = env.get(BLOB_PATH)
        env.node.deliver(TID, BLOB, BLOB_PIECE_SIZE)
        env.pump()
        (r,) = got
        assert r.code == 200 and env.body(r) == [BLOB]
        assert env.registry.gets() == []
    finally:
        env.node.store.close()

