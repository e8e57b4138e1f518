"""The one exception hierarchy of dfly.

Protocol violations raise inside parsers and are turned into a logged, closed
connection at the protocol adapter; command-line misuse raises
C{twisted.python.usage.UsageError}; everything else a caller may want to tell
apart is a subclass of L{DflyError}.
"""

from __future__ import annotations


class DflyError(Exception):
    """Root of every error dfly raises on purpose."""


class ProtocolError(DflyError):
    """A peer sent bytes that break the wire protocol; its connection is closed."""


class MalformedSlice(ProtocolError):
    """A slice header or tail breaks the slice format."""


class OversizeFrame(ProtocolError):
    """A control frame announced a length above the maximum."""


class BadControlMessage(ProtocolError):
    """A control frame is not a JSON object with a known C{op} and well-typed fields."""


class PieceDigestMismatch(ProtocolError):
    """A slice arrived complete but its md5 is not the one the scheduler announced."""


class PieceUnavailable(DflyError):
    """The asked-for piece is not held here (unknown task, piece not written yet)."""


class OriginError(DflyError):
    """The origin could not deliver the file: an HTTP error status, a reset or a short body."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TaskFailed(DflyError):
    """The supernode gave up on a task; the message says why."""


class StorageError(DflyError):
    """Local storage failed (disk full, unwritable): not the fault of any peer or origin."""


class IntegrityError(DflyError):
    """Assembled bytes do not match the expected digest."""


class NoSupernode(DflyError):
    """No configured supernode could be reached."""


class NoDaemon(NoSupernode):
    """No peer daemon answers at the local API socket dfget was to hand the download to,
    or the daemon went away before it reported a result."""


class DownloadTimeout(DflyError):
    """A download did not finish within the time it was given."""


class BencodeError(DflyError):
    """Bytes that are not one well-formed bencoded value (benchmark tracker and torrents)."""


class BenchError(DflyError):
    """A benchmark run could not set up or measure what it was asked to."""
