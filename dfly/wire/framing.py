"""Splitting one TCP byte stream into control frames and slices.

Design: a connection carries two kinds of units, strictly one after another.

* A control frame is a 4-byte big-endian length L (1 <= L <= max_control)
  followed by L bytes of UTF-8 JSON: an object with a string field ``op``.
* A slice (the normative slice format: 4-byte header, data, tail 0x7F) may
  only follow a control frame whose handler called L{FrameParser.expect_slice}
  while handling it.  The receiver always knows what it asked for, so the
  slice header is checked against the expected piece size and dataLen, and the
  md5 of the whole slice against the one the scheduler announced.

Only partial headers and control frames are buffered (at most max_control
bytes).  Slice data is handed on as memoryview slices of the received chunk,
without copying, and hashed as it passes.  After the first violation the
parser raises a L{ProtocolError} subclass and ignores everything after it; the
protocol adapter closes the connection.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Protocol

from dfly.errors import BadControlMessage, MalformedSlice, OversizeFrame, PieceDigestMismatch
from dfly.pieces import HEADER_LEN, TAIL, SliceHeader

MAX_CONTROL = 64 * 1024
_LEN = struct.Struct("!I")

_CONTROL_LEN = 0
_CONTROL_BODY = 1
_SLICE_HEADER = 2
_SLICE_DATA = 3
_SLICE_TAIL = 4
_DEAD = 5


class FrameHandler(Protocol):
    """What a L{FrameParser} calls as units complete."""

    def control_received(self, msg: dict[str, Any]) -> None: ...

    def slice_data(self, data: memoryview) -> None: ...

    def slice_finished(self) -> None: ...


def encode_control(msg: dict[str, Any], max_control: int = MAX_CONTROL) -> bytes:
    """Encode one control frame; raises L{OversizeFrame} if it would be too long."""
    body = json.dumps(msg, separators=(",", ":")).encode("utf-8")
    if len(body) > max_control:
        raise OversizeFrame(f"control frame of {len(body)} bytes exceeds {max_control}")
    return _LEN.pack(len(body)) + body


class FrameParser:
    """Incremental parser for one connection's inbound bytes."""

    def __init__(self, handler: FrameHandler, max_control: int = MAX_CONTROL) -> None:
        self._handler = handler
        self._max = max_control
        self._state = _CONTROL_LEN
        self._need = _LEN.size
        self._buf = bytearray()
        self._remaining = 0
        self._expect: tuple[int, int, str | None] | None = None
        self._md5: Any = None
        # md5 of the last complete slice: what a receiver that was told no md5 up front (a
        # piece the supernode was still receiving) compares with the one announced later.
        self.last_md5: str | None = None

    @property
    def in_slice(self) -> bool:
        """True while a slice is expected or being read."""
        return self._state in (_SLICE_HEADER, _SLICE_DATA, _SLICE_TAIL)

    def expect_slice(self, piece_size: int, data_len: int, md5_hex: str | None) -> None:
        """Announce that a slice follows the control frame being handled now."""
        if self._state != _CONTROL_LEN:
            raise RuntimeError("expect_slice is only valid while handling a control frame")
        self._expect = (piece_size, data_len, md5_hex)
        self._state = _SLICE_HEADER
        self._need = HEADER_LEN

    def feed(self, data: bytes) -> None:
        """Consume received bytes, calling the handler for every completed unit."""
        if self._state == _DEAD:
            return
        try:
            self._feed(memoryview(data))
        except BaseException:
            self._state = _DEAD
            raise

    def _feed(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end and self._state != _DEAD:
            if self._state == _SLICE_DATA:
                take = min(self._remaining, end - pos)
                chunk = view[pos : pos + take]
                pos += take
                self._remaining -= take
                self._md5.update(chunk)
                if self._remaining == 0:
                    self._state, self._need = _SLICE_TAIL, 1
                self._handler.slice_data(chunk)
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) < self._need:
                return
            unit = bytes(self._buf)
            self._buf.clear()
            self._unit(unit)

    def _unit(self, unit: bytes) -> None:
        state = self._state
        if state == _CONTROL_LEN:
            (length,) = _LEN.unpack(unit)
            if length == 0:
                raise BadControlMessage("empty control frame")
            if length > self._max:
                raise OversizeFrame(f"control frame of {length} bytes exceeds {self._max}")
            self._state, self._need = _CONTROL_BODY, length
        elif state == _CONTROL_BODY:
            msg = decode_control(unit)
            self._state, self._need = _CONTROL_LEN, _LEN.size
            self._handler.control_received(msg)
        elif state == _SLICE_HEADER:
            header = SliceHeader.decode(unit)
            assert self._expect is not None
            piece_size, data_len, _ = self._expect
            if header.piece_size != piece_size:
                raise MalformedSlice(
                    f"slice piece size {header.piece_size} disagrees with {piece_size} asked for"
                )
            if header.data_len != data_len:
                raise MalformedSlice(
                    f"slice dataLen {header.data_len} disagrees with {data_len} asked for"
                )
            self._md5 = hashlib.md5(unit)
            self._remaining = data_len
            if data_len:
                self._state = _SLICE_DATA
            else:
                self._state, self._need = _SLICE_TAIL, 1
        elif state == _SLICE_TAIL:
            if unit != TAIL:
                raise MalformedSlice(f"slice tail is {unit!r}, not 0x7f")
            self._md5.update(unit)
            assert self._expect is not None
            wanted = self._expect[2]
            got = self._md5.hexdigest()
            self._expect, self._md5 = None, None
            self._state, self._need = _CONTROL_LEN, _LEN.size
            self.last_md5 = got
            if wanted is not None and got != wanted:
                raise PieceDigestMismatch(f"slice md5 {got} is not the announced {wanted}")
            self._handler.slice_finished()


def decode_control(body: bytes) -> dict[str, Any]:
    """Decode a control frame body into a dict with a string C{op}."""
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadControlMessage(f"control frame is not UTF-8 JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise BadControlMessage("control frame is not a JSON object with a string 'op'")
    return msg
