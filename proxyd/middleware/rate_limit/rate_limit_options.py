"""The ``rate_limit`` middleware's options: a pydantic model, validated at config load and
kept uncompiled (setup.py), like proxyd/middleware/element_options.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxyd.config.types import Duration, RateValue
from proxyd.middleware.element_options import TYPE, Options
from proxyd.middleware.rate_limit.gcra import Limit


class LimitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rate: RateValue = Field(description="Requests per period: 100/s, 20/m, 1000/h.")
    burst: int | None = Field(None, ge=1, description="Requests allowed at once (default: rate).")


class RateLimitOptions(Options):
    type: Literal["rate_limit"] = Field("rate_limit", description=TYPE)
    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: each worker counts alone and enforces its share of the "
        "limit (limit / workers), so the limit holds per proxyd instance; redis: one count "
        "for every worker and instance (redis.url).")
    rate: RateValue | None = Field(
        None, description="Requests per period and key: 100/s, 20/m, 1000/h; rate or limits "
        "is required.")
    burst: int | None = Field(
        None, ge=1, description="Requests allowed at once, for rate (default: rate's count).")
    limits: list[LimitSpec] = Field(default_factory=list, description="Several limits at once.")
    key: str | list[str] = Field(
        "client_ip", description="client_ip, header:NAME, route, consumer (the name an "
        "api_key, basic_auth or jwt_auth element earlier in the chain gave the client), "
        "or a list of them.")
    on_backend_error: Literal["allow", "deny", "local"] = Field(
        "local", description="With backend: redis, when Redis fails or is slower than "
        "redis_timeout: allow lets the request pass, deny answers 503, local counts in the "
        "worker, which enforces limit / (workers * instances_hint).")
    instances_hint: int = Field(1, ge=1, description="proxyd instances sharing the limit.")
    redis_timeout: Duration = Field(  # type: ignore[assignment]
        "50ms", description="Longest wait for Redis per request before on_backend_error "
        "applies.")
    headers: bool = Field(
        True, description="Send RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset on "
        "responses (a 429 carries Retry-After either way).")

    @field_validator("key")
    @classmethod
    def _keys(cls, v: str | list[str]) -> str | list[str]:
        for part in [v] if isinstance(v, str) else v:
            if part not in ("client_ip", "route", "consumer") and not (
                part.startswith("header:") and len(part) > len("header:")
            ):
                raise ValueError(f"invalid key part {part!r}: use client_ip, route, consumer, "
                                 "header:NAME")
        return v

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimitOptions:
        if self.rate is None and not self.limits:
            raise ValueError("set rate (and burst) or limits")
        return self

    def all_limits(self) -> list[Limit]:
        specs = list(self.limits)
        if self.rate is not None:
            specs.insert(0, LimitSpec(rate=self.rate, burst=self.burst))
        return [Limit(s.rate.count, s.rate.period, s.burst or s.rate.count) for s in specs]
