"""CONNECT for the peer's HTTP proxy: byte tunnels, and TLS interception ("hijack").

L{ProxySite} is the proxy's C{Site}; its channel, L{ProxyChannel}, hands every request
to the proxy resource except C{CONNECT host:port}, which it takes over when the parser
has read the header block (in C{allContentReceived}, before any C{Request} is
dispatched):

- B{tunnel} (the default): the target is dialled through the site's endpoint factory
  (with a timeout); on success the client gets C{200 Connection established} and the
  bytes are pumped both ways untouched; on failure a C{502} whose body is one line
  saying why.  C{403} for ports that are not allowed (see L{ConnectRules}).
- B{hijack} (targets matching a C{--hijack} rule): C{200} at once, then the client's
  side is wrapped in a TLS server presenting a certificate minted for the host, and the
  decrypted stream is parsed by a fresh L{ProxyChannel} whose requests carry
  C{dfly_origin = "https://host:port"}; they reach the proxy resource like any other
  proxy request, keep-alive included.

Switching a connection away from HTTP parsing.  C{HTTPChannel} is a C{LineReceiver}
that buffers what follows a request (C{_dataBuffer}, C{setRawMode}/C{setLineMode}) and
registers itself as the transport's producer; patching it to relay raw bytes, or calling
C{transport.startTLS} on it and resetting its parser state, would depend on those
internals.  Instead the channel steps aside the way Twisted's own C{startTLS} does: it
unregisters itself as the transport's producer and points C{transport.protocol} at a new
protocol, which from then on receives the connection's bytes and its end.  Bytes the
client sent after the CONNECT header block (a pipelined TLS ClientHello) are those the
parser passes to C{rawDataReceived} once it is in raw mode; they are kept and given to
the new protocol first, and whatever the parser's loop still drains from its buffer after
the switch (a hijack switches at once, inside that loop) is passed on the same way.
While the target is being dialled the client's transport is paused, so that buffer holds
at most one read.  For a hijack the new protocol is a
C{TLSMemoryBIOProtocol} (server side) wrapping a new channel built by the site: a plain,
fully fresh C{HTTPChannel} state machine that knows nothing of the CONNECT before it.
The same hand-over works on any transport with a C{protocol} attribute (TCP, iosim),
which is what the in-memory tests drive.

Flow control in a tunnel: each transport is registered as the streaming producer of the
other (C{client.registerProducer(upstream, True)} and the reverse), so when one side's
send buffer fills, reading from the other stops.  A half-close (FIN) from one side is
passed on as C{loseWriteConnection} to the other; when either side is lost, the other is
closed once its pending bytes are written.  Before a transport is closed its producer
is unregistered: a paused producer would otherwise be resumed instead of the close
happening when the send buffer drains.

Ports: by default CONNECT is allowed to port 443, and to any port of a hijacked host
(its traffic is inspected and verified); C{--connect-ports} lists other ports, or C{any}.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import directlyProvides, implementer

from dfly.errors import DflyError

DEFAULT_CONNECT_PORTS = frozenset({443})
CONNECT_TIMEOUT = 30.0
TUNNEL_IDLE_TIMEOUT = 600.0
MAX_EARLY_BYTES = 256 * 1024
TLS_HANDSHAKE_RECORD = b"\x16"  # the first byte of a TLS ClientHello

_HOST = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]{1,253})):(\d{1,5})$")

log = Logger()


class BadConnectTarget(DflyError):
    """A CONNECT request-target that is not C{host:port}."""


def parse_target(target: bytes) -> tuple[str, int]:
    """C{(host, port)} of a CONNECT authority-form target (C{host:port}, C{[v6]:port})."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise BadConnectTarget("CONNECT target is not ASCII") from None
    m = _HOST.match(text)
    if not m:
        raise BadConnectTarget(f"CONNECT target must be host:port, not {text[:100]!r}")
    host = m.group(1) or m.group(2)
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadConnectTarget(f"bad IPv6 address in CONNECT target {text[:100]!r}") from None
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise BadConnectTarget(f"port out of range in CONNECT target {text[:100]!r}")
    return host, port


def authority(host: str, port: int) -> str:
    """C{host:port}, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class ConnectRules:
    """Which CONNECT targets are hijacked, and which ports may be tunnelled to.

    A hijack rule is a regular expression searched (C{re.search}) in C{host:port} and
    in the bare host; anchor it (C{^registry\\.example:5000$}) to be exact.
    C{ports=None} allows any port.
    """

    hijack: list[re.Pattern[str]] = field(default_factory=list)
    ports: frozenset[int] | None = DEFAULT_CONNECT_PORTS

    @classmethod
    def build(cls, hijack: Iterable[str] = (), ports: Iterable[int] | None = DEFAULT_CONNECT_PORTS) -> ConnectRules:
        return cls([re.compile(r) for r in hijack], None if ports is None else frozenset(ports))

    def hijacks(self, host: str, port: int) -> bool:
        target = authority(host, port)
        return any(r.search(target) or r.search(host) for r in self.hijack)

    def allows(self, host: str, port: int) -> bool:
        return self.ports is None or port in self.ports or self.hijacks(host, port)


class ProxyRequest(Request):
    """A proxy request; C{dfly_origin} is C{"https://host:port"} for requests that came
    through a hijacked CONNECT, else None (the request line names the URL)."""

    dfly_origin: str | None = None


def _origin_request_factory(origin: str) -> Callable[..., ProxyRequest]:
    def make(channel: HTTPChannel, *args: Any, **kwargs: Any) -> ProxyRequest:
        request = ProxyRequest(channel, *args, **kwargs)
        request.dfly_origin = origin
        return request

    directlyProvides(make, INonQueuedRequestFactory)
    return make


def _error_response(code: int, phrase: str, reason: str) -> bytes:
    body = (reason.replace("\r", " ").replace("\n", " ")[:500] + "\n").encode("utf-8", "replace")
    return (
        f"HTTP/1.1 {code} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body


ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class ProxySite(Site):
    """The proxy's site: plain proxy requests go to C{resource}; CONNECT is handled here.

    C{connect_endpoint(host, port)} gives the endpoint a tunnel dials (default: a
    C{HostnameEndpoint} on C{reactor}); C{authority} is the L{CertificateAuthority} that
    mints hijack certificates (hijack rules need one).
    """

    requestFactory = ProxyRequest

    def __init__(
        self,
        resource: IResource,
        reactor: Any,
        rules: ConnectRules | None = None,
        authority: Any = None,
        connect_endpoint: Callable[[str, int], IStreamClientEndpoint] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        tunnel_idle_timeout: float = TUNNEL_IDLE_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, reactor=reactor, **kwargs)
        self.rules = rules or ConnectRules()
        if self.rules.hijack and authority is None:
            raise ValueError("hijack rules need a certificate authority")
        self.authority = authority
        self.connect_timeout = connect_timeout
        self.tunnel_idle_timeout = tunnel_idle_timeout
        self._connect_endpoint = connect_endpoint
        self.tunnels: set[Tunnel] = set()

    @staticmethod
    def protocol() -> ProxyChannel:  # type: ignore[override]
        # Channels are built bare (no HTTP/2 negotiation wrapper): the proxy speaks HTTP/1.1.
        return ProxyChannel()

    def connect_endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        if self._connect_endpoint is not None:
            return self._connect_endpoint(host, port)
        return HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)

    def build_hijacked_channel(self, addr: Any, origin: str) -> ProxyChannel:
        """A fresh channel for the decrypted stream of a hijacked CONNECT to C{origin}."""
        channel = self.buildProtocol(addr)
        assert isinstance(channel, ProxyChannel)
        channel.requestFactory = _origin_request_factory(origin)  # type: ignore[assignment]
        channel.tunnel_origin = origin
        return channel


class ProxyChannel(HTTPChannel):
    """An C{HTTPChannel} that takes C{CONNECT} requests out of HTTP (see the module doc)."""

    site: ProxySite
    transport: Any
    tunnel_origin: str | None = None
    _connecting: Deferred[Any] | None = None
    _early: list[bytes] | None = None
    _handed_to: Any = None
    _refused = False
    _first_bytes = True
    _not_http = False

    def dataReceived(self, data: bytes) -> None:
        if self._not_http:
            return  # answered and closing: what follows is dropped
        if self._first_bytes and data:
            self._first_bytes = False
            if self.tunnel_origin is None and data.startswith(TLS_HANDSHAKE_RECORD):
                # A TLS client on this plain-HTTP port (skopeo, podman and CRI-O try https://
                # first on an insecure mirror): answer in plain text and close now, so the
                # client moves on to http:// instead of waiting out its handshake timeout.
                log.info("TLS handshake on the plain-HTTP proxy port from {peer}", peer=self.transport.getPeer())
                self._not_http = True
                self.setTimeout(None)
                reason = "this is a plain-HTTP proxy and registry mirror: use http://, not https://"
                self.transport.write(_error_response(400, "Bad Request", reason))
                self.transport.loseConnection()
                return
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        if self._command != b"CONNECT":
            return super().allContentReceived()
        target = self._path
        # This connection will not parse HTTP again: drop the request object made for the
        # CONNECT, stop the HTTP idle timer, and collect what the client sends next.
        self.requests.pop()
        self.setTimeout(None)
        self.setRawMode()
        self._early = []
        self._connect(target)

    def rawDataReceived(self, data: bytes) -> None:
        if self._handed_to is not None:
            # The parser's loop is still draining its buffer after a hand-over made
            # within it (a hijack is answered at once): the rest belongs to the new owner.
            self._handed_to.dataReceived(data)
            return
        if self._refused:
            return  # the answer is out and the connection closing: what follows is dropped
        if self._early is None:
            return super().rawDataReceived(data)
        self._early.append(data)
        if sum(map(len, self._early)) > MAX_EARLY_BYTES:
            self._refuse(400, "Bad Request", "too many bytes before the tunnel was established")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        super().connectionLost(reason)

    def _refuse(self, code: int, phrase: str, reason: str) -> None:
        log.info("CONNECT refused ({code}): {reason}", code=code, reason=reason)
        self._refused = True
        self._early = None
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        self.transport.write(_error_response(code, phrase, reason))
        self.transport.loseConnection()

    def _connect(self, target: bytes) -> None:
        if self.tunnel_origin is not None:
            return self._refuse(400, "Bad Request", "CONNECT inside a hijacked tunnel")
        try:
            host, port = parse_target(target)
        except BadConnectTarget as e:
            return self._refuse(400, "Bad Request", str(e))
        site = self.site
        if not site.rules.allows(host, port):
            return self._refuse(403, "Forbidden", f"CONNECT to port {port} is not allowed")
        if site.rules.hijacks(host, port):
            return self._hijack(host, port)
        # Hold the client still while the target is dialled: what it already sent is kept.
        self.transport.pauseProducing()
        upstream = TunnelEnd("upstream")
        try:
            endpoint = site.connect_endpoint(host, port)
            d = connectProtocol(endpoint, upstream)
        except Exception as e:  # a bad endpoint description is the target's fault, not ours
            return self._refuse(502, "Bad Gateway", f"cannot connect to {authority(host, port)}: {e}")
        d.addTimeout(site.connect_timeout, site.reactor)
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed, callbackArgs=(host, port), errbackArgs=(host, port))

    def _connected(self, upstream: TunnelEnd, host: str, port: int) -> None:
        if self._connecting is None:  # refused or gone meanwhile
            upstream.transport.loseConnection()
            return
        self._connecting = None
        client = TunnelEnd("client")
        tunnel = Tunnel(self.site, client, upstream, authority(host, port))
        self.transport.write(ESTABLISHED)
        early = b"".join(self._early or [])
        self._early = None
        self._hand_over(client, early)
        tunnel.start()

    def _connect_failed(self, failure: Failure, host: str, port: int) -> None:
        if self._connecting is None:  # the client went away and we cancelled
            return
        self._connecting = None
        if failure.check(TimeoutError, CancelledError, ConnectingCancelledError):
            why = f"timed out after {self.site.connect_timeout:g} s"
        else:
            why = failure.getErrorMessage()
        self._refuse(502, "Bad Gateway", f"cannot connect to {authority(host, port)}: {why}")

    def _hijack(self, host: str, port: int) -> None:
        site = self.site
        origin = "https://" + authority(host, port)
        try:
            options = site.authority.server_options(host)
        except Exception as e:
            log.failure("cannot mint a certificate for {host}", host=host)
            return self._refuse(502, "Bad Gateway", f"cannot make a certificate for {host}: {e}")
        inner = site.build_hijacked_channel(self.transport.getPeer(), origin)
        tls_factory = TLSMemoryBIOFactory(options, False, site, clock=site.reactor)
        tls = tls_factory.protocol(tls_factory, inner)
        log.info("hijacking CONNECT to {origin}", origin=origin)
        self.transport.write(ESTABLISHED)
        early = b"".join(self._early or [])
        self._early = None
        self._hand_over(tls, early)

    def _hand_over(self, protocol: Any, early: bytes) -> None:
        """Give this connection to C{protocol}, starting with the bytes C{early}."""
        transport = self.transport
        _unregister(transport)
        transport.protocol = self._handed_to = protocol
        protocol.makeConnection(transport)
        if early:
            protocol.dataReceived(early)
        transport.resumeProducing()


def _unregister(transport: Any) -> None:
    """Unregister C{transport}'s producer, if it has one (some transports raise otherwise)."""
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()


@implementer(IHalfCloseableProtocol)
class TunnelEnd(Protocol):
    """One connection of a tunnel; bytes it receives go out through the other end."""

    transport: Any

    def __init__(self, name: str) -> None:
        self.name = name
        self.tunnel: Tunnel | None = None
        self.held: list[bytes] = []
        self.received = 0
        self.read_closed = False
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.tunnel is None:
            self.held.append(data)  # the upstream spoke before the tunnel was linked
        else:
            self.tunnel.forward(self, data)

    def readConnectionLost(self) -> None:
        self.read_closed = True
        if self.tunnel is not None:
            self.tunnel.half_closed(self)

    def writeConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.check_done()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = True
        if self.tunnel is not None:
            self.tunnel.end_lost(self, reason)


class Tunnel:
    """Two connections pumping bytes into each other, each the other's producer."""

    def __init__(self, site: ProxySite, client: TunnelEnd, upstream: TunnelEnd, target: str) -> None:
        self.site = site
        self.client = client
        self.upstream = upstream
        self.target = target
        self.started = site.reactor.seconds()
        self._last = self.started
        self._idle: IDelayedCall | None = None
        self.closed = False

    def other(self, end: TunnelEnd) -> TunnelEnd:
        return self.upstream if end is self.client else self.client

    def start(self) -> None:
        client, upstream = self.client, self.upstream
        client.tunnel = upstream.tunnel = self
        self.site.tunnels.add(self)
        client.transport.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(client.transport, True)
        log.info("tunnel to {target} open", target=self.target)
        if self.site.tunnel_idle_timeout:
            self._idle = self.site.reactor.callLater(self.site.tunnel_idle_timeout, self._check_idle)
        for end in (upstream, client):
            held, end.held = end.held, []
            for data in held:
                self.forward(end, data)
        for end in (upstream, client):
            if end.lost:
                self.end_lost(end, Failure(ConnectionDone()))
                return
        for end in (upstream, client):
            if end.read_closed:
                self.half_closed(end)

    def forward(self, source: TunnelEnd, data: bytes) -> None:
        self._last = self.site.reactor.seconds()
        self.other(source).transport.write(data)

    def half_closed(self, source: TunnelEnd) -> None:
        """C{source}'s peer sent FIN: finish the other direction's writes, then send FIN on."""
        dest = self.other(source)
        if dest.lost:
            return
        _unregister(dest.transport)  # nothing more will come from source
        if hasattr(dest.transport, "loseWriteConnection"):
            dest.transport.loseWriteConnection()
        else:
            dest.transport.loseConnection()
        self.check_done()

    def check_done(self) -> None:
        if self.client.read_closed and self.upstream.read_closed:
            self.close("both sides finished")

    def end_lost(self, end: TunnelEnd, reason: Failure) -> None:
        other = self.other(end)
        if not other.lost:
            _unregister(other.transport)
            other.transport.loseConnection()
        if self.client.lost and self.upstream.lost:
            self._finish()

    def close(self, why: str) -> None:
        for end in (self.client, self.upstream):
            if not end.lost:
                _unregister(end.transport)
                end.transport.loseConnection()
        if not self.closed:
            log.debug("closing tunnel to {target}: {why}", target=self.target, why=why)

    def _check_idle(self) -> None:
        self._idle = None
        timeout = self.site.tunnel_idle_timeout
        quiet = self.site.reactor.seconds() - self._last
        if quiet >= timeout:
            log.info("tunnel to {target} idle for {quiet:.0f} s; closing", target=self.target, quiet=quiet)
            self.close("idle")
        elif not self.closed:
            self._idle = self.site.reactor.callLater(timeout - quiet, self._check_idle)

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self.site.tunnels.discard(self)
        log.info(
            "tunnel to {target} closed: {up} bytes up, {down} bytes down in {seconds:.1f} s",
            target=self.target,
            up=self.client.received,
            down=self.upstream.received,
            seconds=self.site.reactor.seconds() - self.started,
        )
