"""The CDN: fetch a task's file from its origin once and cut it into slices.

Design: the origin body is streamed (treq, unbuffered) straight into the
cache file, where slice n occupies [n*P, n*P + dataLen + 5).  Each full piece
is finished the moment its last data byte arrives: header and tail are
written, its md5 (taken as the bytes pass, with the header of a full piece
fed first) is recorded and C{on_piece} fires, so peers can fetch it while the
rest of the file is still on its way.  Only the last piece can be short; its
header is known at end of body, so its md5 is taken by reading that one slice
back.  The md5 of the raw file is taken off the reactor thread: as each piece
is finished its data is read back (from the page cache) and hashed by a worker
thread, one piece after the other in file order; the task is finished only once
the last piece is in that md5.

A body shorter or longer than Content-Length, a reset, a stall longer than
C{idle_timeout}, a full disk or an HTTP status other than 200 fails the task:
the cache file is removed and C{on_fail} fires, so nothing half-written is
ever served.

With an origin rate limit (one bucket for all fetches) the body transport is
paused while the bucket is in debt; the stall timer stops meanwhile, since the
wait is ours and not the origin's.

Persistence: C{<id>.meta} is written when the headers arrive (unfinished) and
again at the end (finished, with every piece md5).  After a restart finished
tasks are served from the cache once revalidated against the origin (ETag /
Last-Modified); an unfinished one is resumed: its slices are checked from the
start (header, tail, length), and the fetch continues with a Range request
from the first bad piece when the origin still has the same version, or starts
over otherwise.  A task's I{generation} names the version of the content: it
is derived from the validators when there are any, so two supernodes (or one
after a restart) agree on it, and peers keep pieces only of their generation.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from dfly.errors import DownloadTimeout, IntegrityError, OriginError, StorageError
from dfly.pieces import OVERHEAD, TAIL, SliceHeader, default_piece_size, pwrite_all
from dfly.ratelimit import InboundThrottle, TokenBucket
from dfly.urls import redact_url
from dfly.wire.protocol import GrowingRange

_RESPONSE_DONE = Failure(ResponseDone())


@dataclass
class CdnTask:
    """One file being (or having been) fetched from its origin."""

    task_id: str
    url: str
    task_url: str
    headers: dict[bytes, list[bytes]]
    expected_md5: str | None = None
    expected_sha256: str | None = None  # "sha256:<hex>" for content named by its digest
    state: str = "waiting"  # waiting -> running -> done | failed; "partial" after a restart
    length: int | None = None
    piece_size: int | None = None
    piece_md5: dict[int, str] = field(default_factory=dict)
    piece_len: dict[int, int] = field(default_factory=dict)
    piece_count: int | None = None
    file_md5: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    generation: str | None = None
    validated_at: float = float("-inf")  # when the origin last confirmed this version (never: -inf)
    source_bytes: int = 0
    served_bytes: int = 0
    streamed: int = 0  # slices the supernode began to serve before they were whole
    relayed: int = 0  # assignments from a source still receiving the piece
    error: str | None = None
    error_kind: str | None = None
    status: int | None = None
    path: str = ""
    fd: int | None = None
    created: float = 0.0
    last_access: float = 0.0
    # The piece the origin fetch is writing now and its data bytes so far; the pieces being
    # written that peers read as they arrive (relay gets), and the peers that were assigned a
    # piece before its md5 was known (they are sent it once the piece is whole).
    receiving: int | None = None
    received: int = 0
    streams: dict[int, GrowingRange] = field(default_factory=dict)
    md5_waiters: dict[int, set[str]] = field(default_factory=dict)

    def cache_bytes(self) -> int:
        """Bytes of cache this task occupies."""
        return sum(self.piece_len.values()) + OVERHEAD * len(self.piece_len)

    def close(self) -> None:
        self.stop_streams()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def stop_streams(self) -> None:
        """Cut off every reader of a piece still being written (before its bytes go)."""
        streams, self.streams = self.streams, {}
        self.receiving, self.received = None, 0
        for stream in streams.values():
            stream.fail()

    def reset_pieces(self) -> None:
        self.stop_streams()
        self.md5_waiters.clear()
        self.piece_md5.clear()
        self.piece_len.clear()
        self.piece_count = None
        self.file_md5 = None


@dataclass
class _Resume:
    """What a scan of an unfinished cache file found intact."""

    pieces: int
    md5: Any
    sha256: Any
    piece_md5: dict[int, str]


def generation_for(length: int | None, etag: str | None, last_modified: str | None, piece_size: int) -> str:
    """The content version: stable for the same validators, unique when there are none."""
    if not etag and not last_modified:
        return uuid.uuid4().hex[:16]
    key = f"{length}|{etag}|{last_modified}|{piece_size}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Cdn:
    """Runs origin fetches and owns the slice cache under C{home}."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        http: Any,
        home: str,
        on_headers: Callable[[CdnTask], None],
        on_piece: Callable[[CdnTask, int], None],
        on_done: Callable[[CdnTask], None],
        on_fail: Callable[[CdnTask], None],
        piece_size: int | None = None,
        on_started: Callable[[CdnTask, int], None] | None = None,
        idle_timeout: float = 60.0,
        origin_bucket: TokenBucket | None = None,
        hasher: Callable[[int, int, int, Any], Deferred[None]] | None = None,
    ) -> None:
        self._reactor = reactor
        self.origin_bucket = origin_bucket
        self.hash_range = hasher or self._default_hasher
        self._http = http
        self._home = home
        self._on_headers = on_headers
        self._on_piece = on_piece
        self._on_started = on_started
        self._on_done = on_done
        self._on_fail = on_fail
        self._piece_size = piece_size
        self._idle_timeout = idle_timeout

    def _default_hasher(self, fd: int, offset: int, length: int, md5: Any) -> Deferred[None]:
        """In a worker thread when the reactor has threads (md5 releases the GIL), else at once."""
        pool = getattr(self._reactor, "getThreadPool", None)
        if pool is None:
            return maybeDeferred(hash_fd_range, fd, offset, length, md5)
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, pool(), hash_fd_range, fd, offset, length, md5)  # type: ignore[arg-type]

    def cache_path(self, task_id: str) -> str:
        return os.path.join(self._home, "cdn", task_id[:3], task_id)

    # -- fetching --------------------------------------------------------------
    def start(self, task: CdnTask) -> None:
        """Fetch C{task} from its origin, resuming an unfinished cache file if it is intact."""
        resume = None
        if task.state == "partial":
            resume = self._scan(task)
            if resume is not None:
                # Only what the scan found intact may be served until the rest is fetched.
                assert task.piece_size is not None
                task.piece_md5 = dict(resume.piece_md5)
                task.piece_len = {n: task.piece_size - OVERHEAD for n in range(resume.pieces)}
            else:
                task.reset_pieces()
        task.state = "running"
        task.error = task.error_kind = None
        task.status = None
        task.path = self.cache_path(task.task_id)
        task.close()
        try:
            os.makedirs(os.path.dirname(task.path), exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | (0 if resume else os.O_TRUNC)
            task.fd = os.open(task.path, flags, 0o644)
        except OSError as e:
            self._failed(Failure(StorageError(f"cannot create the cache file: {e.strerror or e}")), task)
            return
        headers = {k: list(v) for k, v in task.headers.items()}
        if resume is not None and resume.pieces:
            assert task.piece_size is not None
            start = resume.pieces * (task.piece_size - OVERHEAD)
            headers[b"Range"] = [f"bytes={start}-".encode()]
            validator = task.etag or task.last_modified
            if validator:
                headers[b"If-Range"] = [validator.encode("latin-1")]
            self._log.info(
                "resuming {url} for task {task_id} at piece {piece}",
                url=redact_url(task.url), task_id=task.task_id, piece=resume.pieces,
            )
        else:
            resume = None
            self._log.info("fetching {url} for task {task_id}", url=redact_url(task.url), task_id=task.task_id)
        d = maybeDeferred(self._http.request, "GET", task.url, headers=headers, unbuffered=True)
        silent: list[bool] = []

        def give_up() -> None:
            silent.append(True)
            d.cancel()

        timer = self._reactor.callLater(self._idle_timeout, give_up)
        d.addBoth(self._cancel_timer, timer)
        d.addErrback(self._no_answer, task, silent)
        d.addCallback(self._got_response, task, resume)
        d.addErrback(self._failed, task)

    @staticmethod
    def _cancel_timer(result: Any, timer: IDelayedCall) -> Any:
        if timer.active():
            timer.cancel()
        return result

    def _no_answer(self, reason: Failure, task: CdnTask, silent: list[bool]) -> Failure:
        """The request failed because our timer cancelled it (the Agent reports that as
        C{ResponseNeverReceived} around the C{CancelledError}): say so."""
        if silent:
            return Failure(DownloadTimeout(
                f"origin {redact_url(task.url)} did not answer within {self._idle_timeout:g} s"
                " (the supernode's --origin-timeout)"
            ))
        return reason

    def _got_response(self, response: Any, task: CdnTask, resume: _Resume | None) -> Any:
        if resume is not None and response.code == 206:
            first = _content_range_start(response.headers)
            assert task.piece_size is not None
            if first == resume.pieces * (task.piece_size - OVERHEAD):
                task.piece_md5 = dict(resume.piece_md5)
                task.piece_len = {n: task.piece_size - OVERHEAD for n in range(resume.pieces)}
                slicer = Slicer(self, task, self._reactor, self._idle_timeout, resume)
                for n in range(resume.pieces):
                    self.piece_ready(task, n)
                response.deliverBody(slicer)
                return slicer.finished
            response.deliverBody(_Discard())
            raise OriginError(f"origin answered a range from byte {first} instead of the one asked for")
        if response.code != 200:
            phrase = response.phrase.decode("latin-1", "replace") if response.phrase else ""
            response.deliverBody(_Discard())
            raise OriginError(f"origin answered {response.code} {phrase}".strip(), response.code)
        if resume is not None:
            self._log.info("origin has a new version of {url}; starting over", url=redact_url(task.url))
            assert task.fd is not None
            os.ftruncate(task.fd, 0)
        task.reset_pieces()
        length = None if response.length is UNKNOWN_LENGTH else int(response.length)
        task.length = length
        task.etag = _header(response.headers, b"etag")
        task.last_modified = _header(response.headers, b"last-modified")
        task.piece_size = self._piece_size or default_piece_size(length)
        task.generation = generation_for(length, task.etag, task.last_modified, task.piece_size)
        task.validated_at = self._reactor.seconds()
        self.write_meta(task, finished=False)
        self._on_headers(task)
        slicer = Slicer(self, task, self._reactor, self._idle_timeout)
        response.deliverBody(slicer)
        return slicer.finished

    def _failed(self, reason: Failure, task: CdnTask) -> None:
        err: Any = reason.value
        if reason.check(OriginError):
            task.error, task.status = str(err), err.status
        elif reason.check(IntegrityError, StorageError, DownloadTimeout):
            task.error = str(err)
        else:
            task.error = f"cannot fetch {redact_url(task.url)}: {_describe(reason)}"
        kinds = (IntegrityError, StorageError, DownloadTimeout)
        task.error_kind = type(err).__name__ if reason.check(*kinds) else "OriginError"
        self._log.warn("task {task_id} failed: {error}", task_id=task.task_id, error=task.error)
        task.state = "failed"
        self.discard(task)
        self._on_fail(task)

    def discard(self, task: CdnTask) -> None:
        """Close and delete a task's cache file and metadata."""
        task.close()
        for suffix in ("", ".meta", ".meta.tmp"):
            try:
                os.unlink(self.cache_path(task.task_id) + suffix)
            except OSError:
                pass

    def piece_intact(self, task: CdnTask, piece: int) -> bool:
        """Whether the cached slice of C{piece} still has its recorded md5."""
        if task.fd is None or task.piece_size is None or piece not in task.piece_len:
            return False
        data = os.pread(task.fd, task.piece_len[piece] + OVERHEAD, piece * task.piece_size)
        return hashlib.md5(data).hexdigest() == task.piece_md5.get(piece)

    def piece_ready(self, task: CdnTask, piece: int) -> None:
        self._on_piece(task, piece)

    def piece_started(self, task: CdnTask, piece: int) -> None:
        """The first bytes of C{piece} are written and the file's length is known."""
        if self._on_started is not None:
            self._on_started(task, piece)

    def finished(self, task: CdnTask, raw_md5: str, raw_sha256: str | None = None) -> None:
        task.file_md5 = raw_md5
        if task.expected_md5 and task.expected_md5 != raw_md5:
            raise IntegrityError(f"file md5 {raw_md5} is not the expected {task.expected_md5}")
        if task.expected_sha256 and task.expected_sha256 != f"sha256:{raw_sha256}":
            raise IntegrityError(f"the origin's content has sha256:{raw_sha256}, not the digest {task.expected_sha256}")
        task.state = "done"
        self.write_meta(task, finished=True)
        self._log.info(
            "task {task_id} cached: {length} bytes in {count} pieces, md5 {md5}",
            task_id=task.task_id,
            length=task.length,
            count=task.piece_count,
            md5=raw_md5,
        )
        self._on_done(task)

    # -- persistence -----------------------------------------------------------
    def write_meta(self, task: CdnTask, finished: bool) -> None:
        """Atomically write the task's metadata (raises L{StorageError})."""
        meta: dict[str, Any] = {
            "task_id": task.task_id,
            "url": task.url,
            "task_url": task.task_url,
            "expected_md5": task.expected_md5,
            "expected_sha256": task.expected_sha256,
            "length": task.length,
            "piece_size": task.piece_size,
            "etag": task.etag,
            "last_modified": task.last_modified,
            "generation": task.generation,
            "finished": finished,
        }
        if finished:
            meta["piece_count"] = task.piece_count
            meta["piece_md5"] = [task.piece_md5[n] for n in range(task.piece_count or 0)]
            meta["piece_len"] = [task.piece_len[n] for n in range(task.piece_count or 0)]
            meta["file_md5"] = task.file_md5
        path = self.cache_path(task.task_id) + ".meta"
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(meta, f)
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StorageError(f"cannot write the cache metadata: {e.strerror or e}") from None

    def load_cached(self) -> list[CdnTask]:
        """Tasks found under C{home}: finished ones ready to serve, unfinished ones to resume."""
        tasks = []
        for meta_path in sorted(glob.glob(os.path.join(self._home, "cdn", "*", "*.meta"))):
            try:
                task = self._load(meta_path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                self._log.warn("dropping unreadable cache entry {path}: {error}", path=meta_path, error=str(e))
                task = None
            if task is None:
                base = meta_path[: -len(".meta")]
                for p in (base, meta_path):
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
                continue
            tasks.append(task)
        return tasks

    def _load(self, meta_path: str) -> CdnTask | None:
        with open(meta_path) as f:
            meta = json.load(f)
        task_id = str(meta["task_id"])
        if self.cache_path(task_id) + ".meta" != meta_path or not meta.get("piece_size"):
            return None
        task = CdnTask(task_id, str(meta["url"]), str(meta["task_url"]), {}, expected_md5=meta.get("expected_md5"))
        task.expected_sha256 = meta.get("expected_sha256")
        task.length = meta.get("length")
        task.piece_size = int(meta["piece_size"])
        task.etag = meta.get("etag")
        task.last_modified = meta.get("last_modified")
        task.generation = meta.get("generation")
        task.path = self.cache_path(task_id)
        if not os.path.exists(task.path):
            return None
        if not meta.get("finished"):
            task.state = "partial"
            return task
        count = int(meta["piece_count"])
        task.piece_count = count
        task.piece_md5 = {n: str(m) for n, m in enumerate(meta["piece_md5"])}
        task.piece_len = {n: int(v) for n, v in enumerate(meta["piece_len"])}
        task.file_md5 = str(meta["file_md5"])
        expected = (count - 1) * task.piece_size + task.piece_len[count - 1] + OVERHEAD
        if len(task.piece_md5) != count or os.path.getsize(task.path) != expected:
            return None
        task.fd = os.open(task.path, os.O_RDWR)
        task.state = "done"
        return task

    def _scan(self, task: CdnTask) -> _Resume | None:
        """Check an unfinished cache file from the start; the intact full pieces can stay."""
        if task.piece_size is None or task.length is None:
            return None
        cap = task.piece_size - OVERHEAD
        header = SliceHeader(cap, task.piece_size).encode()
        md5 = hashlib.md5()
        sha256 = hashlib.sha256()
        piece_md5: dict[int, str] = {}
        try:
            with open(self.cache_path(task.task_id), "rb") as f:
                n = 0
                while (n + 1) * cap < task.length:  # full pieces that are not the last one
                    f.seek(n * task.piece_size)
                    raw = f.read(cap + OVERHEAD)
                    if len(raw) < cap + OVERHEAD or raw[:4] != header or raw[4 + cap : 5 + cap] != TAIL:
                        break
                    digest = hashlib.md5(raw[: cap + OVERHEAD]).hexdigest()
                    if task.piece_md5.get(n, digest) != digest:
                        break  # damaged: a finished task knows each piece's md5
                    piece_md5[n] = digest
                    md5.update(raw[4 : 4 + cap])
                    sha256.update(raw[4 : 4 + cap])
                    n += 1
        except OSError:
            return None
        return _Resume(n, md5, sha256, piece_md5)

    def revalidate(self, task: CdnTask, headers: dict[bytes, list[bytes]]) -> Deferred[bool]:
        """Ask the origin whether the cached version is current: True (304) or False (changed).

        Without validators there is nothing to ask, so the answer is False.  When the origin
        cannot be reached the cached copy is kept (True), as HTTP caches do.
        """
        if not task.etag and not task.last_modified:
            return _succeed(False)
        headers = {k: list(v) for k, v in headers.items()}
        if task.etag:
            headers[b"If-None-Match"] = [task.etag.encode("latin-1")]
        if task.last_modified:
            headers[b"If-Modified-Since"] = [task.last_modified.encode("latin-1")]
        d = maybeDeferred(self._http.request, "GET", task.url, headers=headers, unbuffered=True)
        timer = self._reactor.callLater(self._idle_timeout, d.cancel)
        d.addBoth(self._cancel_timer, timer)

        def answered(response: Any) -> bool:
            response.deliverBody(_Discard())
            if response.code == 304:
                return True
            if response.code == 200:
                return (
                    _header(response.headers, b"etag") == task.etag
                    and _header(response.headers, b"last-modified") == task.last_modified
                    and (response.length is UNKNOWN_LENGTH or response.length == task.length)
                    and bool(task.etag or task.last_modified)
                )
            raise OriginError(f"origin answered {response.code}", response.code)

        def failed(f: Failure) -> bool:
            if f.check(OriginError) and f.value.status in (404, 410):  # type: ignore[union-attr]
                return False
            self._log.warn("cannot revalidate {url}: {error}; serving the cached copy", url=redact_url(task.url), error=f.getErrorMessage())
            return True

        d.addCallback(answered)
        d.addErrback(failed)
        return d


def _succeed(value: bool) -> Deferred[bool]:
    d: Deferred[bool] = Deferred()
    d.callback(value)
    return d


def _header(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _content_range_start(headers: Headers) -> int | None:
    value = _header(headers, b"content-range")
    if not value or not value.startswith("bytes "):
        return None
    first = value[6:].split("-", 1)[0]
    return int(first) if first.isdigit() else None


def _describe(reason: Failure) -> str:
    value = reason.value
    inner = getattr(value, "reasons", None)
    if inner:
        return "; ".join(_describe(r) for r in inner)
    text = str(value) or type(value).__name__
    return f"{type(value).__name__}: {text}" if text != type(value).__name__ else text


def hash_fd_range(fd: int, offset: int, length: int, md5: Any) -> None:
    """Feed C{length} bytes of C{fd} from C{offset} into C{md5}."""
    while length > 0:
        chunk = os.pread(fd, min(length, 1 << 20), offset)
        if not chunk:
            raise StorageError("the cache file is shorter than what was written")
        md5.update(chunk)
        offset += len(chunk)
        length -= len(chunk)


class _Fanout:
    """Feeds every update to several hash objects (one read of the data for all of them)."""

    def __init__(self, hashes: list[Any]) -> None:
        self._hashes = hashes

    def update(self, data: bytes) -> None:
        for h in self._hashes:
            h.update(data)


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class Slicer(Protocol):
    """Receives the origin body and writes slices into the cache file."""

    def __init__(
        self, cdn: Cdn, task: CdnTask, reactor: IReactorTime, idle_timeout: float, resume: _Resume | None = None
    ) -> None:
        self.finished: Deferred[None] = Deferred()
        self._cdn = cdn
        self._task = task
        assert task.piece_size is not None and task.fd is not None
        self._fd = task.fd
        self._p = task.piece_size
        self._cap = task.piece_size - OVERHEAD
        self._piece = resume.pieces if resume else 0
        self._offset = self._piece * self._cap  # raw bytes of the file received so far
        self._fill = 0
        self._full_header = SliceHeader(self._cap, self._p).encode()
        self._piece_md5 = hashlib.md5(self._full_header)
        self._file_md5 = resume.md5 if resume else hashlib.md5()
        self._file_sha256 = resume.sha256 if resume else hashlib.sha256()
        # Both file digests are fed by one reader; sha256 only for content named by its digest.
        self._file_digests = _Fanout([self._file_md5, self._file_sha256] if task.expected_sha256 else [self._file_md5])
        # Pieces are hashed into _file_md5 one after the other, from our own descriptor (the
        # task's may be closed by a discard while a hash is still running).
        self._hash_fd = os.dup(self._fd)
        self._hashed: Deferred[None] = Deferred()
        self._hashed.callback(None)
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall | None = reactor.callLater(idle_timeout, self._stalled)
        self._error: Exception | None = None
        self._throttle: InboundThrottle | None = None

    def connectionMade(self) -> None:
        bucket = self._cdn.origin_bucket
        if bucket is not None:
            self._throttle = InboundThrottle(bucket, self.transport, self._paused, self._resumed)

    def _paused(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _resumed(self) -> None:
        if self._error is None and self._timer is None:
            self._timer = self._reactor.callLater(self._idle_timeout, self._stalled)

    def _stalled(self) -> None:
        self._timer = None
        self._abort(DownloadTimeout(f"origin sent nothing for {self._idle_timeout:g} s (the supernode's --origin-timeout)"))

    def _abort(self, error: Exception) -> None:
        """Stop reading the origin; connectionLost then fails the task with C{error}."""
        self._error = error
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)
        if self._throttle is not None:
            self._throttle.received(len(data))
        task = self._task
        task.source_bytes += len(data)
        self._offset += len(data)
        if task.length is not None and self._offset > task.length:
            self._abort(OriginError(f"origin sent more than its Content-Length {task.length}"))
            return
        view = memoryview(data)
        pos = 0
        try:
            while pos < len(view):
                take = min(self._cap - self._fill, len(view) - pos)
                chunk = view[pos : pos + take]
                pwrite_all(self._fd, chunk, self._piece * self._p + 4 + self._fill)
                self._piece_md5.update(chunk)
                started = self._fill == 0
                self._fill += take
                pos += take
                task.receiving, task.received = self._piece, self._fill
                stream = task.streams.get(self._piece)
                if stream is not None:
                    stream.grew(self._fill)
                if started and task.length is not None:
                    self._cdn.piece_started(task, self._piece)
                if self._fill == self._cap:
                    self._close_piece(self._full_header, self._piece_md5)
        except OSError as e:
            self._abort(StorageError(f"cannot write the cache: {e.strerror or e}"))

    def _close_piece(self, header: bytes, md5: Any) -> None:
        n, base = self._piece, self._piece * self._p
        pwrite_all(self._fd, header, base)
        pwrite_all(self._fd, TAIL, base + 4 + self._fill)
        md5.update(TAIL)
        self._task.piece_md5[n] = md5.hexdigest()
        self._task.piece_len[n] = self._fill
        offset, length, file_md5 = base + 4, self._fill, self._file_digests
        self._hashed.addCallback(lambda _: self._cdn.hash_range(self._hash_fd, offset, length, file_md5))
        self._piece += 1
        self._fill = 0
        self._piece_md5 = hashlib.md5(self._full_header)
        self._task.receiving, self._task.received = None, 0
        stream = self._task.streams.pop(n, None)
        if stream is not None:
            stream.finish()  # its readers send the tail now
        self._cdn.piece_ready(self._task, n)

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        if self._throttle is not None:
            self._throttle.close()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        task = self._task
        try:
            if self._error is not None:
                raise self._error
            clean = reason.check(ResponseDone) or (
                reason.check(PotentialDataLoss) and task.length is None
            )
            if not clean:
                raise OriginError(f"origin connection failed mid-body: {_describe(reason)}")
            if task.length is not None and self._offset != task.length:
                raise OriginError(f"origin sent {self._offset} bytes, Content-Length said {task.length}")
            if task.length is None:
                task.length = self._offset
            try:
                if self._fill or self._piece == 0:
                    header = SliceHeader(self._fill, self._p).encode()
                    # The last piece is short: hash it again with its real header.
                    data = os.pread(self._fd, self._fill, self._piece * self._p + 4)
                    self._close_piece(header, hashlib.md5(header + data))
                task.piece_count = self._piece
                last = self._piece - 1
                os.ftruncate(self._fd, last * self._p + task.piece_len[last] + OVERHEAD)
            except OSError as e:
                raise StorageError(f"cannot write the cache: {e.strerror or e}") from None
        except Exception:
            failure = Failure()
            task.stop_streams()
            self._after_hashing().addBoth(lambda _: self.finished.errback(failure))
            return
        self._after_hashing().addCallbacks(self._hashed_all, self._hash_failed)

    def _after_hashing(self) -> Deferred[None]:
        """Fires once every queued piece is in the file md5; our descriptor is then closed."""
        d: Deferred[None] = Deferred()

        def close(result: Any) -> None:
            os.close(self._hash_fd)
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)

        self._hashed.addBoth(close)
        return d

    def _hashed_all(self, _: Any) -> None:
        try:
            self._cdn.finished(self._task, self._file_md5.hexdigest(), self._file_sha256.hexdigest())
        except Exception:
            self.finished.errback()
        else:
            self.finished.callback(None)

    def _hash_failed(self, f: Failure) -> None:
        error = f.value if isinstance(f.value, StorageError) else StorageError(f"cannot hash the cache: {f.getErrorMessage()}")
        self.finished.errback(Failure(error))
