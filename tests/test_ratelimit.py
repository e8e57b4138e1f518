"""Rate limits: the token bucket on a fake clock, and the producers and sessions that use it.

Time moves only when a test advances a L{task.Clock} / L{MemoryReactorClock}; bytes move
only when a test pumps an iosim connection or feeds a protocol.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from memhelpers import body, fill_task, task_id
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.test import iosim

from dfly import dfget
from dfly.peer import tap as peer_tap
from dfly.peer.fetch import FetchSession, PieceRequest, SourcePool
from dfly.peer.store import PeerStore
from dfly.pieces import MIB, OVERHEAD
from dfly.ratelimit import READ_SIZE, InboundThrottle, TokenBucket, make_bucket
from dfly.supernode import tap as sn_tap
from dfly.wire.framing import encode_control
from dfly.wire.protocol import CHUNK, FramedProtocol
from dfly.wire.serve import SliceServerSession

# -- the bucket's arithmetic ------------------------------------------------------------


def test_take_grants_exact_tokens_and_refills_at_the_rate() -> None:
    """A bucket starts full, grants exactly what it holds, refills rate*dt, and caps at depth."""
    clock = task.Clock()
    b = TokenBucket(clock, rate=1000, depth=500)
    assert b.take(300, least=1) == 300
    assert b.tokens == 200
    clock.advance(0.1)
    assert b.tokens == pytest.approx(300)
    assert b.take(1000, least=1) == 300
    assert b.take(10, least=1) == 0
    clock.advance(100)
    assert b.tokens == 500  # never more than the depth


def test_take_refuses_less_than_the_least_useful_grant() -> None:
    """With fewer tokens than C{least}, nothing is granted (no tiny writes), and nothing is taken."""
    clock = task.Clock()
    b = TokenBucket(clock, rate=1000, depth=500)
    b.take(450, least=1)
    assert b.take(100, least=100) == 0
    assert b.tokens == 50
    assert b.take(40, least=100) == 40  # a request smaller than least needs only itself


def test_default_depth_is_a_fifth_of_a_second_but_at_least_one_read() -> None:
    """The depth is 200 ms of the rate, never less than one 64 KiB socket read."""
    clock = task.Clock()
    assert TokenBucket(clock, 10 * MIB).depth == 2 * MIB
    assert TokenBucket(clock, 1000).depth == READ_SIZE
    assert make_bucket(clock, 0) is None
    with pytest.raises(ValueError):
        TokenBucket(clock, 0)


def test_debit_goes_into_debt_and_blocks_until_repaid() -> None:
    """Bytes already received are taken even beyond the balance; the debt is repaid by time."""
    clock = task.Clock()
    b = TokenBucket(clock, rate=1000, depth=500)
    b.debit(1500)
    assert b.tokens == -1000
    assert b.blocked()
    clock.advance(0.999)
    assert b.blocked()
    clock.advance(0.002)
    assert not b.blocked()


def test_one_timer_at_the_exact_time_enough_tokens_exist() -> None:
    """A waiter is woken by a single timer set for exactly when its need is covered."""
    clock = task.Clock()
    b = TokenBucket(clock, rate=1000, depth=500)
    b.take(500, least=1)
    woken: list[float] = []
    b.wait(lambda: woken.append(clock.seconds()), need=250)
    b.wait(lambda: woken.append(clock.seconds()), need=250)
    assert len(clock.getDelayedCalls()) == 1
    assert clock.getDelayedCalls()[0].getTime() == pytest.approx(0.25)
    clock.advance(0.2499)
    assert woken == []
    clock.advance(0.0001)
    # Neither waiter took anything, so both are woken by the same timer.
    assert woken == [pytest.approx(0.25)] * 2
    assert clock.getDelayedCalls() == []
    assert b.timers_set == 1


def test_waiters_are_woken_in_order_and_share_round_robin() -> None:
    """Waiters that take their share when woken are served in arrival order, in turns."""
    clock = task.Clock()
    b = TokenBucket(clock, rate=1000, depth=100)
    b.take(100, least=1)
    order: list[str] = []

    def waiter(name: str) -> Callable[[], None]:
        def woken() -> None:
            assert b.take(100) == 100
            order.append(name)
            if order.count(name) < 3:
                b.wait(woken, need=100)

        return woken

    for name in "abc":
        b.wait(waiter(name), need=100)
    clock.pump([0.05] * 40)
    assert order == list("abcabcabc")
    assert b.timers_set == 9  # one timer per turn, no polling


def test_newcomers_do_not_overtake_the_queue() -> None:
    """While someone waits, take() grants nothing to others, even if tokens are there."""
    clock = task.Clock()
    b = TokenBucket(clock, rate=1000, depth=500)
    b.take(500, least=1)
    woken: list[int] = []
    b.wait(lambda: woken.append(b.take(400)), need=400)
    clock.advance(0.3)
    assert b.take(100, least=1) == 0  # 300 tokens exist, but the waiter is first
    clock.advance(0.1)
    assert woken == [400]
    assert b.take(100, least=1) == 0
    clock.advance(0.1)
    assert b.take(100, least=1) == 100


def test_cancelled_wait_leaves_no_timer() -> None:
    """Cancelling the only wait cancels the wake-up timer; a cancelled waiter is never called."""
    clock = task.Clock()
    b = TokenBucket(clock, rate=1000, depth=500)
    b.take(500, least=1)
    called: list[int] = []
    w = b.wait(lambda: called.append(1))
    w.cancel()
    w.cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert called == [] and b.waiting == 0


def test_need_above_depth_is_capped() -> None:
    """A waiter cannot ask for more than the bucket ever holds (it would wait forever)."""
    clock = task.Clock()
    b = TokenBucket(clock, rate=1000, depth=500)
    b.take(500, least=1)
    woken: list[int] = []
    b.wait(lambda: woken.append(1), need=10_000)
    clock.advance(0.5)
    assert woken == [1]


# -- accuracy over simulated time -----------------------------------------------------


class _Link:
    """Greedy outbound producers: each takes a chunk whenever its socket drained (1 ms later)."""

    def __init__(self, clock: task.Clock, bucket: TokenBucket, n: int, chunk: int) -> None:
        self.clock, self.bucket, self.chunk = clock, bucket, chunk
        self.sent = [0] * n
        for i in range(n):
            clock.callLater(0, self.pump, i)

    def pump(self, i: int) -> None:
        got = self.bucket.take(self.chunk, min(self.chunk, self.bucket.quantum))
        if not got:
            self.bucket.wait(lambda: self.pump(i), min(self.chunk, self.bucket.quantum))
            return
        self.sent[i] += got
        self.clock.callLater(0.001, self.pump, i)


@pytest.mark.parametrize(("rate", "n"), [(2 * MIB, 1), (2 * MIB, 8), (100 * 1024, 3), (50 * MIB, 4)])
def test_outbound_rate_within_5_percent_over_10_seconds(rate: int, n: int) -> None:
    """N producers taking 256 KiB chunks send rate*10 s (+-5 %) in 10 simulated seconds, and
    share it evenly; at no time is more than one wake-up timer pending."""
    clock = task.Clock()
    b = TokenBucket(clock, rate)
    link = _Link(clock, b, n, CHUNK)
    most_timers = 0
    for _ in range(10_000):
        clock.advance(0.001)
        most_timers = max(most_timers, sum(1 for c in clock.getDelayedCalls() if c.func == b._wake))
    total = sum(link.sent)
    assert abs(total / (rate * 10) - 1) < 0.05, total
    assert min(link.sent) > 0.8 * total / n, link.sent
    assert most_timers <= 1


class _FakeReader:
    """A transport whose peer sends 64 KiB at every read unless paused."""

    def __init__(self, bucket: TokenBucket) -> None:
        self.paused = False
        self.pauses = 0
        self.received = 0
        self.throttle = InboundThrottle(bucket, self)

    def pauseProducing(self) -> None:
        assert not self.paused
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def read(self) -> None:
        if not self.paused:
            self.received += READ_SIZE
            self.throttle.received(READ_SIZE)


@pytest.mark.parametrize(("rate", "n"), [(2 * MIB, 1), (2 * MIB, 6), (512 * 1024, 2), (40 * MIB, 3)])
def test_inbound_rate_within_5_percent_over_10_seconds(rate: int, n: int) -> None:
    """Connections whose senders are far faster than the limit receive rate*10 s (+-5 %) in
    10 simulated seconds, paused while in debt, sharing it evenly."""
    clock = task.Clock()
    b = TokenBucket(clock, rate)
    readers = [_FakeReader(b) for _ in range(n)]
    for _ in range(10_000):  # a read on every connection every millisecond
        clock.advance(0.001)
        for r in readers:
            r.read()
    total = sum(r.received for r in readers)
    assert abs(total / (rate * 10) - 1) < 0.05, total
    assert min(r.received for r in readers) > 0.8 * total / n
    assert all(r.pauses > 0 for r in readers)


def test_inbound_throttle_pauses_and_resumes_its_transport() -> None:
    """In debt, the transport is paused and the owner told; once repaid it is resumed."""
    clock = task.Clock()
    b = TokenBucket(clock, rate=64 * 1024, depth=64 * 1024)
    t = StringTransport()
    events: list[str] = []
    th = InboundThrottle(b, t, lambda: events.append("pause"), lambda: events.append("resume"))
    th.received(64 * 1024)
    assert t.producerState == "producing"
    th.received(32 * 1024)
    assert t.producerState == "paused" and th.paused and events == ["pause"]
    clock.advance(0.5 + 1.0)  # the 32 KiB debt, then a quantum of credit (64 KiB at 64 KiB/s)
    assert t.producerState == "producing" and events == ["pause", "resume"]
    th.close()
    assert b.waiting == 0


def test_closed_throttle_never_resumes() -> None:
    """A connection that went away while paused leaves the queue and is not resumed."""
    clock = task.Clock()
    b = TokenBucket(clock, rate=1000, depth=1000)
    t = StringTransport()
    th = InboundThrottle(b, t)
    th.received(5000)
    assert t.producerState == "paused"
    th.close()
    clock.advance(100)
    assert t.producerState == "paused" and clock.getDelayedCalls() == []


# -- the slice producer and the fetch session over iosim -------------------------------

P = 1 * MIB
TID = task_id("ratelimit")
CONTENT = body(2 * (P - OVERHEAD) + 1000, seed=3)
KEY = ("source.example", 15001)


@pytest.fixture
def stores(tmp_path: Any) -> Iterator[tuple[PeerStore, PeerStore]]:
    server_store = PeerStore(str(tmp_path / "server"))
    client_store = PeerStore(str(tmp_path / "client"))
    yield server_store, client_store
    server_store.close()
    client_store.close()


def test_throttled_slice_producer_pauses_and_resumes(stores: tuple[PeerStore, PeerStore]) -> None:
    """A slice server with a 256 KiB/s upload bucket sends ~a quarter MiB per simulated second,
    writes nothing while waiting however often the transport asks, and the slices arrive intact."""
    server_store, client_store = stores
    _, infos = fill_task(server_store, TID, CONTENT, P)
    client_task = client_store.open(TID, P, 0.0)
    clock = MemoryReactorClock()
    rate = 256 * 1024
    bucket = TokenBucket(clock, rate)
    pool = SourcePool(clock, stall_timeout=30, min_rate=1.0)
    server = FramedProtocol(lambda wire: SliceServerSession(wire, server_store.lookup), upload=bucket)
    client = FramedProtocol(lambda wire: FetchSession(wire, pool, KEY))
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), clock=clock)
    session = client.session
    assert isinstance(session, FetchSession)
    results: list[tuple[int, str | None]] = []
    reqs = [
        PieceRequest(client_task, i, info.data_len, info.md5, lambda r, e: results.append((r.piece, e)))
        for i, info in enumerate(infos)
    ]
    for r in reqs:
        session.request(r)
    for _ in range(50):
        pump.pump()  # each pump lets the transport ask the producer for more
    first = sum(r.received for r in reqs)
    assert 0 < first <= bucket.depth
    seen = [first]
    for _ in range(12):
        for _ in range(100):
            clock.advance(0.01)
            pump.pump()
        seen.append(sum(r.received for r in reqs))
    steps = [b - a for a, b in zip(seen, seen[1:], strict=False) if b < len(CONTENT)]
    # Each simulated second carries the rate, give or take one grant.
    assert len(steps) >= 6 and all(abs(s - rate) <= bucket.quantum for s in steps), steps
    assert sum(r.received for r in reqs) == len(CONTENT)
    assert results == [(0, None), (1, None), (2, None)]
    for i, info in enumerate(infos):
        got = os.pread(client_task.fd, info.data_len, client_task.data_offset(i))
        assert got == CONTENT[i * (P - OVERHEAD) : i * (P - OVERHEAD) + info.data_len]


def _slice_header(data_len: int) -> bytes:
    from dfly.pieces import SliceHeader

    return SliceHeader(data_len, P).encode()


def test_stall_timer_and_deadline_stop_while_our_download_limit_pauses(
    stores: tuple[PeerStore, PeerStore],
) -> None:
    """A fetch paused by our own download bucket for longer than the stall timeout and the piece
    deadline is not failed; once reading resumes, a silent source is still caught."""
    server_store, client_store = stores
    _, infos = fill_task(server_store, TID, CONTENT, P)
    client_task = client_store.open(TID, P, 0.0)
    clock = MemoryReactorClock()
    bucket = TokenBucket(clock, rate=4096, depth=64 * 1024)  # 64 KiB of debt takes 16 s to repay
    pool = SourcePool(clock, stall_timeout=5, min_rate=MIB, download=bucket)  # deadline 6 s
    client = FramedProtocol(lambda wire: FetchSession(wire, pool, KEY), download=bucket)
    transport = StringTransport()
    client.makeConnection(transport)
    session = client.session
    assert isinstance(session, FetchSession)
    results: list[tuple[int, str | None]] = []
    info = infos[0]
    req = PieceRequest(client_task, 0, info.data_len, info.md5, lambda r, e: results.append((r.piece, e)))
    session.request(req)
    announce = encode_control({"op": "slice", "task": TID, "piece": 0, "len": info.data_len, "piece_size": P})
    client.dataReceived(announce + _slice_header(info.data_len) + CONTENT[: 128 * 1024])
    assert transport.producerState == "paused"
    clock.advance(15.0)  # past both the stall timeout and the deadline, all of it throttled
    assert results == [] and not transport.disconnecting
    for _ in range(200):
        if transport.producerState == "producing":
            break
        clock.advance(0.25)
    assert transport.producerState == "producing" and results == []
    clock.advance(4.9)
    assert results == []
    clock.advance(0.2)  # reading again, and the source sends nothing for the stall timeout
    assert transport.disconnecting
    client.connectionLost(iosim.error.ConnectionDone())  # type: ignore[attr-defined]
    assert results and "sent nothing" in (results[0][1] or "")
    assert bucket.waiting == 0


# -- options ---------------------------------------------------------------------------


def _parse(cls: type, argv: list[str]) -> Any:
    opts = cls()
    opts.parseOptions(argv)
    return opts


def test_rate_options_accept_suffixes_and_zero() -> None:
    """RATE takes K/M/G suffixes (bytes per second) and 0 for no limit, on every role."""
    peer = _parse(peer_tap.Options, ["--upload-rate", "2M", "--download-rate", "512K"])
    assert peer["upload-rate"] == 2 * MIB and peer["download-rate"] == 512 * 1024
    assert _parse(peer_tap.Options, [])["upload-rate"] == 0
    sn = _parse(sn_tap.Options, ["--origin-rate", "1G", "--upload-rate", "0"])
    assert sn["origin-rate"] == 1 << 30 and sn["upload-rate"] == 0
    g = _parse(dfget.Options, ["http://h/f", "--supernode", "h:1", "--download-rate", "3m"])
    assert g["download-rate"] == 3 * MIB and g["upload-rate"] == 0


@pytest.mark.parametrize(
    ("cls", "argv", "message"),
    [
        (peer_tap.Options, ["--upload-rate", "fast"], "--upload-rate"),
        (peer_tap.Options, ["--download-rate", "-1M"], "--download-rate must not be negative"),
        (sn_tap.Options, ["--origin-rate", "10X"], "--origin-rate"),
        (sn_tap.Options, ["--upload-rate", "M"], "--upload-rate"),
        (dfget.Options, ["http://h/f", "--download-rate", "lots"], "--download-rate"),
        (dfget.Options, ["http://h/f", "--home", "/x", "--upload-rate", "1M"], "a daemon has its own"),
    ],
)
def test_bad_rate_is_a_usage_error(cls: type, argv: list[str], message: str) -> None:
    """A malformed or negative RATE (or one dfget cannot apply) is a clear usage error."""
    with pytest.raises(usage.UsageError, match=message):
        _parse(cls, argv)


def test_daemon_services_share_one_bucket_per_direction(tmp_path: Any) -> None:
    """The peer daemon's upload server and its fetches use the node's buckets, sized as configured."""
    clock = MemoryReactorClock()
    config = _parse(
        peer_tap.Options, ["--home", str(tmp_path / "p"), "--upload-rate", "1M", "--download-rate", "3M"]
    )
    service: Any = peer_tap.makeService(config, clock)
    listeners = service.listeners()
    node = service.node
    try:
        assert node.upload_bucket.rate == MIB and node.download_bucket.rate == 3 * MIB
        assert listeners[0][1].upload is node.upload_bucket
        assert node.sources.download is node.download_bucket
    finally:
        node.store.close()
        service._lock.close()
