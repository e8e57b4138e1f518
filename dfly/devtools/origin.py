"""A small HTTP origin that counts what it sends: for demos, tests and benchmarks.

Serves the files of one directory.  C{GET /NAME} answers with Content-Length;
C{GET /chunked/NAME} answers chunked with no Content-Length; query strings
are ignored.  C{GET /_stats} returns JSON: bytes of body sent and requests
per file name.  Bodies are streamed with a producer, never read whole; with
C{--rate} every response is paced to that many bytes per second; with
C{--total-rate} all responses together share that many bytes per second (one
schedule of send slots, taken in turn, so concurrent clients split it evenly).

Registry-like mode (C{--registry-like}): C{GET}/C{HEAD} of
C{/v2/<name>/blobs/sha256:<hex>} serve the file named C{sha256:<hex>} with the
headers a registry sends (C{Docker-Content-Digest}); the file's content is
not checked against its name, so a test can serve a wrong blob.  With
C{--redirect-to BASE} such a blob answers C{307} to
C{BASE/sha256:<hex>?X-Amz-Signature=<random>} instead (object storage), and
C{/redirect/NAME} answers C{302} to C{BASE/NAME}; C{/redirect-relative/NAME}
answers C{302} with the relative C{Location: /NAME}.  C{/_stats} counts, per
name, the requests that carried an C{Authorization} header (C{"auth"}).

    python -m dfly.devtools.origin --dir DIR --port tcp:0:interface=127.0.0.1 --port-file F [--rate 4M]
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import uuid
from typing import Any

from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.python import usage
from twisted.web.http import CACHED
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import alsoProvides

CHUNK = 256 * 1024
BLOB = re.compile(r"^v2/.+/blobs/(sha256:[0-9a-f]{64})$")


class Pace:
    """A schedule of send slots at C{rate} bytes/s: one per response, or shared by all."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.next_at = now

    @property
    def chunk(self) -> int:
        return max(1024, min(CHUNK, int(self.rate / 20)))


class _Body:
    """Streams C{length} bytes of a file from C{offset}; optionally paced or faulty.

    Unpaced, it is a pull producer (a chunk whenever the transport wants one); paced, a
    push producer that writes a chunk every interval and stops while the client is slow.
    C{fault} "reset" aborts the connection half way, "short" closes it half way (the
    client sees a body shorter than Content-Length).
    """

    def __init__(
        self,
        request: Request,
        path: str,
        stats: dict[str, Any],
        name: str,
        offset: int,
        length: int,
        rate: float | None,
        clock: Any,
        fault: str | None = None,
        pace: Pace | None = None,
    ) -> None:
        self.request = request
        self.f = open(path, "rb")
        self.f.seek(offset)
        self.left = length
        self.cut = length // 2 if fault in ("reset", "short") else None
        self.fault = fault
        self.stats = stats
        self.name = name
        self.clock = clock
        if pace is None and rate:
            pace = Pace(rate, clock.seconds())
        self.pace = pace
        self.rate = pace.rate if pace else None
        self.chunk = pace.chunk if pace else CHUNK
        self.interval = self.chunk / pace.rate if pace else 0.0
        self.call: Any = None
        self.paused = False
        self.done = False
        request.notifyFinish().addBoth(lambda _: self._close())
        if self.pace:
            alsoProvides(self, IPushProducer)
            request.registerProducer(self, True)
            self._schedule()
        else:
            alsoProvides(self, IPullProducer)
            request.registerProducer(self, False)

    def _send(self) -> None:
        if self.done:
            return
        if self.cut is not None and self.left <= self.cut:
            self._close()
            transport: Any = self.request.channel.transport
            if self.fault == "reset":
                transport.abortConnection()
            else:
                transport.loseConnection()
            return
        data = self.f.read(min(self.chunk, self.left))
        if not data:
            self._close()
            self.request.unregisterProducer()
            self.request.finish()
            return
        self.left -= len(data)
        self.stats["bytes"][self.name] = self.stats["bytes"].get(self.name, 0) + len(data)
        self.stats["total_bytes"] += len(data)
        self.request.write(data)
        if self.pace:
            self.pace.next_at = max(self.pace.next_at + self.interval, self.clock.seconds())
            self._schedule()

    def _tick(self) -> None:
        self.call = None
        self._send()

    def _schedule(self) -> None:
        if not self.done and self.call is None and not self.paused and self.pace:
            delay = max(0.0, self.pace.next_at - self.clock.seconds())
            self.call = self.clock.callLater(delay, self._tick)

    def pauseProducing(self) -> None:
        self.paused = True
        if self.call is not None:
            self.call.cancel()
            self.call = None

    def resumeProducing(self) -> None:
        if self.rate:
            self.paused = False
            self._schedule()
        else:
            self._send()

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


def _range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """(offset, length) for a single C{bytes=a-b} / C{bytes=a-} range, else None."""
    if not header or not header.startswith(b"bytes="):
        return None
    spec = header[6:].decode("ascii", "replace")
    first, sep, last = spec.partition("-")
    if not sep or "," in spec or not first.isdigit() or (last and not last.isdigit()):
        return None
    a = int(first)
    b = min(int(last), size - 1) if last else size - 1
    if a > b:
        return None
    return a, b - a + 1


class Origin(Resource):
    """Serves files with ETag, Last-Modified, conditional GET and single ranges.

    Paths: C{/NAME}; C{/chunked/NAME} (no Content-Length); C{/fault/MODE/NAME} with MODE
    one of 500, 503, stall (headers, then silence), reset, short; C{/_stats}.
    """

    isLeaf = True

    def __init__(
        self,
        directory: str,
        rate: float | None = None,
        clock: Any = None,
        auth: str | None = None,
        registry_like: bool = False,
        redirect_to: str | None = None,
        total_rate: float | None = None,
        basic_auth: str | None = None,
    ) -> None:
        super().__init__()
        self.shared = Pace(total_rate, clock.seconds()) if total_rate else None
        # The Authorization value every file request must carry ("Bearer AUTH"), if any.
        self.auth = f"Bearer {auth}".encode() if auth else None
        if basic_auth:
            self.auth = b"Basic " + base64.b64encode(basic_auth.encode())
        self.registry_like = registry_like
        self.redirect_to = redirect_to.rstrip("/") if redirect_to else None
        self.directory = os.path.abspath(directory)
        self.rate = rate
        self.clock = clock
        self.stats: dict[str, Any] = {
            "bytes": {}, "requests": {}, "total_bytes": 0, "statuses": {}, "auth": {}, "heads": {},
        }

    def render_HEAD(self, request: Request) -> Any:
        return self.render_GET(request)

    def render_GET(self, request: Request) -> Any:
        parts = [p.decode("utf-8", "replace") for p in request.postpath or []]
        head = request.method == b"HEAD"
        if parts == ["_stats"]:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(self.stats).encode()
        chunked = fault = None
        blob = BLOB.match("/".join(parts)) if self.registry_like else None
        if blob is not None:
            parts = [blob.group(1)]
        elif parts and parts[0] == "chunked":
            chunked, parts = True, parts[1:]
        elif len(parts) > 1 and parts[0] == "fault":
            fault, parts = parts[1], parts[2:]
        elif len(parts) > 1 and parts[0] in ("redirect", "redirect-relative"):
            target = "/" + "/".join(parts[1:])
            if parts[0] == "redirect":
                if self.redirect_to is None:
                    return self._status(request, target, 404, b"no --redirect-to\n")
                target = self.redirect_to + target
            self._seen(request, "/".join(parts))
            request.setHeader(b"location", target.encode())
            return self._status(request, "/".join(parts), 302, b"")
        name = "/".join(parts)
        path = os.path.normpath(os.path.join(self.directory, name))
        if not name or not path.startswith(self.directory + os.sep) or not os.path.isfile(path):
            if blob is not None:
                request.setHeader(b"content-type", b"application/json")
                return self._status(request, name, 404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}\n')
            return self._status(request, name, 404, b"not found\n")
        self._seen(request, name)
        if self.auth and request.getHeader(b"authorization") != self.auth:
            scheme = self.auth.split(b" ", 1)[0]
            request.setHeader(b"www-authenticate", scheme + b' realm="origin"')
            return self._status(request, name, 401, b"unauthorized\n")
        if blob is not None:
            request.setHeader(b"docker-content-digest", name.encode())
            if self.redirect_to is not None:
                signed = f"{self.redirect_to}/{name}?X-Amz-Signature={uuid.uuid4().hex}&X-Amz-Date=now"
                request.setHeader(b"location", signed.encode())
                return self._status(request, name, 307, b"")
        if head:
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", str(os.path.getsize(path)).encode())
            self.stats["heads"][name] = self.stats["heads"].get(name, 0) + 1
            return self._status(request, name, 200, b"")
        if fault in ("500", "503"):
            return self._status(request, name, int(fault), b"origin fault\n")
        st = os.stat(path)
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'.encode()
        request.setHeader(b"etag", etag)
        inm = request.getHeader(b"if-none-match")
        # setLastModified answers CACHED (and sets 304) when If-Modified-Since says so.
        cached = request.setLastModified(st.st_mtime) == CACHED
        if inm == etag or (inm is None and cached):
            return self._status(request, name, 304, b"")
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"accept-ranges", b"bytes")
        offset, length = 0, st.st_size
        wanted = _range(request.getHeader(b"range"), st.st_size)
        if_range = request.getHeader(b"if-range")
        if wanted is not None and (if_range is None or if_range == etag) and not chunked:
            offset, length = wanted
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {offset}-{offset + length - 1}/{st.st_size}".encode())
        self._count(name, request.code)
        if fault == "stall":
            request.setHeader(b"content-length", str(length).encode())
            request.write(b"")
            return NOT_DONE_YET
        if not chunked:
            request.setHeader(b"content-length", str(length).encode())
        _Body(request, path, self.stats, name, offset, length, self.rate, self.clock, fault, self.shared)
        return NOT_DONE_YET

    def _seen(self, request: Request, name: str) -> None:
        """Count a request (HEADs apart) and whether it carried credentials."""
        if request.method != b"HEAD":
            self.stats["requests"][name] = self.stats["requests"].get(name, 0) + 1
        if request.getHeader(b"authorization") is not None:
            self.stats["auth"][name] = self.stats["auth"].get(name, 0) + 1

    def _count(self, name: str, code: int) -> None:
        key = f"{name} {code}"
        self.stats["statuses"][key] = self.stats["statuses"].get(key, 0) + 1

    def _status(self, request: Request, name: str, code: int, body: bytes) -> bytes:
        request.setResponseCode(code)
        self._count(name, code)
        return body


class Options(usage.Options):
    optParameters = [
        ["dir", None, ".", "Directory to serve."],
        ["port", None, "tcp:0:interface=127.0.0.1", "Endpoint to listen on."],
        ["port-file", None, None, "Write the port number here once listening."],
        ["rate", None, None, "Pace every response to this many bytes/s (K, M, G suffixes)."],
        ["total-rate", None, None, "Pace all responses together to this many bytes/s (K, M, G suffixes)."],
        ["auth", None, None, "Answer 401 unless the request has 'Authorization: Bearer AUTH'."],
        ["basic-auth", None, None, "Answer 401 unless the request has HTTP Basic credentials USER:PASSWORD."],
        ["redirect-to", None, None, "Base URL /redirect/NAME (and registry-like blobs) redirect to."],
    ]
    optFlags = [["registry-like", None, "Serve /v2/<name>/blobs/sha256:<hex> from the file sha256:<hex>."]]


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
    total = parse_rate(opts["total-rate"]) if opts["total-rate"] else None
    origin = Origin(
        opts["dir"], rate, reactor, opts["auth"], opts["registry-like"], opts["redirect-to"], total_rate=total,
        basic_auth=opts["basic-auth"],
    )
    d = serverFromString(reactor, opts["port"]).listen(Site(origin))
    d.addCallback(listening)
    def failed(f: Any) -> None:
        print(f"origin: {f.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    d.addErrback(failed)
    reactor.run()


if __name__ == "__main__":
    main()
