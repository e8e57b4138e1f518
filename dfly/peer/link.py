"""The peer's control connection to a supernode, with failover and backoff.

Supernodes are tried in the order given; a failed attempt or a lost link moves
to the next one after a delay that doubles from C{initial_delay} up to
C{max_delay} (reset once a link is up).  The owner is told when a link comes up
(to say hello and register its tasks again) and goes down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dfly.errors import ProtocolError
from dfly.wire.protocol import FramedFactory, FramedProtocol


class LinkSession:
    """Client side of the control connection; hands every control frame to the owner."""

    def __init__(self, wire: FramedProtocol, link: SupernodeLink) -> None:
        self.wire = wire
        self.link = link

    def connection_made(self) -> None:
        pass

    def control_received(self, msg: dict[str, Any]) -> None:
        self.link.on_control(msg)

    def slice_data(self, data: memoryview) -> None:
        raise ProtocolError("the control connection carries no slices")

    def slice_finished(self) -> None:
        pass

    def protocol_error(self, error: ProtocolError) -> None:
        pass

    def connection_lost(self, reason: Failure) -> None:
        self.link.session_lost(self, reason)


class SupernodeLink:
    """Keeps one control connection to one of several supernodes."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        addresses: list[tuple[str, int]],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
        on_control: Callable[[dict[str, Any]], None],
        initial_delay: float = 0.25,
        max_delay: float = 10.0,
        connect_timeout: float = 5.0,
        keepalive: float = 20.0,
    ) -> None:
        self._keepalive = keepalive
        self._pinger: IDelayedCall | None = None
        if not addresses:
            raise ValueError("at least one supernode address is needed")
        self._reactor = reactor
        self.addresses = addresses
        self._on_up = on_up
        self._on_down = on_down
        self.on_control = on_control
        self._initial = initial_delay
        self._max = max_delay
        self._delay = initial_delay
        self._timeout = connect_timeout
        self._index = 0
        self._running = False
        self._pending: IDelayedCall | None = None
        self._attempt: Any = None
        self.session: LinkSession | None = None
        self.address: tuple[str, int] | None = None
        self.last_error: str | None = None
        self._reported: set[str] = set()  # failures logged since the link was last up

    @property
    def connected(self) -> bool:
        return self.session is not None

    def start(self) -> None:
        self._running = True
        self._connect()

    def stop(self) -> None:
        self._running = False
        if self._pinger is not None and self._pinger.active():
            self._pinger.cancel()
        self._pinger = None
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        if self._attempt is not None:
            self._attempt.cancel()
        if self.session is not None:
            self.session.wire.close()

    def send(self, msg: dict[str, Any]) -> bool:
        if self.session is None:
            return False
        self.session.wire.send_control(msg)
        return True

    def _connect(self) -> None:
        self._pending = None
        if not self._running:
            return
        host, port = self.addresses[self._index % len(self.addresses)]
        holder: list[LinkSession] = []

        def make(wire: FramedProtocol) -> LinkSession:
            holder.append(LinkSession(wire, self))
            return holder[0]

        # The supernode pongs every ping, so three silent keepalive periods mean it is gone.
        factory = FramedFactory(make, idle_timeout=3 * self._keepalive, clock=self._reactor)
        d = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout).connect(factory)
        self._attempt = d

        def up(_: Any) -> None:
            self._attempt = None
            self.session = holder[0]
            self.address = (host, port)
            self._delay = self._initial
            self.last_error = None
            self._reported.clear()
            self._log.info("connected to supernode {host}:{port}", host=host, port=port)
            self._pinger = self._reactor.callLater(self._keepalive, self._ping)
            self._on_up()

        def failed(f: Failure) -> None:
            self._attempt = None
            self.last_error = f"cannot reach supernode {host}:{port}: {f.getErrorMessage()}"
            if self.last_error not in self._reported:  # once per address and reason, not per retry
                self._reported.add(self.last_error)
                self._log.warn("{error}; retrying with backoff", error=self.last_error)
            self._retry()

        d.addCallbacks(up, failed)

    def _ping(self) -> None:
        self._pinger = None
        if self.session is not None:
            self.session.wire.send_control({"op": "ping"})
            self._pinger = self._reactor.callLater(self._keepalive, self._ping)

    def session_lost(self, session: LinkSession, reason: Failure) -> None:
        if session is not self.session:
            return
        if self._pinger is not None and self._pinger.active():
            self._pinger.cancel()
        self._pinger = None
        self.session = None
        self.address = None
        self.last_error = f"lost supernode link: {reason.getErrorMessage()}"
        self._log.warn("{error}", error=self.last_error)
        self._on_down()
        self._retry()

    def _retry(self) -> None:
        if not self._running:
            return
        self._index += 1
        # A full round over every address without success backs off; moving on to the next
        # address after a single failure is immediate.
        delay = self._delay if self._index % len(self.addresses) == 0 else 0.0
        if self._index % len(self.addresses) == 0:
            self._delay = min(self._delay * 2, self._max)
        self._pending = self._reactor.callLater(delay, self._connect)
