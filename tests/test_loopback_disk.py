"""Full disks: a clear error, nothing corrupt left behind, and recovery once space returns.

These mount small tmpfs file systems, so they need root; elsewhere they are skipped.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from filegen import make_file

from dfly.devtools.swarm import Swarm

pytestmark = pytest.mark.loopback


@pytest.fixture
def small_fs(tmp_path: object) -> Iterator[str]:
    """A 6 MiB tmpfs, unmounted at teardown."""
    path = os.path.join(str(tmp_path), "small")
    os.makedirs(path)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", path], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def grow(path: str, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", path], check=True)


def test_peer_disk_full_then_recovers(swarm: Swarm, files: str, small_fs: str) -> None:
    """A peer daemon whose home fills up fails the download with exit 6 and a one-line
    reason; no source is blamed; after the disk grows the same download succeeds."""
    src = make_file(files, "f.bin", 10 * 1024 * 1024)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1")
    swarm.start_peer("p", "--home", small_fs)
    swarm.peers["p"].info["home"] = small_fs
    out = os.path.join(swarm.root, "f.out")
    r = swarm.dfget(swarm.origin_url("f.bin"), out, peer="p")
    assert r.returncode == 6, r
    assert "No space left" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out)
    assert os.listdir(os.path.join(small_fs, "tasks")) == []
    assert not any(p["blacklisted"] for t in swarm.api()["tasks"] for p in t["peers"])
    grow(small_fs, "64m")
    r = swarm.dfget(swarm.origin_url("f.bin"), out, peer="p")
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == open(src, "rb").read()
    assert swarm.peers["p"].alive()


def test_supernode_disk_full_then_recovers(swarm: Swarm, files: str, small_fs: str) -> None:
    """A supernode whose cache fills up fails the task with a clear reason (no corrupt cache
    entry left), keeps running, and serves the file once the disk has room."""
    src = make_file(files, "f.bin", 10 * 1024 * 1024)
    swarm.start_origin(files)
    swarm.start_supernode("--home", small_fs)
    out = os.path.join(swarm.root, "f.out")
    r = swarm.dfget(swarm.origin_url("f.bin"), out, "--no-back-source")
    assert r.returncode == 1, r
    assert "No space left" in r.stderr
    assert not os.path.exists(out)
    leftovers = [f for _, _, fs in os.walk(os.path.join(small_fs, "cdn")) for f in fs]
    assert leftovers == []
    grow(small_fs, "64m")
    r = swarm.dfget(swarm.origin_url("f.bin"), out, "--no-back-source")
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == open(src, "rb").read()
