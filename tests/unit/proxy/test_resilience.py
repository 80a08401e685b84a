"""Retry budget, the breaker an upstream's settings describe, and outlier ejection against a
hand-driven clock."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from proxyd.config.models import CircuitBreaker, GatewayConfig, Retries, Upstream
from proxyd.config.semantic import check
from proxyd.proxy.resilience import RetryBudget, upstream_breaker
from proxyd.proxy.resolver import Resolver
from proxyd.proxy.timers import Deadlines
from proxyd.proxy.upstream import UpstreamPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0


def test_retry_budget_is_a_fraction_of_recent_requests() -> None:
    clock = Clock()
    budget = RetryBudget(Retries(budget=0.1, budget_window="10s", min_retries=2), clock)
    spent = 0
    for _ in range(100):
        budget.requests += 1
        if budget.allow():
            budget.spend()
            spent += 1
    assert spent == 10  # 10% of 100
    assert not budget.allow()
    clock.now += 11  # the window slid past all of it: only the minimum is left
    assert budget.allow()
    budget.spend()
    budget.spend()
    assert not budget.allow()


def test_retry_budget_minimum_for_quiet_upstreams() -> None:
    budget = RetryBudget(Retries(budget=0.2, min_retries=3), Clock())
    budget.requests += 1
    for _ in range(3):
        assert budget.allow()
        budget.spend()
    assert not budget.allow()


def test_breaker_trips_half_opens_and_closes() -> None:
    clock = Clock()
    breaker = upstream_breaker(CircuitBreaker(error_rate=0.5, min_requests=4, open_for="2s",
                                     half_open_requests=2), clock)
    for ok in (True, False, True):
        assert breaker.allow()
        breaker.record(ok)
    assert breaker.state == "closed"  # under min_requests
    breaker.record(False)  # 2 of 4 failed
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 2.1
    assert breaker.allow() and breaker.allow()  # two probes
    assert not breaker.allow()
    breaker.record(True)
    assert breaker.state == "half_open"
    breaker.record(False)  # one probe failed: open again
    assert breaker.state == "open" and breaker.trips == 2
    clock.now += 2.1
    assert breaker.allow() and breaker.allow()
    breaker.record(True)
    breaker.record(True)
    assert breaker.state == "closed" and breaker.allow()


def test_breaker_lost_probes_expire() -> None:
    clock = Clock()
    breaker = upstream_breaker(CircuitBreaker(error_rate=0.5, min_requests=1, open_for="1s"),
                               clock)
    breaker.record(False)
    clock.now += 1.1
    assert breaker.allow()  # a probe whose client then went away: never reported
    assert not breaker.allow()
    clock.now += 1.1
    assert breaker.allow()


def pool(**options: Any) -> tuple[UpstreamPool, Deadlines]:
    # The pool's clock is the worker's Deadlines (a compiled class in the compiled build, so
    # the real one), never started: its ``now`` is moved by hand.
    clock = Deadlines(SimpleNamespace(time=lambda: 1000.0), 1.0)  # type: ignore[arg-type]
    cfg = Upstream.model_validate({"targets": ["http://10.0.0.1:80", "http://10.0.0.2:80"],
                                   **options})
    return UpstreamPool("up", cfg, clock, Resolver()), clock


def test_ejection_cool_down_grows_and_probation() -> None:
    up, clock = pool(outlier_detection={"consecutive_failures": 3, "base_ejection": "1s",
                                        "max_ejection": "3s"})
    a, b = up.targets
    for _ in range(3):
        up.try_failed(a)
    assert not a.up and up.available == [b]
    assert all(up.pick() is b for _ in range(4))
    clock.now += 1.1
    assert up.pick() is not None and a.up  # back, on probation: one failure ejects again
    up.try_failed(a)
    assert not a.up and a.ejected_until - clock.now == 2.0  # doubled
    clock.now += 2.1
    up.pick()
    up.try_failed(a)
    assert a.ejected_until - clock.now == 3.0  # capped at max_ejection
    clock.now += 3.1
    up.pick()
    up.response(a, 200)  # a success ends the streak
    assert a.failures == 0
    clock.now += 10  # long in service: the next cool-down starts short again
    for _ in range(3):
        up.try_failed(a)
    assert a.ejected_until - clock.now == 1.0


def test_every_target_out_gives_none_unless_panic() -> None:
    up, _ = pool(outlier_detection={"consecutive_failures": 1})
    for t in up.targets:
        up.try_failed(t)
    assert up.pick() is None
    up, _ = pool(outlier_detection={"consecutive_failures": 1}, panic_mode=True)
    up.set_health({"http://10.0.0.2:80": False})
    up.try_failed(up.targets[0])
    assert up.pick() is up.targets[0]  # ejected but healthy beats unhealthy


def test_skip_moves_a_retry_to_another_target() -> None:
    for balance in ("round_robin", "least_conn", "random", "hash"):
        up, _ = pool(balance=balance)
        a, b = up.targets
        for _ in range(10):
            assert up.pick(b"key", skip=a) is b
        up.set_health({b.url: False})
        assert up.pick(b"key", skip=a) is None
        assert up.pick(b"key") is a


def test_hash_key_extraction() -> None:
    headers = [(b"x-user", b"X-User", b"alice"), (b"cookie", b"Cookie", b"a=1; sid=s-42")]
    assert pool(balance="hash")[0].hash_key(b"1.2.3.4", headers) == b"1.2.3.4"
    assert pool(balance="hash", hash_key="header:X-User")[0].hash_key(b"ip", headers) == b"alice"
    assert pool(balance="hash", hash_key="cookie:sid")[0].hash_key(b"ip", headers) == b"s-42"
    assert pool(balance="hash", hash_key="cookie:nope")[0].hash_key(b"ip", headers) == b"ip"


def findings(upstream: dict[str, Any], **route: Any) -> tuple[list[str], list[str]]:
    cfg = GatewayConfig.model_validate({
        "upstreams": {"u": upstream},
        "routes": [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "u", **route}],
    })
    report = check(cfg)
    return [f.message for f in report.errors], [f.message for f in report.warnings]


def test_semantic_checks_of_upstream_options() -> None:
    errors, warnings = findings({"targets": ["http://h:1"], "hash_key": "header:X"})
    assert not errors and any("hash_key has no effect" in w for w in warnings)
    errors, warnings = findings({"targets": ["http://h:1"], "tls": {"ca_file": "/x.pem"}})
    assert any("no target is https" in w for w in warnings)
    errors, _ = findings({"targets": ["https://h:1"], "tls": {"client_key": "/k.pem"}})
    assert errors == ["client_key needs client_cert"]
    _, warnings = findings({"targets": ["https://h:1"], "tls": {"verify": False}})
    assert any("not verified" in w for w in warnings)
    errors, _ = findings({"targets": ["http://h:1"], "outlier_detection": {
        "base_ejection": "10s", "max_ejection": "5s"}})
    assert errors == ["max_ejection must not be shorter than base_ejection"]
    _, warnings = findings({"targets": ["http://h:1"], "retries": {"methods": ["get", "POST"]}})
    assert any("not idempotent" in w for w in warnings)
    errors, _ = findings({"targets": ["http://h:1"], "retries": {"methods": ["GE T"]}})
    assert errors == ["invalid HTTP method 'GE T'"]
