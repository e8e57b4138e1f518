"""Peers and the supernode getting back in step, with real processes: a supernode restart
after a finished download, and a peer's held copy checked against a changed origin."""

from __future__ import annotations

import hashlib
import http.client
import os
import time

import plainorigin
import pytest
from filegen import make_file

from dfly.devtools.swarm import Proc, Swarm, proc_cpu_seconds, sha256_file
from dfly.pieces import MIB

pytestmark = pytest.mark.loopback


def supernode_proc(swarm: Swarm, name: str) -> Proc:
    return [p for p in swarm.procs if p.name == name][0]


def count_lines(path: str, text: str) -> int:
    with open(path, errors="replace") as f:
        return sum(1 for line in f if text in line)


def replace_file(files: str, name: str, size: int, seed: int) -> str:
    """Put new content at C{name} in one step (a new ETag and Last-Modified)."""
    make_file(files, name + ".new", size, seed=seed)
    os.replace(os.path.join(files, name + ".new"), os.path.join(files, name))
    return os.path.join(files, name)


def proxy_get(url: str, proxy_port: int) -> tuple[int, bytes]:
    """A GET of C{url} in absolute form through the proxy on C{proxy_port}."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=60)
    try:
        conn.request("GET", url)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_for(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def test_supernode_restart_after_a_finished_download_stays_quiet(swarm: Swarm, files: str) -> None:
    """A peer finished a file from an origin without ETag / Last-Modified; the supernode
    restarts.  The peer reconnects and announces what it holds: that fetches nothing from the
    origin, the supernode logs no piece failures and stays idle (it does not assign the peer
    pieces it answers "not downloading" to, over and over), and a new download of the same
    URL through that peer afterwards works and is verified."""
    src = make_file(files, "big.bin", 6 * MIB, seed=5)
    plainorigin.start(swarm, files)
    info = swarm.start_supernode("--piece-size", "1")
    peer = swarm.start_peer("p2")
    url = swarm.origin_url("big.bin")
    r = swarm.dfget(url, os.path.join(swarm.root, "x"), peer="p2")
    assert r.returncode == 0, r.stderr
    assert swarm.origin_stats()["requests"]["big.bin"] == 1

    supernode_proc(swarm, "supernode").stop()
    home = os.path.join(swarm.root, "supernode")
    swarm.start_supernode(
        "--piece-size", "1", "--home", home,
        "--port", f"tcp:{info['port']}:interface=127.0.0.1", "--api", f"tcp:{info['api']}:interface=127.0.0.1",
        name="supernode2",
    )
    second = supernode_proc(swarm, "supernode2")
    wait_for("the peer reconnects", lambda: count_lines(peer.log, "connected to supernode") >= 2, 30)
    wait_for("the peer registers again", lambda: any(t["peers"] for t in swarm.api()["tasks"]), 10)
    time.sleep(0.5)
    lines = count_lines(second.log, "failed piece")
    cpu = proc_cpu_seconds(second.popen.pid)
    time.sleep(3.0)
    assert count_lines(second.log, "failed piece") - lines == 0, "the supernode keeps logging piece failures"
    assert proc_cpu_seconds(second.popen.pid) - cpu < 0.5, "the supernode is busy with nothing to do"
    assert lines == 0
    # The peer is back in the task holding every piece, and kept its file.
    (task,) = swarm.api()["tasks"]
    assert [p["done"] for p in task["peers"]] == [True]
    assert "dropping what was held" not in open(peer.log).read()
    # Re-announcing a finished file is not a request: the origin was not asked again.
    assert swarm.origin_stats()["requests"]["big.bin"] == 1

    out = os.path.join(swarm.root, "again")
    r = swarm.dfget(url, out, peer="p2", timeout=60)
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == sha256_file(src)
    cpu = proc_cpu_seconds(second.popen.pid)
    time.sleep(1.0)
    assert proc_cpu_seconds(second.popen.pid) - cpu < 0.3
    assert count_lines(second.log, "failed piece") == 0


def test_peer_revalidates_a_held_file_after_the_window(swarm: Swarm, files: str) -> None:
    """A peer daemon holding a file serves it again without any request to the origin within
    the supernode's --revalidate-after (default 5 s); after it, a request is revalidated
    through the supernode: unchanged (304) the held copy is served, nothing downloaded
    again; changed, the new content is downloaded and served."""
    size = 2 * MIB
    path = make_file(files, "f.bin", size, seed=1)
    swarm.start_origin(files)
    swarm.start_supernode()
    swarm.start_peer("p1")
    url = swarm.origin_url("f.bin")

    def fetch(name: str) -> str:
        out = os.path.join(swarm.root, name)
        r = swarm.dfget(url, out, peer="p1", timeout=60)
        assert r.returncode == 0, r.stderr
        return sha256_file(out)

    old = sha256_file(path)
    t0 = time.monotonic()
    assert fetch("n1") == old
    assert fetch("n2") == old
    assert time.monotonic() - t0 < 4.5, "too slow to check the window"
    stats = swarm.origin_stats()
    assert stats["requests"]["f.bin"] == 1 and stats["statuses"] == {"f.bin 200": 1}
    served = swarm.task("/f.bin")["served_bytes"]

    time.sleep(max(0.0, t0 + 5.5 - time.monotonic()))
    t1 = time.monotonic()
    assert fetch("n3") == old
    stats = swarm.origin_stats()
    assert stats["statuses"].get("f.bin 304") == 1 and stats["bytes"]["f.bin"] == size
    assert swarm.task("/f.bin")["served_bytes"] == served  # the peer kept its copy

    new = sha256_file(replace_file(files, "f.bin", size + 17, seed=2))
    assert fetch("n4") == old  # still within the window the 304 started
    assert time.monotonic() - t1 < 4.5, "too slow to check the window"
    assert swarm.origin_stats()["requests"]["f.bin"] == 2

    time.sleep(max(0.0, t1 + 5.5 - time.monotonic()))
    assert fetch("n5") == new
    assert "changed at the origin" in open(swarm.peers["p1"].log).read()


def test_proxy_revalidates_a_held_rule_file_after_the_window(swarm: Swarm, files: str) -> None:
    """The same through the peer's proxy for a --p2p-rule URL: within the window the held
    file is served from the swarm without an origin request; after the window and a change
    at the origin, the proxy serves the new content, from the swarm."""
    size = 3 * MIB
    path = make_file(files, "big.bin", size, seed=3)
    port = swarm.start_origin(files)
    swarm.start_supernode("--revalidate-after", "2")
    swarm.start_peer("p1", "--p2p-rule", r"/big\.bin", proxy="tcp:0:interface=127.0.0.1")
    proxy = int(swarm.peers["p1"].info["proxy"])
    url = f"http://127.0.0.1:{port}/big.bin"
    old = sha256_file(path)
    t0 = time.monotonic()
    for _ in range(2):
        status, data = proxy_get(url, proxy)
        assert status == 200 and hashlib.sha256(data).hexdigest() == old
    assert time.monotonic() - t0 < 1.8, "too slow to check the window"
    assert swarm.origin_stats()["requests"]["big.bin"] == 1

    new = sha256_file(replace_file(files, "big.bin", size + 5, seed=4))
    time.sleep(max(0.0, t0 + 2.5 - time.monotonic()))
    status, data = proxy_get(url, proxy)
    assert status == 200 and hashlib.sha256(data).hexdigest() == new
    with open(swarm.peers["p1"].log, errors="replace") as f:
        routes = [line for line in f if "route=" in line]
    assert len(routes) == 3 and all("route=p2p status=200" in line for line in routes), routes
