"""Plain HTTP clients for the loopback proxy tests: one request with http.client, and
blobs named by their digest for the registry-like origin."""

from __future__ import annotations

import hashlib
import http.client
import os
from urllib.parse import urlsplit

from filegen import make_file

from dfly.devtools.swarm import sha256_file

LOCAL = "tcp:0:interface=127.0.0.1"


class Answer:
    """What a plain HTTP client got: status, headers, body, and the error that cut it short."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, error: Exception | None) -> None:
        self.status, self.headers, self.body, self.error = status, headers, body, error

    @property
    def complete(self) -> bool:
        return self.error is None and len(self.body) == int(self.headers.get("content-length", len(self.body)))


def get(url: str, headers: dict[str, str] | None = None, proxy: str | None = None, method: str = "GET",
        body: bytes | None = None, timeout: float = 60.0) -> Answer:
    """One request with http.client (no redirects followed, nothing decoded); with C{proxy}
    (host:port) the request is sent in absolute form to that proxy."""
    parts = urlsplit(url)
    host, port = (proxy.split(":") if proxy else (parts.hostname, parts.port or 80))
    conn = http.client.HTTPConnection(str(host), int(port), timeout=timeout)
    target = url if proxy else (parts.path + (f"?{parts.query}" if parts.query else ""))
    try:
        conn.request(method, target, body=body, headers=headers or {})
        r = conn.getresponse()
        got = {k.lower(): v for k, v in r.getheaders()}
        data = b""
        error = None
        try:
            data = r.read()
        except (http.client.IncompleteRead, ConnectionError, OSError) as e:
            error = e
            data = getattr(e, "partial", b"")
        return Answer(r.status, got, data, error)
    except (ConnectionError, OSError, http.client.HTTPException) as e:
        return Answer(0, {}, b"", e)
    finally:
        conn.close()


def blob_url(base: str, name: str, digest: str, query: str = "") -> str:
    return f"{base}/v2/{name}/blobs/{digest}{query}"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def registry_blob(files: str, size: int, seed: int = 1) -> tuple[str, str]:
    """A blob file named by its digest in C{files} (for the registry-like origin)."""
    path = make_file(files, "tmp.bin", size, seed=seed)
    digest = "sha256:" + sha256_file(path)
    os.rename(path, os.path.join(files, digest))
    return digest, os.path.join(files, digest)
