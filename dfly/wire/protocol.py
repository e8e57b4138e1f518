"""The protocol adapter and the outbound slice producer.

Design: L{FramedProtocol} is a thin adapter.  Inbound bytes go to a
L{FrameParser} whose handler is a I{session} object holding all the logic
(supernode control, slice server, downloader, local API); a protocol error
closes the connection with a logged reason and the daemon carries on.

Outbound, a connection sends one unit at a time, in order: control frames are
written at once unless a slice is being streamed, in which case they wait
behind it.  A slice is streamed from a file by L{FileRangeProducer}, an
C{IPullProducer} registered on the transport, so at most one read chunk per
connection sits in memory and a slow receiver slows the reads (backpressure).

With an C{idle_timeout}, a connection that neither sends anything nor takes
any of what it is sent for that long is closed (slow-loris, dead peers);
long-lived control connections stay up with pings.

A slice may also be relayed while it is still arriving: its L{SliceSource}
then carries a L{GrowingRange}, the writer's side of that piece (bytes written
so far, done, failed).  The producer reads only bytes the writer has counted,
sends the tail only once the writer says the whole slice is verified, and when
it has caught up it writes nothing and waits in the range (a pull producer the
transport would not resume by itself: the writer's next L{GrowingRange.grew}
does).  A failed range wakes its readers, and every read checks the flag first,
so nothing is read once the writer gave the bytes up; whoever queued the slice
also hears of the failure (L{GrowingRange.attach}) and aborts the connection.
Aborting a connection stops its producer at once, not when the transport gets
round to it.

Rate limits (L{dfly.ratelimit}): with an C{upload} bucket the slice producer
takes tokens before each read and, when it gets none, waits in the bucket's
queue instead of writing (the transport then stops asking it for more until
the bucket's timer resumes it).  With a C{download} bucket every received byte
is debited and the transport is paused while the bucket is in debt; the
session hears of it (C{throttled}) so that its stall timers can stop counting.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IConsumer, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dfly.errors import ProtocolError
from dfly.ratelimit import InboundThrottle, TokenBucket, Wait
from dfly.wire.framing import MAX_CONTROL, FrameParser, encode_control

CHUNK = 256 * 1024
_CONNECTION_DONE = Failure(ConnectionError("connection closed"))


class Session(TypingProtocol):
    """What a L{FramedProtocol} drives; one per connection."""

    def connection_made(self) -> None: ...

    def control_received(self, msg: dict[str, Any]) -> None: ...

    def slice_data(self, data: memoryview) -> None: ...

    def slice_finished(self) -> None: ...

    def protocol_error(self, error: ProtocolError) -> None: ...

    def connection_lost(self, reason: Failure) -> None: ...


class GrowingRange:
    """The writer's side of a byte range that is still being filled in, for readers that follow it.

    The writer calls L{grew} with the bytes written so far (from the start of the range, in
    order), then L{finish} once they are complete and verified, or L{fail} when they are given
    up; the owner of the file may also fail a complete range when the file goes away.  A
    reader that has caught up registers a callable with L{wait}; each is called once, at the
    next change.  L{attach} registers a callable that L{fail} calls, for whoever must cut a
    reader off (abort its connection) at once.
    """

    _log = Logger()

    def __init__(self) -> None:
        self.available = 0
        self.complete = False
        self.failed = False
        self._waiting: list[Callable[[], None]] = []
        self._cuts: list[Callable[[], None]] = []

    @property
    def ended(self) -> bool:
        return self.complete or self.failed

    def grew(self, available: int) -> None:
        """The first C{available} bytes are written (the hot path: keep it this small)."""
        self.available = available
        if self._waiting:
            self._wake()

    def finish(self) -> None:
        """Every byte is written and verified: readers may read to the end and send the tail."""
        if self.ended:
            return
        self.complete = True
        self._wake()

    def fail(self) -> None:
        """The bytes are given up (they may be rewritten, or their file closed): cut every
        reader off now."""
        if self.failed:
            return
        self.failed = True
        cuts, self._cuts = self._cuts, []
        for cut in cuts:
            self._call(cut)
        self._wake()

    def wait(self, wake: Callable[[], None]) -> None:
        """Call C{wake} once, at the next L{grew}, L{finish} or L{fail}."""
        if self.ended:
            self._call(wake)
        else:
            self._waiting.append(wake)

    def unwait(self, wake: Callable[[], None]) -> None:
        if wake in self._waiting:
            self._waiting.remove(wake)

    def attach(self, cut: Callable[[], None]) -> None:
        """Call C{cut} if the range fails (at once if it already has)."""
        if self.failed:
            self._call(cut)
        else:
            self._cuts.append(cut)

    def detach(self, cut: Callable[[], None]) -> None:
        if cut in self._cuts:
            self._cuts.remove(cut)

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for wake in waiting:
            self._call(wake)

    def _call(self, fn: Callable[[], None]) -> None:
        # A reader's trouble must never reach the writer (a download's receive path).
        try:
            fn()
        except Exception:
            self._log.failure("relay reader failed")


class SliceSource:
    """Bytes of one slice on disk: C{prefix}, then C{length} bytes of C{fd} from C{offset}, then C{suffix}.

    With C{growing}, the C{length} bytes are still being written: only the first
    C{growing.available} may be read, and the suffix goes out once C{growing.complete}.
    """

    def __init__(
        self,
        fd: int,
        offset: int,
        length: int,
        prefix: bytes = b"",
        suffix: bytes = b"",
        on_done: Callable[[bool, int], None] | None = None,
        growing: GrowingRange | None = None,
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self.prefix = prefix
        self.suffix = suffix
        self.on_done = on_done
        self.growing = growing

    @property
    def total(self) -> int:
        return len(self.prefix) + self.length + len(self.suffix)


@implementer(IPullProducer)
class FileRangeProducer:
    """Writes one L{SliceSource} to a consumer, a chunk per C{resumeProducing}."""

    def __init__(
        self,
        consumer: IConsumer,
        source: SliceSource,
        finished: Callable[[bool], None],
        touch: Callable[[], None] | None = None,
        bucket: TokenBucket | None = None,
    ) -> None:
        self._touch = touch
        self._bucket = bucket
        self._wait: Wait | None = None
        self._consumer = consumer
        self._source = source
        self._pos = 0
        self._sent = 0
        self._finished = finished
        self._done = False
        self._following = False  # caught up with a growing source, waiting for its writer

    def start(self) -> None:
        if self._source.prefix:
            self._consumer.write(self._source.prefix)
            self._sent += len(self._source.prefix)
        self._consumer.registerProducer(self, False)

    def resumeProducing(self) -> None:
        """IPullProducer API: send the next chunk, or finish."""
        if self._done or self._wait is not None or self._following:
            return
        src = self._source
        end = src.length
        growing = src.growing
        if growing is not None:
            if growing.failed:
                self._finish(False)
                return
            if not growing.complete:
                end = min(end, growing.available)
        left = end - self._pos
        if left > 0:
            want = min(CHUNK, left)
            if self._bucket is not None:
                least = min(want, self._bucket.quantum)
                want = self._bucket.take(want, least)
                if not want:
                    # Write nothing now: the bucket's timer resumes us when our turn comes.
                    self._wait = self._bucket.wait(self._woken, least)
                    return
            try:
                chunk = os.pread(src.fd, want, src.offset + self._pos)
            except OSError:
                chunk = b""
            if not chunk:
                # The file shrank under us: the receiver's length and md5 checks catch it;
                # stop here and let the caller close the connection.
                self._finish(False)
                return
            self._pos += len(chunk)
            self._sent += len(chunk)
            self._consumer.write(chunk)
            if self._touch is not None:
                self._touch()
            if self._pos < src.length or (growing is not None and not growing.complete):
                return
        elif growing is not None and not growing.complete:
            # Caught up with the writer: write nothing; its next change resumes us.
            self._following = True
            growing.wait(self._grown)
            return
        if src.suffix:
            self._consumer.write(src.suffix)
            self._sent += len(src.suffix)
        self._finish(True)

    def _woken(self) -> None:
        self._wait = None
        self.resumeProducing()

    def _grown(self) -> None:
        self._following = False
        self.resumeProducing()

    def stopProducing(self) -> None:
        """IProducer API: the connection went away."""
        self._finish(False)

    def _finish(self, ok: bool) -> None:
        if self._done:
            return
        self._done = True
        if self._wait is not None:
            self._wait.cancel()
            self._wait = None
        if self._following:
            self._following = False
            assert self._source.growing is not None
            self._source.growing.unwait(self._grown)
        self._consumer.unregisterProducer()
        if self._source.on_done is not None:
            self._source.on_done(ok, self._sent)
        self._finished(ok)


class FramedProtocol(Protocol):
    """Adapter between a transport and a L{Session}."""

    _log = Logger()

    def __init__(
        self,
        make_session: Callable[[FramedProtocol], Session],
        max_control: int = MAX_CONTROL,
        idle_timeout: float | None = None,
        clock: Any = None,
        upload: TokenBucket | None = None,
        download: TokenBucket | None = None,
        read_size: int | None = None,
    ) -> None:
        self._make_session = make_session
        self._max_control = max_control
        self._read_size = read_size
        self._idle_timeout = idle_timeout
        self._clock = clock
        self._upload = upload
        self._download = download
        self._throttle: InboundThrottle | None = None
        self._idle: Any = None
        self._queue: deque[tuple[bytes, SliceSource | None]] = deque()
        self._busy = False
        self._producer: FileRangeProducer | None = None
        self._closed = False
        self.session: Session | None = None
        self.parser: FrameParser | None = None

    # -- twisted Protocol API
    def connectionMade(self) -> None:
        if self._idle_timeout is not None and self._clock is not None:
            self._idle = self._clock.callLater(self._idle_timeout, self._idled)
        if self._read_size is not None and hasattr(self.transport, "bufferSize"):
            # Fewer, larger socket reads: less per-call work on bulk downloads.
            self.transport.bufferSize = self._read_size  # type: ignore[union-attr]
        session = self._make_session(self)
        self.session = session
        self.parser = FrameParser(session, self._max_control)
        if self._download is not None:
            self._throttle = InboundThrottle(
                self._download, self.transport, lambda: self._throttled(True), lambda: self._throttled(False)
            )
        session.connection_made()

    def _throttled(self, paused: bool) -> None:
        """Reading stopped (or started again) because of our own download limit."""
        hook = getattr(self.session, "throttled", None)
        if hook is not None:
            hook(paused)

    def touch(self) -> None:
        """The other side showed it is alive (it sent or took bytes)."""
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)

    def _idled(self) -> None:
        self._idle = None
        self._log.info("closing idle connection from {peer}", peer=self.peer_label)
        self.close(abort=True)

    def dataReceived(self, data: bytes) -> None:
        assert self.parser is not None and self.session is not None
        self.touch()
        try:
            self.parser.feed(data)
        except ProtocolError as e:
            self._log.warn("closing connection from {peer}: {reason}", peer=self.peer_label, reason=str(e))
            self.session.protocol_error(e)
            self.close(abort=True)
            return
        if self._throttle is not None:
            self._throttle.received(len(data))

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._closed = True
        if self._throttle is not None:
            self._throttle.close()
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self._producer is not None:
            self._producer.stopProducing()
        for _, src in self._queue:
            if src is not None and src.on_done is not None:
                src.on_done(False, 0)
        self._queue.clear()
        if self.session is not None:
            self.session.connection_lost(reason)

    # -- for sessions
    @property
    def peer_label(self) -> str:
        try:
            addr: Any = self.transport.getPeer()  # type: ignore[union-attr]
            return f"{addr.host}:{addr.port}"
        except Exception:
            return "?"

    @property
    def peer_host(self) -> str:
        try:
            addr: Any = self.transport.getPeer()  # type: ignore[union-attr]
            return str(addr.host)
        except Exception:
            return ""

    @property
    def connected_open(self) -> bool:
        return not self._closed

    def buffered(self) -> int:
        """Bytes written but not yet sent (best effort: what a TCP transport holds)."""
        t: Any = self.transport
        try:
            return len(t.dataBuffer) - t.offset + t._tempDataLen
        except (AttributeError, TypeError):
            return 0

    def expect_slice(self, piece_size: int, data_len: int, md5_hex: str | None) -> None:
        assert self.parser is not None
        self.parser.expect_slice(piece_size, data_len, md5_hex)

    def send_control(self, msg: dict[str, Any]) -> None:
        """Queue one control frame behind whatever is being sent."""
        self._enqueue(encode_control(msg, self._max_control), None)

    def send_slice(self, msg: dict[str, Any], source: SliceSource) -> None:
        """Queue a control frame announcing a slice, then the slice itself."""
        self._enqueue(encode_control(msg, self._max_control), source)

    def close(self, abort: bool = False) -> None:
        if self._closed or self.transport is None:
            return
        self._closed = True
        if abort:
            # Nothing more of this connection's slice is read, from now on.
            if self._producer is not None:
                self._producer.stopProducing()
            self.transport.abortConnection()  # type: ignore[attr-defined]
        else:
            self.transport.loseConnection()

    def _enqueue(self, frame: bytes, source: SliceSource | None) -> None:
        if self._closed:
            if source is not None and source.on_done is not None:
                source.on_done(False, 0)
            return
        self._queue.append((frame, source))
        if not self._busy:
            self._pump()

    def _pump(self) -> None:
        assert self.transport is not None
        while self._queue and not self._closed:
            frame, source = self._queue.popleft()
            self.transport.write(frame)
            if source is not None:
                self._busy = True
                self._producer = FileRangeProducer(
                    self.transport, source, self._slice_sent, self.touch, self._upload  # type: ignore[arg-type]
                )
                self._producer.start()
                return
        self._busy = False

    def _slice_sent(self, ok: bool) -> None:
        self._busy = False
        self._producer = None
        if not ok:
            self.close(abort=True)
            return
        self._pump()


class FramedFactory(Factory):
    """Builds L{FramedProtocol}s whose sessions come from C{make_session}."""

    noisy = False

    def __init__(
        self,
        make_session: Callable[[FramedProtocol], Session],
        idle_timeout: float | None = None,
        clock: Any = None,
        upload: TokenBucket | None = None,
        download: TokenBucket | None = None,
        read_size: int | None = None,
    ) -> None:
        self._make_session = make_session
        self._idle_timeout = idle_timeout
        self._clock = clock
        self.upload = upload
        self.download = download
        self.read_size = read_size

    def buildProtocol(self, addr: Any) -> FramedProtocol:
        proto = FramedProtocol(
            self._make_session, idle_timeout=self._idle_timeout, clock=self._clock,
            upload=self.upload, download=self.download, read_size=self.read_size,
        )
        proto.factory = self
        return proto
