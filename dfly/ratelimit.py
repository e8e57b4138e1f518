"""Byte-rate limits: one token bucket per direction for the whole process.

Design: a L{TokenBucket} fills at C{rate} tokens (bytes) per second up to a
small C{depth} (about 200 ms worth, never less than one 64 KiB socket read), so
a burst can never be much larger than that and the average over any 10 s stays
within a few percent of the rate.  Consumers use it in one of two ways:

* I{before} bytes flow (an outbound producer): L{TokenBucket.take} grants up
  to the number of bytes asked for, or nothing;
* I{after} bytes flowed (a socket read already happened): L{TokenBucket.debit}
  subtracts them, and the balance may go negative (debt, repaid by waiting).

A consumer that got nothing, or is in debt, stops its producer and calls
L{TokenBucket.wait}.  Waiters queue in arrival order; there is at most one
timer, set for the exact moment the first waiter's need is covered, and when
it fires waiters are woken in order while tokens last.  A woken waiter takes
its share before the next is considered, so many connections share the rate
round-robin.  While anyone waits, L{TokenBucket.take} grants nothing to
newcomers outside the wake-up, so nobody overtakes the queue.

L{InboundThrottle} applies a bucket to a receiving transport: it debits what
arrives, pauses the transport (C{pauseProducing}) while in debt and resumes it
when woken, telling its owner so that stall timers do not count our own
throttling against the sender.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

READ_SIZE = 64 * 1024  # what one socket read can deliver
DEPTH_SECONDS = 0.2
MIN_DELAY = 0.0005  # shortest wake-up timer
_SLACK = 1e-6  # tokens: rounding of clock arithmetic


class Wait:
    """A place in a bucket's queue; C{cancel} leaves it."""

    def __init__(self, bucket: TokenBucket, need: float, callback: Callable[[], None]) -> None:
        self.bucket = bucket
        self.need = need
        self.callback = callback
        self.active = True

    def cancel(self) -> None:
        if self.active:
            self.active = False
            self.bucket._leave(self)


class TokenBucket:
    """C{rate} bytes per second, at most C{depth} bytes ahead."""

    def __init__(self, clock: IReactorTime, rate: float, depth: float | None = None) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.clock = clock
        self.rate = float(rate)
        self.depth = float(depth) if depth is not None else max(self.rate * DEPTH_SECONDS, float(READ_SIZE))
        # Smallest grant worth a write (avoid tiny chunks at high rates).
        self.quantum = int(min(self.depth, READ_SIZE))
        self._tokens = self.depth
        self._stamp = clock.seconds()
        self._waiters: deque[Wait] = deque()
        self._timer: IDelayedCall | None = None
        self._waking = False
        self.timers_set = 0  # for tests and stats: how many wake-up timers were scheduled

    # -- accounting --------------------------------------------------------------
    def _refill(self) -> None:
        now = self.clock.seconds()
        if now > self._stamp:
            self._tokens = min(self.depth, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    @property
    def tokens(self) -> float:
        """The balance now (negative while in debt)."""
        self._refill()
        return self._tokens

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def take(self, want: int, least: int | None = None) -> int:
        """Grant up to C{want} bytes now, and at least C{least} (default: the quantum), or 0.

        Nothing is granted outside a wake-up while others wait (no overtaking).
        """
        if want <= 0:
            return 0
        if self._waiters and not self._waking:
            return 0
        self._refill()
        floor = min(want, self.quantum if least is None else least)
        granted = min(want, int(self._tokens + _SLACK))
        if granted < max(floor, 1):
            return 0
        self._tokens -= granted
        return granted

    def debit(self, n: int) -> None:
        """C{n} bytes already flowed: take them even if that means debt."""
        self._refill()
        self._tokens -= n

    def blocked(self) -> bool:
        """True when a consumer that just debited should stop and wait its turn."""
        self._refill()
        return self._tokens < 0 or (bool(self._waiters) and not self._waking)

    # -- waiting -----------------------------------------------------------------
    def wait(self, callback: Callable[[], None], need: float | None = None) -> Wait:
        """Call C{callback} once the balance is at least C{need} (default: the quantum) and
        every earlier waiter had its turn."""
        need = self.quantum if need is None else min(max(need, 1.0), self.depth)
        w = Wait(self, need, callback)
        self._waiters.append(w)
        self._schedule()
        return w

    def _leave(self, w: Wait) -> None:
        try:
            self._waiters.remove(w)
        except ValueError:
            return
        if not self._waiters and self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        if self._timer is not None or not self._waiters or self._waking:
            return
        self._refill()
        short = self._waiters[0].need - self._tokens
        # Never a timer for "now" when tokens are short: clock rounding must not make a busy loop.
        delay = max(MIN_DELAY, short / self.rate) if short > _SLACK else 0.0
        self.timers_set += 1
        self._timer = self.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._waking = True
        try:
            while self._waiters:
                self._refill()
                head = self._waiters[0]
                if self._tokens < head.need - _SLACK:
                    break
                self._waiters.popleft()
                head.active = False
                head.callback()
        finally:
            self._waking = False
        self._schedule()


def make_bucket(clock: IReactorTime, rate: float) -> TokenBucket | None:
    """A bucket for C{rate} bytes per second, or None for 0 (no limit)."""
    return TokenBucket(clock, rate) if rate > 0 else None


class InboundThrottle:
    """Debits received bytes from a bucket; pauses C{transport} while in debt.

    C{on_pause} / C{on_resume} tell the owner when reading stops and starts again
    because of this limit (not because of the sender).
    """

    def __init__(
        self,
        bucket: TokenBucket,
        transport: Any,
        on_pause: Callable[[], None] | None = None,
        on_resume: Callable[[], None] | None = None,
    ) -> None:
        self.bucket = bucket
        self.transport = transport
        self.on_pause = on_pause
        self.on_resume = on_resume
        self._credit = 0
        self._wait: Wait | None = None
        self.closed = False

    @property
    def paused(self) -> bool:
        return self._wait is not None

    def received(self, n: int) -> None:
        """C{n} bytes arrived on the transport."""
        used = min(self._credit, n)
        self._credit -= used
        if n > used:
            self.bucket.debit(n - used)
        if self._wait is None and not self.closed and self._credit == 0 and self.bucket.blocked():
            self.transport.pauseProducing()
            self._wait = self.bucket.wait(self._woken)
            if self.on_pause is not None:
                self.on_pause()

    def _woken(self) -> None:
        self._wait = None
        if self.closed:
            return
        # Our turn: take a share so that the next waiter gets the rest.
        self._credit = self.bucket.take(self.bucket.quantum, least=1)
        self.transport.resumeProducing()
        if self.on_resume is not None:
            self.on_resume()

    def close(self) -> None:
        """The connection is gone: leave the queue."""
        self.closed = True
        if self._wait is not None:
            self._wait.cancel()
            self._wait = None
