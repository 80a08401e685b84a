"""The reconcile plan: the desired slots of a generation against the workers there are."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from proxyd.reconcile import DRAINING, READY, STARTING, UNRESPONSIVE, plan

_serials = itertools.count(1)


@dataclass
class W:
    slot: int
    generation: int = 1
    state: str = READY
    replace_reason: str | None = None
    started: float = 0.0
    serial: int = field(default_factory=lambda: next(_serials))


def _plan(workers: list[W], count: int = 2, generation: int = 1, now: float = 1.0,
          blocked: dict[int, float] | None = None):  # type: ignore[no-untyped-def]
    return plan(workers, count, generation, now=now, ready_timeout=30.0,
                blocked_until=blocked or {})


def test_missing_slots_are_spawned_and_a_full_set_is_left_alone() -> None:
    assert _plan([]).spawn == [0, 1]
    full = _plan([W(0), W(1)])
    assert (full.spawn, full.drain, full.abandon, full.call_off) == ([], [], [], [])


def test_a_predecessor_drains_only_once_its_successor_is_ready() -> None:
    old = W(0, replace_reason="retire")
    assert _plan([old, W(1)]).spawn == [0]
    successor = W(0, state=STARTING)
    assert _plan([old, successor, W(1)]).drain == []
    successor.state = READY
    assert _plan([old, successor, W(1)]).drain == [old]


def test_a_committed_generation_drains_the_old_one() -> None:
    old = [W(0), W(1), W(2)]
    new = [W(0, generation=2), W(1, generation=2)]
    result = _plan(old + new, count=2, generation=2)
    assert sorted(w.slot for w in result.drain) == [0, 1, 2]
    assert all(w.generation == 1 for w in result.drain)
    assert result.spawn == []


def test_a_reloads_candidates_are_not_touched() -> None:
    candidates = [W(0, generation=2, state=STARTING), W(1, generation=2, state=STARTING,
                                                         started=-100.0)]
    result = _plan([W(0), W(1), *candidates])
    assert (result.spawn, result.drain, result.abandon) == ([], [], [])


def test_slots_beyond_the_count_drain() -> None:
    third = W(2)
    assert _plan([W(0), W(1), third]).drain == [third]


def test_a_start_that_overran_is_abandoned_and_a_blocked_slot_waits() -> None:
    stuck = W(0, state=STARTING, started=-40.0)
    result = _plan([stuck, W(1)])
    assert result.abandon == [stuck] and result.spawn == [0]
    blocked = _plan([W(1)], blocked={0: 5.0})
    assert blocked.spawn == [] and blocked.waiting == [0]


def test_a_silent_worker_that_answers_again_is_called_off_without_a_successor() -> None:
    silent = W(0, state=UNRESPONSIVE, replace_reason=UNRESPONSIVE)
    assert _plan([silent, W(1)]).spawn == [0]
    silent.state = READY  # it speaks again; no successor is on the way
    result = _plan([silent, W(1)])
    assert result.call_off == [silent] and result.spawn == []
    successor = W(0, state=STARTING)  # one on the way still takes over
    assert _plan([silent, successor, W(1)]).call_off == []


def test_draining_workers_count_for_nothing() -> None:
    assert _plan([W(0, state=DRAINING), W(1)]).spawn == [0]
