"""The upstreams section of the config file: one named upstream and its settings.

Its targets and how they are balanced, the connection pool and its timeouts, active health
checks, passive outlier detection, retries, the circuit breaker, and TLS towards the targets.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from proxyd.config.models_server import Model
from proxyd.config.types import ByteSize, Duration


class TargetSettings(Model):
    url: str = Field(description="http://host:port or https://host:port of one upstream server.")
    weight: int = Field(1, ge=1, le=1000, description="Share of requests relative to the others.")


class Pool(Model):
    max_connections: int = Field(1000, ge=1, description="Open connections per target per worker.")
    max_keepalive: int = Field(
        500, ge=0, description="Idle connections kept per target per worker."
    )
    keepalive_expiry: Duration = Field("30s", description="Idle pooled connection lifetime.")  # type: ignore[assignment]
    connect_timeout: Duration = Field("5s", description="TCP (and TLS) connect time limit.")  # type: ignore[assignment]
    read_timeout: Duration = Field("30s", description="Longest wait between upstream bytes.")  # type: ignore[assignment]
    total_timeout: Duration | None = Field(
        None, description="Longest whole exchange, all tries included; none by default."
    )


Status = Annotated[int, Field(ge=100, le=599)]


class HealthCheck(Model):
    """Active checks, run by the master once per instance; results pushed to the workers."""

    path: str = Field("/health", description="GET this path on every target.")
    interval: Duration = Field("5s", description="Time between checks of one target.")  # type: ignore[assignment]
    timeout: Duration = Field("2s", description="A check slower than this fails.")  # type: ignore[assignment]
    expected_statuses: list[Status] = Field(
        default_factory=list, description="Statuses that pass; empty = any 2xx or 3xx."
    )
    healthy_threshold: int = Field(
        2, ge=1, description="Consecutive passes that bring an unhealthy target back."
    )
    unhealthy_threshold: int = Field(
        3, ge=1, description="Consecutive failures that take a healthy target out."
    )


class OutlierDetection(Model):
    """Passive checks in each worker: targets that keep failing are ejected for a while."""

    enabled: bool = Field(True, description="false: failing targets are never ejected.")
    consecutive_failures: int = Field(
        5, ge=1, description="Failures in a row (connect errors, timeouts, failure_statuses) "
        "that eject a target."
    )
    failure_statuses: list[Status] = Field(
        default_factory=list,
        description="Upstream statuses that count as failures, e.g. [502, 503, 504].",
    )
    base_ejection: Duration = Field(  # type: ignore[assignment]
        "5s", description="First cool-down; doubles on each repeat ejection."
    )
    max_ejection: Duration = Field("60s", description="Longest cool-down.")  # type: ignore[assignment]


DEFAULT_RETRY_METHODS = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"]


class Retries(Model):
    attempts: int = Field(2, ge=1, le=10, description="Tries in total (1 = no retry).")
    methods: list[str] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_METHODS),
        description="Methods retried once the request was sent (idempotent ones by default). "
        "A failed connect is retried for every method: nothing was sent.",
    )
    on_statuses: list[Status] = Field(
        default_factory=lambda: [502, 503, 504],
        description="Upstream statuses that are retried on another target (the response is "
        "relayed when no try is left).",
    )
    per_try_timeout: Duration | None = Field(
        None, description="Longest wait for one try's response head; then the next try."
    )
    budget: float = Field(
        0.2, ge=0.0, le=10.0,
        description="Retries at most this fraction of requests (per worker, sliding window).",
    )
    budget_window: Duration = Field("10s", description="The budget's sliding window.")  # type: ignore[assignment]
    min_retries: int = Field(
        10, ge=0, description="Retries allowed per window whatever the budget (low traffic)."
    )
    max_body: ByteSize = Field(
        0, description="Request bodies up to this size are kept to be replayed on a retry; "
        "a request with a larger body is not retried once sent (0 = never)."
    )

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [m.upper() for m in v]


class CircuitBreaker(Model):
    """Per upstream, per worker: refuse at once (503) instead of piling up or hammering."""

    max_concurrent: int | None = Field(
        None, ge=1, description="Requests in flight to this upstream; more wait (max_pending)."
    )
    max_pending: int | None = Field(
        None, ge=0, description="Requests waiting for a slot or a pooled connection; more → 503."
    )
    error_rate: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Open the circuit when this fraction of tries fail within the window.",
    )
    min_requests: int = Field(20, ge=1, description="Tries in the window before it can trip.")
    window: Duration = Field("10s", description="Sliding window of the error rate.")  # type: ignore[assignment]
    open_for: Duration = Field("5s", description="Time open (503 at once) before probing.")  # type: ignore[assignment]
    half_open_requests: int = Field(
        1, ge=1, description="Probe requests that must succeed to close the circuit."
    )


class UpstreamTLS(Model):
    """For https:// targets: verification is on unless switched off."""

    verify: bool = Field(True, description="Verify the certificate chain and host name.")
    ca_file: str | None = Field(None, description="PEM CA bundle; default: the system's.")
    server_name: str | None = Field(
        None, description="SNI and the name verified; default: the target's host."
    )
    client_cert: str | None = Field(None, description="PEM client certificate (mutual TLS).")
    client_key: str | None = Field(None, description="PEM key of client_cert, if separate.")


_HASH_KEY = re.compile(r"client_ip|(header|cookie):[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _short_targets_schema(schema: dict[str, Any]) -> None:
    # The short form _short_targets expands: a target may be written as its URL alone.
    schema["items"] = {"anyOf": [schema["items"], {"type": "string"}]}


class Upstream(Model):
    targets: list[TargetSettings] = Field(
        min_length=1, json_schema_extra=_short_targets_schema,
        description='The servers: [{url, weight}, ...], or URLs alone: ["http://host:port"].',
    )
    balance: Literal["round_robin", "least_conn", "random", "hash"] = Field(
        "round_robin", description="How a target is chosen among the healthy ones: "
        "round_robin: smooth weighted round robin; least_conn: fewest connections in use "
        "(this worker's) per unit of weight; random: the less loaded of two drawn by weight; "
        "hash: a consistent hash of hash_key, so one client keeps its target.")
    pool: Pool = Field(
        default_factory=Pool, description="Connections to the targets and their timeouts.")
    hash_key: str | None = Field(
        None, description="balance: hash — client_ip (default), header:NAME or cookie:NAME; "
        "a request without it is hashed by client ip."
    )
    health_check: HealthCheck | None = Field(
        None, description="Active health checks; unset: none, every target counts as healthy "
        "unless outlier detection ejects it.")
    outlier_detection: OutlierDetection = Field(
        default_factory=OutlierDetection, description="Passive ejection of failing targets, on "
        "by default.")
    panic_mode: bool = Field(
        False, description="When every target is out, try the least-bad one instead of 503."
    )
    retries: Retries = Field(
        default_factory=Retries, description="Retries on another target, and their budget.")
    circuit_breaker: CircuitBreaker = Field(
        default_factory=CircuitBreaker, description="Concurrency caps and error-rate breaker; "
        "off until max_concurrent or error_rate is set.")
    tls: UpstreamTLS = Field(
        default_factory=UpstreamTLS, description="TLS towards https:// targets.")
    preserve_host: bool = Field(
        True, description="Send the client's Host upstream (false: the target's host:port)."
    )
    protocol: Literal["http1", "h2", "h2c"] = Field(
        "http1", description="How proxyd speaks to the targets. http1: HTTP/1.1, a request per "
        "pooled connection at a time. h2: HTTP/2 over TLS (https:// targets; ALPN h2). h2c: "
        "HTTP/2 in cleartext by prior knowledge (http:// targets). With HTTP/2 a few "
        "connections per target and worker carry many requests each (gRPC needs it).",
    )
    proxy_protocol: Literal["off", "v1", "v2"] = Field(
        "off", description="Send a PROXY protocol header with the client's address ahead of "
        "each upstream connection. Such a connection carries one client's requests only, so it "
        "is closed after its exchange instead of being pooled.",
    )

    @field_validator("hash_key")
    @classmethod
    def _hash_key_form(cls, v: str | None) -> str | None:
        if v is not None and not _HASH_KEY.fullmatch(v):
            raise ValueError(f"hash_key must be client_ip, header:NAME or cookie:NAME, got {v!r}")
        return v

    @field_validator("targets", mode="before")
    @classmethod
    def _short_targets(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"url": t} if isinstance(t, str) else t for t in v]
        return v
