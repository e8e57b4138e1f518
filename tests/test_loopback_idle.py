"""Idle connections: silent clients are closed, living peers are kept."""

from __future__ import annotations

import os
import socket
import time

import pytest
from filegen import make_file

from dfly.devtools.swarm import Swarm

pytestmark = pytest.mark.loopback


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes C{sock} within C{seconds}."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_silent_connections_are_closed_and_pinging_peers_kept(swarm: Swarm, files: str) -> None:
    """Connections that send nothing are closed after the idle timeout on both the supernode
    and a peer's upload port, while a peer daemon's control link, pinging, stays up and the
    swarm still works after several idle periods."""
    src = make_file(files, "f.bin", 2_000_000)
    swarm.start_origin(files)
    sn = swarm.start_supernode("--idle-timeout", "2")
    peer = swarm.start_peer("p", "--idle-timeout", "2", "--keepalive", "0.5")
    loris = [socket.create_connection(("127.0.0.1", port)) for port in (sn["port"], peer.info["port"])]
    try:
        t0 = time.monotonic()
        assert all(closed_within(s, 10) for s in loris)
        assert time.monotonic() - t0 < 10
    finally:
        for s in loris:
            s.close()
    time.sleep(3)  # longer than the idle timeout: the pinging control link must survive it
    assert "lost supernode link" not in open(peer.log).read()
    out = os.path.join(swarm.root, "f.out")
    r = swarm.dfget(swarm.origin_url("f.bin"), out, peer="p")
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == open(src, "rb").read()
