"""Single-client throughput: curl against a cold and a warm dfget of one file, side by side.

    python -m dfly.devtools.single [--size 1G] [--rounds 3] [--workdir DIR] [--json]

Each round starts a fresh loopback swarm (origin, supernode, two peer daemons;
see L{dfly.devtools.swarm}) and times, one after the other:

* C{curl -o} of the file straight from the origin;
* a I{cold} C{dfget --home peer1}: the supernode fetches from the origin while
  it serves peer1;
* a I{warm} C{dfget --home peer2}: peer1 holds the file and serves it.

Every output is checked against the file's md5 and deleted; the disk is synced
before each client starts, so none pays for the writes of the one before.  The machine may
be shared and noisy, so the figures that matter are the per-round ratios
(curl seconds / dfget seconds, i.e. dfget throughput as a fraction of curl's)
and their medians over the rounds.  Peak RSS (VmHWM) of the peer daemons and
the supernode is reported too.  With C{--json} one JSON object is printed on
stdout (progress goes to stderr).  The file is real-ish data (system files
concatenated, not zeros), cached in the work directory between runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from dfly.config import parse_size
from dfly.devtools.swarm import Swarm, proc_cpu_seconds, proc_kib

MIB = 1 << 20


def real_data(directory: str, size: int) -> str:
    """A file of C{size} bytes made of the machine's own binaries and libraries (cached)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"data-{size}.bin")
    if os.path.isfile(path) and os.path.getsize(path) == size:
        return path
    sources = []
    for root in ("/usr/lib", "/usr/bin", "/usr/share"):
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = os.path.join(dirpath, name)
                try:
                    if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) >= MIB:
                        sources.append(p)
                except OSError:
                    pass
    if not sources:
        raise SystemExit("no files of 1 MiB or more under /usr to build test data from")
    sources.sort()
    tmp = path + ".tmp"
    left = size
    with open(tmp, "wb") as out:
        while left:
            for src in sources:
                try:
                    with open(src, "rb") as f:
                        while left:
                            chunk = f.read(min(left, 4 * MIB))
                            if not chunk:
                                break
                            out.write(chunk)
                            left -= len(chunk)
                except OSError:
                    continue
                if not left:
                    break
    os.replace(tmp, path)
    return path


def md5_file(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def one_round(
    root: str, data: str, want: str, peer_args: list[str], sn_args: list[str], timeout: float
) -> dict[str, Any]:
    """Curl, cold dfget, warm dfget in a fresh swarm under C{root}; seconds and peak RSS."""
    result: dict[str, Any] = {}
    shutil.rmtree(root, ignore_errors=True)
    with Swarm(root) as swarm:
        swarm.start_origin(os.path.dirname(data))
        swarm.start_supernode(*sn_args)
        peers = [swarm.start_peer(name, *peer_args) for name in ("peer1", "peer2")]
        url = swarm.origin_url(os.path.basename(data))
        out = os.path.join(root, "curl.out")
        os.sync()
        t = time.monotonic()
        subprocess.run(["curl", "-sS", "--fail", "-o", out, url], check=True, timeout=timeout)
        result["curl_s"] = time.monotonic() - t
        if md5_file(out) != want:
            raise SystemExit("curl output has the wrong md5")
        os.unlink(out)
        sn = next(p for p in swarm.procs if p.name == "supernode")
        daemons = [sn, *peers]
        for label, peer in (("cold", "peer1"), ("warm", "peer2")):
            out = os.path.join(root, f"{label}.out")
            cpu = [proc_cpu_seconds(p.popen.pid) for p in daemons]
            # Every client starts on a quiet disk: the writes and deletions of the step before
            # (a file system that discards freed blocks is slow to reuse them) are flushed first.
            os.sync()
            children = os.times()
            t = time.monotonic()
            r = swarm.dfget(url, out, peer=peer, timeout=timeout)
            seconds = time.monotonic() - t
            after = os.times()
            # CPU seconds each process spent on this download: less noisy than wall time.
            for p, before in zip(daemons, cpu, strict=True):
                result[f"{label}_cpu_{p.name}"] = proc_cpu_seconds(p.popen.pid) - before
            result[f"{label}_cpu_dfget"] = (
                after.children_user + after.children_system - children.children_user - children.children_system
            )
            if r.returncode != 0:
                raise SystemExit(f"{label} dfget failed ({r.returncode}): {r.stderr.strip()}")
            summary = json.loads(r.stdout.strip().splitlines()[-1])
            if summary.get("md5") != want:
                raise SystemExit(f"{label} dfget md5 {summary.get('md5')} is not {want}")
            os.unlink(out)
            result[f"{label}_s"] = seconds
            result[f"{label}_daemon_s"] = summary.get("swarm_seconds")
            result[f"{label}_from_peers"] = summary.get("from_peers")
            result[f"{label}_from_supernode"] = summary.get("from_supernode")
        result["peer_vmhwm_kib"] = max(proc_kib(p.popen.pid, "VmHWM") for p in peers)
        result["supernode_vmhwm_kib"] = proc_kib(sn.popen.pid, "VmHWM")
    shutil.rmtree(root, ignore_errors=True)
    result["cold_vs_curl"] = result["curl_s"] / result["cold_s"]
    result["warm_vs_curl"] = result["curl_s"] / result["warm_s"]
    return result


def summarize(size: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in rounds[0] if k.endswith(("_s", "_vs_curl")) or "_cpu_" in k]
    med = {k: statistics.median(r[k] for r in rounds) for k in keys}
    return {
        "size": size,
        "rounds": rounds,
        "median": {
            **med,
            "curl_mib_s": size / MIB / med["curl_s"],
            "cold_mib_s": size / MIB / med["cold_s"],
            "warm_mib_s": size / MIB / med["warm_s"],
        },
        "peer_vmhwm_kib_max": max(r["peer_vmhwm_kib"] for r in rounds),
        "supernode_vmhwm_kib_max": max(r["supernode_vmhwm_kib"] for r in rounds),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dfly.devtools.single", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G", help="file size (default 1G)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default 3)")
    p.add_argument("--workdir", default="single-run", help="working directory (default ./single-run)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one transfer may take")
    p.add_argument("--peer-arg", action="append", default=[], help="extra dfly-peer option (repeatable)")
    p.add_argument("--supernode-arg", action="append", default=[], help="extra dfly-supernode option (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    a = p.parse_args(argv)
    size = parse_size(a.size, "size")
    if size <= 0 or a.rounds <= 0:
        p.error("--size and --rounds must be positive")
    workdir = os.path.abspath(a.workdir)
    data = real_data(os.path.join(workdir, "files"), size)
    want = md5_file(data)
    rounds = []
    for n in range(a.rounds):
        r = one_round(os.path.join(workdir, "swarm"), data, want, a.peer_arg, a.supernode_arg, a.timeout)
        log(
            f"round {n + 1}/{a.rounds}: curl {r['curl_s']:.2f} s, cold {r['cold_s']:.2f} s "
            f"({r['cold_vs_curl']:.2f}x), warm {r['warm_s']:.2f} s ({r['warm_vs_curl']:.2f}x), "
            f"peer peak RSS {r['peer_vmhwm_kib'] / 1024:.0f} MiB"
        )
        rounds.append(r)
    out = summarize(size, rounds)
    if a.json:
        print(json.dumps(out))
    else:
        m = out["median"]
        print(f"size {size / MIB:.0f} MiB, {a.rounds} rounds, medians:")
        print(f"  curl  {m['curl_s']:7.2f} s  {m['curl_mib_s']:8.1f} MiB/s")
        print(f"  cold  {m['cold_s']:7.2f} s  {m['cold_mib_s']:8.1f} MiB/s  {m['cold_vs_curl']:.2f}x curl")
        print(f"  warm  {m['warm_s']:7.2f} s  {m['warm_mib_s']:8.1f} MiB/s  {m['warm_vs_curl']:.2f}x curl")
        for label in ("cold", "warm"):
            cpu = ", ".join(f"{k.split('_cpu_')[1]} {v:.2f}" for k, v in m.items() if k.startswith(f"{label}_cpu_"))
            print(f"  {label} CPU seconds: {cpu}")
        print(f"  peak RSS: peers {out['peer_vmhwm_kib_max'] / 1024:.0f} MiB, "
              f"supernode {out['supernode_vmhwm_kib_max'] / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
