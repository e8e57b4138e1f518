"""Pass a request straight to its upstream and the answer straight back, streaming.

Design: the upstream request is made with Twisted's C{Agent} (never treq's
client, which would ask for gzip and decode it: the client must get the
registry's bytes exactly).  Status, reason and end-to-end headers go back
unchanged (a 404 stays a 404, a 401 keeps its C{WWW-Authenticate}, a redirect
keeps its C{Location} as the registry wrote it); hop-by-hop headers are
dropped both ways.

Response body: a L{Relay} protocol writes each chunk to the client's request
and registers the upstream transport as the request's streaming producer, so
a slow client pauses the upstream read (backpressure end to end) and a client
that goes away stops it.  A body cut short upstream aborts the client's
connection, so the client sees a truncated response and never a complete-looking
one.  With C{verify_sha256} the relay holds the most recent chunk back until
the body ended and its sha256 matched; on a mismatch the client's connection is
aborted before the last bytes are released.

Request body (pushes: C{PUT}/C{PATCH}/C{POST}): twisted.web's C{Request}
collects the incoming body in C{request.content} before the resource runs - in
memory up to 100 000 bytes, in an anonymous temporary file beyond that - so a
pushed layer is never held in memory, but it is spooled to disk once before it
is sent on.  The upload to the registry then streams from that file with a
C{FileBodyProducer} (backpressure from the upstream connection).
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.server import Request

from dfly.tls import describe_tls_failure
from dfly.urls import redact_url

# Headers of one connection (RFC 9110 7.6.1), plus proxy credentials, never passed on.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
        b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)


def hop_names(headers: Headers) -> set[bytes]:
    """Lower-case names that must not be forwarded: the fixed set and those C{Connection} names."""
    names = set(HOP_BY_HOP)
    for value in headers.getRawHeaders(b"connection", []):
        names.update(n.strip().lower() for n in value.split(b",") if n.strip())
    return names


def upstream_headers(request: Request, drop: frozenset[bytes] = frozenset()) -> Headers:
    """The client's request headers to send upstream (hop-by-hop, Host and length dropped:
    the agent writes those for the upstream connection; C{Expect: 100-continue} was
    answered by twisted.web already and the body is here)."""
    skip = hop_names(request.requestHeaders) | {b"host", b"content-length", b"expect"} | set(drop)
    out = Headers()
    for name, values in request.requestHeaders.getAllRawHeaders():
        if name.lower() not in skip:
            out.setRawHeaders(name, list(values))
    return out


def body_producer(request: Request, cooperator: Cooperator | None) -> IBodyProducer | None:
    """A producer of the client's request body (spooled in C{request.content}), or None
    when the request has none."""
    headers = request.requestHeaders
    if not headers.hasHeader(b"content-length") and not headers.hasHeader(b"transfer-encoding"):
        return None
    content: Any = request.content
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    producer = FileBodyProducer(content, cooperator=cooperator) if cooperator else FileBodyProducer(content)
    producer.length = size
    return producer


def copy_response(request: Request, response: IResponse) -> None:
    """Status, reason and end-to-end headers of C{response} onto C{request}."""
    request.setResponseCode(response.code, response.phrase or None)
    skip = hop_names(response.headers) | {b"content-length"}  # set from the body's real length below
    for name, values in response.headers.getAllRawHeaders():
        if name.lower() not in skip:
            request.responseHeaders.setRawHeaders(name, list(values))
    if request.method == b"HEAD":
        # The client parser keeps a HEAD response's Content-Length among its headers.
        length = response.headers.getRawHeaders(b"content-length")
        if length:
            request.responseHeaders.setRawHeaders(b"content-length", [length[-1]])
    elif response.length is not UNKNOWN_LENGTH:
        request.responseHeaders.setRawHeaders(b"content-length", [str(response.length).encode()])


def abort_client(request: Request) -> None:
    """Cut the client's connection: what it received is visibly incomplete."""
    channel: Any = request.channel
    transport = getattr(channel, "transport", None) if channel is not None else None
    if transport is not None:
        transport.abortConnection()


class Relay(Protocol):
    """Writes an upstream response body to a twisted.web request, with backpressure."""

    _log = Logger()

    def __init__(self, request: Request, verify_sha256: str | None = None, hasher: Any = None) -> None:
        self.request = request
        self.verify_sha256 = verify_sha256
        # C{hasher} carries on a hash of bytes the client already has (a continued body).
        self.hash = (hasher or hashlib.sha256()) if verify_sha256 else None
        self.held: bytes | None = None
        self.done: Deferred[str] = Deferred()  # fires with "ok", "aborted" or "gone"
        self.gone = False
        self.error: str | None = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def client_gone(self) -> None:
        """The client went away: stop reading upstream."""
        self.gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.gone:
            return
        if self.hash is not None:
            self.hash.update(data)
            data, self.held = (self.held or b""), data
            if not data:
                return
        self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        request = self.request
        if not self.gone:
            request.unregisterProducer()
        if self.gone:
            outcome = "gone"
        elif reason.check(ResponseDone) or (reason.check(PotentialDataLoss) and not request.responseHeaders.hasHeader(b"content-length")):
            outcome = "ok"
            if self.hash is not None:
                got = "sha256:" + self.hash.hexdigest()
                if got != self.verify_sha256:
                    self.error = f"upstream body has {got}, not {self.verify_sha256}"
                    outcome = "aborted"
            if outcome == "ok":
                if self.held:
                    request.write(self.held)
                self.held = None
                request.finish()
        else:
            self.error = f"upstream body cut short: {reason.getErrorMessage()}"
            outcome = "aborted"
        if outcome == "aborted":
            self.held = None
            self._log.warn("aborting client connection: {error}", error=self.error)
            abort_client(request)
        self.done.callback(outcome)


def upstream_status(f: Failure) -> tuple[int, str]:
    """The status a client gets when the upstream could not answer at all."""
    tls = describe_tls_failure(f)
    if tls is not None:
        return 502, f"upstream {tls}"
    if f.check(CancelledError, net_error.TimeoutError):
        return 504, "upstream did not answer in time"
    if f.check(ResponseFailed):
        return 502, "upstream connection failed: " + "; ".join(r.getErrorMessage() for r in f.value.reasons)  # type: ignore[union-attr]
    return 502, f"upstream unreachable: {f.getErrorMessage()}"


def send_error(request: Request, status: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
    """A short plain-text answer produced by the proxy itself."""
    if request.finished or request.startedWriting or getattr(request, "_disconnected", False):
        return
    body = (message.rstrip("\n") + "\n").encode("utf-8", "replace")
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    for name, value in (headers or {}).items():
        request.responseHeaders.setRawHeaders(name, [value])
    request.write(body)
    request.finish()


def forward(
    request: Request,
    agent: IAgent,
    url: str,
    reactor: Any,
    timeout: float,
    cooperator: Cooperator | None = None,
    headers: Headers | None = None,
    verify_sha256: str | None = None,
) -> Deferred[str]:
    """Send C{request} to C{url} through C{agent} and relay the answer; the Deferred fires
    with the outcome ("ok", "aborted", "gone" or "error") when the exchange is over."""
    gone = [False]
    relay: list[Relay] = []
    out: Deferred[str] = Deferred()
    if headers is None:
        headers = upstream_headers(request)
    producer = body_producer(request, cooperator)
    d = agent.request(request.method, url.encode("utf-8"), headers, producer)
    timer = reactor.callLater(timeout, d.cancel)

    def client_gone(_: Any) -> None:
        gone[0] = True
        if relay:
            relay[0].client_gone()
        elif not d.called:
            d.cancel()

    request.notifyFinish().addErrback(client_gone)

    def got(response: IResponse) -> Deferred[str] | str:
        if timer.active():
            timer.cancel()
        if gone[0]:
            response.deliverBody(Protocol())
            return "gone"
        copy_response(request, response)
        verify = verify_sha256 if response.code == 200 else None
        r = Relay(request, verify)
        relay.append(r)
        response.deliverBody(r)
        return r.done

    def failed(f: Failure) -> str:
        if timer.active():
            timer.cancel()
        if gone[0]:
            return "gone"
        status, message = upstream_status(f)
        send_error(request, status, message)
        return "error"

    chained: Deferred[Any] = d.addCallbacks(got, failed)

    def unexpected(f: Failure) -> str:
        Relay._log.failure("proxying {url} failed", f, url=redact_url(url))
        abort_client(request)
        return "error"

    chained.addErrback(unexpected).addCallback(out.callback)
    return out
