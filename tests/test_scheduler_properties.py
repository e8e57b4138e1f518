"""Property tests for dfly.supernode.scheduler: random event sequences never break its rules.

Hypothesis drives a scheduler with random joins, piece arrivals, completions,
failures, pieces lost by their holders, departures, withdrawals and task removals,
and after every event checks the rules of the module docstring on the assignments it
returned, the consistency of its incremental indexes with a recount from scratch, and
that a full pass (L{Scheduler.schedule}) finds nothing the event left unassigned.
Finally it lets every running download finish and checks that every member completes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfly.supernode.scheduler import CDN, Assignment, Scheduler

T = "task"
PEERS = [f"p{i}" for i in range(7)]


def check_state(s: Scheduler) -> None:
    """Limits hold, the load counters agree with the running downloads, and every index
    agrees with a recount from the members."""
    uploads: Counter[str] = Counter()
    for task in s.tasks.values():
        inflight: Counter[int] = Counter()
        cdn = set()
        for pid, member in task.members.items():
            assert len(member.running) <= s.down_limit
            for piece, source in member.running.items():
                assert piece not in member.has
                inflight[piece] += 1
                if source == CDN:
                    assert piece not in cdn, "two peers fetch the same piece from the CDN"
                    cdn.add(piece)
                else:
                    uploads[source] += 1
            for piece in member.has:
                assert pid in task.holders[piece]
            assert member.relays <= member.running.keys()
            assert member.attempts.keys() == member.running.keys()
            assert member.hops.keys() <= member.running.keys()
            for hops in member.hops.values():
                # Relays in a row upstream when assigned (the count stays as it was when
                # an upstream relay finishes the piece and becomes a holder).
                assert 1 <= hops <= s.relay_depth
            for piece in member.relays:
                assert member.hops.get(piece, 0) < s.relay_depth
            if not s.relay:
                assert not member.relays
        assert len(cdn) <= s.cdn_limit
        assert task.cdn_inflight == cdn
        assert task.streaming <= task.available
        assert s.relay or not task.streaming
        assert dict(task.inflight) == dict(inflight)
        # Indexes, recounted.
        good: Counter[int] = Counter()
        nfree: Counter[int] = Counter()
        for piece, holders in task.holders.items():
            assert holders <= set(task.members)
            for pid in holders:
                peer = s.peers[pid]
                if peer.blacklisted:
                    continue
                good[piece] += 1
                if peer.uploads < s.up_limit:
                    nfree[piece] += 1
                    assert pid in task.free[piece][peer.uploads]
        for pid, member in task.members.items():
            peer = s.peers[pid]
            if peer.blacklisted or peer.uploads >= s.up_limit:
                continue
            for piece in member.relays:
                nfree[piece] += 1
                assert pid in task.free[piece][s.up_limit + peer.uploads]
        assert dict(task.good) == dict(good)
        assert dict(task.nfree) == dict(nfree)
        for piece, buckets in task.free.items():
            assert sum(len(b) for b in buckets) == nfree.get(piece, 0)
        for piece, want in task.wanting.items():
            assert want, "empty wanting entries are dropped"
            for pid in want:
                assert pid in task.blocked
                member = task.members[pid]
                assert piece in task.available and piece not in member.has and piece not in member.running
        for pid in task.blocked:
            member = task.members[pid]
            assert len(member.running) < s.down_limit and not member.seeding_only
            for piece in task.available - member.has - member.running.keys():
                assert pid in task.wanting[piece]
    for pid, peer in s.peers.items():
        assert peer.uploads == uploads.get(pid, 0)
        assert peer.uploads <= s.up_limit


def check_new(s: Scheduler, new: list[Assignment], before: dict[tuple[str, str], set[int]]) -> None:
    """Each new assignment names a piece the peer lacked and did not run, from a source
    allowed by the rules."""
    seen: set[tuple[str, str, int]] = set()
    for a in new:
        task = s.tasks[a.task]
        assert not task.failed, "an assignment after the CDN failed"
        member = task.members[a.peer]
        assert (a.task, a.peer, a.piece) not in seen
        seen.add((a.task, a.peer, a.piece))
        assert a.piece in task.available
        assert a.piece not in before.get((a.task, a.peer), set()), "assigned a piece the peer had or ran"
        assert a.source != a.peer
        assert member.running.get(a.piece) == a.source
        usable = {
            h
            for h in task.holders.get(a.piece, ())
            if h != a.peer and h not in member.avoid and not s.peers[h].blacklisted
        }
        isolated = s.peers[a.peer].client_errors >= s.isolation_limit
        relays = {
            r
            for r, m in task.members.items()
            if a.piece in m.relays and r != a.peer and r not in member.avoid and not s.peers[r].blacklisted
        }
        if a.source == CDN:
            assert a.relay == (a.piece in task.streaming), "a CDN relay is a piece the CDN still receives"
            assert member.hops.get(a.piece, 0) == (1 if a.relay else 0)
            assert isolated or not usable, "the CDN served a piece a usable peer holds"
        elif a.relay:
            assert not isolated and s.relay
            assert member.hops[a.piece] == task.members[a.source].hops.get(a.piece, 0) + 1
            assert a.source in relays, "relay source does not receive the piece, is avoided or blacklisted"
        else:
            assert not isolated
            assert a.source in usable, "source does not hold the piece, is avoided or blacklisted"


def snapshot(s: Scheduler, ends_downloads: bool) -> dict[tuple[str, str], set[int]]:
    """What each member had (and ran, unless the event may end running downloads and
    rightly hand the piece out again; a double assignment would still show in the
    load counters C{check_state} recounts)."""
    return {
        (tid, pid): m.has | (set() if ends_downloads else set(m.running))
        for tid, task in s.tasks.items()
        for pid, m in task.members.items()
    }


def step(
    s: Scheduler, call: Callable[..., Any], *args: Any, ends_downloads: bool = False,
    now_holds: tuple[str, str, set[int]] | None = None, **kw: Any,
) -> list[Assignment]:
    """Run one scheduler call, check everything, and assert the full pass finds nothing more.
    C{now_holds} (task, peer, pieces): a member joining again says it holds just these, so
    what else it held may rightly be assigned to it again."""
    before = snapshot(s, ends_downloads)
    if now_holds is not None:
        tid, pid, pieces = now_holds
        if (tid, pid) in before:
            member = s.tasks[tid].members[pid]
            before[(tid, pid)] = member.has & pieces | (set() if ends_downloads else set(member.running))
    new = call(*args, **kw)
    check_new(s, new or [], before)
    check_state(s)
    for tid in list(s.tasks):
        assert s.schedule(tid) == [], "an event left something assignable unassigned"
    return new or []


def running(s: Scheduler) -> list[tuple[str, str, int, str]]:
    return sorted(
        (tid, pid, piece, src)
        for tid, task in s.tasks.items()
        for pid, m in task.members.items()
        for piece, src in m.running.items()
    )


limits = st.fixed_dictionaries(
    {
        "down_limit": st.integers(1, 4),
        "up_limit": st.integers(1, 5),
        "cdn_limit": st.integers(1, 4),
        "blacklist_limit": st.integers(1, 4),
        "isolation_limit": st.integers(1, 4),
        "relay": st.booleans(),
        "relay_depth": st.integers(1, 3),
    }
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(limits=limits, n_pieces=st.integers(1, 9), data=st.data())
def test_random_events_keep_the_rules_and_complete(limits: dict[str, int], n_pieces: int, data: st.DataObject) -> None:
    """Random sequences of every event (a CDN failure included: nothing is assigned after it)
    keep all rules and indexes; the incremental result is
    what a full pass would give; and once the CDN holds everything and the downloads run to
    the end, every member that still downloads completes."""
    s = Scheduler(**limits)
    s.add_task(T)
    draw = data.draw
    for _ in range(draw(st.integers(0, 60))):
        kind = draw(
            st.sampled_from(
                ["ready", "start", "join", "done", "done", "done", "fail", "leave", "gone", "withdraw", "finish", "late", "lost"]
                * 4
                + ["cdn_failed"]
            )
        )
        task = s.tasks[T]
        if kind == "ready":
            piece = draw(st.integers(0, n_pieces - 1))
            step(s, s.cdn_piece_ready, T, piece)
        elif kind == "start":
            piece = draw(st.integers(0, n_pieces - 1))
            step(s, s.cdn_piece_started, T, piece)
        elif kind == "finish":
            step(s, s.cdn_finished, T, n_pieces)
        elif kind == "withdraw":
            step(s, s.cdn_withdrawn, T)
        elif kind == "cdn_failed":
            step(s, s.cdn_failed, T)
        elif kind == "join":
            pid = draw(st.sampled_from(PEERS))
            has = draw(st.sets(st.integers(0, n_pieces - 1), max_size=n_pieces))
            seeding = draw(st.booleans())
            # Joining again with fewer pieces withdraws downloads from this member.
            step(s, s.join, T, pid, has, seeding_only=seeding, ends_downloads=True, now_holds=(T, pid, set(has)))
        elif kind in ("done", "fail"):
            runs = running(s)
            if not runs:
                continue
            tid, pid, piece, src = draw(st.sampled_from(runs))
            # Peers name the attempt they report on (or, like older peers, do not).
            attempt = s.tasks[tid].members[pid].attempts[piece] if draw(st.booleans()) else None
            if kind == "done":
                # Now and then the peer names another source than the one on record.
                named = src if draw(st.integers(0, 9)) else draw(st.sampled_from([*PEERS, CDN]))
                step(s, s.piece_done, tid, pid, piece, named, attempt, ends_downloads=True)
            else:
                step(s, s.piece_failed, tid, pid, piece, src, attempt, ends_downloads=True)
        elif kind == "late":
            # A failure report of an earlier attempt at a piece running again from the same
            # source changes nothing.
            runs = running(s)
            if not runs:
                continue
            tid, pid, piece, src = draw(st.sampled_from(runs))
            old = s.tasks[tid].members[pid].attempts[piece] - draw(st.integers(1, 5))
            before = running(s)
            assert step(s, s.piece_failed, tid, pid, piece, src, old) == []
            assert running(s) == before
        elif kind == "lost":
            # A member's copy of a piece failed a check on its disk: it holds it no more.
            held = sorted((pid, p) for pid, m in task.members.items() for p in m.has)
            if not held:
                continue
            pid, piece = draw(st.sampled_from(held))
            before = snapshot(s, ends_downloads=True)
            before[(T, pid)].discard(piece)  # it may rightly be assigned the piece again at once
            new = s.piece_lost(T, pid, piece)
            check_new(s, new, before)
            check_state(s)
            assert s.schedule(T) == [], "an event left something assignable unassigned"
            assert piece not in task.members[pid].has and pid not in task.holders.get(piece, set())
        elif kind == "leave" and task.members:
            pid = draw(st.sampled_from(sorted(task.members)))
            step(s, s.leave, T, pid, ends_downloads=True)
        elif kind == "gone" and s.peers:
            pid = draw(st.sampled_from(sorted(s.peers)))
            step(s, s.peer_gone, pid, ends_downloads=True)
    if s.tasks[T].failed:
        return  # nothing more is assigned (check_new saw to that); no completion to expect
    # The end: the CDN holds everything; downloads finish one by one in a random order.
    for piece in range(n_pieces):
        step(s, s.cdn_piece_ready, T, piece)
    step(s, s.cdn_finished, T, n_pieces)
    for _ in range(10_000):
        runs = running(s)
        if not runs:
            break
        tid, pid, piece, src = draw(st.sampled_from(runs)) if len(runs) < 4 else runs[draw(st.integers(0, len(runs) - 1))]
        step(s, s.piece_done, tid, pid, piece, src, ends_downloads=True)
    assert running(s) == []
    task = s.tasks[T]
    for member in task.members.values():
        if not member.seeding_only:
            assert member.has >= set(range(n_pieces)), member.peer_id
    assert task.cdn_inflight == set() and task.inflight == {}


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_two_tasks_share_upload_slots_and_survive_removal(data: st.DataObject) -> None:
    """Uploads are counted per peer across tasks: with two tasks and a task removed midway,
    up_limit holds everywhere, the other task's blocked members get the freed slots at its
    next event, and everyone left completes."""
    s = Scheduler(up_limit=data.draw(st.integers(1, 3)), down_limit=data.draw(st.integers(1, 3)))
    tasks = ["a", "b", "c"]
    for tid in tasks:
        s.add_task(tid)
        for piece in range(4):
            step(s, s.cdn_piece_ready, tid, piece)
        step(s, s.cdn_finished, tid, 4)
    for pid in PEERS[:5]:
        for tid in data.draw(st.sets(st.sampled_from(tasks), min_size=1)):
            has = data.draw(st.sets(st.integers(0, 3)))
            step(s, s.join, tid, pid, has)
    removed = data.draw(st.sampled_from(tasks))
    for _ in range(data.draw(st.integers(0, 20))):
        runs = running(s)
        if not runs:
            break
        tid, pid, piece, src = data.draw(st.sampled_from(runs))
        step(s, s.piece_done, tid, pid, piece, src, ends_downloads=True)
    s.remove_task(removed)
    check_state(s)
    for tid in s.tasks:  # the next event of each task settles what the removal freed
        step(s, s.cdn_finished, tid, 4)
    for _ in range(1000):
        runs = running(s)
        if not runs:
            break
        tid, pid, piece, src = data.draw(st.sampled_from(runs))
        step(s, s.piece_done, tid, pid, piece, src, ends_downloads=True)
    for task in s.tasks.values():
        for member in task.members.values():
            assert member.has >= set(range(4))
