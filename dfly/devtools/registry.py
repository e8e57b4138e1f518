"""Run a real container registry (distribution's C{docker-registry}) on loopback.

For tests and benchmarks: L{start_registry} writes a config into a directory,
starts C{/usr/bin/docker-registry serve} as a child process, waits until its
C{/v2/} answers, and returns a L{Registry} to stop it.  Storage is the
filesystem driver under that directory; the access log (one JSON line per
request, with the bytes written) goes to C{registry.log}, which
L{Registry.blob_egress} sums to show how many blob bytes the registry sent.

    reg = start_registry(tmpdir)                       # plain HTTP, no auth
    reg = start_registry(tmpdir, auth={"htpasswd": PATH})
    reg = start_registry(tmpdir, tls={"certificate": CRT, "key": KEY})
    digest = reg.push_blob("library/app", data)         # monolithic upload
    reg.stop()

C{auth} is passed as the config's C{auth:} section (C{{"htpasswd": PATH}} is
short for C{{"htpasswd": {"realm": "dfly", "path": PATH}}}; a C{{"token": ...}}
section is passed unchanged); C{tls} as C{http.tls}.  Blob helpers talk plain
HTTP (or HTTPS without verification) with C{urllib}; pass C{headers} for auth.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _yaml(value: Any, indent: int = 0) -> str:
    """A tiny YAML writer for nested dicts of str/int/bool/list (enough for a config)."""
    pad = "  " * indent
    lines = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(item, indent + 1))
        elif isinstance(item, list):
            lines.append(f"{pad}{key}: {json.dumps(item)}")
        elif isinstance(item, bool):
            lines.append(f"{pad}{key}: {'true' if item else 'false'}")
        else:
            lines.append(f"{pad}{key}: {json.dumps(item)}")
    return "\n".join(lines)


@dataclass
class Registry:
    """A running registry process."""

    root: str
    port: int
    popen: subprocess.Popen[bytes]
    log: str
    scheme: str = "http"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the registry's HTTP API -------------------------------------------------
    def request(
        self, method: str, path: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request; returns (status, headers with lower-case names, body)."""
        all_headers = {**self.headers, **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=all_headers)
        context = ssl._create_unverified_context() if self.scheme == "https" else None
        try:
            with urllib.request.urlopen(req, timeout=60, context=context) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def push_blob(self, name: str, data: bytes, headers: dict[str, str] | None = None) -> str:
        """Upload C{data} as a blob of repository C{name}; returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, h, body = self.request("POST", f"/v2/{name}/blobs/uploads/", b"", headers)
        if status != 202:
            raise RuntimeError(f"upload start answered {status}: {body[:200]!r}")
        location = h["location"]
        if location.startswith("/"):
            location = self.url + location
        sep = "&" if "?" in location else "?"
        put = urllib.request.Request(
            f"{location}{sep}digest={digest}",
            data=data,
            method="PUT",
            headers={**self.headers, **(headers or {}), "Content-Type": "application/octet-stream"},
        )
        context = ssl._create_unverified_context() if self.scheme == "https" else None
        with urllib.request.urlopen(put, timeout=120, context=context) as r:
            if r.status != 201:
                raise RuntimeError(f"upload answered {r.status}")
        return digest

    def push_blob_file(self, name: str, path: str, headers: dict[str, str] | None = None) -> str:
        """Upload a file as a blob (read whole; meant for test files of tens of MB)."""
        with open(path, "rb") as f:
            return self.push_blob(name, f.read(), headers)

    def push_manifest(self, name: str, tag: str, config: str, layers: list[tuple[str, int]]) -> str:
        """Push an OCI image manifest naming C{config} (a pushed blob) and C{layers}
        ((digest, size) of pushed blobs); returns the manifest digest."""
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                       "size": self.blob_size(name, config)},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}
                for d, s in layers
            ],
        }
        body = json.dumps(manifest).encode()
        status, h, text = self.request(
            "PUT", f"/v2/{name}/manifests/{tag}", body,
            {"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        if status != 201:
            raise RuntimeError(f"manifest push answered {status}: {text[:300]!r}")
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def blob_size(self, name: str, digest: str) -> int:
        status, h, _ = self.request("HEAD", f"/v2/{name}/blobs/{digest}")
        if status != 200:
            raise RuntimeError(f"HEAD of {digest} answered {status}")
        return int(h["content-length"])

    def access_log(self) -> list[dict[str, Any]]:
        """The registry's JSON log lines that describe a finished HTTP request."""
        out = []
        try:
            with open(self.log, errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if not line.startswith("{"):
                        continue
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if "http.response.status" in entry and "http.request.method" in entry:
                        out.append(entry)
        except OSError:
            pass
        return out

    def blob_egress(self, digest: str | None = None) -> tuple[int, int]:
        """(GET requests answered 200/206 for blobs, body bytes they sent), from the access log;
        only for C{digest} when given."""
        count = sent = 0
        for entry in self.access_log():
            uri = str(entry.get("http.request.uri", ""))
            if entry.get("http.request.method") != "GET" or "/blobs/sha256:" not in uri:
                continue
            if digest is not None and digest not in uri:
                continue
            if entry.get("http.response.status") in (200, 206):
                count += 1
                sent += int(entry.get("http.response.written", 0) or 0)
        return count, sent


def start_registry(
    root: str,
    auth: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
    port: int | None = None,
    extra: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> Registry:
    """Start C{docker-registry} with its storage and config under C{root}; wait until it answers.

    C{extra} entries are merged into the top level of the config.
    """
    os.makedirs(root, exist_ok=True)
    port = port or free_port()
    http: dict[str, Any] = {"addr": f"127.0.0.1:{port}", "secret": "dfly-test-secret",
                            "headers": {"X-Content-Type-Options": ["nosniff"]}}
    if tls:
        http["tls"] = tls
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": os.path.join(root, "storage")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": http,
    }
    if auth:
        section = dict(auth)
        if isinstance(section.get("htpasswd"), str):
            section["htpasswd"] = {"realm": "dfly", "path": section["htpasswd"]}
        config["auth"] = section
    config.update(extra or {})
    path = os.path.join(root, "config.yml")
    with open(path, "w") as f:
        f.write(_yaml(config) + "\n")
    log = os.path.join(root, "registry.log")
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [REGISTRY_BIN, "serve", path], stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
        )
    reg = Registry(root, port, popen, log, scheme="https" if tls else "http")
    deadline = time.monotonic() + timeout
    while True:
        if popen.poll() is not None:
            with open(log, errors="replace") as f:
                raise RuntimeError(f"docker-registry exited with {popen.returncode}:\n{f.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                reg.stop()
                raise RuntimeError(f"docker-registry did not listen within {timeout:g} s; see {log}") from None
            time.sleep(0.05)
    return reg
