"""Load on loopback: 200 peers in one process against a real supernode and origin."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from filegen import make_file

from dfly.devtools.swarm import Swarm, proc_cpu_seconds, proc_kib
from dfly.pieces import MIB

pytestmark = pytest.mark.loopback

CLIENTS = 200


def proc_figures(pid: int) -> tuple[float, float]:
    """Peak RSS in MB (VmHWM) and CPU seconds (utime + stime) of a live process."""
    return proc_kib(pid, "VmHWM") / 1024, proc_cpu_seconds(pid)


def test_two_hundred_clients_in_one_process(swarm: Swarm, files: str) -> None:
    """200 peers (one process, one reactor, each with its own home and upload server) fetch
    the same 3 MiB file at once through a real supernode: every one ends with the right md5
    well within the bound, the origin is read once, and the supernode's peak RSS stays under
    500 MB.  The supernode's peak RSS and CPU time and the clients' p50/max are printed."""
    size = 3 * MIB
    src = make_file(files, "load.bin", size, seed=200)
    with open(src, "rb") as f:
        md5 = hashlib.md5(f.read()).hexdigest()
    swarm.start_origin(files)
    info = swarm.start_supernode("--piece-size", "1")
    pid = int(info["pid"])
    rss_before, cpu_before = proc_figures(pid)
    argv = [
        sys.executable, "-m", "dfly.devtools.load",
        "--supernode", swarm.supernode_address, "--url", swarm.origin_url("load.bin"),
        "--clients", str(CLIENTS), "--seconds", "60", "--md5", md5, "--json",
        "--workdir", swarm.root, "--log", os.path.join(swarm.root, "load.log"),
    ]
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=85, cwd=swarm.root)
    wall = time.monotonic() - t0
    rss, cpu = proc_figures(pid)
    print(r.stdout)
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["clients"] == CLIENTS and summary["succeeded"] == CLIENTS, summary
    assert summary["failed"] == 0 and summary["max"] < 60
    assert summary["from_supernode"] + summary["from_peers"] == CLIENTS * size
    assert swarm.origin_stats()["bytes"]["load.bin"] == size
    assert not [d for d in os.listdir(swarm.root) if d.startswith("dfly-load-")], "temp homes left behind"
    print(
        f"{CLIENTS} clients in {wall:.1f} s: client p50 {summary['p50']:.2f} s, p90 {summary['p90']:.2f} s, "
        f"max {summary['max']:.2f} s; supernode peak RSS {rss:.0f} MB (at start {rss_before:.0f} MB), "
        f"CPU {cpu:.2f} s ({cpu - cpu_before:.2f} s during the run); "
        f"{summary['from_supernode']} bytes from the supernode, {summary['from_peers']} from peers"
    )
    assert rss < 500
