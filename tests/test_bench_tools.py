"""The benchmark's own pieces: bencoding, the tracker, the .torrent writer, T*, tables and targets."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import urllib.parse
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from dfly.devtools import benchreport, bencode, torrent
from dfly.devtools.bench import Figure, percentile, summarize, t_star
from dfly.devtools.tracker import TrackerResource
from dfly.errors import BencodeError

# -- bencode ---------------------------------------------------------------------------


def test_encode_known_bytes() -> None:
    """Integers, strings, lists and dictionaries encode to the exact BEP 3 bytes, keys sorted."""
    assert bencode.encode(0) == b"i0e"
    assert bencode.encode(-42) == b"i-42e"
    assert bencode.encode(b"spam") == b"4:spam"
    assert bencode.encode("") == b"0:"
    assert bencode.encode(["spam", 42]) == b"l4:spami42ee"
    assert bencode.encode({"zeta": 1, "alpha": b"x", b"mid": []}) == b"d5:alpha1:x3:midle4:zetai1ee"


def test_encode_refuses_what_has_no_bencoding() -> None:
    """Booleans, floats, None and non-string keys are refused with BencodeError."""
    for value in (True, 1.5, None, {1: 2}):
        with pytest.raises(BencodeError):
            bencode.encode(value)


def test_decode_round_trip() -> None:
    """What encode writes, decode reads back (strings as bytes)."""
    value = {"announce": "http://t/announce", "info": {"length": 123, "pieces": b"\x00" * 40, "name": "f"}, "l": [1, [2, b"3"]]}
    assert bencode.decode(bencode.encode(value)) == {
        b"announce": b"http://t/announce",
        b"info": {b"length": 123, b"pieces": b"\x00" * 40, b"name": b"f"},
        b"l": [1, [2, b"3"]],
    }


def test_decode_every_truncation_fails_cleanly() -> None:
    """Each proper prefix of a valid encoding, fed to decode, raises BencodeError (never another error)."""
    data = bencode.encode({"a": [1, -2, b"xyz"], "b": {"c": b""}})
    for i in range(len(data)):
        with pytest.raises(BencodeError):
            bencode.decode(data[:i])
    assert bencode.decode(data)[b"a"] == [1, -2, b"xyz"]


@pytest.mark.parametrize("bad", [b"i-0e", b"i03e", b"ie", b"03:abc", b"d1:bi1e1:ai2ee", b"di1ei2ee", b"i1ei2e", b"x", b"5:ab"])
def test_decode_rejects_non_canonical(bad: bytes) -> None:
    """Leading zeros, negative zero, unsorted or non-string keys, trailing bytes and short strings are errors."""
    with pytest.raises(BencodeError):
        bencode.decode(bad)


# -- tracker ---------------------------------------------------------------------------

INFO = bytes(range(20))


def announce(stub: StubTreq, peer_id: bytes, port: int, **extra: Any) -> bytes:
    query = urllib.parse.urlencode({"info_hash": INFO, "peer_id": peer_id, "port": port, **extra})
    out: list[Any] = []
    stub.get("http://tracker.test/announce?" + query).addCallback(stub.content).addBoth(out.append)
    stub.flush()
    assert out and isinstance(out[0], bytes), out
    return out[0]


def pid(n: int) -> bytes:
    return b"-BN0001-" + b"%012d" % n


def test_tracker_compact_reply_bytes() -> None:
    """The second peer's announce gets exactly the first peer's compact 6-byte address and port back."""
    clock = Clock()
    stub = StubTreq(TrackerResource(clock, interval=2))
    first = announce(stub, pid(1), 6881, left=100, event="started", compact=1)
    assert first == b"d8:completei0e10:incompletei1e8:intervali2e12:min intervali1e5:peers0:e"
    second = announce(stub, pid(2), 6882, left=0, compact=1)
    host = bencode.decode(second)[b"peers"][:4]
    assert second == (
        b"d8:completei1e10:incompletei1e8:intervali2e12:min intervali1e5:peers6:" + host + (6881).to_bytes(2, "big") + b"e"
    )


def test_tracker_non_compact_and_stopped_and_expiry() -> None:
    """compact=0 gives dictionaries; event=stopped removes a peer; a silent peer is forgotten after 3 intervals."""
    clock = Clock()
    stub = StubTreq(TrackerResource(clock, interval=2))
    announce(stub, pid(1), 7001, left=5)
    announce(stub, pid(2), 7002, left=5)
    reply = bencode.decode(announce(stub, pid(3), 7003, left=5, compact=0))
    assert sorted(p[b"port"] for p in reply[b"peers"]) == [7001, 7002]
    announce(stub, pid(2), 7002, left=5, event="stopped")
    reply = bencode.decode(announce(stub, pid(3), 7003, left=5, compact=0))
    assert [p[b"port"] for p in reply[b"peers"]] == [7001]
    clock.advance(7)
    reply = bencode.decode(announce(stub, pid(3), 7003, left=5))
    assert reply[b"peers"] == b"" and reply[b"incomplete"] == 1


@pytest.mark.parametrize(
    "query",
    [
        {"peer_id": pid(1), "port": 1},
        {"info_hash": b"short", "peer_id": pid(1), "port": 1},
        {"info_hash": INFO, "peer_id": pid(1), "port": 0},
        {"info_hash": INFO, "peer_id": pid(1), "port": "x"},
        {"info_hash": INFO, "peer_id": pid(1), "port": 1, "left": -1},
    ],
)
def test_tracker_bad_announce_gets_failure_reason(query: dict[str, Any]) -> None:
    """A malformed announce is answered with a bencoded failure reason and registers nothing."""
    resource = TrackerResource(Clock())
    stub = StubTreq(resource)
    out: list[Any] = []
    stub.get("http://tracker.test/announce?" + urllib.parse.urlencode(query)).addCallback(stub.content).addBoth(out.append)
    stub.flush()
    reply = bencode.decode(out[0])
    assert reply[b"failure reason"].startswith(b"bad announce")
    assert resource.announces == 0


# -- torrent writer ----------------------------------------------------------------------


def test_piece_hashes_are_sha1_of_each_piece(tmp_path: Any) -> None:
    """Pieces are SHA-1 of consecutive piece_length slices; the last is short."""
    data = bytes(range(256)) * 300  # 76 800 bytes: 4 pieces of 16 KiB and a short one
    path = tmp_path / "f"
    path.write_bytes(data)
    want = b"".join(hashlib.sha1(data[i : i + 16384]).digest() for i in range(0, len(data), 16384))
    assert torrent.piece_hashes(str(path), 16384) == want
    assert len(want) == 5 * 20


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed (Debian aria2)")
def test_torrent_info_hash_matches_aria2c(tmp_path: Any) -> None:
    """aria2c reads our .torrent and computes the same info-hash, length and piece count."""
    path = tmp_path / "data.bin"
    with open("/bin/ls" if os.path.exists("/bin/ls") else __file__, "rb") as f:
        path.write_bytes(f.read() * 3)
    size = path.stat().st_size
    out = tmp_path / "data.torrent"
    digest = torrent.write_torrent(str(path), str(out), "http://127.0.0.1:1/announce", 32768)
    shown = subprocess.run(["aria2c", "-S", str(out)], capture_output=True, text=True, timeout=30).stdout
    assert re.search(r"Info Hash: ([0-9a-f]{40})", shown).group(1) == digest.hex()  # type: ignore[union-attr]
    assert f"({size:,})" in shown
    assert re.search(r"The Number of Pieces: (\d+)", shown).group(1) == str(-(-size // 32768))  # type: ignore[union-attr]


# -- T* and summaries ---------------------------------------------------------------------


def test_t_star_formula() -> None:
    """T* is the largest of origin, download and aggregate-upload bounds."""
    mib = 1 << 20
    assert t_star(64 * mib, 4 * mib, 4 * mib, 32) == 16.0  # equal caps: S/B
    assert t_star(100, 10, 20, 1) == 10.0  # origin-bound
    assert t_star(100, 50, 10, 1) == 10.0  # download-bound
    assert t_star(120, 40, 40, 2) == 3.0
    # With one cap for a peer's upload and download, the aggregate-upload term
    # N*S/(Bo + N*Bp) is below S/Bp, so it never decides.
    for size, bo, bp, n in [(100, 30, 20, 10), (100, 1, 10, 2), (7, 3, 5, 1000)]:
        assert n * size / (bo + n * bp) < t_star(size, bo, bp, n) == max(size / bo, size / bp)
    with pytest.raises(ValueError):
        t_star(1, 0, 1, 1)


def test_summarize_marks_unfinished_as_lower_bounds() -> None:
    """Unfinished clients count as ≥ the deadline; a computed bound raises the last figure."""
    last, p50, p99 = summarize([1.0, 2.0, 3.0, 4.0], 10.0)
    assert (last, p50, p99) == (Figure(4.0), Figure(2.0), Figure(4.0))
    last, p50, _ = summarize([1.0, None, None, None], 10.0, last_bound=25.0)
    assert last == Figure(25.0, True) and p50 == Figure(10.0, True)
    assert percentile([5.0, 1.0, 3.0], 0.5) == 3.0


# -- rendering ------------------------------------------------------------------------------


def test_text_and_markdown_tables() -> None:
    """Columns are padded to the widest cell; Markdown escapes pipes."""
    rows = [["4", "1.07", "ok"], ["32", "≥2.50", "a|b"]]
    assert benchreport.text_table(["N", "ratio", "note"], rows) == (
        "N   ratio  note\n"
        "--  -----  ----\n"
        "4    1.07  ok\n"
        "32  ≥2.50  a|b"
    )
    assert benchreport.markdown_table(["N", "note"], [["4", "a|b"]]) == "| N | note |\n|---|---|\n| 4 | a\\|b |"
    assert benchreport.fmt_ratio(2.345, True) == "≥2.35" and benchreport.fmt_ratio(None) == "-"


def run(system: str, n: int, last: float, p50: float, origin: float, lower: bool = False) -> dict[str, Any]:
    size = 1000
    return {
        "system": system, "n": n, "t_star": 10.0, "size": size, "deadline": 40.0,
        "last": {"value": last, "lower_bound": lower}, "p50": {"value": p50, "lower_bound": lower},
        "p99": {"value": last, "lower_bound": lower}, "origin_bytes": int(origin * size), "cdn_bytes": 0,
        "peer_bytes": n * size, "verified": True, "note": "", "extra": {"served_bytes": 50, "dfget_seconds": [9.0] * n},
    }


def test_targets_pass_and_miss() -> None:
    """Targets compare dfly with T*, S and the other systems, and say pass or miss for each."""
    results = {
        "config": {"size": 1000, "rate": 1, "origin_rate": 1, "sim_size": 1},
        "swarm": [run("dfly", 8, 11.0, 10.6, 1.0), run("http", 8, 80.0, 40.0, 2.0, lower=True), run("bt", 8, 10.5, 10.2, 1.5)],
        "single": {"size": 1 << 30, "cold_vs_curl": 0.5, "warm_vs_curl": 0.5, "peer_vmhwm_max_kib": 50 * 1024},
        "sim": [{"peers": 10000, "makespan_over_t_star": 1.1, "origin_egress_over_size": 1.0}],
    }
    got = {row[0]: (row[1], row[2]) for row in benchreport.targets(results)}
    assert got["swarm N=8: last dfly peer ≤ 1.15·T*"] == ("1.10", "pass")
    assert got["swarm N=8: p50 ≤ 1.05·T*"] == ("1.06", "miss")
    assert got["swarm N=8: origin egress ≤ 1.01·S"] == ("1.000", "pass")
    assert got["swarm N=8: faster than plain HTTP (curl)"] == ("1.10 vs ≥8.00", "pass")
    assert got["swarm N=8: faster than BitTorrent (aria2c)"] == ("1.10 vs 1.05", "miss")
    assert got["single: cold dfget ≥ 0.4× curl"] == ("0.50", "pass")
    assert got["single: warm dfget ≥ 0.6× curl"] == ("0.50", "miss")
    assert got["simulator: makespan ≤ 1.2·T* at 10 000 peers"] == ("1.100", "pass")
    rows = benchreport.swarm_rows(results["swarm"])
    assert rows[0][:10] == ["8", "dfly", "10.0", "1.10", "1.06", "1.10", "0.90", "1.00", "0.01", "1.00"]
    assert rows[1][3] == "≥8.00"


def test_quick_run_writes_beside_its_work_not_over_the_full_figures(tmp_path: Any, monkeypatch: Any) -> None:
    """A full run writes docs/BENCHMARKS.md; --quick writes into its work directory unless
    --out says otherwise, so a quick look never replaces the committed figures."""
    from dfly.devtools import bench

    monkeypatch.chdir(tmp_path)
    assert bench.parse_args([]).out == str(tmp_path / "docs")
    assert bench.parse_args(["--quick"]).out == str(tmp_path / "bench-run")
    assert bench.parse_args(["--quick", "--workdir", "w"]).out == str(tmp_path / "w")
    assert bench.parse_args(["--quick", "--out", "o"]).out == str(tmp_path / "o")
