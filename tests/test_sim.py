"""Tests for dfly.devtools.sim: tiny swarms whose outcome is known analytically, and
proof that the simulator drives the supernode's own scheduler."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dfly.devtools import sim
from dfly.devtools.sim import run_simulation, t_star
from dfly.pieces import MIB, Layout
from dfly.supernode import scheduler as scheduler_module
from dfly.supernode.scheduler import Assignment, Scheduler

SIZE = 64 * MIB
PIECE = 4 * MIB
B = 100e6


def slice_bytes(size: int, piece: int) -> int:
    layout = Layout(size, piece)
    return sum(layout.slice_len(n) for n in range(layout.count))


def test_one_peer_fast_origin_is_limited_by_its_download_link() -> None:
    """One peer, an origin 100 times faster, four downloads at once: the peer's link is busy
    from the first piece on (another download runs while one waits for its request), so the
    time is the first piece's arrival + one request latency + all slices / B_peer."""
    latency = 0.002
    r = run_simulation(
        peers=1, size=SIZE, piece_size=PIECE, peer_rate=B, origin_rate=100 * B, latency=latency,
        scheduler=Scheduler(down_limit=4),
    )
    expected = PIECE / (100 * B) + latency + slice_bytes(SIZE, PIECE) / B
    assert r.completed == 1
    assert r.makespan == pytest.approx(expected, rel=0.01)
    assert r.cdn_served_over_total == pytest.approx(slice_bytes(SIZE, PIECE) / SIZE)


def test_one_peer_one_download_at_a_time_pays_every_request_latency() -> None:
    """With the default single download slot the link idles for one request latency before
    each piece: first arrival + pieces x latency + all slices / B_peer."""
    latency = 0.004
    r = run_simulation(
        peers=1, size=SIZE, piece_size=PIECE, peer_rate=B, origin_rate=100 * B, latency=latency,
        scheduler=Scheduler(relay=False),
    )
    count = Layout(SIZE, PIECE).count
    expected = PIECE / (100 * B) + count * latency + slice_bytes(SIZE, PIECE) / B
    assert r.makespan == pytest.approx(expected, rel=0.002)


def test_one_peer_slow_origin_is_limited_by_the_origin() -> None:
    """One peer 100 times faster than the origin: the CDN's upload (also B_origin) is busy from
    the first piece's arrival on and never runs dry (no piece is larger than the first), so the
    time is the first slice's arrival + one request latency + all slices / B_origin."""
    latency = 0.001
    r = run_simulation(
        peers=1, size=SIZE, piece_size=PIECE, peer_rate=100 * B, origin_rate=B, latency=latency,
        scheduler=Scheduler(down_limit=4, relay=False),
    )
    first = Layout(SIZE, PIECE).slice_len(0) / B
    assert r.makespan == pytest.approx(first + latency + slice_bytes(SIZE, PIECE) / B, rel=0.01)
    assert r.makespan >= r.t_star


def test_two_peers_share_the_work_and_take_each_piece_from_the_cdn_once() -> None:
    """Two equal peers behind an equal origin: each piece leaves the CDN exactly once (half of
    the bytes the peers receive), the origin sends the file once, and both finish within a
    few piece times of T* = S/B."""
    r = run_simulation(
        peers=2, size=SIZE, piece_size=PIECE, peer_rate=B, origin_rate=B, latency=0.001, scheduler=Scheduler(relay=False)
    )
    total = slice_bytes(SIZE, PIECE)
    assert r.completed == 2
    assert r.cdn_served_over_total == pytest.approx(total / (2 * SIZE))
    assert r.origin_egress_over_size == 1.0
    tau = PIECE / B
    assert r.t_star == pytest.approx(SIZE / B)
    assert r.t_star <= r.makespan <= r.t_star + 4 * tau


@pytest.mark.parametrize("peers", [3, 7, 20])
def test_every_piece_leaves_the_cdn_once_and_no_run_beats_the_bound(peers: int) -> None:
    """In any swarm the CDN serves each piece exactly once (it never serves a piece a peer
    holds or is fetching from it), and the makespan is never below T*."""
    r = run_simulation(peers=peers, size=SIZE, piece_size=PIECE, peer_rate=B, origin_rate=2 * B, join_window=0.1)
    assert r.completed == peers
    assert r.cdn_served_over_total == pytest.approx(slice_bytes(SIZE, PIECE) / (peers * SIZE))
    assert r.makespan >= t_star(peers, SIZE, B, 2 * B)
    assert r.p50 <= r.p99 <= r.makespan
    assert r.assignments == peers * Layout(SIZE, PIECE).count


def test_t_star_takes_the_tightest_bound() -> None:
    """T* is the largest of the origin's time, one peer's time and the swarm's total upload time."""
    assert t_star(1, 100, 10.0, 5.0) == pytest.approx(20.0)
    assert t_star(1, 100, 5.0, 10.0) == pytest.approx(20.0)
    # Many peers, weak origin: S/B_origin dominates; strong origin: S/B_peer.
    assert t_star(1000, 100, 10.0, 1.0) == pytest.approx(100.0)
    assert t_star(1000, 100, 10.0, 1000.0) == pytest.approx(10.0)


class CountingScheduler(Scheduler):
    """The real scheduler, counting the calls it gets."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls: dict[str, int] = {}
        self.assigned: list[Assignment] = []

    def _count(self, name: str, out: list[Assignment]) -> list[Assignment]:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.assigned.extend(out)
        return out

    def join(self, *a: Any, **kw: Any) -> list[Assignment]:
        return self._count("join", super().join(*a, **kw))

    def piece_done(self, *a: Any, **kw: Any) -> list[Assignment]:
        return self._count("piece_done", super().piece_done(*a, **kw))

    def cdn_piece_ready(self, *a: Any, **kw: Any) -> list[Assignment]:
        return self._count("cdn_piece_ready", super().cdn_piece_ready(*a, **kw))

    def cdn_piece_started(self, *a: Any, **kw: Any) -> list[Assignment]:
        return self._count("cdn_piece_started", super().cdn_piece_started(*a, **kw))

    def cdn_finished(self, *a: Any, **kw: Any) -> list[Assignment]:
        return self._count("cdn_finished", super().cdn_finished(*a, **kw))


def test_the_simulator_drives_the_supernode_scheduler() -> None:
    """The simulator's scheduler is dfly.supernode.scheduler's, and every assignment the
    simulator carries out is one the scheduler made: one join per peer, one done per piece
    per peer, one ready per piece, and every peer ends up holding the whole file."""
    assert sim.Scheduler is scheduler_module.Scheduler
    peers, count = 5, Layout(SIZE, PIECE).count
    s = CountingScheduler(down_limit=2, up_limit=1, cdn_limit=1)
    r = run_simulation(peers=peers, size=SIZE, piece_size=PIECE, peer_rate=B, origin_rate=B, scheduler=s)
    assert s.calls == {
        "join": peers, "cdn_piece_started": count, "cdn_piece_ready": count, "cdn_finished": 1, "piece_done": peers * count,
    }
    assert r.scheduler_calls == sum(s.calls.values())
    assert len(s.assigned) == r.assignments == peers * count
    assert {(a.peer, a.piece) for a in s.assigned} == {(f"peer{i:05d}", n) for i in range(peers) for n in range(count)}
    task = s.tasks[sim.TASK]
    assert all(len(m.has) == count and not m.running for m in task.members.values())


def test_command_line_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    """python -m dfly.devtools.sim --json prints one line of JSON with the figures and exits 0."""
    assert sim.main(["--peers", "4", "--size", "32M", "--piece-size", "4", "--peer-rate", "800Mbit", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert got["peers"] == 4 and got["size"] == 32 * MIB and got["piece_size"] == 4 * MIB
    assert got["peer_rate"] == pytest.approx(100e6)
    for key in ("makespan", "p50", "p99", "t_star", "makespan_over_t_star", "origin_egress_over_size",
                "cdn_served_over_total", "scheduler_calls", "scheduler_cpu", "scheduler_cpu_per_sim_second"):
        assert key in got
    assert got["completed"] == 4


def test_command_line_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad sizes or piece sizes get a one-line error and exit status 2, not a traceback."""
    assert sim.main(["--peers", "2", "--size", "lots"]) == 2
    assert "size" in capsys.readouterr().err
    assert sim.main(["--peers", "2", "--size", "8M", "--piece-size", "40"]) == 2
    assert "piece size" in capsys.readouterr().err
    assert sim.main(["--peers", "0", "--size", "8M"]) == 2


def test_relays_remove_the_store_and_forward_tail() -> None:
    """The end game with relays: a piece reaches a chain of peers while it still arrives
    (from the CDN too), so with no relay lag 8 equal peers behind an equal origin finish a few
    request latencies after the origin's last byte, where store and forward pays a piece
    time for every hop of the doubling (1 + log2 8 = 4)."""
    tau = Layout(SIZE, PIECE).slice_len(0) / B
    kw: dict[str, Any] = dict(peers=8, size=SIZE, piece_size=PIECE, peer_rate=B, origin_rate=B, latency=0.001)
    relayed = run_simulation(relay_lag=0.0, **kw)
    stored = run_simulation(scheduler=Scheduler(relay=False), **kw)
    assert relayed.relay and relayed.relayed_assignments > 0
    assert not stored.relay and stored.relayed_assignments == 0
    last_byte = slice_bytes(SIZE, PIECE) / B
    assert last_byte <= relayed.makespan <= last_byte + 0.02
    assert stored.makespan >= last_byte + 3 * tau
    assert relayed.cdn_served_over_total == pytest.approx(stored.cdn_served_over_total)


def test_a_relay_hop_costs_its_lag_and_never_overtakes_its_feed() -> None:
    """A relayed flow starts relay_lag after its feed and is capped at its feed's rate: two
    peers, one piece the CDN streams to the first as it arrives (relay_lag after the first
    byte), the second relays it from the first and finishes exactly relay_lag after it (with
    no lag, at the same moment as the origin's last byte: never before)."""
    kw: dict[str, Any] = dict(peers=2, size=PIECE - 5, piece_size=PIECE, peer_rate=B, origin_rate=B, latency=0.001)
    first = 0.001 + PIECE / B  # requested, then received as it arrives
    lagged = run_simulation(relay_lag=0.05, **kw)
    assert lagged.relayed_assignments == 2
    assert lagged.p50 == pytest.approx(first + 2 * 0.05)  # p50 of two is the later one
    assert lagged.makespan == pytest.approx(first + 2 * 0.05)
    # The relay's downloader is capped at the feed's rate even where its own links are faster.
    fast = run_simulation(relay_lag=0.0, **kw)
    assert fast.makespan == pytest.approx(first)


def test_relay_options_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """--no-relay and --relay-depth reach the scheduler the command line drives."""
    results = {}
    for name, extra in (("off", ["--no-relay"]), ("depth1", ["--relay-depth", "1"]), ("on", [])):
        assert sim.main(["--peers", "16", "--size", "32M", "--json", *extra]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["off"]["relay"] is False and results["off"]["relayed_assignments"] == 0
    assert results["on"]["relay"] is True and results["on"]["relayed_assignments"] > 0
    assert 0 < results["depth1"]["relayed_assignments"]
