"""Coarse deadlines for connections, checked by one periodic sweep per worker.

A timer handle per request (``loop.call_later`` on every keep-alive turn and every upstream read)
costs an allocation and a heap operation on the hot path; here a connection just stores a float
deadline and the sweep, a few times a second, calls ``on_deadline`` on the overdue ones. The
price is precision: timeouts fire up to one tick late.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class HasDeadline(Protocol):
    deadline: float  # loop time; 0.0 = none

    def on_deadline(self) -> None: ...


class Deadlines:
    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self._loop = loop
        self.tick = tick
        self.now = loop.time()  # refreshed every tick: cheap "current time" for the hot path
        self._members: set[HasDeadline] = set()
        self._handle: asyncio.TimerHandle | None = None

    @staticmethod
    def tick_for(*timeouts: float) -> float:
        """A quarter of the shortest timeout, kept between 20 ms and 500 ms."""
        positive = [t for t in timeouts if t > 0]
        return min(0.5, max(0.02, min(positive, default=2.0) / 4))

    def start(self) -> None:
        self.now = self._loop.time()
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
        now = self.now = self._loop.time()
        overdue = [m for m in self._members if 0.0 < m.deadline <= now]
        for member in overdue:
            member.deadline = 0.0
            member.on_deadline()
        self._handle = self._loop.call_later(self.tick, self._sweep)
