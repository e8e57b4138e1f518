"""The HTTP client for origins: bytes exactly as the origin serves them.

treq's client always asks for gzip and decodes it, which would change the bytes
of a file served with C{Content-Encoding: gzip} (a .tar.gz, say) and break its
digests.  This client speaks Twisted's C{Agent} directly: redirects are followed
(Twisted drops C{Authorization} and C{Cookie} when one leads to another origin),
connections are pooled, and the body is delivered unbuffered to a protocol.
HTTPS origins are verified (L{dfly.tls.client_tls_policy}): against the system trust
store, or against C{ca_file} for a private CA; a failed verification is an
C{OriginError} that says so.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, RedirectAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from dfly.errors import OriginError
from dfly.tls import client_tls_policy, describe_tls_failure


class OriginClient:
    """C{request(method, url, headers=...)} giving an C{IResponse} whose body is untouched."""

    def __init__(
        self, reactor: Any, agent: IAgent | None = None, persistent: bool = True, ca_file: str | None = None
    ) -> None:
        if agent is None:
            pool = HTTPConnectionPool(reactor, persistent=persistent)
            agent = Agent(reactor, contextFactory=client_tls_policy(ca_file), pool=pool)
        self._agent = RedirectAgent(agent)

    def request(
        self, method: str, url: str, headers: dict[bytes, list[bytes]] | None = None, unbuffered: bool = True
    ) -> Deferred[IResponse]:
        """Send a request; C{unbuffered} is accepted for treq compatibility (always true here)."""
        d = self._agent.request(method.encode("ascii"), url.encode("utf-8"), Headers(dict(headers or {})), None)

        def tls_failed(failure: Failure) -> Failure:
            why = describe_tls_failure(failure)
            if why is not None:
                raise OriginError(f"{url}: {why}")
            return failure

        d.addErrback(tls_failed)
        return d
