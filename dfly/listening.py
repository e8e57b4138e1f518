"""A service that listens on several endpoints and starts its work once all of them are up."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from dfly.config import stop_with_error


class ListeningService(Service):
    """Listens on C{listeners()}; calls C{listening(ports)} when all are up, or exits the
    process with status 1 and a one-line reason if any cannot listen."""

    _log = Logger()
    role = "dfly"

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._ports: list[Any] = []
        self.ready: Deferred[None] = Deferred()

    def listeners(self) -> list[tuple[str, Any]]:
        """(endpoint string, factory) pairs, in the order C{listening} gets their ports."""
        raise NotImplementedError

    def listening(self, ports: list[Any]) -> None:
        """Everything listens; C{ports} are the listening ports, in order."""

    def startService(self) -> None:
        super().startService()
        ds = []
        for ep, factory in self.listeners():
            try:
                endpoint = serverFromString(self._reactor, ep)
            except (ValueError, TypeError, KeyError) as e:
                stop_with_error(self._reactor, f"{self.role}: bad listening address {ep!r}: {e}")
                return
            ds.append(endpoint.listen(factory))
        DeferredList(ds, consumeErrors=True).addCallback(self._listened)

    def _listened(self, results: list[Any]) -> None:
        self._ports = [r[1] for r in results if r[0]]
        failures = [r[1] for r in results if not r[0]]
        if failures:
            for f in failures:
                self._log.error("cannot listen: {reason}", reason=f.getErrorMessage())
            stop_with_error(self._reactor, f"{self.role}: cannot listen: {failures[0].getErrorMessage()}")
            return
        self.listening(self._ports)
        self.ready.callback(None)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return DeferredList([maybeDeferred(p.stopListening) for p in self._ports])
