"""Balancing policies: shares follow the weights, and consistent hashing barely moves keys."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from proxyd.proxy.balance import HashRing, make_balancer


@dataclass(eq=False)
class Fake:
    url: str
    weight: int = 1
    up: bool = True
    in_use: int = 0


WEIGHTS = [1, 2, 3, 2]


def fakes(weights: list[int]) -> list[Fake]:
    return [Fake(f"http://10.0.0.{i}:80", w) for i, w in enumerate(weights, 1)]


def assert_shares(counts: Counter[str], targets: list[Fake], tolerance: float) -> None:
    total = sum(counts.values())
    weight_sum = sum(t.weight for t in targets)
    for t in targets:
        expected = t.weight / weight_sum
        got = counts[t.url] / total
        assert abs(got - expected) <= tolerance * expected, (t.url, got, expected, counts)


@pytest.mark.parametrize("kind", ["round_robin", "least_conn", "random"])
def test_sequential_requests_follow_weights(kind: str) -> None:
    """Nothing in flight between picks (an idle upstream): still in weight proportion."""
    random.seed(7)
    targets = fakes(WEIGHTS)
    pick = make_balancer(kind, targets)
    counts = Counter(pick().url for _ in range(16000))
    assert_shares(counts, targets, 0.0 if kind != "random" else 0.06)


@pytest.mark.parametrize("kind", ["round_robin", "least_conn", "random"])
def test_shares_under_concurrent_load_follow_weights(kind: str) -> None:
    """Requests in flight with equal service times (each one in flight is equally likely to
    finish next): the load-aware policies keep in_use proportional to weight, so do shares."""
    random.seed(11)
    targets = fakes(WEIGHTS)
    pick = make_balancer(kind, targets)
    in_flight: list[Fake] = []
    counts: Counter[str] = Counter()
    for _ in range(40000):
        t = pick()
        t.in_use += 1
        in_flight.append(t)
        counts[t.url] += 1
        if len(in_flight) > 32:
            done = in_flight.pop(random.randrange(len(in_flight)))
            done.in_use -= 1
    assert_shares(counts, targets, 0.08)


def test_round_robin_is_smooth() -> None:
    targets = fakes([5, 1, 1])
    pick = make_balancer("round_robin", targets)
    order = [targets.index(pick()) for _ in range(7)]
    assert order == [0, 0, 1, 0, 2, 0, 0]


def keys(n: int) -> list[bytes]:
    return [f"198.51.{i // 256}.{i % 256}".encode() for i in range(n)]


def test_hash_distribution_follows_weights() -> None:
    targets = fakes(WEIGHTS)
    ring = HashRing(targets)
    counts: Counter[str] = Counter()
    for key in keys(40000):
        t = ring.get(key)
        assert t is not None
        counts[t.url] += 1
    assert_shares(counts, targets, 0.2)


def test_hash_is_stable_and_sticky() -> None:
    a, b = HashRing(fakes([1, 1, 1])), HashRing(fakes([1, 1, 1]))
    for key in keys(500):
        ta, tb = a.get(key), b.get(key)
        assert ta is not None and tb is not None and ta.url == tb.url  # any worker, any process
        assert a.get(key) is ta


@pytest.mark.parametrize("removed", range(4))
def test_hash_keeps_keys_when_one_of_four_targets_is_removed(removed: int) -> None:
    four = fakes([1, 1, 1, 1])
    three = [t for i, t in enumerate(fakes([1, 1, 1, 1])) if i != removed]
    before, after = HashRing(four), HashRing(three)
    sample = keys(20000)
    kept = 0
    for key in sample:
        old, new = before.get(key), after.get(key)
        assert old is not None and new is not None
        if old.url == new.url:
            kept += 1
        else:
            assert old.url == four[removed].url  # only the removed target's keys move
    assert kept / len(sample) >= 0.70


def test_hash_walks_past_targets_that_are_down_and_returns() -> None:
    targets = fakes([1, 1, 1, 1])
    ring = HashRing(targets)
    sample = keys(5000)
    home = {key: ring.get(key) for key in sample}
    targets[2].up = False
    for key in sample:
        t = ring.get(key)
        assert t is not None and t is not targets[2]
        if home[key] is not targets[2]:
            assert t is home[key]
    targets[2].up = True
    assert all(ring.get(key) is home[key] for key in sample)


def test_hash_skip_gives_the_next_distinct_target() -> None:
    targets = fakes([1, 1])
    ring = HashRing(targets)
    for key in keys(200):
        first = ring.get(key)
        assert ring.get(key, skip=first) not in (None, first)
    targets[1].up = False
    assert ring.get(b"k", skip=targets[0]) is None
