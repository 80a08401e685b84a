"""Per-worker failure handling for one upstream: the retry budget and the circuit breaker.

Both count over a sliding window of a few buckets, advanced lazily from the worker's coarse
clock (``Deadlines.now``): no timer, no allocation per request, a few integer additions.
Passive outlier detection lives on the targets themselves (upstream.py); the active health
checks run in the master (health.py).
"""

from __future__ import annotations

from typing import Protocol

from proxyd.config.models import CircuitBreaker, Retries

SLOTS = 10


class Clock(Protocol):
    now: float


class Window:
    """Two counters (``total``, ``marked``) over the last ``span`` seconds, in SLOTS buckets."""

    __slots__ = ("_clock", "_i", "_marked", "_start", "_total", "_width", "marked", "total")

    def __init__(self, span: float, clock: Clock) -> None:
        self._clock = clock
        self._width = max(span, 0.001) / SLOTS
        self._total = [0] * SLOTS
        self._marked = [0] * SLOTS
        self._i = 0
        self._start = clock.now
        self.total = 0
        self.marked = 0

    def advance(self) -> None:
        elapsed = self._clock.now - self._start
        if elapsed < self._width:
            return
        steps = int(elapsed / self._width)
        self._start += steps * self._width
        for _ in range(min(steps, SLOTS)):
            i = self._i = (self._i + 1) % SLOTS
            self.total -= self._total[i]
            self.marked -= self._marked[i]
            self._total[i] = self._marked[i] = 0

    def add(self, total: int, marked: int) -> None:
        self.advance()
        self._total[self._i] += total
        self._marked[self._i] += marked
        self.total += total
        self.marked += marked

    def reset(self) -> None:
        self._total = [0] * SLOTS
        self._marked = [0] * SLOTS
        self.total = self.marked = 0


class RetryBudget:
    """Retries may add at most ``ratio`` of the requests (first tries) of the window, but
    ``min_retries`` per window are always allowed so a quiet upstream still gets them.

    Requests are not counted here: the pool bumps a plain integer per request and ``roll``
    (called at most once a slot, from the pool's periodic check) notes where each slot began
    in that running count, so the hot path pays one integer addition.
    """

    __slots__ = ("_clock", "_i", "_marks", "_retries", "_start", "_width", "min_retries",
                 "next_roll", "ratio", "requests")

    def __init__(self, cfg: Retries, clock: Clock) -> None:
        self.ratio = cfg.budget
        self.min_retries = cfg.min_retries
        self._clock = clock
        self._width = max(cfg.budget_window, 0.001) / SLOTS
        self._marks = [0] * SLOTS  # the running request count when each slot began
        self._retries = [0] * SLOTS
        self._i = 0
        self._start = clock.now
        self.next_roll = self._start + self._width
        self.requests = 0  # running count of first tries, bumped by the pool's users

    def roll(self) -> None:
        elapsed = self._clock.now - self._start
        if elapsed < self._width:
            return
        steps = int(elapsed / self._width)
        self._start += steps * self._width
        self.next_roll = self._start + self._width
        for _ in range(min(steps, SLOTS)):
            i = self._i = (self._i + 1) % SLOTS
            self._marks[i] = self.requests
            self._retries[i] = 0

    def allow(self) -> bool:
        self.roll()
        oldest = self._marks[(self._i + 1) % SLOTS]  # the start of the window
        retries = sum(self._retries)
        return retries < self.min_retries or retries < self.ratio * (self.requests - oldest)

    def spend(self) -> None:
        self._retries[self._i] += 1


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    """Error-rate circuit breaker: closed → (error rate over the window) → open, refusing at
    once for ``open_for`` → half-open, letting ``half_open_requests`` probes through; all of
    them succeeding closes it, any failing opens it again."""

    __slots__ = ("_clock", "_probing", "_succeeded", "cfg", "enabled", "open_until", "state",
                 "trips", "window")

    def __init__(self, cfg: CircuitBreaker, clock: Clock) -> None:
        self.cfg = cfg
        self._clock = clock
        self.enabled = cfg.error_rate is not None
        self.state = CLOSED
        self.window = Window(cfg.window, clock)  # total = tries, marked = failures
        self.open_until = 0.0
        self._probing = 0  # probes let through and not yet answered
        self._succeeded = 0
        self.trips = 0

    def allow(self) -> bool:
        if self.state == CLOSED:
            return True
        now = self._clock.now
        if self.state == OPEN:
            if now < self.open_until:
                return False
            self.state = HALF_OPEN
            self._probing = self._succeeded = 0
            self.open_until = now + self.cfg.open_for  # a probe that never reports expires
        elif now >= self.open_until:
            self._probing = 0  # probes lost (client gone): let new ones through
            self.open_until = now + self.cfg.open_for
        if self._probing + self._succeeded < self.cfg.half_open_requests:
            self._probing += 1
            return True
        return False

    def record(self, ok: bool) -> None:
        if not self.enabled:
            return
        if self.state == CLOSED:
            w = self.window
            w.add(1, 0 if ok else 1)
            rate = self.cfg.error_rate
            if not ok and rate is not None and w.total >= self.cfg.min_requests \
                    and w.marked >= rate * w.total:
                self._open()
        elif self.state == HALF_OPEN:
            self._probing = max(0, self._probing - 1)
            if not ok:
                self._open()
            else:
                self._succeeded += 1
                if self._succeeded >= self.cfg.half_open_requests:
                    self.state = CLOSED
                    self.window.reset()

    def _open(self) -> None:
        self.state = OPEN
        self.trips += 1
        self.open_until = self._clock.now + self.cfg.open_for
