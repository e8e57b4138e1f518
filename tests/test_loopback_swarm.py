"""Real processes on loopback: a supernode, peer daemons, dfget and a counting origin."""

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




def test_eight_peers_share_one_origin_fetch(swarm: Swarm, files: str) -> None:
    """Eight peer daemons fetching one 64 MiB file at once all get the right bytes; the
    origin sends it exactly once and the supernode serves well under half of all slice bytes."""
    size = 64 * MIB
    src = make_file(files, "layer.bin", size)
    swarm.start_origin(files)
    swarm.start_supernode()
    names = [f"peer{i}" for i in range(8)]
    for name in names:
        swarm.start_peer(name)
    url = swarm.origin_url("layer.bin")
    outs = [os.path.join(swarm.root, f"out-{n}.bin") for n in names]
    results = swarm.dfget_many([(url, out, n) for out, n in zip(outs, names, strict=True)], timeout=240)
    for r in results:
        assert r.returncode == 0, r.stderr
    want = sha256(src)
    assert [sha256(o) for o in outs] == [want] * 8
    assert swarm.origin_stats()["bytes"]["layer.bin"] == size
    task = swarm.task("/layer.bin")
    assert task["state"] == "done" and task["source_bytes"] == size
    slice_bytes = 8 * (size + 5 * task["piece_count"])
    assert task["served_bytes"] < slice_bytes / 2, task
    summaries = [json.loads(r.stdout) for r in results]
    from_peers = sum(s["from_peers"] for s in summaries)
    assert from_peers > 0.5 * 8 * size
    assert sum(s["from_supernode"] + s["from_peers"] for s in summaries) == 8 * size


def test_damaged_peer_is_reported_and_drops_its_copy(swarm: Swarm, files: str) -> None:
    """A peer whose stored copy is damaged on disk serves slices that fail md5: downloaders
    report it, the supernode asks it to check the piece, it finds its copy damaged, drops it
    and leaves the task (within 15 s it is no member holding pieces), and every output is
    still exactly right.  (Sources that lie rather than hold a damaged copy are blacklisted:
    test_loopback_byzantine.py.)"""
    size = 12 * MIB + 12345
    src = make_file(files, "f.bin", size, seed=7)
    swarm.start_origin(files)
    # Several downloads per peer at once, so that both downloaders try the damaged source
    # before the healthy copies elsewhere are enough (with one download per peer, one
    # downloader may never be sent to it and the source fails only once).
    swarm.start_supernode("--piece-size", "1", "--blacklist-limit", "2", "--up-limit", "5", "--down-limit", "4")
    bad = swarm.start_peer("bad")
    url = swarm.origin_url("f.bin")
    r = swarm.dfget(url, os.path.join(swarm.root, "bad.out"), peer="bad")
    assert r.returncode == 0, r.stderr
    stored = os.path.join(bad.info["home"], "tasks", json.loads(r.stdout)["task"], "data")
    with open(stored, "r+b") as f:
        for n in range(0, 13):
            f.seek(n * (MIB - 5) + 100)
            f.write(b"\xff\x00garbage\x00\xff")
    swarm.start_peer("good1")
    swarm.start_peer("good2")
    outs = [os.path.join(swarm.root, f"{n}.out") for n in ("good1", "good2")]
    results = swarm.dfget_many([(url, outs[0], "good1"), (url, outs[1], "good2")], timeout=120)
    for r in results:
        assert r.returncode == 0, r.stderr
    want = sha256(src)
    assert [sha256(o) for o in outs] == [want, want]
    bad_id = bad.info["peer"]
    log = open(swarm.peers["good1"].log).read() + open(swarm.peers["good2"].log).read()
    assert "md5" in log and "failed" in log
    sn_log = open(os.path.join(swarm.root, "supernode.log")).read()
    assert f" from {bad_id}: slice md5" in sn_log
    assert f"asking peer {bad_id} to check its copy of piece" in sn_log

    def bad_holds_pieces() -> bool:
        peers = {p["id"]: p for p in swarm.task("/f.bin")["peers"]}
        return bad_id in peers and peers[bad_id]["pieces"] > 0

    deadline = time.monotonic() + 15
    while bad_holds_pieces():
        assert time.monotonic() < deadline, "the damaged peer still offers its copy"
        time.sleep(0.05)
    assert "is damaged" in open(bad.log).read()


@pytest.mark.parametrize(
    ("name", "size", "path"),
    [
        ("empty", 0, "empty"),
        ("one", 1, "one"),
        ("exact", 3 * (MIB - 5), "exact"),
        ("chunked", 3 * (MIB - 5) + 7, "chunked/chunked"),
        ("query", 2 * MIB, "query?a=1&sig=secret"),
    ],
)
def test_edge_files(swarm: Swarm, files: str, name: str, size: int, path: str) -> None:
    """Edge-sized and edge-served files arrive byte-exact through an in-process dfget peer:
    0 bytes, 1 byte, exactly k*(P-5) bytes, chunked with no Content-Length, a query string."""
    src = make_file(files, name, size, seed=size)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1")
    out = os.path.join(swarm.root, f"{name}.out")
    r = swarm.dfget(swarm.origin_url(path), out, "--filter", "sig")
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(out) == size
    assert sha256(out) == sha256(src)
    task = swarm.api()["tasks"][0]
    assert task["length"] == size
    assert task["piece_count"] == max(1, -(-size // (MIB - 5)))
    if name == "query":
        assert "sig=" not in task["url"] and "a=1" in task["url"]


def test_pieces_flow_to_peers_while_the_origin_is_still_sending(swarm: Swarm, files: str) -> None:
    """With a slow origin (4 MiB/s), peers hold pieces while the supernode's fetch is still
    running: pieces are offered as they are written, not when the whole file is cached."""
    import subprocess
    import time

    size = 12 * MIB
    src = make_file(files, "slow.bin", size)
    swarm.start_origin(files, "--rate", "4M")
    swarm.start_supernode("--piece-size", "1")
    swarm.start_peer("a")
    out = os.path.join(swarm.root, "slow.out")
    proc = subprocess.Popen(swarm.dfget_argv(swarm.origin_url("slow.bin"), out, peer="a"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    overlap = False
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        tasks = swarm.api()["tasks"]
        if tasks and tasks[0]["state"] == "running" and any(p["pieces"] > 0 for p in tasks[0]["peers"]):
            overlap = True
        time.sleep(0.1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert overlap, "no peer held a piece while the origin fetch was running"
    assert sha256(out) == sha256(src)


def test_a_piece_is_streamed_and_relayed_while_it_still_arrives(swarm: Swarm, files: str) -> None:
    """With a slow origin (1 MiB/s, pieces of 4 MiB), bytes of the first piece reach the peers
    before the supernode holds any piece whole: the supernode streams the piece as it
    arrives, and with three peers at least one copy comes from a peer that was itself still
    receiving it.  Every copy is verified (the md5s follow the pieces) and the origin sends
    the file once."""
    import subprocess
    import time

    size = 8 * MIB
    src = make_file(files, "stream.bin", size)
    swarm.start_origin(files, "--rate", "1M")
    swarm.start_supernode("--piece-size", "4")
    names = ["a", "b", "c"]
    swarm.start_peers(names)
    outs = {n: os.path.join(swarm.root, f"{n}.out") for n in names}
    procs = [
        subprocess.Popen(swarm.dfget_argv(swarm.origin_url("stream.bin"), outs[n], peer=n), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in names
    ]
    streamed = False
    deadline = time.monotonic() + 60
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        tasks = swarm.api()["tasks"]
        if tasks and tasks[0]["pieces_cached"] == 0 and tasks[0]["streamed"] > 0:
            streamed = True
        time.sleep(0.05)
    results = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    assert streamed, "nothing was served before the first piece was whole"
    for n in names:
        assert sha256(outs[n]) == sha256(src)
    task = swarm.task("/stream.bin")
    assert task["source_bytes"] == size
    # Each piece was assigned while it arrived: to one peer from the supernode, on to the
    # other two from peers still receiving it.
    assert task["relayed"] >= 2 * task["piece_count"]
    # The supernode served each piece once; the other copies came from peers, some of them
    # while the piece was still arriving (a chain: CDN -> a -> b -> c at the same time).
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert sum(s["from_supernode"] for s in summaries) == size
    assert sum(s["from_peers"] for s in summaries) == 2 * size
