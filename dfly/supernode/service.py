"""The supernode's core: tasks, the CDN, the scheduler and the peers' sessions.

Peers keep one control connection (C{hello}, then C{register}/C{done}/
C{fail}/C{leave}/C{lost}); the supernode pushes C{assign}, C{task_info},
C{task_failed} and C{check} to them the moment scheduling or the CDN produces
something.  Any connection may also C{get} slices the CDN holds.  A lost
control connection drops the peer from scheduling at once and re-offers its
work.

A C{register} is a request for the file: a cached copy older than
C{revalidate_after} is first checked with the origin, and an unknown task is
fetched.  A C{register} with C{"seed": true} only announces a finished file a
peer holds (it does so after every reconnect): it never starts a fetch or a
revalidation, and the peer joins the task's swarm only when its copy is of the
task's current generation.  Every task description carries C{fresh_ms}, how
much longer the supernode trusts that generation without asking the origin, so
that peers ask again (by registering) only once that has run out.  A C{fail}
with the reason C{"not downloading"} means the peer has no download of the task
at all: it leaves the task, rather than being offered the piece again.

A C{fail} with C{"kind": "md5"} says the slice arrived whole with another md5
than the piece's.  If its source is a peer holding the piece, the supernode
sends that peer C{check} (task, piece, the piece's md5): the peer reads its copy
back from disk, and if it is damaged drops it (a finished file leaves the task;
an unfinished download answers C{lost} for the piece and fetches it again).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dfly.errors import BadControlMessage, DflyError, PieceUnavailable
from dfly.pieces import OVERHEAD, TAIL, Layout, SliceHeader
from dfly.ratelimit import make_bucket
from dfly.supernode.cdn import Cdn, CdnTask
from dfly.supernode.scheduler import CDN, Assignment, Scheduler
from dfly.urls import (
    check_url,
    credential_key,
    digest_scope,
    digest_task_id,
    filter_url,
    origin_headers,
    task_id_for,
)
from dfly.wire.messages import (
    decode_ranges,
    get_bool,
    get_int,
    get_md5,
    get_opt_int,
    get_opt_str,
    get_str,
    get_str_list,
    get_task_id,
)
from dfly.wire.protocol import FramedProtocol, GrowingRange, SliceSource
from dfly.wire.serve import SliceServerSession

PROTOCOL_VERSION = 1
# The reason of a peer's C{fail} for a piece of a task it has no download of.
NOT_DOWNLOADING = "not downloading"
_PEER_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,200}$")
# Seconds before the same peer is asked again to check the same piece of a task, and how
# many such requests are remembered (the expired ones are forgotten; with that many
# recent ones, no more checks are asked for until some expire).
CHECK_INTERVAL = 10.0
MAX_CHECKS_REMEMBERED = 4096


@dataclass
class MemberStats:
    """Bytes one peer received for one task, by kind of source."""

    from_cdn: int = 0
    from_peers: int = 0
    joined: float = 0.0
    finished: float | None = None


class Supernode:
    """Everything the supernode knows; sessions call into it."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        http: Any,
        home: str,
        scheduler: Scheduler | None = None,
        piece_size: int | None = None,
        origin_idle_timeout: float = 60.0,
        revalidate_after: float = 5.0,
        cache_limit: int = 0,
        origin_rate: float = 0,
        upload_rate: float = 0,
    ) -> None:
        self._reactor = reactor
        self.scheduler = scheduler or Scheduler()
        # Slices served to peers, all connections together (the peer port's factory uses it).
        self.upload_bucket = make_bucket(reactor, upload_rate)
        self.cdn = Cdn(
            reactor,
            http,
            home,
            on_headers=self._cdn_headers,
            on_piece=self._cdn_piece,
            on_done=self._cdn_done,
            on_fail=self._cdn_failed,
            on_started=self._cdn_piece_started,
            piece_size=piece_size,
            idle_timeout=origin_idle_timeout,
            origin_bucket=make_bucket(reactor, origin_rate),
        )
        self.tasks: dict[str, CdnTask] = {}
        self.sessions: dict[str, SupernodeSession] = {}
        self.stats: dict[tuple[str, str], MemberStats] = {}
        self.revalidate_after = revalidate_after
        self.cache_limit = cache_limit
        # (peer, task, piece) -> when that peer was last asked to check that piece.
        self._checks: dict[tuple[str, str, int], float] = {}
        # Registrations waiting for a revalidation of their task to finish.
        self._waiting: dict[str, list[tuple[SupernodeSession, dict[str, Any]]]] = {}
        for task in self.cdn.load_cached():
            self.tasks[task.task_id] = task
            self.scheduler.add_task(task.task_id)
            if task.state == "done":
                assert task.piece_count is not None
                for n in range(task.piece_count):
                    self.scheduler.cdn_piece_ready(task.task_id, n)
                self.scheduler.cdn_finished(task.task_id, task.piece_count)
            self._log.info(
                "loaded cached task {task_id} ({state}) for {url}", task_id=task.task_id, state=task.state, url=task.task_url
            )

    def make_session(self, wire: FramedProtocol) -> SupernodeSession:
        return SupernodeSession(wire, self)

    # -- peer requests -----------------------------------------------------
    def hello(self, session: SupernodeSession, peer_id: str) -> None:
        old = self.sessions.get(peer_id)
        if old is not None and old is not session and old.wire.connected_open and old.wire.peer_host != session.wire.peer_host:
            # A live peer keeps its id against a newcomer from elsewhere (no hijacking by id).
            raise BadControlMessage(f"peer id {peer_id} is in use by a live peer")
        if old is not None and old is not session:
            self._log.info("peer {peer_id} reconnected; closing its old connection", peer_id=peer_id)
            self._peer_gone(peer_id)
            old.wire.close()
        self.sessions[peer_id] = session

    def register(self, session: SupernodeSession, msg: dict[str, Any]) -> None:
        assert session.peer_id is not None
        req = get_int(msg, "req")
        try:
            url = get_str(msg, "url")
            check_url(url)
            lines = get_str_list(msg, "headers", 64)
            headers = origin_headers(lines)
            task_url = filter_url(url, get_str_list(msg, "filter", 64))
            md5 = get_md5(msg, "md5") if msg.get("md5") else None
            seed = get_bool(msg, "seed")
            digest = get_opt_str(msg, "digest", 80)
            if digest is not None:
                task_id = digest_task_id(digest, digest_scope(url, lines))
            else:
                sign = md5 or get_opt_str(msg, "identifier", 512) or ""
                task_id = task_id_for(task_url, sign, credential_key(lines))
        except (DflyError, BadControlMessage) as e:
            # A request we cannot serve is refused; the peer's link stays up for its others.
            session.wire.send_control({"op": "refused", "req": req, "reason": str(e)})
            return
        if task_id in self._waiting:
            self._waiting[task_id].append((session, msg))
            return
        task = self.tasks.get(task_id)
        if seed:
            # A finished file announced after a reconnect: nobody asked for a download, so
            # nothing is fetched or revalidated for it.
            if task is None:
                self._log.info(
                    "peer {peer_id} holds task {task_id}, unknown here; not sharing it",
                    peer_id=session.peer_id, task_id=task_id,
                )
                session.wire.send_control({"op": "registered", "req": req, "task": task_id, "state": "unknown"})
            else:
                self._admit(session, task, msg)
            return
        if task is None:
            task = CdnTask(
                task_id, url, task_url, headers, expected_md5=md5, expected_sha256=digest, created=time.time()
            )
            self.tasks[task_id] = task
            self.scheduler.add_task(task_id)
            self.cdn.start(task)
        elif task.state == "partial":
            task.headers = headers
            self.cdn.start(task)
        elif (
            task.state == "done"
            and task.expected_sha256 is None  # content named by its digest never changes
            and self._reactor.seconds() - task.validated_at >= self.revalidate_after
        ):
            self._revalidate(task, headers, session, msg)
            return
        self._admit(session, task, msg)

    def _admit(self, session: SupernodeSession, task: CdnTask, msg: dict[str, Any]) -> None:
        """Answer a registration for C{task} and let the peer join its swarm."""
        assert session.peer_id is not None
        task.last_access = self._reactor.seconds()
        if not session.wire.connected_open or self.sessions.get(session.peer_id) is not session:
            return
        if task.piece_count is not None:
            limit = task.piece_count
        elif task.length is not None and task.piece_size:
            limit = Layout(task.length, task.piece_size).count
        else:
            limit = len(task.piece_len)  # size unknown: only pieces already cached can be held
        have = decode_ranges(get_opt_str(msg, "have", 60000) or "", limit, clamp=True)
        if get_opt_str(msg, "generation", 64) != task.generation:
            if get_bool(msg, "seed"):
                # Another version than the task's: the announcing peer has nothing to share
                # (it drops its copy when the task's generation differs from its own).
                session.wire.send_control({"op": "registered", "req": get_int(msg, "req"), **self._task_info(task)})
                return
            have = set()  # pieces of another version of the content are worthless here
        self.stats.setdefault((task.task_id, session.peer_id), MemberStats(joined=time.time()))
        session.tasks.add(task.task_id)
        session.wire.send_control({"op": "registered", "req": get_int(msg, "req"), **self._task_info(task)})
        if task.state == "failed":
            return
        self._dispatch(self.scheduler.join(task.task_id, session.peer_id, have))

    def _revalidate(
        self, task: CdnTask, headers: dict[bytes, list[bytes]], session: SupernodeSession, msg: dict[str, Any]
    ) -> None:
        """Check a cached task against its origin before anyone else is served from it."""
        waiting = self._waiting[task.task_id] = [(session, msg)]

        def decided(current: bool) -> None:
            del self._waiting[task.task_id]
            if current:
                task.validated_at = self._reactor.seconds()
                target = task
            else:
                self._log.info("origin changed {url}; fetching the new version", url=task.task_url)
                target = self._replace(task, headers)
            for s, m in waiting:
                try:
                    self._admit(s, target, m)
                except BadControlMessage:
                    s.wire.close(abort=True)

        self.cdn.revalidate(task, headers).addCallback(decided).addErrback(
            lambda f: self._log.failure("revalidation of {task_id} failed", f, task_id=task.task_id)
        )

    def _replace(self, old: CdnTask, headers: dict[bytes, list[bytes]]) -> CdnTask:
        """Drop a task whose content changed at the origin and start its new version."""
        self._broadcast(old, {"op": "task_reset", "task": old.task_id})
        self.scheduler.remove_task(old.task_id)
        self.cdn.discard(old)
        task = CdnTask(
            old.task_id, old.url, old.task_url, headers,
            expected_md5=old.expected_md5, expected_sha256=old.expected_sha256, created=time.time(),
        )
        self.tasks[task.task_id] = task
        self.scheduler.add_task(task.task_id)
        self.cdn.start(task)
        return task

    def piece_done(self, session: SupernodeSession, msg: dict[str, Any]) -> None:
        task_id, piece, source = self._piece_report(session, msg)
        task = self.tasks.get(task_id)
        if task is None or session.peer_id is None:
            return
        sched = self.scheduler.tasks.get(task_id)
        member = sched.members.get(session.peer_id) if sched is not None else None
        if sched is None or member is None or piece not in member.running:
            return  # nothing was assigned: a claim, not a result (the scheduler ignores it too)
        stats = self.stats.setdefault((task_id, session.peer_id), MemberStats(joined=time.time()))
        if source == CDN:
            stats.from_cdn += task.piece_len.get(piece, 0)
        else:
            stats.from_peers += task.piece_len.get(piece, 0)
        attempt = get_opt_int(msg, "attempt", 0, 1 << 62)
        self._dispatch(self.scheduler.piece_done(task_id, session.peer_id, piece, source, attempt))
        if stats.finished is None and self.scheduler.member_complete(sched, member):
            stats.finished = time.time()

    def piece_failed(self, session: SupernodeSession, msg: dict[str, Any]) -> None:
        task_id, piece, source = self._piece_report(session, msg)
        assert session.peer_id is not None
        reason = get_opt_str(msg, "reason", 1024) or "?"
        if reason == NOT_DOWNLOADING:
            # No failure to retry: the peer has no download of the task (it dropped it), so
            # any piece offered to it again would come back the same way, at once.
            if task_id in session.tasks or self._member(task_id, session.peer_id):
                self._log.info(
                    "peer {peer_id} is not downloading task {task_id}; it leaves the task",
                    peer_id=session.peer_id, task_id=task_id,
                )
            self._leave(session, task_id)
            return
        self._log.warn(
            "peer {peer_id} failed piece {piece} of {task_id} from {source}: {reason}",
            peer_id=session.peer_id,
            piece=piece,
            task_id=task_id,
            source=source,
            reason=reason,
        )
        attempt = get_opt_int(msg, "attempt", 0, 1 << 62)
        # A slice that failed its md5 from a peer holding the piece: that peer's copy may be
        # damaged on its disk, which only it can tell.  Asked only for a report on the
        # assignment on record (a made-up report of another attempt asks nothing).
        mismatch = get_opt_str(msg, "kind", 32) == "md5" and source != CDN
        ask = mismatch and self._holds_assigned(task_id, session.peer_id, piece, source, attempt)
        self._dispatch(self.scheduler.piece_failed(task_id, session.peer_id, piece, source, attempt))
        task = self.tasks.get(task_id)
        if ask and task is not None:
            self._ask_check(task, piece, source)
        if source == CDN and task is not None and task.state == "done" and not self.cdn.piece_intact(task, piece):
            self._repair(task, piece)

    def _holds_assigned(self, task_id: str, peer_id: str, piece: int, source: str, attempt: int | None) -> bool:
        """Whether C{peer_id} runs C{piece} from C{source} in C{attempt} (if named), and
        C{source} holds the piece (a relay still receiving it is judged otherwise)."""
        sched = self.scheduler.tasks.get(task_id)
        member = sched.members.get(peer_id) if sched is not None else None
        holder = sched.members.get(source) if sched is not None else None
        return (
            member is not None
            and holder is not None
            and member.running.get(piece) == source
            and (attempt is None or member.attempts.get(piece) == attempt)
            and piece in holder.has
        )

    def _ask_check(self, task: CdnTask, piece: int, source: str) -> None:
        """Ask C{source} to check its copy of C{piece} against the md5 computed here (at most
        once per C{CHECK_INTERVAL} for one piece of one peer)."""
        md5 = task.piece_md5.get(piece)
        session = self.sessions.get(source)
        if md5 is None or session is None:
            return
        now = self._reactor.seconds()
        key = (source, task.task_id, piece)
        last = self._checks.get(key)
        if last is not None and now - last < CHECK_INTERVAL:
            return
        if len(self._checks) >= MAX_CHECKS_REMEMBERED:
            self._checks = {k: t for k, t in self._checks.items() if now - t < CHECK_INTERVAL}
            if len(self._checks) >= MAX_CHECKS_REMEMBERED:
                return  # a flood of reports: the pieces are asked about again later
        self._checks[key] = now
        self._log.info(
            "asking peer {source} to check its copy of piece {piece} of {task_id}",
            source=source, piece=piece, task_id=task.task_id,
        )
        session.wire.send_control({"op": "check", "task": task.task_id, "piece": piece, "md5": md5})

    def piece_lost(self, session: SupernodeSession, msg: dict[str, Any]) -> None:
        """A peer's copy of a piece failed its check: it holds the piece no more."""
        assert session.peer_id is not None
        task_id, piece = get_task_id(msg), get_int(msg, "piece", 0, 1 << 24)
        if self._member(task_id, session.peer_id):
            self._log.warn(
                "peer {peer_id} found its copy of piece {piece} of {task_id} damaged; it fetches it again",
                peer_id=session.peer_id, piece=piece, task_id=task_id,
            )
        self._dispatch(self.scheduler.piece_lost(task_id, session.peer_id, piece))

    def _repair(self, task: CdnTask, piece: int) -> None:
        """The cached copy is damaged: stop offering it and fetch what is bad again."""
        self._log.warn(
            "cache of task {task_id} is damaged (piece {piece} fails its md5); refetching from the origin",
            task_id=task.task_id, piece=piece,
        )
        self.scheduler.cdn_withdrawn(task.task_id)
        task.state = "partial"
        self.cdn.start(task)

    def collect_garbage(self) -> list[str]:
        """Evict least recently used idle tasks while the cache is above its limit."""
        if not self.cache_limit:
            return []
        total = sum(t.cache_bytes() for t in self.tasks.values())
        evicted: list[str] = []
        for task in sorted(self.tasks.values(), key=lambda t: t.last_access):
            if total <= self.cache_limit * 0.9:
                break
            if task.state not in ("done", "partial") or self.scheduler.busy(task.task_id):
                continue  # never evict what is being fetched, served or downloaded
            total -= task.cache_bytes()
            self._log.info("evicting task {task_id} from the cache", task_id=task.task_id)
            self.scheduler.remove_task(task.task_id)
            self.cdn.discard(task)
            del self.tasks[task.task_id]
            evicted.append(task.task_id)
        return evicted

    def leave(self, session: SupernodeSession, msg: dict[str, Any]) -> None:
        self._leave(session, get_task_id(msg))

    def _leave(self, session: SupernodeSession, task_id: str) -> None:
        assert session.peer_id is not None
        session.tasks.discard(task_id)
        self._dispatch(self.scheduler.leave(task_id, session.peer_id))

    def _member(self, task_id: str, peer_id: str) -> bool:
        sched = self.scheduler.tasks.get(task_id)
        return sched is not None and peer_id in sched.members

    def session_lost(self, session: SupernodeSession) -> None:
        if session.peer_id is not None and self.sessions.get(session.peer_id) is session:
            del self.sessions[session.peer_id]
            self._peer_gone(session.peer_id)

    def _peer_gone(self, peer_id: str) -> None:
        self._log.info("peer {peer_id} gone; re-offering its work", peer_id=peer_id)
        for key in [k for k in self.stats if k[1] == peer_id]:
            del self.stats[key]
        self._dispatch(self.scheduler.peer_gone(peer_id))

    @staticmethod
    def _piece_report(session: SupernodeSession, msg: dict[str, Any]) -> tuple[str, int, str]:
        if session.peer_id is None:
            raise BadControlMessage(f"{msg['op']} before hello")
        return get_task_id(msg), get_int(msg, "piece", 0, 1 << 24), get_str(msg, "source", 256)

    # -- the CDN as a source of slices ---------------------------------------
    def lookup(self, task_id: str, piece: int, who: str) -> tuple[SliceSource, int, int]:
        task = self.tasks.get(task_id)
        if task is None or task.fd is None or task.piece_size is None:
            raise PieceUnavailable("unknown task")
        data_len = task.piece_len.get(piece)
        if data_len is None:
            raise PieceUnavailable(f"piece {piece} is not cached yet")
        task.last_access = self._reactor.seconds()

        def done(ok: bool, sent: int) -> None:
            task.served_bytes += sent

        source = SliceSource(task.fd, piece * task.piece_size, data_len + OVERHEAD, on_done=done)
        return source, task.piece_size, data_len

    def relay_lookup(self, task_id: str, piece: int, who: str) -> tuple[SliceSource, int, int]:
        """A relay get: a cached piece as L{lookup}; the piece the origin fetch is writing now
        is streamed as it arrives (its header from the known length, its tail once whole)."""
        task = self.tasks.get(task_id)
        if task is None or piece in task.piece_len or task.receiving != piece:
            return self.lookup(task_id, piece, who)
        if task.fd is None or task.piece_size is None or task.length is None:
            raise PieceUnavailable(f"piece {piece} is not cached yet")
        data_len = Layout(task.length, task.piece_size).data_len(piece)
        stream = task.streams.get(piece)
        if stream is None:
            stream = task.streams[piece] = GrowingRange()
            stream.grew(task.received)
        task.last_access = self._reactor.seconds()
        task.streamed += 1

        def done(ok: bool, sent: int) -> None:
            task.served_bytes += sent

        header = SliceHeader(data_len, task.piece_size).encode()
        source = SliceSource(
            task.fd, piece * task.piece_size + 4, data_len, header, TAIL, on_done=done, growing=stream
        )
        return source, task.piece_size, data_len

    # -- CDN events ----------------------------------------------------------
    def _cdn_headers(self, task: CdnTask) -> None:
        sched = self.scheduler.tasks.get(task.task_id)
        if sched is not None and (sched.available or any(m.has or m.running for m in sched.members.values())):
            # A resumed fetch found another version at the origin: what the members hold (and
            # told us after a restart) is of the old one.  They drop it and register again;
            # the scheduler starts over, else it would count pieces nobody holds any more.
            self._broadcast(task, {"op": "task_reset", "task": task.task_id})
            self.scheduler.remove_task(task.task_id)
            self.scheduler.add_task(task.task_id)
        self._broadcast(task, {"op": "task_info", **self._task_info(task)})

    def _cdn_piece_started(self, task: CdnTask, piece: int) -> None:
        self._dispatch(self.scheduler.cdn_piece_started(task.task_id, piece))

    def _cdn_piece(self, task: CdnTask, piece: int) -> None:
        md5 = task.piece_md5[piece]
        for peer_id in task.md5_waiters.pop(piece, ()):
            session = self.sessions.get(peer_id)
            if session is not None:
                session.wire.send_control({"op": "piece_md5", "task": task.task_id, "piece": piece, "md5": md5})
        self._dispatch(self.scheduler.cdn_piece_ready(task.task_id, piece))

    def _cdn_done(self, task: CdnTask) -> None:
        assert task.piece_count is not None
        task.last_access = self._reactor.seconds()
        self._broadcast(task, {"op": "task_info", **self._task_info(task)})
        self._dispatch(self.scheduler.cdn_finished(task.task_id, task.piece_count))
        self.collect_garbage()

    def _cdn_failed(self, task: CdnTask) -> None:
        self.scheduler.cdn_failed(task.task_id)
        msg = {"op": "task_failed", **self._task_info(task)}
        self._broadcast(task, msg)
        # Forget the task so that the next registration tries the origin afresh.
        if self.tasks.get(task.task_id) is task:
            del self.tasks[task.task_id]
        self.scheduler.remove_task(task.task_id)

    # -- sending -------------------------------------------------------------
    def _task_info(self, task: CdnTask) -> dict[str, Any]:
        fresh = 0
        if task.generation is not None:
            left = self.revalidate_after - (self._reactor.seconds() - task.validated_at)
            fresh = int(max(0.0, left) * 1000)
        return {
            "task": task.task_id,
            "state": task.state,
            "generation": task.generation,
            "fresh_ms": fresh,
            "length": task.length,
            "piece_size": task.piece_size,
            "piece_count": task.piece_count,
            "md5": task.file_md5,
            "reason": task.error,
            "kind": task.error_kind,
            "status": task.status,
        }

    def _broadcast(self, task: CdnTask, msg: dict[str, Any]) -> None:
        sched = self.scheduler.tasks.get(task.task_id)
        if sched is None:
            return
        for peer_id in list(sched.members):
            session = self.sessions.get(peer_id)
            if session is not None:
                session.wire.send_control(msg)

    def _dispatch(self, assignments: list[Assignment]) -> None:
        for a in assignments:
            session = self.sessions.get(a.peer)
            task = self.tasks.get(a.task)
            if session is None or task is None or task.piece_size is None:
                continue
            if a.source == CDN:
                source: Any = CDN
            else:
                src = self.sessions.get(a.source)
                if src is None:
                    continue
                source = {"id": a.source, "host": src.host, "port": src.port}
            md5 = task.piece_md5.get(a.piece)
            if md5 is None:
                # A piece still arriving from the origin (relayed from the CDN or a peer): its
                # md5 is sent to this peer once the piece is whole.
                if task.length is None:
                    continue
                data_len = Layout(task.length, task.piece_size).data_len(a.piece)
                task.md5_waiters.setdefault(a.piece, set()).add(a.peer)
            else:
                data_len = task.piece_len[a.piece]
            msg = {
                "op": "assign",
                "task": a.task,
                "piece": a.piece,
                "source": source,
                "md5": md5,
                "len": data_len,
                "piece_size": task.piece_size,
                "attempt": a.attempt,
            }
            if a.relay:
                msg["relay"] = True
                task.relayed += 1
            session.wire.send_control(msg)

    # -- reporting -------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """The state of every task, for the HTTP API."""
        out = []
        for task in self.tasks.values():
            sched = self.scheduler.tasks.get(task.task_id)
            peers = []
            if sched is not None:
                for peer_id, member in sched.members.items():
                    session = self.sessions.get(peer_id)
                    stats = self.stats.get((task.task_id, peer_id), MemberStats())
                    peer_state = self.scheduler.peers.get(peer_id)
                    peers.append(
                        {
                            "id": peer_id,
                            "host": session.host if session else None,
                            "port": session.port if session else None,
                            "pieces": len(member.has),
                            "running": len(member.running),
                            "done": self.scheduler.member_complete(sched, member),
                            "from_cdn_bytes": stats.from_cdn,
                            "from_peers_bytes": stats.from_peers,
                            "seconds": (stats.finished - stats.joined) if stats.finished else None,
                            "blacklisted": bool(peer_state and peer_state.blacklisted),
                        }
                    )
            out.append(
                {
                    "id": task.task_id,
                    "url": task.task_url,
                    "length": task.length,
                    "piece_size": task.piece_size,
                    "piece_count": task.piece_count,
                    "pieces_cached": len(task.piece_md5),
                    "state": task.state,
                    "md5": task.file_md5,
                    "error": task.error,
                    "source_bytes": task.source_bytes,
                    "served_bytes": task.served_bytes,
                    "streamed": task.streamed,
                    "relayed": task.relayed,
                    "peers": peers,
                }
            )
        return out


class SupernodeSession(SliceServerSession):
    """One connection to the supernode: a peer's control channel, or a slice fetch."""

    def __init__(self, wire: FramedProtocol, node: Supernode) -> None:
        super().__init__(wire, node.lookup, node.relay_lookup)
        self.node = node
        self.peer_id: str | None = None
        self.host = ""
        self.port = 0
        self.tasks: set[str] = set()

    def other_control(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "ping":
            self.wire.send_control({"op": "pong"})
        elif op == "hello":
            if self.peer_id is not None:
                raise BadControlMessage("second hello")
            peer_id = get_str(msg, "peer", 200)
            if not _PEER_ID.match(peer_id) or peer_id == CDN:
                raise BadControlMessage("hello needs a peer id of letters, digits and ._:@-")
            self.port = get_int(msg, "port", 0, 65535)
            self.host = get_opt_str(msg, "host", 255) or self.wire.peer_host
            self.node.hello(self, peer_id)
            self.peer_id = peer_id
            self.wire.send_control({"op": "welcome", "version": PROTOCOL_VERSION})
        elif self.peer_id is None:
            raise BadControlMessage(f"{op} before hello")
        elif op == "register":
            self.node.register(self, msg)
        elif op == "done":
            self.node.piece_done(self, msg)
        elif op == "fail":
            self.node.piece_failed(self, msg)
        elif op == "leave":
            self.node.leave(self, msg)
        elif op == "lost":
            self.node.piece_lost(self, msg)
        else:
            raise BadControlMessage(f"unknown op {op!r}")

    def connection_lost(self, reason: Failure) -> None:
        self.node.session_lost(self)


