"""The routes section of the config file: which requests a route takes, and how.

The match; the answer (an upstream, or a direct response); the path rewrite; and per-route
caching, WebSocket relaying and timeouts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from proxyd.config.models_server import Model
from proxyd.config.types import ByteSize, Duration


class Match(Model):
    """What a request must have for the route to take it: every key given must match; none
    given takes every request."""

    host: str | None = Field(None, description="Host header, exact or *.example.com.")
    path: str | None = Field(None, description="Exact path.")
    path_prefix: str | None = Field(
        None, description="Path prefix, compared with the normalised path (/api also takes "
        "/api/users).")
    path_regex: str | None = Field(
        None, description="Python regular expression searched in the normalised path (anchor "
        "it with ^ and $ to match the whole path).")
    methods: list[str] | None = Field(
        None, description="Methods taken (any case); another method on a path this route "
        "takes gets 405 with Allow. Unset: every method.")
    headers: dict[str, str] | None = Field(None, description="Required header values (exact).")

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        return [m.upper() for m in v] if v is not None else None


class Rewrite(Model):
    """The forwarded path's rewrite: the first match of regex is replaced (after strip_prefix)."""

    regex: str = Field(description="Python regular expression searched in the path.")
    replacement: str = Field(
        description="What replaces the match; $1, $2... (or \\1) insert its groups.")


class Respond(Model):
    """A direct answer, without an upstream. Its body and header values may take these
    placeholders from the request: {scheme} (http or https, as X-Forwarded-Proto would say),
    {host} (the Host's name, without port), {path} (normalised, as routes see it), {query}
    (with its "?", empty without one) and {request_id}. The HTTP→HTTPS redirect is then one
    route: ``respond: {status: 301, headers: {Location: "https://{host}{path}{query}"}}``.
    Without placeholders the answer is rendered once, at load."""

    status: int = Field(200, ge=200, le=599, description="The status code.")
    body: str = Field("", description="The body (UTF-8); placeholders allowed.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Header fields; values may hold placeholders. "
        "Content-Type defaults to text/plain; charset=utf-8 when there is a body.")


class RouteCache(Model):
    ttl: Duration | None = Field(
        None, description="Lifetime of a heuristically cacheable response (200, 203, 204, 300, "
        "301, 308, 404, 405, 410, 414, 501) that states no freshness of its own; overrides "
        "cache.default_ttl on this route.")
    force_ttl: Duration | None = Field(
        None, description="Lifetime of every response stored on this route, whatever the "
        "upstream says (against RFC 9111: only for origins known to send wrong headers).")
    enabled: bool = Field(True, description="false: the cache middleware skips this route.")


class WebSocket(Model):
    enabled: bool = Field(
        True, description="Relay WebSocket upgrades on this route; false: an upgrade request "
        "is forwarded as a plain request, without its Upgrade.")
    on_reload: Literal["keep", "close"] = Field(
        "keep", description="keep: live until they end or drain_timeout; close: 1001 at once."
    )
    idle_timeout: Duration = Field("300s", description="Close a relay idle this long.")  # type: ignore[assignment]
    max_message_size: ByteSize = Field("16MiB", description="Larger messages close with 1009.")  # type: ignore[assignment]


class RouteTimeouts(Model):
    """Per-route overrides of the upstream's pool timeouts."""

    connect: Duration | None = Field(None, description="Overrides pool.connect_timeout.")
    read: Duration | None = Field(None, description="Overrides pool.read_timeout.")
    total: Duration | None = Field(None, description="Overrides pool.total_timeout.")


def _websocket_flag_schema(schema: dict[str, Any]) -> None:
    # The short form _websocket_flag expands: true or false for the default options.
    options = {key: schema.pop(key) for key in ("$ref", "allOf") if key in schema}
    schema["anyOf"] = [{"type": "boolean"}, options]


class Route(Model):
    name: str = Field(
        min_length=1, description="The route's name, in logs, metrics and explain; unique.")
    match: Match = Field(
        default_factory=Match, description="Which requests the route takes; empty: all.")
    upstream: str | None = Field(
        None, description="The upstream (a key of upstreams) the requests go to; exactly one "
        "of upstream and respond.")
    respond: Respond | None = Field(
        None, description="Answer directly instead of forwarding (redirects, fixed bodies).")
    strip_prefix: str | None = Field(
        None, description="Removed from the start of the path, when there, before forwarding "
        "(/api/users → /users with /api).")
    rewrite: Rewrite | None = Field(
        None, description="Rewrite the forwarded path with a regular expression.")
    cache: RouteCache | None = Field(
        None, description="This route's cache settings; unset: the cache defaults apply.")
    middleware: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-route overrides of middleware entries, by type."
    )
    websocket: WebSocket = Field(
        default_factory=lambda: WebSocket(enabled=False),
        description="true, or options: relay WebSocket upgrades on this route.",
        json_schema_extra=_websocket_flag_schema,
    )
    timeouts: RouteTimeouts | None = Field(
        None, description="connect, read, total: override the upstream's timeouts."
    )

    @field_validator("websocket", mode="before")
    @classmethod
    def _websocket_flag(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v
