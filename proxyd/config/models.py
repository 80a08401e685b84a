"""The config file as pydantic models: GatewayConfig, the document.

Every model forbids unknown keys and is frozen: a loaded config is a value that a reload swaps
whole, never edits. Each field carries its description here, next to its code; ``proxyd schema``
and the docs are generated from these models. The sections with models of their own live in
models_server.py (server, admin, and the Model base), models_upstream.py and models_route.py;
every model is importable from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxyd.config.models_route import (
    Match,
    Respond,
    Rewrite,
    Route,
    RouteCache,
    RouteTimeouts,
    WebSocket,
)
from proxyd.config.models_server import (
    TLS,
    Admin,
    Limits,
    Listener,
    ListenerValue,
    ListenSpec,
    Model,
    Server,
    parse_listener,
)
from proxyd.config.models_upstream import (
    DEFAULT_RETRY_METHODS,
    CircuitBreaker,
    HealthCheck,
    OutlierDetection,
    Pool,
    Retries,
    Status,
    Target,
    Upstream,
    UpstreamTLS,
)
from proxyd.config.types import ByteSize, Duration

__all__ = [
    "DEFAULT_RETRY_METHODS", "TLS", "AccessLog", "Admin", "Cache", "CircuitBreaker",
    "GatewayConfig", "HealthCheck", "Limits", "ListenSpec", "Listener", "ListenerValue", "Match",
    "Metrics", "MiddlewareEntry", "Model", "OutlierDetection", "Pool", "Redis", "Respond",
    "Retries", "Rewrite", "Route", "RouteCache", "RouteTimeouts", "Server", "Status", "Target",
    "Upstream", "UpstreamTLS", "WebSocket", "parse_listener",
]


class MiddlewareEntry(BaseModel):
    """One chain element; its options are checked by the middleware registry of its type."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str


class Cache(Model):
    backend: Literal["memory", "redis"] = "memory"
    max_entries: int = Field(10000, ge=1)
    max_bytes: ByteSize = "256MiB"  # type: ignore[assignment]
    max_object_size: ByteSize = "1MiB"  # type: ignore[assignment]
    default_ttl: Duration = "300s"  # type: ignore[assignment]
    statuses: list[int] = Field(default_factory=lambda: [200, 301, 302])


class Redis(Model):
    url: str = "redis://127.0.0.1:6379/0"

    @field_validator("url")
    @classmethod
    def _readable(cls, v: str) -> str:
        # Read as the rate limiter's client will read it (and as redis-py does, for the
        # cache): a URL that cannot work fails here, with file:line, not on each request.
        from proxyd.middleware.rate_limit.resp import Target

        Target(v)
        return v


class AccessLog(Model):
    format: Literal["json", "combined"] = Field("json", description="json lines or combined.")
    path: str = Field("-", description='"-" = stdout; else a file, reopened on SIGUSR1.')
    enabled: bool = True
    sample_2xx: float = Field(
        1.0, ge=0.0, le=1.0, description="Fraction of 2xx responses logged; errors always are."
    )


class Metrics(Model):
    enabled: bool = True
    path: str | None = Field(None, description="Also expose metrics on the traffic port here.")


class GatewayConfig(Model):
    server: Server = Field(default_factory=Server)
    admin: Admin = Field(default_factory=Admin)
    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    middleware: list[MiddlewareEntry] = Field(default_factory=list)
    cache: Cache = Field(default_factory=Cache)
    redis: Redis = Field(default_factory=Redis)
    access_log: AccessLog = Field(default_factory=AccessLog)
    metrics: Metrics = Field(default_factory=Metrics)
