"""The CDN: fetch a task's file from its origin once and cut it into slices.

Design: the origin body is streamed (treq, unbuffered) straight into the
cache file, where slice n occupies [n*P, n*P + dataLen + 5).  Each full piece
is finished the moment its last data byte arrives: header and tail are
written, its md5 (taken as the bytes pass, with the header of a full piece
fed first) is recorded and C{on_piece} fires, so peers can fetch it while the
rest of the file is still on its way.  Only the last piece can be short; its
header is known at end of body, so its md5 is taken by reading that one slice
back.  The md5 of the raw file is kept as the data passes, in order.

A body shorter or longer than Content-Length, a reset, a stall longer than
C{idle_timeout} or an HTTP status other than 200 fails the task: the cache
file is removed and C{on_fail} fires, so nothing half-written is ever served.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from dfly.errors import IntegrityError, OriginError, StorageError
from dfly.pieces import OVERHEAD, TAIL, SliceHeader, default_piece_size

_RESPONSE_DONE = Failure(ResponseDone())


@dataclass
class CdnTask:
    """One file being (or having been) fetched from its origin."""

    task_id: str
    url: str
    task_url: str
    headers: dict[bytes, list[bytes]]
    expected_md5: str | None = None
    state: str = "waiting"  # waiting -> running -> done | failed
    length: int | None = None
    piece_size: int | None = None
    piece_md5: dict[int, str] = field(default_factory=dict)
    piece_len: dict[int, int] = field(default_factory=dict)
    piece_count: int | None = None
    file_md5: str | None = None
    source_bytes: int = 0
    served_bytes: int = 0
    error: str | None = None
    error_kind: str | None = None
    status: int | None = None
    path: str = ""
    fd: int | None = None
    created: float = 0.0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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
        idle_timeout: float = 60.0,
    ) -> None:
        self._reactor = reactor
        self._http = http
        self._home = home
        self._on_headers = on_headers
        self._on_piece = on_piece
        self._on_done = on_done
        self._on_fail = on_fail
        self._piece_size = piece_size
        self._idle_timeout = idle_timeout

    def cache_path(self, task_id: str) -> str:
        return os.path.join(self._home, "cdn", task_id[:3], task_id)

    def start(self, task: CdnTask) -> None:
        """Begin fetching C{task} from its origin."""
        task.state = "running"
        task.path = self.cache_path(task.task_id)
        task.close()
        try:
            os.makedirs(os.path.dirname(task.path), exist_ok=True)
            task.fd = os.open(task.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            self._failed(Failure(StorageError(f"cannot create the cache file: {e.strerror or e}")), task)
            return
        self._log.info("fetching {url} for task {task_id}", url=task.url, task_id=task.task_id)
        d = self._http.request("GET", task.url, headers=task.headers, unbuffered=True)
        timer = self._reactor.callLater(self._idle_timeout, d.cancel)
        d.addBoth(self._cancel_timer, timer)
        d.addCallback(self._got_response, task)
        d.addErrback(self._failed, task)

    @staticmethod
    def _cancel_timer(result: Any, timer: IDelayedCall) -> Any:
        if timer.active():
            timer.cancel()
        return result

    def _got_response(self, response: Any, task: CdnTask) -> Any:
        if response.code != 200:
            phrase = response.phrase.decode("latin-1", "replace") if response.phrase else ""
            response.deliverBody(_Discard())
            raise OriginError(f"origin answered {response.code} {phrase}".strip(), response.code)
        length = None if response.length is UNKNOWN_LENGTH else int(response.length)
        task.length = length
        task.piece_size = self._piece_size or default_piece_size(length)
        self._on_headers(task)
        slicer = Slicer(self, task, self._reactor, self._idle_timeout)
        response.deliverBody(slicer)
        return slicer.finished

    def _failed(self, reason: Failure, task: CdnTask) -> None:
        err: Any = reason.value
        if reason.check(OriginError):
            task.error, task.status = str(err), err.status
        elif reason.check(IntegrityError, StorageError):
            task.error = str(err)
        elif reason.check(CancelledError):
            task.error = f"origin {task.url} did not answer within {self._idle_timeout:g} s"
        else:
            task.error = f"cannot fetch {task.url}: {_describe(reason)}"
        task.error_kind = type(err).__name__ if reason.check(IntegrityError, StorageError) else "OriginError"
        self._log.warn("task {task_id} failed: {error}", task_id=task.task_id, error=task.error)
        task.state = "failed"
        task.close()
        for suffix in ("", ".meta"):
            try:
                os.unlink(task.path + suffix)
            except OSError:
                pass
        self._on_fail(task)

    def piece_ready(self, task: CdnTask, piece: int) -> None:
        self._on_piece(task, piece)

    def finished(self, task: CdnTask, raw_md5: str) -> None:
        task.file_md5 = raw_md5
        if task.expected_md5 and task.expected_md5 != raw_md5:
            raise IntegrityError(f"file md5 {raw_md5} is not the expected {task.expected_md5}")
        task.state = "done"
        meta = {
            "task_id": task.task_id,
            "url": task.task_url,
            "length": task.length,
            "piece_size": task.piece_size,
            "piece_count": task.piece_count,
            "piece_md5": [task.piece_md5[n] for n in range(task.piece_count or 0)],
            "file_md5": raw_md5,
        }
        tmp = task.path + ".meta.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(meta, f)
            os.replace(tmp, task.path + ".meta")
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StorageError(f"cannot write the cache metadata: {e.strerror or e}") from None
        self._log.info(
            "task {task_id} cached: {length} bytes in {count} pieces, md5 {md5}",
            task_id=task.task_id,
            length=task.length,
            count=task.piece_count,
            md5=raw_md5,
        )
        self._on_done(task)


def _describe(reason: Failure) -> str:
    value = reason.value
    inner = getattr(value, "reasons", None)
    if inner:
        return "; ".join(_describe(r) for r in inner)
    text = str(value) or type(value).__name__
    return f"{type(value).__name__}: {text}" if text != type(value).__name__ else text


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class Slicer(Protocol):
    """Receives the origin body and writes slices into the cache file."""

    def __init__(self, cdn: Cdn, task: CdnTask, reactor: IReactorTime, idle_timeout: float) -> None:
        from twisted.internet.defer import Deferred

        self.finished: Deferred[None] = Deferred()
        self._cdn = cdn
        self._task = task
        assert task.piece_size is not None and task.fd is not None
        self._fd = task.fd
        self._p = task.piece_size
        self._cap = task.piece_size - OVERHEAD
        self._piece = 0
        self._fill = 0
        self._full_header = SliceHeader(self._cap, self._p).encode()
        self._piece_md5 = hashlib.md5(self._full_header)
        self._file_md5 = hashlib.md5()
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall | None = reactor.callLater(idle_timeout, self._stalled)
        self._error: Exception | None = None

    def _stalled(self) -> None:
        self._timer = None
        self._abort(OriginError(f"origin sent nothing for {self._idle_timeout:g} s"))

    def _abort(self, error: Exception) -> None:
        """Stop reading the origin; connectionLost then fails the task with C{error}."""
        self._error = error
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._timer is not None:
            self._timer.reset(self._idle_timeout)
        task = self._task
        task.source_bytes += len(data)
        if task.length is not None and task.source_bytes > task.length:
            self._abort(OriginError(f"origin sent more than its Content-Length {task.length}"))
            return
        self._file_md5.update(data)
        view = memoryview(data)
        pos = 0
        try:
            while pos < len(view):
                take = min(self._cap - self._fill, len(view) - pos)
                chunk = view[pos : pos + take]
                os.pwrite(self._fd, chunk, self._piece * self._p + 4 + self._fill)
                self._piece_md5.update(chunk)
                self._fill += take
                pos += take
                if self._fill == self._cap:
                    self._close_piece(self._full_header, self._piece_md5)
        except OSError as e:
            self._abort(StorageError(f"cannot write the cache: {e.strerror or e}"))

    def _close_piece(self, header: bytes, md5: Any) -> None:
        n, base = self._piece, self._piece * self._p
        os.pwrite(self._fd, header, base)
        os.pwrite(self._fd, TAIL, base + 4 + self._fill)
        md5.update(TAIL)
        self._task.piece_md5[n] = md5.hexdigest()
        self._task.piece_len[n] = self._fill
        self._piece += 1
        self._fill = 0
        self._piece_md5 = hashlib.md5(self._full_header)
        self._cdn.piece_ready(self._task, n)

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
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
            if task.length is not None and task.source_bytes != task.length:
                raise OriginError(
                    f"origin sent {task.source_bytes} bytes, Content-Length said {task.length}"
                )
            if task.length is None:
                task.length = task.source_bytes
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
            self._cdn.finished(task, self._file_md5.hexdigest())
        except Exception:
            self.finished.errback()
        else:
            self.finished.callback(None)
