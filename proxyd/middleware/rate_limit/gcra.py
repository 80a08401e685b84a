"""GCRA (generic cell rate algorithm): a token bucket kept as one timestamp per key.

State per key is the theoretical arrival time (TAT). With emission interval T = period/count
and burst B, a request at ``now`` is allowed when ``max(TAT, now) + T - B·T <= now``; allowing it
moves TAT forward by T. B requests may arrive at once; after that one per T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Limit:
    count: int  # requests ...
    period: float  # ... per this many seconds
    burst: int  # requests allowed at once
    # Derived once, not per request (the memory limiter runs on every request of a route).
    interval: float = field(init=False, compare=False)
    tolerance: float = field(init=False, compare=False)
    count_bytes: bytes = field(init=False, compare=False)  # the RateLimit-Limit value

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", self.period / self.count)
        object.__setattr__(self, "tolerance", self.interval * self.burst)
        object.__setattr__(self, "count_bytes", b"%d" % self.count)

    def scaled(self, share: int) -> Limit:
        """This limit split evenly across ``share`` independent enforcers.

        The rate splits exactly (each gets ``count`` per ``share`` periods, so together they
        allow the configured rate, however small); the burst is rounded down, to at least 1.
        """
        if share <= 1:
            return self
        return Limit(self.count, self.period * share, max(1, self.burst // share))

    def policy(self) -> str:
        return f"{self.count};w={self.period:g};burst={self.burst}"


def policy(limits: list[Limit]) -> bytes:
    """The RateLimit-Policy value of what ``limits`` enforce."""
    return ", ".join(limit.policy() for limit in limits).encode()


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~4x, per request
class Decision:
    allowed: bool
    limit: Limit
    remaining: int
    reset: float  # seconds until the bucket is full again
    retry_after: float  # seconds until a request would be allowed (0 when allowed)


def check(limit: Limit, tat: float | None, now: float) -> tuple[Decision, float | None]:
    """Decide one request; (decision, new TAT to store — None when denied)."""
    start = now if tat is None or tat < now else tat
    new_tat = start + limit.interval
    allow_at = new_tat - limit.tolerance
    if now < allow_at:
        remaining = 0
        return Decision(False, limit, remaining, start - now, allow_at - now), None
    remaining = math.floor((now - allow_at) / limit.interval + 1e-9)
    return Decision(True, limit, remaining, new_tat - now, 0.0), new_tat


def check_all(limits: list[Limit], tats: list[float | None], now: float
              ) -> tuple[list[Decision], list[float] | None]:
    """All limits of one request: allowed only if every one allows; nothing moves otherwise."""
    if len(limits) == 1:  # the common single limit: no lists to merge
        decision, new_tat = check(limits[0], tats[0], now)
        return [decision], [new_tat] if new_tat is not None else None
    decisions: list[Decision] = []
    new_tats: list[float] = []
    for limit, tat in zip(limits, tats, strict=True):
        decision, new_tat = check(limit, tat, now)
        decisions.append(decision)
        if new_tat is not None:
            new_tats.append(new_tat)
    if all(d.allowed for d in decisions):
        return decisions, new_tats
    return decisions, None
