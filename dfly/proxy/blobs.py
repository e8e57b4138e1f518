"""Serve one C{GET} through the swarm: registry blobs by digest, and files matching a rule.

Flow for a blob (C{/v2/<name>/blobs/sha256:<hex>}):

1. C{HEAD} of the blob at the registry with the client's own headers (no
   redirects followed).  A 2xx or 3xx means the registry lets this client have
   the blob (2xx also gives size and content type); anything else (401, 403,
   404...) is answered by passing the client's C{GET} straight to the registry,
   so the client gets the registry's own response, never swarm bytes.  This is
   what keeps private blobs private: the swarm's task is named by the digest
   alone, so it is shared by every client the registry accepts.
2. The node streams the task (L{dfly.peer.node.PeerNode.stream}); the
   supernode's fetch from the registry carries the first client's
   C{Authorization} and follows redirects to object storage.
3. If the swarm has not produced the size and a first byte within
   C{fallback_after} seconds (supernode down, scheduling stalled), or fails
   before the response began, the C{GET} goes straight to the registry instead
   (redirects followed, sha256 checked) - a pull never fails because of dfly.
   If the swarm fails or stalls (no progress for C{fallback_after} seconds
   while the client is reading) after the response began, the rest of the blob
   is fetched from the registry with a C{Range} request from the first byte the
   client lacks, still hashed with what it already has; a wrong digest (from the
   swarm or the registry), or a registry that cannot continue, aborts the
   client's connection instead - the last chunk is always withheld until the
   digest matched, so a client never takes a wrong or short body for a whole
   one.
4. The response: C{200} (or C{206} with C{Content-Range} for a single
   satisfiable C{Range}; C{416} for an unsatisfiable one), C{Content-Length},
   C{Docker-Content-Digest}, the registry's content type (else
   C{application/octet-stream}); the bytes go out as pieces arrive, in order.

A file matching a C{--p2p-rule} skips step 1 (its task identity includes the
client's credentials, see L{dfly.urls.credential_key}) and the sha256 check
(the node still checks the supernode's md5 before releasing the last chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Response
from twisted.web.iweb import IAgent
from twisted.web.server import Request

from dfly.errors import IntegrityError, TaskFailed
from dfly.peer.node import DownloadRequest
from dfly.peer.stream import BlobStream
from dfly.proxy.direct import Relay, abort_client, forward, send_error, upstream_headers
from dfly.proxy.routes import RangeNotSatisfiable, parse_range
from dfly.urls import redact_url

# Request headers handed to the supernode's fetch from the origin (and part of the identity
# of non-digest tasks): the client's credentials, nothing that shapes one request.
CREDENTIAL_NAMES = (b"authorization", b"cookie")


@dataclass
class Outcome:
    """What happened to one proxied request, for the access log."""

    route: str = "p2p"
    status: int = 0
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def credential_lines(request: Request) -> list[str]:
    """The client's credential headers as C{"Name: value"} lines."""
    lines = []
    for name in CREDENTIAL_NAMES:
        for value in request.requestHeaders.getRawHeaders(name, []):
            lines.append(f"{name.decode().title()}: {value.decode('latin-1')}")
    return lines


class SwarmGet:
    """One client's C{GET} served from the swarm, with the HEAD check and the fallback."""

    _log = Logger()

    def __init__(
        self,
        request: Request,
        url: str,
        digest: str | None,
        *,
        node: Any,
        agent: IAgent,
        redirect_agent: IAgent,
        reactor: Any,
        fallback_after: float,
        upstream_timeout: float,
        filters: list[str],
        cooperator: Cooperator | None = None,
    ) -> None:
        self.request = request
        self.url = url
        self.digest = digest
        self.node = node
        self.agent = agent
        self.redirect_agent = redirect_agent
        self.reactor = reactor
        self.fallback_after = fallback_after
        self.upstream_timeout = upstream_timeout
        self.filters = filters
        self.cooperator = cooperator
        self.outcome = Outcome()
        self.done: Deferred[Outcome] = Deferred()
        self.gone = False
        self.content_type: bytes | None = None
        self.head_length: int | None = None
        self._pending: Deferred[Any] | None = None
        self._stream: BlobStream | None = None
        self._timer: Any = None
        self._watch: Any = None
        self._progress = -1
        request.notifyFinish().addErrback(self._client_gone)

    # -- driving ---------------------------------------------------------------
    def start(self) -> Deferred[Outcome]:
        if self.digest is not None:
            self._head()
        else:
            self._swarm()
        return self.done

    def _client_gone(self, _: Any) -> None:
        self.gone = True
        self._cancel_timer()
        self._stop_watch()
        if self._pending is not None and not self._pending.called:
            self._pending.cancel()
        if self._stream is not None:
            self._stream.stopProducing()
        self._end(detail="client went away")

    def _end(self, route: str | None = None, status: int | None = None, detail: str = "") -> None:
        if self.done.called:
            return
        if route:
            self.outcome.route = route
        self.outcome.status = status if status is not None else self.request.code
        if detail:
            self.outcome.detail = detail
        self.done.callback(self.outcome)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- 1. may this client have it? -------------------------------------------
    def _head(self) -> None:
        headers = upstream_headers(self.request, drop=frozenset({b"range", b"if-range"}))
        d = self._pending = self.agent.request(b"HEAD", self.url.encode("utf-8"), headers, None)
        timer = self.reactor.callLater(self.upstream_timeout, d.cancel)

        def answered(response: Response) -> None:
            if timer.active():
                timer.cancel()
            response.deliverBody(_Ignore())
            if self.gone:
                return
            if 200 <= response.code < 300:
                lengths = response.headers.getRawHeaders(b"content-length")  # a HEAD has no body
                if lengths and lengths[-1].strip().isdigit():
                    self.head_length = int(lengths[-1])
                types = response.headers.getRawHeaders(b"content-type")
                self.content_type = types[-1] if types else None
                self._swarm()
            elif 300 <= response.code < 400:
                self._swarm()  # a redirect to object storage: the registry accepts this client
            else:
                # Refused (or unknown): the client gets the registry's own answer to its GET.
                self._direct("direct", f"registry answered HEAD {response.code}")

        def failed(f: Failure) -> None:
            if timer.active():
                timer.cancel()
            if not self.gone:
                self._direct("fallback", f"HEAD failed: {f.getErrorMessage()}")

        d.addCallbacks(answered, failed)

    # -- 2. from the swarm -------------------------------------------------------
    def _swarm(self) -> None:
        lines = credential_lines(self.request)
        if self.digest is not None:
            task = DownloadRequest(self.url, headers=lines, digest=self.digest)
        else:
            task = DownloadRequest(self.url, headers=lines, filters=list(self.filters))
        d = self._pending = self.node.stream(task, 0, None, self.digest)
        self._timer = self.reactor.callLater(self.fallback_after, self._too_slow)
        d.addCallbacks(self._ready, self._swarm_failed)

    def _too_slow(self) -> None:
        self._timer = None
        if self.gone or self.request.startedWriting:
            return
        reason = f"the swarm did not start within {self.fallback_after:g} s"
        if self._pending is not None and not self._pending.called:
            self._pending.cancel()  # -> _swarm_failed (CancelledError)
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.stopProducing()
        self._direct("fallback", reason)

    def _swarm_failed(self, f: Failure) -> None:
        if self.gone or f.check(CancelledError):
            return
        self._cancel_timer()
        self._direct("fallback", f"swarm: {f.getErrorMessage()}")

    def _ready(self, stream: BlobStream) -> None:
        stream.finished.addCallbacks(self._streamed, self._stream_failed)
        if self.gone:
            stream.stopProducing()
            return
        self._stream = stream
        self._pending = stream.first_bytes()
        self._pending.addCallback(lambda _: self._respond(stream))
        self._pending.addErrback(lambda f: f.trap(CancelledError))

    def _respond(self, stream: BlobStream) -> None:
        if self.request.startedWriting or self._timer is None:
            return  # already answered, or the fallback took over
        self._cancel_timer()
        assert stream.length is not None
        length = stream.length
        request = self.request
        if self.head_length is not None and self.head_length != length:
            self._log.warn("registry says {head} bytes, the swarm {swarm}", head=self.head_length, swarm=length)
        header = request.getHeader(b"range")
        try:
            wanted = parse_range(header.decode("latin-1") if header else None, length)
        except RangeNotSatisfiable as e:
            self._stream = None
            stream.stopProducing()
            send_error(request, 416, str(e), {b"content-range": f"bytes */{length}".encode()})
            self._end("p2p", 416)
            return
        if_range = request.getHeader(b"if-range")
        if wanted is not None and if_range is not None and (self.digest is None or self.digest not in if_range.decode("latin-1")):
            wanted = None  # If-Range names another version: the whole file
        request.responseHeaders.setRawHeaders(b"accept-ranges", [b"bytes"])
        request.responseHeaders.setRawHeaders(b"content-type", [self.content_type or b"application/octet-stream"])
        if self.digest is not None:
            request.responseHeaders.setRawHeaders(b"docker-content-digest", [self.digest.encode()])
            request.responseHeaders.setRawHeaders(b"etag", [f'"{self.digest}"'.encode()])
        if wanted is None:
            request.setResponseCode(200)
            request.responseHeaders.setRawHeaders(b"content-length", [str(length).encode()])
        else:
            first, last = wanted
            stream.offset, stream.end = first, last + 1
            request.setResponseCode(206)
            request.responseHeaders.setRawHeaders(b"content-length", [str(last + 1 - first).encode()])
            request.responseHeaders.setRawHeaders(b"content-range", [f"bytes {first}-{last}/{length}".encode()])
        self.outcome.status = request.code
        request.write(b"")  # the headers go out now; the body follows as pieces arrive
        stream.start(request)
        if self._stream is stream:
            self._watch = self.reactor.callLater(self.fallback_after, self._check_progress)

    # -- a stalled swarm -----------------------------------------------------------
    def _check_progress(self) -> None:
        self._watch = None
        stream = self._stream
        if stream is None or self.gone:
            return
        if stream.position == self._progress and not stream.paused:
            stream.abandon(TaskFailed(f"the swarm made no progress for {self.fallback_after:g} s"))
            return
        self._progress = stream.position
        self._watch = self.reactor.callLater(self.fallback_after, self._check_progress)

    def _stop_watch(self) -> None:
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        self._watch = None

    def _streamed(self, written: int) -> None:
        self._stream = None
        self._stop_watch()
        if not self.gone:
            self.request.finish()
        self._end("p2p", detail=f"{written} bytes from the swarm")

    def _stream_failed(self, f: Failure) -> None:
        stream, self._stream = self._stream, None
        self._stop_watch()
        if self.gone or f.check(CancelledError):
            return  # the client went away, or the fallback took over
        point = stream.resume_point() if stream is not None else None
        if self.request.startedWriting and point is not None and not f.check(IntegrityError):
            self._continue(point[0], point[1], f.getErrorMessage())
            return
        if self.request.startedWriting:
            self._log.warn(
                "swarm failed mid-response for {url}: {error}; aborting the client's connection",
                url=redact_url(self.url), error=f.getErrorMessage(),
            )
            abort_client(self.request)
            self._end("p2p", detail=f"aborted: {f.getErrorMessage()}")
        else:
            self._cancel_timer()
            self._direct("fallback", f"swarm: {f.getErrorMessage()}")

    def _continue(self, position: int, hasher: Any, why: str) -> None:
        """Fetch the rest of the blob from the registry, from byte C{position} on."""
        self._log.info(
            "swarm failed at byte {position} of {url} ({why}); continuing from the registry",
            position=position, url=redact_url(self.url), why=why,
        )
        self.outcome.route = "fallback"
        headers = upstream_headers(self.request, drop=frozenset({b"range", b"if-range"}))
        headers.setRawHeaders(b"range", [f"bytes={position}-".encode()])
        d = self._pending = self.redirect_agent.request(b"GET", self.url.encode("utf-8"), headers, None)
        timer = self.reactor.callLater(self.upstream_timeout, d.cancel)
        request = self.request

        def answered(response: Any) -> Any:
            if timer.active():
                timer.cancel()
            ranges = response.headers.getRawHeaders(b"content-range") or [b""]
            wanted = f"bytes {position}-".encode()
            if self.gone or response.code != 206 or not ranges[-1].startswith(wanted):
                response.deliverBody(_Ignore())
                if not self.gone:
                    abort_client(request)
                self._end("fallback", detail=f"{why}; the registry cannot continue at {position} ({response.code})")
                return None
            relay = Relay(request, self.digest, hasher)
            request.notifyFinish().addErrback(lambda _: relay.client_gone())
            response.deliverBody(relay)
            relay.done.addCallback(lambda outcome: self._end("fallback", detail=f"{why}; continued at {position}: {outcome}"))
            return None

        def failed(f: Failure) -> None:
            if timer.active():
                timer.cancel()
            if not self.gone:
                abort_client(request)
            self._end("fallback", detail=f"{why}; cannot continue: {f.getErrorMessage()}")

        d.addCallbacks(answered, failed)

    # -- 3. straight to the registry ------------------------------------------
    def _direct(self, route: str, why: str) -> None:
        if self.done.called or self.request.startedWriting or self.request.finished:
            return
        self._log.info("{route} for {url}: {why}", route=route, url=redact_url(self.url), why=why)
        self.outcome.route = route
        self.outcome.detail = why
        verify = self.digest if self.request.getHeader(b"range") is None else None
        agent = self.agent if route == "direct" else self.redirect_agent
        d = forward(
            self.request, agent, self.url, self.reactor, self.upstream_timeout,
            cooperator=self.cooperator, headers=upstream_headers(self.request), verify_sha256=verify,
        )
        d.addCallback(lambda outcome: self._end(route, detail=f"{why}; {outcome}"))


class _Ignore:
    """Discards a body (HEAD responses have none)."""

    def makeConnection(self, transport: Any) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass

