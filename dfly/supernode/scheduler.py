"""Piece scheduling: which peer fetches which piece from whom.

Pure logic with no I/O, driven by events (a piece is written by the CDN, a
peer joins, finishes or fails a piece, a peer goes away); every event returns
the new assignments at once, so a peer learns that a piece became available
within the same reactor turn.  Nothing here sleeps or polls.

Rules, for one peer with a free download slot (at most C{down_limit} pieces
running per peer and task):

* candidates are the pieces the CDN holds that the peer neither has nor runs;
* rarest first: fewest holders plus running downloads; ties are broken by
  distance from a per-peer starting point, so peers spread over the file;
* a source is a peer holding the piece with fewer than C{up_limit} uploads
  running, not blacklisted, not in this peer's own blacklist; the least
  loaded one wins;
* the CDN (the supernode itself) serves a piece only when no usable peer
  holds it and nobody is fetching it from the CDN already, and to at most
  C{cdn_limit} peers of a task at once;
* a peer whose own downloads fail C{isolation_limit} times in a row fetches
  from the CDN only (it is probably the faulty one); a source that fails
  C{blacklist_limit} times in a row is blacklisted for everyone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

CDN = "cdn"


@dataclass(frozen=True)
class Assignment:
    """Peer C{peer} should fetch piece C{piece} of C{task} from C{source} (a peer id or L{CDN})."""

    task: str
    peer: str
    piece: int
    source: str


@dataclass
class PeerState:
    """What the scheduler knows of one peer across tasks."""

    peer_id: str
    uploads: int = 0
    service_errors: int = 0
    client_errors: int = 0
    blacklisted: bool = False


@dataclass
class Member:
    """One peer's part in one task."""

    peer_id: str
    offset: int
    has: set[int] = field(default_factory=set)
    running: dict[int, str] = field(default_factory=dict)
    avoid: set[str] = field(default_factory=set)
    seeding_only: bool = False


@dataclass
class TaskState:
    """Scheduling state of one task."""

    task_id: str
    available: set[int] = field(default_factory=set)
    piece_count: int | None = None
    holders: dict[int, set[str]] = field(default_factory=dict)
    inflight: dict[int, int] = field(default_factory=dict)
    cdn_inflight: set[int] = field(default_factory=set)
    members: dict[str, Member] = field(default_factory=dict)
    failed: bool = False


class Scheduler:
    """Event-driven piece scheduler shared by every task of a supernode."""

    def __init__(
        self,
        down_limit: int = 4,
        up_limit: int = 5,
        cdn_limit: int = 4,
        blacklist_limit: int = 3,
        isolation_limit: int = 5,
    ) -> None:
        self.down_limit = down_limit
        self.up_limit = up_limit
        self.cdn_limit = cdn_limit
        self.blacklist_limit = blacklist_limit
        self.isolation_limit = isolation_limit
        self.tasks: dict[str, TaskState] = {}
        self.peers: dict[str, PeerState] = {}

    # -- events ------------------------------------------------------------
    def add_task(self, task_id: str) -> TaskState:
        """Create (or return) the scheduling state of a task."""
        task = self.tasks.get(task_id)
        if task is None:
            task = self.tasks[task_id] = TaskState(task_id)
        return task

    def remove_task(self, task_id: str) -> None:
        """Forget everything about a task (failed, evicted, or replaced by a new version),
        releasing the upload slots its downloads held."""
        task = self.tasks.pop(task_id, None)
        if task is None:
            return
        for member in task.members.values():
            for piece, source in member.running.items():
                self._release(task, source, piece)

    def cdn_piece_ready(self, task_id: str, piece: int) -> list[Assignment]:
        """The CDN has written and hashed C{piece}."""
        task = self.tasks[task_id]
        task.available.add(piece)
        return self.schedule(task_id)

    def cdn_finished(self, task_id: str, piece_count: int) -> list[Assignment]:
        """The CDN knows the piece count (the whole file is written)."""
        self.tasks[task_id].piece_count = piece_count
        return self.schedule(task_id)

    def cdn_withdrawn(self, task_id: str) -> None:
        """The CDN's copy is being repaired: offer no piece of the task until re-announced."""
        task = self.tasks.get(task_id)
        if task is not None:
            task.available.clear()

    def busy(self, task_id: str) -> bool:
        """True while any member still downloads or the CDN serves a piece of the task."""
        task = self.tasks.get(task_id)
        if task is None:
            return False
        if task.cdn_inflight:
            return True
        return any(m.running or not self.member_complete(task, m) for m in task.members.values())

    def cdn_failed(self, task_id: str) -> None:
        """The CDN gave up; no further assignments for this task."""
        task = self.tasks.get(task_id)
        if task is not None:
            task.failed = True

    def join(self, task_id: str, peer_id: str, has: Iterable[int] = (), seeding_only: bool = False) -> list[Assignment]:
        """A peer joins a task, possibly holding some pieces already."""
        task = self.tasks[task_id]
        self.peers.setdefault(peer_id, PeerState(peer_id))
        member = task.members.get(peer_id)
        if member is None:
            offset = int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "big")
            member = task.members[peer_id] = Member(peer_id, offset)
        member.seeding_only = seeding_only
        for piece in has:
            if piece not in member.has:
                member.has.add(piece)
                task.holders.setdefault(piece, set()).add(peer_id)
        return self.schedule(task_id)

    def leave(self, task_id: str, peer_id: str) -> list[Assignment]:
        """A peer stops taking part in one task (finished and expired, or cancelled)."""
        task = self.tasks.get(task_id)
        if task is None or peer_id not in task.members:
            return []
        self._drop_member(task, peer_id)
        return self.schedule(task_id)

    def peer_gone(self, peer_id: str) -> list[Assignment]:
        """A peer's control connection is lost: drop it everywhere, re-offer its work."""
        out: list[Assignment] = []
        for task in list(self.tasks.values()):
            if peer_id in task.members or any(peer_id in h for h in task.holders.values()):
                self._drop_member(task, peer_id)
                out.extend(self.schedule(task.task_id))
        self.peers.pop(peer_id, None)
        return out

    def piece_done(self, task_id: str, peer_id: str, piece: int, source: str) -> list[Assignment]:
        """A peer fetched and verified C{piece} from C{source}; it can now serve it."""
        task = self.tasks.get(task_id)
        if task is None:
            return []
        member = task.members.get(peer_id)
        if member is None or piece not in task.available:
            return []  # not a member, or a piece that does not exist (yet): ignore the claim
        running = member.running.pop(piece, None)
        if running is None:
            return []  # nothing was assigned: a claim, not a result
        # Release the recorded assignment even if it was meanwhile moved to another source:
        # the piece is held now, so that slot must not stay taken.
        self._release(task, running, piece)
        member.has.add(piece)
        task.holders.setdefault(piece, set()).add(peer_id)
        if running == source:
            # Only a result for the assignment on record clears error counts: a peer cannot
            # whitewash a source (or itself) with made-up reports.
            self.peers[peer_id].client_errors = 0
            if source != CDN and source in self.peers:
                self.peers[source].service_errors = 0
        return self.schedule(task_id)

    def piece_failed(self, task_id: str, peer_id: str, piece: int, source: str) -> list[Assignment]:
        """A peer could not fetch C{piece} from C{source} (bad md5, refused, lost, stalled)."""
        task = self.tasks.get(task_id)
        if task is None:
            return []
        member = task.members.get(peer_id)
        if member is None or member.running.get(piece) != source:
            return []  # stale report for an assignment already withdrawn
        del member.running[piece]
        self._release(task, source, piece)
        self.peers[peer_id].client_errors += 1
        if source != CDN:
            member.avoid.add(source)
            src = self.peers.get(source)
            if src is not None:
                src.service_errors += 1
                if src.service_errors >= self.blacklist_limit:
                    src.blacklisted = True
        return self.schedule(task_id)

    # -- the decision ------------------------------------------------------
    def schedule(self, task_id: str) -> list[Assignment]:
        """Fill every free download slot of every member of C{task_id} that can be filled now."""
        task = self.tasks.get(task_id)
        if task is None or task.failed or not task.available:
            return []
        out: list[Assignment] = []
        for member in list(task.members.values()):
            if member.seeding_only or len(member.running) >= self.down_limit:
                continue
            if task.piece_count is not None and self.member_complete(task, member):
                continue
            out.extend(self._fill(task, member))
        return out

    def _fill(self, task: TaskState, member: Member) -> list[Assignment]:
        candidates = [p for p in task.available if p not in member.has and p not in member.running]
        if not candidates:
            return []
        span = max(task.available) + 1
        off = member.offset % span
        holders, inflight = task.holders, task.inflight
        candidates.sort(key=lambda p: (len(holders.get(p, ())) + inflight.get(p, 0), (p - off) % span))
        isolated = self.peers[member.peer_id].client_errors >= self.isolation_limit
        out: list[Assignment] = []
        for piece in candidates:
            if len(member.running) >= self.down_limit:
                break
            source = self._pick_source(task, member, piece, isolated)
            if source is None:
                continue
            member.running[piece] = source
            inflight[piece] = inflight.get(piece, 0) + 1
            if source == CDN:
                task.cdn_inflight.add(piece)
            else:
                self.peers[source].uploads += 1
            out.append(Assignment(task.task_id, member.peer_id, piece, source))
        return out

    def _pick_source(self, task: TaskState, member: Member, piece: int, isolated: bool) -> str | None:
        usable_holders = False
        if not isolated:
            best: PeerState | None = None
            for pid in task.holders.get(piece, ()):
                if pid == member.peer_id or pid in member.avoid:
                    continue
                peer = self.peers.get(pid)
                if peer is None or peer.blacklisted:
                    continue
                usable_holders = True
                if peer.uploads < self.up_limit and (best is None or peer.uploads < best.uploads):
                    best = peer
            if best is not None:
                return best.peer_id
        if usable_holders or piece in task.cdn_inflight:
            return None
        if self.cdn_load(task) >= self.cdn_limit:
            return None
        return CDN

    @staticmethod
    def member_complete(task: TaskState, member: Member) -> bool:
        """True when C{member} holds every piece of a task whose piece count is known."""
        count = task.piece_count
        return (
            count is not None
            and len(member.has) >= count
            and all(p in member.has for p in range(count))
        )

    @staticmethod
    def cdn_load(task: TaskState) -> int:
        """Pieces of C{task} the CDN is serving right now."""
        return len(task.cdn_inflight)

    # -- bookkeeping -------------------------------------------------------
    def _release(self, task: TaskState, source: str, piece: int) -> None:
        left = task.inflight.get(piece, 0) - 1
        if left > 0:
            task.inflight[piece] = left
        else:
            task.inflight.pop(piece, None)
        if source == CDN:
            task.cdn_inflight.discard(piece)
        elif source in self.peers:
            self.peers[source].uploads = max(0, self.peers[source].uploads - 1)

    def _drop_member(self, task: TaskState, peer_id: str) -> None:
        member = task.members.pop(peer_id, None)
        if member is not None:
            for piece, source in member.running.items():
                self._release(task, source, piece)
            for piece in member.has:
                task.holders.get(piece, set()).discard(peer_id)
        # Withdraw uploads the gone peer was serving; their downloaders get new sources.
        for other in task.members.values():
            for piece, source in list(other.running.items()):
                if source == peer_id:
                    del other.running[piece]
                    self._release(task, source, piece)
