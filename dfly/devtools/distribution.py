"""Run the real distribution registry (C{/usr/bin/docker-registry}, 2.8) on loopback for tests.

One function starts it, plain or with TLS, open or behind htpasswd (bcrypt) or token auth,
with its storage under a directory of the test's; the process belongs to a L{Swarm} so that it
is stopped with everything else.  The registry logs one JSON line per response, with the bytes
written (C{http.response.written}); L{Registry.egress} adds those up for blob C{GET}s, which is
how tests measure what the registry sent.

    reg = start_registry(swarm, "registry", tls=server_cert, htpasswd={"alice": "pw"})
    reg.url                       # https://registry.dfly.test:PORT (hostname as given)
    reg.egress()["blob_bytes"]    # bytes of blob bodies sent so far
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from dfly.devtools.pki import Issued
from dfly.devtools.swarm import Proc, Swarm, SwarmError

REGISTRY_BIN = "/usr/bin/docker-registry"


def registry_binary() -> str | None:
    """The registry program, or None when it is not installed."""
    found = shutil.which("docker-registry") or (REGISTRY_BIN if os.access(REGISTRY_BIN, os.X_OK) else None)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the registry wants a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_htpasswd(path: str, users: dict[str, str]) -> None:
    """An htpasswd file with bcrypt hashes, the only kind distribution accepts."""
    import bcrypt

    with open(path, "w") as f:
        for name, password in users.items():
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
            f.write(f"{name}:{hashed}\n")


@dataclass
class TokenAuth:
    """Where the registry sends clients for tokens and how it checks them."""

    realm: str  # e.g. http://127.0.0.1:PORT/token
    service: str
    issuer: str
    rootcertbundle: str  # PEM file with the token signer's certificate


@dataclass
class Registry:
    proc: Proc
    root: str
    host: str
    port: int
    tls: bool
    ca_file: str | None = None
    auth: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.hostport}"

    def log_size(self) -> int:
        """The log's current length: pass it to L{egress} to count only what follows."""
        try:
            return os.path.getsize(self.proc.log)
        except OSError:
            return 0

    def responses(self, since: int = 0) -> list[dict[str, Any]]:
        """Every completed response the registry logged after offset C{since} of its log."""
        out = []
        with open(self.proc.log, "rb") as f:
            f.seek(since)
            for raw in f:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("msg") == "response completed":
                    out.append(entry)
        return out

    def egress(self, since: int = 0) -> dict[str, Any]:
        """Bytes the registry wrote after offset C{since} of its log: all bodies (C{total_bytes}),
        and blob bodies of successful GETs (C{blob_bytes}); C{blob_gets} lists every blob GET as
        (uri, status, bytes, user agent)."""
        total = blob_bytes = 0
        blob_gets: list[tuple[str, int, int, str]] = []
        for e in self.responses(since):
            written = int(e.get("http.response.written", 0) or 0)
            total += written
            uri = str(e.get("http.request.uri", ""))
            if e.get("http.request.method") == "GET" and "/blobs/" in uri:
                if int(e.get("http.response.status", 0)) in (200, 206):
                    blob_bytes += written
                blob_gets.append((uri, int(e.get("http.response.status", 0)), written, str(e.get("http.request.useragent", ""))))
        return {"total_bytes": total, "blob_bytes": blob_bytes, "blob_gets": blob_gets}

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=self.ca_file)


def registry_config(
    root: str,
    port: int,
    *,
    tls: Issued | None = None,
    htpasswd_file: str | None = None,
    token: TokenAuth | None = None,
) -> dict[str, Any]:
    """The registry's configuration (JSON is YAML, so it is written as JSON)."""
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": os.path.join(root, "storage")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "dfly-test-secret", "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    if tls is not None:
        config["http"]["tls"] = {"certificate": tls.cert_path, "key": tls.key_path}
    if htpasswd_file and token:
        raise ValueError("one auth method at a time")
    if htpasswd_file:
        config["auth"] = {"htpasswd": {"realm": "dfly-registry", "path": htpasswd_file}}
    if token:
        config["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": token.rootcertbundle,
            }
        }
    return config


def start_registry(
    swarm: Swarm,
    name: str,
    *,
    host: str = "127.0.0.1",
    tls: Issued | None = None,
    ca_file: str | None = None,
    htpasswd: dict[str, str] | None = None,
    token: TokenAuth | None = None,
    timeout: float = 30.0,
) -> Registry:
    """Start a registry process named C{name} in C{swarm}; return once C{/v2/} answers.

    C{host} is only the name used in L{Registry.url}: the registry listens on 127.0.0.1.
    C{ca_file} is the CA that signed C{tls} (for the readiness check and for clients).
    """
    binary = registry_binary()
    if binary is None:
        raise SwarmError("docker-registry is not installed")
    root = os.path.join(swarm.root, name)
    os.makedirs(root, exist_ok=True)
    htpasswd_file = None
    if htpasswd is not None:
        htpasswd_file = os.path.join(root, "htpasswd")
        write_htpasswd(htpasswd_file, htpasswd)
    last_error = ""
    for _attempt in range(3):
        port = free_port()
        config_path = os.path.join(root, "config.yml")
        with open(config_path, "w") as f:
            json.dump(registry_config(root, port, tls=tls, htpasswd_file=htpasswd_file, token=token), f, indent=1)
        proc = swarm.spawn(name, [binary, "serve", config_path], None)
        auth = "htpasswd" if htpasswd else "token" if token else "none"
        reg = Registry(proc, root, host, port, tls is not None, ca_file, auth)
        try:
            _wait_ready(reg, timeout)
            return reg
        except SwarmError as e:
            last_error = str(e)
            proc.stop()
            swarm.procs.remove(proc)
    raise SwarmError(f"registry {name} did not start: {last_error}")


def _wait_ready(reg: Registry, timeout: float) -> None:
    url = f"{reg.scheme}://127.0.0.1:{reg.port}/v2/"
    ctx = reg.ssl_context()
    if ctx is not None:
        ctx.check_hostname = False  # the certificate names the host; we dial the address
    deadline = time.monotonic() + timeout
    while True:
        if not reg.proc.alive():
            raise SwarmError(f"exited with {reg.proc.popen.returncode}:\n{Swarm.tail(reg.proc.log)}")
        try:
            with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
                r.read()
            return
        except urllib.error.HTTPError as e:
            if e.code == 401:
                return
        except (OSError, ssl.SSLError):
            pass
        if time.monotonic() > deadline:
            raise SwarmError(f"no answer on {url} within {timeout:g} s:\n{Swarm.tail(reg.proc.log)}")
        time.sleep(0.05)


def start_token_server(
    swarm: Swarm,
    name: str,
    users: dict[str, dict[str, Any]],
    *,
    service: str = "dfly-registry",
    issuer: str = "dfly-token",
) -> tuple[Proc, TokenAuth]:
    """Start L{dfly.devtools.tokenserver} with a fresh signing certificate; return it and the
    C{auth.token} settings a registry needs to trust it.  C{users}: name -> {"password", "actions"}."""
    import sys

    from dfly.devtools.pki import make_ca

    root = os.path.join(swarm.root, name)
    signer = make_ca(root, "dfly token signer", stem="signer")
    users_file = os.path.join(root, "users.json")
    with open(users_file, "w") as f:
        json.dump(users, f)
    ready = os.path.join(root, "ready.json")
    proc = swarm.spawn(
        name,
        [
            sys.executable, "-m", "dfly.devtools.tokenserver", "--key", signer.key_path, "--cert", signer.cert_path,
            "--users", users_file, "--issuer", issuer, "--ready-file", ready,
        ],
        ready,
    )
    realm = f"http://127.0.0.1:{proc.info['port']}/token"
    return proc, TokenAuth(realm, service, issuer, signer.cert_path)
