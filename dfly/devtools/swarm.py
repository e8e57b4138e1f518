"""Run a whole swarm on loopback as real processes: origin, supernode, peers, dfget.

Used by the demo, the loopback tests and the benchmarks.  Every process is a
real C{twistd -n} (or dfget, or the counting origin) started from this
Python's environment; each writes a ready file once it listens, so nothing
here guesses ports or sleeps for a fixed time.  L{Swarm.close} stops all of
them (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

BIN = os.path.dirname(sys.executable)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def proc_kib(pid: int, field: str) -> int:
    """A memory figure of a live process from /proc, in KiB (field "VmRSS", "VmHWM", ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"no {field} for process {pid}")


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a live process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # Fields after the command name, which is in parentheses and may contain spaces.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tool(name: str) -> str:
    """Path of a console script installed beside this Python (or the bare name)."""
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else name


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: str
    info: dict[str, Any]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, wait: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


class SwarmError(RuntimeError):
    pass


class Swarm:
    """Processes of one loopback swarm under C{root}."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.procs: list[Proc] = []
        self.origin_port: int | None = None
        self.supernode_info: dict[str, Any] | None = None
        self.peers: dict[str, Proc] = {}

    # -- starting things ---------------------------------------------------
    def spawn(self, name: str, argv: list[str], ready: str | None, timeout: float = 30.0) -> Proc:
        """Start C{argv} as process C{name} (log in ROOT/NAME.log), stopped by L{close}; with
        C{ready}, wait until that file exists and read its JSON into C{Proc.info}."""
        log = os.path.join(self.root, f"{name}.log")
        if ready and os.path.exists(ready):
            os.unlink(ready)
        with open(log, "ab") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        proc = Proc(name, popen, log, {})
        self.procs.append(proc)
        if ready:
            deadline = time.monotonic() + timeout
            while not os.path.exists(ready):
                if popen.poll() is not None:
                    raise SwarmError(f"{name} exited with {popen.returncode}; see {log}:\n{self.tail(log)}")
                if time.monotonic() > deadline:
                    raise SwarmError(f"{name} did not start within {timeout:g} s; see {log}")
                time.sleep(0.02)
            with open(ready) as f:
                proc.info = json.load(f)
        return proc

    @staticmethod
    def tail(path: str, lines: int = 30) -> str:
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def start_origin(self, directory: str, *extra: str) -> int:
        ready = os.path.join(self.root, "origin.port")
        if os.path.exists(ready):
            os.unlink(ready)
        proc = self.spawn(
            "origin",
            [sys.executable, "-m", "dfly.devtools.origin", "--dir", directory, "--port-file", ready, *extra],
            None,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if not proc.alive() or time.monotonic() > deadline:
                raise SwarmError(f"origin did not start; see {proc.log}:\n{self.tail(proc.log)}")
            time.sleep(0.02)
        with open(ready) as f:
            self.origin_port = int(f.read())
        return self.origin_port

    def origin_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.origin_port}/{name}"

    def origin_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.origin_port}/_stats", timeout=10) as r:
            return dict(json.load(r))

    def start_supernode(self, *extra: str, name: str = "supernode") -> dict[str, Any]:
        home = os.path.join(self.root, name)
        ready = os.path.join(self.root, f"{name}.ready")
        proc = self.spawn(
            name,
            [
                tool("twistd"), "-n", "--pidfile=", "-l", "-", "dfly-supernode",
                "--port", "tcp:0:interface=127.0.0.1", "--api", "tcp:0:interface=127.0.0.1",
                "--home", home, "--ready-file", ready, *extra,
            ],
            ready,
        )
        self.supernode_info = proc.info
        return proc.info

    @property
    def supernode_address(self) -> str:
        assert self.supernode_info is not None
        return f"127.0.0.1:{self.supernode_info['port']}"

    def _peer_argv(self, name: str, *extra: str, proxy: str | None = None) -> list[str]:
        return [
            tool("twistd"), "-n", "--pidfile=", "-l", "-", "dfly-peer",
            "--supernode", self.supernode_address, "--port", "tcp:0:interface=127.0.0.1",
            "--home", os.path.join(self.root, name),
            "--ready-file", os.path.join(self.root, f"{name}.ready"), "--proxy", proxy or "none", *extra,
        ]

    def start_peer(self, name: str, *extra: str, proxy: str | None = None) -> Proc:
        """Start peer daemon C{name}; with C{proxy} (an endpoint string, e.g.
        C{"tcp:0:interface=127.0.0.1"}) its HTTP proxy listens there and C{info["proxy"]} is
        its port, else the proxy is off.  C{extra} may add proxy options (C{--registry} ...)."""
        ready = os.path.join(self.root, f"{name}.ready")
        proc = self.spawn(name, self._peer_argv(name, *extra, proxy=proxy), ready)
        proc.info["home"] = os.path.join(self.root, name)
        self.peers[name] = proc
        return proc

    def proxy_url(self, peer: str) -> str:
        """Base URL of a peer's proxy (started with C{proxy=...})."""
        return f"http://127.0.0.1:{self.peers[peer].info['proxy']}"
    def start_peers(self, names: list[str], *extra: str, timeout: float = 60.0) -> list[Proc]:
        """Start several peer daemons at once and wait until every one listens."""
        procs = []
        for name in names:
            ready = os.path.join(self.root, f"{name}.ready")
            if os.path.exists(ready):
                os.unlink(ready)
            procs.append(self.spawn(name, self._peer_argv(name, *extra), None))
        deadline = time.monotonic() + timeout
        for name, proc in zip(names, procs, strict=True):
            ready = os.path.join(self.root, f"{name}.ready")
            while not os.path.exists(ready):
                if not proc.alive():
                    raise SwarmError(f"{name} exited with {proc.popen.returncode}; see {proc.log}:\n{self.tail(proc.log)}")
                if time.monotonic() > deadline:
                    raise SwarmError(f"{name} did not start within {timeout:g} s; see {proc.log}")
                time.sleep(0.02)
            with open(ready) as f:
                proc.info = json.load(f)
            proc.info["home"] = os.path.join(self.root, name)
            self.peers[name] = proc
        return procs

    # -- using it ----------------------------------------------------------
    def dfget_argv(self, url: str, output: str, *extra: str, peer: str | None = None) -> list[str]:
        where = ["--home", self.peers[peer].info["home"]] if peer else ["--supernode", self.supernode_address]
        return [tool("dfget"), url, "-o", output, "--json", *where, *extra]

    def dfget(self, url: str, output: str, *extra: str, peer: str | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.dfget_argv(url, output, *extra, peer=peer),
            capture_output=True, text=True, timeout=timeout, cwd=self.root,
        )

    def dfget_many(self, jobs: list[tuple[str, str, str | None]], timeout: float = 300.0) -> list[subprocess.CompletedProcess[str]]:
        """Run several dfget at once: (url, output, peer-or-None) each."""
        started = [
            (argv, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.root))
            for argv in (self.dfget_argv(u, o, peer=p) for u, o, p in jobs)
        ]
        results = []
        deadline = time.monotonic() + timeout
        for argv, popen in started:
            try:
                out, err = popen.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                out, err = popen.communicate()
            results.append(subprocess.CompletedProcess(argv, popen.returncode, out, err))
        return results

    def api(self, path: str = "/api/v1/tasks") -> Any:
        assert self.supernode_info is not None
        url = f"http://127.0.0.1:{self.supernode_info['api']}{path}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)

    def task(self, url_suffix: str) -> dict[str, Any]:
        for task in self.api()["tasks"]:
            if task["url"].endswith(url_suffix):
                return dict(task)
        raise SwarmError(f"no task for {url_suffix}")

    def close(self) -> dict[str, int | None]:
        """Stop every process: SIGTERM to all at once, then wait (SIGKILL after 10 s)."""
        for proc in reversed(self.procs):
            if proc.alive():
                try:
                    proc.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        codes = {}
        deadline = time.monotonic() + 10.0
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
            codes[proc.name] = proc.popen.returncode
        self.procs.clear()
        return codes

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
