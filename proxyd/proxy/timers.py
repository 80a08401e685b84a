"""Coarse deadlines for connections, checked by one periodic sweep per worker.

A timer handle per request (``loop.call_later`` on every keep-alive turn and every upstream read)
costs an allocation and a heap operation on the hot path; here a connection just stores a float
deadline and the sweep, a few times a second, calls ``on_deadline`` on the overdue ones. The
price is precision: timeouts fire up to one tick late.

Late, never early: a deadline is armed as ``now + timeout``, so ``now`` must not lag the clock
when it is read. The sweep refreshes it, and so does every read callback of a client or
upstream connection (where nearly every deadline is armed), from time.monotonic — the clock
of asyncio's loop.time(), but precise: uvloop's loop.time() is the start of the loop's
iteration in whole milliseconds, behind the clock by up to a few milliseconds.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Protocol


class HasDeadline(Protocol):
    deadline: float  # loop time; 0.0 = none

    def on_deadline(self) -> None: ...


class Deadlines:
    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self._loop = loop
        self.tick = tick
        self.now = monotonic()  # refreshed every tick and every read: the hot path's clock
        self._members: set[HasDeadline] = set()
        self._handle: asyncio.TimerHandle | None = None

    @staticmethod
    def tick_for(*timeouts: float) -> float:
        """A quarter of the shortest timeout, kept between 20 ms and 500 ms."""
        positive = [t for t in timeouts if t > 0]
        return min(0.5, max(0.02, min(positive, default=2.0) / 4))

    def start(self) -> None:
        self.now = monotonic()
        self._handle = self._loop.call_later(self.tick, self._sweep)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def add(self, member: HasDeadline) -> None:
        self._members.add(member)

    def discard(self, member: HasDeadline) -> None:
        self._members.discard(member)

    def __len__(self) -> int:
        return len(self._members)

    def _sweep(self) -> None:
        now = self.now = monotonic()
        overdue = [m for m in self._members if 0.0 < m.deadline <= now]
        for member in overdue:
            member.deadline = 0.0
            member.on_deadline()
        self._handle = self._loop.call_later(self.tick, self._sweep)
