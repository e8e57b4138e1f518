"""The in-order stream of a task's bytes (L{dfly.peer.stream.BlobStream}) over a fake swarm."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from streamhelpers import FakeNode, Sink
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dfly.errors import DflyError, IntegrityError, TaskFailed
from dfly.peer.node import DownloadRequest
from dfly.peer.stream import CHUNK, BlobStream

P = 105  # 100 data bytes per piece
CONTENT = bytes(range(256)) * 4 + b"tail!"  # 1029 bytes: 11 pieces, the last one short
DIGEST = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
URL = "http://registry.example/v2/a/blobs/" + DIGEST


def request() -> DownloadRequest:
    return DownloadRequest(URL, digest=DIGEST)


@pytest.fixture
def node(tmp_path: Any) -> Any:
    n = FakeNode(str(tmp_path))
    yield n
    n.store.close()


def results(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def open_stream(node: FakeNode, offset: int = 0, end: int | None = None, digest: str | None = DIGEST,
                chunk: int = CHUNK) -> tuple[BlobStream, list[Any]]:
    req = request()
    download = node.download(req)
    dl = node.downloads[req.task_id]
    stream = BlobStream(node, dl, download, offset, end, digest, chunk=chunk)  # type: ignore[arg-type]
    return stream, results(stream.ready)


def test_ready_fires_once_size_is_known(node: FakeNode) -> None:
    """The stream is handed out only when the task's size is known and its store exists."""
    stream, ready = open_stream(node)
    assert ready == []
    node.info(request().task_id, len(CONTENT), P)
    assert ready == [stream] and stream.length == len(CONTENT)


def test_out_of_order_pieces_are_written_in_order(node: FakeNode) -> None:
    """Pieces arriving 2, 1, 0 reach the consumer as bytes in file order only once the
    prefix is contiguous; the final chunk is released only after the verdict."""
    tid = request().task_id
    stream, _ = open_stream(node, chunk=64)
    node.info(tid, len(CONTENT), P)
    sink = Sink()
    stream.start(sink)
    assert sink.streaming is True
    done = results(stream.finished)
    node.piece(tid, 2, CONTENT)
    node.piece(tid, 1, CONTENT)
    assert sink.data == b""
    node.piece(tid, 0, CONTENT)
    assert CONTENT.startswith(sink.data) and 300 - 64 <= len(sink.data) < 300
    for n in range(3, 11):
        node.piece(tid, n, CONTENT)
    assert len(sink.data) < len(CONTENT) and done == []  # last chunk held until the node verified
    node.finish(tid)
    assert sink.data == CONTENT and done == [len(CONTENT)]
    assert all(len(c) <= 64 for c in sink.chunks)
    assert sink.producer is None and node.store.get(tid).leases == 0  # type: ignore[union-attr]


def test_consumer_pause_stops_reading(node: FakeNode) -> None:
    """While the consumer is paused nothing is read or written; resuming continues in order."""
    tid = request().task_id
    stream, _ = open_stream(node, chunk=50)
    node.info(tid, len(CONTENT), P)
    sink = Sink(pause_after=100)
    stream.start(sink)
    done = results(stream.finished)
    for n in range(11):
        node.piece(tid, n, CONTENT)
    node.finish(tid)
    assert sink.paused and len(sink.data) == 100 and stream.position <= 150
    while sink.paused:
        sink.drain()
    assert sink.data == CONTENT and done == [len(CONTENT)]


def test_digest_mismatch_withholds_the_last_chunk(node: FakeNode) -> None:
    """When the bytes do not hash to the digest, the consumer never gets the whole file and
    the stream fails with IntegrityError."""
    tid = request().task_id
    wrong = CONTENT[:-1] + b"?"
    stream, _ = open_stream(node, chunk=64)
    sink = Sink()
    node.info(tid, len(wrong), P)
    stream.start(sink)
    done = results(stream.finished)
    for n in range(11):
        node.piece(tid, n, wrong)
    node.finish(tid)
    assert len(done) == 1 and isinstance(done[0], Failure) and done[0].check(IntegrityError)
    assert len(sink.data) < len(wrong) and wrong.startswith(sink.data)


@pytest.mark.parametrize(("first", "last"), [(0, 0), (99, 100), (150, 730), (1000, 1028), (1028, 1028)])
def test_range_is_exact_and_still_verified(node: FakeNode, first: int, last: int) -> None:
    """A range gets exactly its bytes; the whole file is still hashed before the last one goes out."""
    tid = request().task_id
    stream, _ = open_stream(node, first, last + 1, chunk=64)
    sink = Sink()
    node.info(tid, len(CONTENT), P)
    stream.start(sink)
    done = results(stream.finished)
    for n in range(11):
        node.piece(tid, n, CONTENT)
    assert done == []
    node.finish(tid)
    assert sink.data == CONTENT[first : last + 1] and done == [last + 1 - first]


def test_failure_mid_stream_releases_and_fails(node: FakeNode) -> None:
    """A failed download fails the stream (with its error) and releases the task."""
    tid = request().task_id
    stream, _ = open_stream(node)
    node.info(tid, len(CONTENT), P)
    sink = Sink()
    stream.start(sink)
    done = results(stream.finished)
    node.piece(tid, 0, CONTENT)
    store = node.store.get(tid)
    assert store is not None and store.leases == 1
    node.fail(tid, TaskFailed("supernode gave up"))
    assert isinstance(done[0], Failure) and done[0].check(TaskFailed)
    assert store.leases == 0 and sink.producer is None


def test_stop_releases_but_leaves_the_download_running(node: FakeNode) -> None:
    """A client going away stops reading and releases the lease; the download is not cancelled."""
    tid = request().task_id
    stream, _ = open_stream(node)
    node.info(tid, len(CONTENT), P)
    sink = Sink()
    stream.start(sink)
    done = results(stream.finished)
    dl = node.downloads[tid]
    assert stream._changed in dl.watchers
    stream.stopProducing()
    assert done[0].check(CancelledError)
    assert node.store.get(tid).leases == 0  # type: ignore[union-attr]
    assert dl.watchers == [] and len(dl.waiters) == 1 and dl.state == "registered"
    node.deliver(tid, CONTENT, P)  # the download still completes for everyone else
    assert dl.state == "done"


def test_cancelled_before_ready(node: FakeNode) -> None:
    """Cancelling the not-yet-ready stream unhooks it; nothing was leased."""
    tid = request().task_id
    stream, ready = open_stream(node)
    stream.ready.cancel()
    assert ready[0].check(CancelledError)
    node.info(tid, len(CONTENT), P)
    assert node.store.get(tid).leases == 0  # type: ignore[union-attr]
    assert node.downloads[tid].watchers == []


def test_reset_fails_the_stream(node: FakeNode) -> None:
    """A new version of the content (the store dropped and reopened) ends the stream."""
    tid = request().task_id
    stream, _ = open_stream(node)
    node.info(tid, len(CONTENT), P)
    sink = Sink()
    stream.start(sink)
    done = results(stream.finished)
    node.piece(tid, 0, CONTENT)
    node.reset(tid)
    assert done[0].check(TaskFailed)


def test_empty_file(node: FakeNode) -> None:
    """An empty file is ready at once and finishes with zero bytes once verified."""
    empty = "sha256:" + hashlib.sha256(b"").hexdigest()
    req = DownloadRequest(URL, digest=empty)
    download = node.download(req)
    stream = BlobStream(node, node.downloads[req.task_id], download, 0, None, empty)  # type: ignore[arg-type]
    node.info(req.task_id, 0, P)
    sink = Sink()
    stream.start(sink)
    done = results(stream.finished)
    node.finish(req.task_id)
    assert done == [0] and sink.data == b""


def test_already_done_task_streams_at_once(node: FakeNode) -> None:
    """A task the node already holds is ready and streams without waiting for anything."""
    tid = request().task_id
    node.download(request())
    node.deliver(tid, CONTENT, P)
    d = node.stream(request(), expected_sha256=DIGEST)
    got = results(d)
    stream = got[0]
    sink = Sink()
    stream.start(sink)
    assert results(stream.finished) == [len(CONTENT)] and sink.data == CONTENT


def test_first_bytes(node: FakeNode) -> None:
    """first_bytes fires when piece 0 is held, not for later pieces."""
    tid = request().task_id
    stream, _ = open_stream(node)
    node.info(tid, len(CONTENT), P)
    first = results(stream.first_bytes())
    node.piece(tid, 3, CONTENT)
    assert first == []
    node.piece(tid, 0, CONTENT)
    assert first == [None]


def test_bad_range_and_refused_download(node: FakeNode) -> None:
    """A negative offset or a download refused at once fail the stream's Deferred."""
    assert results(node.stream(request(), -1))[0].check(DflyError)
    node.refuse = DflyError("bad url")
    assert results(node.stream(request()))[0].check(DflyError)


def test_large_skip_yields_to_the_reactor(tmp_path: Any) -> None:
    """Hashing a long prefix before a range's start happens in bursts, between reactor turns."""
    clock = Clock()
    node = FakeNode(str(tmp_path), clock)
    size = 9 << 20
    content = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    req = DownloadRequest(URL, digest=digest)
    download = node.download(req)
    stream = BlobStream(node, node.downloads[req.task_id], download, size - 10, None, digest)  # type: ignore[arg-type]
    node.deliver(req.task_id, content, (1 << 20) + 5)
    sink = Sink()
    stream.start(sink)
    done = results(stream.finished)
    assert done == [] and stream.position < size
    for _ in range(10):
        clock.advance(0)
    assert done == [10] and sink.data == content[-10:]
    node.store.close()
