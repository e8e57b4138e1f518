"""The benchmark: dfly against plain HTTP and BitTorrent (aria2c), one bounded command.

    scripts/bench [--quick] [--peers 4,8,16,32] [--size 64M] [--rate 4M] [--rounds 1] ...

Three parts, each with real processes on loopback:

1. Swarm.  N hosts each capped at B up and down and an origin capped at B
   serve one file of S bytes of real data.  The lower bound is
   T* = max(S/B_origin, S/B_peer, N*S/(B_origin + N*B_peer)).  dfly (N peer
   daemons, N dfget started at once), plain HTTP (N curl at once from the
   same capped origin) and BitTorrent (N aria2c leechers, one aria2c seeder
   capped at B_origin, our tracker) are timed from the common start to each
   client's completion.  Leechers and daemons keep serving until the round
   ends, as a host's daemon would.  Every run has a deadline; what is not
   finished then is reported as a lower bound ("≥").  For plain HTTP the
   lower bound of the last client is D + R/B_origin, R being the bytes the
   origin still had to send at the deadline D.
2. Single client, no caps: curl, a cold dfget (the supernode fetches from the
   origin while serving) and a warm one (another peer holds the file), with
   throughput and peak RSS (VmHWM) of peer daemons and supernode.
3. Simulator (C{dfly.devtools.sim}) at 1 000 and 10 000 peers, when present.

Results go to a table on stdout, C{docs/BENCHMARKS.md}, plots under
C{docs/bench/} and the raw C{docs/bench/results.json}.  Every process started
is stopped at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from dfly.devtools import bencode, torrent
from dfly.devtools.origin import parse_rate
from dfly.devtools.swarm import Proc, Swarm, proc_cpu_seconds, proc_kib
from dfly.errors import BenchError

MiB = 1 << 20
GiB = 1 << 30
SOURCE_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1",
    "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1",
]
POLL = 0.02


def t_star(size: float, origin_rate: float, peer_rate: float, n: int) -> float:
    """Lower bound on the time for N capped peers to get a file from a capped origin."""
    if size < 0 or origin_rate <= 0 or peer_rate <= 0 or n < 1:
        raise ValueError("size >= 0, positive rates and n >= 1 required")
    return max(size / origin_rate, size / peer_rate, n * size / (origin_rate + n * peer_rate))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def parse_size(text: str) -> int:
    return int(parse_rate(text))


# -- configuration and results ------------------------------------------------


@dataclass
class Config:
    peers: list[int]
    size: int
    rate: float
    origin_rate: float
    rounds: int
    systems: list[str]
    single_size: int
    sim_peers: list[int]
    sim_size: int
    sim_timeout: float
    workdir: str
    out: str
    deadline_factor: float
    http_deadline_factor: float
    piece_size: int
    parts: list[str]
    quick: bool
    keep: bool
    command: str


@dataclass
class Figure:
    """One time: a measured value, or a lower bound when the client was not done."""

    value: float
    lower_bound: bool = False


@dataclass
class SwarmRun:
    system: str
    n: int
    t_star: float
    deadline: float
    times: list[float | None]
    last: Figure
    p50: Figure
    p99: Figure
    origin_bytes: int
    cdn_bytes: int
    peer_bytes: int
    size: int
    verified: bool
    note: str = ""
    cpu_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(times: list[float | None], deadline: float, last_bound: float | None = None) -> tuple[Figure, Figure, Figure]:
    """last, p50 and p99 of per-client times; unfinished clients count as ≥ the deadline."""
    marked = [(t, False) if t is not None else (deadline, True) for t in times]
    marked.sort(key=lambda x: (x[0], x[1]))

    def at(q: float) -> Figure:
        value, bound = marked[max(1, math.ceil(q * len(marked))) - 1]
        return Figure(value, bound)

    last = at(1.0)
    if last.lower_bound and last_bound is not None:
        last = Figure(max(last.value, last_bound), True)
    return last, at(0.5), at(0.99)


# -- process bookkeeping ------------------------------------------------------


class Stop(Exception):
    """SIGTERM or SIGHUP arrived: stop measuring and clean up."""


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def swarm_at(root: str) -> Iterator[Swarm]:
    shutil.rmtree(root, ignore_errors=True)
    swarm = Swarm(root)
    try:
        yield swarm
    finally:
        swarm.close()


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held until all are chosen, so distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.05)


def wait_exits(procs: list[Proc], t0: float, deadline: float) -> list[float | None]:
    """Seconds from C{t0} (time.time) to each process's exit; None if still running at the deadline."""
    times: list[float | None] = [None] * len(procs)
    left = set(range(len(procs)))
    while left and time.time() - t0 < deadline:
        for i in list(left):
            if procs[i].popen.poll() is not None:
                times[i] = time.time() - t0
                left.discard(i)
        time.sleep(POLL)
    return times


def json_line(log: str) -> dict[str, Any] | None:
    try:
        with open(log, errors="replace") as f:
            lines = [line for line in f if line.startswith("{")]
    except OSError:
        return None
    try:
        return dict(json.loads(lines[-1])) if lines else None
    except ValueError:
        return None


def file_digest(path: str, algorithm: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def cpu_of(procs: list[Proc]) -> float:
    total = 0.0
    for p in procs:
        try:
            total += proc_cpu_seconds(p.popen.pid)
        except (OSError, ValueError, IndexError):
            pass
    return total


# -- the file -----------------------------------------------------------------


@functools.cache
def system_files(min_size: int = 8 * MiB) -> list[str]:
    """Large regular files under /usr/lib, the known big ones first, then by size."""
    found: dict[str, int] = {}
    for top, _dirs, names in os.walk("/usr/lib"):
        for name in names:
            path = os.path.join(top, name)
            try:
                if not os.path.islink(path) and os.path.isfile(path) and os.path.getsize(path) >= min_size:
                    found[path] = os.path.getsize(path)
            except OSError:
                continue
    first = [p for p in SOURCE_CANDIDATES if p in found]
    rest = sorted((p for p in found if p not in first), key=lambda p: (-found[p], p))
    return first + rest


def real_data_file(directory: str, size: int) -> str:
    """A file of C{size} bytes made of real system files (not zeros, not random), cached."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"real-{size}.bin")
    if os.path.isfile(path) and os.path.getsize(path) == size:
        return path
    sources = system_files()
    if not sources:
        raise BenchError("no large files under /usr/lib to build real test data from")
    tmp = path + ".tmp"
    left = size
    with open(tmp, "wb") as out:
        while left:
            for src in sources:
                with open(src, "rb") as f:
                    while left:
                        chunk = f.read(min(left, 4 * MiB))
                        if not chunk:
                            break
                        out.write(chunk)
                        left -= len(chunk)
                if not left:
                    break
    os.replace(tmp, path)
    return path


# -- swarm: dfly ----------------------------------------------------------------

def peer_caps_available() -> bool:
    """Whether C{twistd dfly-peer} has C{--upload-rate} and C{--download-rate}."""
    from dfly.peer.tap import Options

    names = {str(p[0]) for p in getattr(Options, "optParameters", [])}
    return {"upload-rate", "download-rate"} <= names


def supernode_caps_available() -> bool:
    """Whether C{twistd dfly-supernode} has C{--upload-rate}."""
    from dfly.supernode.tap import Options

    return "upload-rate" in {str(p[0]) for p in getattr(Options, "optParameters", [])}


def run_dfly(cfg: Config, n: int, data: str, root: str, tstar: float, relay: bool = True) -> SwarmRun:
    size = os.path.getsize(data)
    name = os.path.basename(data)
    deadline = cfg.deadline_factor * tstar + 30
    caps = peer_caps_available()
    extra = ["--upload-rate", str(int(cfg.rate)), "--download-rate", str(int(cfg.rate))] if caps else []
    with swarm_at(root) as swarm:
        swarm.start_origin(os.path.dirname(data), "--total-rate", str(int(cfg.origin_rate)))
        # The supernode stands for the origin's side of the swarm: its uploads get B_origin too,
        # as the BitTorrent seeder's do.
        sn_caps = ["--upload-rate", str(int(cfg.origin_rate))] if supernode_caps_available() else []
        if not relay:
            sn_caps.append("--no-relay")
        swarm.start_supernode("--piece-size", str(cfg.piece_size // MiB), *sn_caps)
        names = [f"peer{i + 1}" for i in range(n)]
        daemons = swarm.start_peers(names, *extra)
        cpu0 = cpu_of(daemons + [p for p in swarm.procs if p.name == "supernode"])
        url = swarm.origin_url(name)
        outs = [os.path.join(root, f"{p}.out") for p in names]
        t0 = time.time()
        clients = [swarm.spawn(f"dfget-{p}", swarm.dfget_argv(url, o, peer=p), None) for p, o in zip(names, outs, strict=True)]
        times = wait_exits(clients, t0, deadline)
        cpu = cpu_of(daemons + [p for p in swarm.procs if p.name == "supernode"]) - cpu0
        origin_bytes = int(swarm.origin_stats().get("total_bytes", 0))
        task = swarm.task("/" + name)
        summaries = [json_line(c.log) for c in clients]
        verified = True
        for t, c, s in zip(times, clients, summaries, strict=True):
            if t is not None and (c.popen.returncode != 0 or s is None):
                verified = False
        want = file_digest(data, "md5")
        for t, s in zip(times, summaries, strict=True):
            if t is not None and s is not None and s.get("md5") != want:
                verified = False
        cdn = sum(int(s.get("from_supernode", 0)) for s in summaries if s)
        from_peers = sum(int(s.get("from_peers", 0)) for s in summaries if s)
        # Clients that failed get no time: they did not finish.
        times = [t if t is not None and c.popen.returncode == 0 else None for t, c in zip(times, clients, strict=True)]
        last, p50, p99 = summarize(times, deadline)
        note = "" if caps else "peers uncapped (this dfly-peer has no --upload-rate/--download-rate)"
        if not sn_caps:
            note = (note + "; " if note else "") + "supernode uploads uncapped"
        rss = max((proc_kib(d.popen.pid, "VmHWM") for d in daemons if d.alive()), default=0)
        return SwarmRun(
            "dfly" if relay else "dfly-saf", n, tstar, deadline, times, last, p50, p99, origin_bytes, cdn, from_peers, size,
            verified, note, cpu,
            {"served_bytes": task.get("served_bytes"), "piece_count": task.get("piece_count"),
             "dfget_seconds": [s.get("seconds") if s else None for s in summaries], "peer_vmhwm_kib": rss,
             "peer_caps": caps, "supernode_caps": bool(sn_caps)},
        )


# -- swarm: plain HTTP ------------------------------------------------------------


def run_http(cfg: Config, n: int, data: str, root: str, tstar: float) -> SwarmRun:
    size = os.path.getsize(data)
    name = os.path.basename(data)
    deadline = cfg.http_deadline_factor * tstar
    with swarm_at(root) as swarm:
        swarm.start_origin(os.path.dirname(data), "--total-rate", str(int(cfg.origin_rate)))
        url = swarm.origin_url(name)
        outs = [os.path.join(root, f"curl{i + 1}.out") for i in range(n)]
        t0 = time.time()
        clients = [
            swarm.spawn(f"curl{i + 1}", ["curl", "-sS", "--fail", "--limit-rate", str(int(cfg.rate)), "-o", o, url], None)
            for i, o in enumerate(outs)
        ]
        times = wait_exits(clients, t0, deadline)
        sent = int(swarm.origin_stats().get("total_bytes", 0))
        elapsed = time.time() - t0
        times = [t if t is not None and c.popen.returncode == 0 else None for t, c in zip(times, clients, strict=True)]
        verified = all(os.path.getsize(o) == size for t, o in zip(times, outs, strict=True) if t is not None)
        remaining = max(0, n * size - sent)
        bound = elapsed + remaining / cfg.origin_rate
        last, p50, p99 = summarize(times, elapsed, bound)
        done = sum(1 for t in times if t is not None)
        note = "" if done == n else f"stopped at the deadline ({elapsed:.0f} s) with {done}/{n} done; last ≥ deadline + remaining bytes / B_origin"
        return SwarmRun("http", n, tstar, deadline, times, last, p50, p99, sent, 0, 0, size, verified, note,
                        None, {"bytes_at_deadline": sent, "bound_last": bound})


# -- swarm: BitTorrent (aria2c) -------------------------------------------------------

HOOK = """#!/bin/sh
# aria2c --on-bt-download-complete: called with GID, file count, path once the download is complete.
date +%s.%N > "$3.done.tmp" && mv "$3.done.tmp" "$3.done"
"""

_INFO_CACHE: dict[tuple[str, int, int, float], dict[str, Any]] = {}


def torrent_info(data: str, piece_size: int) -> dict[str, Any]:
    st = os.stat(data)
    key = (data, piece_size, st.st_size, st.st_mtime)
    if key not in _INFO_CACHE:
        _INFO_CACHE[key] = torrent.info_dict(data, piece_size)
    return _INFO_CACHE[key]


def aria2_rpc(port: int, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": "bench", "method": method, "params": params}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/jsonrpc", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)["result"]


def aria2_totals(port: int) -> tuple[int, int]:
    """(completed, uploaded) bytes of the one torrent an aria2c holds."""
    keys = ["completedLength", "uploadLength"]
    items = aria2_rpc(port, "aria2.tellActive", [keys]) + aria2_rpc(port, "aria2.tellStopped", [0, 10, keys])
    return (sum(int(i["completedLength"]) for i in items), sum(int(i["uploadLength"]) for i in items))


ARIA2_COMMON = [
    "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false", "--enable-peer-exchange=false",
    "--follow-torrent=mem", "--file-allocation=none", "--summary-interval=0", "--console-log-level=warn",
    "--bt-tracker-interval=2", "--seed-ratio=0.0", "--disable-ipv6=true", "--enable-rpc=true",
    "--rpc-listen-all=false", "--auto-save-interval=0", "--bt-max-peers=0",
]


def run_bt(cfg: Config, n: int, data: str, root: str, tstar: float) -> SwarmRun:
    size = os.path.getsize(data)
    name = os.path.basename(data)
    deadline = cfg.deadline_factor * tstar + 30
    if not shutil.which("aria2c"):
        raise BenchError("aria2c is not installed (Debian package aria2)")
    with swarm_at(root) as swarm:
        port_file = os.path.join(root, "tracker.port")
        swarm.spawn("tracker", [sys.executable, "-m", "dfly.devtools.tracker", "--port-file", port_file, "--interval", "2"], None)
        wait_for(lambda: os.path.exists(port_file), 30, "tracker start")
        with open(port_file) as pf:
            tracker_port = int(pf.read())
        announce = f"http://127.0.0.1:{tracker_port}/announce"
        meta = os.path.join(root, f"{name}.torrent")
        with open(meta, "wb") as mf:
            mf.write(bencode.encode({"announce": announce, "info": torrent_info(data, cfg.piece_size)}))
        hook = os.path.join(root, "done-hook.sh")
        with open(hook, "w") as hf:
            hf.write(HOOK)
        os.chmod(hook, 0o755)
        ports = free_ports(2 * (n + 1))
        seed_dir = os.path.join(root, "seed")
        os.makedirs(seed_dir)
        os.symlink(data, os.path.join(seed_dir, name))
        seeder_rpc = ports[1]
        swarm.spawn("seeder", [
            "aria2c", *ARIA2_COMMON, f"--dir={seed_dir}", f"--listen-port={ports[0]}", f"--rpc-listen-port={seeder_rpc}",
            "--bt-seed-unverified=true", f"--max-overall-upload-limit={int(cfg.origin_rate)}", meta,
        ], None)

        def seeder_announced() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{tracker_port}/_stats", timeout=5) as r:
                return any(t["seeders"] >= 1 for t in json.load(r)["torrents"].values())

        wait_for(seeder_announced, 30, "seeder announce")
        leechers = []
        dirs = []
        t0 = time.time()
        for i in range(n):
            d = os.path.join(root, f"leecher{i + 1}")
            os.makedirs(d)
            dirs.append(d)
            leechers.append(swarm.spawn(f"leecher{i + 1}", [
                "aria2c", *ARIA2_COMMON, f"--dir={d}", f"--listen-port={ports[2 + 2 * i]}",
                f"--rpc-listen-port={ports[3 + 2 * i]}", f"--on-bt-download-complete={hook}",
                f"--max-overall-upload-limit={int(cfg.rate)}", f"--max-overall-download-limit={int(cfg.rate)}", meta,
            ], None))
        done_files = [os.path.join(d, name + ".done") for d in dirs]
        times: list[float | None] = [None] * n
        while time.time() - t0 < deadline and any(t is None for t in times):
            for i, path in enumerate(done_files):
                if times[i] is None and os.path.exists(path):
                    with open(path) as df:
                        times[i] = float(df.read()) - t0
            time.sleep(POLL)
        origin_bytes = aria2_totals(seeder_rpc)[1]
        uploads = 0
        for i in range(n):
            try:
                uploads += aria2_totals(ports[3 + 2 * i])[1]
            except OSError:
                pass
        want = file_digest(data)
        verified = all(file_digest(os.path.join(d, name)) == want for t, d in zip(times, dirs, strict=True) if t is not None)
        last, p50, p99 = summarize(times, deadline)
        return SwarmRun("bt", n, tstar, deadline, times, last, p50, p99, origin_bytes, 0, uploads, size, verified,
                        "", None, {"tracker_port": tracker_port})


SYSTEMS: dict[str, Callable[[Config, int, str, str, float], SwarmRun]] = {
    "dfly": run_dfly, "dfly-saf": functools.partial(run_dfly, relay=False), "http": run_http, "bt": run_bt,
}


def median_run(runs: list[SwarmRun]) -> SwarmRun:
    """The round whose last completion is the median one (all of it, so figures stay consistent)."""
    ordered = sorted(runs, key=lambda r: r.last.value)
    chosen = ordered[(len(ordered) - 1) // 2]
    if len(runs) > 1:
        chosen.extra["rounds_last"] = [r.last.value for r in runs]
    return chosen


def run_swarms(cfg: Config, log: Callable[[str], None]) -> list[dict[str, Any]]:
    data = real_data_file(os.path.join(cfg.workdir, "files"), cfg.size)
    results = []
    for n in cfg.peers:
        tstar = t_star(cfg.size, cfg.origin_rate, cfg.rate, n)
        for system in cfg.systems:
            runs = []
            for r in range(cfg.rounds):
                root = os.path.join(cfg.workdir, "swarm", f"{system}-{n}-{r + 1}")
                log(f"swarm: {system} N={n} round {r + 1}/{cfg.rounds} (T* = {tstar:.1f} s) ...")
                started = time.monotonic()
                try:
                    run = SYSTEMS[system](cfg, n, data, root, tstar)
                except (BenchError, OSError, subprocess.SubprocessError, ValueError) as e:
                    log(f"  failed: {e}")
                    results.append({"system": system, "n": n, "t_star": tstar, "error": str(e)})
                    break
                finally:
                    if not cfg.keep:
                        shutil.rmtree(root, ignore_errors=True)
                log(f"  last {run.last.value:.1f} s{' (bound)' if run.last.lower_bound else ''}, "
                    f"p50 {run.p50.value:.1f} s, origin {run.origin_bytes / cfg.size:.2f} x S, "
                    f"{time.monotonic() - started:.0f} s wall")
                runs.append(run)
            if runs:
                results.append(asdict(median_run(runs)))
    return results


# -- single client --------------------------------------------------------------------------


def run_single_builtin(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """curl, cold dfget and warm dfget of one uncapped file through one origin, in one run."""
    data = real_data_file(os.path.join(cfg.workdir, "files"), cfg.single_size)
    size = os.path.getsize(data)
    name = os.path.basename(data)
    root = os.path.join(cfg.workdir, "single")
    want = file_digest(data, "md5")
    result: dict[str, Any] = {"size": size, "source": "dfly.devtools.bench"}
    try:
        with swarm_at(root) as swarm:
            swarm.start_origin(os.path.dirname(data))
            sn = swarm.start_supernode()
            peers = swarm.start_peers(["peer1", "peer2"])
            supernode = next(p for p in swarm.procs if p.name == "supernode")
            url = swarm.origin_url(name)
            out = os.path.join(root, "curl.out")
            t = time.monotonic()
            subprocess.run(["curl", "-sS", "--fail", "-o", out, url], check=True, timeout=600)
            result["curl_seconds"] = time.monotonic() - t
            os.unlink(out)
            for label, peer in (("cold", "peer1"), ("warm", "peer2")):
                out = os.path.join(root, f"{label}.out")
                t = time.monotonic()
                r = swarm.dfget(url, out, peer=peer, timeout=600)
                seconds = time.monotonic() - t
                if r.returncode != 0:
                    raise BenchError(f"{label} dfget failed ({r.returncode}): {r.stderr.strip()}")
                s = json.loads(r.stdout.strip().splitlines()[-1])
                if s.get("md5") != want:
                    raise BenchError(f"{label} dfget md5 {s.get('md5')} != {want}")
                result[f"{label}_seconds"] = seconds
                result[f"{label}_from_supernode"] = s.get("from_supernode")
                result[f"{label}_from_peers"] = s.get("from_peers")
                os.unlink(out)
            result["peer_vmhwm_kib"] = {p.name: proc_kib(p.popen.pid, "VmHWM") for p in peers}
            result["supernode_vmhwm_kib"] = proc_kib(supernode.popen.pid, "VmHWM")
            result["supernode_port"] = sn.get("port")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for label in ("curl", "cold", "warm"):
        result[f"{label}_mib_s"] = size / MiB / result[f"{label}_seconds"]
    result["cold_vs_curl"] = result["cold_mib_s"] / result["curl_mib_s"]
    result["warm_vs_curl"] = result["warm_mib_s"] / result["curl_mib_s"]
    result["peer_vmhwm_max_kib"] = max(result["peer_vmhwm_kib"].values())
    return result


def single_module_available() -> bool:
    return importlib.util.find_spec("dfly.devtools.single") is not None


def run_single_module(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """The same measurement through C{python -m dfly.devtools.single --json}, in our result's shape."""
    workdir = os.path.join(cfg.workdir, "single")
    argv = [sys.executable, "-m", "dfly.devtools.single", "--size", str(cfg.single_size), "--rounds",
            str(cfg.rounds), "--workdir", workdir, "--json"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    finally:
        # Its data file under files/ is kept for the next run, like ours.
        shutil.rmtree(os.path.join(workdir, "swarm"), ignore_errors=True)
    if r.returncode != 0:
        raise BenchError(f"dfly.devtools.single exited {r.returncode}: {r.stderr.strip()[-500:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    med = out["median"]
    size = int(out["size"])
    result: dict[str, Any] = {"size": size, "source": "dfly.devtools.single", "rounds": out.get("rounds")}
    for label in ("curl", "cold", "warm"):
        result[f"{label}_seconds"] = float(med[f"{label}_s"])
        result[f"{label}_mib_s"] = size / MiB / result[f"{label}_seconds"]
    for label in ("cold", "warm"):
        result[f"{label}_vs_curl"] = float(med[f"{label}_vs_curl"])
        last_round = (out.get("rounds") or [{}])[-1]
        result[f"{label}_from_peers"] = last_round.get(f"{label}_from_peers")
        result[f"{label}_from_supernode"] = last_round.get(f"{label}_from_supernode")
    result["peer_vmhwm_kib"] = {"peers (max)": int(out["peer_vmhwm_kib_max"])}
    result["peer_vmhwm_max_kib"] = int(out["peer_vmhwm_kib_max"])
    result["supernode_vmhwm_kib"] = int(out["supernode_vmhwm_kib_max"])
    result["cpu_seconds"] = {k: v for k, v in med.items() if "_cpu_" in k}
    return result


def run_single(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    log(f"single client: {cfg.single_size / MiB:.0f} MiB, curl vs cold and warm dfget ...")
    if single_module_available():
        try:
            return run_single_module(cfg, log)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            log(f"  dfly.devtools.single gave no usable result ({e!r}); measuring here instead")
    return run_single_builtin(cfg, log)


# -- simulator --------------------------------------------------------------------------------


def sim_available() -> bool:
    return importlib.util.find_spec("dfly.devtools.sim") is not None


def run_sim(cfg: Config, peers: int, log: Callable[[str], None]) -> dict[str, Any]:
    log(f"simulator: {peers} peers, {cfg.sim_size / GiB:.2f} GiB ...")
    argv = [sys.executable, "-m", "dfly.devtools.sim", "--peers", str(peers), "--size", str(cfg.sim_size), "--json"]
    t = time.monotonic()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=cfg.sim_timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"simulator did not finish within {cfg.sim_timeout:g} s (--sim-timeout)") from None
    if r.returncode != 0:
        raise BenchError(f"simulator exited {r.returncode}: {r.stderr.strip()[-500:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.monotonic() - t
    out["peers"] = peers
    return dict(out)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 4, 8; S = 24M; single 256M; simulator 1000 peers only")
    p.add_argument("--peers", help="swarm sizes, comma-separated (default 4,8,16,32)")
    p.add_argument("--size", help="swarm file size (default 64M)")
    p.add_argument("--rate", default="4M", help="B: cap per peer, up and down, bytes/s (default 4M)")
    p.add_argument("--origin-rate", help="cap of the origin (default: --rate)")
    p.add_argument("--rounds", type=int, default=1, help="rounds per N and system; the median is reported")
    p.add_argument("--systems", default="dfly,dfly-saf,http,bt",
                   help="swarm systems to run (dfly, dfly-saf: dfly with --no-relay, http, bt)")
    p.add_argument("--parts", default="swarm,single,sim", help="parts to run (swarm,single,sim)")
    p.add_argument("--single-size", help="single-client file size (default 1G)")
    p.add_argument("--sim-peers", help="simulated swarm sizes (default 1000,10000)")
    p.add_argument("--sim-size", default="1G", help="simulated file size (default 1G)")
    p.add_argument("--sim-timeout", type=float, default=240.0, help="seconds one simulation may take (default 240)")
    p.add_argument("--piece-size", default="4M", help="piece size for dfly and the .torrent (default 4M)")
    p.add_argument("--deadline-factor", type=float, default=4.0, help="dfly and aria2c stop at this x T* + 30 s")
    p.add_argument("--http-deadline-factor", type=float, default=1.5, help="plain HTTP stops at this x T* (default 1.5)")
    p.add_argument("--workdir", default="bench-run", help="working directory (default ./bench-run)")
    p.add_argument("--keep", action="store_true", help="keep each swarm round's logs and outputs under --workdir")
    p.add_argument("--out", default=None,
                   help="where BENCHMARKS.md and bench/ go (default ./docs; with --quick, the work directory)")
    a = p.parse_args(argv)
    peers = a.peers or ("4,8" if a.quick else "4,8,16,32")
    try:
        cfg = Config(
            peers=[int(x) for x in peers.split(",") if x.strip()],
            size=parse_size(a.size or ("24M" if a.quick else "64M")),
            rate=parse_rate(a.rate),
            origin_rate=parse_rate(a.origin_rate or a.rate),
            rounds=a.rounds,
            systems=[s.strip() for s in a.systems.split(",") if s.strip()],
            single_size=parse_size(a.single_size or ("256M" if a.quick else "1G")),
            sim_peers=[int(x) for x in (a.sim_peers or ("1000" if a.quick else "1000,10000")).split(",") if x.strip()],
            sim_size=parse_size(a.sim_size),
            sim_timeout=a.sim_timeout,
            workdir=os.path.abspath(a.workdir),
            # A quick run never replaces the figures of a full one.
            out=os.path.abspath(a.out or (a.workdir if a.quick else "docs")),
            deadline_factor=a.deadline_factor,
            http_deadline_factor=a.http_deadline_factor,
            piece_size=parse_size(a.piece_size),
            parts=[s.strip() for s in a.parts.split(",") if s.strip()],
            quick=a.quick,
            keep=a.keep,
            command=" ".join(["scripts/bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        )
    except ValueError as e:
        p.error(str(e))
    if any(n < 1 for n in cfg.peers) or cfg.rounds < 1 or cfg.size < 1 or cfg.single_size < 1:
        p.error("peers, rounds and sizes must be positive")
    if unknown := set(cfg.systems) - set(SYSTEMS):
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if unknown := set(cfg.parts) - {"swarm", "single", "sim"}:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if cfg.piece_size % MiB or not 1 <= cfg.piece_size // MiB <= 15:
        p.error("--piece-size must be whole MiB, 1 to 15")
    return cfg


def main(argv: list[str] | None = None) -> int:
    from dfly.devtools import benchreport

    cfg = parse_args(argv)
    os.makedirs(cfg.workdir, exist_ok=True)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {msg}", flush=True)

    results: dict[str, Any] = {
        # Paths relative to where the bench ran: the results say nothing of the machine's layout.
        "config": {k: os.path.relpath(v) if k in ("out", "workdir") else v for k, v in asdict(cfg).items()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": benchreport.machine_info(),
        "swarm": None, "single": None, "sim": None, "notes": {},
    }
    status = 0
    try:
        with stopping_on_signals():
            if "swarm" in cfg.parts:
                results["swarm"] = run_swarms(cfg, log)
                if not peer_caps_available():
                    results["notes"]["peer_caps"] = "dfly peers ran uncapped: this dfly-peer has no --upload-rate/--download-rate"
            if "single" in cfg.parts:
                try:
                    results["single"] = run_single(cfg, log)
                except (BenchError, OSError, subprocess.SubprocessError, ValueError) as e:
                    log(f"  single client failed: {e}")
                    results["single"] = {"error": str(e)}
            if "sim" in cfg.parts:
                if not sim_available():
                    log("simulator: not available (no dfly.devtools.sim)")
                    results["sim"] = {"error": "not available"}
                else:
                    sims = []
                    for peers in cfg.sim_peers:
                        try:
                            sims.append(run_sim(cfg, peers, log))
                        except (BenchError, OSError, subprocess.SubprocessError, ValueError) as e:
                            log(f"  simulator failed: {e}")
                            sims.append({"peers": peers, "error": str(e)})
                    results["sim"] = sims
    except (KeyboardInterrupt, Stop) as e:
        log(f"interrupted ({e or 'Ctrl-C'}); every process was stopped; partial results follow")
        results["notes"]["interrupted"] = True
        status = 130
    results["wall_seconds"] = time.monotonic() - started
    print()
    print(benchreport.text_report(results))
    paths = benchreport.write_all(results, cfg.out)
    print()
    for path in paths:
        print(f"wrote {os.path.relpath(path)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
