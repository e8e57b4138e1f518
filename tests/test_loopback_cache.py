"""Cache garbage collection and damaged caches, with real processes."""

from __future__ import annotations

import glob
import os
import signal

import pytest
from filegen import make_file

from dfly.devtools.swarm import Swarm
from dfly.pieces import MIB

pytestmark = pytest.mark.loopback


def cache_files(home: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(home, "cdn", "*", "*")) if not p.endswith((".meta", ".tmp")))


def test_supernode_evicts_least_recently_used_above_its_limit(swarm: Swarm, files: str) -> None:
    """With a 5 MiB cache limit, three 2 MiB files leave at most two cached; the oldest goes
    first, and asking for it again fetches it from the origin again, correctly."""
    for i in range(3):
        make_file(files, f"f{i}.bin", 2 * MIB, seed=i)
    swarm.start_origin(files)
    swarm.start_supernode("--cache-limit", "5M")
    home = os.path.join(swarm.root, "supernode")
    for i in range(3):
        r = swarm.dfget(swarm.origin_url(f"f{i}.bin"), os.path.join(swarm.root, f"f{i}.out"))
        assert r.returncode == 0, r.stderr
    assert len(cache_files(home)) == 2
    assert [t["url"].rsplit("/", 1)[-1] for t in swarm.api()["tasks"]] == ["f1.bin", "f2.bin"]
    r = swarm.dfget(swarm.origin_url("f0.bin"), os.path.join(swarm.root, "again.out"))
    assert r.returncode == 0, r.stderr
    assert open(os.path.join(swarm.root, "again.out"), "rb").read() == open(os.path.join(files, "f0.bin"), "rb").read()
    assert swarm.origin_stats()["bytes"]["f0.bin"] == 4 * MIB


def test_peer_drops_old_files_above_its_limit(swarm: Swarm, files: str) -> None:
    """A peer daemon with a 3 MiB limit keeps only the newest of two 2 MiB files."""
    make_file(files, "a.bin", 2 * MIB, seed=1)
    make_file(files, "b.bin", 2 * MIB, seed=2)
    swarm.start_origin(files)
    swarm.start_supernode()
    peer = swarm.start_peer("p", "--cache-limit", "3M")
    for name in ("a.bin", "b.bin"):
        r = swarm.dfget(swarm.origin_url(name), os.path.join(swarm.root, name + ".out"), peer="p")
        assert r.returncode == 0, r.stderr
    assert len(os.listdir(os.path.join(peer.info["home"], "tasks"))) == 1
    assert "to stay under the cache limit" in open(peer.log).read()


def test_damaged_supernode_cache_is_detected_and_refetched(swarm: Swarm, files: str) -> None:
    """Bytes flipped inside the supernode's cached slices are caught by the receiving peer's
    md5 check; the supernode verifies its copy, refetches from the first bad piece, and the
    download completes byte-exact."""
    src = make_file(files, "f.bin", 6 * MIB, seed=3)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1")
    home = os.path.join(swarm.root, "supernode")
    r = swarm.dfget(swarm.origin_url("f.bin"), os.path.join(swarm.root, "first.out"))
    assert r.returncode == 0, r.stderr
    (cache,) = cache_files(home)
    with open(cache, "r+b") as f:
        f.seek(2 * MIB + 1000)
        f.write(b"\x00damaged\x00")
    out = os.path.join(swarm.root, "second.out")
    r = swarm.dfget(swarm.origin_url("f.bin"), out)
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == open(src, "rb").read()
    log = open(os.path.join(swarm.root, "supernode.log")).read()
    assert "is damaged" in log
    assert swarm.origin_stats()["statuses"].get("f.bin 206") == 1


def test_truncated_cache_is_dropped_at_restart(swarm: Swarm, files: str) -> None:
    """A cache file cut short while the supernode was down is not trusted after a restart:
    the file is fetched again and served correctly."""
    src = make_file(files, "f.bin", 3 * MIB, seed=4)
    swarm.start_origin(files)
    info = swarm.start_supernode("--piece-size", "1")
    home = os.path.join(swarm.root, "supernode")
    r = swarm.dfget(swarm.origin_url("f.bin"), os.path.join(swarm.root, "first.out"))
    assert r.returncode == 0, r.stderr
    first = [p for p in swarm.procs if p.name == "supernode"][0]
    first.stop(signal.SIGKILL)
    first.name = "killed-supernode"
    (cache,) = cache_files(home)
    os.truncate(cache, MIB)
    swarm.start_supernode("--piece-size", "1", "--home", home, "--port", f"tcp:{info['port']}:interface=127.0.0.1", name="supernode2")
    out = os.path.join(swarm.root, "second.out")
    r = swarm.dfget(swarm.origin_url("f.bin"), out)
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == open(src, "rb").read()
