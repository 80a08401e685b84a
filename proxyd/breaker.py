"""The circuit breaker: stop calling something that fails, and probe it now and then.

One class serves every user: an upstream's per-worker breaker (tripped by an error rate,
driven by the worker's ``Deadlines`` clock), the Redis rate limiter and the Redis cache store
(tripped by consecutive failures, with an open time that grows while the outage lasts). Counts
are kept over a sliding window of a few buckets advanced lazily from the clock: no timer, no
allocation per call, a few integer additions.
"""

from __future__ import annotations

import time
from typing import Protocol

SLOTS = 10


class Clock(Protocol):
    @property
    def now(self) -> float: ...


class Monotonic:
    """``time.monotonic()`` as a Clock, for users off the worker's ``Deadlines`` tick."""

    __slots__ = ()

    @property
    def now(self) -> float:
        return time.monotonic()


class Window:
    """Two counters (``total``, ``marked``) over the last ``span`` seconds, in SLOTS buckets;
    its owner passes the time in, so that swapping the owner's clock moves this one too."""

    __slots__ = ("_i", "_marked", "_start", "_total", "_width", "marked", "total")

    def __init__(self, span: float, start: float) -> None:
        self._width = max(span, 0.001) / SLOTS
        self._total = [0] * SLOTS
        self._marked = [0] * SLOTS
        self._i = 0
        self._start = start
        self.total = 0
        self.marked = 0

    def advance(self, now: float) -> None:
        elapsed = now - self._start
        if elapsed < self._width:
            return
        steps = int(elapsed / self._width)
        self._start += steps * self._width
        for _ in range(min(steps, SLOTS)):
            i = self._i = (self._i + 1) % SLOTS
            self.total -= self._total[i]
            self.marked -= self._marked[i]
            self._total[i] = self._marked[i] = 0

    def add(self, total: int, marked: int, now: float) -> None:
        self.advance(now)
        self._total[self._i] += total
        self._marked[self._i] += marked
        self.total += total
        self.marked += marked

    def reset(self) -> None:
        self._total = [0] * SLOTS
        self._marked = [0] * SLOTS
        self.total = self.marked = 0


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    """closed → open → half-open → closed.

    Closed: every call passes. It opens after ``failures`` consecutive failures, or when
    ``error_rate`` of the calls within ``window`` seconds failed (once there were
    ``min_requests``); either may be left out, and with neither it never opens (``enabled``
    is False).

    Open: every call is refused for the open time, ``open_for`` at first.

    Half-open: ``probes`` calls pass. All of them succeeding closes it; any failing opens it
    again, for twice the last open time up to ``longest`` (``open_for`` when not given: a
    fixed open time). A probe that never reports (its client went away) expires after the open
    time and new probes pass.

    Results reported while open come from calls let through before it opened: they are one
    outage, not several, and prove nothing about recovery, so they are ignored.
    """

    __slots__ = ("_failed", "_probing", "_succeeded", "clock", "cooldown", "enabled",
                 "error_rate", "failures", "longest", "min_requests", "open_for", "open_until",
                 "probes", "state", "trips", "window")

    def __init__(self, clock: Clock, *, failures: int | None = None,
                 error_rate: float | None = None, min_requests: int = 1,
                 window: float = 10.0, open_for: float = 5.0, longest: float | None = None,
                 probes: int = 1) -> None:
        self.clock = clock
        self.failures = failures
        self.error_rate = error_rate
        self.min_requests = min_requests
        self.open_for = open_for
        self.longest = open_for if longest is None else max(longest, open_for)
        self.probes = probes
        self.enabled = failures is not None or error_rate is not None
        self.state = CLOSED
        self.window = Window(window, clock.now)  # total = calls, marked = failures
        self.cooldown = open_for  # the open time now: grows while probes fail
        self.open_until = 0.0
        self._failed = 0  # consecutive failures while closed
        self._probing = 0  # probes let through and not yet answered
        self._succeeded = 0
        self.trips = 0  # times it opened, a failed probe included

    def allow(self) -> bool:
        if self.state == CLOSED:
            return True
        now = self.clock.now
        if self.state == OPEN:
            if now < self.open_until:
                return False
            self.state = HALF_OPEN
            self._probing = self._succeeded = 0
            self.open_until = now + self.cooldown  # a probe that never reports expires
        elif now >= self.open_until:
            self._probing = 0  # probes lost (client gone): let new ones through
            self.open_until = now + self.cooldown
        if self._probing + self._succeeded < self.probes:
            self._probing += 1
            return True
        return False

    def record(self, ok: bool) -> bool:
        """Note a call's result; True when it moved the breaker between closed and not
        closed: a failure that began an outage, or a success that ended one."""
        if not self.enabled:
            return False
        if self.state == CLOSED:
            if ok:
                self._failed = 0
            else:
                self._failed += 1
            rate = self.error_rate
            if rate is not None:
                w = self.window
                w.add(1, 0 if ok else 1, self.clock.now)
                if not ok and w.total >= self.min_requests and w.marked >= rate * w.total:
                    self._open(self.open_for)
                    return True
            limit = self.failures
            if limit is not None and self._failed >= limit:
                self._open(self.open_for)
                return True
        elif self.state == HALF_OPEN:
            self._probing = max(0, self._probing - 1)
            if not ok:
                self._open(min(self.longest, self.cooldown * 2))
            else:
                self._succeeded += 1
                if self._succeeded >= self.probes:
                    self.state = CLOSED
                    self._failed = 0
                    self.cooldown = self.open_for
                    self.window.reset()
                    return True
        return False

    def _open(self, cooldown: float) -> None:
        self.state = OPEN
        self.trips += 1
        self.cooldown = cooldown
        self.open_until = self.clock.now + cooldown
