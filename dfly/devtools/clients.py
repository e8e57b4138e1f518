"""Real registry clients for loopback tests: skopeo, and containerd driven by ctr.

- L{hosts_entry}: Go clients never use an HTTP proxy for C{localhost} or loopback addresses, so
  the tests name the registry and the proxy by host names (C{registry.dfly.test}) that an
  C{/etc/hosts} line maps to 127.0.0.1.  The line carries a marker and only that line is removed.
- L{Containerd}: a private containerd daemon (its own root, state and socket under a directory;
  only the native snapshotter, no CRI) owned by a L{Swarm}, and C{ctr content fetch} against it,
  which pulls a manifest and its blobs into the content store without unpacking anything.
- L{skopeo}: one C{skopeo} run with a bounded time, its environment given explicitly (so a proxy
  or a registries.conf from one test never leaks into another).
- L{check_dir_blobs}: what a C{skopeo copy ... dir:OUT} wrote, checked blob by blob against the
  digests (every file's sha256 is computed here, independently of the client's own check).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping

from dfly.devtools.image import Image
from dfly.devtools.swarm import Proc, Swarm, SwarmError, sha256_file

HOSTS_FILE = "/etc/hosts"


class HostsNotWritable(RuntimeError):
    """The hosts file cannot be changed (not root, or a read-only mount)."""


@contextlib.contextmanager
def hosts_entry(names: list[str], address: str = "127.0.0.1", path: str = HOSTS_FILE) -> Iterator[str]:
    """Map C{names} to C{address} in the hosts file for the duration; yields the line added."""
    marker = f"# dfly-tests-{os.getpid()}-{time.monotonic_ns()}"
    line = f"{address} {' '.join(names)} {marker}\n"
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError as e:
        raise HostsNotWritable(f"cannot add to {path}: {e.strerror}") from e
    try:
        yield line
    finally:
        with open(path) as f:
            kept = [x for x in f if marker not in x]
        # Rewrite in place: /etc/hosts may be a bind mount that cannot be replaced by rename.
        with open(path, "w") as f:
            f.writelines(kept)


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def skopeo(
    args: list[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    registries_conf: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run C{skopeo ARGS}; C{env} is added to a minimal environment (PATH, HOME, TMPDIR).

    C{registries_conf} is passed as C{--registries-conf} (skopeo 1.9 does not read
    C{CONTAINERS_REGISTRIES_CONF})."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG")}
    conf = ["--registries-conf", registries_conf] if registries_conf else []
    return subprocess.run(
        [which("skopeo") or "skopeo", *conf, *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_dir_blobs(out_dir: str, image: Image) -> dict[str, int]:
    """Every blob of C{image} is in C{out_dir} (a skopeo C{dir:} copy) with the right sha256.

    Returns digest -> size of the blobs checked; raises AssertionError on any mismatch.
    """
    checked = {}
    for blob in image.blobs:
        path = os.path.join(out_dir, blob.hex)
        assert os.path.exists(path), f"{blob.digest} missing from {out_dir}"
        got = sha256_file(path)
        assert got == blob.hex, f"{path}: sha256 {got}, expected {blob.hex}"
        assert os.path.getsize(path) == blob.size
        checked[blob.digest] = blob.size
    with open(os.path.join(out_dir, "manifest.json"), "rb") as f:
        manifest = f.read()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == image.manifest.digest, "manifest differs"
    return checked


class Containerd:
    """A containerd daemon of our own, stopped with the swarm that started it."""

    def __init__(self, swarm: Swarm, name: str = "containerd", timeout: float = 30.0) -> None:
        binary = which("containerd")
        if binary is None or which("ctr") is None:
            raise SwarmError("containerd or ctr is not installed")
        self.root = os.path.join(swarm.root, name)
        os.makedirs(self.root, exist_ok=True)
        # A unix socket path must stay short (108 bytes): put it in a short directory.
        self.sockdir = os.path.join("/tmp", f"dfly-ctrd-{os.getpid()}-{time.monotonic_ns() % 10**9}")
        os.makedirs(self.sockdir)
        self.address = os.path.join(self.sockdir, "containerd.sock")
        config = os.path.join(self.root, "config.toml")
        disabled = [
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.overlayfs",
            "io.containerd.internal.v1.tracing",
            "io.containerd.tracing.processor.v1.otlp",
        ]
        with open(config, "w") as f:
            f.write(
                "version = 2\n"
                f'root = "{self.root}/root"\n'
                f'state = "{self.sockdir}/state"\n'
                f"disabled_plugins = {disabled!r}\n".replace("'", '"')
                + f'[grpc]\n  address = "{self.address}"\n'
                + f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
                + '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
            )
        self.proc: Proc = swarm.spawn(name, [binary, "--config", config], None)
        deadline = time.monotonic() + timeout
        while True:
            if not self.proc.alive():
                raise SwarmError(f"containerd exited: {Swarm.tail(self.proc.log)}")
            if os.path.exists(self.address) and self.ctr(["version"], timeout=10).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise SwarmError(f"containerd did not start within {timeout:g} s: {Swarm.tail(self.proc.log)}")
            time.sleep(0.1)

    def ctr(self, args: list[str], namespace: str = "dfly", timeout: float = 120.0, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG")}
        return subprocess.run(
            [which("ctr") or "ctr", "--address", self.address, "--namespace", namespace, *args],
            env={**base, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def fetch(self, ref: str, hosts_dir: str, namespace: str = "dfly", timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """C{ctr content fetch --hosts-dir DIR REF}: manifest and blobs into the content store."""
        return self.ctr(["content", "fetch", "--hosts-dir", hosts_dir, ref], namespace=namespace, timeout=timeout)

    def content_sha256(self, digest: str, namespace: str = "dfly") -> str:
        """sha256 of a blob as the content store holds it (streamed out with C{ctr content get})."""
        h = hashlib.sha256()
        with subprocess.Popen(
            [which("ctr") or "ctr", "--address", self.address, "--namespace", namespace, "content", "get", digest],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        ) as p:
            assert p.stdout is not None
            for chunk in iter(lambda: p.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
                h.update(chunk)
            if p.wait(60) != 0:
                raise SwarmError(f"ctr content get {digest} failed")
        return h.hexdigest()

    def check_blobs(self, image: Image, namespace: str = "dfly") -> dict[str, int]:
        """Every blob and the manifest of C{image} are in the content store with the right sha256."""
        checked = {}
        for blob in [image.manifest, *image.blobs]:
            got = self.content_sha256(blob.digest, namespace)
            assert got == blob.hex, f"containerd holds {blob.digest} with sha256 {got}"
            checked[blob.digest] = blob.size
        return checked

    def close(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)
