"""Real processes on loopback: the rate limits take effect.

Only lower bounds on time are checked (a limit can only make things slower); the
bucket starts with at most 200 ms worth of tokens, so 8 MiB at 2 MiB/s cannot take
less than about 3.8 s, and 3.6 s leaves room for clock granularity.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from filegen import make_file

from dfly.devtools.swarm import Swarm
from dfly.devtools.swarm import sha256_file as sha256
from dfly.pieces import MIB

pytestmark = pytest.mark.loopback

SIZE = 8 * MIB
RATE = "2M"
AT_LEAST = 3.6


def _timed_dfget(swarm: Swarm, url: str, out: str, *extra: str, peer: str | None = None) -> float:
    start = time.monotonic()
    r = swarm.dfget(url, out, *extra, peer=peer, timeout=120)
    took = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    return took


def test_peer_download_rate_caps_a_download(swarm: Swarm, files: str) -> None:
    """A peer daemon with --download-rate 2M takes at least 3.6 s for 8 MiB, and the bytes
    are exactly right (the throttling did not trip its own stall or min-rate deadlines)."""
    src = make_file(files, "f.bin", SIZE, seed=11)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1")
    swarm.start_peer("slow", "--download-rate", RATE, "--min-rate", "1M", "--stall-timeout", "2")
    out = os.path.join(swarm.root, "out.bin")
    took = _timed_dfget(swarm, swarm.origin_url("f.bin"), out, peer="slow")
    assert took >= AT_LEAST, took
    assert sha256(out) == sha256(src)


def test_supernode_upload_rate_caps_slices_it_serves(swarm: Swarm, files: str) -> None:
    """With --upload-rate 2M on the supernode, a lone downloader (every piece from the
    supernode) takes at least 3.6 s for 8 MiB, and gets the right bytes."""
    src = make_file(files, "f.bin", SIZE, seed=12)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1", "--upload-rate", RATE)
    out = os.path.join(swarm.root, "out.bin")
    took = _timed_dfget(swarm, swarm.origin_url("f.bin"), out)
    assert took >= AT_LEAST, took
    assert sha256(out) == sha256(src)
    assert swarm.task("/f.bin")["served_bytes"] >= SIZE


def test_supernode_origin_rate_caps_the_origin_fetch(swarm: Swarm, files: str) -> None:
    """With --origin-rate 2M the supernode reads an 8 MiB file from its origin in at least
    3.6 s (origin stall timeout shorter than the throttled time), once, and it is correct."""
    src = make_file(files, "f.bin", SIZE, seed=13)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1", "--origin-rate", RATE, "--origin-timeout", "2")
    out = os.path.join(swarm.root, "out.bin")
    took = _timed_dfget(swarm, swarm.origin_url("f.bin"), out)
    assert took >= AT_LEAST, took
    assert sha256(out) == sha256(src)
    assert swarm.origin_stats()["bytes"]["f.bin"] == SIZE


def test_dfget_download_rate_caps_its_own_peer(swarm: Swarm, files: str) -> None:
    """dfget --supernode --download-rate 2M (its in-process peer) takes at least 3.6 s for 8 MiB."""
    src = make_file(files, "f.bin", SIZE, seed=14)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1")
    out = os.path.join(swarm.root, "out.bin")
    start = time.monotonic()
    r = swarm.dfget(swarm.origin_url("f.bin"), out, "--download-rate", RATE, timeout=120)
    took = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    assert took >= AT_LEAST, took
    assert json.loads(r.stdout)["length"] == SIZE
    assert sha256(out) == sha256(src)
