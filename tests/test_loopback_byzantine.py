"""Byzantine peers on loopback: a liar claims pieces it never fetched and serves bad slices.

The liar (L{dfly.devtools.liar}) is a separate process speaking the protocol
with plain sockets; everything else is the real supernode, real peer daemons
and dfget.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import pytest
from filegen import make_file
from waiting import wait_for

from dfly.devtools.swarm import Proc, Swarm, proc_kib
from dfly.devtools.swarm import sha256_file as sha256
from dfly.pieces import MIB

pytestmark = pytest.mark.loopback

PIECE_DATA = MIB - 5


def start_liar(swarm: Swarm, url: str, mode: str, *extra: str, name: str | None = None) -> Proc:
    """Start a liar process (stopped with the swarm) and wait until it is registered."""
    name = name or f"liar-{mode}"
    ready = os.path.join(swarm.root, f"{name}.ready")
    argv = [
        sys.executable, "-m", "dfly.devtools.liar",
        "--supernode", swarm.supernode_address, "--url", url, "--mode", mode,
        "--seconds", "120", "--ready-file", ready, *extra,
    ]
    return swarm.spawn(name, argv, ready)


def peers_of(swarm: Swarm, suffix: str) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in swarm.task(suffix)["peers"]}


def stop_liar(proc: Proc) -> dict[str, int]:
    """Stop a liar with SIGTERM and return the counts from its summary line."""
    assert proc.stop() == 0, Swarm.tail(proc.log)
    with open(proc.log) as f:
        lines = [line for line in f if " summary " in line]
    assert lines, Swarm.tail(proc.log)
    return dict(json.loads(lines[-1].split(" summary ", 1)[1]))


def failures_from(log: str, source_id: str) -> list[str]:
    """The 'piece N of T from SOURCE failed: why' lines a peer daemon logged for one source."""
    with open(log, errors="replace") as f:
        return [line for line in f if f"from {source_id} failed:" in line]


# What an honest downloader must have said about each kind of bad slice.
EXPECTED_REASON = {
    "lie": r"slice md5 [0-9a-f]{32} is not the announced [0-9a-f]{32}",
    "slow": r"slice md5 [0-9a-f]{32} is not the announced [0-9a-f]{32}",
    "garbage": r"slice (version|header|piece size|dataLen|tail)|reserved bit",
    "truncate": r"connection to source lost",
}


@pytest.mark.parametrize("mode", ["lie", "garbage", "truncate", "slow"])
def test_liar_is_caught_and_no_wrong_byte_reaches_an_output(swarm: Swarm, files: str, mode: str) -> None:
    """A liar registered first claims every piece without fetching any, so the scheduler
    offers it as the source of every piece; it then serves wrong data with a valid header
    (lie), random bytes (garbage), half a slice and a close (truncate) or wrong data slowly
    (slow).  Three peer daemons downloading the same 10 MiB file at once all exit 0 with a
    byte-exact output (equal sha256: not one of the liar's bytes got through), every bad
    slice is reported with its reason, and the supernode blacklists the liar."""
    size = 10 * MIB + 12345
    pieces = -(-size // PIECE_DATA)
    src = make_file(files, "f.bin", size, seed=11)
    swarm.start_origin(files)
    # 5/4 limits, like the damaged-peer test: the subject is blacklisting, which needs several
    # downloaders to be sent to the liar (with the 1/1 defaults one may never be).
    swarm.start_supernode("--piece-size", "1", "--blacklist-limit", "2", "--up-limit", "5", "--down-limit", "4")
    url = swarm.origin_url("f.bin")
    extra = ("--rate", str(256 * 1024)) if mode == "slow" else ()
    liar = start_liar(swarm, url, mode, *extra)
    liar_id = liar.info["peer"]
    # The liar "holds" every piece before any honest peer asks for one.
    wait_for(lambda: peers_of(swarm, "/f.bin")[liar_id]["pieces"] == pieces, 20, "the liar to claim every piece")

    names = ["a", "b", "c"]
    for n in names:
        swarm.start_peer(n)
    outs = {n: os.path.join(swarm.root, f"{n}.out") for n in names}
    results = swarm.dfget_many([(url, outs[n], n) for n in names], timeout=120)
    for n, r in zip(names, results, strict=True):
        assert r.returncode == 0, (n, r.stderr)
        summary = json.loads(r.stdout)
        assert summary["from_supernode"] + summary["from_peers"] == size
    want = sha256(src)
    assert {n: sha256(outs[n]) for n in names} == {n: want for n in names}

    peers = peers_of(swarm, "/f.bin")
    assert peers[liar_id]["blacklisted"], peers[liar_id]
    for n in names:
        honest = peers[swarm.peers[n].info["peer"]]
        assert honest["done"] and not honest["blacklisted"], honest

    reports = [line for n in names for line in failures_from(swarm.peers[n].log, liar_id)]
    assert len(reports) >= 2, "the honest peers reported fewer than two bad slices"
    for line in reports:
        assert re.search(EXPECTED_REASON[mode], line), line
    with open(os.path.join(swarm.root, "supernode.log"), errors="replace") as f:
        assert sum(f" from {liar_id}: " in line for line in f) >= 2

    counts = stop_liar(liar)
    assert counts["claimed"] >= pieces and counts.get("served", 0) >= 1, counts


def test_downloader_facing_only_bad_sources_gets_the_file_from_the_supernode(swarm: Swarm, files: str) -> None:
    """Three liars (lie, garbage, truncate) hold every piece before an honest peer asks;
    the blacklist is out of reach (limit 1000), so only the downloader's own routing can
    save it.  It fails over the liars, then fetches every byte from the supernode's CDN
    (paced origin: pieces arrive while it runs) and ends with a byte-exact file."""
    size = 8 * MIB + 777
    pieces = -(-size // PIECE_DATA)
    src = make_file(files, "g.bin", size, seed=5)
    swarm.start_origin(files, "--rate", "4M")
    swarm.start_supernode("--piece-size", "1", "--blacklist-limit", "1000")
    url = swarm.origin_url("g.bin")
    liars = [start_liar(swarm, url, mode) for mode in ("lie", "garbage", "truncate")]
    ids = [p.info["peer"] for p in liars]
    wait_for(lambda: all(peers_of(swarm, "/g.bin")[i]["pieces"] >= 2 for i in ids), 20, "the liars to claim pieces")

    swarm.start_peer("victim")
    out = os.path.join(swarm.root, "victim.out")
    r = swarm.dfget(url, out, peer="victim", timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["from_peers"] == 0 and summary["from_supernode"] == size, summary
    assert sha256(out) == sha256(src)

    peers = peers_of(swarm, "/g.bin")
    for i in ids:
        assert peers[i]["pieces"] == pieces and not peers[i]["blacklisted"], peers[i]
    tried = [i for i in ids if failures_from(swarm.peers["victim"].log, i)]
    assert len(tried) >= 2, f"the victim only tried {tried}"
    served = sum(stop_liar(p).get("served", 0) for p in liars)
    assert served >= 2


def test_trickling_liar_does_not_hold_a_download_hostage(swarm: Swarm, files: str) -> None:
    """A liar that claims every piece and then answers at 1 KB/s (never silent, so the 5 s
    stall timeout never fires) does not keep an honest peer from a file the supernode holds
    in full: every piece is a full 1 MiB slice (about 17 minutes each at that rate), yet the
    peer gives the liar up (per-piece deadline from --min-rate), reports it, and finishes
    from the supernode within 20 s with the right bytes."""
    size = 4 * PIECE_DATA  # no short last piece the liar could finish quickly
    src = make_file(files, "t.bin", size, seed=3)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1")
    url = swarm.origin_url("t.bin")
    liar = start_liar(swarm, url, "slow", "--rate", "1000", "--seconds", "90")
    liar_id = liar.info["peer"]
    wait_for(lambda: peers_of(swarm, "/t.bin")[liar_id]["pieces"] == 4, 20, "the liar to claim every piece")
    swarm.start_peer("victim", "--stall-timeout", "5")
    out = os.path.join(swarm.root, "victim.out")
    t0 = time.monotonic()
    r = swarm.dfget(url, out, "--timeout", "20", peer="victim", timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 20
    assert sha256(out) == sha256(src)
    assert json.loads(r.stdout)["from_peers"] == 0
    assert failures_from(swarm.peers["victim"].log, liar_id), "the victim never reported the liar"
    counts = stop_liar(liar)
    assert counts.get("served", 0) >= 1 and counts.get("completed", 0) == 0, counts




def test_claiming_a_huge_have_range_costs_the_supernode_little(swarm: Swarm, files: str) -> None:
    """A register frame is a few dozen bytes; a liar claiming 'have: 0-499999' for a task
    whose piece count is not known yet (slow origin) does not make the supernode allocate
    more than 50 MB (before claims were clamped, every claimed number became a set entry
    and a holder set: about 180 MB here, gigabytes for 0-16777215), and the liar is not
    credited with more pieces than the file can have."""
    make_file(files, "h.bin", 2 * MIB)
    swarm.start_origin(files, "--rate", "256K")
    info = swarm.start_supernode("--piece-size", "1")
    before = proc_kib(info["pid"], "VmHWM")
    liar = start_liar(swarm, swarm.origin_url("h.bin"), "lie", "--have", "0-499999")
    swarm.api()  # the reactor has digested the registration
    grown_mb = (proc_kib(info["pid"], "VmHWM") - before) / 1024
    print(f"supernode peak RSS grew by {grown_mb:.0f} MB for one register frame")
    assert grown_mb < 50
    assert peers_of(swarm, "/h.bin")[liar.info["peer"]]["pieces"] <= 3
