"""Choosing a target for a request. Balancers are closures built once per config."""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from hashlib import blake2b
from itertools import accumulate
from math import gcd
from typing import Generic, Protocol, TypeVar
from zlib import crc32


class Weighted(Protocol):
    weight: int

    @property
    def in_use(self) -> int: ...


class Hashable(Weighted, Protocol):
    url: str  # a target's identity on the ring: the same URL lands on the same points
    up: bool  # eligible now (not ejected, not unhealthy)


T = TypeVar("T", bound=Weighted)
H = TypeVar("H", bound=Hashable)
VNODES = 160  # ring points per unit of weight (ketama's figure): ~8% spread of shares
MAX_UNITS = 64  # above this many weight units in total, points per unit shrink


def smooth_weighted_round_robin(targets: Sequence[T]) -> Callable[[], T]:
    """nginx's smooth weighted round robin: weights 5,1,1 give a,a,b,a,c,a,a — never bursts."""
    if len(targets) == 1:
        only = targets[0]
        return lambda: only
    if all(t.weight == targets[0].weight for t in targets):
        state = [0]

        def plain() -> T:
            i = state[0]
            state[0] = (i + 1) % len(targets)
            return targets[i]

        return plain
    current = [0] * len(targets)
    total = sum(t.weight for t in targets)

    def weighted() -> T:
        best = 0
        for i, t in enumerate(targets):
            current[i] += t.weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return targets[best]

    return weighted


def least_conn(targets: Sequence[T]) -> Callable[[], T]:
    """Fewest connections in use per unit of weight; ties go by smooth weighted round robin,
    so an idle upstream still sees its targets in weight proportion, not the first one only."""
    if len(targets) == 1:
        only = targets[0]
        return lambda: only
    weights = [t.weight for t in targets]
    total = sum(weights)
    current = [0] * len(targets)
    indexed = list(enumerate(targets))

    def pick() -> T:
        best, best_load = 0, -1.0
        for i, t in indexed:
            current[i] += weights[i]
            load = t.in_use / weights[i]
            if best_load < 0 or load < best_load or (
                load == best_load and current[i] > current[best]
            ):
                best, best_load = i, load
        current[best] -= total
        return targets[best]

    return pick


def power_of_two(targets: Sequence[T]) -> Callable[[], T]:
    """Random with two choices: the less loaded (per weight) of two targets drawn by weight."""
    if len(targets) == 1:
        only = targets[0]
        return lambda: only
    cum = list(accumulate(t.weight for t in targets))
    total = cum[-1]
    rand = random.random

    def pick() -> T:
        a = targets[bisect_right(cum, rand() * total)]
        b = targets[bisect_right(cum, rand() * total)]
        return a if a.in_use * b.weight <= b.in_use * a.weight else b

    return pick


def hash64(data: bytes) -> int:
    """Ring points: stable across processes and restarts (unlike hash()), so every worker and
    every instance builds the same ring."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


_MASK64 = (1 << 64) - 1


def key_hash(key: bytes) -> int:
    """A request key's ring position: as stable as hash64 and four times cheaper (crc32,
    spread over 64 bits by a Fibonacci multiply and a xor-shift)."""
    h = (crc32(key) * 0x9E3779B97F4A7C15) & _MASK64
    return h ^ (h >> 29)


class HashRing(Generic[H]):
    """Consistent hashing with virtual nodes: each target owns points on a 64-bit ring in
    proportion to its weight, derived from its URL alone, and a key belongs to the first point
    at or after its hash. Removing a target moves only the keys it owned; a target that is
    down (``up`` false) is walked past, so its keys spread over the others and come back to
    it when it returns."""

    def __init__(self, targets: Sequence[H]) -> None:
        self.targets = list(targets)
        unit = 0
        for t in targets:
            unit = gcd(unit, t.weight)
        units = sum(t.weight // unit for t in targets)
        per_unit = VNODES if units <= MAX_UNITS else max(1, VNODES * MAX_UNITS // units)
        points: list[tuple[int, int]] = []
        for i, t in enumerate(targets):
            ident = t.url.encode()
            for v in range(per_unit * (t.weight // unit)):
                points.append((hash64(ident + b"#%d" % v), i))
        points.sort()
        self.points = [p for p, _ in points]
        self.owners = [targets[i] for _, i in points]

    def get(self, key: bytes, skip: object = None) -> H | None:
        """The key's target: the first one clockwise that is up and is not ``skip``."""
        owners = self.owners
        n = len(owners)
        i = bisect_left(self.points, key_hash(key))
        for step in range(n):
            t = owners[(i + step) % n]
            if t.up and t is not skip:
                return t
        return None


def make_balancer(kind: str, targets: Sequence[T]) -> Callable[[], T]:
    # "hash" is a HashRing picked with a request key (UpstreamPool); without a key it balances
    # like round_robin.
    if kind == "least_conn":
        return least_conn(targets)
    if kind == "random":
        return power_of_two(targets)
    return smooth_weighted_round_robin(targets)
