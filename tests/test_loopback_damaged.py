"""Held copies damaged on disk after they were verified, with real processes on loopback.

Peers finish a download, then bytes of their data files are overwritten (as disk
damage would).  The swarm, dfget and the registry proxy must still deliver right
bytes, and the damaged copies must not stay on offer: the supernode asks a source
whose slice failed its md5 to check its copy, and a peer's own readers drop a copy
they find wrong.
"""

from __future__ import annotations

import glob
import hashlib
import os

import pytest
from filegen import make_file
from httphelpers import LOCAL, blob_url, get, registry_blob, sha
from waiting import wait_for

from dfly.devtools.swarm import Swarm
from dfly.devtools.swarm import sha256_file as sha256
from dfly.pieces import MIB

pytestmark = pytest.mark.loopback

PIECE_DATA = MIB - 5


def data_file(swarm: Swarm, peer: str) -> str:
    """The data file of the one task peer C{peer} holds."""
    (path,) = glob.glob(os.path.join(swarm.peers[peer].info["home"], "tasks", "*", "data"))
    return path


def damage(path: str, pieces: int, silent: bool = False) -> None:
    """Overwrite a few bytes in each of the first C{pieces} pieces of a data file.  Silent:
    the file keeps its mtime afterwards, as damage the filesystem does not see would;
    otherwise its mtime moves on, as it does after any write (made sure of here even where
    the write lands in the same tick of a coarse file clock as the download's last one)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        for n in range(pieces):
            f.seek(n * PIECE_DATA + 1000)
            f.write(b"\x00damaged\xff")
    if silent:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif os.stat(path).st_mtime_ns == st.st_mtime_ns:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def holds_pieces(swarm: Swarm, suffix: str, peer_id: str) -> bool:
    """Whether the supernode still counts C{peer_id} as a member of the task holding pieces."""
    peers = {p["id"]: p for p in swarm.task(suffix)["peers"]}
    return peer_id in peers and peers[peer_id]["pieces"] > 0


def log_of(swarm: Swarm, peer: str) -> str:
    with open(swarm.peers[peer].log, errors="replace") as f:
        return f.read()


def test_damaged_finished_peers_drop_their_copies_and_a_new_peer_still_verifies(swarm: Swarm, files: str) -> None:
    """p1 and p4 finish a 6 MiB file, then a few bytes of every piece of both data files are
    overwritten.  A new peer p5 still ends with a byte-exact file; the slices it got from
    p1 and p4 failed their md5, the supernode asked each of them to check that piece, and
    within 15 s neither is a member holding pieces any more (each found its copy damaged,
    dropped it and left the task).  A dfget from p1 afterwards downloads the file again
    and gets it right."""
    size = 6 * MIB + 4321
    pieces = -(-size // PIECE_DATA)
    src = make_file(files, "f.bin", size, seed=17)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1")
    url = swarm.origin_url("f.bin")
    for name in ("p1", "p4"):
        swarm.start_peer(name)
    results = swarm.dfget_many([(url, os.path.join(swarm.root, f"{n}.out"), n) for n in ("p1", "p4")], timeout=120)
    for r in results:
        assert r.returncode == 0, r.stderr
    ids = {n: swarm.peers[n].info["peer"] for n in ("p1", "p4")}
    for n in ids:
        assert holds_pieces(swarm, "/f.bin", ids[n])
        damage(data_file(swarm, n), pieces)

    swarm.start_peer("p5")
    out = os.path.join(swarm.root, "p5.out")
    r = swarm.dfget(url, out, peer="p5", timeout=120)
    assert r.returncode == 0, r.stderr
    assert sha256(out) == sha256(src)
    p5_log = log_of(swarm, "p5")
    for n, peer_id in ids.items():
        assert f"from {peer_id} failed: slice md5" in p5_log, n
    wait_for(lambda: not any(holds_pieces(swarm, "/f.bin", i) for i in ids.values()), 15,
             "p1 and p4 to drop their damaged copies")
    with open(os.path.join(swarm.root, "supernode.log"), errors="replace") as f:
        sn_log = f.read()
    for n, peer_id in ids.items():
        assert f"asking peer {peer_id} to check its copy of piece" in sn_log, n
        assert "is damaged" in log_of(swarm, n), n

    again = os.path.join(swarm.root, "p1.again")
    r = swarm.dfget(url, again, peer="p1", timeout=120)
    assert r.returncode == 0, r.stderr
    assert sha256(again) == sha256(src)
    assert sha256(data_file(swarm, "p1")) == sha256(src)


def test_dfget_from_a_daemon_whose_held_file_was_overwritten_gets_the_right_bytes(swarm: Swarm, files: str) -> None:
    """dfget --home asks a daemon that holds the file; its data file was written to since
    it was verified (its mtime moved), so the daemon hashes it again before answering,
    finds it wrong, drops it and downloads it again: dfget exits 0 with the right bytes."""
    size = 3 * MIB + 99
    src = make_file(files, "g.bin", size, seed=23)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1")
    url = swarm.origin_url("g.bin")
    swarm.start_peer("p1")
    first = os.path.join(swarm.root, "first.out")
    assert swarm.dfget(url, first, peer="p1").returncode == 0
    damage(data_file(swarm, "p1"), 2)
    out = os.path.join(swarm.root, "second.out")
    r = swarm.dfget(url, out, peer="p1")
    assert r.returncode == 0, r.stderr
    assert sha256(out) == sha256(src)
    log = log_of(swarm, "p1")
    assert "changed on disk; verifying it again" in log and "is damaged" in log
    assert swarm.origin_stats()["requests"]["g.bin"] == 1  # again through the swarm, not the origin


@pytest.mark.parametrize("silent", [False, True], ids=["overwritten", "silent"])
def test_pull_through_the_damaged_peers_own_proxy_is_right_on_retry(swarm: Swarm, files: str, silent: bool) -> None:
    """p1 and p4 pull an 8 MiB blob through their proxies, then a few bytes of every piece
    of both copies are overwritten.  Pulling the blob through p1's own proxy: when the
    write shows in the file's mtime, p1 verifies the copy again before answering and the
    first pull is already right; when it does not (silent), the first pull may be cut
    (never a wrong blob delivered whole: the digest check withholds the last chunk) and
    p1 drops its copy at that moment.  Either way the next pull returns the right blob,
    downloaded again through the swarm (the registry still sent the blob's bytes once)."""
    size = 8 * MIB
    digest, _ = registry_blob(files, size, seed=31)
    swarm.start_origin(files, "--registry-like")
    swarm.start_supernode("--piece-size", "1")
    registry = f"http://127.0.0.1:{swarm.origin_port}"
    for name in ("p1", "p4"):
        swarm.start_peer(name, "--registry", registry, proxy=LOCAL)
        a = get(blob_url(swarm.proxy_url(name), "app", digest))
        assert a.status == 200 and a.complete and sha(a.body) == digest, (name, a.status, a.error)
    for name in ("p1", "p4"):
        damage(data_file(swarm, name), size // PIECE_DATA, silent=silent)

    first = get(blob_url(swarm.proxy_url("p1"), "app", digest))
    if silent:
        assert not first.complete, "a damaged copy was delivered whole"
        assert sha(first.body) != digest
    else:
        assert first.status == 200 and first.complete and sha(first.body) == digest, (first.status, first.error)
    second = get(blob_url(swarm.proxy_url("p1"), "app", digest))
    assert second.status == 200 and second.complete, (second.status, second.error)
    assert sha(second.body) == digest
    assert hashlib.sha256(open(data_file(swarm, "p1"), "rb").read()).hexdigest() == digest.split(":", 1)[1]
    assert "is damaged" in log_of(swarm, "p1")
    assert swarm.origin_stats()["bytes"][digest] == size

    def routes() -> list[str]:
        return [line for line in log_of(swarm, "p1").splitlines() if "route=" in line]

    # The access log line follows the body: the two pulls through p1, the last from the swarm.
    wait_for(lambda: len(routes()) >= 3, 10, "the second pull's access log line")
    assert "route=p2p status=200" in routes()[-1], routes()[-3:]
