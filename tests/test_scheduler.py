"""Tests for dfly.supernode.scheduler: pure piece-scheduling logic, no clock or I/O."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dfly.supernode.scheduler import CDN, Assignment, Scheduler

T = "task"


def setup(n_pieces: int, relay: bool = False, **limits: int) -> Scheduler:
    """A scheduler with one task whose first C{n_pieces} pieces the CDN already holds.

    Relaying is off unless asked for: most tests here pin the store-and-forward rules
    (who serves a piece once it is held); relaying has its own tests below."""
    s = Scheduler(relay=relay, **limits)
    s.add_task(T)
    for p in range(n_pieces):
        assert s.cdn_piece_ready(T, p) == []  # nobody has joined yet
    return s


def pairs(assignments: list[Assignment]) -> set[tuple[str, int, str]]:
    """(peer, piece, source) triples of C{assignments}."""
    return {(a.peer, a.piece, a.source) for a in assignments}


def check_invariants(s: Scheduler, task_id: str = T) -> None:
    """Limits hold and the load counters agree with the running downloads."""
    task = s.tasks[task_id]
    uploads: Counter[str] = Counter()
    inflight: Counter[int] = Counter()
    cdn = set()
    for member in task.members.values():
        assert len(member.running) <= s.down_limit
        for piece, source in member.running.items():
            assert piece not in member.has
            inflight[piece] += 1
            if source == CDN:
                assert piece not in cdn, "two peers fetch the same piece from the CDN"
                cdn.add(piece)
            else:
                uploads[source] += 1
    assert len(cdn) <= s.cdn_limit
    assert task.cdn_inflight == cdn
    assert dict(task.inflight) == dict(inflight)
    for pid, peer in s.peers.items():
        assert peer.uploads == uploads.get(pid, 0)
        assert peer.uploads <= s.up_limit


# -- choice of pieces and sources -------------------------------------------------------


def test_rarest_first() -> None:
    """A new peer is assigned the least-held pieces first, in order of increasing holder count."""
    s = setup(5, down_limit=2, up_limit=10)
    # Seeder i holds pieces 0..4-i, so piece p has 5-p holders.
    for i in range(5):
        assert s.join(T, f"seed{i}", has=range(5 - i), seeding_only=True) == []
    got = s.join(T, "new")
    assert sorted(a.piece for a in got) == [3, 4]
    assert all(a.source != CDN for a in got)

    s2 = setup(5, down_limit=5, up_limit=10)
    for i in range(5):
        s2.join(T, f"seed{i}", has=range(5 - i), seeding_only=True)
    assert [a.piece for a in s2.join(T, "new")] == [4, 3, 2, 1, 0]
    check_invariants(s2)


def test_rarest_counts_running_downloads() -> None:
    """A piece already being fetched counts as rarer-no-more: the next peer prefers the other one."""
    s = setup(2, down_limit=1, up_limit=10)
    s.join(T, "seed", has=[0, 1], seeding_only=True)
    first = s.join(T, "a")
    assert len(first) == 1
    second = s.join(T, "b")
    assert len(second) == 1
    assert {first[0].piece, second[0].piece} == {0, 1}


def test_peer_preferred_over_cdn() -> None:
    """A piece held by a usable peer is assigned from that peer, not from the CDN."""
    s = setup(1)
    s.join(T, "holder", has=[0], seeding_only=True)
    assert pairs(s.join(T, "b")) == {("b", 0, "holder")}
    assert s.tasks[T].cdn_inflight == set()


def test_least_loaded_holder_wins() -> None:
    """Among holders, the one with the fewest running uploads is picked."""
    s = setup(3, down_limit=3, up_limit=10)
    s.join(T, "h1", has=[0, 1, 2], seeding_only=True)
    s.join(T, "h2", has=[0, 1, 2], seeding_only=True)
    got = s.join(T, "b")
    counts = Counter(a.source for a in got)
    assert len(got) == 3
    assert set(counts) == {"h1", "h2"}
    assert max(counts.values()) == 2
    check_invariants(s)


def test_cdn_serves_when_no_holder_and_only_once() -> None:
    """With no holder the CDN serves a piece to one peer; a second peer waits instead of a second CDN fetch."""
    s = setup(1)
    assert pairs(s.join(T, "a")) == {("a", 0, CDN)}
    assert s.join(T, "b") == []
    assert s.join(T, "c") == []
    assert s.tasks[T].cdn_inflight == {0}
    check_invariants(s)


def test_cdn_not_used_when_holder_is_busy() -> None:
    """A piece whose only holder is at its upload limit is not taken from the CDN: the peer waits."""
    s = setup(1, up_limit=1)
    s.join(T, "h", has=[0], seeding_only=True)
    assert pairs(s.join(T, "a")) == {("a", 0, "h")}
    assert s.join(T, "b") == []
    assert s.tasks[T].cdn_inflight == set()
    # When h's upload finishes, b gets the piece from a peer (a or h), still not from the CDN.
    got = s.piece_done(T, "a", 0, "h")
    assert len(got) == 1 and got[0].peer == "b" and got[0].source in {"a", "h"}
    check_invariants(s)


def test_cdn_limit_per_task() -> None:
    """At most cdn_limit pieces of a task are served by the CDN at once, across all peers."""
    s = setup(6, down_limit=4, cdn_limit=2)
    a = s.join(T, "a")
    assert [x.source for x in a] == [CDN, CDN]
    assert s.join(T, "b") == []
    assert Scheduler.cdn_load(s.tasks[T]) == 2
    check_invariants(s)
    # One CDN fetch finishes: exactly one new CDN fetch may start, and b can fetch the done piece from a.
    done = a[0]
    got = s.piece_done(T, "a", done.piece, CDN)
    assert sum(1 for x in got if x.source == CDN) == 1
    assert ("b", done.piece, "a") in pairs(got)
    assert Scheduler.cdn_load(s.tasks[T]) == 2
    check_invariants(s)


def test_cdn_limit_separate_per_task() -> None:
    """The CDN limit is counted per task: another task has its own budget."""
    s = setup(3, cdn_limit=1)
    s.add_task("other")
    for p in range(3):
        s.cdn_piece_ready("other", p)
    assert len(s.join(T, "a")) == 1
    assert len(s.join("other", "a")) == 1


def test_up_limit_caps_uploads_per_source() -> None:
    """A source never runs more than up_limit uploads at once; excess peers wait."""
    s = setup(4, down_limit=4, up_limit=2)
    s.join(T, "h", has=range(4), seeding_only=True)
    b = s.join(T, "b")
    assert len(b) == 2 and {x.source for x in b} == {"h"}
    assert s.join(T, "c") == []
    assert s.peers["h"].uploads == 2
    check_invariants(s)
    got = s.piece_done(T, "b", b[0].piece, "h")
    # h has one free slot again; somebody gets it (b or c) and h stays at 2.
    assert [x.source for x in got].count("h") == 1
    assert s.peers["h"].uploads == 2
    check_invariants(s)


def test_down_limit_caps_running_pieces() -> None:
    """A downloader never runs more than down_limit pieces at once."""
    s = setup(10, down_limit=3, up_limit=10)
    s.join(T, "h", has=range(10), seeding_only=True)
    got = s.join(T, "b")
    assert len(got) == 3
    assert len(s.tasks[T].members["b"].running) == 3
    more = s.piece_done(T, "b", got[0].piece, "h")
    assert len(more) == 1 and more[0].peer == "b"
    assert len(s.tasks[T].members["b"].running) == 3


def test_no_assignment_for_pieces_held_or_unavailable() -> None:
    """Pieces a peer already has, and pieces the CDN has not written, are never assigned."""
    s = setup(3, down_limit=4)
    got = s.join(T, "b", has=[0, 2])
    assert pairs(got) == {("b", 1, CDN)}
    s.join(T, "h", has=[0, 1, 2, 5, 6], seeding_only=True)
    got_c = s.join(T, "c", has=[1])
    assert {a.piece for a in got_c} == {0, 2}


def test_seeding_only_member_gets_nothing() -> None:
    """A seeding-only member serves pieces but is never assigned any."""
    s = setup(3)
    assert s.join(T, "s", has=[0], seeding_only=True) == []
    assert s.tasks[T].members["s"].running == {}


# -- completions ------------------------------------------------------------------------


def test_piece_done_makes_holder_and_releases_loads() -> None:
    """After piece_done the downloader holds the piece, serves it to others, and CDN/upload loads are released."""
    s = setup(1)
    assert pairs(s.join(T, "a")) == {("a", 0, CDN)}
    assert s.join(T, "b") == []
    got = s.piece_done(T, "a", 0, CDN)
    assert pairs(got) == {("b", 0, "a")}
    task = s.tasks[T]
    assert "a" in task.holders[0]
    assert task.cdn_inflight == set()
    assert task.members["a"].running == {}
    assert s.peers["a"].uploads == 1
    s.piece_done(T, "b", 0, "a")
    assert s.peers["a"].uploads == 0
    assert task.inflight == {}
    assert task.holders[0] == {"a", "b"}
    check_invariants(s)


def test_piece_done_unknown_task_or_member() -> None:
    """piece_done for an unknown task or a non-member returns no assignments and changes nothing."""
    s = setup(1)
    assert s.piece_done("nope", "a", 0, CDN) == []
    assert s.piece_done(T, "stranger", 0, CDN) == []
    assert 0 not in s.tasks[T].holders


# -- failures -----------------------------------------------------------------------------


def test_piece_failed_avoids_source() -> None:
    """After a failure from a peer, the downloader avoids that source (here: falls back to the CDN)."""
    s = setup(1, blacklist_limit=10)
    s.join(T, "h", has=[0], seeding_only=True)
    assert pairs(s.join(T, "b")) == {("b", 0, "h")}
    got = s.piece_failed(T, "b", 0, "h")
    assert pairs(got) == {("b", 0, CDN)}
    task = s.tasks[T]
    assert "h" in task.members["b"].avoid
    assert s.peers["h"].uploads == 0
    assert s.peers["h"].service_errors == 1
    assert s.peers["b"].client_errors == 1
    assert not s.peers["h"].blacklisted
    # Another peer is not affected by b's avoid set.
    assert pairs(s.join(T, "c")) == {("c", 0, "h")}
    check_invariants(s)


def test_piece_failed_tries_other_holder() -> None:
    """After a failure the piece is reassigned to a different holder when one is usable."""
    s = setup(1, blacklist_limit=10)
    s.join(T, "h1", has=[0], seeding_only=True)
    s.join(T, "h2", has=[0], seeding_only=True)
    first = s.join(T, "b")[0].source
    got = s.piece_failed(T, "b", 0, first)
    assert len(got) == 1
    assert got[0].source not in {first, CDN}


def test_blacklist_after_limit() -> None:
    """A source failing blacklist_limit times in a row is blacklisted and then skipped by every peer."""
    s = setup(1, blacklist_limit=3, up_limit=10)
    s.join(T, "bad", has=[0], seeding_only=True)
    for i in range(3):
        assert pairs(s.join(T, f"d{i}")) == {(f"d{i}", 0, "bad")}
    assert not s.peers["bad"].blacklisted
    s.piece_failed(T, "d0", 0, "bad")
    s.piece_failed(T, "d1", 0, "bad")
    assert not s.peers["bad"].blacklisted
    s.piece_failed(T, "d2", 0, "bad")
    assert s.peers["bad"].blacklisted
    # A fresh peer (empty avoid set) does not get "bad" as a source.
    s.join(T, "good", has=[0], seeding_only=True)
    got = s.join(T, "fresh")
    assert all(a.source != "bad" for a in got)
    check_invariants(s)


def test_blacklisted_only_holder_means_cdn() -> None:
    """When the only holder is blacklisted, the piece comes from the CDN."""
    s = setup(2, blacklist_limit=1, down_limit=1)
    s.join(T, "bad", has=[0, 1], seeding_only=True)
    (first,) = s.join(T, "d")
    assert first.source == "bad"
    other = 1 - first.piece
    assert pairs(s.piece_failed(T, "d", first.piece, "bad")) == {("d", first.piece, CDN)}
    assert s.peers["bad"].blacklisted
    # e never failed with "bad", but "bad" is blacklisted: e's piece comes from the CDN.
    assert pairs(s.join(T, "e")) == {("e", other, CDN)}
    check_invariants(s)


def test_success_resets_service_errors() -> None:
    """A successful upload resets the source's consecutive-failure count, so it is not blacklisted."""
    s = setup(2, blacklist_limit=2, up_limit=10, down_limit=1)
    s.join(T, "h", has=[0, 1], seeding_only=True)
    a = s.join(T, "a")[0]
    b = s.join(T, "b")[0]
    s.piece_failed(T, "a", a.piece, "h")
    s.piece_done(T, "b", b.piece, "h")
    assert s.peers["h"].service_errors == 0
    c = s.join(T, "c")
    s.piece_failed(T, "c", c[0].piece, c[0].source)
    assert not s.peers["h"].blacklisted


def test_isolation_after_client_failures() -> None:
    """A downloader failing isolation_limit times in a row gets CDN-only assignments despite usable holders."""
    s = setup(2, down_limit=1, isolation_limit=2, blacklist_limit=100, up_limit=10)
    for h in ("h1", "h2", "h3"):
        s.join(T, h, has=[0, 1], seeding_only=True)
    first = s.join(T, "b")
    assert len(first) == 1 and first[0].source != CDN
    piece = first[0].piece
    second = s.piece_failed(T, "b", piece, first[0].source)
    assert len(second) == 1 and second[0].source not in {CDN, first[0].source}
    third = s.piece_failed(T, "b", piece, second[0].source)
    assert pairs(third) == {("b", piece, CDN)}
    # The CDN success ends the isolation: the next piece comes from a holder again.
    nxt = s.piece_done(T, "b", piece, CDN)
    assert s.peers["b"].client_errors == 0  # a success ends the run of failures
    assert all(a.source != CDN for a in nxt)
    check_invariants(s)


def test_isolated_peer_next_piece_from_cdn() -> None:
    """While isolated, every new assignment of that peer comes from the CDN."""
    s = setup(3, down_limit=3, isolation_limit=1, blacklist_limit=100, up_limit=10)
    s.join(T, "h", has=[0, 1, 2], seeding_only=True)
    s.join(T, "h2", has=[0, 1, 2], seeding_only=True)
    got = s.join(T, "b")
    assert len(got) == 3
    bad = got[0]
    again = s.piece_failed(T, "b", bad.piece, bad.source)
    assert pairs(again) == {("b", bad.piece, CDN)}


def test_stale_failure_ignored() -> None:
    """A failure report naming a source other than the current one (or a piece not running) changes nothing."""
    s = setup(1)
    s.join(T, "h", has=[0], seeding_only=True)
    assert pairs(s.join(T, "b")) == {("b", 0, "h")}
    assert s.piece_failed(T, "b", 0, "other") == []
    assert s.piece_failed(T, "b", 0, CDN) == []
    assert s.piece_failed(T, "b", 7, "h") == []
    assert s.piece_failed(T, "nobody", 0, "h") == []
    assert s.piece_failed("no-task", "b", 0, "h") == []
    task = s.tasks[T]
    assert task.members["b"].running == {0: "h"}
    assert task.members["b"].avoid == set()
    assert s.peers["b"].client_errors == 0
    assert s.peers["h"].service_errors == 0
    assert s.peers["h"].uploads == 1
    check_invariants(s)


def test_second_failure_report_is_stale() -> None:
    """Reporting the same failure twice counts it once."""
    s = setup(1, blacklist_limit=10)
    s.join(T, "h", has=[0], seeding_only=True)
    s.join(T, "b")
    s.piece_failed(T, "b", 0, "h")
    assert s.piece_failed(T, "b", 0, "h") == []
    assert s.peers["h"].service_errors == 1
    assert s.peers["b"].client_errors == 1


# -- peers going away ---------------------------------------------------------------------


def test_peer_gone_releases_and_reassigns() -> None:
    """peer_gone frees the gone peer's CDN fetch and re-sources pieces others were fetching from it."""
    s = setup(2, down_limit=4)
    got_a = s.join(T, "a", has=[0])
    assert pairs(got_a) == {("a", 1, CDN)}
    got_b = s.join(T, "b")
    assert pairs(got_b) == {("b", 0, "a")}  # piece 1 is already coming from the CDN
    s.join(T, "a2", has=[0], seeding_only=True)
    out = s.peer_gone("a")
    assert pairs(out) == {("b", 0, "a2"), ("b", 1, CDN)}
    task = s.tasks[T]
    assert "a" not in task.members
    assert all("a" not in h for h in task.holders.values())
    assert "a" not in s.peers
    check_invariants(s)


def test_peer_gone_only_source_falls_back_to_cdn() -> None:
    """If the gone peer was the only holder, its downloaders are re-assigned to the CDN."""
    s = setup(1)
    s.join(T, "a", has=[0], seeding_only=True)
    s.join(T, "b")
    assert pairs(s.peer_gone("a")) == {("b", 0, CDN)}
    check_invariants(s)


def test_peer_gone_unknown_and_late_reports() -> None:
    """peer_gone for an unknown peer is a no-op; later reports about the gone peer's work are ignored."""
    s = setup(1)
    assert s.peer_gone("ghost") == []
    s.join(T, "a")
    s.peer_gone("a")
    assert s.piece_done(T, "a", 0, CDN) == []
    assert s.piece_failed(T, "a", 0, CDN) == []
    assert s.tasks[T].cdn_inflight == set()


def test_leave_withdraws_uploads() -> None:
    """leave drops a member from one task and re-sources downloads that relied on it."""
    s = setup(1)
    s.join(T, "a", has=[0], seeding_only=True)
    s.join(T, "b")
    assert pairs(s.leave(T, "a")) == {("b", 0, CDN)}
    assert s.leave(T, "a") == []
    assert "a" in s.peers  # still known, only left this task
    check_invariants(s)


def test_cdn_failed_and_reset() -> None:
    """After cdn_failed nothing is assigned; remove_task forgets the task and releases upload loads."""
    s = setup(2, up_limit=10, down_limit=4)
    s.join(T, "h", has=[0, 1], seeding_only=True)
    s.join(T, "b")
    assert s.peers["h"].uploads == 2
    s.cdn_failed(T)
    assert s.cdn_piece_ready(T, 2) == []
    assert s.join(T, "c") == []
    s.remove_task(T)
    assert T not in s.tasks
    assert s.peers["h"].uploads == 0


# -- whole-swarm simulation -----------------------------------------------------------------


@pytest.mark.parametrize("relay", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_simulation_swarm(seed: int, relay: bool) -> None:
    """8 peers, 16 pieces released one by one: everyone completes, and the CDN serves each
    piece at most once, with or without relays."""
    rng = random.Random(seed)
    n_peers, n_pieces = 8, 16
    s = Scheduler(relay=relay)
    s.add_task(T)
    peers = [f"p{i}" for i in range(n_peers)]
    pending: list[Assignment] = []
    seen: set[tuple[str, int]] = set()
    log: list[Assignment] = []

    def record(new: list[Assignment]) -> None:
        task = s.tasks[T]
        for a in new:
            assert a.task == T
            assert (a.peer, a.piece) not in seen, "a piece was assigned twice to one peer"
            seen.add((a.peer, a.piece))
            assert a.piece in task.available
            source = task.members.get(a.source)
            if a.relay:
                assert relay and source is not None and a.piece in source.relays
            else:
                assert a.source == CDN or (source is not None and a.piece in source.has)
            assert a.source != a.peer
        pending.extend(new)
        log.extend(new)
        check_invariants(s)

    def complete(k: int) -> None:
        for _ in range(k):
            if not pending:
                return
            a = pending.pop(rng.randrange(len(pending)))
            record(s.piece_done(T, a.peer, a.piece, a.source))

    for p in peers:
        record(s.join(T, p))
    assert pending == []
    for piece in range(n_pieces):
        record(s.cdn_piece_ready(T, piece))
        complete(rng.randint(0, 4))
    record(s.cdn_finished(T, n_pieces))
    steps = 0
    while pending:
        complete(1)
        steps += 1
        assert steps < 10_000
    task = s.tasks[T]
    for p in peers:
        assert task.members[p].has == set(range(n_pieces)), p
        assert task.members[p].running == {}
    assert len(log) == n_peers * n_pieces
    cdn_served = sum(1 for a in log if a.source == CDN)
    assert 1 <= cdn_served <= n_pieces
    assert cdn_served * 2 < len(log)
    assert task.cdn_inflight == set() and task.inflight == {}
    assert all(peer.uploads == 0 for peer in s.peers.values())
    assert s.schedule(T) == []


# -- end of the file -------------------------------------------------------------------------


def test_cdn_finished_stops_assigning_complete_members() -> None:
    """Once the piece count is known, members holding every piece get nothing while others still do."""
    s = setup(4, up_limit=10, down_limit=4)
    assert s.join(T, "full", has=range(4)) == []
    got = s.cdn_finished(T, 4)
    assert got == []  # nobody is missing anything yet
    assert s.tasks[T].piece_count == 4
    b = s.join(T, "b")
    assert {a.piece for a in b} == {0, 1, 2, 3}
    assert all(a.peer == "b" and a.source == "full" for a in b)
    for a in b:
        for new in s.piece_done(T, "b", a.piece, a.source):
            assert new.peer not in {"full", "b"}
    assert s.schedule(T) == []
    assert s.tasks[T].members["b"].has == {0, 1, 2, 3}



def test_made_up_done_reports_do_not_whitewash_a_source() -> None:
    """A 'done' for a piece that was never assigned changes nothing: it cannot reset the
    error count of a failing source (so a liar still gets blacklisted)."""
    s = Scheduler(blacklist_limit=2)
    s.add_task("t")
    for n in range(4):
        s.cdn_piece_ready("t", n)
    s.cdn_finished("t", 4)
    s.join("t", "liar", has=range(4))
    for victim in ("h1", "h2"):
        for a in s.join("t", victim):
            if a.source == "liar":
                s.piece_failed("t", victim, a.piece, "liar")
                s.piece_done("t", "liar", a.piece, "liar")  # the liar's made-up report
    assert s.peers["liar"].blacklisted


def test_late_done_from_a_replaced_source_frees_the_new_slot() -> None:
    """A result that arrives from the old source after the piece was moved to another one
    still counts as held and frees the new assignment's slot."""
    s = Scheduler()
    s.add_task("t")
    s.cdn_piece_ready("t", 0)
    s.join("t", "a", has=[0])
    s.join("t", "a2", has=[0])
    (first,) = s.join("t", "b")
    other = "a2" if first.source == "a" else "a"
    s.peer_gone(first.source)
    assert s.tasks["t"].members["b"].running == {0: other}
    s.piece_done("t", "b", 0, first.source)
    assert 0 in s.tasks["t"].members["b"].has
    assert s.tasks["t"].members["b"].running == {}
    assert s.peers[other].uploads == 0


# -- incremental settling -----------------------------------------------------------------


def test_departed_cdn_downloader_frees_the_cdn_slot_for_a_waiting_peer() -> None:
    """A peer that leaves while fetching from the CDN frees the CDN slot at once for a peer
    that was waiting on the CDN limit (nothing else would wake that peer)."""
    for drop in ("leave", "gone"):
        s = setup(2, cdn_limit=1, down_limit=1)
        assert pairs(s.join(T, "a")) == {("a", 0, CDN)}
        assert s.join(T, "b") == []
        out = s.leave(T, "a") if drop == "leave" else s.peer_gone("a")
        assert len(out) == 1 and out[0].peer == "b" and out[0].source == CDN
        check_invariants(s)


def test_freed_upload_slot_goes_to_a_waiting_peer() -> None:
    """When a busy source finishes an upload, a peer that waited for a piece only that source
    holds gets it in the same event."""
    s = setup(2, up_limit=1, down_limit=1)
    s.join(T, "h", has=[0, 1], seeding_only=True)
    s.join(T, "x", has=[1], seeding_only=True)
    (first,) = s.join(T, "a", has=[1])
    assert (first.piece, first.source) == (0, "h")
    assert s.join(T, "b", has=[1]) == []  # only h holds piece 0, and h is busy
    out = s.piece_done(T, "a", 0, "h")
    assert ("b", 0, "h") in pairs(out) or ("b", 0, "a") in pairs(out)
    check_invariants(s)


def test_new_holder_serves_peers_that_waited_for_its_piece() -> None:
    """A piece finished by one peer is offered to the peers that were waiting for it, up to
    the new holder's upload limit."""
    s = setup(1, up_limit=2, down_limit=1)
    assert pairs(s.join(T, "a")) == {("a", 0, CDN)}
    for p in ("b", "c", "d"):
        assert s.join(T, p) == []
    out = s.piece_done(T, "a", 0, CDN)
    assert len(out) == 2 and {x.source for x in out} == {"a"}
    assert {x.peer for x in out} <= {"b", "c", "d"}
    check_invariants(s)


def test_end_game_last_piece_doubles_its_holders_every_round() -> None:
    """The classic end game: 64 peers hold everything but the last piece, which only the CDN
    has.  The CDN serves it once; from then on every holder serves one waiting peer per round,
    so the holders double each round and all 64 finish in 1 + log2(64) rounds -- nobody waits
    for the CDN again, and nobody stays idle while a holder has a free slot."""
    n_peers, n_pieces = 64, 8
    s = Scheduler(up_limit=1, down_limit=1, relay=False)
    s.add_task(T)
    for p in range(n_pieces - 1):
        s.cdn_piece_ready(T, p)
    s.cdn_finished(T, n_pieces)
    for i in range(n_peers):
        assert s.join(T, f"p{i}", has=range(n_pieces - 1)) == []
    running = s.cdn_piece_ready(T, n_pieces - 1)
    assert [a.source for a in running] == [CDN]
    rounds, holders = 0, []
    while running:
        nxt: list[Assignment] = []
        for a in running:
            nxt.extend(s.piece_done(T, a.peer, a.piece, a.source))
        running = nxt
        assert all(a.source != CDN for a in running)
        rounds += 1
        holders.append(len(s.tasks[T].holders[n_pieces - 1]))
    assert holders == [1, 2, 4, 8, 16, 32, 64]
    assert rounds == 7
    assert all(Scheduler.member_complete(s.tasks[T], m) for m in s.tasks[T].members.values())


def test_waiting_peer_gets_the_freed_cdn_slot_before_the_peer_that_freed_it() -> None:
    """When a CDN download finishes, a peer that was waiting takes the next CDN piece; the peer
    that finished does not chain on (else one peer would receive every new piece and have to
    seed the whole file into the swarm through its own upload slot)."""
    s = setup(2, cdn_limit=1, down_limit=1, up_limit=1)
    assert pairs(s.join(T, "a")) == {("a", 0, CDN)}
    assert s.join(T, "b") == []
    assert pairs(s.piece_done(T, "a", 0, CDN)) == {("b", 1, CDN)}
    assert "a" in s.tasks[T].blocked  # a waits for b's piece 1; b, busy, takes piece 0 later
    assert pairs(s.piece_done(T, "b", 1, CDN)) == {("a", 1, "b"), ("b", 0, "a")}
    check_invariants(s)


# -- relays: sources still receiving the piece ----------------------------------------------


def end_game(n_peers: int, n_pieces: int = 4, relay_depth: int = 64) -> tuple[Scheduler, list[Assignment]]:
    """C{n_peers} peers hold everything but the last piece; the CDN just cached it."""
    s = Scheduler(up_limit=1, down_limit=1, relay_depth=relay_depth)
    s.add_task(T)
    for p in range(n_pieces - 1):
        s.cdn_piece_ready(T, p)
    s.cdn_finished(T, n_pieces)
    for i in range(n_peers):
        assert s.join(T, f"p{i}", has=range(n_pieces - 1)) == []
    return s, s.cdn_piece_ready(T, n_pieces - 1)


def test_end_game_with_relays_is_one_chain_at_once() -> None:
    """With relays the end game takes one round: the CDN serves the last piece once and, in
    the same event, every other peer is assigned it from a peer still receiving it -- one
    chain, each peer uploading to one other, nobody idle -- instead of 1 + log2(N) rounds."""
    s, running = end_game(64)
    assert len(running) == 64
    assert [a.source for a in running if a.source == CDN] == [CDN]
    assert all(a.relay for a in running if a.source != CDN)
    check_invariants(s)
    assert all(peer.uploads <= 1 for peer in s.peers.values())
    # The chain: following sources from any peer leads back to the CDN without a cycle.
    source_of = {a.peer: a.source for a in running}
    for start in source_of:
        seen, node = set(), start
        while node != CDN:
            assert node not in seen
            seen.add(node)
            node = source_of[node]
    # They may finish in any order (each verifies its own copy).
    for a in reversed(running):
        assert s.piece_done(T, a.peer, a.piece, a.source) == []
    assert all(Scheduler.member_complete(s.tasks[T], m) for m in s.tasks[T].members.values())
    assert all(peer.uploads == 0 for peer in s.peers.values())


def test_relay_chains_are_at_most_relay_depth_long() -> None:
    """A peer that is relay_depth relays behind a holder does not relay the piece on, so
    the end game grows the holders (relay_depth + 1)-fold per round instead of doubling:
    64 peers, depth 2, in 4 rounds (3, 12, 48, 64 holders) rather than 7."""
    s, running = end_game(64, relay_depth=2)
    task = s.tasks[T]
    rounds, holders = 0, []
    while running:
        for a in running:
            assert task.members[a.peer].hops.get(a.piece, 0) <= 2
        nxt: list[Assignment] = []
        for a in running:
            nxt.extend(s.piece_done(T, a.peer, a.piece, a.source, a.attempt))
        running = nxt
        rounds += 1
        holders.append(len(task.holders[3]))
    assert holders == [3, 12, 48, 64]


def test_holder_preferred_over_relay() -> None:
    """A free holder of the piece is taken before a peer that is still receiving it."""
    s = setup(1, relay=True, up_limit=1)
    assert pairs(s.join(T, "a")) == {("a", 0, CDN)}  # a relays 0 from now on
    (b,) = s.join(T, "b")
    assert (b.source, b.relay) == ("a", True)
    s.piece_done(T, "a", 0, CDN)
    (c,) = s.join(T, "c")  # a holds 0 now but is busy with b; b relays
    assert (c.source, c.relay) == ("b", True)
    s.piece_done(T, "b", 0, "a")  # a is free again and holds the piece; so does b (busy)
    (d,) = s.join(T, "d")
    assert (d.source, d.relay) == ("a", False)
    check_invariants(s)


def test_failed_relay_withdraws_its_chain_without_blame() -> None:
    """When a relay's own attempt fails, every download relaying from it, directly or down
    the chain, is withdrawn at once and reassigned; only the failed attempt's own source is
    counted against (here the CDN, which nobody blacklists)."""
    s, running = end_game(4)
    source_of = {a.peer: a.source for a in running}
    first = next(p for p, src in source_of.items() if src == CDN)
    new = s.piece_failed(T, first, 3, CDN)
    task = s.tasks[T]
    # The first attempt failed; its relays were withdrawn and the swarm re-planned at once.
    assert {a.peer for a in new} == {f"p{i}" for i in range(4)}
    assert [a.source for a in new].count(CDN) == 1
    for pid, peer in s.peers.items():
        assert peer.service_errors == 0, pid
        assert peer.client_errors == (1 if pid == first else 0), pid
        assert not task.members[pid].avoid
    # Late reports of the withdrawn downloads are ignored, even where the new assignment
    # names the same source: the attempt tells them apart.
    for a in running:
        if a.peer != first:
            assert s.piece_failed(T, a.peer, 3, a.source, a.attempt) == []
    assert all(peer.service_errors == 0 for peer in s.peers.values())
    check_invariants(s)


def test_relayed_failure_is_judged_when_the_relay_finishes() -> None:
    """A relayed copy that fails while its relay still receives the piece counts against
    the relay only once the relay verified the piece (its bytes were then its own fault)."""
    s = setup(1, relay=True, blacklist_limit=10)
    s.join(T, "a")  # from the CDN
    (b,) = s.join(T, "b")
    assert b.relay and b.source == "a"
    assert s.piece_failed(T, "b", 0, "a") == []  # b avoids a meanwhile: nobody else to ask
    assert s.peers["a"].service_errors == 0 and s.peers["b"].client_errors == 0
    assert "a" in s.tasks[T].members["b"].avoid
    new = s.piece_done(T, "a", 0, CDN)
    assert s.peers["a"].service_errors == 1 and s.peers["b"].client_errors == 1
    assert pairs(new) == {("b", 0, CDN)}  # b avoids a: the CDN serves it
    check_invariants(s)


def test_relayed_failure_is_excused_when_the_relay_fails_too() -> None:
    """A relayed copy that failed because the relay's own attempt failed counts against
    nobody, and the downloader may use that relay again."""
    s = setup(1, relay=True, blacklist_limit=10)
    s.join(T, "a")
    s.join(T, "b")
    s.piece_failed(T, "b", 0, "a")  # b's report came first
    s.piece_failed(T, "a", 0, CDN)  # a's own attempt failed
    assert s.peers["a"].service_errors == 0 and s.peers["b"].client_errors == 0
    assert "a" not in s.tasks[T].members["b"].avoid
    check_invariants(s)


def test_departed_relay_withdraws_the_chain() -> None:
    """A relay that leaves takes its relayed downloads, and theirs, with it: all get new
    sources at once."""
    s, running = end_game(4)
    first = next(a.peer for a in running if a.source == CDN)
    new = s.peer_gone(first)
    assert {a.peer for a in new} == {f"p{i}" for i in range(4)} - {first}
    assert all(peer.service_errors == 0 and peer.client_errors == 0 for peer in s.peers.values())
    check_invariants(s)


def test_blacklisted_and_isolated_peers_do_not_relay() -> None:
    """A blacklisted peer is nobody's source, a relay included; a peer isolated for its own
    failures is not offered as a relay either."""
    s = setup(2, relay=True, blacklist_limit=1, isolation_limit=1, down_limit=1)
    s.join(T, "bad", has=[0])
    (x,) = s.join(T, "x")
    assert x.source == "bad"
    s.piece_failed(T, "x", 0, "bad")  # bad blacklisted, x isolated (limits of 1)
    assert s.peers["bad"].blacklisted
    assert s.peers["x"].client_errors >= 1
    running = s.tasks[T].members["x"].running
    assert set(running.values()) <= {CDN}
    assert not s.tasks[T].members["x"].relays  # isolated: not offered
    for a in s.join(T, "y"):
        assert a.source not in ("bad", "x")
    check_invariants(s)


def test_cdn_streams_a_piece_while_it_arrives_and_peers_relay_it() -> None:
    """A piece the CDN has started receiving (its size known) goes to one peer from the CDN
    at once, as a relay (its md5 comes later), and on down a chain of relays; when the piece
    is whole nothing is assigned twice, and the downloads end as usual."""
    s = Scheduler(up_limit=1, down_limit=1)
    s.add_task(T)
    for pid in ("a", "b", "c"):
        assert s.join(T, pid) == []
    new = s.cdn_piece_started(T, 0)
    by_peer = {a.peer: a for a in new}
    assert set(by_peer) == {"a", "b", "c"}
    assert all(a.relay for a in new)
    assert [a.source for a in new].count(CDN) == 1
    task = s.tasks[T]
    assert sorted(task.members[p].hops[0] for p in by_peer) == [1, 2, 3]
    assert s.cdn_piece_ready(T, 0) == []
    assert task.streaming == set()
    for a in new:
        assert s.piece_done(T, a.peer, 0, a.source, a.attempt) == []
    assert all(0 in m.has for m in task.members.values())
    check_invariants(s)


def test_store_and_forward_waits_for_the_whole_piece() -> None:
    """With relaying off the CDN serves only pieces it holds whole."""
    s = Scheduler(relay=False)
    s.add_task(T)
    s.join(T, "a")
    assert s.cdn_piece_started(T, 0) == []
    assert pairs(s.cdn_piece_ready(T, 0)) == {("a", 0, CDN)}


def test_joining_again_says_what_a_member_holds_now() -> None:
    """A member that registers again holding fewer pieces (it dropped an old version, or
    restarted) is no longer counted as their holder: downloads from it are withdrawn, the
    pieces go to it again, and nobody waits for pieces that exist nowhere."""
    s = setup(2, up_limit=1, down_limit=1)
    assert s.join(T, "a", has=[0, 1]) == []
    (b,) = s.join(T, "b")
    assert b.source == "a"
    new = s.join(T, "a", has=[])
    task = s.tasks[T]
    assert task.members["a"].has == set() and "a" not in task.holders.get(b.piece, set())
    assert all(x.source == CDN for x in new) and {x.peer for x in new} == {"a", "b"}
    check_invariants(s)
