"""dfget: download a URL through the dfly swarm, like wget.

The output appears at its path only complete and verified: bytes go to a
temporary file beside it, which is renamed into place after the md5 check;
on any failure the temporary file is removed and the exit status says why.

This is the part that runs a reactor: an in-process peer (C{--supernode}),
the download straight from the origin, and the daemon's local API when the
reactor is running anyway.  The command line and the common hand-over to a
running daemon, which need no reactor, are in L{dfly.dfget_cli}.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, TextIO

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
from twisted.internet.error import ConnectingCancelledError, ReactorNotRunning
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

# The command line, the output file and the exit codes (no reactor needed there); this
# module uses them and keeps their names for whoever imports them from here.
from dfly.dfget_cli import (  # noqa: F401
    EPILOG,
    EXIT_FAILED,
    EXIT_INTEGRITY,
    EXIT_INTERRUPTED,
    EXIT_NO_SUPERNODE,
    EXIT_OK,
    EXIT_ORIGIN,
    EXIT_OUTPUT,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    INTERRUPT_GRACE,
    REQUEST_LIMIT,
    ApiFrames,
    EarlyCopy,
    Options,
    Output,
    Reporter,
    copy_out,
    describe,
    download_request,
    exit_code,
    main,
    raise_kind,
    report_success,
    request_size,
    swarm_summary,
)
from dfly.errors import (
    DownloadTimeout,
    IntegrityError,
    NoDaemon,
    NoSupernode,
    OriginError,
    ProtocolError,
    StorageError,
)
from dfly.ratelimit import InboundThrottle, make_bucket
from dfly.urls import origin_headers

BACK_SOURCE_IDLE = 60.0
_BODY_DONE = Failure(ResponseDone())

class _ApiClient(ApiFrames):
    """Client side of the peer daemon's local API."""

    def __init__(self, wire: Any, sock: str, reporter: Reporter, early: EarlyCopy) -> None:
        super().__init__(reporter, early)
        self.wire = wire
        self.sock = sock
        self.result: Deferred[dict[str, Any]] = Deferred()

    def connection_made(self) -> None:
        pass

    def answered(self, msg: dict[str, Any]) -> None:
        if not self.result.called:
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


async def connect_daemon(reactor: Any, home: str, out: Output, reporter: Reporter) -> _ApiClient:
    """Open the local API of the daemon whose home is C{home}; L{NoDaemon} if none answers
    there (no socket, or a stale one that refuses connections)."""
    from dfly.config import socket_path
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
        wire.send_control(download_request(opts))
        msg = await client.result
        if msg["op"] == "failed":
            raise_kind(msg)
        if not early.finish(str(msg["path"]), int(msg["length"]), msg.get("epoch")):
            copy_out(str(msg["path"]), out.tmp, int(msg["length"]))
        out.commit()
        return swarm_summary({k: v for k, v in msg.items() if k not in ("op", "path", "epoch")})
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
        return swarm_summary(stats_line(result))
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
    return report_success(opts, out, reporter, summary, started, stdout, stderr)


def run_with_reactor(opts: Options) -> int:
    """Run the download of C{opts} in a reactor; the exit status."""
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
    return codes[0]


if __name__ == "__main__":
    main()
