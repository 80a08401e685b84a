"""Choosing a target for a request. Balancers are closures built once per config."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar


class Weighted(Protocol):
    weight: int

    @property
    def in_use(self) -> int: ...


T = TypeVar("T", bound=Weighted)


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
    return lambda: min(targets, key=lambda t: t.in_use / t.weight)


def power_of_two(targets: Sequence[T]) -> Callable[[], T]:
    """Random with two choices: the less loaded of two random targets."""
    if len(targets) == 1:
        only = targets[0]
        return lambda: only

    def pick() -> T:
        a, b = random.sample(targets, 2)
        return a if a.in_use / a.weight <= b.in_use / b.weight else b

    return pick


def make_balancer(kind: str, targets: Sequence[T]) -> Callable[[], T]:
    # "hash" needs a request key; until the upstreams issue adds key extraction it balances
    # like round_robin (check-config says so).
    if kind == "least_conn":
        return least_conn(targets)
    if kind == "random":
        return power_of_two(targets)
    return smooth_weighted_round_robin(targets)
