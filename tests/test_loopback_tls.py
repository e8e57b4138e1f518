"""HTTPS through real daemons on loopback: CONNECT tunnels and hijacks of the peer's proxy
(with curl), upstream verification with a private CA, and the supernode's and dfget's
verified HTTPS fetches from an origin whose certificate comes from a test CA."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from filegen import make_file
from tlshelpers import ByteServer, Pki, make_pki, tls_endpoint

from dfly.devtools.swarm import Proc, Swarm, proc_kib, sha256_file

pytestmark = pytest.mark.loopback

MIB = 1024 * 1024


def _env() -> dict[str, str]:
    """The environment without proxy variables, so curl uses only the proxy it is given."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def curl(proxy_port: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "90", "--proxy", f"http://127.0.0.1:{proxy_port}", *args],
        capture_output=True, text=True, timeout=timeout, env=_env(),
    )


@pytest.fixture
def pki(tmp_path: object) -> Pki:
    """A private CA with certificates for 127.0.0.1 and for another name."""
    return make_pki(os.path.join(str(tmp_path), "pki"), ["127.0.0.1", "wrong.example"])


def start_tls_origin(swarm: Swarm, files: str, pki: Pki, name: str = "127.0.0.1") -> int:
    """The counting origin serving C{files} over TLS with C{name}'s certificate."""
    return swarm.start_origin(files, "--port", tls_endpoint(pki, name))


def tls_origin_stats(swarm: Swarm, pki: Pki, name: str = "127.0.0.1") -> dict[str, Any]:
    """The TLS origin's counters (over HTTPS, trusting the test CA)."""
    ctx = ssl.create_default_context(cafile=pki.ca_pem)
    ctx.check_hostname = name == "127.0.0.1"
    if not ctx.check_hostname:
        ctx.verify_mode = ssl.CERT_REQUIRED
    url = f"https://127.0.0.1:{swarm.origin_port}/_stats"
    with urllib.request.urlopen(url, timeout=10, context=ctx) as r:
        return dict(json.load(r))


def start_proxy(swarm: Swarm, name: str, *extra: str) -> tuple[Proc, int]:
    if swarm.supernode_info is None:
        swarm.start_supernode()
    proc = swarm.start_peer(name, *extra, proxy="tcp:0:interface=127.0.0.1")
    return proc, int(proc.info["proxy"])


def log_of(proc: Proc) -> str:
    with open(proc.log, errors="replace") as f:
        return f.read()


# -- tunnels ---------------------------------------------------------------------------------


def test_tunnel_carries_https_byte_for_byte(swarm: Swarm, files: str, pki: Pki) -> None:
    """curl through a CONNECT tunnel to an HTTPS origin: the origin's own certificate reaches
    curl (it trusts only the test CA), the file arrives identical, and the proxy resource was
    not involved (one request at the origin, a tunnel in the daemon's log)."""
    src = make_file(files, "f.bin", 24 * MIB)
    port = start_tls_origin(swarm, files, pki)
    peer, proxy = start_proxy(swarm, "p", "--connect-ports", "any")
    out = os.path.join(swarm.root, "f.out")
    r = curl(proxy, "--cacert", pki.ca_pem, "-o", out, "-w", "%{http_connect} %{http_code}", f"https://127.0.0.1:{port}/f.bin")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "200 200"
    assert sha256_file(out) == sha256_file(src)
    assert tls_origin_stats(swarm, pki)["requests"].get("f.bin") == 1
    deadline = time.monotonic() + 10
    while "tunnel to 127.0.0.1" not in log_of(peer) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = log_of(peer)
    assert f"tunnel to 127.0.0.1:{port} open" in log
    assert "proxy GET" not in log


def test_tunnel_refusals(swarm: Swarm, files: str, pki: Pki) -> None:
    """With the default port list (443 only) a CONNECT to another port gets 403; to a port
    nobody listens on (when allowed) 502 with the reason; the daemon keeps serving."""
    make_file(files, "f.bin", 1024)
    port = start_tls_origin(swarm, files, pki)
    _, strict = start_proxy(swarm, "strict")
    r = curl(strict, "--cacert", pki.ca_pem, "-w", "%{http_connect}", f"https://127.0.0.1:{port}/f.bin")
    assert r.returncode != 0 and r.stdout == "403"
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    closed_port = free.getsockname()[1]
    free.close()
    _, open_ = start_proxy(swarm, "open", "--connect-ports", "any")
    r = curl(open_, "-w", "%{http_connect}", f"https://127.0.0.1:{closed_port}/")
    assert r.returncode != 0 and r.stdout == "502"
    raw = socket.create_connection(("127.0.0.1", open_), timeout=10)
    raw.sendall(f"CONNECT 127.0.0.1:{closed_port} HTTP/1.1\r\n\r\n".encode())
    answer = b""
    while chunk := raw.recv(4096):
        answer += chunk
    raw.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502")
    assert body.count(b"\n") == 1 and f"127.0.0.1:{closed_port}".encode() in body
    r = curl(open_, "--cacert", pki.ca_pem, "-w", "%{http_code}", "-o", os.devnull, f"https://127.0.0.1:{port}/f.bin")
    assert r.stdout == "200", r.stderr


def _connect(proxy: int, port: int) -> socket.socket:
    """A raw client socket with an established tunnel to 127.0.0.1:port."""
    s = socket.create_connection(("127.0.0.1", proxy), timeout=30)
    s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = s.recv(1)
        assert chunk, f"proxy closed before answering: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def test_tunnel_half_close(swarm: Swarm) -> None:
    """A client that sends its data and then shuts down its write side: the FIN reaches the
    far end (it reads to end of stream), and the far end's answer still comes back through."""

    def digest_of_everything(conn: socket.socket) -> None:
        h = hashlib.sha256()
        while chunk := conn.recv(65536):
            h.update(chunk)
        conn.sendall(h.hexdigest().encode())

    server = ByteServer(digest_of_everything)
    try:
        _, proxy = start_proxy(swarm, "p", "--connect-ports", "any")
        s = _connect(proxy, server.port)
        data = os.urandom(5 * MIB)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        s.close()
        assert answer.decode() == hashlib.sha256(data).hexdigest()
    finally:
        server.close()
    assert not server.errors


@pytest.fixture
def stream_server() -> Iterator[list[ByteServer]]:
    holder: list[ByteServer] = []
    yield holder
    for server in holder:
        server.close()


@pytest.mark.parametrize("direction", ["down", "up"])
def test_tunnel_slow_reader_costs_no_memory(swarm: Swarm, stream_server: list[ByteServer], direction: str) -> None:
    """256 MiB through a tunnel from a fast sender to a reader that takes small sips: the
    daemon's resident memory grows by far less than what flows (it stops reading from the
    sender while the reader's side is full), and every byte arrives.  Both directions."""
    total = 256 * MIB
    block = os.urandom(MIB)

    def sender(conn: socket.socket) -> None:
        for _ in range(total // MIB):
            conn.sendall(block)

    def slow_reader(conn: socket.socket, box: list[int]) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        got = 0
        while chunk := conn.recv(64 * 1024):
            got += len(chunk)
            time.sleep(0.0005)
        box.append(got)

    received: list[int] = []
    if direction == "down":
        server = ByteServer(sender)
    else:
        server = ByteServer(lambda conn: slow_reader(conn, received))
    stream_server.append(server)
    peer, proxy = start_proxy(swarm, "p", "--connect-ports", "any")
    pid = peer.popen.pid
    s = _connect(proxy, server.port)
    before = proc_kib(pid, "VmRSS")
    peak = before
    started = time.monotonic()
    if direction == "down":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        got = 0
        while chunk := s.recv(64 * 1024):
            got += len(chunk)
            time.sleep(0.0005)
            if got % (8 * MIB) < 64 * 1024:
                peak = max(peak, proc_kib(pid, "VmRSS"))
            assert time.monotonic() - started < 240, "tunnel too slow"
        received.append(got)
    else:
        for n in range(total // MIB):
            s.sendall(block)
            if n % 8 == 0:
                peak = max(peak, proc_kib(pid, "VmRSS"))
            assert time.monotonic() - started < 240, "tunnel too slow"
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the far end finishes, the tunnel closes
        server.thread.join(120)
    s.close()
    seconds = time.monotonic() - started
    grown = peak - before
    print(f"tunnel {direction}: {total // MIB} MiB in {seconds:.1f} s, daemon RSS peak growth {grown} KiB")
    assert received == [total]
    assert grown < 48 * 1024, f"daemon grew by {grown} KiB while {total // MIB} MiB flowed to a slow reader"
    assert peer.alive()


# -- hijack ----------------------------------------------------------------------------------


def test_hijack_serves_requests_with_keep_alive(swarm: Swarm, files: str, pki: Pki) -> None:
    """A hijacked host: curl trusts only the daemon's CA (created in its home at start) and
    gets two files over one tunnel (the second request makes no new connection); the daemon
    verified the origin with --upstream-ca and served both as proxy requests for
    https://127.0.0.1:PORT."""
    a = make_file(files, "a.bin", 3 * MIB, seed=1)
    b = make_file(files, "b.bin", 2 * MIB, seed=2)
    port = start_tls_origin(swarm, files, pki)
    peer, proxy = start_proxy(swarm, "p", "--hijack", r"^127\.0\.0\.1:", "--upstream-ca", pki.ca_pem)
    dfly_ca = os.path.join(peer.info["home"], "ca.pem")
    assert os.path.exists(dfly_ca)
    assert f"proxy CA created at {dfly_ca}" in log_of(peer)
    out_a, out_b = os.path.join(swarm.root, "a.out"), os.path.join(swarm.root, "b.out")
    r = curl(
        proxy, "--cacert", dfly_ca, "-w", "%{num_connects} %{http_code}\n",
        f"https://127.0.0.1:{port}/a.bin", "-o", out_a, f"https://127.0.0.1:{port}/b.bin", "-o", out_b,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["1 200", "0 200"]
    assert sha256_file(out_a) == sha256_file(a) and sha256_file(out_b) == sha256_file(b)
    log = log_of(peer)
    assert f"hijacking CONNECT to https://127.0.0.1:{port}" in log
    assert f"proxy GET https://127.0.0.1:{port}/a.bin" in log
    assert f"proxy GET https://127.0.0.1:{port}/b.bin" in log
    # The client trusting the origin's CA instead of the daemon's must fail: it is intercepted.
    r = curl(proxy, "--cacert", pki.ca_pem, "-o", os.devnull, f"https://127.0.0.1:{port}/a.bin")
    assert r.returncode == 60, r.stderr


@pytest.mark.parametrize(
    ("origin_name", "trust"),
    [("wrong.example", "test-ca"), ("127.0.0.1", "system")],
    ids=["certificate-for-another-host", "untrusted-ca"],
)
def test_hijack_refuses_unverified_upstream(swarm: Swarm, files: str, pki: Pki, origin_name: str, trust: str) -> None:
    """An upstream whose certificate names another host, or comes from a CA the daemon does
    not trust, gives the client a 502 that says TLS verification failed, and no request
    reaches the origin."""
    make_file(files, "f.bin", 1024)
    port = start_tls_origin(swarm, files, pki, origin_name)
    extra = ["--upstream-ca", pki.ca_pem] if trust == "test-ca" else []
    peer, proxy = start_proxy(swarm, "p", "--hijack", r"^127\.0\.0\.1:", *extra)
    dfly_ca = os.path.join(peer.info["home"], "ca.pem")
    r = curl(proxy, "--cacert", dfly_ca, "-w", "\n%{http_code}", f"https://127.0.0.1:{port}/f.bin")
    body, _, code = r.stdout.rpartition("\n")
    assert code == "502", r.stdout + r.stderr
    assert "TLS verification failed" in body
    assert "f.bin" not in tls_origin_stats(swarm, pki, origin_name)["requests"]


def test_hijacked_registry_blobs_go_through_the_swarm(swarm: Swarm, files: str, pki: Pki) -> None:
    """Two peers hijack an HTTPS registry (private CA): a blob pulled through each peer's proxy
    is served through the swarm (route p2p), the supernode fetching it over verified HTTPS
    (--origin-ca) once; both clients get the blob's exact bytes."""
    path = make_file(files, "tmp.bin", 5 * MIB + 7, seed=3)
    digest = "sha256:" + sha256_file(path)
    os.rename(path, os.path.join(files, digest))
    port = swarm.start_origin(files, "--port", tls_endpoint(pki, "127.0.0.1"), "--registry-like")
    swarm.start_supernode("--origin-ca", pki.ca_pem)
    url = f"https://127.0.0.1:{port}/v2/team/app/blobs/{digest}"
    for name in ("p1", "p2"):
        peer, proxy = start_proxy(swarm, name, "--hijack", r"^127\.0\.0\.1:", "--upstream-ca", pki.ca_pem)
        out = os.path.join(swarm.root, f"{name}.blob")
        r = curl(proxy, "--cacert", os.path.join(peer.info["home"], "ca.pem"), "-f", "-o", out, url)
        assert r.returncode == 0, r.stderr
        assert "sha256:" + sha256_file(out) == digest
        assert "route=p2p status=200" in log_of(peer)
    stats = tls_origin_stats(swarm, pki)
    assert stats["bytes"][digest] == 5 * MIB + 7


# -- the supernode and dfget against an HTTPS origin -------------------------------------------


def test_supernode_verifies_https_origin(swarm: Swarm, files: str, pki: Pki) -> None:
    """A supernode given the origin's CA (--origin-ca) fetches over HTTPS and the swarm
    delivers the file; one without it fails the task with a TLS verification error, and
    dfget says so (exit 3) rather than accepting the certificate."""
    src = make_file(files, "f.bin", 6 * MIB)
    port = start_tls_origin(swarm, files, pki)
    url = f"https://127.0.0.1:{port}/f.bin"
    swarm.start_supernode("--origin-ca", pki.ca_pem)
    swarm.start_peer("p")
    r = swarm.dfget(url, os.path.join(swarm.root, "ok.out"), peer="p")
    assert r.returncode == 0, r.stderr
    assert sha256_file(os.path.join(swarm.root, "ok.out")) == sha256_file(src)

    swarm.start_supernode(name="plain")
    r = swarm.dfget(url, os.path.join(swarm.root, "bad.out"))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "TLS verification failed" in r.stderr
    assert not os.path.exists(os.path.join(swarm.root, "bad.out"))


def test_dfget_back_source_verifies_https(swarm: Swarm, files: str, pki: Pki) -> None:
    """With no supernode, dfget downloads from the HTTPS origin itself: with --ca-file the
    file arrives; without it the certificate is refused (exit 3, reason printed)."""
    src = make_file(files, "f.bin", 2 * MIB)
    port = start_tls_origin(swarm, files, pki)
    url = f"https://127.0.0.1:{port}/f.bin"
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    nobody = f"127.0.0.1:{free.getsockname()[1]}"
    free.close()
    out = os.path.join(swarm.root, "f.out")
    base = ["dfget", url, "-o", out, "--supernode", nobody, "--timeout", "60"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=120, cwd=swarm.root)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "TLS verification failed" in r.stderr and not os.path.exists(out)
    r = subprocess.run([*base, "--ca-file", pki.ca_pem], capture_output=True, text=True, timeout=120, cwd=swarm.root)
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == sha256_file(src)
