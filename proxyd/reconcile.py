"""The reconcile step: from the workers the master wants to the workers it has.

The master wants one ready worker per slot ``0..count-1`` of the current generation. Whatever
happened (a crash, a ``retire``, a silent worker, a resize, a committed reload), the master
marks what it learnt on its ``WorkerProcess`` objects and calls ``plan``, which says what to do
next; the master only carries the plan out. One rule covers reload, recycling and crash
recovery: a slot's predecessors are drained only once its successor is READY.

Pure: no I/O, no clock of its own, no processes; ``tests/unit/test_reconcile.py`` drives it.
The protocol as a whole: docs/architecture.md, "Reload, recycling and crash recovery".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

# A worker's states: starting → ready (⇄ unresponsive) → draining; forgotten once reaped.
STARTING: Final = "starting"
READY: Final = "ready"
UNRESPONSIVE: Final = "unresponsive"
DRAINING: Final = "draining"


class Member(Protocol):
    """What the plan reads of a worker (``WorkerProcess`` has it)."""

    @property
    def slot(self) -> int: ...

    @property
    def generation(self) -> int: ...

    @property
    def state(self) -> str: ...

    @property
    def replace_reason(self) -> str | None: ...

    @property
    def serial(self) -> int: ...

    @property
    def started(self) -> float: ...


W = TypeVar("W", bound=Member)


@dataclass
class Plan(Generic[W]):
    spawn: list[int] = field(default_factory=list)  # slots that get a new worker now
    drain: list[W] = field(default_factory=list)  # covered by a ready successor, or unwanted
    abandon: list[W] = field(default_factory=list)  # starting for longer than ready_timeout
    # Silent workers that speak again, and no successor is on the way: they keep their slot.
    call_off: list[W] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)  # slots in a respawn back-off


def plan(workers: Iterable[W], count: int, generation: int, *, now: float,
                    ready_timeout: float, blocked_until: Mapping[int, float]) -> Plan[W]:
    """What to do so that each slot below ``count`` has a ready worker of ``generation``.

    Workers of a later generation are a reload's candidates, not yet committed: left alone.
    ``now`` and ``started`` are on one monotonic clock; ``blocked_until`` holds the slots
    whose workers keep failing, and until when their next spawn waits.
    """
    result: Plan[W] = Plan()
    serving = [w for w in workers if w.state != DRAINING and w.generation <= generation]
    for w in serving:
        if w.state == STARTING and w.generation == generation and now - w.started > ready_timeout:
            result.abandon.append(w)
    abandoned = {id(w) for w in result.abandon}
    serving = [w for w in serving if id(w) not in abandoned]
    for w in serving:
        if w.slot >= count:
            result.drain.append(w)  # its slot is gone (a resize or a smaller reload)
    for slot in range(count):
        mine = [w for w in serving if w.slot == slot]
        current = [w for w in mine if w.generation == generation]
        keepers = [w for w in current if w.state == READY and w.replace_reason is None]
        if keepers:
            keeper = max(keepers, key=lambda w: w.serial)
            result.drain += [w for w in mine if w is not keeper and w.state != STARTING]
            continue
        if any(w.state == STARTING for w in current):
            continue  # its successor is on the way; predecessors serve until it is READY
        answered = [w for w in current
                    if w.state == READY and w.replace_reason == UNRESPONSIVE]
        if answered:
            result.call_off += answered  # no successor came: the silent one keeps the slot
        elif blocked_until.get(slot, 0.0) > now:
            result.waiting.append(slot)
        else:
            result.spawn.append(slot)
    return result
