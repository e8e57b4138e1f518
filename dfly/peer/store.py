"""A peer's piece store: one raw data file per task, plus what is held.

The data file holds the raw file bytes at their own offsets (piece n at
n*(P-5)), so a complete task is the finished file itself.  A piece counts as
held only after its slice passed the md5 check; bytes of a piece that is not
held are never served, and a held piece is never written again, so a late or
lying source cannot damage what was verified.  Only a held piece found damaged
on disk (L{StoredTask.unmark}) stops being held; a new attempt may then write it.

The one exception is a relay (L{StoredTask.slice_source} with a
L{GrowingRange}): the bytes of a piece still arriving, read back as the fetch
writes them, only as far as the range says they are written.  Every such
range is remembered (weakly) by its task, and removing the task fails them all
before its file is closed, so no relay reader ever reads a closed (or reused)
descriptor.
"""

from __future__ import annotations

import os
import shutil
import weakref
from dataclasses import dataclass, field

from dfly.errors import PieceUnavailable
from dfly.pieces import OVERHEAD, TAIL, SliceHeader, pwrite_all
from dfly.wire.protocol import GrowingRange, SliceSource


@dataclass
class StoredTask:
    """The pieces of one task held on disk."""

    task_id: str
    directory: str
    piece_size: int
    fd: int
    have: dict[int, int] = field(default_factory=dict)  # piece -> data length
    complete: bool = False
    last_access: float = 0.0
    leases: int = 0
    uploaded_bytes: int = 0
    # The data file's (inode, size, mtime in ns) when the whole file was last verified: a
    # held file whose identity changed since is verified again before it is served.
    verified_stat: tuple[int, int, int] | None = None
    damaged: bool = False  # a reader found the held copy wrong: it is being dropped
    # Ranges relay readers may follow: failed when the task is removed.
    relays: weakref.WeakSet[GrowingRange] = field(default_factory=weakref.WeakSet)

    @property
    def data_path(self) -> str:
        return os.path.join(self.directory, "data")

    def data_offset(self, piece: int) -> int:
        return piece * (self.piece_size - OVERHEAD)

    def write(self, piece: int, pos: int, data: memoryview) -> None:
        """Write slice data of an unverified piece at C{pos} within the piece."""
        if piece in self.have:
            return
        pwrite_all(self.fd, data, self.data_offset(piece) + pos)

    def mark(self, piece: int, data_len: int) -> None:
        """The piece's slice passed its md5 check."""
        self.have[piece] = data_len

    def unmark(self, piece: int) -> None:
        """The held piece failed a check on disk: it is not held any more (and may be
        written again by a new attempt)."""
        self.have.pop(piece, None)
        self.complete = False
        self.verified_stat = None

    def size(self) -> int:
        return sum(self.have.values())

    def file_stat(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime in ns) of the data file; None if it cannot be read."""
        try:
            st = os.stat(self.data_path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def follow(self) -> GrowingRange:
        """A new range for relay readers of a piece being received, failed if the task goes."""
        growing = GrowingRange()
        self.relays.add(growing)
        return growing

    def slice_source(self, piece: int, data_len: int, growing: GrowingRange | None = None) -> SliceSource:
        """Piece C{piece} of C{data_len} data bytes as a slice for the upload server; with
        C{growing}, bytes still arriving (read only as far as that range says)."""

        def done(ok: bool, sent: int) -> None:
            self.uploaded_bytes += sent

        header = SliceHeader(data_len, self.piece_size).encode()
        return SliceSource(
            self.fd, self.data_offset(piece), data_len, header, TAIL, on_done=done, growing=growing
        )

    def close(self) -> None:
        """Stop every relay reader, then close the file."""
        for growing in list(self.relays):
            growing.fail()
        os.close(self.fd)


class PeerStore:
    """All tasks a peer holds, under C{home}/tasks."""

    def __init__(self, home: str) -> None:
        self.root = os.path.join(home, "tasks")
        self.tasks: dict[str, StoredTask] = {}
        # Pieces are verified only in memory; anything left from an earlier run is untrusted.
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root, exist_ok=True)

    def open(self, task_id: str, piece_size: int, now: float) -> StoredTask:
        """The stored task for C{task_id}, created empty if needed."""
        task = self.tasks.get(task_id)
        if task is not None:
            if task.piece_size != piece_size:
                self.remove(task_id)
            else:
                return task
        directory = os.path.join(self.root, task_id)
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, "data"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        task = self.tasks[task_id] = StoredTask(task_id, directory, piece_size, fd, last_access=now)
        return task

    def get(self, task_id: str) -> StoredTask | None:
        return self.tasks.get(task_id)

    def remove(self, task_id: str) -> None:
        task = self.tasks.pop(task_id, None)
        if task is not None:
            task.close()
            shutil.rmtree(task.directory, ignore_errors=True)

    def close(self) -> None:
        for task_id in list(self.tasks):
            self.remove(task_id)

    def lookup(self, task_id: str, piece: int, who: str) -> tuple[SliceSource, int, int]:
        """A held piece as a slice source for the upload server."""
        task = self.tasks.get(task_id)
        if task is None:
            raise PieceUnavailable("unknown task")
        data_len = task.have.get(piece)
        if data_len is None:
            raise PieceUnavailable(f"piece {piece} is not held here")
        return task.slice_source(piece, data_len), task.piece_size, data_len
