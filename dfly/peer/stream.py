"""Read a task's bytes in order while the swarm is still downloading it.

Design: a L{BlobStream} is an C{IPushProducer} feeding a consumer (the
twisted.web request of a proxy client).  Pieces land in the task's data file in
any order; the stream reads the run held contiguously from the start
(L{Download.prefix}) in chunks of at most C{CHUNK} bytes, straight from that
file through its own file descriptor, and writes them to the consumer.  It
never polls: when it has caught up with the prefix it waits for the download's
next event (a piece verified, the task finished, failed or reset), and while
the consumer is paused it reads nothing.

Verification: every byte from the start of the file is hashed (sha256 when an
expected digest is given, else md5), even for a range that starts later, and
the last chunk to be written is held back until the end of the file has been
read, the node has verified the whole file (md5 from the supernode) and what
the stream read matched (the digest, else that md5).  So a consumer never
receives the final byte of a wrong file: on a mismatch or a failed download
L{BlobStream.finished} fails instead, and the caller aborts its client's
connection.  At most one chunk is held in memory.

Damage: a mismatch (or a short or unreadable file) over a copy the node had
verified means the copy changed on disk since; the stream tells the node
(L{PeerNode.drop_damaged}), which drops it, so the client's next request
downloads the file again instead of meeting the same bytes.  A stream reading a
copy the node drops as damaged fails at once, and one that has read a piece
found damaged on disk before the download finished fails too (that piece is
fetched again; what was read of it cannot be trusted).

Versions: a stream reads the data file of one content version.  If the task's
file is replaced by another version's while the stream reads (the origin
changed), a stream whose file was already complete and verified finishes from
its own descriptor (the old file's bytes stay readable and never change); any
other stream fails.

Leases: the task is leased (kept from expiry and the cache limit) while a
stream is open and released when it ends, fails or is stopped; stopping a
stream (the client went away) never cancels the download itself, which other
clients may be waiting for.
"""

from __future__ import annotations

import errno
import hashlib
import os
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dfly.errors import DflyError, IntegrityError, StorageError, TaskFailed

if TYPE_CHECKING:
    from dfly.peer.node import Download, DownloadRequest, DownloadResult, PeerNode

CHUNK = 256 * 1024
# Bytes read (and hashed) without writing anything before the stream yields to the reactor.
SKIP_BURST = 4 << 20


def open_stream(
    node: PeerNode,
    request: DownloadRequest,
    offset: int,
    end: int | None,
    expected_sha256: str | None,
) -> Deferred[BlobStream]:
    """See L{PeerNode.stream}."""
    if offset < 0 or (end is not None and end < offset):
        return fail(DflyError(f"bad range [{offset}, {end})"))
    download = node.download(request)
    dl = node.downloads.get(request.task_id)
    if dl is None:
        # The download failed at once (bad request, no store): report its error.
        out: Deferred[BlobStream] = Deferred()
        download.addCallbacks(lambda _: out.errback(TaskFailed("download vanished")), out.errback)
        return out
    stream = BlobStream(node, dl, download, offset, end, expected_sha256)
    return stream.ready


@implementer(IPushProducer)
class BlobStream:
    """Bytes [offset, end) of one task, in order, as the swarm delivers them.

    C{ready} fires with the stream once the file's size is known (C{length}); then
    L{start} attaches a consumer.  C{finished} fires with the number of bytes written
    once all were written and verified, or fails (L{IntegrityError}, L{TaskFailed},
    L{StorageError}, ...) with the final chunk withheld.
    """

    _log = Logger()

    def __init__(
        self,
        node: PeerNode,
        dl: Download,
        download: Deferred[DownloadResult],
        offset: int,
        end: int | None,
        expected_sha256: str | None,
        chunk: int = CHUNK,
    ) -> None:
        self.node = node
        self.dl = dl
        self.task_id = dl.task_id
        self.offset = offset
        self.end = end
        self.expected_sha256 = expected_sha256
        self.chunk = chunk
        self.length: int | None = None
        self.position = 0  # next byte of the file to read
        self.written = 0
        self.ready: Deferred[BlobStream] = Deferred(self._cancel_ready)
        self.finished: Deferred[int] = Deferred()
        self._download = download
        self._verified = False
        self._held: bytes | None = None
        # Every byte from the start is hashed: sha256 for a digest, else md5, which the
        # node's whole-file md5 must then match.
        self._hash = hashlib.sha256() if expected_sha256 is not None else hashlib.md5()
        self._file_md5: str | None = None  # of the version read, once the node verified it
        self._consumer: IConsumer | None = None
        self._paused = False
        self._done = False
        self._fd: int | None = None
        self._stored: Any = None
        self._leased = False
        self._burst: Any = None
        self._data_waiters: list[Deferred[None]] = []
        self._before_held: Any = None  # the hash of every byte before the held chunk
        self._resume: tuple[int, Any] | None = None
        download.addCallbacks(self._download_done, self._download_failed)
        dl.watchers.append(self._changed)
        self._changed()

    # -- before a consumer is attached -----------------------------------------
    def _cancel_ready(self, _: Deferred[BlobStream]) -> None:
        self._close()

    def _open(self) -> bool:
        """Open the data file once the size is known; True when the stream is ready."""
        dl = self.dl
        store = dl.store
        if dl.length is None or store is None or dl.revalidating or dl.rechecking:
            return False  # (a copy being revalidated or checked again may be dropped)
        try:
            self._fd = os.open(store.data_path, os.O_RDONLY)
        except OSError as e:
            self._fail(StorageError(f"cannot read the task's data: {e.strerror or e}"))
            return False
        self._stored = store
        self.length = dl.length
        if self.end is None or self.end > dl.length:
            self.end = dl.length
        if self.offset > dl.length:
            self._fail(DflyError(f"offset {self.offset} is past the end ({dl.length})"))
            return False
        self.node.lease(self.task_id)
        self._leased = True
        return True

    # -- events ----------------------------------------------------------------
    def _download_done(self, result: DownloadResult) -> None:
        self._verified = True
        self._file_md5 = result.md5
        self._changed()

    def _download_failed(self, f: Failure) -> None:
        if not f.check(CancelledError):
            self._fail(f.value if isinstance(f.value, Exception) else TaskFailed(f.getErrorMessage()))

    def _changed(self) -> None:
        """Something happened to the download: maybe more bytes, the size, or an end."""
        if self._done:
            return
        dl = self.dl
        if self._stored is not None and self._stored.damaged:
            self._fail(IntegrityError("the held copy being read was found damaged on disk"))
            return
        replaced = self._stored is not None and self.node.store.get(self.task_id) is not self._stored
        if self._fd is not None and not replaced and not self._verified and self.position > self.available():
            # A piece already read was found damaged on disk (it is fetched again): what
            # was read of it cannot be trusted.
            self._fail(TaskFailed("a piece already read was found damaged on disk"))
            return
        if replaced and self._verified:
            pass  # what this stream reads was complete and verified: finish it from our descriptor
        elif dl.state == "failed":
            self._fail(dl.error or TaskFailed("the download failed"))
            return
        elif replaced:
            self._fail(TaskFailed("the file changed at its origin while it was being read"))
            return
        if self._fd is None:
            if self._open() and not self.ready.called:
                self.ready.callback(self)
            return
        if self._data_waiters and (self.length == 0 or self.available() > 0):
            waiters, self._data_waiters = self._data_waiters, []
            for d in waiters:
                d.callback(None)
        if self._consumer is not None and not self._paused:
            self._pump()

    # -- the producer ----------------------------------------------------------
    def start(self, consumer: IConsumer) -> None:
        """Write to C{consumer} from now on (registers as its streaming producer)."""
        self._consumer = consumer
        consumer.registerProducer(self, True)
        self._pump()

    @property
    def paused(self) -> bool:
        """Whether the consumer asked us to stop writing for now."""
        return self._paused

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._pump()

    def stopProducing(self) -> None:
        """The consumer is gone: stop reading and let go of the task (the download goes on)."""
        if not self._done:
            self._fail(CancelledError("the reader went away"))

    def first_bytes(self) -> Deferred[None]:
        """Fires once the swarm holds the file's first bytes (at once for an empty file);
        never fires if the stream ends before that."""
        d: Deferred[None] = Deferred(lambda d: self._data_waiters.remove(d) if d in self._data_waiters else None)
        if self.length == 0 or self.available() > 0:
            d.callback(None)
        else:
            self._data_waiters.append(d)
        return d

    def available(self) -> int:
        """Bytes that can be read now (the verified prefix)."""
        if self.node.store.get(self.task_id) is self._stored:
            return self.dl.prefix()
        if self._verified and self._fd is not None and self.length is not None:
            return self.length  # a verified file replaced since: ours is still whole
        return 0

    def _pump(self) -> None:
        if self._burst is not None:
            return
        assert self.length is not None and self.end is not None and self._fd is not None
        skipped = 0
        while not self._done and not self._paused:
            if self.position >= self.length:
                self._at_end()
                return
            avail = min(self.available(), self.length)
            if self.position >= avail:
                return  # wait for the next piece
            limit = avail
            if self.position < self.offset:
                limit = min(limit, self.offset)  # chunks never straddle the range's edges
            elif self.position < self.end:
                limit = min(limit, self.end)
            want = min(self.chunk, limit - self.position)
            try:
                data = os.pread(self._fd, want, self.position)
            except OSError as e:
                error = StorageError(f"cannot read the task's data: {e.strerror or e}")
                if e.errno == errno.EIO:
                    self._damaged(error)
                else:
                    self._fail(error)
                return
            if len(data) != want:
                self._damaged(StorageError("the task's data file is shorter than its pieces"))
                return
            start = self.position
            self.position += want
            if self.offset <= start < self.end:
                self._before_held = self._hash.copy()
            self._hash.update(data)
            if self.offset <= start < self.end:
                self._emit(data)
            else:
                skipped += want
                if skipped >= SKIP_BURST:  # reading without writing: let the reactor breathe
                    self._burst = self.node.reactor.callLater(0, self._resume_burst)
                    return

    def _resume_burst(self) -> None:
        self._burst = None
        if not self._done and not self._paused:
            self._pump()

    def _emit(self, data: bytes) -> None:
        """Write the previously held chunk and hold C{data} until the next one (or the end)."""
        held, self._held = self._held, data
        if held is not None and self._consumer is not None:
            self.written += len(held)
            self._consumer.write(held)

    def _at_end(self) -> None:
        """Everything is read: check the digest, wait for the node's verdict, then release."""
        if self.expected_sha256 is not None:
            got = "sha256:" + self._hash.hexdigest()
            if got != self.expected_sha256:
                self._damaged(IntegrityError(f"content has {got}, not the digest {self.expected_sha256}"))
                return
        if not self._verified:
            return  # the node's md5 verdict comes with the download's result
        if self.expected_sha256 is None and self._file_md5 is not None:
            got = self._hash.hexdigest()
            if got != self._file_md5:
                self._damaged(IntegrityError(f"content has md5 {got}, not the verified {self._file_md5}"))
                return
        held, self._held = self._held, None
        if held and self._consumer is not None:
            self.written += len(held)
            self._consumer.write(held)
        self._finish()

    def _damaged(self, error: DflyError) -> None:
        """What was read is wrong: fail, and if it was read from the verified copy the node
        holds, that copy is damaged on disk: the node drops it, so that the client's next
        request downloads the file again rather than meeting the same bytes."""
        stored, verified = self._stored, self._verified
        self._fail(error)
        if verified and stored is not None:
            self.node.drop_damaged(self.task_id, stored, str(error))

    def _finish(self) -> None:
        written = self.written
        self._close()
        self.finished.callback(written)

    def abandon(self, error: BaseException) -> None:
        """Give up on the swarm (it stalled): C{finished} fails with C{error}."""
        self._fail(error)

    def resume_point(self) -> tuple[int, Any] | None:
        """After a failure: (file offset the consumer has every byte up to, sha256 of those
        bytes) for continuing elsewhere; None for a partial range (or before any failure)."""
        return self._resume

    def _fail(self, error: BaseException) -> None:
        if self._done:
            return
        if self.offset == 0 and self.end == self.length:
            # The consumer has every byte before the held chunk (or everything read).
            state = self._before_held if self._held is not None else self._hash
            self._resume = (self.written, state.copy())
        self._held = None
        self._close()
        if not self.ready.called:
            self.ready.errback(Failure(error))  # nobody holds the stream yet: C{finished} never fires
            return
        self.finished.errback(Failure(error))

    def _close(self) -> None:
        if self._done:
            return
        self._done = True
        self._held = None
        self._data_waiters.clear()
        if self._burst is not None and self._burst.active():
            self._burst.cancel()
        self._burst = None
        if self._changed in self.dl.watchers:
            self.dl.watchers.remove(self._changed)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._leased:
            self._leased = False
            self.node.release(self.task_id)
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            # A twisted.web request whose client is gone has no channel left to unregister from.
            if getattr(consumer, "channel", True) is not None:
                consumer.unregisterProducer()
        # The download itself goes on; its result is of no further interest here.
        self._download.addErrback(lambda f: None)
