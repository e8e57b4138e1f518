"""Peers and the supernode getting back in step, with real processes: a supernode restart
after a finished download."""

from __future__ import annotations

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
