"""dfget's command line, its output file and the hand-over to a peer daemon.

Everything here works without a reactor, so that the common case -- a peer daemon
runs on this host and does the download -- never loads Twisted: dfget connects to
the daemon's local API (a Unix socket speaking the framed protocol of
L{dfly.wire.framing}), asks for the URL, copies the verified start of the
daemon's file while the rest arrives (L{EarlyCopy}) and the tail at the end, and
renames its temporary file into place (L{Output}).  That costs a few tens of
milliseconds of start-up instead of the reactor's and the HTTP client's imports,
which matters when a host's job runs dfget many times.  Whenever the daemon
cannot do it (none answers, it goes away midway), L{dfly.dfget} takes over with
the reactor: an in-process peer, or the origin.

Signals: SIGINT, SIGTERM and SIGHUP cancel the download (the daemon is told by
the closed connection), remove the temporary file and exit 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
from typing import Any, NoReturn, TextIO

from dfly import __version__
from dfly.config import data_home, parse_hostport, parse_size, positive, socket_path, usage_error
from dfly.errors import (
    DflyError,
    DownloadTimeout,
    IntegrityError,
    NoDaemon,
    NoSupernode,
    OriginError,
    StorageError,
)
from dfly.urls import check_url, parse_header_lines, url_credentials
from dfly.wire.framing import MAX_CONTROL, FrameParser, encode_control

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
        raise usage_error(message)


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
    """dfget's parsed command line; C{parseOptions} raises C{twisted.python.usage.UsageError}."""

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
            raise usage_error("a URL is required")
        try:
            # user:password@ becomes an Authorization header, as with --header (the task's identity).
            self["url"], self["header"] = url_credentials(self["url"].split("#", 1)[0], self["header"])
            check_url(self["url"])
            parse_header_lines(self["header"])
        except DflyError as e:
            raise usage_error(str(e)) from None
        if self["md5"] is not None:
            md5 = self["md5"].lower()
            if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
                raise usage_error("--md5 must be 32 hex digits")
            self["md5"] = md5
        if self["timeout"] is not None:
            self["timeout"] = positive(float, "timeout", self["timeout"])
            if not math.isfinite(self["timeout"]):
                raise usage_error("--timeout must be a finite number of seconds")
        if self["home"] and self["supernode"]:
            raise usage_error("give --home or --supernode, not both")
        if self.get("ca-file"):
            from dfly.tls import TrustStoreError, load_ca_bundle

            self["ca-file"] = os.path.abspath(self["ca-file"])
            try:
                load_ca_bundle(self["ca-file"])
            except TrustStoreError as e:
                raise usage_error(f"--ca-file: {e}") from None
        else:
            self["ca-file"] = None
        self["upload-rate"] = parse_size(self["upload-rate"], "upload-rate")
        self["download-rate"] = parse_size(self["download-rate"], "download-rate")
        if self["home"] and (self["upload-rate"] or self["download-rate"]):
            raise usage_error(
                "--upload-rate/--download-rate apply to an in-process peer; a daemon has its own (--home)"
            )
        output = self["output"]
        if not output or output.endswith(os.sep) or os.path.isdir(output):
            # No -o, or a directory: the file is named after the URL's last path segment.
            from urllib.parse import unquote, urlsplit

            name = unquote(urlsplit(self["url"]).path).rstrip("/").rsplit("/", 1)[-1]
            if not name or name in (".", ".."):
                raise usage_error("cannot name the output after the URL; give -o PATH")
            self["output"] = os.path.join(output, name) if output else name
        self["filters"] = [k for k in self["filter"].split("&") if k]
        # Neither --home nor --supernode: the daemon at the default home if one answers there,
        # else the default supernode.  Rate limits apply to an in-process peer only.
        automatic = not self["home"] and not self["supernode"] and not (self["upload-rate"] or self["download-rate"])
        self["find-daemon"] = data_home("peer") if automatic else None
        size = request_size(self) if _may_be_too_large(self) else 0
        if size > REQUEST_LIMIT:
            # The same words as the peer's refusal, but before anything is sent.
            raise usage_error(f"request too large ({size} bytes of URL and headers, at most {REQUEST_LIMIT})")


# The largest request a peer registers with its supernode (PeerNode.download refuses more):
# it must fit a control frame with room to spare.
REQUEST_LIMIT = MAX_CONTROL - 4096


def request_size(opts: Options) -> int:
    """Bytes of the registration a peer would send for this download (see L{REQUEST_LIMIT})."""
    from dfly.peer.node import DownloadRequest, PeerNode

    request = DownloadRequest(opts["url"], opts["header"], opts["filters"], opts["md5"], opts["identifier"])
    return len(json.dumps(PeerNode._register_msg(request, 0, "", None)))


def _may_be_too_large(opts: Options) -> bool:
    """Whether the request could come near L{REQUEST_LIMIT}: only then is it measured exactly
    (that needs the peer's code, which a request handed to a daemon need not load)."""
    text = [opts["url"], *opts["header"], *opts["filters"], opts["md5"] or "", opts["identifier"] or ""]
    return sum(len(t) for t in text) * 6 + 4096 > REQUEST_LIMIT  # JSON escapes a character as 6 at most


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

    def __init__(self, dst: str, step: int = 8 << 20) -> None:
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


def raise_kind(msg: dict[str, Any]) -> None:
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


def swarm_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """A peer's stats line for --json: its own time is the swarm part of the command's."""
    out = {k: v for k, v in stats.items() if k != "seconds"}
    out["swarm_seconds"] = stats.get("seconds")
    return out


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


# -- the hand-over to a daemon, without a reactor ------------------------------------------


class _Interrupted(Exception):
    """A signal arrived (SIGINT, SIGTERM or SIGHUP)."""


class ApiFrames:
    """What dfget makes of the daemon's local API frames: progress (and early copies), then
    one result (L{answered}); shared by the blocking client here and L{dfly.dfget}'s."""

    def __init__(self, reporter: Reporter, early: EarlyCopy) -> None:
        self.reporter = reporter
        self.early = early

    def control_received(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "progress":
            self.reporter.progress(int(msg.get("received") or 0), msg.get("total"))
            path, ready = msg.get("path"), msg.get("ready")
            if isinstance(path, str) and isinstance(ready, int):
                self.early.advance(path, ready, msg.get("epoch"))
        elif op in ("done", "failed"):
            self.answered(msg)

    def answered(self, msg: dict[str, Any]) -> None:
        raise NotImplementedError


class _ApiReader(ApiFrames):
    """The blocking client's frames: the result is kept for the read loop."""

    def __init__(self, reporter: Reporter, early: EarlyCopy) -> None:
        super().__init__(reporter, early)
        self.result: dict[str, Any] | None = None
        self.parser = FrameParser(self)

    def answered(self, msg: dict[str, Any]) -> None:
        if self.result is None:
            self.result = msg

    def slice_data(self, data: memoryview) -> None:
        raise DflyError("the peer daemon sent a slice to dfget")

    def slice_finished(self) -> None:
        pass


def download_request(opts: Options) -> dict[str, Any]:
    """The local API's download request for C{opts}."""
    return {
        "op": "download",
        "url": opts["url"],
        "headers": opts["header"],
        "filter": opts["filters"],
        "md5": opts["md5"],
        "identifier": opts["identifier"],
    }


def daemon_socket(home: str) -> str | None:
    """The local API socket of a daemon that answers at C{home}, or None."""
    sock = socket_path(os.path.abspath(home))
    return sock if os.path.exists(sock) else None


def via_daemon_blocking(
    sock_path: str, opts: Options, out: Output, reporter: Reporter, deadline: float | None
) -> dict[str, Any]:
    """Hand the download to the daemon listening at C{sock_path} and copy out its file.

    Raises L{NoDaemon} when the daemon cannot be reached or goes away before the result,
    L{DownloadTimeout} past C{deadline}, and the errors the daemon reports.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early = EarlyCopy(out.tmp)
    reader = _ApiReader(reporter, early)
    try:
        sock.settimeout(5.0)
        try:
            sock.connect(sock_path)
        except OSError as e:
            raise NoDaemon(f"cannot reach the peer daemon at {sock_path}: {e.strerror or e}") from None
        sock.sendall(encode_control(download_request(opts)))
        while reader.result is None:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DownloadTimeout(f"timed out after {opts['timeout']:g} s")
                sock.settimeout(left)
            else:
                sock.settimeout(None)
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as e:
                raise NoDaemon(f"lost the peer daemon at {sock_path}: {e.strerror or e}") from None
            if not data:
                raise NoDaemon(f"lost the peer daemon at {sock_path} before the download finished")
            reader.parser.feed(data)
        msg = reader.result
        if msg["op"] == "failed":
            raise_kind(msg)
        if not early.finish(str(msg["path"]), int(msg["length"]), msg.get("epoch")):
            copy_out(str(msg["path"]), out.tmp, int(msg["length"]))
        out.commit()  # while the connection keeps the daemon's file leased
        return swarm_summary({k: v for k, v in msg.items() if k not in ("op", "path", "epoch")})
    finally:
        early.close()
        sock.close()


def run_without_reactor(opts: Options, stdout: TextIO, stderr: TextIO) -> int | None:
    """Download through the daemon C{opts} names (or the one at the default home): the exit
    status, or None when no daemon can do it and the reactor's path must take over."""
    home = opts["home"] or opts["find-daemon"]
    sock_path = daemon_socket(home) if home else None
    if sock_path is None:
        return None
    started = time.monotonic()
    deadline = started + opts["timeout"] if opts["timeout"] else None
    reporter = Reporter(stderr, not opts["quiet"])
    try:
        out = Output(opts["output"])
    except OSError as e:
        stderr.write(f"dfget: cannot write {opts['output']}: {e}\n")
        return EXIT_OUTPUT

    def interrupted(signum: int, frame: Any) -> None:
        raise _Interrupted()

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            summary = via_daemon_blocking(sock_path, opts, out, reporter, deadline)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    except _Interrupted:
        out.discard()
        reporter.end()
        stderr.write("dfget: interrupted\n")
        return EXIT_INTERRUPTED
    except NoDaemon:
        out.discard()
        reporter.end()
        return None  # the reactor's path: the supernode through a peer of our own, or the origin
    except Exception as e:  # every failure becomes one line and an exit code
        out.discard()
        reporter.end()
        stderr.write(f"dfget: {describe(e)}\n")
        return exit_code(e)
    return report_success(opts, out, reporter, summary, started, stdout, stderr)


def report_success(
    opts: Options, out: Output, reporter: Reporter, summary: dict[str, Any], started: float,
    stdout: TextIO, stderr: TextIO,
) -> int:
    """A finished download's last words: the --json line, or a note on a terminal."""
    reporter.end()
    summary["seconds"] = round(time.monotonic() - started, 3)  # the whole command
    if opts["json"]:
        stdout.write(json.dumps({"output": out.path, **summary}) + "\n")
    elif stderr.isatty() and not opts["quiet"]:
        stderr.write(f"dfget: saved {out.path} ({summary.get('length')} bytes, md5 {summary.get('md5')})\n")
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """The C{dfget} command."""
    opts = Options()
    try:
        opts.parseOptions(sys.argv[1:] if argv is None else argv)
    except Exception as e:
        if type(e).__name__ != "UsageError":
            raise
        sys.stderr.write(f"dfget: {e} (see dfget --help)\n")
        raise SystemExit(EXIT_USAGE) from None
    if opts["version"]:
        print(f"dfget {__version__}")
        raise SystemExit(0)
    code = run_without_reactor(opts, sys.stdout, sys.stderr)
    if code is None:
        from dfly.dfget import run_with_reactor

        code = run_with_reactor(opts)
    sys.stdout.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
