"""The options of the ``forward_auth`` element, validated at config load.

Apart from the other access elements' options (access_options.py): nothing here is read from files,
and the one name it gives (the upstream) is checked against the rest of the config by the
middleware registry, with file:line.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field, ValidationInfo, field_validator

from proxyd.config.types import Duration
from proxyd.middleware.access.access_options import _TOKEN, _header_name
from proxyd.middleware.element_options import TYPE, Options

# Sent on every subrequest, whatever request_headers says: where the request was going.
FORWARDED_NAMES = ("X-Forwarded-Method", "X-Forwarded-Uri", "X-Forwarded-Host",
                   "X-Forwarded-Proto", "X-Forwarded-For")


# What each list cannot name, and the refusal: fields proxyd writes itself (the subrequest
# always says where the request was going; the upstream request's framing and routing are
# proxyd's).
_RESERVED: Final = {
    "request_headers": (
        frozenset({name.lower() for name in FORWARDED_NAMES} | {"host", "content-length"}),
        "%r: proxyd sets it on the subrequest itself"),
    "response_headers": (
        frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                   "proxy-connection", "te", "trailer", "upgrade", "expect"}),
        "%r describes the connection or the message's framing: it cannot be copied onto the "
        "upstream request"),
}


class ForwardAuthOptions(Options):
    type: Literal["forward_auth"] = Field("forward_auth", description=TYPE)
    upstream: str = Field(
        description="The auth service: a name in upstreams. Its targets are chosen by that "
        "upstream's balancer, skipping those its health checks or outlier detection took out.")
    path: str = Field("/auth", description="The path (and query) asked on the auth service.")
    method: str = Field("GET", description="The subrequest's method.")
    request_headers: list[str] = Field(
        default_factory=lambda: ["Authorization", "Cookie"],
        description="Client request headers sent to the auth service (the credentials). "
        "X-Forwarded-Method, -Uri, -Host, -Proto and -For are always sent, from the request "
        "as proxyd received it.")
    response_headers: list[str] = Field(
        default_factory=list,
        description="Headers of a 2xx auth answer set on the upstream request (X-User, ...); "
        "inbound fields of those names are always removed, so a client cannot claim them.")
    timeout: Duration = Field(  # type: ignore[assignment]  # parsed: validate_default
        "1s", description="Longest wait for the auth service's whole answer; past it, "
        "on_error decides.")
    on_error: Literal["deny", "allow"] = Field(
        "deny", description="When the auth service is down, times out or answers 5xx: deny "
        "answers 503 (with the request id); allow lets the request through unauthenticated.")
    cache_ttl: Duration = Field(  # type: ignore[assignment]
        "0s", description="How long a 2xx, 401 or 403 answer (without Set-Cookie) is reused "
        "for the same credentials (the values of request_headers), without asking again; 0: "
        "never. The answer must then depend on the credentials only, not on the path or "
        "method.")
    cache_size: int = Field(
        10000, ge=1, description="Answers remembered per route and worker (least recently "
        "used go first).")
    max_pending: int = Field(
        256, ge=1, description="Subrequests in flight per route and worker; a request that "
        "would start one more gets 503 with Retry-After at once, whatever on_error says (a "
        "flood must not turn a slow service into an open door). Requests that bring "
        "credentials already being asked about wait for that answer and do not count. The "
        "default leaves room for a busy worker with a service answering in tens of "
        "milliseconds, and bounds the requests and sockets a stalled service can hold.")
    forward_body: Literal[False] = Field(
        False, description="The request body is never sent to the auth service (false is the "
        "only value): the request would otherwise wait for its whole body before the auth "
        "decision, and the auth service would hold it.")

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        if not v:
            raise ValueError("name an upstream (the auth service)")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or any(c <= " " or c == "\x7f" for c in v) or "#" in v:
            raise ValueError(f"{v!r}: expected an origin-form path starting with '/', "
                             "without spaces, controls or '#'")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if not _TOKEN.match(v):
            raise ValueError(f"{v!r} is not a valid method")
        return v.upper()

    @field_validator("request_headers", "response_headers")
    @classmethod
    def _header_names(cls, v: list[str], info: ValidationInfo) -> list[str]:
        seen = set()
        for name in v:
            _header_name(name)
            if name.lower() in seen:
                raise ValueError(f"{name!r} is listed twice")
            seen.add(name.lower())
        reserved, why = _RESERVED[str(info.field_name)]
        for name in v:
            if name.lower() in reserved:
                raise ValueError(why % name)
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("the timeout must be above 0")
        return v
