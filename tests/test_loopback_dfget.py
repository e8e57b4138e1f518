"""dfget against real processes: exit codes, one-line errors, and no half file at -o."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from filegen import make_file

from dfly.devtools.swarm import Swarm, SwarmError, tool
from dfly.devtools.swarm import sha256_file as sha256
from dfly.pieces import MIB

pytestmark = pytest.mark.loopback


def leftovers(directory: str, keep: set[str]) -> list[str]:
    """Files in C{directory} other than C{keep}: temp files would show up here."""
    return sorted(set(os.listdir(directory)) - keep)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers (a hung supernode)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        t.join(2)
        for c in conns:
            c.close()
        sock.close()


def free_port() -> int:
    """A port with nothing listening (bound and released; fine for a refused connection)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def test_origin_404_exits_3_and_leaves_nothing(swarm: Swarm, files: str) -> None:
    """A 404 at the origin gives exit 3 and a single line naming the status; -o stays absent."""
    swarm.start_origin(files)
    swarm.start_supernode()
    outdir = os.path.join(swarm.root, "out")
    os.makedirs(outdir)
    r = swarm.dfget(swarm.origin_url("missing.bin"), os.path.join(outdir, "x"))
    assert r.returncode == 3, r
    assert "404" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert leftovers(outdir, set()) == []


def test_wrong_md5_exits_4(swarm: Swarm, files: str) -> None:
    """An --md5 the file does not have gives exit 4 (integrity), and no output."""
    make_file(files, "f.bin", 300_000)
    swarm.start_origin(files)
    swarm.start_supernode()
    out = os.path.join(swarm.root, "f.out")
    r = swarm.dfget(swarm.origin_url("f.bin"), out, "--md5", "0" * 32)
    assert r.returncode == 4, r
    assert "md5" in r.stderr
    assert not os.path.exists(out)


def test_right_md5_via_daemon(swarm: Swarm, files: str) -> None:
    """With the right --md5, a download handed to a peer daemon succeeds and matches."""
    import hashlib

    src = make_file(files, "g.bin", 5_000_000)
    md5 = hashlib.md5(open(src, "rb").read()).hexdigest()
    swarm.start_origin(files)
    swarm.start_supernode()
    swarm.start_peer("p")
    out = os.path.join(swarm.root, "g.out")
    r = swarm.dfget(swarm.origin_url("g.bin"), out, "--md5", md5, peer="p")
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == open(src, "rb").read()


def test_missing_output_dir_exits_6(swarm: Swarm, files: str) -> None:
    """An output in a directory that does not exist gives exit 6 before anything is fetched."""
    swarm.start_origin(files)
    r = subprocess.run(
        [tool("dfget"), swarm.origin_url("x"), "-o", "/nonexistent/dir/x", "--supernode", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 6, r
    assert "does not exist" in r.stderr


def test_no_supernode_with_no_back_source_exits_7(swarm: Swarm, files: str) -> None:
    """No reachable supernode and --no-back-source gives exit 7 and nothing at -o."""
    make_file(files, "f.bin", 1000)
    swarm.start_origin(files)
    out = os.path.join(swarm.root, "f.out")
    r = subprocess.run(
        [tool("dfget"), swarm.origin_url("f.bin"), "-o", out, "--supernode", f"127.0.0.1:{free_port()}", "--no-back-source"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 7, r
    assert not os.path.exists(out)
    assert leftovers(swarm.root, {"origin.log", "origin.port"}) == []


def test_no_supernode_falls_back_to_origin(swarm: Swarm, files: str) -> None:
    """No reachable supernode: dfget says so and downloads straight from the origin."""
    src = make_file(files, "f.bin", 2_000_000)
    swarm.start_origin(files)
    out = os.path.join(swarm.root, "f.out")
    r = subprocess.run(
        [tool("dfget"), swarm.origin_url("f.bin"), "-o", out, "--supernode", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r
    assert "straight from the origin" in r.stderr
    assert open(out, "rb").read() == open(src, "rb").read()


def test_no_daemon_at_home_falls_back(swarm: Swarm, files: str) -> None:
    """--home naming a directory with no daemon falls back to the origin (or exits 7)."""
    src = make_file(files, "f.bin", 10_000)
    swarm.start_origin(files)
    home = os.path.join(swarm.root, "nohome")
    os.makedirs(home)
    out = os.path.join(swarm.root, "f.out")
    r = subprocess.run([tool("dfget"), swarm.origin_url("f.bin"), "-o", out, "--home", home], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    assert open(out, "rb").read() == open(src, "rb").read()
    os.unlink(out)
    r = subprocess.run(
        [tool("dfget"), swarm.origin_url("f.bin"), "-o", out, "--home", home, "--no-back-source"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 7 and not os.path.exists(out)


def test_timeout_exits_5_quickly(swarm: Swarm, files: str, silent_server: int) -> None:
    """A supernode that accepts but never answers: --timeout 2 gives exit 5 within seconds."""
    swarm.start_origin(files)
    out = os.path.join(swarm.root, "f.out")
    t0 = time.monotonic()
    r = subprocess.run(
        [tool("dfget"), swarm.origin_url("f.bin"), "-o", out, "--supernode", f"127.0.0.1:{silent_server}", "--timeout", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 5, r
    assert "timed out" in r.stderr
    assert time.monotonic() - t0 < 20
    assert not os.path.exists(out)


def test_existing_output_is_replaced_only_on_success(swarm: Swarm, files: str) -> None:
    """A failed download leaves an existing file at -o untouched; a good one replaces it."""
    src = make_file(files, "f.bin", 100_000)
    swarm.start_origin(files)
    swarm.start_supernode()
    out = os.path.join(swarm.root, "f.out")
    with open(out, "wb") as f:
        f.write(b"precious")
    r = swarm.dfget(swarm.origin_url("nope.bin"), out)
    assert r.returncode == 3
    assert open(out, "rb").read() == b"precious"
    r = swarm.dfget(swarm.origin_url("f.bin"), out)
    assert r.returncode == 0
    assert open(out, "rb").read() == open(src, "rb").read()


def test_usage_errors_exit_2() -> None:
    """Bad command lines exit 2 with a message: no URL, bad scheme, bad --md5, bad header,
    both --home and --supernode, no -o for a URL with no file name."""
    for argv in (
        [],
        ["ftp://x/y", "-o", "y"],
        ["http://x/y", "-o", "y", "--md5", "zz"],
        ["http://x/y", "-o", "y", "--header", "no-colon"],
        ["http://x/y", "-o", "y", "--home", "/tmp", "--supernode", "a:1"],
        ["http://example.com/"],
        ["http://example.com/?q=1"],
    ):
        r = subprocess.run([tool("dfget"), *argv], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (argv, r)
        assert r.stderr.startswith("dfget: ")


def test_device_or_fifo_output_is_never_replaced(swarm: Swarm, files: str) -> None:
    """-o naming a FIFO is refused with exit 6 and the FIFO is left as it was."""
    make_file(files, "f.bin", 1000)
    swarm.start_origin(files)
    fifo = os.path.join(swarm.root, "fifo")
    os.mkfifo(fifo)
    r = subprocess.run([tool("dfget"), swarm.origin_url("f.bin"), "-o", fifo, "--supernode", "127.0.0.1:1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 6, r
    assert "not a regular file" in r.stderr
    import stat

    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_output_through_a_symlink_replaces_its_target(swarm: Swarm, files: str) -> None:
    """-o naming a symlink writes the file it points to and keeps the link."""
    src = make_file(files, "f.bin", 5000)
    swarm.start_origin(files)
    swarm.start_supernode()
    target = os.path.join(swarm.root, "target.bin")
    link = os.path.join(swarm.root, "link.bin")
    open(target, "wb").close()
    os.symlink(target, link)
    r = swarm.dfget(swarm.origin_url("f.bin"), link)
    assert r.returncode == 0, r.stderr
    assert os.path.islink(link) and open(target, "rb").read() == open(src, "rb").read()


def test_credentials_are_part_of_the_task(swarm: Swarm, files: str) -> None:
    """A file behind 'Authorization' fetched by one client is not handed to a client without
    (or with other) credentials: they get the origin's 401, not the bytes."""
    src = make_file(files, "secret.bin", 200_000)
    swarm.start_origin(files, "--auth", "s3cret")
    swarm.start_supernode()
    swarm.start_peer("p1")
    swarm.start_peer("p2")
    url = swarm.origin_url("secret.bin")
    ok = os.path.join(swarm.root, "ok.out")
    r = swarm.dfget(url, ok, "--header", "Authorization: Bearer s3cret", peer="p1")
    assert r.returncode == 0, r.stderr
    assert open(ok, "rb").read() == open(src, "rb").read()
    for extra in ([], ["--header", "Authorization: Bearer wrong"]):
        out = os.path.join(swarm.root, "no.out")
        r = swarm.dfget(url, out, *extra, peer="p2")
        assert r.returncode == 3, r
        assert "401" in r.stderr
        assert not os.path.exists(out)


def test_supernode_lost_mid_download_falls_back_or_exits_7(swarm: Swarm, files: str) -> None:
    """When the supernode dies mid-download and does not come back, dfget does not hang: an
    in-process peer gives up after its link timeout and fetches from the origin (or, with
    --no-back-source, exits 7 with nothing at -o)."""
    import signal

    src = make_file(files, "f.bin", 8 * 1024 * 1024)
    swarm.start_origin(files, "--rate", "2M")
    swarm.start_supernode("--piece-size", "1")
    url = swarm.origin_url("f.bin")
    outs = [os.path.join(swarm.root, n) for n in ("fallback.out", "strict.out")]
    procs = [
        subprocess.Popen(swarm.dfget_argv(url, outs[0]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen(swarm.dfget_argv(url + "?b", outs[1], "--no-back-source"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]
    time.sleep(2)
    sn = [p for p in swarm.procs if p.name == "supernode"][0]
    sn.stop(signal.SIGKILL)
    sn.name = "killed-supernode"
    codes = []
    for p in procs:
        _, err = p.communicate(timeout=60)
        codes.append((p.returncode, err))
    assert codes[0][0] == 0, codes[0]
    assert open(outs[0], "rb").read() == open(src, "rb").read()
    assert codes[1][0] == 7, codes[1]
    assert not os.path.exists(outs[1])


class StderrWatch:
    """Collects a running process's stderr lines in a thread, so a test can wait for one."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.lines: list[str] = []
        self._stream = proc.stderr
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} on stderr within {timeout:g} s: {self.lines}"
            time.sleep(0.05)

    def text(self, timeout: float = 10.0) -> str:
        """Everything the process wrote, once it has closed its stderr."""
        self._thread.join(timeout)
        return "".join(self.lines)


def wait_for_task(swarm: Swarm, suffix: str, timeout: float = 20.0) -> None:
    """Until the supernode has a task for a URL ending in C{suffix} (a download is under way)."""
    deadline = time.monotonic() + timeout
    while not any(t["url"].endswith(suffix) and t.get("source_bytes") for t in swarm.api()["tasks"]):
        assert time.monotonic() < deadline, f"no task for {suffix} within {timeout:g} s"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("mode", ["daemon", "in-process", "origin"])
def test_signal_mid_download_exits_130_in_every_mode(swarm: Swarm, files: str, mode: str, sig: int) -> None:
    """Ctrl-C or SIGTERM of a dfget mid-download, whether handed to a daemon (--home), run by
    an in-process peer (--supernode) or downloading straight from the origin after a fallback,
    gives exit 130 and the single line 'dfget: interrupted', and leaves no temporary file; the
    daemon carries on and serves the next dfget."""
    src = make_file(files, "f.bin", 8 * 1024 * 1024)
    swarm.start_origin(files, "--rate", "1M")
    swarm.start_supernode("--piece-size", "1")
    swarm.start_peer("p")
    outdir = os.path.join(swarm.root, "out")
    os.makedirs(outdir)
    out = os.path.join(outdir, "f.out")
    url = swarm.origin_url("f.bin")
    if mode == "daemon":
        argv = swarm.dfget_argv(url, out, peer="p")
    elif mode == "in-process":
        argv = swarm.dfget_argv(url, out)
    else:
        argv = [tool("dfget"), url, "-o", out, "--supernode", f"127.0.0.1:{free_port()}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=swarm.root)
    watch = StderrWatch(proc)
    try:
        if mode == "origin":
            watch.wait_for("straight from the origin", 30)
        else:
            wait_for_task(swarm, "/f.bin")
        time.sleep(0.5)
        assert proc.poll() is None, watch.text()
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    err = watch.text()
    assert proc.returncode == 130, (proc.returncode, err)
    lines = err.strip().splitlines()
    # Only the line that says why; after a fallback, the notice of it before that.
    assert lines[-1] == "dfget: interrupted", err
    assert all("straight from the origin" in line for line in lines[:-1]) and len(lines) <= 2, err
    assert leftovers(outdir, set()) == []
    peer = swarm.peers["p"]
    assert peer.alive()
    r = swarm.dfget(url, out, peer="p")
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == open(src, "rb").read()


@pytest.mark.parametrize("mode", ["daemon", "in-process"])
def test_request_too_large_is_a_usage_error(swarm: Swarm, files: str, mode: str) -> None:
    """A header too large for the protocol's 64 KiB control frames is a usage error (exit 2)
    with one line, the same in both modes, found before anything is sent: the origin and the
    supernode see no request and the daemon carries on."""
    make_file(files, "f.bin", 1000)
    swarm.start_origin(files)
    swarm.start_supernode()
    swarm.start_peer("p")
    out = os.path.join(swarm.root, "f.out")
    r = swarm.dfget(swarm.origin_url("f.bin"), out, "-H", "X-A: " + "a" * 70_000, peer="p" if mode == "daemon" else None)
    assert r.returncode == 2, r
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("dfget: request too large (") and "bytes of URL and headers" in r.stderr, r.stderr
    assert not os.path.exists(out)
    assert swarm.origin_stats()["requests"] == {}
    assert swarm.api()["tasks"] == []
    assert swarm.peers["p"].alive()


def test_daemon_killed_mid_download_falls_back_or_exits_7(swarm: Swarm, files: str) -> None:
    """When the peer daemon dies mid-download (SIGKILL), dfget does as when no daemon can be
    reached: it downloads straight from the origin (complete and verified), or, with
    --no-back-source, exits 7 with one line saying so and nothing at -o."""
    src = make_file(files, "f.bin", 6 * 1024 * 1024)
    swarm.start_origin(files, "--rate", "2M")
    swarm.start_supernode("--piece-size", "1")
    swarm.start_peer("p")
    url = swarm.origin_url("f.bin")
    outs = [os.path.join(swarm.root, n) for n in ("fallback.out", "strict.out")]
    procs = [
        subprocess.Popen(swarm.dfget_argv(url, outs[0], peer="p"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen(
            swarm.dfget_argv(url + "?b", outs[1], "--no-back-source", peer="p"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
    ]
    try:
        wait_for_task(swarm, "/f.bin")
        wait_for_task(swarm, "/f.bin?b")
        time.sleep(0.5)
        peer = swarm.peers["p"]
        peer.stop(signal.SIGKILL)
        peer.name = "killed-p"
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    (out0, err0), (_, err1) = results
    assert procs[0].returncode == 0, err0
    assert "straight from the origin" in err0
    assert open(outs[0], "rb").read() == open(src, "rb").read()
    assert procs[1].returncode == 7, err1
    assert len(err1.strip().splitlines()) == 1 and "peer daemon" in err1, err1
    assert not os.path.exists(outs[1])
    assert leftovers(swarm.root, {"origin.log", "origin.port", "supernode", "supernode.log", "supernode.ready",
                                  "p", "p.log", "p.ready", "fallback.out"}) == []


def port_is_free(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_default_daemon_or_else_default_supernode(swarm: Swarm, files: str) -> None:
    """With neither --home nor --supernode: a stale socket at the default home (a daemon that
    crashed) means no daemon runs there, so dfget uses the supernode at 127.0.0.1:8002 (not
    the origin); once a daemon runs at the default home, dfget hands the download to it."""
    if not port_is_free(8002):
        pytest.skip("127.0.0.1:8002 is in use")
    src = make_file(files, "f.bin", 300_000)
    swarm.start_origin(files)
    try:
        swarm.start_supernode("--port", "tcp:8002:interface=127.0.0.1")
    except SwarmError:
        if port_is_free(8002):
            raise
        pytest.skip("127.0.0.1:8002 was taken meanwhile")
    data = os.path.join(swarm.root, "data")
    home = os.path.join(data, "dfly", "peer")
    os.makedirs(home)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.path.join(home, "dfly.sock"))
    stale.close()  # the file stays; connecting to it is refused
    env = {**os.environ, "XDG_DATA_HOME": data}
    out = os.path.join(swarm.root, "f.out")
    url = swarm.origin_url("f.bin")
    r = subprocess.run([tool("dfget"), url, "-o", out, "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r
    assert r.stderr == "", r.stderr
    summary = json.loads(r.stdout)
    assert summary["from_supernode"] + summary["from_peers"] == len(open(src, "rb").read()), summary
    assert "from_origin" not in summary
    assert open(out, "rb").read() == open(src, "rb").read()
    os.unlink(os.path.join(home, "dfly.sock"))
    swarm.start_peer("peer", "--home", home, "--supernode", "127.0.0.1:8002")
    os.unlink(out)
    r = subprocess.run([tool("dfget"), url + "?again", "-o", out, "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r
    assert open(out, "rb").read() == open(src, "rb").read()
    with open(swarm.peers["peer"].log) as f:
        assert "done: 300000 bytes" in f.read()


@pytest.mark.parametrize("mode", ["daemon", "in-process"])
def test_silent_origin_is_a_timeout_naming_the_option(swarm: Swarm, silent_server: int, mode: str) -> None:
    """An origin that accepts the connection and never answers: after the supernode's
    --origin-timeout dfget exits 5 (timeout) with one line that says the origin did not
    answer within that time and names the option; no 'CancelledError', nothing at -o."""
    swarm.start_supernode("--origin-timeout", "2")
    swarm.start_peer("p")
    out = os.path.join(swarm.root, "f.out")
    t0 = time.monotonic()
    r = swarm.dfget(f"http://127.0.0.1:{silent_server}/f.bin", out, peer="p" if mode == "daemon" else None, timeout=60)
    assert r.returncode == 5, r
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "did not answer within 2 s" in r.stderr and "--origin-timeout" in r.stderr, r.stderr
    assert "CancelledError" not in r.stderr
    assert time.monotonic() - t0 < 20
    assert not os.path.exists(out)


def test_timeout_while_the_origin_is_silent_exits_5(swarm: Swarm, silent_server: int) -> None:
    """--timeout firing while dfget waits for the origin's answer on its own (no daemon at
    --home) is a timeout, exit 5, not an origin error."""
    home = os.path.join(swarm.root, "nohome")
    os.makedirs(home)
    out = os.path.join(swarm.root, "f.out")
    r = subprocess.run(
        [tool("dfget"), f"http://127.0.0.1:{silent_server}/f.bin", "-o", out, "--home", home, "--timeout", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 5, r
    assert r.stderr.strip().splitlines()[-1] == "dfget: timed out after 1 s", r.stderr
    assert not os.path.exists(out)


def test_url_credentials_work_in_every_mode_and_never_reach_a_log(swarm: Swarm, files: str) -> None:
    """http://user:password@host/... works like --header 'Authorization: Basic ...': through
    a daemon, an in-process peer and straight from the origin, as one task with that header;
    a client without them gets the origin's 401; and no log shows the password."""
    import base64

    src = make_file(files, "secret.bin", 200_000)
    swarm.start_origin(files, "--basic-auth", "alice:s3cr3t@pw")
    swarm.start_supernode()
    swarm.start_peer("p1")
    swarm.start_peer("p2")
    port = swarm.origin_port
    with_creds = f"http://alice:s3cr3t%40pw@127.0.0.1:{port}/secret.bin"
    outs = {name: os.path.join(swarm.root, f"{name}.out") for name in ("daemon", "inproc", "header", "origin", "none")}
    runs = {
        "daemon": swarm.dfget(with_creds, outs["daemon"], peer="p1"),
        "inproc": swarm.dfget(with_creds, outs["inproc"]),
        "header": swarm.dfget(
            swarm.origin_url("secret.bin"), outs["header"],
            "-H", "Authorization: Basic " + base64.b64encode(b"alice:s3cr3t@pw").decode(), peer="p2",
        ),
        "origin": subprocess.run(
            [tool("dfget"), with_creds, "-o", outs["origin"], "--supernode", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60,
        ),
    }
    for name, r in runs.items():
        assert r.returncode == 0, (name, r)
        assert open(outs[name], "rb").read() == open(src, "rb").read(), name
        assert "s3cr3t" not in r.stderr + r.stdout, name
    tasks = swarm.api()["tasks"]
    assert len(tasks) == 1, tasks  # the header and the URL's credentials are one identity
    assert "s3cr3t" not in json.dumps(tasks) and "alice" not in json.dumps(tasks)
    r = swarm.dfget(swarm.origin_url("secret.bin"), outs["none"], peer="p2")
    assert r.returncode == 3 and "401" in r.stderr, r
    assert swarm.origin_stats()["requests"]["secret.bin"] == 3  # supernode once, origin mode, 401
    for name in ("supernode", "p1", "p2"):
        with open(os.path.join(swarm.root, f"{name}.log")) as f:
            assert "s3cr3t" not in f.read(), name


def test_json_seconds_is_the_whole_command(swarm: Swarm, files: str) -> None:
    """--json's 'seconds' is the whole command's time: after a fallback it includes the time
    spent finding no supernode (the in-process peer's 5 s link timeout), and the summary says
    why it fell back and how long the origin part took; through a daemon, the daemon's own
    time is 'swarm_seconds'."""
    src = make_file(files, "f.bin", 300_000)
    swarm.start_origin(files)
    swarm.start_supernode()
    swarm.start_peer("p")
    out = os.path.join(swarm.root, "f.out")
    t0 = time.monotonic()
    r = subprocess.run(
        [tool("dfget"), swarm.origin_url("f.bin"), "-o", out, "--json", "--supernode", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )
    wall = time.monotonic() - t0
    assert r.returncode == 0, r
    summary = json.loads(r.stdout)
    assert 4.5 <= summary["seconds"] <= wall, (summary, wall)
    assert summary["origin_seconds"] < summary["seconds"] - 4
    assert "cannot reach supernode" in summary["fallback"]
    assert summary["from_origin"] == summary["length"] == len(open(src, "rb").read())
    r = swarm.dfget(swarm.origin_url("f.bin"), out, peer="p")
    assert r.returncode == 0, r
    summary = json.loads(r.stdout)
    assert 0 < summary["swarm_seconds"] <= summary["seconds"], summary
    assert "fallback" not in summary and "origin_seconds" not in summary


def test_handing_over_to_a_daemon_needs_no_reactor(swarm: Swarm, files: str) -> None:
    """dfget with a running daemon does the whole job (download, verified copy, --json)
    without importing Twisted: its start-up stays a few tens of milliseconds.  With no
    daemon it takes the reactor's path (here: straight from the origin) as before."""
    src = make_file(files, "f.bin", 3 * MIB + 7)
    swarm.start_origin(files)
    swarm.start_supernode()
    swarm.start_peer("p")
    home = swarm.peers["p"].info["home"]
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('TWISTED=%s\\n' % any(m == 'twisted' or m.startswith('twisted.') for m in sys.modules)))\n"
        "from dfly.dfget_cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = os.path.join(swarm.root, "out.bin")
    r = subprocess.run(
        [sys.executable, "-c", probe, swarm.origin_url("f.bin"), "-o", out, "--home", home, "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "TWISTED=False" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["length"] == 3 * MIB + 7
    assert sha256(out) == sha256(src)
    # No daemon at that home: the reactor's path, which falls back to the origin.
    out2 = os.path.join(swarm.root, "out2.bin")
    nowhere = os.path.join(swarm.root, "no-daemon-here")
    os.makedirs(nowhere)
    r = subprocess.run(
        [sys.executable, "-c", probe, swarm.origin_url("f.bin"), "-o", out2, "--home", nowhere],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "TWISTED=True" in r.stderr and "straight from the origin" in r.stderr
    assert sha256(out2) == sha256(src)
