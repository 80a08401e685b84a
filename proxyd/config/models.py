"""The configuration contract (DESIGN §3) as pydantic models.

Every model forbids unknown keys and is frozen: a loaded config is a value that a reload swaps
whole, never edits. Each field carries its description here, next to its code; ``proxyd schema``
and the docs are generated from these models.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxyd.config.types import ByteSize, Duration, HostPortValue


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Limits(Model):
    max_body_size: ByteSize = Field("10MiB", description="Largest request body; larger → 413.")
    max_header_size: ByteSize = Field("8KiB", description="Largest request header section → 431.")
    max_uri_size: ByteSize = Field("8KiB", description="Longest request target → 414.")
    max_headers: int = Field(100, ge=1, description="Most header fields in one request → 431.")
    header_timeout: Duration = Field(
        "10s", description="Time a client has to send a complete header section (slowloris)."
    )


class Server(Model):
    listen: list[HostPortValue] = Field(
        default_factory=lambda: ["127.0.0.1:8080"], min_length=1,
        description="Traffic listeners, host:port.",
    )
    workers: int | Literal["auto"] = Field(
        "auto", description="Worker processes; auto = usable CPUs (sched_getaffinity)."
    )
    backlog: int = Field(4096, ge=1, description="listen() backlog of every traffic socket.")
    keepalive_timeout: Duration = Field("5s", description="Idle keep-alive connection lifetime.")
    max_requests: int = Field(
        10000, ge=0, description="Recycle a worker after N requests; 0 = never."
    )
    max_requests_jitter: int = Field(1000, ge=0, description="Random extra requests per worker.")
    drain_timeout: Duration = Field(
        "30s", description="Time in-flight requests get on reload/stop."
    )
    limits: Limits = Field(default_factory=Limits)
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="CIDRs whose X-Forwarded-* headers are trusted and extended, not replaced.",
    )
    watch_config: bool = Field(
        False,
        description="Poll the config file about once a second and reload (the SIGHUP path) "
        "when its content changes; follows Kubernetes ConfigMap symlink swaps. Read at start.",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_form(cls, v: Any) -> Any:
        # One clear message instead of pydantic's two (one per branch of the union).
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool)):
            return v
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        raise ValueError(f"workers must be auto or a positive integer, got {v!r}")

    @field_validator("workers")
    @classmethod
    def _workers_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("workers must be at least 1 (or auto)")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"invalid CIDR {cidr!r}") from None
        return v

    def worker_count(self) -> int:
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return int(self.workers)


class Admin(Model):
    listen: HostPortValue = Field("127.0.0.1:9901", description="Admin HTTP server address.")
    token: str = Field("", description="Bearer token required by mutating endpoints when set.")
    protect_reads: bool = Field(
        False, description="With a token set, also require it for /status and /metrics."
    )


class Target(Model):
    url: str = Field(description="http://host:port of one upstream server.")
    weight: int = Field(1, ge=1, le=1000)


class Pool(Model):
    max_connections: int = Field(1000, ge=1, description="Open connections per target per worker.")
    max_keepalive: int = Field(
        500, ge=0, description="Idle connections kept per target per worker."
    )
    keepalive_expiry: Duration = Field("30s", description="Idle pooled connection lifetime.")
    connect_timeout: Duration = Field("5s")
    read_timeout: Duration = Field("30s", description="Longest wait between upstream bytes.")


class HealthCheck(Model):
    path: str = "/health"
    interval: Duration = "5s"


class Retries(Model):
    attempts: int = Field(2, ge=1, le=10, description="Tries in total, idempotent methods only.")


class Upstream(Model):
    targets: list[Target] = Field(min_length=1)
    balance: Literal["round_robin", "least_conn", "random", "hash"] = "round_robin"
    pool: Pool = Field(default_factory=Pool)
    health_check: HealthCheck | None = None
    retries: Retries = Field(default_factory=Retries)
    preserve_host: bool = Field(
        True, description="Send the client's Host upstream (false: the target's host:port)."
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _short_targets(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"url": t} if isinstance(t, str) else t for t in v]
        return v


class Match(Model):
    host: str | None = Field(None, description="Host header, exact or *.example.com.")
    path: str | None = Field(None, description="Exact path.")
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: list[str] | None = None
    headers: dict[str, str] | None = Field(None, description="Required header values (exact).")

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        return [m.upper() for m in v] if v is not None else None


class Rewrite(Model):
    regex: str
    replacement: str


class Respond(Model):
    status: int = Field(200, ge=200, le=599)
    body: str = ""
    headers: dict[str, str] = Field(default_factory=dict)


class RouteCache(Model):
    ttl: Duration | None = Field(None, description="Freshness when the upstream gives none.")
    force_ttl: Duration | None = Field(None, description="Freshness, whatever the upstream says.")
    enabled: bool = True


class WebSocket(Model):
    enabled: bool = True
    on_reload: Literal["keep", "close"] = Field(
        "keep", description="keep: live until they end or drain_timeout; close: 1001 at once."
    )
    idle_timeout: Duration = Field("300s", description="Close a relay idle this long.")
    max_message_size: ByteSize = Field("16MiB", description="Larger messages close with 1009.")


class Route(Model):
    name: str = Field(min_length=1)
    match: Match = Field(default_factory=Match)
    upstream: str | None = None
    respond: Respond | None = None
    strip_prefix: str | None = None
    rewrite: Rewrite | None = None
    cache: RouteCache | None = None
    middleware: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-route overrides of middleware entries, by type."
    )
    websocket: WebSocket = Field(
        default_factory=lambda: WebSocket(enabled=False),
        description="true, or options: relay WebSocket upgrades on this route.",
    )

    @field_validator("websocket", mode="before")
    @classmethod
    def _websocket_flag(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v


class MiddlewareEntry(BaseModel):
    """One chain element; its options are checked by the middleware registry of its type."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str


class Cache(Model):
    backend: Literal["memory", "redis"] = "memory"
    max_entries: int = Field(10000, ge=1)
    max_bytes: ByteSize = "256MiB"
    max_object_size: ByteSize = "1MiB"
    default_ttl: Duration = "300s"
    statuses: list[int] = Field(default_factory=lambda: [200, 301, 302])


class Redis(Model):
    url: str = "redis://127.0.0.1:6379/0"


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
