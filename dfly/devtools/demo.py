"""The whole swarm on loopback, on a real file: origin, supernode, N peer daemons, dfget.

    scripts/demo [--peers N] [--file PATH] [--keep]

Every peer downloads the same file at once through its daemon; each output is
checked by sha256 against the original, and the table shows where each
peer's bytes came from and how many bytes the origin sent.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

from dfly.devtools.swarm import Swarm
from dfly.devtools.swarm import sha256_file as sha256

MIN_SIZE = 100 * 1000 * 1000
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1",
    "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1",
    "/usr/lib/aarch64-linux-gnu/libLLVM-15.so.1",
    "/usr/lib/jvm/java-17-openjdk-amd64/lib/modules",
]


def find_real_file(workdir: str) -> str:
    """A real file of 100 MB or more: one the system has, else one from a Debian package."""
    for path in CANDIDATES + sorted(glob.glob("/usr/lib/*/libLLVM*.so*")):
        if os.path.isfile(path) and os.path.getsize(path) >= MIN_SIZE:
            return path
    print("no large system file found; fetching Debian package libllvm15 ...", flush=True)
    pkgdir = os.path.join(workdir, "pkg")
    os.makedirs(pkgdir, exist_ok=True)
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "download", "-qq", "libllvm15"], cwd=pkgdir, check=True)
    deb = glob.glob(os.path.join(pkgdir, "libllvm15_*.deb"))[0]
    subprocess.run(["dpkg-deb", "-x", deb, os.path.join(pkgdir, "root")], check=True)
    for path in glob.glob(os.path.join(pkgdir, "root", "usr", "lib", "*", "libLLVM*.so*")):
        if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) >= MIN_SIZE:
            return path
    raise SystemExit("demo: could not find or fetch a real file of 100 MB or more; pass --file")




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=4, help="peer daemons (default 4)")
    p.add_argument("--file", help="file to distribute (default: a real system file of 100 MB or more)")
    p.add_argument("--dir", default="demo-run", help="working directory (default ./demo-run)")
    p.add_argument("--keep", action="store_true", help="keep outputs and logs")
    args = p.parse_args(argv)
    if args.peers < 1:
        p.error("--peers must be at least 1")

    workdir = os.path.abspath(args.dir)
    shutil.rmtree(os.path.join(workdir, "swarm"), ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    src = os.path.abspath(args.file) if args.file else find_real_file(workdir)
    if not os.path.isfile(src) or os.path.getsize(src) == 0:
        p.error(f"--file {args.file} is not a non-empty regular file")
    size = os.path.getsize(src)
    files = os.path.join(workdir, "files")
    os.makedirs(files, exist_ok=True)
    name = os.path.basename(src)
    link = os.path.join(files, name)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(src, link)
    print(f"file: {src} ({size / 1e6:.1f} MB)")
    want = sha256(src)

    swarm = Swarm(os.path.join(workdir, "swarm"))
    ok = True
    try:
        swarm.start_origin(files)
        swarm.start_supernode()
        peers = [f"peer{i + 1}" for i in range(args.peers)]
        for peer in peers:
            swarm.start_peer(peer)
        print(f"swarm: origin :{swarm.origin_port}, supernode {swarm.supernode_address}, {len(peers)} peer daemons")
        url = swarm.origin_url(name)
        outs = [os.path.join(swarm.root, f"{peer}.out") for peer in peers]
        t0 = time.monotonic()
        results = swarm.dfget_many([(url, out, peer) for out, peer in zip(outs, peers, strict=True)], timeout=600)
        wall = time.monotonic() - t0
        print()
        print(f"{'peer':<8} {'exit':>4} {'seconds':>8} {'MB from supernode':>18} {'MB from peers':>14}  sha256")
        total_cdn = total_peers = 0
        for peer, out, r in zip(peers, outs, results, strict=True):
            if r.returncode != 0:
                ok = False
                print(f"{peer:<8} {r.returncode:>4}  {r.stderr.strip()}")
                continue
            s = json.loads(r.stdout)
            match = os.path.exists(out) and sha256(out) == want
            ok = ok and match
            total_cdn += s["from_supernode"]
            total_peers += s["from_peers"]
            print(
                f"{peer:<8} {r.returncode:>4} {s['seconds']:>8.2f} {s['from_supernode'] / 1e6:>18.1f} "
                f"{s['from_peers'] / 1e6:>14.1f}  {'ok' if match else 'MISMATCH'}"
            )
        origin = swarm.origin_stats()["bytes"].get(name, 0)
        task = swarm.task("/" + name)
        print()
        print(f"all {len(peers)} downloads finished in {wall:.2f} s (wall clock)")
        print(f"origin egress: {origin / 1e6:.1f} MB = {origin / size:.3f} x the file size")
        slice_total = len(peers) * (size + 5 * (task["piece_count"] or 0))
        print(f"supernode served {task['served_bytes'] / 1e6:.1f} MB = {task['served_bytes'] / slice_total:.1%} of all slice bytes")
        if total_cdn + total_peers:
            print(f"bytes from other peers: {total_peers / (total_cdn + total_peers):.1%}")
        print(f"every output matches the original's sha256: {'yes' if ok else 'NO'}")
    finally:
        swarm.close()
        if not args.keep:
            for out in glob.glob(os.path.join(swarm.root, "*.out")):
                os.unlink(out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
