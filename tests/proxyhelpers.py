"""The proxy resource in memory: a fake registry upstream, a fake swarm (L{FakeNode}),
treq's StubTreq as the client, timers on a Clock."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from streamhelpers import FakeNode
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.task import Clock
from twisted.web.client import RedirectAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dfly.proxy.resource import ProxyResource
from dfly.urls import digest_task_id

P = 105
BLOB = bytes(range(256)) * 40 + b"end"  # 10243 bytes
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
BLOB_PATH = f"/v2/lib/app/blobs/{DIGEST}"
TID = digest_task_id(DIGEST)


class FakeRegistry(Resource):
    """Blobs, a missing manifest, uploads that count their bytes, optional bearer auth."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, dict[str, list[str]]]] = []
        self.token: str | None = None
        self.blob = BLOB
        self.ranges = True  # honour Range on blobs
        self.hold = False  # GET bodies wait in self.pending
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        method = request.method.decode()
        path = request.uri.decode()
        headers = {k.decode().lower(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        self.seen.append((method, path, headers))
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        if path.startswith("/v2/lib/app/blobs/sha256:"):
            if self.token and request.getHeader(b"authorization") != f"Bearer {self.token}".encode():
                request.setResponseCode(401)
                request.setHeader(b"www-authenticate", b'Bearer realm="https://auth.example/token",scope="x"')
                request.setHeader(b"content-type", b"application/json")
                return b'{"errors":[{"code":"UNAUTHORIZED"}]}'
            if path != BLOB_PATH:
                request.setResponseCode(404)
                return b'{"errors":[{"code":"BLOB_UNKNOWN"}]}'
            request.setHeader(b"content-type", b"application/vnd.oci.image.layer.v1.tar+gzip")
            request.setHeader(b"docker-content-digest", DIGEST.encode())
            request.setHeader(b"content-length", str(len(self.blob)).encode())
            if method == "HEAD":
                return b""
            if self.hold:
                self.pending.append(request)
                return NOT_DONE_YET
            wanted = request.getHeader(b"range")
            if wanted and self.ranges and wanted.startswith(b"bytes=") and wanted.endswith(b"-"):
                first = int(wanted[6:-1])
                request.setResponseCode(206)
                request.setHeader(b"content-range", f"bytes {first}-{len(self.blob) - 1}/{len(self.blob)}".encode())
                request.setHeader(b"content-length", str(len(self.blob) - first).encode())
                return self.blob[first:]
            return self.blob
        if path.startswith("/v2/lib/app/manifests/"):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
        if path.startswith("/v2/lib/app/blobs/uploads/"):
            body = request.content.read()  # type: ignore[union-attr]
            request.setResponseCode(201)
            request.setHeader(b"location", b"/v2/lib/app/blobs/" + DIGEST.encode())
            return json.dumps({"got": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
        if path == "/moved":
            request.setResponseCode(302)
            request.setHeader(b"location", b"/elsewhere")
            return b""
        request.setResponseCode(404)
        return b"no"

    def gets(self) -> list[str]:
        return [p for m, p, _ in self.seen if m == "GET"]


class Env:
    def __init__(self, tmp: str, **kw: Any) -> None:
        self.clock = Clock()
        self.node = FakeNode(tmp, self.clock)
        self.registry = FakeRegistry()
        self.upstream = RequestTraversalAgent(self.registry)
        self.proxy = ProxyResource(
            self.clock, self.node, self.upstream, RedirectAgent(self.upstream),
            registry="http://registry.example", fallback_after=5.0, **kw,
        )
        self.client = StubTreq(self.proxy)

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            self.clock.advance(0)
            self.upstream.flush()
            self.client.flush()

    def get(self, path: str, headers: dict[bytes, list[bytes]] | None = None, method: str = "GET",
            data: bytes | None = None) -> list[Any]:
        out: list[Any] = []
        d = self.client.request(method, "http://proxy.example" + path, headers=headers, data=data, allow_redirects=False)
        d.addBoth(out.append)
        self.pump()
        return out

    def body(self, response: Any) -> list[Any]:
        out: list[Any] = []
        self.client.content(response).addBoth(out.append)
        self.pump()
        return out
