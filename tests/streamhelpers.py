"""An in-memory stand-in for the parts of L{PeerNode} that L{BlobStream} and the proxy use.

L{FakeNode} keeps real L{Download} objects and a real L{PeerStore} on disk; a test
plays the swarm by calling L{FakeNode.info}, L{FakeNode.piece}, L{FakeNode.finish}
and L{FakeNode.fail}.  L{Sink} is a consumer that records bytes and can push back.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from dfly.errors import DflyError
from dfly.peer.node import Download, DownloadRequest, DownloadResult
from dfly.peer.store import PeerStore
from dfly.peer.stream import BlobStream, open_stream


class FakeNode:
    """Downloads that advance only when the test says so."""

    def __init__(self, home: str, clock: Clock | None = None) -> None:
        self.reactor = clock or Clock()
        self.clock = self.reactor.seconds
        self.store = PeerStore(home)
        self.downloads: dict[str, Download] = {}
        self.requests: list[DownloadRequest] = []
        self.refuse: Exception | None = None
        self.dropped: list[tuple[str, str]] = []  # (task, why) of copies found damaged

    def download(self, request: DownloadRequest) -> Deferred[DownloadResult]:
        if self.refuse is not None:
            return fail(self.refuse)
        self.requests.append(request)
        dl = self.downloads.get(request.task_id)
        if dl is None or dl.state == "failed":
            dl = self.downloads[request.task_id] = Download(self, request)  # type: ignore[arg-type]
            dl.state = "registered"
        d: Deferred[DownloadResult] = Deferred()
        if dl.state == "done":
            d.callback(dl.result())
        else:
            dl.waiters.append(d)
        return d

    def stream(self, request: DownloadRequest, offset: int = 0, end: int | None = None,
               expected_sha256: str | None = None) -> Deferred[BlobStream]:
        return open_stream(self, request, offset, end, expected_sha256)  # type: ignore[arg-type]

    def lease(self, task_id: str) -> None:
        store = self.store.get(task_id)
        if store is not None:
            store.leases += 1

    def release(self, task_id: str) -> None:
        store = self.store.get(task_id)
        if store is not None:
            store.leases -= 1

    def drop_damaged(self, task_id: str, stored: Any, why: str) -> bool:
        """As L{PeerNode.drop_damaged}, recorded in C{dropped}: the copy and its download go."""
        dl = self.downloads.get(task_id)
        if dl is None or dl.store is not stored or dl.state != "done":
            return False
        self.dropped.append((task_id, why))
        stored.damaged = True
        del self.downloads[task_id]
        self.store.remove(task_id)
        dl.notify()
        return True

    # -- playing the swarm ---------------------------------------------------------
    def info(self, task_id: str, length: int, piece_size: int) -> None:
        dl = self.downloads[task_id]
        dl.piece_size, dl.length = piece_size, length
        dl.piece_count = max(1, -(-length // (piece_size - 5)))
        self.store.open(task_id, piece_size, self.clock())
        dl.notify()

    def piece(self, task_id: str, n: int, content: bytes) -> None:
        """Piece C{n} of C{content} arrives verified."""
        dl = self.downloads[task_id]
        assert dl.piece_size is not None
        cap = dl.piece_size - 5
        data = content[n * cap : (n + 1) * cap]
        store = self.store.get(task_id)
        assert store is not None
        store.write(n, 0, memoryview(data))
        store.mark(n, len(data))
        dl.notify()

    def finish(self, task_id: str) -> None:
        """The verdict: the file held is verified (its md5 is what the store holds now)."""
        dl = self.downloads[task_id]
        dl.state = "done"
        store = self.store.get(task_id)
        assert store is not None
        with open(store.data_path, "rb") as f:
            dl.file_md5 = hashlib.md5(f.read()).hexdigest()
        waiters, dl.waiters = dl.waiters, []
        for d in waiters:
            d.callback(dl.result())
        dl.notify()

    def fail(self, task_id: str, error: Exception | None = None) -> None:
        dl = self.downloads[task_id]
        dl.state = "failed"
        dl.error = error or DflyError("swarm failure")
        waiters, dl.waiters = dl.waiters, []
        for d in waiters:
            d.errback(Failure(dl.error))
        dl.notify()

    def reset(self, task_id: str) -> None:
        """The content changed at the origin: the store is dropped and opened anew."""
        dl = self.downloads[task_id]
        assert dl.piece_size is not None
        self.store.remove(task_id)
        self.store.open(task_id, dl.piece_size, self.clock())
        dl.notify()

    def deliver(self, task_id: str, content: bytes, piece_size: int, order: list[int] | None = None) -> None:
        """Size, every piece (in C{order}) and the verdict."""
        self.info(task_id, len(content), piece_size)
        count = self.downloads[task_id].piece_count
        assert count is not None
        for n in order if order is not None else range(count):
            self.piece(task_id, n, content)
        self.finish(task_id)


@implementer(IConsumer)
class Sink:
    """A consumer recording what it is given; with C{pause_after}, it pauses its producer
    once that many bytes are buffered (until L{drain})."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.producer: Any = None
        self.streaming: bool | None = None
        self.pause_after = pause_after
        self.buffered = 0
        self.paused = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        assert not self.paused, "written while paused"
        self.chunks.append(data)
        self.buffered += len(data)
        if self.pause_after is not None and self.buffered >= self.pause_after and self.producer is not None:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.buffered = 0
        if self.paused:
            self.paused = False
            if self.producer is not None:
                self.producer.resumeProducing()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)
