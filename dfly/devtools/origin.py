"""A small HTTP origin that counts what it sends: for demos, tests and benchmarks.

Serves the files of one directory.  C{GET /NAME} answers with Content-Length;
C{GET /chunked/NAME} answers chunked with no Content-Length; query strings
are ignored.  C{GET /_stats} returns JSON: bytes of body sent and requests
per file name.  Bodies are streamed with a producer, never read whole; with
C{--rate} every response is paced to that many bytes per second.

    python -m dfly.devtools.origin --dir DIR --port tcp:0:interface=127.0.0.1 --port-file F [--rate 4M]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

CHUNK = 256 * 1024


@implementer(IPullProducer)
class _Body:
    def __init__(self, request: Request, path: str, stats: dict[str, Any], name: str) -> None:
        self.request = request
        self.f = open(path, "rb")
        self.stats = stats
        self.name = name
        self.done = False
        request.registerProducer(self, False)
        request.notifyFinish().addBoth(lambda _: self._close())

    def resumeProducing(self) -> None:
        if self.done:
            return
        data = self.f.read(CHUNK)
        if not data:
            self._close()
            self.request.unregisterProducer()
            self.request.finish()
            return
        self.stats["bytes"][self.name] = self.stats["bytes"].get(self.name, 0) + len(data)
        self.stats["total_bytes"] += len(data)
        self.request.write(data)

    def stopProducing(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self.done:
            self.done = True
            self.f.close()


@implementer(IPushProducer)
class _PacedBody:
    """Sends a file at C{rate} bytes per second, pausing when the client does not read."""

    def __init__(self, request: Request, path: str, stats: dict[str, Any], name: str, rate: float, clock: Any) -> None:
        self.request = request
        self.f = open(path, "rb")
        self.stats = stats
        self.name = name
        self.chunk = max(1024, min(CHUNK, int(rate / 20)))
        self.interval = self.chunk / rate
        self.clock = clock
        self.call: Any = None
        self.done = False
        self.next_at = clock.seconds()
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(lambda _: self._close())
        self.resumeProducing()

    def _tick(self) -> None:
        self.call = None
        if self.done:
            return
        data = self.f.read(self.chunk)
        if not data:
            self._close()
            self.request.unregisterProducer()
            self.request.finish()
            return
        self.stats["bytes"][self.name] = self.stats["bytes"].get(self.name, 0) + len(data)
        self.stats["total_bytes"] += len(data)
        self.next_at = max(self.next_at + self.interval, self.clock.seconds())
        self.request.write(data)
        self._schedule()

    def _schedule(self) -> None:
        if not self.done and self.call is None and not self.paused:
            delay = max(0.0, self.next_at - self.clock.seconds())
            self.call = self.clock.callLater(delay, self._tick)

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        if self.call is not None:
            self.call.cancel()
            self.call = None

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self.done:
            self.done = True
            if self.call is not None:
                self.call.cancel()
                self.call = None
            self.f.close()


def parse_rate(text: str) -> float:
    """Bytes per second from C{"4M"}, C{"512K"}, C{"1G"} or a plain number."""
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("B")
    factor = scale.get(text[-1:], 1)
    number = float(text[:-1] if text[-1:] in scale else text)
    if number <= 0:
        raise ValueError("rate must be positive")
    return number * factor


class Origin(Resource):
    isLeaf = True

    def __init__(self, directory: str, rate: float | None = None, clock: Any = None) -> None:
        super().__init__()
        self.directory = os.path.abspath(directory)
        self.rate = rate
        self.clock = clock
        self.stats: dict[str, Any] = {"bytes": {}, "requests": {}, "total_bytes": 0}

    def render_GET(self, request: Request) -> Any:
        parts = [p.decode("utf-8", "replace") for p in request.postpath or []]
        if parts == ["_stats"]:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(self.stats).encode()
        chunked = bool(parts) and parts[0] == "chunked"
        if chunked:
            parts = parts[1:]
        name = "/".join(parts)
        path = os.path.normpath(os.path.join(self.directory, name))
        if not name or not path.startswith(self.directory + os.sep) or not os.path.isfile(path):
            request.setResponseCode(404)
            return b"not found\n"
        self.stats["requests"][name] = self.stats["requests"].get(name, 0) + 1
        request.setHeader(b"content-type", b"application/octet-stream")
        if not chunked:
            request.setHeader(b"content-length", str(os.path.getsize(path)).encode())
        if self.rate:
            _PacedBody(request, path, self.stats, name, self.rate, self.clock)
        else:
            _Body(request, path, self.stats, name)
        return NOT_DONE_YET


class Options(usage.Options):
    optParameters = [
        ["dir", None, ".", "Directory to serve."],
        ["port", None, "tcp:0:interface=127.0.0.1", "Endpoint to listen on."],
        ["port-file", None, None, "Write the port number here once listening."],
        ["rate", None, None, "Pace every response to this many bytes/s (K, M, G suffixes)."],
    ]


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    opts = Options()
    opts.parseOptions(sys.argv[1:] if argv is None else argv)

    def listening(port: Any) -> None:
        number = port.getHost().port
        if opts["port-file"]:
            tmp = opts["port-file"] + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(number))
            os.replace(tmp, opts["port-file"])
        print(f"origin serving {opts['dir']} on port {number}", flush=True)

    rate = parse_rate(opts["rate"]) if opts["rate"] else None
    d = serverFromString(reactor, opts["port"]).listen(Site(Origin(opts["dir"], rate, reactor)))
    d.addCallback(listening)
    def failed(f: Any) -> None:
        print(f"origin: {f.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    d.addErrback(failed)
    reactor.run()


if __name__ == "__main__":
    main()
