"""The peer daemon's proxy as real processes: twistd peers and supernode, the counting
origin in registry-like mode, and a real docker-registry, with plain HTTP clients."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from filegen import make_file
from httphelpers import LOCAL, Answer, blob_url, get, registry_blob, sha

from dfly.devtools.registry import Registry, free_port, start_registry
from dfly.devtools.swarm import Swarm, sha256_file
from dfly.pieces import MIB

pytestmark = pytest.mark.loopback


@pytest.fixture
def registry(tmp_path: Any) -> Iterator[Registry]:
    """A real docker-registry (plain HTTP, no auth) in the test's directory, stopped at teardown."""
    reg = start_registry(os.path.join(str(tmp_path), "registry"))
    try:
        yield reg
    finally:
        reg.stop()


def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def proxy_log(swarm: Swarm, peer: str) -> list[str]:
    with open(swarm.peers[peer].log, errors="replace") as f:
        return [line for line in f if "route=" in line]


# -- a real registry --------------------------------------------------------------------------


def test_three_peers_pull_a_registry_blob_once(swarm: Swarm, registry: Registry) -> None:
    """Three peer daemons, each used as a registry mirror by its own client, pull the same
    48 MiB blob from a real docker-registry at once: every copy has the right sha256 and
    headers, and the registry's access log shows the blob's bytes sent once (plus the three
    HEAD checks)."""
    size = 48 * MIB
    data = os.urandom(size)
    digest = registry.push_blob("team/app", data)
    small = registry.push_blob("team/app", b"config")
    swarm.start_supernode()
    peers = ["p1", "p2", "p3"]
    for p in peers:
        swarm.start_peer(p, "--registry", registry.url, proxy=LOCAL)
    answers: dict[str, Answer] = {}

    def pull(p: str) -> None:
        answers[p] = get(blob_url(swarm.proxy_url(p), "team/app", digest), timeout=120)

    threads = [threading.Thread(target=pull, args=(p,)) for p in peers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for p in peers:
        a = answers[p]
        assert a.status == 200 and a.complete, (p, a.status, a.error)
        assert sha(a.body) == digest
        assert a.headers["docker-content-digest"] == digest
        assert a.headers["content-type"] == "application/octet-stream"
    assert wait_for(lambda: registry.blob_egress(digest)[0] >= 1)
    time.sleep(0.5)
    count, sent = registry.blob_egress(digest)
    assert (count, sent) == (1, size), (count, sent)
    heads = [e for e in registry.access_log() if e.get("http.request.method") == "HEAD" and digest in e["http.request.uri"]]
    assert len(heads) == 3
    for p in peers:
        assert any("route=p2p status=200" in line for line in proxy_log(swarm, p))
    # A tiny blob, a manifest miss and the API root go through too.
    a = get(blob_url(swarm.proxy_url("p1"), "team/app", small))
    assert a.status == 200 and a.body == b"config"
    a = get(swarm.proxy_url("p1") + "/v2/team/app/manifests/nope")
    assert a.status == 404 and b"MANIFEST_UNKNOWN" in a.body
    assert get(swarm.proxy_url("p1") + "/v2/").status == 200


def test_push_and_manifest_through_the_mirror(swarm: Swarm, registry: Registry) -> None:
    """Pushes go straight to the registry: a chunked blob upload (POST, PATCH with the body,
    PUT with the digest) and a manifest PUT through the proxy land in the registry, and read
    back through it; the registry's Location headers come back as it wrote them."""
    swarm.start_supernode()
    swarm.start_peer("p1", "--registry", registry.url, proxy=LOCAL)
    base = swarm.proxy_url("p1")
    data = os.urandom(3 * MIB + 7)
    digest = sha(data)
    a = get(f"{base}/v2/team/pushed/blobs/uploads/", method="POST", body=b"")
    assert a.status == 202, (a.status, a.body[:300])
    location = urlsplit(a.headers["location"])
    assert location.netloc in ("", registry.host)  # as the registry wrote it
    upload = f"{base}{location.path}?{location.query}"
    a = get(upload, method="PATCH", body=data, headers={"Content-Type": "application/octet-stream"})
    assert a.status == 202, (a.status, a.body[:300])
    assert a.headers["range"] == f"0-{len(data) - 1}"
    location = urlsplit(a.headers["location"])
    a = get(f"{base}{location.path}?{location.query}&digest={digest}", method="PUT", body=b"")
    assert a.status == 201, (a.status, a.body[:300])
    assert a.headers["docker-content-digest"] == digest
    assert registry.blob_size("team/pushed", digest) == len(data)
    got = get(blob_url(base, "team/pushed", digest))
    assert got.status == 200 and got.body == data
    config = registry.push_blob("team/pushed", b"{}")
    proxied = Registry(registry.root, int(base.rsplit(":", 1)[1]), registry.popen, registry.log)
    manifest_digest = proxied.push_manifest("team/pushed", "v1", config, [(digest, len(data))])
    a = get(f"{base}/v2/team/pushed/manifests/v1", {"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert a.status == 200 and a.headers["docker-content-digest"] == manifest_digest
    h = get(f"{base}/v2/team/pushed/manifests/v1", {"Accept": "application/vnd.oci.image.manifest.v1+json"}, method="HEAD")
    assert h.status == 200 and int(h.headers["content-length"]) == len(a.body) and h.body == b""


# -- the counting origin as a registry --------------------------------------------------------


def test_first_bytes_reach_the_client_before_the_blob_exists(swarm: Swarm, files: str) -> None:
    """With an origin paced to 4 MiB/s, a client of the proxy has read its first megabyte
    while the origin has sent well under half of the 16 MiB blob; the whole body then
    arrives and matches the digest."""
    size = 16 * MIB
    digest, _ = registry_blob(files, size)
    swarm.start_origin(files, "--registry-like", "--rate", "4M")
    swarm.start_supernode("--piece-size", "1")
    swarm.start_peer("p1", "--registry", f"http://127.0.0.1:{swarm.origin_port}", proxy=LOCAL)
    url = blob_url(swarm.proxy_url("p1"), "x/y", digest)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=60)
    conn.request("GET", parts.path)
    r = conn.getresponse()
    assert r.status == 200 and int(r.getheader("content-length")) == size
    first = r.read(MIB)
    origin_sent = swarm.origin_stats()["bytes"].get(digest, 0)
    assert len(first) == MIB
    assert origin_sent < size / 2, origin_sent
    rest = r.read()
    conn.close()
    assert sha(first + rest) == digest


def test_stalled_swarm_is_continued_from_the_registry(swarm: Swarm, files: str) -> None:
    """A client is reading a blob from the swarm when the supernode freezes (SIGSTOP): after
    --fallback-after seconds without progress the proxy fetches the rest from the origin with
    a Range request, and the client still gets the whole blob, digest intact."""
    size = 16 * MIB
    digest, _ = registry_blob(files, size, seed=12)
    swarm.start_origin(files, "--registry-like", "--rate", "4M")
    swarm.start_supernode("--piece-size", "1")
    sn = [p for p in swarm.procs if p.name == "supernode"][0]
    swarm.start_peer("p1", "--registry", f"http://127.0.0.1:{swarm.origin_port}", "--fallback-after", "2", proxy=LOCAL)
    url = blob_url(swarm.proxy_url("p1"), "x/y", digest)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=60)
    try:
        conn.request("GET", parts.path)
        r = conn.getresponse()
        assert r.status == 200
        first = r.read(2 * MIB)
        sn.popen.send_signal(signal.SIGSTOP)
        rest = r.read()
    finally:
        sn.popen.send_signal(signal.SIGCONT)
        conn.close()
    assert sha(first + rest) == digest
    statuses = swarm.origin_stats()["statuses"]
    assert statuses.get(f"{digest} 206") == 1, statuses
    assert wait_for(lambda: any("route=fallback status=200" in line for line in proxy_log(swarm, "p1")))


def test_wrong_blob_never_reaches_a_client_complete(swarm: Swarm, files: str) -> None:
    """An origin serving bytes that do not match the blob's digest: the supernode fails the
    task, and every client's connection is cut - none receives a complete body, whether
    served from the swarm or by the fallback."""
    digest = sha(b"the real content")
    make_file(files, digest, 6 * MIB, seed=5)
    swarm.start_origin(files, "--registry-like")
    swarm.start_supernode()
    swarm.start_peer("p1", "--registry", f"http://127.0.0.1:{swarm.origin_port}", proxy=LOCAL)
    for _ in range(2):
        a = get(blob_url(swarm.proxy_url("p1"), "x/y", digest))
        assert not a.complete, (a.status, len(a.body))
        assert sha(a.body) != digest
    supernode_log = open(os.path.join(swarm.root, "supernode.log")).read()
    assert "sha256" in supernode_log


def test_fifty_clients_one_origin_fetch(swarm: Swarm, files: str) -> None:
    """Fifty clients asking one proxy for the same uncached blob at once cause one origin
    GET (and fifty HEAD checks); every client gets the verified blob."""
    size = 8 * MIB
    digest, _ = registry_blob(files, size, seed=9)
    swarm.start_origin(files, "--registry-like", "--rate", "16M")
    swarm.start_supernode()
    swarm.start_peer("p1", "--registry", f"http://127.0.0.1:{swarm.origin_port}", proxy=LOCAL)
    url = blob_url(swarm.proxy_url("p1"), "x/y", digest)
    answers: list[Answer] = []
    lock = threading.Lock()

    def pull() -> None:
        a = get(url, timeout=120)
        with lock:
            answers.append(a)

    threads = [threading.Thread(target=pull) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(answers) == 50
    for a in answers:
        assert a.status == 200 and a.complete and sha(a.body) == digest, (a.status, a.error)
    stats = swarm.origin_stats()
    assert stats["requests"][digest] == 1 and stats["bytes"][digest] == size
    assert stats["heads"][digest] == 50


def test_supernode_down_falls_back_to_the_registry(swarm: Swarm, files: str) -> None:
    """With no supernode reachable, a blob still arrives whole (from the origin, after
    --fallback-after), and the log names the route."""
    size = 3 * MIB
    digest, _ = registry_blob(files, size, seed=2)
    swarm.start_origin(files, "--registry-like")
    dead = free_port()
    home = os.path.join(swarm.root, "p1")
    ready = os.path.join(swarm.root, "p1.ready")
    from dfly.devtools.swarm import tool

    proc = swarm.spawn("p1", [
        tool("twistd"), "-n", "--pidfile=", "-l", "-", "dfly-peer", "--supernode", f"127.0.0.1:{dead}",
        "--port", LOCAL, "--home", home, "--ready-file", ready, "--proxy", LOCAL,
        "--registry", f"http://127.0.0.1:{swarm.origin_port}", "--fallback-after", "1",
    ], ready)
    swarm.peers["p1"] = proc
    started = time.monotonic()
    a = get(blob_url(swarm.proxy_url("p1"), "x/y", digest))
    assert a.status == 200 and a.complete and sha(a.body) == digest
    # Well before the 30 s link timeout would have failed the download: the fallback did it.
    assert time.monotonic() - started < 25
    assert swarm.origin_stats()["requests"][digest] == 1
    assert wait_for(lambda: any("route=fallback status=200" in line for line in proxy_log(swarm, "p1")))


def test_registry_errors_pass_through(swarm: Swarm, files: str) -> None:
    """A 401 (with its WWW-Authenticate) and a 404 reach the client as the registry sent
    them; with the right token the blob comes through the swarm, whose origin fetch
    carried the client's Authorization."""
    digest, _ = registry_blob(files, 2 * MIB, seed=4)
    swarm.start_origin(files, "--registry-like", "--auth", "tok")
    swarm.start_supernode()
    swarm.start_peer("p1", "--registry", f"http://127.0.0.1:{swarm.origin_port}", proxy=LOCAL)
    base = swarm.proxy_url("p1")
    a = get(blob_url(base, "x/y", digest))
    assert a.status == 401 and a.headers["www-authenticate"] == 'Bearer realm="origin"'
    assert a.body == b"unauthorized\n"
    a = get(blob_url(base, "x/y", "sha256:" + "0" * 64))
    assert a.status == 404 and b"BLOB_UNKNOWN" in a.body
    a = get(blob_url(base, "x/y", digest), {"Authorization": "Bearer tok"})
    assert a.status == 200 and sha(a.body) == digest
    stats = swarm.origin_stats()
    assert stats["requests"][digest] == 2  # the refused GET, then the supernode's fetch
    assert stats["auth"][digest] >= 2  # the accepted HEAD and the supernode's GET carried the token
    assert any("route=p2p status=200" in line for line in proxy_log(swarm, "p1"))
    a = get(blob_url(base, "x/y", digest), {"Authorization": "Bearer wrong"})
    assert a.status == 401  # the swarm holds it now, but this client may not have it


def test_redirect_to_storage_drops_credentials_across_origins(swarm: Swarm, files: str, tmp_path: Any) -> None:
    """A registry that redirects blobs (307, signed URL) to object storage on another port:
    the supernode's fetch follows it and the storage never sees the Authorization header."""
    storage_dir = os.path.join(str(tmp_path), "storage")
    os.makedirs(storage_dir)
    digest, path = registry_blob(storage_dir, 5 * MIB, seed=6)
    os.link(path, os.path.join(files, digest))  # the registry knows the blob, storage serves it
    storage = Swarm(os.path.join(str(tmp_path), "storage-proc"))
    try:
        storage_port = storage.start_origin(storage_dir)
        swarm.start_origin(files, "--registry-like", "--auth", "tok", "--redirect-to", f"http://127.0.0.1:{storage_port}")
        swarm.start_supernode()
        swarm.start_peer("p1", "--registry", f"http://127.0.0.1:{swarm.origin_port}", proxy=LOCAL)
        a = get(blob_url(swarm.proxy_url("p1"), "x/y", digest), {"Authorization": "Bearer tok"})
        assert a.status == 200 and sha(a.body) == digest
        reg_stats, store_stats = swarm.origin_stats(), storage.origin_stats()
        assert reg_stats["auth"][digest] >= 2
        assert store_stats["requests"][digest] == 1 and store_stats["bytes"][digest] == 5 * MIB
        assert store_stats["auth"] == {}
    finally:
        storage.close()


def test_fallback_follows_redirects_without_credentials(swarm: Swarm, files: str, tmp_path: Any) -> None:
    """The proxy's own fallback fetch follows a registry's redirect to storage too, without
    sending the client's Authorization there."""
    storage_dir = os.path.join(str(tmp_path), "storage")
    os.makedirs(storage_dir)
    digest, path = registry_blob(storage_dir, 2 * MIB, seed=8)
    os.link(path, os.path.join(files, digest))
    storage = Swarm(os.path.join(str(tmp_path), "storage-proc"))
    try:
        storage_port = storage.start_origin(storage_dir)
        swarm.start_origin(files, "--registry-like", "--auth", "tok", "--redirect-to", f"http://127.0.0.1:{storage_port}")
        home = os.path.join(swarm.root, "p1")
        ready = os.path.join(swarm.root, "p1.ready")
        from dfly.devtools.swarm import tool

        swarm.peers["p1"] = swarm.spawn("p1", [
            tool("twistd"), "-n", "--pidfile=", "-l", "-", "dfly-peer", "--supernode", f"127.0.0.1:{free_port()}",
            "--port", LOCAL, "--home", home, "--ready-file", ready, "--proxy", LOCAL,
            "--registry", f"http://127.0.0.1:{swarm.origin_port}", "--fallback-after", "0.5",
        ], ready)
        a = get(blob_url(swarm.proxy_url("p1"), "x/y", digest), {"Authorization": "Bearer tok"})
        assert a.status == 200 and sha(a.body) == digest
        assert storage.origin_stats()["auth"] == {}
        assert storage.origin_stats()["requests"][digest] == 1
    finally:
        storage.close()


def test_forward_proxy_rule_files_share_one_task_across_signatures(swarm: Swarm, files: str) -> None:
    """HTTP_PROXY-style absolute-form requests for a file matching --p2p-rule go through the
    swarm; two signed URLs of the same object (different X-Amz-Signature) are one task, so
    the origin sends the file once.  Other URLs through the same proxy go direct."""
    size = 4 * MIB
    src = make_file(files, "big.bin", size, seed=3)
    make_file(files, "small.txt", 100, seed=3)
    port = swarm.start_origin(files)
    swarm.start_supernode()
    swarm.start_peer("p1", "--p2p-rule", r"/big\.bin", proxy=LOCAL)
    proxy = f"127.0.0.1:{swarm.peers['p1'].info['proxy']}"
    want = sha256_file(src)
    for sig in ("aaa", "bbb"):
        a = get(f"http://127.0.0.1:{port}/big.bin?X-Amz-Signature={sig}&X-Amz-Date=1", proxy=proxy)
        assert a.status == 200 and hashlib.sha256(a.body).hexdigest() == want
    a = get(f"http://127.0.0.1:{port}/small.txt", proxy=proxy)
    assert a.status == 200 and len(a.body) == 100
    a = get(f"http://127.0.0.1:{port}/missing", proxy=proxy)
    assert a.status == 404
    stats = swarm.origin_stats()
    assert stats["requests"]["big.bin"] == 1 and stats["bytes"]["big.bin"] == size
    routes = "".join(proxy_log(swarm, "p1"))
    assert routes.count("route=p2p status=200") == 2 and "route=direct status=404" in routes


def test_curl_through_the_proxy(swarm: Swarm, files: str) -> None:
    """curl as an HTTP_PROXY client and as a mirror client, with a Range request: 206 with
    the right bytes and Content-Range."""
    digest, path = registry_blob(files, 1 * MIB + 3, seed=11)
    port = swarm.start_origin(files, "--registry-like")
    swarm.start_supernode()
    swarm.start_peer("p1", "--registry", f"http://127.0.0.1:{port}", proxy=LOCAL)
    out = os.path.join(swarm.root, "range.out")
    r = subprocess.run(
        ["curl", "-sS", "-f", "-D", "-", "-o", out, "-r", "1000-1999", blob_url(swarm.proxy_url("p1"), "x/y", digest)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "206" in r.stdout.splitlines()[0] and f"bytes 1000-1999/{MIB + 3}" in r.stdout
    with open(out, "rb") as f, open(path, "rb") as g:
        g.seek(1000)
        assert f.read() == g.read(1000)
    r = subprocess.run(
        ["curl", "-sS", "-f", "-o", out, "-x", f"http://{swarm.proxy_url('p1')[7:]}",
         f"http://127.0.0.1:{port}/v2/x/y/blobs/{digest}"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "sha256:" + sha256_file(out) == digest


def test_proxy_can_be_turned_off(swarm: Swarm) -> None:
    """--proxy none: no proxy port in the ready file; the default listens on 127.0.0.1."""
    swarm.start_supernode()
    p = swarm.start_peer("p1")
    assert "proxy" not in p.info
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))


@pytest.mark.parametrize("option", ["--proxy", "--port"])
def test_bad_listening_address_is_a_one_line_error(tmp_path: Any, option: str) -> None:
    """A listening address twistd cannot parse makes the peer daemon exit 1 at once with one
    line naming the option's value, not a traceback."""
    from dfly.devtools.swarm import tool

    argv = [tool("twistd"), "-n", "--pidfile=", "dfly-peer", "--home", str(tmp_path / "home"),
            "--port", "tcp:0:interface=127.0.0.1", "--proxy", "none", option, "garbage:1"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "bad listening address 'garbage:1'" in out
    assert "Traceback" not in out
