"""Helpers of the registry end-to-end tests: etc/ snippets, proxy peers, raw registry requests."""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from dfly.devtools.swarm import Proc, Swarm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(ROOT, "etc")

# The placeholders of the etc/ snippets (see etc/README.md).
SNIPPET_PROXY = "127.0.0.1:65001"
SNIPPET_REGISTRY = "registry.example.com"


def require_programs(*names: str) -> None:
    """Skip the test when one of these programs is not installed."""
    import pytest

    from dfly.devtools.clients import which

    missing = [n for n in names if which(n) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/system-deps installs them)")


def snippet(relpath: str, *, proxy: str, registry: str | None = None) -> str:
    """The text of etc/RELPATH with its documented placeholders replaced."""
    with open(os.path.join(ETC, relpath)) as f:
        text = f.read()
    assert SNIPPET_PROXY in text, f"etc/{relpath} does not name {SNIPPET_PROXY}"
    text = text.replace(SNIPPET_PROXY, proxy)
    if registry is not None:
        assert SNIPPET_REGISTRY in text, f"etc/{relpath} does not name {SNIPPET_REGISTRY}"
        text = text.replace(SNIPPET_REGISTRY, registry)
    return text


def systemd_environment(text: str) -> dict[str, str]:
    """The Environment="K=V" settings of a systemd unit drop-in."""
    env = {}
    for line in text.splitlines():
        m = re.fullmatch(r'\s*Environment="([A-Za-z_]+)=([^"]*)"\s*', line)
        if m:
            env[m.group(1)] = m.group(2)
    return env


def start_proxy_peer(swarm: Swarm, name: str, *extra: str) -> tuple[Proc, int]:
    """A peer daemon with its registry proxy on a free loopback port; returns it and the port."""
    proc = swarm.start_peer(name, *extra, proxy="tcp:0:interface=127.0.0.1")
    return proc, int(proc.info["proxy"])


def peer_ca(proc: Proc) -> str:
    """The peer's interception CA certificate (created in its home)."""
    return os.path.join(proc.info["home"], "ca.pem")


def certs_dir_with(path: str, directory: str) -> str:
    """A directory holding only C{path} as ca.crt: what skopeo's --*-cert-dir reads."""
    os.makedirs(directory, exist_ok=True)
    with open(path, "rb") as src, open(os.path.join(directory, "ca.crt"), "wb") as dst:
        dst.write(src.read())
    return directory


def auth_file(path: str, user: str, password: str, *hosts: str) -> str:
    """A containers auth.json giving C{user}'s credentials for each C{host[:port]}.

    skopeo never sends --src-creds to a mirror (they are meant for the primary registry):
    credentials for a mirror are looked up under the mirror's own host:port."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    with open(path, "w") as f:
        json.dump({"auths": {host: {"auth": token} for host in hosts}}, f)
    return path


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def http(
    url: str,
    headers: dict[str, str] | None = None,
    *,
    proxy: str | None = None,
    context: ssl.SSLContext | None = None,
    method: str = "GET",
    limit: int = 1 << 30,
) -> tuple[int, dict[str, str], bytes]:
    """One request (through an HTTP proxy in absolute form with C{proxy}); returns
    (status, headers with lower-case names, body), error statuses included."""
    handlers: list[Any] = [urllib.request.ProxyHandler({"http": proxy} if proxy else {})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with opener.open(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read(limit)
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read(limit)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """C{Bearer realm="...",service="..."} -> ("bearer", {...})."""
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def fetch_token(challenge: str, auth: dict[str, str] | None = None) -> str:
    """Follow a Bearer challenge to the token server (with Basic C{auth}); return the token."""
    scheme, params = parse_challenge(challenge)
    assert scheme == "bearer", challenge
    query = {"service": params["service"]}
    if "scope" in params:
        query["scope"] = params["scope"]
    url = params["realm"] + "?" + urllib.parse.urlencode(query)
    status, _, body = http(url, auth)
    assert status == 200, f"token server answered {status}: {body[:200]!r}"
    return str(json.loads(body)["token"])
