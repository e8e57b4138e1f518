"""Piece scheduling: which peer fetches which piece from whom.

Pure logic with no I/O, driven by events (a piece is written by the CDN, a
peer joins, finishes, fails or loses a piece, a peer goes away); every event returns
the new assignments at once, so a peer learns that a piece became available
within the same reactor turn.  Nothing here sleeps or polls.

Rules, for one peer with a free download slot (at most C{down_limit} pieces
running per peer and task):

* candidates are the pieces the CDN holds (or is receiving, when the file's
  length is known: C{streaming}) that the peer neither has nor runs;
* rarest first: fewest holders plus running downloads; ties are broken by
  distance from a per-peer starting point, so peers spread over the file;
* a source is a peer holding the piece with fewer than C{up_limit} uploads
  running, not blacklisted, not in this peer's own blacklist; the least
  loaded one wins;
* with relaying on (the default), a peer that is still receiving the piece is
  a source too (a I{relay}: it streams the bytes on as they arrive; the
  downloader checks the md5 as always), taken only when no holder is free;
* the CDN (the supernode itself) serves a piece only when no usable peer
  holds it and nobody is fetching it from the CDN already, and to at most
  C{cdn_limit} peers of a task at once;
* a peer whose own downloads fail C{isolation_limit} times in a row fetches
  from the CDN only (it is probably the faulty one); a source that fails
  C{blacklist_limit} times in a row is blacklisted for everyone.

Relays remove the store-and-forward delay: without them each hop waits for
the whole piece, so a new piece needs about log2(N) piece times to reach N
peers, and the last piece arrives that much after the origin's last byte.  A
relay's attempt can still fail; then every download relaying from it (and
from those, recursively) is withdrawn at once and reassigned, with no error
counted against anyone: the attempt's own failure report blames its source.
A relayed download that fails while its relay is still receiving is judged
when the relay's attempt ends: blamed on the relay if the relay verified the
piece, excused if the relay failed too.

Incremental design (an event costs about the peers it touches, not the swarm):

* per task and piece, the usable sources with a free upload slot, bucketed by
  their running uploads (C{free}: holders in buckets 0 .. up_limit-1, relays
  in buckets up_limit .. 2*up_limit-1), so the preferred source is the first
  entry of the first non-empty bucket, and C{nfree} (pieces that have one);
* C{good}: pieces held by at least one peer that is not blacklisted; an
  available piece outside it may come from the CDN;
* C{blocked}: members with a free download slot that nothing could fill, and
  C{wanting}: for each piece, the blocked members that lack it.

An event changes some state, then settles: every piece that may have gained a
usable source -- a new holder, a holder whose upload slot freed, a freed CDN
slot -- is first offered to the blocked members lacking it, longest waiting
first, each filled by the member rule (its rarest servable pieces); then the
members whose own download slot freed are filled.  Waiting members come first:
were the peer that just finished a CDN piece to take the next one at once, a
single peer would receive every new piece and its one upload slot would have
to seed the whole file into the swarm.  A member is
blocked only when no piece it lacks has a usable source; any change that
could end that touches one of the pieces offered, so after each event a full
pass (L{Scheduler.schedule}) finds nothing more to assign.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

CDN = "cdn"

# Defaults (the supernode's options use these).  One upload and one download per peer and
# task: a source running more uploads than its downloaders run downloads splits its link
# thinner than theirs, so they idle part of their own; and concurrent transfers share a
# link, so each piece takes longer and a new piece spreads through the swarm more slowly
# (a holder serving one peer at full rate doubles the holders every piece time).
# dfly.devtools.sim measures it (README.md, "Scheduling at scale"): 1 GiB, 1 Gbit/s
# everywhere, 1 000 peers: makespan / T* = 1.20 with 1/1, 1.25 with 2/2, 1.68 with 5/4.
DEFAULT_DOWN_LIMIT = 1
DEFAULT_UP_LIMIT = 1
DEFAULT_CDN_LIMIT = 4
DEFAULT_BLACKLIST_LIMIT = 3
DEFAULT_ISOLATION_LIMIT = 5
# Relays in a row behind a peer before it may not relay the piece on: each hop adds a
# little delay (a read chunk, a request), and a chain breaks at its weakest link.
DEFAULT_RELAY_DEPTH = 32


@dataclass(frozen=True)
class Assignment:
    """Peer C{peer} should fetch piece C{piece} of C{task} from C{source} (a peer id or L{CDN});
    C{relay}: the source is still receiving the piece itself.  C{attempt} numbers the
    assignment; a result naming another attempt of the same piece is a late one."""

    task: str
    peer: str
    piece: int
    source: str
    relay: bool = False
    attempt: int = 0


@dataclass
class PeerState:
    """What the scheduler knows of one peer across tasks."""

    peer_id: str
    uploads: int = 0
    service_errors: int = 0
    client_errors: int = 0
    blacklisted: bool = False
    tasks: set[str] = field(default_factory=set)


@dataclass
class Member:
    """One peer's part in one task."""

    peer_id: str
    offset: int
    has: set[int] = field(default_factory=set)
    running: dict[int, str] = field(default_factory=dict)
    avoid: set[str] = field(default_factory=set)
    seeding_only: bool = False
    relays: set[int] = field(default_factory=set)  # running pieces offered as a relay
    attempts: dict[int, int] = field(default_factory=dict)  # running piece -> attempt number
    hops: dict[int, int] = field(default_factory=dict)  # running relayed piece -> relays upstream
    # piece -> downloaders whose relayed copy from this member failed while this member
    # was still receiving it, and whether that put this member in their avoid set
    suspects: dict[int, list[tuple[str, bool]]] = field(default_factory=dict)

    def unassign(self, piece: int) -> str | None:
        """Forget the running download of C{piece}; its source, if there was one."""
        self.attempts.pop(piece, None)
        self.hops.pop(piece, None)
        return self.running.pop(piece, None)


@dataclass
class TaskState:
    """Scheduling state of one task (and its indexes, see the module docstring)."""

    task_id: str
    available: set[int] = field(default_factory=set)
    streaming: set[int] = field(default_factory=set)  # available, but the CDN still receives them
    piece_count: int | None = None
    holders: dict[int, set[str]] = field(default_factory=dict)
    inflight: dict[int, int] = field(default_factory=dict)
    cdn_inflight: set[int] = field(default_factory=set)
    members: dict[str, Member] = field(default_factory=dict)
    failed: bool = False
    span: int = 0
    free: dict[int, list[set[str]]] = field(default_factory=dict)
    nfree: dict[int, int] = field(default_factory=dict)
    good: dict[int, int] = field(default_factory=dict)
    serving: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    blocked: dict[str, None] = field(default_factory=dict)  # in the order they blocked
    wanting: dict[int, dict[str, None]] = field(default_factory=dict)
    # What changed since the task last settled.
    to_fill: dict[str, None] = field(default_factory=dict)
    dirty_pieces: set[int] = field(default_factory=set)
    dirty_sources: set[str] = field(default_factory=set)
    cdn_freed: bool = False


class Scheduler:
    """Event-driven piece scheduler shared by every task of a supernode."""

    def __init__(
        self,
        down_limit: int = DEFAULT_DOWN_LIMIT,
        up_limit: int = DEFAULT_UP_LIMIT,
        cdn_limit: int = DEFAULT_CDN_LIMIT,
        blacklist_limit: int = DEFAULT_BLACKLIST_LIMIT,
        isolation_limit: int = DEFAULT_ISOLATION_LIMIT,
        relay: bool = True,
        relay_depth: int = DEFAULT_RELAY_DEPTH,
    ) -> None:
        self.relay = relay
        self.relay_depth = relay_depth
        self._attempt = 0
        self.down_limit = down_limit
        self.up_limit = up_limit
        self.cdn_limit = cdn_limit
        self.blacklist_limit = blacklist_limit
        self.isolation_limit = isolation_limit
        self.tasks: dict[str, TaskState] = {}
        self.peers: dict[str, PeerState] = {}
        self._pending: dict[str, None] = {}  # tasks with changes not settled yet

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
        self._pending.pop(task_id, None)
        for member in task.members.values():
            for piece, source in member.running.items():
                self._release(task, member.peer_id, source, piece)
            peer = self.peers.get(member.peer_id)
            if peer is not None:
                peer.tasks.discard(task_id)
        self._pending.pop(task_id, None)

    def cdn_piece_started(self, task_id: str, piece: int) -> list[Assignment]:
        """The CDN started receiving C{piece}, whose size is known: it may stream the piece to
        one peer as it arrives (a relay assignment from the CDN: its md5 follows once the
        piece is whole), and that peer may relay it on."""
        task = self.tasks[task_id]
        if self.relay and piece not in task.available:  # store and forward: wait for it whole
            task.streaming.add(piece)
            self._make_available(task, piece)
        return self._settle()

    def cdn_piece_ready(self, task_id: str, piece: int) -> list[Assignment]:
        """The CDN has written and hashed C{piece}."""
        task = self.tasks[task_id]
        if piece in task.streaming:
            task.streaming.discard(piece)  # it was offered already; its downloads go on
        elif piece not in task.available:
            self._make_available(task, piece)
        return self._settle()

    def _make_available(self, task: TaskState, piece: int) -> None:
        if piece not in task.available:
            task.available.add(piece)
            if piece >= task.span:
                task.span = piece + 1
            wanting = {pid: None for pid in task.blocked if self._lacks(task.members[pid], piece)}
            if wanting:
                task.wanting[piece] = wanting
            task.dirty_pieces.add(piece)
            self._touch(task)

    def cdn_finished(self, task_id: str, piece_count: int) -> list[Assignment]:
        """The CDN knows the piece count (the whole file is written)."""
        task = self.tasks[task_id]
        task.piece_count = piece_count
        for pid in list(task.blocked):
            if self.member_complete(task, task.members[pid]):
                self._unblock(task, task.members[pid])
        self._touch(task)
        return self._settle()

    def cdn_withdrawn(self, task_id: str) -> None:
        """The CDN's copy is being repaired: offer no piece of the task until re-announced."""
        task = self.tasks.get(task_id)
        if task is not None:
            task.available.clear()
            task.streaming.clear()
            task.wanting.clear()
            task.span = 0

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
        """A peer joins a task, possibly holding some pieces already.  A member joining
        again says what it holds now: pieces it no longer has are lost (as L{piece_lost})."""
        task = self.tasks[task_id]
        has = set(has)
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = PeerState(peer_id)
        peer.tasks.add(task_id)
        member = task.members.get(peer_id)
        if member is None:
            offset = int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "big")
            member = task.members[peer_id] = Member(peer_id, offset)
        member.seeding_only = seeding_only
        if seeding_only:
            self._unblock(task, member)
        for piece in member.has - has:
            self._lose(task, member, peer, piece)
        for piece in has:
            if piece not in member.has and piece not in member.running:
                self._gain(task, member, peer, piece)
        task.to_fill[peer_id] = None
        self._touch(task)
        return self._settle()

    def leave(self, task_id: str, peer_id: str) -> list[Assignment]:
        """A peer stops taking part in one task (finished and expired, or cancelled)."""
        task = self.tasks.get(task_id)
        if task is None or peer_id not in task.members:
            return []
        self._drop_member(task, peer_id)
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.tasks.discard(task_id)
        return self._settle()

    def peer_gone(self, peer_id: str) -> list[Assignment]:
        """A peer's control connection is lost: drop it everywhere, re-offer its work."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return []
        for task_id in list(peer.tasks):
            task = self.tasks.get(task_id)
            if task is not None:
                self._drop_member(task, peer_id)
        self.peers.pop(peer_id, None)
        return self._settle()

    def piece_done(
        self, task_id: str, peer_id: str, piece: int, source: str, attempt: int | None = None
    ) -> list[Assignment]:
        """A peer fetched and verified C{piece} from C{source} (in C{attempt}, if it says);
        it can now serve it."""
        task = self.tasks.get(task_id)
        if task is None:
            return []
        member = task.members.get(peer_id)
        if member is None or piece not in task.available:
            return []  # not a member, or a piece that does not exist (yet): ignore the claim
        current = member.attempts.get(piece)
        running = member.unassign(piece)
        if running is None:
            return []  # nothing was assigned: a claim, not a result
        # Release the recorded assignment even if it was meanwhile moved to another source:
        # the piece is held now, so that slot must not stay taken.
        self._release(task, peer_id, running, piece)
        peer = self.peers[peer_id]
        self._drop_relay(task, member, peer, piece)
        self._gain(task, member, peer, piece)
        # Downloads relayed from this attempt that failed before it ended were its fault.
        for other_id, _ in member.suspects.pop(piece, ()):
            self._count_failure(task, other_id, peer_id)
        if running == source and (attempt is None or attempt == current):
            # Only a result for the assignment on record clears error counts: a peer cannot
            # whitewash a source (or itself) with made-up reports.
            peer.client_errors = 0
            if source != CDN and source in self.peers:
                self.peers[source].service_errors = 0
        task.to_fill[peer_id] = None
        self._touch(task)
        return self._settle()

    def piece_failed(
        self, task_id: str, peer_id: str, piece: int, source: str, attempt: int | None = None
    ) -> list[Assignment]:
        """A peer could not fetch C{piece} from C{source} (bad md5, refused, lost, stalled)
        in C{attempt} (if it says; a report of an earlier attempt is ignored)."""
        task = self.tasks.get(task_id)
        if task is None:
            return []
        member = task.members.get(peer_id)
        if member is None or member.running.get(piece) != source:
            return []  # stale report for an assignment already withdrawn
        if attempt is not None and member.attempts.get(piece) != attempt:
            return []  # a report of an earlier attempt, withdrawn and assigned again
        relay = task.members.get(source) if source != CDN else None
        if relay is not None and piece in relay.running:
            # A relayed copy failed while the relay still receives the piece: its own attempt
            # may have failed first (then this one is excused); judge when it ends.  Meanwhile
            # this downloader takes the piece from someone else.
            added = source not in member.avoid
            member.avoid.add(source)
            relay.suspects.setdefault(piece, []).append((peer_id, added))
            self._withdraw(task, member, piece)
            self._touch(task)
            return self._settle()
        member.unassign(piece)
        self._release(task, peer_id, source, piece)
        self._attempt_failed(task, member, piece)
        self._unrun(task, member, piece)
        self._count_failure(task, peer_id, source)
        task.to_fill[peer_id] = None
        self._touch(task)
        return self._settle()

    def piece_lost(self, task_id: str, peer_id: str, piece: int) -> list[Assignment]:
        """A member no longer holds C{piece} (its copy failed a check on its own disk): it is
        no source of it any more, downloads of it from that member are withdrawn without
        blame, and the member wants the piece again."""
        task = self.tasks.get(task_id)
        member = task.members.get(peer_id) if task is not None else None
        peer = self.peers.get(peer_id)
        if task is None or member is None or peer is None or piece not in member.has:
            return []
        self._lose(task, member, peer, piece)
        self._touch(task)
        return self._settle()

    def _lose(self, task: TaskState, member: Member, peer: PeerState, piece: int) -> None:
        member.has.discard(piece)
        task.holders.get(piece, set()).discard(peer.peer_id)
        if not peer.blacklisted:
            self._unsource(task, piece, peer)
        for other_id, p in list(task.serving.get(peer.peer_id, ())):
            other = task.members.get(other_id)
            if p == piece and other is not None and other.running.get(piece) == peer.peer_id:
                self._withdraw(task, other, piece)
        self._unrun(task, member, piece)
        task.to_fill[peer.peer_id] = None

    def _count_failure(self, task: TaskState, peer_id: str, source: str) -> None:
        """C{peer_id}'s download from C{source} failed: count it against both."""
        peer = self.peers.get(peer_id)
        member = task.members.get(peer_id)
        if peer is None or member is None:
            return
        peer.client_errors += 1
        if source != CDN:
            member.avoid.add(source)
            src = self.peers.get(source)
            if src is not None:
                src.service_errors += 1
                if src.service_errors >= self.blacklist_limit and not src.blacklisted:
                    self._blacklist(src)
        task.to_fill[peer_id] = None

    # -- the decision ------------------------------------------------------
    def schedule(self, task_id: str) -> list[Assignment]:
        """Fill every free download slot of every member of C{task_id} that can be filled now.

        A full pass over the members; the events do the same work incrementally, so after
        any event this finds nothing (the property tests check exactly that)."""
        task = self.tasks.get(task_id)
        if task is None:
            return []
        out = self._settle()
        for member in list(task.members.values()):
            self._fill(task, member, out)
        return out

    def _settle(self) -> list[Assignment]:
        """Act on everything that changed in the tasks touched since the last settle."""
        out: list[Assignment] = []
        while self._pending:
            task_id = next(iter(self._pending))
            del self._pending[task_id]
            task = self.tasks.get(task_id)
            if task is not None:
                self._settle_task(task, out)
        return out

    def _settle_task(self, task: TaskState, out: list[Assignment]) -> None:
        members = task.members
        if task.failed or not task.available:
            # Nothing to offer now; whoever has a free slot waits for the pieces to return.
            for pid in task.to_fill if not task.failed else ():
                member = members.get(pid)
                if member is not None and not member.seeding_only and len(member.running) < self.down_limit:
                    task.blocked[pid] = None  # wants every piece, none available
            task.to_fill.clear()
            task.dirty_pieces.clear()
            task.dirty_sources.clear()
            task.cdn_freed = False
            return
        # Source side: pieces that may have gained a usable source go to blocked members.
        wanting = task.wanting
        offer = task.dirty_pieces & wanting.keys()
        task.dirty_pieces.clear()
        for sid in task.dirty_sources:
            src = members.get(sid)
            peer = self.peers.get(sid)
            if src is not None and peer is not None and not peer.blacklisted and peer.uploads < self.up_limit:
                offer |= src.has & wanting.keys()
                if src.relays:
                    offer |= src.relays & wanting.keys()
        task.dirty_sources.clear()
        if task.cdn_freed:
            task.cdn_freed = False
            if len(task.cdn_inflight) < self.cdn_limit:
                offer |= (wanting.keys() - task.good.keys()) - task.cdn_inflight
                # Peers that avoid some holders or are isolated may take more from the CDN
                # than the common rule shows: give them a full look.
                for pid in [p for p in task.blocked if members[p].avoid or self._isolated(p)]:
                    self._fill(task, members[pid], out)
        if offer:
            self._offer(task, offer, out)
        # Member side: peers whose download slot freed take their rarest servable piece.
        while task.to_fill:
            pid = next(iter(task.to_fill))
            del task.to_fill[pid]
            member = members.get(pid)
            if member is not None:
                self._fill(task, member, out)

    def _offer(self, task: TaskState, offer: set[int], out: list[Assignment]) -> None:
        """Offer pieces, rarest first, to the blocked members lacking them, longest waiting first."""
        members, wanting = task.members, task.wanting
        holders, inflight = task.holders, task.inflight
        for piece in sorted(offer, key=lambda p: (len(holders.get(p, ())) + inflight.get(p, 0), p)):
            tried: set[str] = set()
            while self._has_capacity(task, piece):
                want = wanting.get(piece)
                taker = next((p for p in want if p not in tried), None) if want else None
                if taker is None:
                    break
                tried.add(taker)
                self._fill(task, members[taker], out)

    def _has_capacity(self, task: TaskState, piece: int) -> bool:
        if task.nfree.get(piece):
            return True
        return (
            piece not in task.good
            and piece not in task.cdn_inflight
            and len(task.cdn_inflight) < self.cdn_limit
        )

    def _fill(self, task: TaskState, member: Member, out: list[Assignment]) -> None:
        """Give C{member} its rarest servable pieces until its download slots are full."""
        free = self.down_limit - len(member.running)
        if member.seeding_only or free <= 0 or task.failed:
            self._unblock(task, member)
            return
        lacking = task.available - member.has
        if member.running:
            lacking.difference_update(member.running)
        if not lacking:
            if task.piece_count is not None and self.member_complete(task, member):
                self._unblock(task, member)
            else:
                self._block(task, member)
            return
        isolated = self._isolated(member.peer_id)
        picky = isolated or bool(member.avoid)
        if picky:
            cands = lacking  # the slow, exact path: each piece is checked holder by holder
        else:
            cands = lacking & task.nfree.keys()
            if len(task.cdn_inflight) < self.cdn_limit:
                cands |= (lacking - task.good.keys()) - task.cdn_inflight
        if cands:
            span = task.span
            off = member.offset % span
            holders, inflight = task.holders, task.inflight

            def rarity(p: int) -> int:
                return (len(holders.get(p, ())) + inflight.get(p, 0)) * span + (p - off) % span

            if free == 1 and not picky:
                best = min(cands, key=rarity)
                source = self._pick_source(task, member, best, isolated)
                if source is not None:
                    self._assign(task, member, best, source, out)
                    self._unblock(task, member)
                    return
            for piece in sorted(cands, key=rarity):
                source = self._pick_source(task, member, piece, isolated)
                if source is None:
                    continue
                self._assign(task, member, piece, source, out)
                free -= 1
                if free <= 0:
                    break
        if len(member.running) < self.down_limit:
            self._block(task, member)
        else:
            self._unblock(task, member)

    def _pick_source(self, task: TaskState, member: Member, piece: int, isolated: bool) -> str | None:
        avoid = member.avoid
        if not isolated:
            buckets = task.free.get(piece)
            if buckets is not None:
                for bucket in buckets:
                    if not avoid:
                        for pid in bucket:
                            return pid
                    else:
                        for pid in bucket:
                            if pid not in avoid:
                                return pid
            if piece in task.good:
                if not avoid:
                    return None  # usable holders, all busy: wait for one of them
                peers = self.peers
                for pid in task.holders.get(piece, ()):
                    if pid not in avoid and not peers[pid].blacklisted:
                        return None
        if piece in task.cdn_inflight or len(task.cdn_inflight) >= self.cdn_limit:
            return None
        return CDN

    def _isolated(self, peer_id: str) -> bool:
        return self.peers[peer_id].client_errors >= self.isolation_limit

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
    def _touch(self, task: TaskState) -> None:
        self._pending[task.task_id] = None

    @staticmethod
    def _lacks(member: Member, piece: int) -> bool:
        return piece not in member.has and piece not in member.running

    def _block(self, task: TaskState, member: Member) -> None:
        pid = member.peer_id
        if pid in task.blocked:
            return
        task.blocked[pid] = None
        lacking = task.available - member.has
        lacking.difference_update(member.running)
        wanting = task.wanting
        for piece in lacking:
            want = wanting.get(piece)
            if want is None:
                wanting[piece] = {pid: None}
            else:
                want[pid] = None

    def _unblock(self, task: TaskState, member: Member) -> None:
        pid = member.peer_id
        if pid not in task.blocked:
            return
        del task.blocked[pid]
        wanting = task.wanting
        for piece in task.available - member.has:
            want = wanting.get(piece)
            if want is not None:
                want.pop(pid, None)
                if not want:
                    del wanting[piece]

    def _unrun(self, task: TaskState, member: Member, piece: int) -> None:
        """C{piece} stopped running at C{member} without being held: it is wanted again."""
        if member.peer_id in task.blocked and piece in task.available:
            task.wanting.setdefault(piece, {})[member.peer_id] = None

    def _gain(self, task: TaskState, member: Member, peer: PeerState, piece: int) -> None:
        """C{member} holds C{piece} now and may serve it."""
        member.has.add(piece)
        pid = member.peer_id
        want = task.wanting.get(piece)
        if want is not None and pid in want:
            del want[pid]
            if not want:
                del task.wanting[piece]
        task.holders.setdefault(piece, set()).add(pid)
        if peer.blacklisted:
            return
        task.good[piece] = task.good.get(piece, 0) + 1
        if peer.uploads < self.up_limit:
            buckets = task.free.get(piece)
            if buckets is None:
                buckets = task.free[piece] = [set() for _ in range(2 * self.up_limit)]
            buckets[peer.uploads].add(pid)
            task.nfree[piece] = task.nfree.get(piece, 0) + 1
            task.dirty_pieces.add(piece)

    def _assign(self, task: TaskState, member: Member, piece: int, source: str, out: list[Assignment]) -> None:
        pid = member.peer_id
        member.running[piece] = source
        self._attempt += 1
        member.attempts[piece] = self._attempt
        task.inflight[piece] = task.inflight.get(piece, 0) + 1
        if pid in task.blocked:
            want = task.wanting.get(piece)
            if want is not None:
                want.pop(pid, None)
                if not want:
                    del task.wanting[piece]
        relay = False
        if source == CDN:
            task.cdn_inflight.add(piece)
            if piece in task.streaming:
                relay = True
                member.hops[piece] = 1
        else:
            task.serving.setdefault(source, set()).add((pid, piece))
            peer = self.peers[source]
            self._set_uploads(peer, peer.uploads + 1)
            src_member = task.members[source]
            if piece not in src_member.has:
                relay = True
                member.hops[piece] = src_member.hops.get(piece, 0) + 1
        if self.relay and member.hops.get(piece, 0) < self.relay_depth:
            self._add_relay(task, member, self.peers[pid], piece)
        out.append(Assignment(task.task_id, pid, piece, source, relay, self._attempt))

    def _release(self, task: TaskState, peer_id: str, source: str, piece: int) -> None:
        left = task.inflight.get(piece, 0) - 1
        if left > 0:
            task.inflight[piece] = left
        else:
            task.inflight.pop(piece, None)
        if source == CDN:
            task.cdn_inflight.discard(piece)
            task.cdn_freed = True
        else:
            serving = task.serving.get(source)
            if serving is not None:
                serving.discard((peer_id, piece))
                if not serving:
                    del task.serving[source]
            peer = self.peers.get(source)
            if peer is not None:
                self._set_uploads(peer, max(0, peer.uploads - 1))

    def _set_uploads(self, peer: PeerState, uploads: int) -> None:
        """Change a peer's upload count and move it between the load buckets of every
        piece it holds."""
        old = peer.uploads
        peer.uploads = uploads
        if peer.blacklisted or old == uploads:
            return
        limit = self.up_limit
        if old >= limit and uploads >= limit:
            return
        pid = peer.peer_id
        for task_id in peer.tasks:
            task = self.tasks.get(task_id)
            member = task.members.get(pid) if task is not None else None
            if task is None or member is None or not (member.has or member.relays):
                continue
            free, nfree = task.free, task.nfree
            for pieces, base in ((member.has, 0), (member.relays, limit)):
                if old < limit and uploads < limit:
                    for piece in pieces:
                        buckets = free[piece]
                        buckets[base + old].discard(pid)
                        buckets[base + uploads].add(pid)
                elif old < limit:  # now full
                    for piece in pieces:
                        free[piece][base + old].discard(pid)
                        n = nfree[piece] - 1
                        if n:
                            nfree[piece] = n
                        else:
                            del nfree[piece]
                else:  # a slot freed
                    for piece in pieces:
                        slots = free.get(piece)
                        if slots is None:
                            slots = free[piece] = [set() for _ in range(2 * limit)]
                        slots[base + uploads].add(pid)
                        nfree[piece] = nfree.get(piece, 0) + 1
            if uploads < old:
                task.dirty_sources.add(pid)
                self._touch(task)

    def _unfree(self, task: TaskState, piece: int, bucket: int, pid: str) -> None:
        """Take C{pid} out of C{piece}'s free bucket C{bucket}."""
        task.free[piece][bucket].discard(pid)
        n = task.nfree[piece] - 1
        if n:
            task.nfree[piece] = n
        else:
            del task.nfree[piece]

    def _add_relay(self, task: TaskState, member: Member, peer: PeerState, piece: int) -> None:
        """C{member} started receiving C{piece}: offer it as a relay of that piece."""
        if peer.blacklisted or self._isolated(peer.peer_id):
            return  # nobody fetches from a blacklisted peer; an isolated one is probably faulty
        member.relays.add(piece)
        if peer.uploads < self.up_limit:
            buckets = task.free.get(piece)
            if buckets is None:
                buckets = task.free[piece] = [set() for _ in range(2 * self.up_limit)]
            buckets[self.up_limit + peer.uploads].add(member.peer_id)
            task.nfree[piece] = task.nfree.get(piece, 0) + 1
            task.dirty_pieces.add(piece)
            self._touch(task)  # settle again: blocked members may take it from this relay

    def _drop_relay(self, task: TaskState, member: Member, peer: PeerState | None, piece: int) -> None:
        """C{member}'s attempt at C{piece} ended: it is no longer a relay of it."""
        if piece not in member.relays:
            return
        member.relays.discard(piece)
        if peer is not None and not peer.blacklisted and peer.uploads < self.up_limit:
            self._unfree(task, piece, self.up_limit + peer.uploads, member.peer_id)

    def _attempt_failed(self, task: TaskState, member: Member, piece: int) -> None:
        """C{member}'s attempt at C{piece} ended without the piece.  Downloads relaying it
        cannot complete: withdraw them (and theirs, and so on) so they get a new source at
        once; copies that already failed are excused (their downloaders may use it again)."""
        stack = [member]
        while stack:
            m = stack.pop()
            self._drop_relay(task, m, self.peers.get(m.peer_id), piece)
            for other_id, added in m.suspects.pop(piece, ()):
                other = task.members.get(other_id)
                if other is not None and added:
                    other.avoid.discard(m.peer_id)
                    task.to_fill[other_id] = None
            for other_id, p in list(task.serving.get(m.peer_id, ())):
                if p != piece:
                    continue
                other = task.members.get(other_id)
                if other is None or other.running.get(piece) != m.peer_id:
                    continue
                other.unassign(piece)
                self._release(task, other_id, m.peer_id, piece)
                self._unrun(task, other, piece)
                task.to_fill[other_id] = None
                stack.append(other)

    def _withdraw(self, task: TaskState, member: Member, piece: int) -> None:
        """Take C{piece} away from C{member} without counting an error: its source is gone
        (or its relayed copy is under judgement); it gets a new source at its next fill."""
        source = member.running[piece]
        member.unassign(piece)
        self._release(task, member.peer_id, source, piece)
        self._attempt_failed(task, member, piece)
        self._unrun(task, member, piece)
        task.to_fill[member.peer_id] = None

    def _blacklist(self, peer: PeerState) -> None:
        """Nobody fetches from C{peer} any more."""
        pid = peer.peer_id
        for task_id in peer.tasks:
            task = self.tasks.get(task_id)
            member = task.members.get(pid) if task is not None else None
            if task is None or member is None:
                continue
            self._unlist(task, member, peer)
            self._touch(task)
        peer.blacklisted = True

    def _unlist(self, task: TaskState, member: Member, peer: PeerState) -> None:
        """Take C{member}'s pieces out of the source indexes (blacklisted or gone)."""
        if peer.blacklisted:
            return
        for piece in member.has:
            self._unsource(task, piece, peer)
        if peer.uploads < self.up_limit:
            for piece in member.relays:
                self._unfree(task, piece, self.up_limit + peer.uploads, member.peer_id)

    def _unsource(self, task: TaskState, piece: int, peer: PeerState) -> None:
        """A usable holder of C{piece} is no longer one (gone, blacklisted, lost the piece)."""
        n = task.good[piece] - 1
        if n:
            task.good[piece] = n
        else:
            del task.good[piece]
            task.dirty_pieces.add(piece)  # may come from the CDN now
            task.cdn_freed = True
        if peer.uploads < self.up_limit:
            self._unfree(task, piece, peer.uploads, peer.peer_id)

    def _drop_member(self, task: TaskState, peer_id: str) -> None:
        self._touch(task)
        member = task.members.get(peer_id)
        if member is not None:
            self._unblock(task, member)
            peer = self.peers.get(peer_id)
            if peer is not None:
                self._unlist(task, member, peer)
            del task.members[peer_id]
            task.to_fill.pop(peer_id, None)
            for piece, source in member.running.items():
                self._release(task, peer_id, source, piece)
            for piece in member.has:
                task.holders.get(piece, set()).discard(peer_id)
        # Withdraw uploads the gone peer was serving; their downloaders get new sources.
        for other_id, piece in list(task.serving.get(peer_id, ())):
            other = task.members.get(other_id)
            if other is not None and other.running.get(piece) == peer_id:
                self._withdraw(task, other, piece)
