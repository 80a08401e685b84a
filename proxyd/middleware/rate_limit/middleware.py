"""The ``rate_limit`` middleware's per-request side (the package docstring says what it does)."""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Final

from proxyd.middleware.base import Context, Middleware, Pending, Response, json_response
from proxyd.middleware.client_address import client_address
from proxyd.middleware.rate_limit.gcra import Decision, policy
from proxyd.middleware.rate_limit.memory_store import MemoryLimiter
from proxyd.middleware.rate_limit.rate_limit_options import RateLimitOptions

if TYPE_CHECKING:
    from proxyd.middleware.rate_limit.redis_store import RedisLimiter
    from proxyd.middleware.services import Services
    from proxyd.proxy.field_rules import TrustedProxies
    from proxyd.proxy.router import CompiledRoute

HEADER_LNAMES: Final = [b"ratelimit-policy", b"ratelimit-limit", b"ratelimit-remaining",
                 b"ratelimit-reset"]
HEADER_NAMES: Final = frozenset(HEADER_LNAMES)


class RateLimit(Middleware):
    type = "rate_limit"
    options_model = RateLimitOptions

    def __init__(self, options: RateLimitOptions) -> None:
        super().__init__(options)
        self.o = options
        self.limits = options.all_limits()
        parts = [options.key] if isinstance(options.key, str) else options.key
        self.key_parts = [p.split(":", 1)[1].lower().encode() if p.startswith("header:") else p
                          for p in parts]
        self.policy = policy(self.limits)  # the configured limits: what Redis enforces
        self.ip_key = self.key_parts == ["client_ip"]
        self.memory: MemoryLimiter | None = None
        self.fallback: MemoryLimiter | None = None
        self.redis: RedisLimiter | None = None
        # The worker's Pipeline, typed loosely: the unit tests bind a stand-in that has only
        # what this uses (config, trusted, metrics, closers, the fallback gauge).
        self.services: Services | None = None
        self.trusted: TrustedProxies | None = None  # whose X-Forwarded-For hops are believed
        self.route_name = ""

    def bind(self, services: Services, route: CompiledRoute) -> None:
        self.services = services
        self.trusted = services.trusted
        self.route_name = route.name
        workers = services.workers.count
        if self.o.backend == "memory":
            self.memory = MemoryLimiter([limit.scaled(workers) for limit in self.limits])
            self.policy = self.memory.policy  # the share: what this worker enforces
        else:
            # Imported here: redis-py is a large import, and a worker without a Redis rate
            # limit never needs it.
            from proxyd.middleware.rate_limit.redis_store import RedisLimiter

            self.redis = RedisLimiter(services.config.redis.url, self.limits,
                                      self.o.redis_timeout)
            share = workers * self.o.instances_hint
            self.fallback = MemoryLimiter([limit.scaled(share) for limit in self.limits])
            services.closers.append(self.redis.close)
        services.workers.listeners.append(self.set_workers)

    def set_workers(self, workers: int) -> None:
        """The master changed the number of workers (SIGTTIN, SIGTTOU): each one's share
        follows the live count, not the configured one."""
        if self.memory is not None:
            self.memory.set_limits([limit.scaled(workers) for limit in self.limits])
            self.policy = self.memory.policy
        if self.fallback is not None:
            share = workers * self.o.instances_hint
            self.fallback.set_limits([limit.scaled(share) for limit in self.limits])

    # -- keys ---------------------------------------------------------------------------------
    def client_ip(self, ctx: Context) -> bytes:
        """The client's address as the gateway establishes it (client_address)."""
        return client_address(ctx, self.trusted)

    def key(self, ctx: Context) -> str:
        if self.ip_key:  # the default key: no list to join
            return self.route_name + "|" + self.client_ip(ctx).decode("latin-1")
        parts = []
        for part in self.key_parts:
            if part == "client_ip":
                parts.append(self.client_ip(ctx))
            elif part == "route":
                parts.append(ctx.route.encode())
            elif part == "consumer":  # set by an authentication element before this one
                parts.append((ctx.consumer or "").encode())
            else:
                parts.append(ctx.header(part) or b"")  # type: ignore[arg-type]
        return (self.route_name + "|" + b"|".join(parts).decode("latin-1"))

    # -- decisions ----------------------------------------------------------------------------
    def on_request(self, ctx: Context) -> Response | Pending | None:
        key = self.key(ctx)
        if self.memory is not None:
            return self._decide(ctx, self.memory.check(key))
        redis = self.redis
        assert redis is not None and self.services is not None
        if not redis.breaker.allow():
            return self._fallback(ctx, key)
        future: asyncio.Future[Response | None] = asyncio.get_running_loop().create_future()

        def answered(decisions: list[Decision] | BaseException) -> None:
            # Called from the Redis connection's data_received: no task per request.
            if isinstance(decisions, BaseException):  # any Redis trouble: the fallback answers
                redis.failure(decisions)
                self._set_fallback_gauge(1.0)
                result = self._fallback(ctx, key)
            else:
                if redis.success():  # Redis is back: this limiter leaves the fallback
                    self._set_fallback_gauge(0.0)
                result = self._decide(ctx, decisions)
            if not future.done():
                future.set_result(result)

        redis.request(key, answered)
        return Pending(future)

    def _set_fallback_gauge(self, value: float) -> None:
        """The worker's gauge: 1 while any of its routes' limiters is on the fallback."""
        if self.services is not None:
            self.services.fallbacks.set(self, bool(value))

    def _fallback(self, ctx: Context, key: str) -> Response | None:
        mode = self.o.on_backend_error
        if mode == "allow":
            return None
        if mode == "deny":
            return json_response(503, "rate limiter unavailable", ctx.id())
        assert self.fallback is not None
        return self._decide(ctx, self.fallback.check(key))

    def _decide(self, ctx: Context, decisions: list[Decision]) -> Response | None:
        if len(decisions) == 1:
            ctx.rate_limit = decisions[0]
            if decisions[0].allowed:
                return None
        else:
            ctx.rate_limit = min(decisions, key=lambda d: (d.allowed, d.remaining))
            if all(d.allowed for d in decisions):
                return None
        retry = max(d.retry_after for d in decisions)
        if self.services is not None:
            self.services.metrics.rate_limited.inc((self.route_name,))
        resp = json_response(429, "rate limit exceeded", ctx.id(),
                             [(b"Retry-After", str(max(1, math.ceil(retry))).encode())])
        self.on_response(ctx, resp)  # an answer from this element: its own headers too
        return resp

    def on_response(self, ctx: Context, resp: Response) -> None:
        decision = ctx.rate_limit
        if decision is None or not self.o.headers:
            return
        remaining = b"%d" % decision.remaining
        reset = b"%d" % max(0, math.ceil(decision.reset))
        # The limits that decided: with Redis down, the fallback's share of them.
        fallback = self.fallback
        policy = self.policy
        if fallback is not None and any(decision.limit is f for f in fallback.limits):
            policy = fallback.policy
        if HEADER_NAMES.isdisjoint(resp.names()):  # the upstream sent none: one block
            resp.extend([(b"RateLimit-Policy", policy),
                         (b"RateLimit-Limit", decision.limit.count_bytes),
                         (b"RateLimit-Remaining", remaining), (b"RateLimit-Reset", reset)],
                        HEADER_LNAMES)
            return
        resp.set(b"RateLimit-Policy", policy, b"ratelimit-policy")
        resp.set(b"RateLimit-Limit", decision.limit.count_bytes, b"ratelimit-limit")
        resp.set(b"RateLimit-Remaining", remaining, b"ratelimit-remaining")
        resp.set(b"RateLimit-Reset", reset, b"ratelimit-reset")
