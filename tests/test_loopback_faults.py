"""Faults with real processes: dying peers and supernodes, origin faults, changed content."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from filegen import make_file

from dfly.devtools.swarm import Swarm
from dfly.devtools.swarm import sha256_file as digest
from dfly.pieces import MIB

pytestmark = pytest.mark.loopback




def start_all(swarm: Swarm, jobs: list[tuple[str, str, str | None]]) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(swarm.dfget_argv(u, o, peer=p), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for u, o, p in jobs
    ]


def wait_all(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        out.append((p.returncode, err))
    return out


def test_peers_killed_mid_download(swarm: Swarm, files: str) -> None:
    """Eight peers fetch a file from a slow origin; two are SIGKILLed half way.  The six
    survivors finish with the right bytes well within the bound."""
    src = make_file(files, "f.bin", 16 * MIB)
    swarm.start_origin(files, "--rate", "8M")
    swarm.start_supernode("--piece-size", "1")
    names = [f"p{i}" for i in range(8)]
    for n in names:
        swarm.start_peer(n, "--stall-timeout", "5")
    url = swarm.origin_url("f.bin")
    outs = {n: os.path.join(swarm.root, f"{n}.out") for n in names}
    procs = start_all(swarm, [(url, outs[n], n) for n in names])
    time.sleep(1.0)
    for victim in names[:2]:
        swarm.peers[victim].stop(signal.SIGKILL)
        swarm.peers[victim].name = f"killed-{victim}"
    results = wait_all(procs, 90)
    want = digest(src)
    for n, (code, err) in zip(names, results, strict=True):
        if n in names[:2]:
            assert code != 0 or digest(outs[n]) == want  # a victim's dfget fails, or had finished
            continue
        assert code == 0, (n, err)
        assert digest(outs[n]) == want
    # The supernode read the origin once; only a victim whose daemon died before its dfget
    # reached it may have fallen back to the origin on its own.
    assert swarm.task("/f.bin")["source_bytes"] == 16 * MIB


def test_stopped_peer_is_detected_by_the_stall_timeout(swarm: Swarm, files: str) -> None:
    """A peer frozen with SIGSTOP keeps its sockets open; downloaders give up on it after the
    stall timeout, report it, and still finish correctly."""
    src = make_file(files, "f.bin", 6 * MIB)
    swarm.start_origin(files)
    swarm.start_supernode("--piece-size", "1")
    frozen = swarm.start_peer("frozen")
    r = swarm.dfget(swarm.origin_url("f.bin"), os.path.join(swarm.root, "frozen.out"), peer="frozen")
    assert r.returncode == 0, r.stderr
    swarm.start_peer("other", "--stall-timeout", "2")
    frozen.popen.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        out = os.path.join(swarm.root, "other.out")
        r = swarm.dfget(swarm.origin_url("f.bin"), out, peer="other", timeout=60)
        assert r.returncode == 0, r.stderr
        assert digest(out) == digest(src)
        assert time.monotonic() - t0 < 30
        log = open(swarm.peers["other"].log).read()
        # Whichever fires first: the stall timer, or the piece deadline (same 2 s for a tiny piece).
        assert "sent nothing for 2 s" in log or "too slow" in log
    finally:
        frozen.popen.send_signal(signal.SIGCONT)


def test_supernode_killed_and_restarted_mid_download(swarm: Swarm, files: str) -> None:
    """SIGKILL the supernode while three peers download from a slow origin, start it again
    on the same home and ports: peers reconnect, the supernode resumes the origin fetch with
    a Range request, and every download completes with the right bytes."""
    src = make_file(files, "f.bin", 24 * MIB)
    swarm.start_origin(files, "--rate", "8M")
    info = swarm.start_supernode("--piece-size", "1")
    names = ["a", "b", "c"]
    for n in names:
        swarm.start_peer(n)
    url = swarm.origin_url("f.bin")
    outs = [os.path.join(swarm.root, f"{n}.out") for n in names]
    procs = start_all(swarm, [(url, o, n) for o, n in zip(outs, names, strict=True)])
    # Kill once a few pieces are cached and more are coming (however slowly the clients start).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tasks = swarm.api()["tasks"]
        if tasks and 3 * MIB <= tasks[0]["source_bytes"] < 16 * MIB:
            break
        time.sleep(0.05)
    first = [p for p in swarm.procs if p.name == "supernode"][0]
    first.stop(signal.SIGKILL)
    first.name = "killed-supernode"
    time.sleep(0.5)
    swarm.start_supernode(
        "--piece-size", "1",
        "--port", f"tcp:{info['port']}:interface=127.0.0.1",
        "--api", f"tcp:{info['api']}:interface=127.0.0.1",
        "--home", os.path.join(swarm.root, "supernode"),
        name="supernode2",
    )
    results = wait_all(procs, 120)
    for code, err in results:
        assert code == 0, err
    assert all(digest(o) == digest(src) for o in outs)
    stats = swarm.origin_stats()
    assert stats["statuses"].get("f.bin 206", 0) >= 1, stats
    assert stats["bytes"]["f.bin"] < 2 * 24 * MIB


def test_failover_to_second_supernode(swarm: Swarm, files: str) -> None:
    """With two supernodes given, a peer whose supernode dies fails over to the other and
    the download completes."""
    src = make_file(files, "f.bin", 12 * MIB)
    swarm.start_origin(files, "--rate", "6M")
    a = swarm.start_supernode("--piece-size", "1", name="sn-a")
    b = swarm.start_supernode("--piece-size", "1", name="sn-b")
    swarm.supernode_info = a
    home = os.path.join(swarm.root, "p")
    swarm.start_peer("p", "--supernode", f"127.0.0.1:{a['port']}", "--supernode", f"127.0.0.1:{b['port']}")
    swarm.peers["p"].info["home"] = home
    out = os.path.join(swarm.root, "p.out")
    (proc,) = start_all(swarm, [(swarm.origin_url("f.bin"), out, "p")])
    time.sleep(1.0)
    sn_a = [p for p in swarm.procs if p.name == "sn-a"][0]
    sn_a.stop(signal.SIGKILL)
    sn_a.name = "killed-sn-a"
    ((code, err),) = wait_all([proc], 90)
    assert code == 0, err
    assert digest(out) == digest(src)


@pytest.mark.parametrize(
    ("mode", "words", "code"),
    [("503", "503", 3), ("reset", "mid-body", 3), ("short", "mid-body", 3), ("stall", "nothing for 2 s (the supernode's --origin-timeout)", 5)],
)
def test_origin_faults_give_a_clear_error_in_bounded_time(swarm: Swarm, files: str, mode: str, words: str, code: int) -> None:
    """5xx, a reset or a short body mid-way: dfget exits 3 (origin error); a stall after the
    headers for the supernode's --origin-timeout: exit 5 (timeout), naming the option.  Each
    with the reason within seconds, and every peer waiting on the task is told at once."""
    make_file(files, "f.bin", 4 * MIB)
    swarm.start_origin(files)
    swarm.start_supernode("--origin-timeout", "2")
    swarm.start_peer("a")
    swarm.start_peer("b")
    url = swarm.origin_url(f"fault/{mode}/f.bin")
    t0 = time.monotonic()
    results = swarm.dfget_many(
        [(url, os.path.join(swarm.root, "a.out"), "a"), (url, os.path.join(swarm.root, "b.out"), "b")], timeout=60
    )
    assert time.monotonic() - t0 < 20
    for r in results:
        assert r.returncode == code, r
        assert words in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(swarm.root, "a.out"))


def test_failed_task_does_not_poison_the_next_try(swarm: Swarm, files: str) -> None:
    """A 404 fails the task; once the file exists at the origin the same URL downloads."""
    swarm.start_origin(files)
    swarm.start_supernode()
    out = os.path.join(swarm.root, "late.out")
    r = swarm.dfget(swarm.origin_url("late.bin"), out)
    assert r.returncode == 3 and "404" in r.stderr
    src = make_file(files, "late.bin", 100_000)
    r = swarm.dfget(swarm.origin_url("late.bin"), out)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(src)


def test_changed_content_is_revalidated(swarm: Swarm, files: str) -> None:
    """When the file changes at the origin (new ETag/Last-Modified), the next download gets the
    new bytes, never the cached old ones; an unchanged file is served from the cache (304)."""
    path = make_file(files, "f.bin", 3 * MIB, seed=1)
    swarm.start_origin(files)
    swarm.start_supernode("--revalidate-after", "0")
    swarm.start_peer("seed")
    url = swarm.origin_url("f.bin")
    r = swarm.dfget(url, os.path.join(swarm.root, "v1.out"), peer="seed")
    assert r.returncode == 0, r.stderr
    r = swarm.dfget(url, os.path.join(swarm.root, "v1b.out"))
    assert r.returncode == 0, r.stderr
    assert swarm.origin_stats()["statuses"].get("f.bin 304") == 1
    make_file(files, "f.bin.new", 3 * MIB + 17, seed=2)
    os.replace(os.path.join(files, "f.bin.new"), path)
    out = os.path.join(swarm.root, "v2.out")
    r = swarm.dfget(url, out)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(path)
    out = os.path.join(swarm.root, "v2-seed.out")
    r = swarm.dfget(url, out, peer="seed")
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(path)


def test_unreachable_supernode_is_logged_once_not_per_retry(swarm: Swarm) -> None:
    """A peer whose supernode refuses connections says so in its log at once, and does not
    repeat the same line for every retry of its backoff."""
    swarm.start_supernode()
    sn = next(p for p in swarm.procs if p.name == "supernode")
    sn.stop()
    proc = swarm.start_peer("p")
    log = os.path.join(swarm.root, "p.log")
    address = swarm.supernode_address
    deadline = time.monotonic() + 20
    lines: list[str] = []
    while time.monotonic() < deadline:
        with open(log) as f:
            lines = [line for line in f if f"cannot reach supernode {address}" in line]
        if lines:
            break
        time.sleep(0.1)
    assert lines, "the unreachable supernode was not logged"
    time.sleep(3)  # several retries (backoff from 0.5 s)
    with open(log) as f:
        again = [line for line in f if f"cannot reach supernode {address}" in line]
    assert len(again) == 1, again
    assert proc.alive()
