"""Backpressure on a real peer daemon: a reader that stops reading does not make it buffer.

iosim never pauses producers, so only a real process over a real socket can show this.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import pytest
from filegen import make_file

from dfly.devtools.swarm import Swarm, proc_kib
from dfly.wire.framing import encode_control

pytestmark = pytest.mark.loopback




def test_stalled_reader_costs_no_memory(swarm: Swarm, files: str) -> None:
    """32 pipelined requests for 4 MiB slices from a client that never reads: the peer's
    memory grows by far less than the 128 MiB asked for, and it keeps serving others."""
    make_file(files, "f.bin", 24 * 1024 * 1024)
    swarm.start_origin(files)
    swarm.start_supernode()
    peer = swarm.start_peer("p")
    r = swarm.dfget(swarm.origin_url("f.bin"), os.path.join(swarm.root, "f.out"), peer="p")
    assert r.returncode == 0, r.stderr
    task = json.loads(r.stdout)["task"]
    port = peer.info["port"]
    before = proc_kib(peer.popen.pid, "VmRSS")

    hog = socket.create_connection(("127.0.0.1", port))
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    hog.sendall(b"".join(encode_control({"op": "get", "task": task, "piece": n % 6}) for n in range(32)))
    time.sleep(3)
    grown = proc_kib(peer.popen.pid, "VmRSS") - before
    assert grown < 40 * 1024, f"peer grew by {grown} KiB while a reader stalled"

    # Another client is still served promptly while the hog is stuck.
    other = socket.create_connection(("127.0.0.1", port), timeout=10)
    other.sendall(encode_control({"op": "get", "task": task, "piece": 5}))
    head = b""
    while len(head) < 4:
        head += other.recv(4 - len(head))
    (length,) = struct.unpack("!I", head)
    body = b""
    while len(body) < length:
        body += other.recv(length - len(body))
    assert json.loads(body)["op"] == "slice"
    other.close()
    hog.close()
    assert peer.alive()
