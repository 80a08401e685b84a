"""Per-worker failure handling for one upstream: the retry budget and the circuit breaker
(``proxyd/breaker.py``) its settings describe.

Both count over a sliding window of a few buckets, advanced lazily from the worker's coarse
clock (``Deadlines.now``): no timer, no allocation per request, a few integer additions.
Passive outlier detection lives on the targets themselves (upstream.py); the active health
checks run in the master (health.py).
"""

from __future__ import annotations

from proxyd.breaker import SLOTS, Breaker, Clock
from proxyd.config.models import CircuitBreaker, Retries


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


def upstream_breaker(cfg: CircuitBreaker, clock: Clock) -> Breaker:
    """The breaker an upstream's ``circuit_breaker`` settings describe: tripped by the error
    rate alone, open for a fixed time, closed again by ``half_open_requests`` good probes."""
    return Breaker(clock, error_rate=cfg.error_rate, min_requests=cfg.min_requests,
                   window=cfg.window, open_for=cfg.open_for, probes=cfg.half_open_requests)
