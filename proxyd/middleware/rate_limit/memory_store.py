"""Per-worker GCRA state: a dict of key → TATs, swept of expired keys as it grows."""

from __future__ import annotations

import time
from collections.abc import Callable

from proxyd.middleware.rate_limit.gcra import Decision, Limit, check_all, policy

SWEEP_AT = 100_000  # keys; past this, expired ones are dropped (a key is expired when TAT < now)


class MemoryLimiter:
    def __init__(self, limits: list[Limit], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.policy = policy(limits)
        self.clock = clock
        self.state: dict[str, list[float]] = {}
        self.sweep_at = SWEEP_AT

    def set_limits(self, limits: list[Limit]) -> None:
        """New shares of the same limits (the worker count changed); the stored TATs stay,
        so no key starts over with a full burst."""
        self.limits = limits
        self.policy = policy(limits)

    def check(self, key: str) -> list[Decision]:
        now = self.clock()
        stored = self.state.get(key)
        # check_all never changes the list it is given: the stored one needs no copy.
        tats: list[float | None] = (stored if stored is not None  # type: ignore[assignment]
                                    else [None] * len(self.limits))
        decisions, new_tats = check_all(self.limits, tats, now)
        if new_tats is not None:
            self.state[key] = new_tats
            if len(self.state) > self.sweep_at:
                self.sweep(now)
        return decisions

    def sweep(self, now: float) -> None:
        self.state = {k: v for k, v in self.state.items() if max(v) > now}
        # With that many live keys, the next sweep waits until the table doubles: sweeping
        # on every new key would cost O(keys) per request.
        self.sweep_at = max(SWEEP_AT, 2 * len(self.state))
