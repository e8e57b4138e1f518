"""Fetching slices from sources (other peers and the supernode).

Design: one connection per source address, kept while it has work, with
requests pipelined on it; the source answers in order, so the oldest
outstanding request is the one each C{slice} or C{nack} answers.  Slice data
goes straight to the store as it arrives (no piece is held in memory) and the
md5 is checked by the frame parser.  A request whose piece has meanwhile been
given to another source is marked I{stale}: its bytes are dropped and its
outcome ignored.  If nothing arrives for C{stall_timeout} seconds while
requests are outstanding, the connection is aborted and they all fail.

A request made for a relay assignment (the source may still be receiving the
piece) sends C{"relay": true} in its C{get}; nothing else about it differs.

A request may in turn be followed by relay readers (other peers fetching the
piece from us while it arrives, see L{dfly.peer.node}): it then has a
L{GrowingRange}, told of every byte written (one counter update per received
chunk; nothing at all for a request nobody follows).  The range is failed, and
its readers cut off, the moment the request's bytes stop being trustworthy: it
is marked stale (which happens before any other request for that piece exists,
so before anything else is written at its offset), its write fails, or it
finishes with an error.  It completes only once the piece is verified and
held, and a held piece is never written again.

With a download rate limit the pool's connections share one bucket and each is
paused while it is in debt.  Such a pause is our doing, not the source's: the
stall timer and the piece deadline stop while the connection is throttled and
go on, with the time they had left, when it reads again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dfly.errors import BadControlMessage, PieceDigestMismatch, ProtocolError
from dfly.peer.store import StoredTask
from dfly.ratelimit import TokenBucket
from dfly.wire.messages import get_int, get_opt_str, get_task_id
from dfly.wire.protocol import FramedFactory, FramedProtocol, GrowingRange

READ_SIZE = 512 * 1024


class PieceRequest:
    """One piece to fetch from one source."""

    def __init__(
        self,
        task: StoredTask,
        piece: int,
        data_len: int,
        md5: str | None,
        on_result: Callable[[PieceRequest, str | None], None],
        relay: bool = False,
    ) -> None:
        self.task = task
        self.piece = piece
        self.data_len = data_len
        self.md5 = md5
        self.on_result = on_result
        self.relay = relay  # ask the source for a piece it may still be receiving
        self._stale = False
        self.received = 0
        self.finished = False
        self.local_error: str | None = None
        self.digest: str | None = None  # md5 of the slice as received (checked when md5 was known)
        # Set by the node when the slice arrived whole before its md5 was announced: the
        # request stays open (and its relay readers wait) until the node's verdict.
        self.awaiting: Any = None
        self.unchecked = False  # its slice was read with no md5 to check it against
        # The slice arrived whole but with another md5 than the piece's (the report says so,
        # and the supernode may ask the source to check its copy).
        self.mismatch = False
        # Relay readers following this request's bytes (set by the node when one asks).
        self.feed: GrowingRange | None = None

    @property
    def stale(self) -> bool:
        """The piece went to another source (or the task went): drop the bytes, ignore the outcome."""
        return self._stale

    @stale.setter
    def stale(self, value: bool) -> None:
        self._stale = value
        if value:
            # Before anyone writes this piece again, nobody may still be reading these bytes.
            self.cut()

    def cut(self) -> None:
        """Stop every relay reader of this request's bytes."""
        if self.feed is not None:
            self.feed.fail()

    def finish(self, error: str | None) -> None:
        if self.finished:
            return
        self.finished = True
        if error is not None:
            self.cut()
        if not self.stale:
            self.on_result(self, error)
        if self.awaiting is None or self.stale:
            self.settle()

    def settle(self) -> None:
        """The request's outcome is final: its relay readers end with the tail or are cut."""
        feed = self.feed
        if feed is not None and not feed.ended:
            # Readers may send the tail only of bytes that are now held (so never rewritten).
            if not self.stale and self.piece in self.task.have:
                feed.finish()
            else:
                feed.fail()


class FetchSession:
    """Client side of one connection to a source."""

    _log = Logger()

    def __init__(self, wire: FramedProtocol, pool: SourcePool, key: tuple[Any, ...]) -> None:
        self.wire = wire
        self.pool = pool
        self.key = key
        self.sent: deque[PieceRequest] = deque()
        self.current: PieceRequest | None = None
        self.timer: IDelayedCall | None = None
        self.deadline: IDelayedCall | None = None
        self.deadline_req: PieceRequest | None = None
        self.deadline_left: float | None = None  # while throttled: what the deadline had left
        self.throttled_now = False
        self.error: str | None = None

    def connection_made(self) -> None:
        pass

    def request(self, req: PieceRequest) -> None:
        self.sent.append(req)
        msg: dict[str, Any] = {"op": "get", "task": req.task.task_id, "piece": req.piece}
        if req.relay:
            msg["relay"] = True
        self.wire.send_control(msg)
        self._arm()
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        """The oldest request must be done within the stall timeout plus its size at the
        minimum rate: a source that trickles bytes cannot hold a piece forever."""
        head = self.sent[0] if self.sent else None
        if head is self.deadline_req:
            return
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline, self.deadline_req, self.deadline_left = None, head, None
        if head is not None:
            allowed = self.pool.stall_timeout + head.data_len / self.pool.min_rate
            if self.throttled_now:
                self.deadline_left = allowed
            else:
                self.deadline = self.pool.reactor.callLater(allowed, self._too_slow, head, allowed)

    def throttled(self, paused: bool) -> None:
        """Our download limit paused (or resumed) reading: stop (or restart) the clocks."""
        self.throttled_now = paused
        if paused:
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            self.timer = None
            if self.deadline is not None and self.deadline.active():
                self.deadline_left = max(0.0, self.deadline.getTime() - self.pool.reactor.seconds())
                self.deadline.cancel()
            self.deadline = None
            return
        self._arm()
        req, left = self.deadline_req, self.deadline_left
        self.deadline_left = None
        if req is not None and left is not None and self.deadline is None:
            allowed = self.pool.stall_timeout + req.data_len / self.pool.min_rate
            self.deadline = self.pool.reactor.callLater(left, self._too_slow, req, allowed)

    def _too_slow(self, req: PieceRequest, allowed: float) -> None:
        self.deadline = None
        self.error = f"source too slow: piece {req.piece} not done within {allowed:.0f} s"
        self.wire.close(abort=True)

    def _arm(self) -> None:
        """One timer: the stall timeout while requests are out, else the idle timeout."""
        if self.throttled_now:
            return
        delay = self.pool.stall_timeout if self.sent else self.pool.idle_timeout
        if self.timer is None or not self.timer.active():
            self.timer = self.pool.reactor.callLater(delay, self._timed_out)
        else:
            self.timer.reset(delay)

    def _timed_out(self) -> None:
        self.timer = None
        if self.sent:
            self.error = f"source sent nothing for {self.pool.stall_timeout:g} s"
            self.wire.close(abort=True)
        else:
            self.pool.lost(self.key, self)
            self.wire.close()

    def control_received(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op not in ("slice", "nack") or not self.sent:
            raise BadControlMessage(f"unexpected {op!r} from a source")
        req = self.sent[0]
        if get_task_id(msg) != req.task.task_id or get_int(msg, "piece") != req.piece:
            raise BadControlMessage("answer does not match the oldest request")
        self._arm()
        if op == "nack":
            reason = get_opt_str(msg, "reason", 512) or "?"
            self.sent.popleft()
            self._arm_deadline()
            self._one_shot_done()
            req.finish(f"source refused: {reason}")
            return
        self.current = req
        req.unchecked = req.md5 is None  # the parser cannot check it: the node will, later
        self.wire.expect_slice(req.task.piece_size, req.data_len, req.md5)

    def slice_data(self, data: memoryview) -> None:
        req = self.current
        assert req is not None
        received = req.received + len(data)
        if not req.stale and req.local_error is None:
            try:
                req.task.write(req.piece, req.received, data)
            except OSError as e:
                # Our disk, not the source, failed: remember it and keep draining the slice.
                req.local_error = f"cannot write piece {req.piece}: {e.strerror or e}"
                req.cut()
            else:
                if req.feed is not None:
                    req.feed.grew(received)
        req.received = received
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.pool.stall_timeout)

    def slice_finished(self) -> None:
        req = self.sent.popleft()
        self._one_shot_done()
        parser = self.wire.parser
        req.digest = parser.last_md5 if parser is not None else None
        self.current = None
        self._arm()
        self._arm_deadline()
        req.finish(req.local_error)

    def _one_shot_done(self) -> None:
        """A relay's own connection carries one request: once answered, it goes."""
        if len(self.key) > 2:
            self.pool.lost(self.key, self)
            self.wire.close()

    def protocol_error(self, error: ProtocolError) -> None:
        self.error = str(error)
        if isinstance(error, PieceDigestMismatch) and self.current is not None:
            self.current.mismatch = True

    def connection_lost(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None
        self.pool.lost(self.key, self)
        why = self.error or f"connection to source lost: {reason.getErrorMessage()}"
        while self.sent:
            self.sent.popleft().finish(why)


class SourcePool:
    """Connections to sources, one per address, opened on demand."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        stall_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        min_rate: float = 256 * 1024,
        download: TokenBucket | None = None,
        connect: Callable[[str, int, FramedFactory], Deferred[Any]] | None = None,
    ) -> None:
        self.reactor = reactor
        # connect(host, port, factory) -> Deferred firing with the protocol: a TCP connection
        # by default; the in-memory tests give their own.
        self.connect = connect or self._connect_tcp
        self.min_rate = min_rate
        self.download = download
        self.stall_timeout = stall_timeout
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._sessions: dict[tuple[Any, ...], FetchSession] = {}
        self._connecting: dict[tuple[Any, ...], list[PieceRequest]] = {}
        self._attempts: dict[tuple[Any, ...], Deferred[Any]] = {}

    def fetch(self, host: str, port: int, req: PieceRequest) -> None:
        # A relayed piece gets a connection of its own: should its relay's attempt fail, the
        # relay cuts that connection, and nothing else queued to the same host goes with it
        # (those requests would otherwise fail, counted against a source that did no wrong).
        key: tuple[Any, ...] = (host, port) if not req.relay else (host, port, id(req))
        session = self._sessions.get(key)
        if session is not None and session.wire.connected_open:
            session.request(req)
            return
        waiting = self._connecting.get(key)
        if waiting is not None:
            waiting.append(req)
            return
        self._connecting[key] = [req]
        holder: dict[str, FetchSession] = {}

        def make_session(wire: FramedProtocol) -> FetchSession:
            holder["s"] = FetchSession(wire, self, key)
            return holder["s"]

        # Without a download limit, read up to READ_SIZE at a time (with one, a read must stay
        # small next to the bucket's depth).
        read_size = READ_SIZE if self.download is None else None
        d = self.connect(host, port, FramedFactory(make_session, download=self.download, read_size=read_size))
        self._attempts[key] = d

        def connected(_: Any) -> None:
            self._attempts.pop(key, None)
            session = holder["s"]
            self._sessions[key] = session
            for r in self._connecting.pop(key, []):
                session.request(r)

        def failed(f: Failure) -> None:
            self._attempts.pop(key, None)
            for r in self._connecting.pop(key, []):
                r.finish(f"cannot connect to source {host}:{port}: {f.getErrorMessage()}")

        d.addCallbacks(connected, failed)

    def _connect_tcp(self, host: str, port: int, factory: FramedFactory) -> Deferred[Any]:
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        return endpoint.connect(factory)

    def lost(self, key: tuple[Any, ...], session: FetchSession) -> None:
        if self._sessions.get(key) is session:
            del self._sessions[key]

    def close(self) -> None:
        for d in list(self._attempts.values()):
            d.cancel()
        for session in list(self._sessions.values()):
            session.wire.close(abort=True)
