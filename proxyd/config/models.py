"""The config file as pydantic models: GatewayConfig, the document.

Every model forbids unknown keys and is frozen: a loaded config is a value that a reload swaps
whole, never edits. Each field carries its description here, next to its code; ``proxyd schema``
and the docs are generated from these models. The sections with models of their own live in
models_server.py (server, admin, and the Model base), models_upstream.py and models_route.py;
every model is importable from here.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    TargetSettings,
    Upstream,
    UpstreamTLS,
)
from proxyd.config.types import ByteSize, Duration

__all__ = [
    "DEFAULT_RETRY_METHODS", "TLS", "AccessLogSettings", "Admin", "CacheSettings",
    "CircuitBreaker", "GatewayConfig", "HealthCheck", "Limits", "ListenSpec", "Listener",
    "ListenerValue", "Match", "Metrics", "MiddlewareEntry", "Model", "OutlierDetection", "Pool",
    "Redis", "Respond", "Retries", "Rewrite", "Route", "RouteCache", "RouteTimeouts", "Server",
    "Status", "TargetSettings", "Upstream", "UpstreamTLS", "WebSocket", "parse_listener",
]


class MiddlewareEntry(BaseModel):
    """One chain element; its options are checked by the middleware registry of its type."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str = Field(
        description="The middleware type (cors, rate_limit, cache, ...); the entry's other keys "
        "are that type's options, listed in its own section below.")


FinalStatus = Annotated[int, Field(ge=200, le=599)]


class CacheSettings(Model):
    """The store of the ``cache`` middleware, and the rules every route's cache shares."""

    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: a per-worker LRU; redis: one cache shared by every "
        "worker and instance (redis.url), with a 1-second per-worker copy in front.")
    max_entries: int = Field(10000, ge=1, description="Most entries a worker's store holds "
                             "(its L1 copy with redis).")
    max_bytes: ByteSize = Field(  # type: ignore[assignment]  # parsed: validate_default
        "256MiB", description="Most bytes (headers, bodies, bookkeeping) a worker's store holds.")
    max_object_size: ByteSize = Field(  # type: ignore[assignment]  # parsed: validate_default
        "1MiB", description="Larger responses are relayed, never stored.")
    default_ttl: Duration = Field(  # type: ignore[assignment]  # parsed: validate_default
        "0s", description="Lifetime of a heuristically cacheable response (RFC 9110 §15.1: "
        "200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501) that states no freshness of "
        "its own, on routes without cache.ttl. 0: such responses are not stored; only what "
        "the origin marks fresh (Cache-Control, Expires, a targeted field) is.")
    statuses: list[FinalStatus] | None = Field(
        None, description="Only these statuses are stored (e.g. [200, 301, 302]). Default: "
        "any final status RFC 9111 lets a shared cache store — with explicit freshness any "
        "status, without it only the heuristically cacheable ones, and only with a ttl.")
    targeted_fields: list[str] = Field(
        default_factory=lambda: ["CDN-Cache-Control"],
        description="Targeted cache-control fields (RFC 9213) proxyd obeys, first first: the "
        "first present and valid one replaces Cache-Control and Expires for proxyd's own "
        "caching (e.g. [Proxyd-Cache-Control, CDN-Cache-Control]); [] obeys Cache-Control "
        "only. They are forwarded unchanged.")

    @field_validator("targeted_fields")
    @classmethod
    def _field_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or any(c in name for c in ' \t:"(),/;<=>?@[\\]{}'):
                raise ValueError(f"not a field name: {name!r}")
        return v


class Redis(Model):
    """The Redis server of the shared cache (cache.backend: redis) and of rate limits with
    backend: redis."""

    url: str = Field(
        "redis://127.0.0.1:6379/0", description="redis://[user:password@]host:port/db, "
        "rediss:// for TLS or unix:// for a socket, as redis-py reads it; checked at load, "
        "connected to only by what uses it.")


AccessLogField = Literal["user_agent", "referer", "protocol", "upstream_addr", "tries",
                         "tls_version"]


class AccessLogSettings(Model):
    format: Literal["json", "combined", "template"] = Field(
        "json", description="json: one JSON object per line: ts, request_id, client_ip, "
        "method, host, path, query, status, bytes_in, bytes_out, duration_ms, upstream, "
        "upstream_ms, cache, route, pid, and the `fields` chosen. combined: the Combined Log "
        "Format of Apache and nginx, field for field (goaccess --log-format=COMBINED, awstats "
        "LogFormat=1). template: the `template` line.")
    fields: list[AccessLogField] = Field(
        default_factory=lambda: list(get_args(AccessLogField)),
        description="Fields of json lines beyond the fixed ones: user_agent and referer (the "
        "request's, null without), protocol (HTTP/1.1, HTTP/1.0), upstream_addr (host:port of "
        "the target the last try went to, null without), tries (upstream tries, 0 without), "
        "tls_version (TLSv1.3, ...; null on plain HTTP). [] for the fixed ones only.")
    template: str | None = Field(
        None, description="With format: template, each line (nginx log_format style): text "
        "with $variables — $remote_addr $time_local $time_iso8601 $msec $request "
        "$request_method $request_uri $uri $args $server_protocol $host $status "
        "$request_body_length $body_bytes_sent $request_time $upstream_name $upstream_addr "
        "$upstream_response_time $upstream_tries $cache_status $route $ssl_protocol "
        "$request_id $http_referer $http_user_agent, and $http_NAME for any request header "
        "($http_x_forwarded_for). Where a letter follows a variable, write it $${name} (the "
        "file's own ${VAR} substitution comes first and turns $$ into $). Values are escaped "
        "as nginx does (\\xHH); an empty one is -.")
    path: str = Field("-", description='"-" = stdout; else a file, reopened on SIGUSR1.')
    enabled: bool = Field(True, description="false: no access log at all.")
    sample_2xx: float = Field(
        1.0, ge=0.0, le=1.0, description="Fraction of 2xx responses logged; errors always are."
    )

    @field_validator("template")
    @classmethod
    def _template_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            from proxyd.observe.log_format import compile_template

            compile_template(v)  # a ValueError names the unknown variable
        return v

    @model_validator(mode="after")
    def _template_with_its_format(self) -> AccessLogSettings:
        if (self.format == "template") != (self.template is not None):
            raise ValueError("format: template and a template go together")
        return self


class Metrics(Model):
    enabled: bool = Field(
        True, description="false: workers do no per-request counting (the request, upstream "
        "and cache metrics stay empty); the admin port's /metrics still answers.")
    path: str | None = Field(None, description="Also expose metrics on the traffic port here.")


class GatewayConfig(Model):
    """The whole config file. Every section may be left out, and then takes its defaults."""

    server: Server = Field(
        default_factory=Server, description="Traffic listeners, workers, client limits and "
        "timeouts.")
    admin: Admin = Field(
        default_factory=Admin, description="The admin HTTP server: status, metrics, reload.")
    upstreams: dict[str, Upstream] = Field(
        default_factory=dict, description="The upstreams, by the name routes give them in "
        "route.upstream.")
    routes: list[Route] = Field(
        default_factory=list, description="The routes, tried in order: the first whose match "
        "takes the request answers it; a request no route takes is answered 404.")
    middleware: list[MiddlewareEntry] = Field(
        default_factory=list, description="The middleware chain every route runs, in order; "
        "a route may override an entry's options (route.middleware).")
    cache: CacheSettings = Field(
        default_factory=CacheSettings,
        description="The response cache's store and shared rules, used by the cache middleware.")
    redis: Redis = Field(
        default_factory=Redis, description="The Redis server of the shared cache and of "
        "Redis-backed rate limits.")
    access_log: AccessLogSettings = Field(
        default_factory=AccessLogSettings, description="One line per request: format, fields, "
        "destination, sampling.")
    metrics: Metrics = Field(
        default_factory=Metrics, description="Prometheus metrics, aggregated by the master.")
