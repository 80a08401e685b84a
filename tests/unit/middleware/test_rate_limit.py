"""rate_limit: GCRA arithmetic on an injected clock, options, keys, the breaker, headers."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from pydantic import ValidationError

from proxyd.breaker import CLOSED
from proxyd.middleware.base import Pending, Response
from proxyd.middleware.rate_limit import RateLimit, RateLimitOptions
from proxyd.middleware.rate_limit.gcra import Decision, Limit, check, check_all
from proxyd.middleware.rate_limit.memory_store import MemoryLimiter
from proxyd.middleware.rate_limit.redis_store import RedisLimiter
from proxyd.middleware.services import Services

from .helpers import counts, make, make_ctx, response, values, worker_services
from .helpers import route as make_route


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    @property
    def now(self) -> float:  # the breaker's kind of clock
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def bound(workers: int = 1, trusted: tuple[str, ...] = (), clock: Clock | None = None,
          route: str = "api", **options: Any) -> tuple[RateLimit, Services]:
    mw = make("rate_limit", **options)
    assert isinstance(mw, RateLimit)
    services = worker_services(workers, trusted)
    mw.bind(services, make_route(route))
    for limiter in (mw.memory, mw.fallback):
        if limiter is not None and clock is not None:
            limiter.clock = clock
    return mw, services


# -- GCRA arithmetic ------------------------------------------------------------------------------
# Intervals are powers of two so that the float arithmetic is exact.


def test_burst_at_once_then_denied_with_retry_after() -> None:
    clock = Clock()
    limiter = MemoryLimiter([Limit(2, 1.0, 4)], clock)  # one per 0.5 s, 4 at once
    remaining = []
    for _ in range(4):
        (d,) = limiter.check("k")
        assert d.allowed
        remaining.append(d.remaining)
    assert remaining == [3, 2, 1, 0]
    (d,) = limiter.check("k")
    assert not d.allowed
    assert d.remaining == 0
    assert d.retry_after == 0.5  # the next cell is due in one interval
    assert d.reset == 2.0  # four intervals until the bucket is full again


def test_one_per_interval_after_the_burst() -> None:
    clock = Clock()
    limiter = MemoryLimiter([Limit(2, 1.0, 4)], clock)
    for _ in range(4):
        assert limiter.check("k")[0].allowed
    for _ in range(5):
        clock.advance(0.25)
        (early,) = limiter.check("k")
        assert not early.allowed
        assert early.retry_after == 0.25
        clock.advance(0.25)
        (due,) = limiter.check("k")
        assert due.allowed and due.remaining == 0
        (again,) = limiter.check("k")
        assert not again.allowed and again.retry_after == 0.5


def test_refill_over_time_is_capped_at_the_burst() -> None:
    clock = Clock()
    limiter = MemoryLimiter([Limit(2, 1.0, 4)], clock)
    for _ in range(4):
        limiter.check("k")
    clock.advance(1.0)  # two cells back
    results = [limiter.check("k")[0] for _ in range(3)]
    assert [d.allowed for d in results] == [True, True, False]
    assert [d.remaining for d in results[:2]] == [1, 0]
    clock.advance(3600)  # idle for long: a full burst, no more
    results = [limiter.check("k")[0] for _ in range(5)]
    assert [d.allowed for d in results] == [True] * 4 + [False]
    assert results[0].remaining == 3
    assert results[0].reset == 0.5


def test_check_is_pure() -> None:
    limit = Limit(4, 1.0, 1)  # one at once, one per 0.25 s
    d, tat = check(limit, None, 10.0)
    assert d.allowed and tat == 10.25 and d.retry_after == 0.0
    d, new = check(limit, tat, 10.125)
    assert not d.allowed and new is None and d.retry_after == 0.125
    d, tat2 = check(limit, tat, 10.25)
    assert d.allowed and tat2 == 10.5
    # A TAT in the past counts as now (the bucket is full, not fuller).
    d, tat3 = check(limit, 1.0, 10.0)
    assert d.allowed and tat3 == 10.25


def test_keys_are_independent() -> None:
    clock = Clock()
    limiter = MemoryLimiter([Limit(1, 1.0, 1)], clock)
    assert limiter.check("a")[0].allowed
    assert not limiter.check("a")[0].allowed
    assert limiter.check("b")[0].allowed


def test_several_limits_all_must_allow() -> None:
    clock = Clock()
    per_second = Limit(8, 1.0, 8)  # interval 0.125
    per_minute = Limit(3, 60.0, 3)
    limiter = MemoryLimiter([per_second, per_minute], clock)
    for _ in range(3):
        clock.advance(0.25)
        assert all(d.allowed for d in limiter.check("k"))
    clock.advance(0.25)
    second, minute = limiter.check("k")
    assert second.allowed and not minute.allowed
    assert minute.retry_after == 19.25  # the first of the three cells returns at 20.25
    # The per-second limit gave nothing away for the refused request: 8 at once after a pause.
    tat_second = limiter.state["k"][0]
    assert tat_second == clock.t - 0.25 + 0.125


def test_one_limit_denying_consumes_nothing_in_the_others() -> None:
    clock = Clock()
    limiter = MemoryLimiter([Limit(1, 1.0, 1), Limit(100, 6400.0, 100)], clock)
    first = limiter.check("k")
    assert [d.remaining for d in first] == [0, 99]
    for _ in range(10):  # all refused by the first limit
        assert not all(d.allowed for d in limiter.check("k"))
    clock.advance(1.0)
    after = limiter.check("k")
    assert all(d.allowed for d in after)
    assert after[1].remaining == 98  # two admitted in all, not twelve


def test_check_all_returns_no_tats_when_denied() -> None:
    limits = [Limit(1, 1.0, 1), Limit(10, 1.0, 10)]
    decisions, tats = check_all(limits, [None, None], 5.0)
    assert tats == [6.0, 5.1]
    decisions, tats = check_all(limits, [6.0, 5.1], 5.0)
    assert tats is None
    assert [d.allowed for d in decisions] == [False, True]


def test_limit_properties_and_policy() -> None:
    limit = Limit(20, 60.0, 10)
    assert limit.interval == 3.0
    assert limit.tolerance == 30.0
    assert limit.policy() == "20;w=60;burst=10"


def test_limit_scaled_splits_the_rate_exactly() -> None:
    limit = Limit(20, 60.0, 20)
    assert limit.scaled(1) is limit
    assert limit.scaled(0) is limit
    half = limit.scaled(2)
    assert half == Limit(20, 120.0, 10)
    assert half.interval == 2 * limit.interval
    # Together, N shares allow the configured rate even where count // N would be 0 or lossy.
    third = limit.scaled(3)
    assert third.interval * 1 == pytest.approx(9.0) and third.burst == 6
    tiny = Limit(1, 1.0, 1).scaled(4)
    assert tiny.interval == 4.0 and tiny.burst == 1


def test_memory_sweep_drops_expired_keys_and_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import proxyd.middleware.rate_limit.memory_store as memory

    monkeypatch.setattr(memory, "SWEEP_AT", 4)
    clock = Clock()
    limiter = MemoryLimiter([Limit(1, 1.0, 1)], clock)
    limiter.sweep_at = 4
    for i in range(4):
        limiter.check(f"old{i}")
    clock.advance(2.0)  # the old keys' buckets are full again
    limiter.check("new")  # the fifth key: a sweep
    assert set(limiter.state) == {"new"}
    for i in range(8):  # all live: the threshold grows instead of sweeping on every key
        limiter.check(f"live{i}")
    assert len(limiter.state) == 9
    assert limiter.sweep_at >= 8


# -- options ----------------------------------------------------------------------------------


def validate(**data: Any) -> RateLimitOptions:
    return RateLimitOptions.model_validate({"type": "rate_limit", **data})


@pytest.mark.parametrize("key", ["cookie:x", "header:", "ip", ["client_ip", "path"]])
def test_bad_key_part_is_rejected(key: Any) -> None:
    with pytest.raises(ValidationError, match="invalid key part"):
        validate(rate="10/s", key=key)


def test_a_rate_or_limits_is_required() -> None:
    with pytest.raises(ValidationError, match="set rate"):
        validate()
    with pytest.raises(ValidationError, match="invalid rate"):
        validate(rate="ten per second")
    with pytest.raises(ValidationError):
        validate(rate="10/s", burst=0)
    with pytest.raises(ValidationError):
        validate(rate="10/s", instances_hint=0)
    with pytest.raises(ValidationError):
        validate(rate="10/s", backend="memcached")


def test_limits_list_and_defaults() -> None:
    o = validate(rate="100/s", limits=[{"rate": "1000/h", "burst": 50}, {"rate": "20/m"}])
    assert o.all_limits() == [Limit(100, 1.0, 100), Limit(1000, 3600.0, 50),
                              Limit(20, 60.0, 20)]
    assert validate(limits=[{"rate": "5/s"}]).all_limits() == [Limit(5, 1.0, 5)]
    o = validate(rate="20/m", burst=5)
    assert (o.backend, o.key, o.on_backend_error, o.instances_hint, o.headers) == (
        "memory", "client_ip", "local", 1, True)
    assert o.redis_timeout == pytest.approx(0.05)
    with pytest.raises(ValidationError):
        validate(limits=[{"rate": "5/s", "extra": 1}])


def test_key_forms_accepted() -> None:
    assert validate(rate="1/s", key="header:X-Api-Key").key == "header:X-Api-Key"
    assert validate(rate="1/s", key=["client_ip", "route", "header:a"]).key == [
        "client_ip", "route", "header:a"]


def test_registry_reports_errors_with_their_location() -> None:
    from proxyd.config.models import GatewayConfig
    from proxyd.middleware import check_middleware

    config = GatewayConfig.model_validate(
        {"middleware": [{"type": "rate_limit", "rate": "1/s", "key": "cookie:sid"}]})
    errors, _ = check_middleware(config)
    assert errors and errors[0][0][:2] == ("middleware", 0)
    assert "invalid key part" in errors[0][1]


# -- keys ---------------------------------------------------------------------------------------


def test_key_client_ip_is_the_peer_by_default() -> None:
    mw, _ = bound(rate="1/s")
    ctx = make_ctx(client_ip=b"192.0.2.7", headers=[(b"X-Forwarded-For", b"203.0.113.1")])
    assert mw.key(ctx) == "api|192.0.2.7"  # untrusted peer: its X-Forwarded-For is ignored


def test_key_client_ip_honours_forwarded_for_from_trusted_proxies_only() -> None:
    mw, _ = bound(rate="1/s", trusted=("10.0.0.0/8",))
    via_proxy = make_ctx(client_ip=b"10.0.0.1",
                         headers=[(b"X-Forwarded-For", b"198.51.100.4, 203.0.113.9, 10.0.0.2")])
    # The rightmost hop not in the trusted networks: 198.51.100.4 may be forged by the client.
    assert mw.key(via_proxy) == "api|203.0.113.9"
    direct = make_ctx(client_ip=b"192.0.2.7",
                      headers=[(b"X-Forwarded-For", b"203.0.113.9")])
    assert mw.key(direct) == "api|192.0.2.7"
    no_header = make_ctx(client_ip=b"10.0.0.1")
    assert mw.key(no_header) == "api|10.0.0.1"
    all_trusted = make_ctx(client_ip=b"10.0.0.1",
                           headers=[(b"X-Forwarded-For", b"10.1.1.1, 10.0.0.2")])
    assert mw.key(all_trusted) == "api|10.1.1.1"
    empty = make_ctx(client_ip=b"10.0.0.1", headers=[(b"X-Forwarded-For", b" , ")])
    assert mw.key(empty) == "api|10.0.0.1"


def test_key_route_header_and_combined() -> None:
    mw, _ = bound(rate="1/s", key="route", route="search")
    assert mw.key(make_ctx(route="search", client_ip=b"1.1.1.1")) == mw.key(
        make_ctx(route="search", client_ip=b"2.2.2.2"))
    mw, _ = bound(rate="1/s", key="header:X-Api-Key")
    assert mw.key(make_ctx(headers=[(b"X-API-KEY", b"k1")])) == "api|k1"
    assert mw.key(make_ctx()) == "api|"  # absent: one shared bucket for keyless requests
    mw, _ = bound(rate="1/s", key=["client_ip", "header:X-Api-Key", "route"])
    ctx = make_ctx(client_ip=b"192.0.2.7", headers=[(b"X-Api-Key", b"k1")])
    assert mw.key(ctx) == "api|192.0.2.7|k1|api"


def test_keys_isolate_clients_through_the_middleware() -> None:
    clock = Clock()
    mw, _ = bound(rate="1/m", burst=1, key="header:X-Api-Key", clock=clock)
    a = make_ctx(headers=[(b"X-Api-Key", b"a")])
    b = make_ctx(headers=[(b"X-Api-Key", b"b")])
    assert mw.on_request(a) is None
    assert mw.on_request(b) is None
    refused = mw.on_request(make_ctx(headers=[(b"X-Api-Key", b"a")]))
    assert isinstance(refused, Response) and refused.status == 429


def test_route_name_separates_routes() -> None:
    clock = Clock()
    one, _ = bound(rate="1/m", clock=clock, route="one")
    two, _ = bound(rate="1/m", clock=clock, route="two")
    assert one.key(make_ctx()) != two.key(make_ctx())


# -- the breaker ------------------------------------------------------------------------------


def limiter(clock: Clock) -> RedisLimiter:
    return RedisLimiter("redis://127.0.0.1:1/0", [Limit(1, 1.0, 1)], 0.05, clock)


def test_breaker_opens_for_a_cooldown_then_lets_one_probe_through() -> None:
    clock = Clock()
    redis = limiter(clock)
    b = redis.breaker
    assert b.allow()
    redis.failure(ConnectionError("refused"))
    assert b.state != CLOSED and not b.allow()
    clock.advance(0.49)
    assert not b.allow()
    clock.advance(0.01)
    assert b.allow()  # the probe
    assert not b.allow()  # everyone else waits for it
    assert redis.success()
    assert b.state == CLOSED and b.allow() and b.allow()


def test_breaker_cooldown_doubles_per_failed_probe_up_to_the_longest() -> None:
    clock = Clock()
    redis = limiter(clock)
    b = redis.breaker
    redis.failure(ConnectionError())
    cooldowns = []
    for _ in range(9):
        start = clock.t
        while not b.allow():
            clock.advance(0.125)
        cooldowns.append(clock.t - start)
        redis.failure(ConnectionError())
    assert cooldowns == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert b.allow() is False
    clock.advance(30.0)
    assert b.allow()
    redis.success()
    assert b.cooldown == 0.5
    redis.failure(ConnectionError())  # a new outage starts from the first cool-down
    clock.advance(0.5)
    assert b.allow()


def test_breaker_failures_in_flight_at_the_trip_do_not_extend_it() -> None:
    clock = Clock()
    redis = limiter(clock)
    for _ in range(50):  # fifty requests were waiting on Redis when it died
        redis.failure(ConnectionError())
    assert redis.breaker.cooldown == 0.5
    clock.advance(0.5)
    assert redis.breaker.allow()


def test_breaker_answers_in_flight_at_the_trip_do_not_close_it() -> None:
    """A check sent before the trip and answered after it proves nothing about Redis now:
    the limiter stays on the fallback until its probe answers."""
    clock = Clock()
    redis = limiter(clock)
    redis.failure(ConnectionError())
    assert not redis.success()
    assert redis.breaker.state != CLOSED and not redis.breaker.allow()


def test_breaker_logs_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    redis = limiter(clock)
    with caplog.at_level(logging.WARNING, logger="proxyd.rate_limit"):
        for _ in range(3):
            redis.failure(ConnectionError("refused"))
            clock.advance(60)
            redis.breaker.allow()
        redis.success()
        redis.success()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "unavailable" in messages[0] and "refused" in messages[0]
    assert "recovered" in messages[1]


def test_redis_limiter_arguments_are_microseconds() -> None:
    limiter = RedisLimiter("redis://127.0.0.1:1/0", [Limit(20, 60.0, 5), Limit(10**7, 1.0, 1)],
                           0.05)
    assert limiter._args == [3_000_000, 15_000_000, 1, 1]  # never a zero interval


# -- decisions and headers --------------------------------------------------------------------


def test_allowed_responses_carry_the_ratelimit_headers() -> None:
    clock = Clock()
    mw, _ = bound(rate="20/m", burst=5, clock=clock)
    ctx = make_ctx()
    assert mw.on_request(ctx) is None
    resp = response(200, [(b"RateLimit-Remaining", b"from upstream")])
    mw.on_response(ctx, resp)
    assert values(resp, b"ratelimit-policy") == [b"20;w=60;burst=5"]
    assert values(resp, b"ratelimit-limit") == [b"20"]
    assert values(resp, b"ratelimit-remaining") == [b"4"]
    assert values(resp, b"ratelimit-reset") == [b"3"]


def test_the_429_has_retry_after_a_json_body_and_the_headers() -> None:
    clock = Clock()
    mw, services = bound(rate="20/m", burst=2, clock=clock)
    assert mw.on_request(make_ctx()) is None
    assert mw.on_request(make_ctx()) is None
    clock.advance(0.5)
    resp = mw.on_request(make_ctx(request_id="rid-429"))
    assert isinstance(resp, Response)
    assert resp.status == 429
    assert values(resp, b"retry-after") == [b"3"]  # 2.5 s, rounded up
    assert values(resp, b"content-type") == [b"application/json"]
    assert json.loads(resp.body or b"") == {"error": "rate limit exceeded",
                                            "request_id": "rid-429"}
    assert values(resp, b"ratelimit-remaining") == [b"0"]
    assert values(resp, b"ratelimit-limit") == [b"20"]
    assert values(resp, b"ratelimit-reset") == [b"6"]  # 5.5 s until both cells are back
    assert counts(services.metrics)[("gateway_rate_limited_total", ("api",))] == 1


def test_retry_after_is_at_least_one_second() -> None:
    clock = Clock()
    mw, _ = bound(rate="100/s", burst=1, clock=clock)
    assert mw.on_request(make_ctx()) is None
    resp = mw.on_request(make_ctx())
    assert isinstance(resp, Response) and values(resp, b"retry-after") == [b"1"]


def test_headers_report_the_tightest_limit() -> None:
    clock = Clock()
    mw, _ = bound(limits=[{"rate": "10/s"}, {"rate": "3/m"}], clock=clock)
    ctx = make_ctx()
    assert mw.on_request(ctx) is None
    resp = response()
    mw.on_response(ctx, resp)
    assert values(resp, b"ratelimit-limit") == [b"3"]
    assert values(resp, b"ratelimit-remaining") == [b"2"]
    assert values(resp, b"ratelimit-policy") == [b"10;w=1;burst=10, 3;w=60;burst=3"]


def test_headers_can_be_switched_off() -> None:
    clock = Clock()
    mw, _ = bound(rate="1/m", clock=clock, headers=False)
    ctx = make_ctx()
    assert mw.on_request(ctx) is None
    resp = response()
    mw.on_response(ctx, resp)
    assert resp.headers == []
    refused = mw.on_request(make_ctx())
    assert isinstance(refused, Response) and refused.status == 429
    assert values(refused, b"retry-after") and not values(refused, b"ratelimit-limit")


def test_memory_backend_enforces_the_worker_share() -> None:
    clock = Clock()
    mw, _ = bound(workers=2, rate="20/m", burst=20, clock=clock)
    assert mw.memory is not None and mw.memory.limits == [Limit(20, 120.0, 10)]
    allowed = sum(mw.on_request(make_ctx()) is None for _ in range(30))
    assert allowed == 10
    clock.advance(6.0)  # one cell per 6 s in this worker: 20/m over two workers
    assert mw.on_request(make_ctx()) is None
    assert mw.on_request(make_ctx()) is not None


def test_memory_backend_headers_describe_the_worker_share() -> None:
    clock = Clock()
    mw, _ = bound(workers=2, rate="20/m", burst=20, clock=clock)
    ctx = make_ctx()
    assert mw.on_request(ctx) is None
    resp = response()
    mw.on_response(ctx, resp)
    # This worker allows 20 per 120 s, 10 at once: that is what its answers announce.
    assert values(resp, b"ratelimit-policy") == [b"20;w=120;burst=10"]
    assert values(resp, b"ratelimit-limit") == [b"20"]
    assert values(resp, b"ratelimit-remaining") == [b"9"]


def test_the_share_follows_the_live_worker_count() -> None:
    clock = Clock()
    mw, services = bound(workers=2, rate="20/m", burst=20, clock=clock)
    assert mw.on_request(make_ctx()) is None  # a key with state before the change
    services.workers.set(4)  # what a worker does on the master's count after SIGTTIN
    assert mw.memory is not None and mw.memory.limits == [Limit(20, 240.0, 5)]
    assert len(mw.memory.state) == 1  # kept: no key starts over with a full burst
    ctx = make_ctx()
    assert mw.on_request(ctx) is None
    resp = response()
    mw.on_response(ctx, resp)
    assert values(resp, b"ratelimit-policy") == [b"20;w=240;burst=5"]
    services.workers.set(1)  # SIGTTOU down to one: the whole limit
    assert mw.memory.limits == mw.limits


# -- the Redis path, with Redis replaced ----------------------------------------------------------


def redis_bound(workers: int = 2, **options: Any) -> tuple[RateLimit, Services, Clock]:
    clock = Clock()
    mw, services = bound(workers=workers, clock=clock, backend="redis", **options)
    assert mw.redis is not None and mw.fallback is not None
    mw.redis.breaker.clock = clock
    return mw, services, clock


async def settle(answer: Response | Pending | None) -> Response | None:
    assert isinstance(answer, Pending)
    return await asyncio.wait_for(answer.future, 5)


async def test_redis_failure_uses_the_local_share_and_sets_the_gauge() -> None:
    mw, services, clock = redis_bound(rate="20/m", burst=20, instances_hint=2)
    assert mw.redis is not None and mw.fallback is not None
    assert mw.fallback.limits == [Limit(20, 240.0, 5)]  # 2 workers x 2 instances
    assert services.closers == [mw.redis.close]
    calls = 0

    def down(key: str, callback: Any) -> None:
        nonlocal calls
        calls += 1
        callback(ConnectionError("refused"))

    mw.redis.request = down  # type: ignore[method-assign]
    assert await settle(mw.on_request(make_ctx())) is None
    assert calls == 1 and services.fallbacks.active == 1.0
    # Breaker open: answered at once from the fallback, Redis not asked.
    answers = [mw.on_request(make_ctx()) for _ in range(6)]
    assert calls == 1
    assert answers[:4] == [None] * 4
    assert all(isinstance(a, Response) and a.status == 429 for a in answers[4:])

    def up(key: str, callback: Any) -> None:
        callback([Decision(True, mw.limits[0], 19, 3.0, 0.0)])

    mw.redis.request = up  # type: ignore[method-assign]
    clock.advance(0.5)
    ctx = make_ctx()
    assert await settle(mw.on_request(ctx)) is None
    assert services.fallbacks.active == 0.0 and mw.redis.breaker.state == CLOSED
    resp = response()
    mw.on_response(ctx, resp)
    assert values(resp, b"ratelimit-remaining") == [b"19"]
    assert values(resp, b"ratelimit-policy") == [b"20;w=60;burst=20"]  # Redis: the whole limit


async def test_fallback_answers_announce_the_fallback_share() -> None:
    mw, services, _ = redis_bound(rate="20/m", burst=20, instances_hint=2)
    assert mw.redis is not None

    def down(key: str, callback: Any) -> None:
        callback(ConnectionError("refused"))

    mw.redis.request = down  # type: ignore[method-assign]
    ctx = make_ctx()
    assert await settle(mw.on_request(ctx)) is None
    resp = response()
    mw.on_response(ctx, resp)
    assert values(resp, b"ratelimit-policy") == [b"20;w=240;burst=5"]
    services.workers.set(4)
    assert mw.fallback is not None and mw.fallback.limits == [Limit(20, 480.0, 2)]


@pytest.mark.parametrize(("mode", "status"), [("allow", None), ("deny", 503)])
async def test_redis_failure_allow_or_deny(mode: str, status: int | None) -> None:
    mw, _, _ = redis_bound(rate="1/m", on_backend_error=mode)
    assert mw.redis is not None

    def down(key: str, callback: Any) -> None:
        callback(TimeoutError())

    mw.redis.request = down  # type: ignore[method-assign]
    for answer in [await settle(mw.on_request(make_ctx()))] + [
            mw.on_request(make_ctx()) for _ in range(3)]:
        if status is None:
            assert answer is None
        else:
            assert isinstance(answer, Response) and answer.status == status


async def test_redis_unreachable_for_real_falls_back_quickly() -> None:
    """Nothing listens on port 1: the real client fails fast and the fallback answers."""
    mw, services, _ = redis_bound(rate="1/m", burst=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await settle(mw.on_request(make_ctx())) is None
    assert loop.time() - started < 1.0
    assert services.fallbacks.active == 1.0
    assert mw.redis is not None
    await mw.redis.close()


async def test_the_gauge_stays_up_while_any_route_is_on_the_fallback() -> None:
    one, services, clock = redis_bound(rate="1/m")
    two = make("rate_limit", backend="redis", rate="1/m")
    assert isinstance(two, RateLimit)
    two.bind(services, make_route("other"))
    assert one.redis is not None and two.redis is not None
    two.redis.breaker.clock = clock

    def down(key: str, callback: Any) -> None:
        callback(ConnectionError())

    def up(key: str, callback: Any) -> None:
        callback([Decision(True, Limit(1, 60.0, 1), 0, 60.0, 0.0)])

    one.redis.request = down  # type: ignore[method-assign]
    two.redis.request = down  # type: ignore[method-assign]
    await settle(one.on_request(make_ctx()))
    await settle(two.on_request(make_ctx(route="other")))
    assert services.fallbacks.active == 1.0
    clock.advance(0.5)
    one.redis.request = up  # type: ignore[method-assign]
    await settle(one.on_request(make_ctx()))
    assert services.fallbacks.active == 1.0  # "other" is still on its fallback
    two.redis.request = up  # type: ignore[method-assign]
    await settle(two.on_request(make_ctx(route="other")))
    assert services.fallbacks.active == 0.0
