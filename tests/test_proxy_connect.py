"""CONNECT handling of the proxy site, in memory: parsing (byte by byte), tunnels over
MemoryReactorClock connections, refusals, flow-control wiring, and a real TLS hijack driven
by an OpenSSL memory-BIO client.

Flow control is only wired here (each transport the other's producer); that it really bounds
memory is shown by the loopback test with a slow reader.
"""

from __future__ import annotations

from typing import Any

import pytest
from OpenSSL import SSL, crypto
from service_identity.pyopenssl import verify_hostname
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from dfly.proxy.ca import CertificateAuthority, generate_ca
from dfly.proxy.connect import (
    ESTABLISHED,
    BadConnectTarget,
    ConnectRules,
    ProxyChannel,
    ProxySite,
    parse_target,
)

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)


class Echo(Resource):
    """A stand-in for the proxy resource: answers with what it was asked and from where."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str | None, bytes, bytes]] = []

    def render(self, request: Request) -> bytes:
        origin = getattr(request, "dfly_origin", None)
        self.seen.append((origin, request.method, request.uri))
        body = f"{origin} {request.method.decode()} {request.uri.decode()}".encode()
        request.setHeader(b"content-type", b"text/plain")
        return body


class HalfCloseTransport(StringTransport):
    """A StringTransport that records a half-close."""

    write_closed = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Harness:
    """A proxy site on a MemoryReactorClock whose tunnels dial through the reactor."""

    def __init__(self, hijack: list[str] | None = None, ports: tuple[int, ...] | None = (443,), **kwargs: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.resource = Echo()
        self.ca_cert, ca_key = generate_ca()
        self.authority = CertificateAuthority(self.ca_cert, ca_key)
        rules = ConnectRules.build(hijack or [], ports)
        self.site = ProxySite(
            self.resource,
            self.reactor,
            rules,
            authority=self.authority,
            connect_endpoint=lambda host, port: TCP4ClientEndpoint(self.reactor, host, port),
            **kwargs,
        )
        self.channel = self.site.buildProtocol(CLIENT)
        assert isinstance(self.channel, ProxyChannel)
        self.client = HalfCloseTransport(peerAddress=CLIENT)
        self.channel.makeConnection(self.client)

    def feed(self, data: bytes) -> None:
        """Bytes from the client, to whichever protocol the connection belongs to now."""
        getattr(self.client, "protocol", self.channel).dataReceived(data)

    def dialled(self) -> tuple[str, int]:
        host, port, *_ = self.reactor.tcpClients[-1]
        return host, port

    def accept_upstream(self) -> tuple[Any, HalfCloseTransport]:
        """Complete the pending dial: the upstream protocol on a fresh transport."""
        factory = self.reactor.tcpClients[-1][2]
        proto = factory.buildProtocol(None)
        transport = HalfCloseTransport()
        proto.makeConnection(transport)
        return proto, transport

    def refuse_upstream(self, why: Exception) -> None:
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(why))


def test_parse_target() -> None:
    """Authority-form targets parse; anything else is a BadConnectTarget."""
    assert parse_target(b"registry.example:443") == ("registry.example", 443)
    assert parse_target(b"[::1]:8443") == ("::1", 8443)
    assert parse_target(b"127.0.0.1:5000") == ("127.0.0.1", 5000)
    for bad in [b"registry.example", b":443", b"host:0", b"host:70000", b"[zz]:1", b"a b:1", b"http://x:1/", b"h\xff:1"]:
        with pytest.raises(BadConnectTarget):
            parse_target(bad)


def test_rules() -> None:
    """Hijack rules are searched in host:port and host; hijacked hosts may use any port;
    other hosts only the allowed ports (443 by default, or any with ports=None)."""
    rules = ConnectRules.build([r"^registry\.example$", r":5000$"])
    assert rules.hijacks("registry.example", 8443)
    assert rules.hijacks("other.example", 5000)
    assert not rules.hijacks("registry.example.evil", 443)
    assert rules.allows("registry.example", 8443)
    assert rules.allows("anything.example", 443)
    assert not rules.allows("anything.example", 22)
    assert ConnectRules.build([], None).allows("anything.example", 22)


def test_connect_byte_by_byte_keeps_pipelined_bytes() -> None:
    """A CONNECT request fed one byte at a time, followed in the same stream by the start of
    a TLS ClientHello: the target is dialled, the client is paused meanwhile, it gets the 200,
    and the upstream receives the pipelined bytes first and unchanged, then everything else."""
    h = Harness(ports=(8443,))
    stream = b"CONNECT origin.example:8443 HTTP/1.1\r\nHost: origin.example:8443\r\nUser-Agent: t\r\n\r\n"
    early = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256))
    for i in range(len(stream + early)):
        h.feed((stream + early)[i : i + 1])
    assert h.dialled() == ("origin.example", 8443)
    assert h.client.producerState == "paused"
    assert h.client.value() == b""
    _, upstream = h.accept_upstream()
    assert h.client.value() == ESTABLISHED
    assert upstream.value() == early
    assert h.client.producerState == "producing"
    h.feed(b"more from the client")
    assert upstream.value() == early + b"more from the client"
    assert type(h.client.protocol).__name__ == "TunnelEnd"  # the connection now belongs to the tunnel
    assert len(h.site.tunnels) == 1
    tunnel = next(iter(h.site.tunnels))
    tunnel.upstream.dataReceived(b"answer from the origin")
    assert h.client.value() == ESTABLISHED + b"answer from the origin"
    assert not h.resource.seen


def test_connect_failure_is_502_with_reason() -> None:
    """A refused dial answers 502 with a one-line reason naming the target, and closes."""
    h = Harness()
    h.feed(b"CONNECT down.example:443 HTTP/1.1\r\n\r\n")
    h.refuse_upstream(ConnectionRefusedError("nobody listens"))
    head, _, body = h.client.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway")
    assert body.count(b"\n") == 1 and b"down.example:443" in body and b"refused" in body.lower()
    assert h.client.disconnecting


def test_connect_timeout_is_502() -> None:
    """A dial that does not finish within the connect timeout answers 502 'timed out'."""
    h = Harness(connect_timeout=7.0)
    h.feed(b"CONNECT slow.example:443 HTTP/1.1\r\n\r\n")
    h.reactor.advance(6.9)
    assert h.client.value() == b""
    h.reactor.advance(0.2)
    assert h.client.value().startswith(b"HTTP/1.1 502")
    assert b"timed out after 7 s" in h.client.value()
    assert h.reactor.connectors[-1].stoppedConnecting


def test_client_leaving_cancels_the_dial() -> None:
    """A client that disconnects while the target is being dialled stops the dial."""
    h = Harness()
    h.feed(b"CONNECT slow.example:443 HTTP/1.1\r\n\r\n")
    h.channel.connectionLost(Failure(ConnectionDone()))
    assert h.reactor.connectors[-1].stoppedConnecting
    assert h.client.value() == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"CONNECT ssh.example:22 HTTP/1.1\r\n\r\n", b"403"),
        (b"CONNECT no-port.example HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT [nonsense]:443 HTTP/1.1\r\n\r\n", b"400"),
    ],
)
def test_refused_targets(request_bytes: bytes, status: bytes) -> None:
    """Ports not allowed give 403, malformed targets 400; nothing is dialled."""
    h = Harness()
    h.feed(request_bytes)
    assert h.client.value().startswith(b"HTTP/1.1 " + status)
    assert h.client.disconnecting
    assert not h.reactor.tcpClients


def test_garbage_after_refusal_is_ignored() -> None:
    """A refused client that keeps sending does not get its bytes parsed as requests."""
    h = Harness()
    h.feed(b"CONNECT ssh.example:22 HTTP/1.1\r\n\r\nGET http://x/ HTTP/1.1\r\n\r\n")
    h.feed(b"GET http://x/ HTTP/1.1\r\n\r\n")
    assert not h.resource.seen
    assert h.client.value().count(b"HTTP/1.1") == 1


def test_plain_proxy_requests_reach_the_resource() -> None:
    """Requests other than CONNECT go to the resource, keep-alive, with no dfly_origin."""
    h = Harness()
    h.feed(b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\nGET http://a.example/y HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert h.resource.seen == [(None, b"GET", b"http://a.example/x"), (None, b"GET", b"http://a.example/y")]
    assert h.client.value().count(b"HTTP/1.1 200") == 2


def _tunnel(h: Harness) -> tuple[Any, HalfCloseTransport]:
    h.feed(b"CONNECT origin.example:443 HTTP/1.1\r\n\r\n")
    return h.accept_upstream()


def test_each_side_is_the_other_sides_producer() -> None:
    """In a tunnel, the client transport's producer is the upstream transport and vice versa,
    so a full send buffer on one side (the transport pausing its producer) stops reading on
    the other, and resuming resumes it."""
    h = Harness()
    _, upstream = _tunnel(h)
    assert h.client.producer is upstream and h.client.streaming
    assert upstream.producer is h.client and upstream.streaming
    h.client.producer.pauseProducing()  # the client's send buffer is full
    assert upstream.producerState == "paused"
    h.client.producer.resumeProducing()
    assert upstream.producerState == "producing"
    upstream.producer.pauseProducing()  # the upstream's send buffer is full
    assert h.client.producerState == "paused"


def test_half_close_is_passed_on() -> None:
    """A FIN from the client becomes a write-close toward the upstream (the answer can still
    flow back); when the upstream finishes too, both connections are closed."""
    h = Harness()
    _, upstream = _tunnel(h)
    tunnel = next(iter(h.site.tunnels))
    h.client.protocol.readConnectionLost()
    assert upstream.write_closed and not upstream.disconnecting
    tunnel.upstream.dataReceived(b"late answer")
    assert h.client.value().endswith(b"late answer")
    tunnel.upstream.readConnectionLost()
    assert h.client.write_closed
    assert h.client.disconnecting and upstream.disconnecting


def test_either_side_lost_closes_the_other() -> None:
    """When the upstream goes away, the client connection is closed (after its pending
    bytes), and the tunnel is forgotten once both are gone."""
    h = Harness()
    _, upstream = _tunnel(h)
    tunnel = next(iter(h.site.tunnels))
    tunnel.upstream.connectionLost(Failure(ConnectionDone()))
    assert h.client.disconnecting and h.client.producer is None
    h.client.protocol.connectionLost(Failure(ConnectionDone()))
    assert not h.site.tunnels


def test_idle_tunnel_is_closed() -> None:
    """A tunnel with no bytes either way for the idle timeout is closed; traffic defers it."""
    h = Harness(tunnel_idle_timeout=100.0)
    _, upstream = _tunnel(h)
    h.reactor.advance(60)
    h.feed(b"x")
    h.reactor.advance(60)
    assert not h.client.disconnecting
    h.reactor.advance(41)
    assert h.client.disconnecting and upstream.disconnecting


# -- hijack with a real TLS client ---------------------------------------------------------


class MemoryTlsClient:
    """An OpenSSL client on memory BIOs that trusts only the harness CA and checks the name."""

    def __init__(self, h: Harness, server_name: str) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(h.ca_cert))
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_tlsext_host_name(server_name.encode())
        self.conn.set_connect_state()
        self.name = server_name
        self.h = h

    def outgoing(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                return out
            out += chunk

    def pump(self, server_bytes: bytes) -> None:
        if server_bytes:
            self.conn.bio_write(server_bytes)

    def handshake(self) -> bool:
        try:
            self.conn.do_handshake()
            return True
        except SSL.WantReadError:
            return False

    def recv_all(self) -> bytes:
        out = b""
        while True:
            try:
                out += self.conn.recv(65536)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                return out


def _exchange(h: Harness, tls: MemoryTlsClient, taken: int) -> int:
    """Move bytes between the TLS client and the proxy until quiet; returns bytes consumed."""
    for _ in range(50):
        h.reactor.advance(0)
        data = h.client.value()[taken:]
        taken += len(data)
        tls.pump(data)
        tls.handshake()
        out = tls.outgoing()
        if out:
            h.feed(out)
        elif not data:
            break
    return taken


def test_tls_client_on_the_plain_port_gets_a_plain_answer_at_once() -> None:
    """A TLS ClientHello sent straight to the proxy port (skopeo trying https:// on an
    insecure mirror before http://) gets a plain-text 400 naming http:// and the connection
    is closed at once, so the client falls back instead of waiting out its handshake timeout;
    nothing reaches the resource, and later bytes on that connection are not parsed."""
    h = Harness()
    tls = MemoryTlsClient(h, "registry.example")
    assert not tls.handshake()
    h.feed(tls.outgoing())
    assert h.client.value().startswith(b"HTTP/1.1 400")
    assert b"use http://" in h.client.value()
    assert h.client.disconnecting
    h.feed(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert not h.resource.seen
    assert h.client.value().count(b"HTTP/1.1") == 1


def test_hijack_with_pipelined_client_hello_and_keep_alive() -> None:
    """CONNECT to a hijacked host sent together with the TLS ClientHello: the proxy answers
    200, completes a handshake with a certificate for that host that the client verifies
    against the proxy CA, and three requests on the same TLS connection reach the resource
    with dfly_origin 'https://host:port' and their path."""
    h = Harness(hijack=[r"^registry\.example:"])
    tls = MemoryTlsClient(h, "registry.example")
    assert not tls.handshake()
    hello = tls.outgoing()
    h.feed(b"CONNECT registry.example:5000 HTTP/1.1\r\nHost: registry.example:5000\r\n\r\n" + hello)
    assert not h.reactor.tcpClients  # hijack does not dial: the proxy resource does, per request
    assert h.client.value().startswith(ESTABLISHED)
    taken = _exchange(h, tls, len(ESTABLISHED))
    assert tls.handshake()
    verify_hostname(tls.conn, "registry.example")
    peer = tls.conn.get_peer_certificate(as_cryptography=True)
    assert peer is not None and peer.issuer == h.ca_cert.subject
    answers = b""
    for path in (b"/v2/", b"/v2/a/manifests/1", b"/v2/a/blobs/sha256:00"):
        tls.conn.send(b"GET " + path + b" HTTP/1.1\r\nHost: registry.example:5000\r\n\r\n")
        h.feed(tls.outgoing())
        taken = _exchange(h, tls, taken)
        answers += tls.recv_all()
    assert h.resource.seen == [
        ("https://registry.example:5000", b"GET", b"/v2/"),
        ("https://registry.example:5000", b"GET", b"/v2/a/manifests/1"),
        ("https://registry.example:5000", b"GET", b"/v2/a/blobs/sha256:00"),
    ]
    assert answers.count(b"HTTP/1.1 200 OK") == 3
    assert b"https://registry.example:5000 GET /v2/a/blobs/sha256:00" in answers
    assert not h.client.disconnecting
    assert h.authority.minted == 1


def test_hijack_certificate_for_another_name_fails_the_client() -> None:
    """The minted certificate names the CONNECT host only: a client expecting another name
    rejects it (service_identity)."""
    from service_identity import VerificationError

    h = Harness(hijack=[r"registry\.example"])
    tls = MemoryTlsClient(h, "registry.example")
    h.feed(b"CONNECT registry.example:443 HTTP/1.1\r\n\r\n")
    _exchange(h, tls, len(ESTABLISHED))
    assert tls.handshake()
    with pytest.raises(VerificationError):
        verify_hostname(tls.conn, "other.example")


def test_connect_inside_hijacked_tunnel_is_refused() -> None:
    """A CONNECT sent inside a hijacked tunnel is answered 400 and not dialled."""
    h = Harness(hijack=[r"registry\.example"])
    tls = MemoryTlsClient(h, "registry.example")
    h.feed(b"CONNECT registry.example:443 HTTP/1.1\r\n\r\n")
    taken = _exchange(h, tls, len(ESTABLISHED))
    tls.conn.send(b"CONNECT registry.example:443 HTTP/1.1\r\n\r\n")
    h.feed(tls.outgoing())
    _exchange(h, tls, taken)
    assert tls.recv_all().startswith(b"HTTP/1.1 400")
    assert not h.reactor.tcpClients


def test_hijack_rules_need_an_authority() -> None:
    """A site with hijack rules and no CA is a configuration error, not a runtime surprise."""
    with pytest.raises(ValueError):
        ProxySite(Echo(), MemoryReactorClock(), ConnectRules.build(["x"]))


def test_garbage_instead_of_tls_in_a_hijack_closes_that_connection_only() -> None:
    """A client that sends plain text where the TLS handshake should be loses its connection;
    nothing reaches the resource and the site keeps working for the next client."""
    h = Harness(hijack=[r"registry\.example"])
    h.feed(b"CONNECT registry.example:443 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: registry.example\r\n\r\n")
    h.reactor.advance(0)
    assert h.client.disconnecting or h.client.disconnected
    assert not h.resource.seen
    again = Harness(hijack=[r"registry\.example"])
    again.feed(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert again.resource.seen == [(None, b"GET", b"http://a.example/")]


def test_certificate_minting_failure_is_502() -> None:
    """If no certificate can be made for a hijacked host, the client gets a 502 saying so."""
    h = Harness(hijack=[r"registry\.example"])

    def broken(host: str) -> Any:
        raise ValueError("no key")

    h.authority.server_options = broken  # type: ignore[method-assign]
    h.feed(b"CONNECT registry.example:443 HTTP/1.1\r\n\r\n")
    assert h.client.value().startswith(b"HTTP/1.1 502")
    assert b"cannot make a certificate for registry.example: no key" in h.client.value()
