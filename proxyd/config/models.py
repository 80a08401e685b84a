"""The configuration contract (DESIGN §3) as pydantic models.

Every model forbids unknown keys and is frozen: a loaded config is a value that a reload swaps
whole, never edits. Each field carries its description here, next to its code; ``proxyd schema``
and the docs are generated from these models.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from proxyd.config.types import ByteSize, Duration, HostPort, HostPortValue, parse_host_port


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
    body_timeout: Duration = Field(
        "60s", description="Longest wait between request body bytes from a client; then the "
        "connection closes (408 if nothing was answered yet) and its upstream exchange ends.",
    )
    send_timeout: Duration = Field(
        "60s", description="A client that reads nothing of a response for this long (its socket "
        "buffer full) is disconnected, and its upstream connection with it.",
    )
    max_connections: int = Field(
        10000, ge=0, description="Open client connections per worker; one more is answered 503 "
        "and closed. 0 = no cap.",
    )
    max_keepalive_requests: int = Field(
        1000, ge=0, description="Requests served on one client connection; the last response "
        "carries Connection: close. 0 = no cap.",
    )


class TLS(Model):
    cert: str = Field(min_length=1, description="PEM certificate chain file (leaf first).")
    key: str = Field(min_length=1, description="PEM private key file.")
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="Oldest TLS version accepted.")

    @field_validator("min_version", mode="before")
    @classmethod
    def _version_number(cls, v: Any) -> Any:
        return str(v) if isinstance(v, float) else v  # YAML reads 1.2 as a number


class ListenSpec(Model):
    """The mapping form of a listener: ``{address: host:port, tls: {cert, key}}``."""

    address: HostPortValue
    tls: TLS | None = None


class Listener(HostPort):
    """A traffic listener: its address (equal to and hashed as that HostPort, so sockets stay
    keyed by address across a reload that adds or drops TLS) plus its TLS settings, if any."""

    tls: TLS | None = None

    @classmethod
    def of(cls, address: HostPort, tls: TLS | None = None) -> Listener:
        listener = cls(address.host, address.port)
        listener.tls = tls
        return listener


def _problems(exc: ValidationError) -> str:
    out = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(el) for el in err["loc"])
        if err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = err["msg"].removeprefix("Value error, ")
        out.append(f"{where}: {message}" if where else message)
    return "; ".join(out)


def parse_listener(value: Any) -> Listener:
    """``"host:port"`` (the contract), or ``{address: "host:port", tls: {...}}``."""
    if isinstance(value, Listener):
        return value
    if isinstance(value, dict):
        try:
            spec = ListenSpec.model_validate(value)
        except ValidationError as exc:
            raise ValueError(_problems(exc)) from None
        return Listener.of(spec.address, spec.tls)
    return Listener.of(parse_host_port(value))


def _dump_listener(listener: HostPort) -> str | dict[str, Any]:
    tls = getattr(listener, "tls", None)
    if tls is None:
        return str(listener)
    return {"address": str(listener), "tls": tls.model_dump()}


ListenerValue = Annotated[
    HostPort,
    PlainValidator(parse_listener),
    PlainSerializer(_dump_listener),
    WithJsonSchema({
        "description": 'address: "host:port", or {address: "host:port", tls: {cert, key, '
                       'min_version}} for a TLS listener',
        "oneOf": [
            {"type": "string"},
            {"type": "object", "additionalProperties": False, "required": ["address"],
             "properties": {
                 "address": {"type": "string"},
                 "tls": {"type": "object", "additionalProperties": False,
                         "required": ["cert", "key"],
                         "properties": {"cert": {"type": "string"}, "key": {"type": "string"},
                                        "min_version": {"enum": ["1.2", "1.3"]}}},
             }},
        ],
    }),
]


class Server(Model):
    listen: list[ListenerValue] = Field(
        default_factory=lambda: ["127.0.0.1:8080"], min_length=1,
        description='Traffic listeners: "host:port", or {address, tls: {cert, key, '
                    'min_version}} to terminate TLS there.',
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
    url: str = Field(description="http://host:port or https://host:port of one upstream server.")
    weight: int = Field(1, ge=1, le=1000, description="Share of requests relative to the others.")


class Pool(Model):
    max_connections: int = Field(1000, ge=1, description="Open connections per target per worker.")
    max_keepalive: int = Field(
        500, ge=0, description="Idle connections kept per target per worker."
    )
    keepalive_expiry: Duration = Field("30s", description="Idle pooled connection lifetime.")
    connect_timeout: Duration = Field("5s", description="TCP (and TLS) connect time limit.")
    read_timeout: Duration = Field("30s", description="Longest wait between upstream bytes.")
    total_timeout: Duration | None = Field(
        None, description="Longest whole exchange, all tries included; none by default."
    )


Status = Annotated[int, Field(ge=100, le=599)]


class HealthCheck(Model):
    """Active checks, run by the master once per instance; results pushed to the workers."""

    path: str = Field("/health", description="GET this path on every target.")
    interval: Duration = Field("5s", description="Time between checks of one target.")
    timeout: Duration = Field("2s", description="A check slower than this fails.")
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

    enabled: bool = True
    consecutive_failures: int = Field(
        5, ge=1, description="Failures in a row (connect errors, timeouts, failure_statuses) "
        "that eject a target."
    )
    failure_statuses: list[Status] = Field(
        default_factory=list,
        description="Upstream statuses that count as failures, e.g. [502, 503, 504].",
    )
    base_ejection: Duration = Field(
        "5s", description="First cool-down; doubles on each repeat ejection."
    )
    max_ejection: Duration = Field("60s", description="Longest cool-down.")


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
    budget_window: Duration = Field("10s", description="The budget's sliding window.")
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
    window: Duration = Field("10s", description="Sliding window of the error rate.")
    open_for: Duration = Field("5s", description="Time open (503 at once) before probing.")
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


class Upstream(Model):
    targets: list[Target] = Field(min_length=1)
    balance: Literal["round_robin", "least_conn", "random", "hash"] = "round_robin"
    pool: Pool = Field(default_factory=Pool)
    hash_key: str | None = Field(
        None, description="balance: hash — client_ip (default), header:NAME or cookie:NAME; "
        "a request without it is hashed by client ip."
    )
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection = Field(default_factory=OutlierDetection)
    panic_mode: bool = Field(
        False, description="When every target is out, try the least-bad one instead of 503."
    )
    retries: Retries = Field(default_factory=Retries)
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    tls: UpstreamTLS = Field(default_factory=UpstreamTLS)
    preserve_host: bool = Field(
        True, description="Send the client's Host upstream (false: the target's host:port)."
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


class RouteTimeouts(Model):
    """Per-route overrides of the upstream's pool timeouts."""

    connect: Duration | None = Field(None, description="Overrides pool.connect_timeout.")
    read: Duration | None = Field(None, description="Overrides pool.read_timeout.")
    total: Duration | None = Field(None, description="Overrides pool.total_timeout.")


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
    timeouts: RouteTimeouts | None = Field(
        None, description="connect, read, total: override the upstream's timeouts."
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
