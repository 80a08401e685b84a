"""The circuit breaker on a hand-driven clock: each way in and out of each state."""

from __future__ import annotations

from proxyd.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0


def test_consecutive_failures_open_it_and_a_success_starts_the_count_again() -> None:
    clock = Clock()
    b = Breaker(clock, failures=3, open_for=1.0)
    for ok in (False, False, True, False, False):
        assert not b.record(ok)
    assert b.state == CLOSED
    assert b.record(False)  # the third in a row: an outage begins
    assert b.state == OPEN and b.trips == 1 and not b.allow()


def test_error_rate_opens_it_once_there_were_enough_calls() -> None:
    clock = Clock()
    b = Breaker(clock, error_rate=0.5, min_requests=4, window=10.0)
    for ok in (False, True, False):
        b.record(ok)
    assert b.state == CLOSED  # two of three failed, but under min_requests
    b.record(True)
    clock.now += 11  # those slid out of the window
    for ok in (True, True, True, False, True, False, False):
        assert not b.record(ok)
    assert b.state == CLOSED  # three of seven failed
    assert b.record(False)  # four of eight
    assert b.state == OPEN


def test_without_a_threshold_it_never_opens() -> None:
    b = Breaker(Clock(), open_for=1.0)
    assert not b.enabled
    for _ in range(100):
        assert not b.record(False)
    assert b.state == CLOSED and b.allow()


def test_half_open_needs_every_probe_to_succeed() -> None:
    clock = Clock()
    b = Breaker(clock, failures=1, open_for=2.0, probes=2)
    b.record(False)
    clock.now += 2.0
    assert b.allow() and b.allow() and not b.allow()
    assert b.state == HALF_OPEN
    assert not b.record(True)
    assert b.state == HALF_OPEN
    assert b.record(True)  # the outage is over
    assert b.state == CLOSED and b.allow()


def test_a_failed_probe_opens_it_for_longer_up_to_the_longest() -> None:
    clock = Clock()
    b = Breaker(clock, failures=1, open_for=1.0, longest=3.0)
    b.record(False)
    opened = []
    for _ in range(4):
        opened.append(b.open_until - clock.now)
        clock.now = b.open_until
        assert b.allow()
        assert not b.record(False)  # the same outage: not reported again
    assert opened == [1.0, 2.0, 3.0, 3.0] and b.trips == 5
    clock.now = b.open_until
    assert b.allow()
    b.record(True)
    b.record(False)  # a new outage opens for the first open time again
    assert b.open_until - clock.now == 1.0


def test_without_a_longest_the_open_time_is_fixed() -> None:
    clock = Clock()
    b = Breaker(clock, failures=1, open_for=1.0)
    b.record(False)
    for _ in range(3):
        assert b.open_until - clock.now == 1.0
        clock.now = b.open_until
        assert b.allow()
        b.record(False)


def test_results_reported_while_open_are_ignored() -> None:
    """They come from calls let through before it opened: neither a success nor more failures
    change when it probes."""
    clock = Clock()
    b = Breaker(clock, failures=1, open_for=1.0, longest=8.0)
    b.record(False)
    until = b.open_until
    for ok in (False, True, False, True):
        assert not b.record(ok)
    assert b.state == OPEN and b.open_until == until and b.trips == 1


def test_a_probe_that_never_reports_expires() -> None:
    clock = Clock()
    b = Breaker(clock, failures=1, open_for=1.0)
    b.record(False)
    clock.now += 1.0
    assert b.allow()  # its caller went away and never reports
    assert not b.allow()
    clock.now += 0.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()
