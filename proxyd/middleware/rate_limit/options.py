"""The ``rate_limit`` middleware's options: a pydantic model, validated at config load and
kept uncompiled (setup.py), like proxyd/middleware/options.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxyd.config.types import Duration, RateValue
from proxyd.middleware.options import Options
from proxyd.middleware.rate_limit.gcra import Limit


class LimitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rate: RateValue
    burst: int | None = Field(None, ge=1, description="Requests allowed at once (default: rate).")


class RateLimitOptions(Options):
    type: Literal["rate_limit"] = "rate_limit"
    backend: Literal["memory", "redis"] = "memory"
    rate: RateValue | None = None
    burst: int | None = Field(None, ge=1)
    limits: list[LimitSpec] = Field(default_factory=list, description="Several limits at once.")
    key: str | list[str] = Field(
        "client_ip", description="client_ip, header:NAME, route, consumer (the name an "
        "api_key, basic_auth or jwt_auth element earlier in the chain gave the client), "
        "or a list of them.")
    on_backend_error: Literal["allow", "deny", "local"] = "local"
    instances_hint: int = Field(1, ge=1, description="proxyd instances sharing the limit.")
    redis_timeout: Duration = "50ms"  # type: ignore[assignment]
    headers: bool = True

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
