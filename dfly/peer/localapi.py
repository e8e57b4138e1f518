"""The peer daemon's local API: dfget hands downloads to the daemon here.

It listens on a UNIX socket in the daemon's home (C{HOME/dfly.sock}), speaks
control frames only, and answers a C{download} with C{progress} frames and
then one C{done} or C{failed}.  While the connection stays open the finished
task is leased: it is not expired, so dfget can copy it out safely.  Progress
frames also name the data file and how many bytes from its start are held
pieces (verified, never written again within the same C{epoch}), so dfget can
copy those while the rest is still downloading.
"""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure

from dfly.errors import BadControlMessage, DflyError, OriginError, ProtocolError
from dfly.peer.node import DownloadRequest, DownloadResult, PeerNode, stats_line
from dfly.urls import url_credentials
from dfly.wire.messages import get_md5, get_opt_str, get_str, get_str_list
from dfly.wire.protocol import FramedProtocol


def error_kind(error: BaseException) -> str:
    """A short name for the kind of failure, mapped to exit codes by dfget."""
    return type(error).__name__


class LocalApiSession:
    """One dfget connection."""

    def __init__(self, wire: FramedProtocol, node: PeerNode) -> None:
        self.wire = wire
        self.node = node
        self.pending: Any = None
        self.leased: str | None = None
        self._last_progress = 0.0
        self.task_id: str | None = None

    def connection_made(self) -> None:
        pass

    def control_received(self, msg: dict[str, Any]) -> None:
        if msg["op"] != "download" or self.pending is not None or self.leased is not None:
            raise BadControlMessage(f"unexpected op {msg['op']!r}")
        md5 = get_md5(msg, "md5") if msg.get("md5") else None
        url, headers = get_str(msg, "url"), get_str_list(msg, "headers", 64)
        try:
            # As dfget does: user:password@ in the URL becomes an Authorization header.
            url, headers = url_credentials(url, headers)
        except (DflyError, UnicodeError, ValueError) as e:
            self._failed(Failure(DflyError(str(e))))
            return
        request = DownloadRequest(
            url=url,
            headers=headers,
            filters=get_str_list(msg, "filter", 64),
            md5=md5,
            identifier=get_opt_str(msg, "identifier", 512),
        )
        try:
            self.task_id = request.task_id
        except (DflyError, UnicodeError, ValueError):
            self.task_id = None  # download() below refuses the request with a clear error
        d = self.node.download(request, self._progress)
        self.pending = d
        d.addCallbacks(self._done, self._failed)

    def _progress(self, received: int, total: int | None) -> None:
        now = self.node.clock()
        if now - self._last_progress >= 0.1 or (total is not None and received >= total):
            self._last_progress = now
            msg: dict[str, Any] = {"op": "progress", "received": received, "total": total}
            prefix = self.node.verified_prefix(self.task_id) if self.task_id else None
            if prefix is not None:
                # What dfget may already copy out (see PeerNode.verified_prefix).
                msg["path"], msg["ready"], msg["epoch"] = prefix
            self.wire.send_control(msg)

    def _done(self, result: DownloadResult) -> None:
        self.pending = None
        self.node.lease(result.task_id)
        self.leased = result.task_id
        msg: dict[str, Any] = {"op": "done", "path": result.path, **stats_line(result)}
        prefix = self.node.verified_prefix(result.task_id)
        if prefix is not None:
            msg["epoch"] = prefix[2]
        self.wire.send_control(msg)

    def _failed(self, f: Failure) -> None:
        self.pending = None
        if not self.wire.connected_open:
            return
        status = f.value.status if isinstance(f.value, OriginError) else None
        kind = error_kind(f.value) if isinstance(f.value, DflyError) else "DflyError"
        self.wire.send_control({"op": "failed", "kind": kind, "reason": f.getErrorMessage(), "status": status})

    def slice_data(self, data: memoryview) -> None:
        raise BadControlMessage("no slices on the local API")

    def slice_finished(self) -> None:
        pass

    def protocol_error(self, error: ProtocolError) -> None:
        pass

    def connection_lost(self, reason: Failure) -> None:
        if self.pending is not None:
            d, self.pending = self.pending, None
            d.cancel()
        if self.leased is not None:
            self.node.release(self.leased)
            self.leased = None
