"""A bounded load generator: many peers in one process download one URL at once.

Runs C{--clients} L{PeerNode}s in this process on one reactor, each with its
own temporary home and its own upload server on 127.0.0.1 (as dfget does
without a daemon), starts every download at the same moment and waits for all
of them, at most C{--seconds}.  Every finished file is then hashed again here
and compared with the file md5 (C{--md5}, or else the one the supernode
announced).  Prints a table: clients, succeeded, failed (with the first
errors), p50/p90/max seconds per client, and bytes fetched from the supernode
and from peers.  Exits 1 if any client failed; the temporary homes are removed
in every case (also on Ctrl-C).

    python -m dfly.devtools.load --supernode HOST:PORT --url URL --clients 200 [--seconds 300]
        [--md5 HEX] [--log FILE] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    ensureDeferred,
    maybeDeferred,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from dfly.config import parse_hostport
from dfly.peer.node import DownloadRequest, DownloadResult, PeerNode
from dfly.wire.protocol import FramedFactory


@dataclass
class Client:
    """One simulated peer and how its download went."""

    index: int
    home: str
    node: PeerNode
    port: Any = None
    started: float = 0.0
    seconds: float | None = None
    result: DownloadResult | None = None
    error: str | None = None


@dataclass
class Summary:
    clients: int
    succeeded: int
    failed: int
    errors: list[tuple[str, int]]
    p50: float | None
    p90: float | None
    max: float | None
    from_supernode: int
    from_peers: int
    wall: float
    peak_rss_mb: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "errors": [{"error": e, "count": n} for e, n in self.errors],
            "p50": self.p50,
            "p90": self.p90,
            "max": self.max,
            "from_supernode": self.from_supernode,
            "from_peers": self.from_peers,
            "wall": self.wall,
            "peak_rss_mb": self.peak_rss_mb,
        }


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of C{values} (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb", buffering=0) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LoadRun:
    """Starts the clients, runs their downloads, verifies and summarises them."""

    def __init__(
        self,
        reactor: Any,
        supernode: tuple[str, int],
        url: str,
        clients: int,
        seconds: float,
        md5: str | None,
        root: str,
    ) -> None:
        self.reactor = reactor
        self.supernode = supernode
        self.url = url
        self.count = clients
        self.seconds = seconds
        self.md5 = md5
        self.root = root
        self.clients: list[Client] = []
        self.timed_out = False
        self._pending: list[Deferred[DownloadResult]] = []

    async def run(self) -> Summary:
        began = self.reactor.seconds()
        timer = self.reactor.callLater(self.seconds, self._time_up)
        try:
            for i in range(self.count):
                self.clients.append(await self._start_client(i))
            pending = [self._download(c) for c in self.clients]
            await DeferredList(pending, consumeErrors=True)
            await self._verify()
        finally:
            if timer.active():
                timer.cancel()
            await self._stop()
        return self._summary(self.reactor.seconds() - began)

    async def _start_client(self, i: int) -> Client:
        home = os.path.join(self.root, f"client-{i:04d}")
        os.makedirs(home)
        node = PeerNode(
            self.reactor,
            home,
            [self.supernode],
            peer_id=f"load-{i:04d}-{uuid.uuid4().hex[:6]}",
            advertise_host="127.0.0.1",
            link_timeout=30.0,
        )
        client = Client(i, home, node)

        client.port = await serverFromString(self.reactor, "tcp:0:interface=127.0.0.1").listen(
            FramedFactory(node.upload_session)
        )
        node.start(client.port.getHost().port)
        return client

    def _download(self, client: Client) -> Deferred[None]:
        client.started = self.reactor.seconds()
        d = client.node.download(DownloadRequest(self.url))
        self._pending.append(d)

        def ok(result: DownloadResult) -> None:
            client.result = result
            client.seconds = self.reactor.seconds() - client.started

        def failed(f: Failure) -> None:
            if self.timed_out and f.check(CancelledError):
                client.error = f"did not finish within {self.seconds:g} s"
            else:
                client.error = f"{f.type.__name__ if f.type else 'error'}: {f.getErrorMessage()}"

        return d.addCallbacks(ok, failed)

    def _time_up(self) -> None:
        self.timed_out = True
        for d in self._pending:
            if not d.called:
                d.cancel()

    async def _verify(self) -> None:
        """Hash every finished file again and compare it with the file md5."""
        done = [c for c in self.clients if c.result is not None]
        wanted = self.md5
        if wanted is None:
            announced = Counter(c.result.md5 for c in done if c.result is not None)
            if len(announced) > 1:
                for c in done:
                    assert c.result is not None
                    c.error = f"supernode announced different md5s to clients: {dict(announced)}"
                    c.result = None
                return
            wanted = next(iter(announced), None)
        for c in done:
            assert c.result is not None
            try:
                got = await deferToThread(file_md5, c.result.path)
            except OSError as e:
                got = f"unreadable ({e})"
            if got != wanted or c.result.md5 != wanted:
                c.error = f"md5 of the downloaded file is {got}, expected {wanted}"
                c.result = None

    async def _stop(self) -> None:
        QUIET.on = True
        stops = []
        for c in self.clients:
            try:
                c.node.stop()
            except Exception as e:  # one broken client must not leak the others
                c.error = c.error or f"stop failed: {e}"
            if c.port is not None:
                stops.append(maybeDeferred(c.port.stopListening))
        await DeferredList(stops, consumeErrors=True)

    def _summary(self, wall: float) -> Summary:
        ok = [c for c in self.clients if c.result is not None and c.error is None]
        bad = [c for c in self.clients if c.result is None or c.error is not None]
        errors = Counter(c.error or "no result" for c in bad).most_common(5)
        times = [c.seconds for c in ok if c.seconds is not None]
        return Summary(
            clients=self.count,
            succeeded=len(ok),
            failed=self.count - len(ok),
            errors=errors,
            p50=percentile(times, 50),
            p90=percentile(times, 90),
            max=max(times) if times else None,
            from_supernode=sum(c.result.from_cdn for c in ok if c.result is not None),
            from_peers=sum(c.result.from_peers for c in ok if c.result is not None),
            wall=wall,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        )


def print_table(s: Summary, out: TextIO) -> None:
    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    rows = [
        ("clients", str(s.clients)),
        ("succeeded", str(s.succeeded)),
        ("failed", str(s.failed)),
        ("p50 seconds", sec(s.p50)),
        ("p90 seconds", sec(s.p90)),
        ("max seconds", sec(s.max)),
        ("bytes from supernode", f"{s.from_supernode} ({s.from_supernode / 1e6:.1f} MB)"),
        ("bytes from peers", f"{s.from_peers} ({s.from_peers / 1e6:.1f} MB)"),
        ("wall seconds", sec(s.wall)),
        ("load process peak RSS", f"{s.peak_rss_mb:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.write(f"{k:<{width}}  {v}\n")
    for error, n in s.errors:
        out.write(f"  {n} x {error}\n")
    out.flush()


@implementer(ILogFilterPredicate)
class _Quiet:
    """Drops every event once C{on} is set: the clients' shutdown is not news."""

    on = False

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        return PredicateResult.no if self.on else PredicateResult.maybe


QUIET = _Quiet()


def start_logging(path: str | None) -> None:
    """All events to C{path} if given, else warnings and worse to stderr until the clients stop."""
    if path:
        stream: TextIO = open(path, "a")  # open until the process ends
        observer: ILogObserver = textFileLogObserver(stream)
    else:
        observer = FilteringLogObserver(
            textFileLogObserver(sys.stderr), [QUIET, LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
        )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def raise_fd_limit() -> None:
    """Each client holds a few sockets (both ends of peer links are in this process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dfly.devtools.load",
        description="Run many dfly peers in one process, all downloading one URL at once.",
    )
    p.add_argument("--supernode", required=True, metavar="HOST:PORT")
    p.add_argument("--url", required=True)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=300.0, help="give up on downloads after this long")
    p.add_argument("--md5", help="expected md5 of the file (default: the md5 the supernode announces)")
    p.add_argument("--workdir", help="where to create the temporary homes (default: the system temp dir)")
    p.add_argument("--log", help="write every log event to this file (default: warnings to stderr)")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    args = p.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        p.error("--clients and --seconds must be positive")
    if args.md5 is not None:
        args.md5 = args.md5.lower()
        if len(args.md5) != 32 or any(c not in "0123456789abcdef" for c in args.md5):
            p.error("--md5 must be 32 hex digits")
    try:
        args.supernode = parse_hostport(args.supernode)
    except Exception as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    raise_fd_limit()
    start_logging(args.log)
    from twisted.internet import task

    summaries: list[Summary] = []

    async def go(reactor: Any) -> None:
        root = tempfile.mkdtemp(prefix="dfly-load-", dir=args.workdir)
        # Also on Ctrl-C or SIGTERM, when the finally below never runs.
        trigger = reactor.addSystemEventTrigger("before", "shutdown", shutil.rmtree, root, True)
        try:
            run = LoadRun(reactor, args.supernode, args.url, args.clients, args.seconds, args.md5, root)
            summaries.append(await run.run())
        finally:
            shutil.rmtree(root, ignore_errors=True)
            try:
                reactor.removeSystemEventTrigger(trigger)
            except ValueError:
                pass  # shutting down (a signal): the trigger has fired already

    try:
        task.react(lambda reactor: ensureDeferred(go(reactor)))
    except SystemExit as e:
        if not summaries:
            sys.stderr.write("load: interrupted or crashed before a summary\n")
            raise SystemExit(e.code or 1) from None
    summary = summaries[0]
    print_table(summary, sys.stdout)
    if args.json:
        print(json.dumps(summary.as_dict()), flush=True)
    raise SystemExit(1 if summary.failed else 0)


if __name__ == "__main__":
    main()
