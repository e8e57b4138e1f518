"""Answering C{get} requests with slices: shared by the supernode and peers.

A C{get} names a task and a piece.  The answer is either a C{slice} control
frame followed by the slice bytes, or a C{nack} with a reason.  Answers go out
in request order; a connection may have at most C{MAX_PENDING} answers queued
(a hostile peer cannot make us queue unbounded work).

A C{get} with C{"relay": true} may also be answered with a piece this side is
still receiving (the server's C{relay_lookup}; without one, relay is ignored).
Such an answer follows a L{GrowingRange} and goes out in order like any other,
so one that waits for bytes holds up the answers behind it.  If the range
fails (the attempt it follows failed or was given up), the connection is
aborted at once, whether the answer is streaming or still queued: the client
sees a cut-off slice, never bytes of another attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from dfly.errors import BadControlMessage, PieceUnavailable, ProtocolError
from dfly.wire.messages import get_bool, get_int, get_task_id
from dfly.wire.protocol import FramedProtocol, SliceSource

MAX_PENDING = 32
MAX_UNREAD = 1 << 20  # answers a client leaves unread before it is cut off

# lookup(task_id, piece, requester_label) -> (source, piece_size, data_len)
SliceLookup = Callable[[str, int, str], tuple[SliceSource, int, int]]


class SliceServerSession:
    """Serves slices to whoever connects; subclasses add more control ops."""

    _log = Logger()

    def __init__(
        self, wire: FramedProtocol, lookup: SliceLookup, relay_lookup: SliceLookup | None = None
    ) -> None:
        self.wire = wire
        self._lookup = lookup
        self._relay_lookup = relay_lookup
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
        relay = get_bool(msg, "relay")
        if self._pending >= MAX_PENDING:
            raise BadControlMessage(f"more than {MAX_PENDING} requests outstanding")
        lookup = self._relay_lookup if relay and self._relay_lookup is not None else self._lookup
        try:
            source, piece_size, data_len = lookup(task_id, piece, self.wire.peer_label)
        except PieceUnavailable as e:
            if self.wire.buffered() > MAX_UNREAD:
                raise BadControlMessage("the client does not read its answers") from None
            self.wire.send_control({"op": "nack", "task": task_id, "piece": piece, "reason": str(e)})
            return
        self._pending += 1
        inner = source.on_done
        growing = source.growing

        def cut() -> None:
            self._log.info(
                "cutting off the relay of piece {piece} of {task_id} to {peer}: it failed here",
                piece=piece, task_id=task_id, peer=self.wire.peer_label,
            )
            self.wire.close(abort=True)

        def done(ok: bool, sent: int) -> None:
            self._pending -= 1
            if growing is not None:
                growing.detach(cut)
            if inner is not None:
                inner(ok, sent)

        source.on_done = done
        if growing is not None:
            growing.attach(cut)
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
