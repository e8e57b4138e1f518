"""A small HTTP origin that counts what it sends: for demos, tests and benchmarks.

Serves the files of one directory.  C{GET /NAME} answers with Content-Length;
C{GET /chunked/NAME} answers chunked with no Content-Length; query strings
are ignored.  C{GET /_stats} returns JSON: bytes of body sent and requests
per file name.  Bodies are streamed with a pull producer, never read whole.

    python -m dfly.devtools.origin --dir DIR --port tcp:0:interface=127.0.0.1 --port-file F
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet.interfaces import IPullProducer
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


class Origin(Resource):
    isLeaf = True

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = os.path.abspath(directory)
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
        _Body(request, path, self.stats, name)
        return NOT_DONE_YET


class Options(usage.Options):
    optParameters = [
        ["dir", None, ".", "Directory to serve."],
        ["port", None, "tcp:0:interface=127.0.0.1", "Endpoint to listen on."],
        ["port-file", None, None, "Write the port number here once listening."],
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

    d = serverFromString(reactor, opts["port"]).listen(Site(Origin(opts["dir"])))
    d.addCallback(listening)
    def failed(f: Any) -> None:
        print(f"origin: {f.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    d.addErrback(failed)
    reactor.run()


if __name__ == "__main__":
    main()
