"""The HTTP client for origins: bytes exactly as the origin serves them.

treq's client always asks for gzip and decodes it, which would change the bytes
of a file served with C{Content-Encoding: gzip} (a .tar.gz, say) and break its
digests.  This client speaks Twisted's C{Agent} directly: redirects are followed
(Twisted drops C{Authorization} and C{Cookie} when one leads to another origin),
connections are pooled, and the body is delivered unbuffered to a protocol.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool, RedirectAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse


class OriginClient:
    """C{request(method, url, headers=...)} giving an C{IResponse} whose body is untouched."""

    def __init__(self, reactor: Any, agent: IAgent | None = None, persistent: bool = True) -> None:
        if agent is None:
            pool = HTTPConnectionPool(reactor, persistent=persistent)
            agent = Agent(reactor, pool=pool)
        self._agent = RedirectAgent(agent)

    def request(
        self, method: str, url: str, headers: dict[bytes, list[bytes]] | None = None, unbuffered: bool = True
    ) -> Deferred[IResponse]:
        """Send a request; C{unbuffered} is accepted for treq compatibility (always true here)."""
        return self._agent.request(method.encode("ascii"), url.encode("utf-8"), Headers(dict(headers or {})), None)
