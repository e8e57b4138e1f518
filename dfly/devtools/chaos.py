"""Chaos runs: real swarms on loopback under faults, and long fuzzing, with a results table.

    scripts/chaos [--rounds N] [--frames N] [--clients N] [--quick]

Each scenario runs real processes (origin, supernode, peer daemons, dfget) and counts,
per scenario: runs, outputs verified byte-exact, corrupt outputs (present but wrong),
daemon crashes (a daemon that exited without being killed on purpose) and unhandled
errors in daemon logs.  Exit status 1 if any corrupt output or crash was seen.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dfly.devtools.swarm import Swarm, SwarmError, proc_cpu_seconds, proc_kib
from dfly.devtools.swarm import sha256_file as sha

MIB = 1 << 20


@dataclass
class Tally:
    runs: int = 0
    verified: int = 0
    corrupt: int = 0
    failed_cleanly: int = 0
    crashes: int = 0
    unhandled: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def make_file(path: str, size: int, seed: int) -> str:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MIB)
            f.write(rnd.randbytes(n))
            left -= n
    return path




def prepare(work: str, size: int, rnd: random.Random) -> tuple[str, str, Swarm]:
    """A directory of origin content with one file f.bin, and a swarm to serve it."""
    files = os.path.join(work, "files")
    os.makedirs(files)
    src = make_file(os.path.join(files, "f.bin"), size, rnd.randrange(1 << 30))
    return files, src, Swarm(os.path.join(work, "swarm"))


def wait_codes(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    """Exit codes of C{procs}, killing any still running after C{timeout} seconds in all."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        codes.append(p.returncode)
    return codes


def judge(t: Tally, outputs: list[tuple[str, int]], want: str, expect_ok: bool = True) -> None:
    """Count each (output path, dfget exit code): verified, corrupt, or a clean failure."""
    for path, code in outputs:
        exists = os.path.exists(path)
        if exists and sha(path) == want and code == 0:
            t.verified += 1
        elif exists:
            t.corrupt += 1
            t.notes.append(f"corrupt or unreported output {path} (exit {code})")
        else:
            t.failed_cleanly += 1
            if expect_ok:
                t.notes.append(f"an expected download failed (exit {code})")


def close(t: Tally, swarm: Swarm) -> None:
    """Stop the swarm; count daemons that had died on their own and tracebacks in logs."""
    for proc in swarm.procs:
        if not proc.name.startswith("killed-") and not proc.alive():
            t.crashes += 1
            t.notes.append(f"{proc.name} exited by itself with {proc.popen.returncode}")
    for proc in swarm.procs:
        try:
            text = open(proc.log, errors="replace").read()
        except OSError:
            continue
        t.unhandled += text.count("Unhandled Error") + text.count("Unhandled error in Deferred")
    swarm.close()


def run_dfgets(swarm: Swarm, jobs: list[tuple[str, str, str | None]], timeout: float) -> list[tuple[str, int]]:
    results = swarm.dfget_many(jobs, timeout=timeout)
    return [(job[1], r.returncode) for job, r in zip(jobs, results, strict=True)]


# -- scenarios ----------------------------------------------------------------------
def peer_deaths(work: str, t: Tally, rnd: random.Random, peers: int = 12) -> None:
    """A quarter of the peers are SIGKILLed at random moments of a swarm download."""
    files, src, swarm = prepare(work, 24 * MIB, rnd)
    try:
        swarm.start_origin(files, "--rate", "12M")
        swarm.start_supernode("--piece-size", "1")
        names = [f"p{i}" for i in range(peers)]
        for n in names:
            swarm.start_peer(n, "--stall-timeout", "5")
        url = swarm.origin_url("f.bin")
        jobs = [(url, os.path.join(swarm.root, f"{n}.out"), n) for n in names]
        procs = [subprocess.Popen(swarm.dfget_argv(u, o, peer=p), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for u, o, p in jobs]
        victims = rnd.sample(names, peers // 4)
        for victim in victims:
            time.sleep(rnd.uniform(0.1, 0.8))
            swarm.peers[victim].stop(signal.SIGKILL)
            swarm.peers[victim].name = f"killed-{victim}"
        outputs = []
        for (_, out, name), code in zip(jobs, wait_codes(procs, 120), strict=True):
            if name in victims:
                if os.path.exists(out) and sha(out) != sha(src):
                    t.corrupt += 1
                continue
            outputs.append((out, code))
        judge(t, outputs, sha(src))
    finally:
        close(t, swarm)


def byzantine(work: str, t: Tally, rnd: random.Random) -> None:
    """A peer that lies about what it holds and serves wrong slices, among honest ones."""
    files, src, swarm = prepare(work, 10 * MIB, rnd)
    liar = None
    try:
        swarm.start_origin(files)
        swarm.start_supernode("--piece-size", "1", "--blacklist-limit", "2")
        url = swarm.origin_url("f.bin")
        mode = rnd.choice(["lie", "garbage", "truncate"])
        liar = subprocess.Popen(
            [sys.executable, "-m", "dfly.devtools.liar", "--supernode", swarm.supernode_address, "--url", url, "--mode", mode, "--seconds", "60"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        names = ["a", "b", "c"]
        for n in names:
            swarm.start_peer(n)
        judge(t, run_dfgets(swarm, [(url, os.path.join(swarm.root, f"{n}.out"), n) for n in names], 120), sha(src))
    finally:
        if liar is not None:
            liar.kill()
            liar.wait()
        close(t, swarm)


def supernode_restart(work: str, t: Tally, rnd: random.Random) -> None:
    """The supernode is SIGKILLed mid-download and started again on the same home."""
    files, src, swarm = prepare(work, 24 * MIB, rnd)
    try:
        swarm.start_origin(files, "--rate", "8M")
        info = swarm.start_supernode("--piece-size", "1")
        names = ["a", "b", "c", "d"]
        for n in names:
            swarm.start_peer(n)
        url = swarm.origin_url("f.bin")
        jobs = [(url, os.path.join(swarm.root, f"{n}.out"), n) for n in names]
        procs = [subprocess.Popen(swarm.dfget_argv(u, o, peer=p), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for u, o, p in jobs]
        time.sleep(rnd.uniform(0.5, 2.0))
        first = [p for p in swarm.procs if p.name == "supernode"][0]
        first.stop(signal.SIGKILL)
        first.name = "killed-supernode"
        time.sleep(rnd.uniform(0.1, 1.0))
        swarm.start_supernode(
            "--piece-size", "1", "--home", os.path.join(swarm.root, "supernode"),
            "--port", f"tcp:{info['port']}:interface=127.0.0.1", "--api", f"tcp:{info['api']}:interface=127.0.0.1",
            name="supernode2",
        )
        codes = wait_codes(procs, 120)
        judge(t, [(out, code) for (_, out, _), code in zip(jobs, codes, strict=True)], sha(src))
    finally:
        close(t, swarm)


def origin_faults(work: str, t: Tally, rnd: random.Random) -> None:
    """An origin that fails (5xx, reset, short body, stall): clean errors, then a good try."""
    files, src, swarm = prepare(work, 4 * MIB, rnd)
    try:
        swarm.start_origin(files)
        swarm.start_supernode("--origin-timeout", "2")
        swarm.start_peer("a")
        swarm.start_peer("b")
        mode = rnd.choice(["500", "503", "reset", "short", "stall"])
        url = swarm.origin_url(f"fault/{mode}/f.bin")
        bad = run_dfgets(swarm, [(url, os.path.join(swarm.root, f"{n}.bad"), n) for n in ("a", "b")], 60)
        judge(t, bad, sha(src), expect_ok=False)
        good = swarm.origin_url("f.bin")
        judge(t, run_dfgets(swarm, [(good, os.path.join(swarm.root, f"{n}.out"), n) for n in ("a", "b")], 60), sha(src))
    finally:
        close(t, swarm)


def run_module(t: Tally, argv: list[str], timeout: float) -> str:
    """Run a devtools module; its exit status 1 means it saw failures."""
    t.runs += 1
    try:
        r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        t.crashes += 1
        t.notes.append(f"{argv[0]} did not finish within {timeout:g} s")
        return ""
    if r.returncode != 0:
        t.crashes += 1
        t.notes.append(f"{argv[0]} exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return r.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="runs of each swarm scenario (default 3)")
    p.add_argument("--frames", type=int, default=1_000_000, help="frames for the fuzzer (default 1,000,000)")
    p.add_argument("--clients", type=int, default=200, help="in-process clients for the load run (default 200)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="1 round, 100,000 frames, 50 clients")
    p.add_argument("--keep", action="store_true", help="keep the working directories")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.frames, args.clients = 1, 100_000, 50
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    print(f"chaos seed {seed}", flush=True)
    root = tempfile.mkdtemp(prefix="dfly-chaos-")
    scenarios: list[tuple[str, Callable[[str, Tally, random.Random], None]]] = [
        ("peer deaths (12 peers, 3 killed)", peer_deaths),
        ("byzantine peer among 3", byzantine),
        ("supernode SIGKILL + restart", supernode_restart),
        ("origin faults, then a good try", origin_faults),
    ]
    table: list[tuple[str, Tally]] = []
    try:
        for name, fn in scenarios:
            t = Tally()
            start = time.monotonic()
            for i in range(args.rounds):
                work = os.path.join(root, f"{fn.__name__}-{i}")
                os.makedirs(work)
                t.runs += 1
                try:
                    fn(work, t, rnd)
                except (SwarmError, OSError, subprocess.SubprocessError) as e:
                    t.crashes += 1
                    t.notes.append(f"scenario error: {e}")
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
            t.seconds = time.monotonic() - start
            table.append((name, t))
            print(f"  {name}: {t.runs} runs, {t.verified} verified, {t.corrupt} corrupt, {t.crashes} crashes", flush=True)
        t = Tally()
        start = time.monotonic()
        out = run_module(t, ["dfly.devtools.fuzz", "--frames", str(args.frames), "--seed", str(seed)], 1200)
        t.seconds = time.monotonic() - start
        t.notes.extend(line for line in out.splitlines()[-3:] if line.strip())
        table.append((f"fuzz: {args.frames:,} frames", t))
        t = Tally()
        start = time.monotonic()
        load_work = os.path.join(root, "load")
        os.makedirs(os.path.join(load_work, "files"))
        src = make_file(os.path.join(load_work, "files", "f.bin"), 4 * MIB, seed)
        swarm = Swarm(os.path.join(load_work, "swarm"))
        try:
            swarm.start_origin(os.path.join(load_work, "files"))
            swarm.start_supernode("--piece-size", "1")
            out = run_module(t, ["dfly.devtools.load", "--supernode", swarm.supernode_address, "--url", swarm.origin_url("f.bin"), "--clients", str(args.clients), "--seconds", "300"], 600)
            sn = [p for p in swarm.procs if p.name == "supernode"][0]
            t.notes.append(proc_usage(sn.popen.pid))
            t.notes.extend(line for line in out.splitlines()[-4:] if line.strip())
        finally:
            close(t, swarm)
        t.seconds = time.monotonic() - start
        t.verified = args.clients if not t.crashes else 0
        del src
        table.append((f"load: {args.clients} clients, one file", t))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"{'scenario':<40} {'runs':>5} {'verified':>9} {'corrupt':>8} {'clean fail':>10} {'crashes':>8} {'unhandled':>9} {'seconds':>8}")
    bad = False
    for name, t in table:
        print(f"{name:<40} {t.runs:>5} {t.verified:>9} {t.corrupt:>8} {t.failed_cleanly:>10} {t.crashes:>8} {t.unhandled:>9} {t.seconds:>8.1f}")
        bad = bad or t.corrupt > 0 or t.crashes > 0
    for name, t in table:
        for note in t.notes[:6]:
            print(f"  [{name}] {note}")
    print(f"\ncorrupt outputs: {sum(t.corrupt for _, t in table)}; daemon crashes: {sum(t.crashes for _, t in table)}")
    return 1 if bad else 0


def proc_usage(pid: int) -> str:
    """Peak RSS and CPU seconds of a live process (Linux /proc)."""
    try:
        return f"supernode peak RSS {proc_kib(pid, 'VmHWM') / 1024:.1f} MiB, CPU {proc_cpu_seconds(pid):.1f} s"
    except (OSError, IndexError, ValueError):
        return "supernode usage unavailable"


if __name__ == "__main__":
    sys.exit(main())


