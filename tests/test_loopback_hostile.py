"""Hostile clients against real daemons on loopback: they are turned away, service goes on.

(a) malformed HTTP to the supernode's API port; (b) garbage, oversize frames and
path-traversal task ids on the supernode's peer port and a peer's upload port;
(c) a crowd of connections that never send anything.  After each, the daemons
are alive and a normal dfget download through the swarm gets the right bytes.
Every network wait here has a deadline and every loop a fixed bound.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from filegen import make_file

from dfly.devtools.swarm import Swarm
from dfly.devtools.swarm import sha256_file as sha256
from dfly.pieces import MIB
from dfly.wire.framing import MAX_CONTROL, encode_control

pytestmark = pytest.mark.loopback

SIZE = 3 * MIB + 4321  # four 1 MiB pieces




def start(swarm: Swarm, files: str, peers: tuple[str, ...] = ("a", "b")) -> str:
    """Origin with one file, a supernode (1 MiB pieces) and peer daemons; returns the file's path."""
    src = make_file(files, "f.bin", SIZE, seed=5)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1")
    for name in peers:
        swarm.start_peer(name)
    return src


def download(swarm: Swarm, src: str, name: str, peer: str | None) -> dict[str, Any]:
    """A dfget of f.bin (through C{peer}'s daemon, or standalone) that must give the right bytes."""
    out = os.path.join(swarm.root, name)
    r = swarm.dfget(swarm.origin_url("f.bin"), out, peer=peer, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sha256(out) == sha256(src)
    return dict(json.loads(r.stdout))


def all_alive(swarm: Swarm) -> None:
    dead = {p.name: p.popen.returncode for p in swarm.procs if not p.alive()}
    assert dead == {}, f"daemons died: {dead}"


def exchange(port: int, data: bytes, timeout: float = 5.0, half_close: bool = False) -> tuple[bytes, bool]:
    """Send C{data} on a new connection and read until the daemon closes it or C{timeout} passes.

    Returns (bytes received, whether the daemon closed the connection).  A reset counts as
    closed; so does a send the daemon refused part way (it closed while we were writing).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    try:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return got, True
        deadline = time.monotonic() + timeout
        for _ in range(10_000):  # bounded; each recv waits at most until the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                return got, False
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return got, True
            except TimeoutError:
                return got, False
            if not chunk:
                return got, True
            got += chunk
        return got, False
    finally:
        sock.close()


def read_frame(sock: socket.socket, timeout: float = 10.0) -> dict[str, Any]:
    """One control frame from C{sock}."""
    sock.settimeout(timeout)
    buf = b""
    for _ in range(1000):
        if len(buf) >= 4 and len(buf) >= 4 + struct.unpack("!I", buf[:4])[0]:
            break
        chunk = sock.recv(4096)
        assert chunk, "connection closed before a whole frame"
        buf += chunk
    (length,) = struct.unpack("!I", buf[:4])
    return dict(json.loads(buf[4 : 4 + length]))


def ask(port: int, msg: dict[str, Any]) -> dict[str, Any]:
    """Send one well-formed control frame on a fresh connection; return the first frame of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(encode_control(msg))
        return read_frame(sock)


# -- (a) the HTTP API ---------------------------------------------------------------------

BAD_HTTP: list[tuple[str, bytes]] = [
    ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 \xff\xfe garbage\r\n\r\n"),
    ("request line of spaces", b"   \r\n\r\n"),
    ("huge header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"),
    ("many headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(2000)) + b"\r\n"),
    ("bad method", b"FR\x00B /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("unknown method", b"BREW /api/v1/tasks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("HTTP/0.9", b"GET /healthz\r\n"),
    ("unknown version", b"GET /healthz HTTP/7.3\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("bad content-length", b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
    ("bad chunked body", b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
]

TRAVERSAL = [
    "/api/v1/tasks/../../../etc/passwd",
    "/api/v1/tasks/..%2f..%2f..%2fetc%2fpasswd",
    "/api/v1/tasks/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/../../../../etc/passwd",
    "//etc/passwd",
    "/api/v1/tasks/" + "../" * 50 + "etc/passwd",
]


def status_of(response: bytes) -> int | None:
    """The status code of the first response in C{response}, if there is one."""
    if not response.startswith(b"HTTP/1."):
        return None
    return int(response.split(b" ", 2)[1])


def test_malformed_http_is_refused_and_the_api_stays_up(swarm: Swarm, files: str) -> None:
    """Garbage request lines, a 200 kB header, 2000 headers, bad and unknown methods, HTTP/0.9,
    an unknown version, a negative Content-Length and a bad chunked body each get a 4xx/501
    answer or a closed connection; path-traversal GETs get a 4xx and never file contents; the
    supernode stays alive and GET /healthz still answers after every one of them."""
    start(swarm, files, peers=())
    assert swarm.supernode_info is not None
    api = swarm.supernode_info["api"]
    for name, data in BAD_HTTP:
        response, closed = exchange(api, data)
        status = status_of(response)
        assert closed or (status is not None and 400 <= status < 600), (name, response[:200])
        assert status is None or 400 <= status < 500 or status == 501, (name, response[:200])
        all_alive(swarm)
        assert swarm.api("/healthz")["ok"] is True, name
    for path in TRAVERSAL:
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        response, _ = exchange(api, request)
        status = status_of(response)
        assert status is not None and 400 <= status < 500, (path, response[:200])
        assert b"root:" not in response, path
        assert swarm.api("/healthz")["ok"] is True, path
    all_alive(swarm)


# -- (b) the framed peer ports ----------------------------------------------------------------


def hostile_streams(task: str) -> list[tuple[str, bytes]]:
    """Byte streams that must make a dfly daemon close the connection by themselves."""
    rng = random.Random(99)
    traversal = ["../../etc/passwd", "/etc/passwd", "..%2f..%2fetc%2fpasswd", "../" * 21 + "x", task.upper(), task[:63] + "/"]
    streams: list[tuple[str, bytes]] = [
        ("random bytes", b"\x7f" + rng.randbytes(4000)),
        ("oversize length prefix", b"\xff\xff\xff\xff" + rng.randbytes(100)),
        ("length just over the maximum", struct.pack("!I", MAX_CONTROL + 1) + b"{" * 100),
        ("zero-length frame", b"\x00\x00\x00\x00"),
        ("not JSON", struct.pack("!I", 8) + b"not json"),
        ("invalid UTF-8", struct.pack("!I", 12) + b'{"op":"\xff\xfe\xfd"}'),
        ("JSON array", struct.pack("!I", 2) + b"[]"),
        ("deep nesting", struct.pack("!I", 60000) + b"[" * 60000),
        ("unknown op", encode_control({"op": "rm -rf /"})),
        ("wrong field types", encode_control({"op": "get", "task": ["x"], "piece": "0"})),
        ("negative piece", encode_control({"op": "get", "task": task, "piece": -1})),
        ("huge piece", encode_control({"op": "get", "task": task, "piece": 2**64})),
        ("slice sent to a server", encode_control({"op": "slice", "task": task, "piece": 0, "len": 5, "piece_size": MIB}) + b"\x01\x00\x00\x05hello\x7f"),
    ]
    streams += [(f"traversal task id {t!r}", encode_control({"op": "get", "task": t, "piece": 0})) for t in traversal]
    return streams


def test_garbage_on_peer_ports_closes_the_connection_and_service_goes_on(swarm: Swarm, files: str) -> None:
    """Random bytes, oversize and zero length prefixes, non-JSON and badly typed frames and
    path-traversal task ids sent to the supernode's peer port and to a peer's upload port each
    make the daemon close that connection without sending any slice; all daemons stay alive,
    both ports still serve slices to a well-behaved client, and a dfget through another peer
    gets the right bytes."""
    src = start(swarm, files)
    first = download(swarm, src, "a.out", peer="a")
    task = first["task"]
    assert swarm.supernode_info is not None
    ports = {"supernode": swarm.supernode_info["port"], "peer a": swarm.peers["a"].info["port"]}
    for where, port in ports.items():
        for name, data in hostile_streams(task):
            response, closed = exchange(port, data, timeout=10.0)
            assert closed, f"{where} kept the connection open after {name}"
            assert b'"op":"slice"' not in response, (where, name)
        all_alive(swarm)
    # Both ports still serve: a well-formed request gets its slice announcement.
    for where, port in ports.items():
        answer = ask(port, {"op": "get", "task": task, "piece": 1})
        assert answer["op"] == "slice" and answer["len"] == MIB - 5, (where, answer)
        assert ask(port, {"op": "get", "task": "0" * 64, "piece": 0})["op"] == "nack", where
    download(swarm, src, "b.out", peer="b")
    download(swarm, src, "standalone.out", peer=None)
    all_alive(swarm)


# -- (c) connections that never speak -------------------------------------------------------------


@contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """C{count} connections to C{port} that send nothing; all closed on exit.

    They are opened in bursts of 40 with a short pause, so the daemon's accept queue (the
    listen backlog, 50 by default) does not overflow: an overflow only costs SYN retries
    (a second each), not correctness, but makes the test slow.
    """
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            if i and i % 40 == 0:
                time.sleep(0.05)
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        yield socks
    finally:
        for s in socks:
            s.close()


def test_idle_connections_do_not_stop_service(swarm: Swarm, files: str) -> None:
    """200 connections that connect and send nothing to the supernode's peer port and 200 to a
    peer's upload port are held while a dfget through another peer downloads the file with the
    right bytes, the API answers and both ports still serve slices.  (Whether and when idle
    connections are closed is not asserted here.)"""
    src = start(swarm, files)
    task = download(swarm, src, "a.out", peer="a")["task"]
    assert swarm.supernode_info is not None
    sn_port = swarm.supernode_info["port"]
    up_port = swarm.peers["a"].info["port"]
    with idle_connections(sn_port, 200) as sn_idle, idle_connections(up_port, 200) as up_idle:
        assert len(sn_idle) == len(up_idle) == 200
        t0 = time.monotonic()
        download(swarm, src, "b.out", peer="b")
        assert time.monotonic() - t0 < 30
        assert swarm.api("/healthz")["ok"] is True
        for port in (sn_port, up_port):
            assert ask(port, {"op": "get", "task": task, "piece": 0})["op"] == "slice"
        all_alive(swarm)
    download(swarm, src, "c.out", peer=None)
    all_alive(swarm)
