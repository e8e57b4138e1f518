"""The peer daemon's HTTP proxy: one resource for registry mirrors and forward proxies.

Ways in (see L{dfly.proxy.routes}):

- registry mirror: C{GET /v2/...} sent to the proxy as if it were the registry
  (Docker C{registry-mirrors}, containerd C{hosts.toml}, C{registries.conf}
  mirrors); the upstream is C{--registry}, or containerd's C{?ns=HOST} when
  HOST is allowed by C{--registry-allow}.
- forward proxy: absolute-form requests (C{GET http://host/path HTTP/1.1}) from
  C{HTTP_PROXY} clients.
- intercepted TLS: a request decrypted from a CONNECT tunnel reaches this
  resource as an origin-form request whose C{twisted.web} request object carries
  the attribute C{dfly_origin}, a str C{"https://host:port"}; it is treated
  exactly like an absolute-form request to that origin.  (Whoever terminates
  the tunnel sets the attribute before calling L{ProxyResource.render}.)
  C{CONNECT} itself is answered 501 here.

What goes where: a C{GET} of C{/v2/<name>/blobs/sha256:<hex>} or of a URL that
matches a C{--p2p-rule} is served through the swarm (L{dfly.proxy.blobs});
everything else - manifests, tags, token requests, C{HEAD}, pushes - goes
straight to the upstream (L{dfly.proxy.direct}).  Every request ends with one
structured log event: method, upstream URL, route (p2p, direct, fallback),
status, body bytes sent and seconds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dfly.proxy.blobs import Outcome, SwarmGet
from dfly.proxy.direct import forward, send_error
from dfly.proxy.routes import DEFAULT_FILTER_PARAMS, P2PRules, RouteError, blob_digest, classify
from dfly.urls import redact_url


def cooperator_for(reactor: Any) -> Cooperator:
    """A cooperator (for request-body producers) driven by C{reactor} rather than the global one."""
    return Cooperator(scheduler=lambda step: reactor.callLater(0.0, step))


class ProxyResource(Resource):
    """Routes every request (see the module docstring); all I/O is injected.

    C{agent} makes upstream requests without following redirects (direct mode,
    HEAD checks); C{redirect_agent} follows them (the fallback fetch of a blob).
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        node: Any,
        agent: IAgent,
        redirect_agent: IAgent,
        registry: str | None = None,
        allowed: dict[str, str] | None = None,
        rules: P2PRules | None = None,
        filters: list[str] | tuple[str, ...] = DEFAULT_FILTER_PARAMS,
        fallback_after: float = 5.0,
        upstream_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.node = node
        self.agent = agent
        self.redirect_agent = redirect_agent
        self.registry = registry
        self.allowed = allowed or {}
        self.rules = rules or P2PRules([])
        self.filters = list(filters)
        self.fallback_after = fallback_after
        self.upstream_timeout = upstream_timeout
        self.cooperator = cooperator_for(reactor)

    def render(self, request: Request) -> Any:
        request.defaultContentType = None  # the upstream's headers, not twisted.web's default
        started = self.reactor.seconds()
        method = request.method
        uri = request.uri.decode("latin-1")
        if method == b"CONNECT":
            send_error(request, 501, "CONNECT is not supported by this proxy")
            self._logged(request, started, uri, Outcome("refused", 501))
            return NOT_DONE_YET
        origin = getattr(request, "dfly_origin", None)
        try:
            target = classify(uri, origin, self.registry, self.allowed)
        except RouteError as e:
            send_error(request, e.status, str(e))
            self._logged(request, started, uri, Outcome("refused", e.status, str(e)))
            return NOT_DONE_YET
        digest = blob_digest(target.path) if method == b"GET" else None
        if method == b"GET" and (digest is not None or self.rules.match(target.url)):
            get = SwarmGet(
                request, target.url, digest,
                node=self.node, agent=self.agent, redirect_agent=self.redirect_agent, reactor=self.reactor,
                fallback_after=self.fallback_after, upstream_timeout=self.upstream_timeout,
                filters=self.filters, cooperator=self.cooperator,
            )
            get.start().addCallback(lambda outcome: self._logged(request, started, target.url, outcome))
            return NOT_DONE_YET
        d = forward(request, self.agent, target.url, self.reactor, self.upstream_timeout, self.cooperator)
        d.addCallback(lambda result: self._logged(request, started, target.url, Outcome("direct", request.code, result)))
        return NOT_DONE_YET

    def _logged(self, request: Request, started: float, upstream: str, outcome: Outcome) -> None:
        self._log.info(
            "proxy {method} {upstream} route={route} status={status} bytes={bytes} in {seconds:.3f} s {detail}",
            method=request.method.decode("latin-1"),
            upstream=redact_url(upstream),
            route=outcome.route,
            status=outcome.status or request.code,
            bytes=request.sentLength,
            seconds=self.reactor.seconds() - started,
            detail=outcome.detail,
            proxy_request=True,
        )
