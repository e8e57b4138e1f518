"""Private images through the peer proxy: real registries with htpasswd and with token auth.

A peer that holds a private blob (because a client with credentials pulled it) must not hand it
to a client without them, nor must any other peer: such a client gets the registry's own 401
with its C{WWW-Authenticate} challenge, and never a byte of the blob.  The Bearer token dance
(401, token from the realm, retry with the token) works through both ways in: the mirror and
the forward proxy.  The registries are the real distribution registry, one plain HTTP with
htpasswd (bcrypt) and one TLS with token auth backed by L{dfly.devtools.tokenserver}.
"""

from __future__ import annotations

import hashlib
import http.client as http_client
import json
import os
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from registryenv import (
    auth_file,
    basic,
    certs_dir_with,
    fetch_token,
    http,
    parse_challenge,
    peer_ca,
    require_programs,
    snippet,
    start_proxy_peer,
)

from dfly.devtools.clients import check_dir_blobs, skopeo
from dfly.devtools.distribution import start_registry, start_token_server
from dfly.devtools.image import Blob, Image
from dfly.devtools.swarm import Swarm

pytestmark = [pytest.mark.registry, pytest.mark.loopback]

HIJACK = r"^registry\.dfly\.test(:[0-9]+)?$"
REPO = "private/app"
USERS = {
    "alice": {"password": "alice-secret", "actions": ["pull", "push"]},
    "bob": {"password": "bob-secret", "actions": []},
}


def close_swarm(swarm: Swarm) -> None:
    codes = swarm.close()
    crashed = {n: c for n, c in codes.items() if c not in (0, -15, None)}
    assert not crashed, f"processes exited abnormally: {crashed}"


@pytest.fixture(scope="module")
def htp_env(
    tmp_path_factory: pytest.TempPathFactory, small_image: Image, test_hostnames: dict[str, str]
) -> Iterator[SimpleNamespace]:
    """A plain-HTTP registry with htpasswd auth holding the small image as private/app:v1, a
    supernode and two peers in mirror mode for it (htp-a, htp-b)."""
    require_programs("docker-registry", "skopeo")
    root = str(tmp_path_factory.mktemp("registry-htpasswd"))
    swarm = Swarm(os.path.join(root, "swarm"))
    try:
        htp = start_registry(swarm, "registry-htpasswd", host=test_hostnames["registry"], htpasswd={"alice": "alice-secret"})
        p = skopeo(["copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds", "alice:alice-secret",
                    small_image.oci_ref(), f"docker://{htp.hostport}/{REPO}:v1"])
        assert p.returncode == 0, p.stderr
        swarm.start_supernode()
        peers = {name: start_proxy_peer(swarm, name, "--registry", htp.url) for name in ("htp-a", "htp-b")}
        yield SimpleNamespace(root=root, swarm=swarm, htp=htp, ports={name: port for name, (_, port) in peers.items()})
    finally:
        close_swarm(swarm)


@pytest.fixture(scope="module")
def tok_env(
    tmp_path_factory: pytest.TempPathFactory, small_image: Image, test_hostnames: dict[str, str], test_pki: Any
) -> Iterator[SimpleNamespace]:
    """A TLS registry with token auth (our token server) holding the small image as
    private/app:v1, a supernode, two peers in mirror mode for it (tok-a, tok-b) and one
    forward proxy intercepting its TLS (tok-proxy)."""
    require_programs("docker-registry", "skopeo")
    root = str(tmp_path_factory.mktemp("registry-token"))
    swarm = Swarm(os.path.join(root, "swarm"))
    ca = test_pki.ca.cert_path
    try:
        tokens, token_auth = start_token_server(swarm, "tokens", USERS)
        tok = start_registry(swarm, "registry-token", host=test_hostnames["registry"], tls=test_pki.server, ca_file=ca, token=token_auth)
        p = skopeo(["copy", "--preserve-digests", "--dest-cert-dir", test_pki.certs_dir, "--dest-creds", "alice:alice-secret",
                    small_image.oci_ref(), f"docker://{tok.hostport}/{REPO}:v1"])
        assert p.returncode == 0, p.stderr
        swarm.start_supernode("--origin-ca", ca)
        peers = {
            "tok-a": start_proxy_peer(swarm, "tok-a", "--registry", tok.url, "--upstream-ca", ca),
            "tok-b": start_proxy_peer(swarm, "tok-b", "--registry", tok.url, "--upstream-ca", ca),
            "tok-proxy": start_proxy_peer(swarm, "tok-proxy", "--hijack", HIJACK, "--upstream-ca", ca),
        }
        yield SimpleNamespace(
            root=root, swarm=swarm, tok=tok, tokens=tokens, token_auth=token_auth,
            ports={name: port for name, (_, port) in peers.items()},
            dfly_certs=certs_dir_with(peer_ca(peers["tok-proxy"][0]), os.path.join(root, "dfly-certs")),
        )
    finally:
        close_swarm(swarm)


def tokens_issued(env: SimpleNamespace) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{env.tokens.info['port']}/_stats", timeout=10) as r:
        return dict(json.load(r)["issued"])


def mirror_pull(env: SimpleNamespace, reg: Any, peer: str, out: str, user: str, password: str) -> Any:
    """skopeo through etc/containers/registries.conf at C{peer}, with the user's credentials
    for the registry and for the mirror (an auth file: skopeo keeps --src-creds from mirrors)."""
    mirror = f"127.0.0.1:{env.ports[peer]}"
    conf = os.path.join(env.root, f"{peer}-registries.conf")
    with open(conf, "w") as f:
        f.write(snippet("containers/registries.conf", proxy=mirror, registry=reg.hostport))
    auth = auth_file(os.path.join(env.root, f"{peer}-auth.json"), user, password, reg.hostport, mirror)
    return skopeo(["copy", "--authfile", auth, f"docker://{reg.hostport}/{REPO}:v1", f"dir:{out}"], registries_conf=conf)


def assert_refused(answer: tuple[int, dict[str, str], bytes], blob: Blob, scheme: str) -> None:
    """The registry's 401 with its challenge, and not the blob (nor any part of it)."""
    status, headers, body = answer
    assert status == 401, f"expected 401, got {status} with {len(body)} bytes"
    assert parse_challenge(headers.get("www-authenticate", ""))[0] == scheme, headers
    assert len(body) < 4096 and hashlib.sha256(body).hexdigest() != blob.hex
    assert b"UNAUTHORIZED" in body or b"unauthorized" in body, body[:300]


def assert_blob(answer: tuple[int, dict[str, str], bytes], blob: Blob) -> None:
    status, _, body = answer
    assert status == 200, f"expected the blob, got {status}: {body[:300]!r}"
    assert hashlib.sha256(body).hexdigest() == blob.hex and len(body) == blob.size


def test_htpasswd_blob_needs_the_clients_own_credentials(htp_env: SimpleNamespace, small_image: Image) -> None:
    """alice pulls private/app through peer htp-a's mirror with her password.  Then, for the
    same blob, a client without credentials or with a wrong password gets the registry's 401
    and Basic challenge from htp-a (which holds the blob), from htp-b, and through htp-b as a
    forward proxy (absolute-form request) - never the bytes, and the registry sends no blob
    bytes for them; with alice's password htp-b serves it, verified.  skopeo through htp-b as
    HTTP_PROXY is refused without or with a wrong password and pulls with hers."""
    env = htp_env
    out = os.path.join(env.root, "htp-alice")
    p = mirror_pull(env, env.htp, "htp-a", out, "alice", "alice-secret")
    assert p.returncode == 0, p.stderr
    check_dir_blobs(out, small_image)
    assert not [g for g in env.htp.egress()["blob_gets"] if g[3].startswith("skopeo")], "skopeo went to the registry"

    blob = max(small_image.layers, key=lambda b: b.size)
    path = f"/v2/{REPO}/blobs/{blob.digest}"
    wrong = basic("alice", "not-her-password")
    mark = env.htp.log_size()
    for peer in ("htp-a", "htp-b"):
        url = f"http://127.0.0.1:{env.ports[peer]}{path}"
        assert_refused(http(url), blob, "basic")
        assert_refused(http(url, wrong), blob, "basic")
        assert_refused(http(url, basic("mallory", "x")), blob, "basic")
    forward = f"http://127.0.0.1:{env.ports['htp-b']}"
    assert_refused(http(env.htp.url + path, proxy=forward), blob, "basic")
    assert_refused(http(env.htp.url + path, wrong, proxy=forward), blob, "basic")
    assert env.htp.egress(mark)["blob_bytes"] == 0, "the registry sent blob bytes for refused clients"

    assert_blob(http(f"http://127.0.0.1:{env.ports['htp-b']}{path}", basic("alice", "alice-secret")), blob)
    assert_blob(http(env.htp.url + path, basic("alice", "alice-secret"), proxy=forward), blob)

    # skopeo with HTTP_PROXY at htp-b (absolute-form requests to the plain-HTTP registry).
    proxy_env = {"HTTP_PROXY": forward, "NO_PROXY": "localhost,127.0.0.0/8"}
    ref = f"docker://{env.htp.hostport}/{REPO}:v1"
    for creds in ([], ["--src-creds", "alice:wrong"]):
        p = skopeo(["copy", "--src-tls-verify=false", *creds, ref, f"dir:{env.root}/htp-refused"], env=proxy_env)
        assert p.returncode != 0 and "unauthorized" in p.stderr.lower(), p.stderr
    out = os.path.join(env.root, "htp-forward-alice")
    p = skopeo(["copy", "--src-tls-verify=false", "--src-creds", "alice:alice-secret", ref, f"dir:{out}"], env=proxy_env)
    assert p.returncode == 0, p.stderr
    check_dir_blobs(out, small_image)
    assert not [g for g in env.htp.egress()["blob_gets"] if g[3].startswith("skopeo")], "skopeo went to the registry"


def swarm_answer(url: str, headers: dict[str, str] | None, proxy: str) -> bytes | None:
    """The body a client gets through C{proxy}, or None when its connection was cut."""
    try:
        return http(url, headers, proxy=proxy)[2]
    except (OSError, http_client.HTTPException):
        return None


def test_another_host_never_unlocks_a_private_blob(htp_env: SimpleNamespace, small_image: Image) -> None:
    """Once the swarm holds a private blob (alice pulled it with her password), a client
    naming another host for the same digest through the forward proxy - a server that
    answers every HEAD with 200 and serves other bytes under that digest - gets none of the
    blob: not without credentials, not with made-up ones, on either peer.  (A digest task
    fetched with credentials is scoped to the registry that served it.)"""
    env = htp_env
    blob = max(small_image.layers, key=lambda b: b.size)
    path = f"/v2/{REPO}/blobs/{blob.digest}"
    forward_b = f"http://127.0.0.1:{env.ports['htp-b']}"
    assert_blob(http(env.htp.url + path, basic("alice", "alice-secret"), proxy=forward_b), blob)

    fake_dir = os.path.join(env.root, "fake-registry")
    os.makedirs(fake_dir, exist_ok=True)
    with open(os.path.join(fake_dir, blob.digest), "wb") as f:
        f.write(b"x" * blob.size)
    port = env.swarm.start_origin(fake_dir, "--registry-like")
    fake = f"http://127.0.0.1:{port}/v2/anything/blobs/{blob.digest}"
    assert http(fake, method="HEAD")[0] == 200
    for peer in ("htp-a", "htp-b"):
        forward = f"http://127.0.0.1:{env.ports[peer]}"
        for headers in (None, basic("mallory", "x")):
            body = swarm_answer(fake, headers, forward)
            assert body is None or hashlib.sha256(body).hexdigest() != blob.hex, (peer, headers)


def test_token_blob_needs_a_token_with_access(tok_env: SimpleNamespace, small_image: Image) -> None:
    """The token dance through the mirror: skopeo with alice's password pulls private/app via
    peer tok-a (401 from the registry through the mirror, token from the realm, retry), and the
    token server saw her.  Then, for the same blob, tok-a and tok-b answer the registry's 401 with
    its Bearer challenge to a client with no token, with an anonymous token (no access), with bob's
    token (no pull right) and with a forged token - never the bytes; alice's token gets it."""
    env = tok_env
    before = tokens_issued(env).get("alice", 0)
    out = os.path.join(env.root, "tok-alice")
    p = mirror_pull(env, env.tok, "tok-a", out, "alice", "alice-secret")
    assert p.returncode == 0, p.stderr
    check_dir_blobs(out, small_image)
    assert tokens_issued(env).get("alice", 0) > before, "no token was fetched for alice"

    blob = max(small_image.layers, key=lambda b: b.size)
    path = f"/v2/{REPO}/blobs/{blob.digest}"
    status, headers, _ = http(f"http://127.0.0.1:{env.ports['tok-b']}{path}")
    assert status == 401
    challenge = headers["www-authenticate"]
    scheme, params = parse_challenge(challenge)
    assert scheme == "bearer" and params["realm"] == env.token_auth.realm, challenge
    anonymous = fetch_token(challenge)
    bobs = fetch_token(challenge, basic("bob", "bob-secret"))
    forged = anonymous.rsplit(".", 1)[0] + ".c2lnbmF0dXJl"
    mark = env.tok.log_size()
    for peer in ("tok-a", "tok-b"):
        url = f"http://127.0.0.1:{env.ports[peer]}{path}"
        assert_refused(http(url), blob, "bearer")
        for token in (anonymous, bobs, forged, "not-a-token"):
            assert_refused(http(url, {"Authorization": f"Bearer {token}"}), blob, "bearer")
    assert env.tok.egress(mark)["blob_bytes"] == 0, "the registry sent blob bytes for refused clients"

    alices = fetch_token(challenge, basic("alice", "alice-secret"))
    assert_blob(http(f"http://127.0.0.1:{env.ports['tok-b']}{path}", {"Authorization": f"Bearer {alices}"}), blob)


def test_token_dance_through_forward_proxy(tok_env: SimpleNamespace, small_image: Image) -> None:
    """skopeo with HTTPS_PROXY at peer tok-proxy (intercepting the registry's TLS; skopeo trusts
    only the peer's CA): with alice's password the pull completes, verified, after a token was
    fetched for her; with no credentials and with bob's (no pull right) it is refused."""
    env = tok_env
    proxy_env = {"HTTPS_PROXY": f"http://127.0.0.1:{env.ports['tok-proxy']}", "NO_PROXY": "localhost,127.0.0.0/8"}
    ref = f"docker://{env.tok.hostport}/{REPO}:v1"
    for creds in ([], ["--src-creds", "bob:bob-secret"]):
        p = skopeo(["copy", "--src-cert-dir", env.dfly_certs, *creds, ref, f"dir:{env.root}/tok-refused"], env=proxy_env)
        assert p.returncode != 0
        assert "unauthorized" in p.stderr.lower() or "denied" in p.stderr.lower(), p.stderr
    before = tokens_issued(env).get("alice", 0)
    out = os.path.join(env.root, "tok-proxy-alice")
    p = skopeo(["copy", "--src-cert-dir", env.dfly_certs, "--src-creds", "alice:alice-secret", ref, f"dir:{out}"], env=proxy_env)
    assert p.returncode == 0, p.stderr
    check_dir_blobs(out, small_image)
    assert tokens_issued(env).get("alice", 0) > before
