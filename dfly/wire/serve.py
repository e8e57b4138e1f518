"""Answering C{get} requests with slices: shared by the supernode and peers.

A C{get} names a task and a piece.  The answer is either a C{slice} control
frame followed by the slice bytes, or a C{nack} with a reason.  Answers go out
in request order; a connection may have at most C{MAX_PENDING} answers queued
(a hostile peer cannot make us queue unbounded work).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from dfly.errors import BadControlMessage, PieceUnavailable, ProtocolError
from dfly.wire.messages import get_int, get_task_id
from dfly.wire.protocol import FramedProtocol, SliceSource

MAX_PENDING = 32
MAX_UNREAD = 1 << 20  # answers a client leaves unread before it is cut off

# lookup(task_id, piece, requester_label) -> (source, piece_size, data_len)
SliceLookup = Callable[[str, int, str], tuple[SliceSource, int, int]]


class SliceServerSession:
    """Serves slices to whoever connects; subclasses add more control ops."""

    _log = Logger()

    def __init__(self, wire: FramedProtocol, lookup: SliceLookup) -> None:
        self.wire = wire
        self._lookup = lookup
        self._pending = 0

    def connection_made(self) -> None:
        pass

    def control_received(self, msg: dict[str, Any]) -> None:
        if msg["op"] == "get":
            self.serve_get(msg)
        else:
            self.other_control(msg)

    def other_control(self, msg: dict[str, Any]) -> None:
        raise BadControlMessage(f"unexpected op {msg['op']!r}")

    def serve_get(self, msg: dict[str, Any]) -> None:
        task_id = get_task_id(msg)
        piece = get_int(msg, "piece", 0, 1 << 24)
        if self._pending >= MAX_PENDING:
            raise BadControlMessage(f"more than {MAX_PENDING} requests outstanding")
        try:
            source, piece_size, data_len = self._lookup(task_id, piece, self.wire.peer_label)
        except PieceUnavailable as e:
            if self.wire.buffered() > MAX_UNREAD:
                raise BadControlMessage("the client does not read its answers") from None
            self.wire.send_control({"op": "nack", "task": task_id, "piece": piece, "reason": str(e)})
            return
        self._pending += 1
        inner = source.on_done

        def done(ok: bool, sent: int) -> None:
            self._pending -= 1
            if inner is not None:
                inner(ok, sent)

        source.on_done = done
        self.wire.send_slice(
            {"op": "slice", "task": task_id, "piece": piece, "len": data_len, "piece_size": piece_size},
            source,
        )

    def slice_data(self, data: memoryview) -> None:
        raise BadControlMessage("nobody asked this side for a slice")

    def slice_finished(self) -> None:
        pass

    def protocol_error(self, error: ProtocolError) -> None:
        pass

    def connection_lost(self, reason: Failure) -> None:
        pass
