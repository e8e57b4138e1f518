"""dfget: download a URL through the dfly swarm, like wget.

The output appears at its path only complete and verified: bytes go to a
temporary file beside it, which is renamed into place after the md5 check;
on any failure the temporary file is removed and the exit status says why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, NoReturn, TextIO

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
from twisted.internet.error import ConnectingCancelledError, ReactorNotRunning
from twisted.internet.protocol import Protocol
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from dfly import __version__
from dfly.config import data_home, parse_hostport, parse_size, positive
from dfly.errors import (
    DflyError,
    DownloadTimeout,
    IntegrityError,
    NoDaemon,
    NoSupernode,
    OriginError,
    ProtocolError,
    StorageError,
)
from dfly.ratelimit import InboundThrottle, make_bucket
from dfly.urls import check_url, origin_headers, parse_header_lines, url_credentials
from dfly.wire.framing import MAX_CONTROL

BACK_SOURCE_IDLE = 60.0
_BODY_DONE = Failure(ResponseDone())

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ORIGIN = 3
EXIT_INTEGRITY = 4
EXIT_TIMEOUT = 5
EXIT_OUTPUT = 6
EXIT_NO_SUPERNODE = 7
EXIT_INTERRUPTED = 130

# Seconds an interrupted dfget waits for its cancelled download to clean up before it stops.
INTERRUPT_GRACE = 5.0

_KIND_EXIT = {
    "OriginError": EXIT_ORIGIN,
    "IntegrityError": EXIT_INTEGRITY,
    "DownloadTimeout": EXIT_TIMEOUT,
    "NoSupernode": EXIT_NO_SUPERNODE,
    "StorageError": EXIT_OUTPUT,
}


DESCRIPTION = (
    "Download URL to PATH through the dfly swarm. With --home, the peer daemon whose home "
    "is DIR does the download (and shares it); with --supernode, dfget runs a peer of its "
    "own for the duration."
)
EPILOG = (
    "exit status: 0 done and verified, 1 failed, 2 usage, 3 origin error, 4 integrity "
    "error, 5 timeout, 6 cannot write the output, 7 no supernode or daemon (with --no-back-source), "
    "130 interrupted"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise usage.UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dfget", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("url", nargs="?", help="http(s) URL to download")
    p.add_argument("-o", "--output", help="where to write the file (default: the URL's last path segment)")
    p.add_argument("--home", help="home directory of a running peer daemon to hand the download to")
    p.add_argument("-s", "--supernode", action="append", default=[], metavar="HOST:PORT",
                   help="supernode to use with an in-process peer (repeatable)")
    p.add_argument("-m", "--md5", help="expected md5 of the whole file")
    p.add_argument("-i", "--identifier", help="extra task identity (ignored with --md5)")
    p.add_argument("-f", "--filter", default="", help="query keys to ignore for task identity, as 'k1&k2'")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="header sent to the origin (repeatable)")
    p.add_argument("-e", "--timeout", help="give up after this many seconds")
    p.add_argument("--ca-file", metavar="PEM",
                   help="CAs to verify an HTTPS origin with when downloading from it directly (default: the system store)")
    p.add_argument("--upload-rate", default="0", metavar="RATE",
                   help="with an in-process peer: most bytes/s it sends to other peers (K/M/G; 0: no limit)")
    p.add_argument("--download-rate", default="0", metavar="RATE",
                   help="with an in-process peer (and from the origin): most bytes/s received (K/M/G; 0: no limit)")
    p.add_argument("--no-back-source", action="store_true", help="never download straight from the origin")
    p.add_argument("--json", action="store_true", help="print a JSON summary line on stdout when done")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--version", action="store_true", help="print the version and exit")
    return p


class Options(dict[str, Any]):
    """dfget's parsed command line; C{parseOptions} raises C{usage.UsageError}."""

    def parseOptions(self, argv: list[str]) -> None:
        ns = _parser().parse_args(argv)
        self.update({k.replace("_", "-"): v for k, v in vars(ns).items()})
        self["supernode"] = [parse_hostport(s) for s in self["supernode"]]
        self.postOptions()

    def help(self) -> str:
        return _parser().format_help()

    def postOptions(self) -> None:
        if self["version"]:
            return
        if not self["url"]:
            raise usage.UsageError("a URL is required")
        try:
            # user:password@ becomes an Authorization header, as with --header (the task's identity).
            self["url"], self["header"] = url_credentials(self["url"], self["header"])
            check_url(self["url"])
            parse_header_lines(self["header"])
        except DflyError as e:
            raise usage.UsageError(str(e)) from None
        if self["md5"] is not None:
            md5 = self["md5"].lower()
            if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
                raise usage.UsageError("--md5 must be 32 hex digits")
            self["md5"] = md5
        if self["timeout"] is not None:
            self["timeout"] = positive(float, "timeout", self["timeout"])
            if not math.isfinite(self["timeout"]):
                raise usage.UsageError("--timeout must be a finite number of seconds")
        if self["home"] and self["supernode"]:
            raise usage.UsageError("give --home or --supernode, not both")
        if self.get("ca-file"):
            from dfly.tls import TrustStoreError, load_ca_bundle

            self["ca-file"] = os.path.abspath(self["ca-file"])
            try:
                load_ca_bundle(self["ca-file"])
            except TrustStoreError as e:
                raise usage.UsageError(f"--ca-file: {e}") from None
        else:
            self["ca-file"] = None
        self["upload-rate"] = parse_size(self["upload-rate"], "upload-rate")
        self["download-rate"] = parse_size(self["download-rate"], "download-rate")
        if self["home"] and (self["upload-rate"] or self["download-rate"]):
            raise usage.UsageError(
                "--upload-rate/--download-rate apply to an in-process peer; a daemon has its own (--home)"
            )
        if not self["output"]:
            from urllib.parse import unquote, urlsplit

            name = unquote(urlsplit(self["url"]).path).rstrip("/").rsplit("/", 1)[-1]
            if not name or name in (".", ".."):
                raise usage.UsageError("cannot name the output after the URL; give -o PATH")
            self["output"] = name
        self["filters"] = [k for k in self["filter"].split("&") if k]
        # Neither --home nor --supernode: the daemon at the default home if one answers there,
        # else the default supernode.  Rate limits apply to an in-process peer only.
        automatic = not self["home"] and not self["supernode"] and not (self["upload-rate"] or self["download-rate"])
        self["find-daemon"] = data_home("peer") if automatic else None
        size = request_size(self)
        if size > REQUEST_LIMIT:
            # The same words as the peer's refusal, but before anything is sent.
            raise usage.UsageError(f"request too large ({size} bytes of URL and headers, at most {REQUEST_LIMIT})")


# The largest request a peer registers with its supernode (PeerNode.download refuses more):
# it must fit a control frame with room to spare.
REQUEST_LIMIT = MAX_CONTROL - 4096


def request_size(opts: Options) -> int:
    """Bytes of the registration a peer would send for this download (see L{REQUEST_LIMIT})."""
    from dfly.peer.node import DownloadRequest, PeerNode

    request = DownloadRequest(opts["url"], opts["header"], opts["filters"], opts["md5"], opts["identifier"])
    return len(json.dumps(PeerNode._register_msg(request, 0, "", None)))


class Reporter:
    """Progress on a terminal, silence elsewhere."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.start = time.monotonic()
        self.shown = False

    def progress(self, received: int, total: int | None) -> None:
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = received / elapsed / 1e6
        if total:
            frac = min(received / total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"\r[{bar:<30}] {frac * 100:5.1f}% {received / 1e6:8.1f}/{total / 1e6:.1f} MB {rate:7.1f} MB/s"
        else:
            text = f"\r{received / 1e6:8.1f} MB {rate:7.1f} MB/s"
        self.stream.write(text)
        self.stream.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


class Output:
    """The temporary file beside the output path, renamed into place only when verified."""

    def __init__(self, path: str) -> None:
        # Through a symlink to its target, so the link is kept and the file it names replaced.
        self.path = os.path.realpath(path)
        directory = os.path.dirname(self.path)
        if os.path.isdir(self.path):
            raise OSError(f"{path} is a directory")
        if os.path.exists(self.path) and not os.path.isfile(self.path):
            raise OSError(f"{path} is not a regular file (a device, FIFO or socket is never replaced)")
        if not os.path.isdir(directory):
            raise OSError(f"directory {directory} does not exist")
        fd, self.tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".dfly-part", dir=directory)
        os.close(fd)
        self.done = False

    def commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # as any new file would be, not mkstemp's 0600
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        self.done = True

    def discard(self) -> None:
        if not self.done:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


def copy_out(src: str, dst: str, length: int) -> None:
    """Copy the daemon's verified file to C{dst} in the kernel (no bytes through Python).

    The daemon checked the whole file's md5 and keeps the file leased (unchanged, not
    expired) while this connection is open; the copy is checked for its length.
    """
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        left = length
        while left > 0:
            try:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), min(left, 1 << 30))
            except OSError:
                n = os.sendfile(fo.fileno(), fi.fileno(), None, min(left, 1 << 30))
            if n == 0:
                break
            left -= n
        fo.flush()
        if left or os.fstat(fo.fileno()).st_size != length:
            raise IntegrityError(f"{src} is shorter than the {length} bytes the daemon verified")


class EarlyCopy:
    """Copies the verified start of the daemon's file into the output while the rest downloads.

    The daemon reports (path, ready, epoch): the first C{ready} bytes of the file at C{path}
    are held pieces, md5-checked and never written again within that epoch.  They are
    copied in the kernel in steps of C{step} bytes, so that when the download is done only
    the tail is left to copy.  A new epoch or a different file starts the copy over; any
    error turns early copying off (the whole file is then copied at the end, as before).
    Nothing copied here counts until the daemon reports the whole file verified.
    """

    def __init__(self, dst: str, step: int = 64 << 20) -> None:
        self.dst = dst
        self.step = step
        self.copied = 0
        self.broken = False
        self._src: int | None = None
        self._dst: int | None = None
        self._path: str | None = None
        self._epoch: object = None

    def _same(self, path: str, epoch: object) -> bool:
        if self._src is None or path != self._path or epoch != self._epoch:
            return False
        st, fst = os.stat(path), os.fstat(self._src)
        return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

    def _reopen(self, path: str, epoch: object) -> None:
        self.close()
        self._src = os.open(path, os.O_RDONLY)
        self._dst = os.open(self.dst, os.O_WRONLY)
        os.ftruncate(self._dst, 0)
        self._path, self._epoch, self.copied = path, epoch, 0

    def _copy_to(self, end: int) -> None:
        assert self._src is not None and self._dst is not None
        while self.copied < end:
            n = os.copy_file_range(self._src, self._dst, min(end - self.copied, 1 << 30), self.copied, self.copied)
            if n <= 0:
                raise OSError(f"{self._path} ended at {self.copied} bytes")
            self.copied += n

    def advance(self, path: str, ready: int, epoch: object) -> None:
        """The daemon says the first C{ready} bytes of C{path} are final in C{epoch}."""
        if self.broken:
            return
        try:
            if not self._same(path, epoch):
                self._reopen(path, epoch)
            if ready - self.copied >= self.step:
                self._copy_to(ready)
        except OSError:
            self.broken = True
            self.close()

    def finish(self, path: str, length: int, epoch: object) -> bool:
        """Copy the rest of a verified file; False if the whole file must be copied instead."""
        if self.broken or self._src is None:
            return False
        try:
            if not self._same(path, epoch):
                return False
            self._copy_to(length)
            assert self._dst is not None
            return os.fstat(self._dst).st_size == length
        except OSError:
            return False
        finally:
            self.close()

    def close(self) -> None:
        for fd in (self._src, self._dst):
            if fd is not None:
                os.close(fd)
        self._src = self._dst = None


class _ApiClient:
    """Client side of the peer daemon's local API."""

    def __init__(self, wire: Any, sock: str, reporter: Reporter, early: EarlyCopy) -> None:
        self.wire = wire
        self.sock = sock
        self.reporter = reporter
        self.early = early
        self.result: Deferred[dict[str, Any]] = Deferred()

    def connection_made(self) -> None:
        pass

    def control_received(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "progress":
            self.reporter.progress(int(msg.get("received") or 0), msg.get("total"))
            path, ready = msg.get("path"), msg.get("ready")
            if isinstance(path, str) and isinstance(ready, int):
                self.early.advance(path, ready, msg.get("epoch"))
        elif op in ("done", "failed") and not self.result.called:
            self.result.callback(msg)

    def slice_data(self, data: memoryview) -> None:
        raise ProtocolError("no slices expected")

    def slice_finished(self) -> None:
        pass

    def protocol_error(self, error: ProtocolError) -> None:
        pass

    def connection_lost(self, reason: Failure) -> None:
        if not self.result.called:
            # The daemon died or was stopped: as if it could not be reached (back to the origin).
            self.result.errback(NoDaemon(f"lost the peer daemon at {self.sock} before the download finished"))


def _raise_kind(msg: dict[str, Any]) -> None:
    kind, reason = msg.get("kind"), str(msg.get("reason") or "download failed")
    cls = {
        "OriginError": OriginError,
        "NoSupernode": NoSupernode,
        "IntegrityError": IntegrityError,
        "StorageError": StorageError,
        "DownloadTimeout": DownloadTimeout,
    }.get(str(kind), DflyError)
    if cls is OriginError:
        raise OriginError(reason, msg.get("status"))
    raise cls(reason)


def _swarm_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """A peer's stats line for --json: its own time is the swarm part of the command's."""
    out = {k: v for k, v in stats.items() if k != "seconds"}
    out["swarm_seconds"] = stats.get("seconds")
    return out


async def connect_daemon(reactor: Any, home: str, out: Output, reporter: Reporter) -> _ApiClient:
    """Open the local API of the daemon whose home is C{home}; L{NoDaemon} if none answers
    there (no socket, or a stale one that refuses connections)."""
    from dfly.peer.tap import socket_path
    from dfly.wire.protocol import FramedFactory

    sock = socket_path(os.path.abspath(home))
    if not os.path.exists(sock):
        raise NoDaemon(f"no peer daemon listening at {sock}")
    holder: list[_ApiClient] = []

    def make(wire: Any) -> _ApiClient:
        holder.append(_ApiClient(wire, sock, reporter, EarlyCopy(out.tmp)))
        return holder[0]

    try:
        await UNIXClientEndpoint(reactor, sock, timeout=5).connect(FramedFactory(make))
    except (CancelledError, ConnectingCancelledError):
        raise CancelledError() from None
    except Exception as e:
        raise NoDaemon(f"cannot reach the peer daemon at {sock}: {e}") from None
    return holder[0]


async def via_daemon(client: _ApiClient, opts: Options, out: Output) -> dict[str, Any]:
    """Hand the download to the daemon C{client} is connected to and copy out its file."""
    wire, early = client.wire, client.early
    try:
        wire.send_control(
            {
                "op": "download",
                "url": opts["url"],
                "headers": opts["header"],
                "filter": opts["filters"],
                "md5": opts["md5"],
                "identifier": opts["identifier"],
            }
        )
        msg = await client.result
        if msg["op"] == "failed":
            _raise_kind(msg)
        if not early.finish(str(msg["path"]), int(msg["length"]), msg.get("epoch")):
            copy_out(str(msg["path"]), out.tmp, int(msg["length"]))
        out.commit()
        return _swarm_summary({k: v for k, v in msg.items() if k not in ("op", "path", "epoch")})
    finally:
        early.close()
        wire.close()
        client.result.addErrback(lambda _: None)  # a loss after we stopped waiting is no news


async def through_swarm(reactor: Any, opts: Options, out: Output, reporter: Reporter) -> dict[str, Any]:
    """The download by a daemon (--home, or one found at the default home) or by an
    in-process peer; L{NoSupernode} (or L{NoDaemon}) when neither can do it."""
    if opts["home"]:
        return await via_daemon(await connect_daemon(reactor, opts["home"], out, reporter), opts, out)
    if opts["find-daemon"]:
        try:
            client = await connect_daemon(reactor, opts["find-daemon"], out, reporter)
        except NoDaemon:
            pass  # none runs there: the supernode at its default address, through our own peer
        else:
            return await via_daemon(client, opts, out)
    return await in_process(reactor, opts, out, reporter)


async def in_process(reactor: Any, opts: Options, out: Output, reporter: Reporter) -> dict[str, Any]:
    from dfly.peer.node import DownloadRequest, PeerNode, stats_line
    from dfly.wire.protocol import FramedFactory

    home = tempfile.mkdtemp(prefix=".dfly-peer-", dir=os.path.dirname(out.path))
    # Also on Ctrl-C or SIGTERM, when the finally below never runs.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", shutil.rmtree, home, True)
    node = PeerNode(
        reactor, home, opts["supernode"] or [("127.0.0.1", 8002)], link_timeout=5.0,
        upload_rate=opts["upload-rate"], download_rate=opts["download-rate"],
    )
    port = await serverFromString(reactor, "tcp:0").listen(
        FramedFactory(node.upload_session, upload=node.upload_bucket)
    )
    try:
        node.start(port.getHost().port)
        request = DownloadRequest(
            opts["url"], opts["header"], opts["filters"], opts["md5"], opts["identifier"]
        )
        result = await node.download(request, reporter.progress)
        # Same file system as the output: the verified data file becomes the output.
        os.replace(result.path, out.tmp)
        out.commit()
        return _swarm_summary(stats_line(result))
    finally:
        node.stop()
        await port.stopListening()
        shutil.rmtree(home, ignore_errors=True)
        reactor.removeSystemEventTrigger(trigger)


class _FileSink(Protocol):
    """Writes an origin body to a file, hashing it; fails on a stall or a broken body."""

    def __init__(
        self, f: Any, total: int | None, reporter: Reporter, reactor: Any, idle: float, rate: int = 0
    ) -> None:
        self.f, self.total, self.reporter = f, total, reporter
        self.md5 = hashlib.md5()
        self.received = 0
        self.done: Deferred[None] = Deferred(self._cancel)
        self.idle = idle
        self.clock = reactor
        self.timer = reactor.callLater(idle, self._stalled)
        self.error: Exception | None = None
        self.bucket = make_bucket(reactor, rate)
        self.throttle: InboundThrottle | None = None

    def connectionMade(self) -> None:
        if self.bucket is not None:
            self.throttle = InboundThrottle(self.bucket, self.transport, self._paused, self._resumed)

    def _paused(self) -> None:
        # Our own --download-rate is no stall of the origin's.
        if self.timer.active():
            self.timer.cancel()

    def _resumed(self) -> None:
        if self.timer.active():
            self.timer.reset(self.idle)
        else:
            self.timer = self.clock.callLater(self.idle, self._stalled)

    def _stalled(self) -> None:
        self.error = DownloadTimeout(f"origin sent nothing for {self.idle:g} s")
        transport: Any = self.transport
        transport.stopProducing()

    def _cancel(self, _: Deferred[None]) -> None:
        # The caller gave up (a signal, --timeout): stop reading; the file is closed next.
        self.error = CancelledError()
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.error is not None:
            return
        if self.timer.active():
            self.timer.reset(self.idle)
        try:
            self.f.write(data)
        except OSError as e:
            self.error = StorageError(f"cannot write {self.f.name}: {e.strerror or e}")
            transport: Any = self.transport
            transport.stopProducing()
            return
        self.md5.update(data)
        self.received += len(data)
        self.reporter.progress(self.received, self.total)
        if self.throttle is not None:
            self.throttle.received(len(data))

    def connectionLost(self, reason: Failure = _BODY_DONE) -> None:
        if self.throttle is not None:
            self.throttle.close()
        if self.timer.active():
            self.timer.cancel()
        if self.done.called:  # cancelled
            return
        if self.error is not None:
            self.done.errback(self.error)
        elif reason.check(ResponseDone) or (reason.check(PotentialDataLoss) and self.total is None):
            self.done.callback(None)
        else:
            self.done.errback(OriginError("origin connection failed mid-body"))


async def back_source(reactor: Any, opts: Options, out: Output, reporter: Reporter) -> dict[str, Any]:
    """Plain streaming GET from the origin, with the same output rules."""
    from dfly.httpclient import OriginClient

    start = time.monotonic()
    client = OriginClient(reactor, persistent=False, ca_file=opts["ca-file"])
    d = client.request("GET", opts["url"], headers=origin_headers(opts["header"]))
    silent: list[bool] = []

    def give_up() -> None:
        silent.append(True)
        d.cancel()

    timer = reactor.callLater(BACK_SOURCE_IDLE, give_up)
    try:
        response = await d
    except Exception as e:
        if silent:
            raise DownloadTimeout(f"origin sent nothing for {BACK_SOURCE_IDLE:g} s") from None
        if _was_cancelled(e):  # by our caller (a signal, --timeout), not an origin error
            raise CancelledError() from None
        raise OriginError(f"cannot fetch {opts['url']}: {describe_failure(e)}") from None
    finally:
        if timer.active():
            timer.cancel()
    total = None if response.length is UNKNOWN_LENGTH else response.length
    if response.code != 200:
        response.deliverBody(_Discard())
        raise OriginError(f"origin answered {response.code} {response.phrase.decode('latin-1')}", response.code)
    with open(out.tmp, "wb") as f:
        sink = _FileSink(f, total, reporter, reactor, BACK_SOURCE_IDLE, opts["download-rate"])
        response.deliverBody(sink)
        await sink.done
    md5 = sink.md5.hexdigest()
    if total is not None and sink.received != total:
        raise OriginError(f"origin sent {sink.received} bytes, Content-Length said {total}")
    if opts["md5"] and md5 != opts["md5"]:
        raise IntegrityError(f"file md5 {md5} is not the expected {opts['md5']}")
    out.commit()
    return {"length": sink.received, "md5": md5, "origin_seconds": round(time.monotonic() - start, 3), "from_origin": sink.received}


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


def _was_cancelled(error: BaseException) -> bool:
    """Whether a failed request was cancelled (the Agent wraps the CancelledError)."""
    if isinstance(error, (CancelledError, ConnectingCancelledError)):
        return True
    return any(r.check(CancelledError, ConnectingCancelledError) for r in getattr(error, "reasons", None) or ())


def describe_failure(error: BaseException) -> str:
    """A readable line for connection errors, including Twisted's wrapped ones."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(error) or type(error).__name__


async def run(
    reactor: Any, opts: Options, stdout: TextIO, stderr: TextIO, interrupts: Deferred[int] | None = None
) -> int:
    """Download as C{opts} says; the exit status.  When C{interrupts} fires (a signal), the
    download is cancelled, everything it started is cleaned up, and the status is 130."""
    started = time.monotonic()
    reporter = Reporter(stderr, not opts["quiet"])
    try:
        out = Output(opts["output"])
    except OSError as e:
        stderr.write(f"dfget: cannot write {opts['output']}: {e}\n")
        return EXIT_OUTPUT
    # If the reactor is stopped before this coroutine finishes: drop the temp file then.
    reactor.addSystemEventTrigger("before", "shutdown", out.discard)
    stopping: list[str] = []  # why the download is being cancelled: "interrupted", "timeout"

    async def attempt() -> dict[str, Any]:
        try:
            return await through_swarm(reactor, opts, out, reporter)
        except NoSupernode as e:
            if opts["no-back-source"] or stopping:
                raise
            reporter.end()
            stderr.write(f"dfget: {e}; downloading straight from the origin\n")
            return {**await back_source(reactor, opts, out, reporter), "fallback": describe(e)}

    d = ensureDeferred(attempt())

    def stop(why: str) -> None:
        if not stopping and not d.called:
            stopping.append(why)
            d.cancel()

    timer = reactor.callLater(opts["timeout"], stop, "timeout") if opts["timeout"] else None
    if interrupts is not None:
        interrupts.addCallback(lambda _: stop("interrupted"))
    try:
        summary = await d
    except Exception as e:  # every failure becomes one line and an exit code
        out.discard()
        reporter.end()
        if stopping == ["interrupted"]:
            stderr.write("dfget: interrupted\n")
            return EXIT_INTERRUPTED
        error: Exception = e
        if stopping == ["timeout"]:
            error = DownloadTimeout(f"timed out after {opts['timeout']:g} s")
        stderr.write(f"dfget: {describe(error)}\n")
        return exit_code(error)
    finally:
        if timer is not None and timer.active():
            timer.cancel()
    reporter.end()
    summary["seconds"] = round(time.monotonic() - started, 3)  # the whole command
    if opts["json"]:
        stdout.write(json.dumps({"output": out.path, **summary}) + "\n")
    elif stderr.isatty() and not opts["quiet"]:
        stderr.write(f"dfget: saved {out.path} ({summary.get('length')} bytes, md5 {summary.get('md5')})\n")
    return EXIT_OK


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.replace("\n", " ")


def exit_code(error: BaseException) -> int:
    if isinstance(error, OSError):
        return EXIT_OUTPUT
    for cls in type(error).__mro__:  # NoDaemon is a NoSupernode
        if cls.__name__ in _KIND_EXIT:
            return _KIND_EXIT[cls.__name__]
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> None:
    opts = Options()
    try:
        opts.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"dfget: {e} (see dfget --help)\n")
        raise SystemExit(EXIT_USAGE) from None
    if opts["version"]:
        print(f"dfget {__version__}")
        raise SystemExit(0)
    from twisted.internet import task

    codes: list[int] = []

    async def go(reactor: Any) -> None:
        interrupts: Deferred[int] = Deferred()

        def stop_now() -> None:
            try:
                reactor.stop()  # the shutdown triggers still drop the temporary files
            except ReactorNotRunning:
                pass

        def interrupted(signum: int) -> None:
            if interrupts.called:
                stop_now()  # a second signal
                return
            interrupts.callback(signum)
            # The cancelled download cleans up at once; should it not, stop anyway.
            reactor.callLater(INTERRUPT_GRACE, stop_now)

        def install() -> None:
            # A signal cancels the download, which then cleans up and exits 130.
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, lambda n, _frame: reactor.callFromThread(interrupted, n))

        install()
        # Again once the reactor runs: it installs handlers of its own (that would stop it
        # with the download still running) for SIGINT and SIGTERM as it starts.
        reactor.callWhenRunning(install)
        codes.append(await run(reactor, opts, sys.stdout, sys.stderr, interrupts))

    try:
        task.react(lambda reactor: ensureDeferred(go(reactor)))
    except SystemExit:
        pass
    if not codes:
        # The reactor stopped before dfget finished: a second signal, or a cancelled download
        # that did not end within INTERRUPT_GRACE.  The shutdown triggers removed the temporary
        # files; exit without finalizing the unfinished coroutines, which would only print noise.
        sys.stderr.write("dfget: interrupted\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    raise SystemExit(codes[0])


if __name__ == "__main__":
    main()
