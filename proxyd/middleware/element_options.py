"""The options of the built-in middleware types: pydantic models, validated at config load.

Kept apart from the middleware themselves, which run on every request and are compiled in the
compiled build (setup.py); these run once per config load and stay ordinary Python classes,
as pydantic wants them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxyd.config.types import ByteSize, Duration

try:  # optional: only offered when installed
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None

DEFAULT_TYPES = [
    "text/", "application/json", "application/javascript", "application/xml",
    "application/xhtml+xml", "application/rss+xml", "application/atom+xml",
    "application/problem+json", "application/ld+json", "image/svg+xml",
    "application/wasm", "application/x-ndjson",
]
# The headers middleware's placeholders: {name} in a set/add value (headers.PLACEHOLDERS).
PLACEHOLDER = re.compile(r"\{(\w+)\}")
PLACEHOLDER_NAMES = ("client_ip", "request_id", "route", "method", "path", "host")


# Each options model narrows ``type`` to its own name, which replaces the field (and its
# description) of the base: they all share this one text.
TYPE = "The middleware type this entry configures."


class Options(BaseModel):
    # validate_default: defaults such as max_age "600s" or min_size "1KiB" must be parsed too.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    type: str = Field(description=TYPE)
    enabled: bool = Field(
        True, description="false: the element is left out of the chain (of every route, or of "
        "one route when set in that route's middleware overrides).")


# -- cache -------------------------------------------------------------------------------------


class CacheOptions(Options):
    type: Literal["cache"] = Field("cache", description=TYPE)
    coalesce: bool = Field(
        True, description="Concurrent GET misses of one key wait for the first one's response "
        "instead of each going upstream (request collapsing).")
    coalesce_timeout: Duration = Field(  # type: ignore[assignment]  # parsed: validate_default
        "5s", description="Longest wait for a coalesced miss.")
    x_cache: bool = Field(True, description="Also send X-Cache: HIT|MISS.")
    sort_query: bool = Field(
        True, description="Sort the query's parameters by name in the key, so ?a=1&b=2 and "
        "?b=2&a=1 share an entry (repeated parameters keep their order).")
    ignore_query_params: list[str] = Field(
        default_factory=list, description="Query parameters left out of the key (utm_source, "
        "fbclid, ...); they are still forwarded.")
    key_headers: list[str] = Field(default_factory=list,
                                   description="Request headers added to every key.")
    allow_set_cookie: bool = Field(
        False, description="Store responses that carry Set-Cookie; false: they are relayed, "
        "never stored (one client's cookie must not reach another).")


# -- compression -------------------------------------------------------------------------------


class CompressionOptions(Options):
    type: Literal["compression"] = Field("compression", description=TYPE)
    min_size: ByteSize = Field(  # type: ignore[assignment]  # parsed: validate_default
        "1KiB", description="Bodies known to be smaller pass uncompressed (a body of unknown "
        "length is compressed).")
    algorithms: list[Literal["br", "gzip", "zstd"]] = Field(
        default_factory=lambda: ["br", "gzip"],  # type: ignore[arg-type]
        description="Server preference order."
    )
    types: list[str] = Field(default_factory=lambda: list(DEFAULT_TYPES),
                             description="Content-Type prefixes that are compressed.")
    gzip_level: int = Field(6, ge=1, le=9, description="gzip level: 1 fastest, 9 smallest.")
    brotli_quality: int = Field(
        4, ge=0, le=11, description="Brotli quality: 0 fastest, 11 smallest (far slower; for "
        "dynamic responses 4-6 is the usual choice).")
    zstd_level: int = Field(3, ge=1, le=19, description="zstd level: 1 fastest, 19 smallest.")

    @field_validator("algorithms")
    @classmethod
    def _available(cls, v: list[str]) -> list[str]:
        if "zstd" in v and zstandard is None:
            raise ValueError("zstd needs the 'zstandard' package, which is not installed: "
                             "pip install 'proxyd[zstd]' (or drop zstd from algorithms)")
        if not v:
            raise ValueError("at least one algorithm is required")
        return v


# -- cors --------------------------------------------------------------------------------------


class CorsOptions(Options):
    type: Literal["cors"] = Field("cors", description=TYPE)
    allow_origins: list[str] = Field(default_factory=list,
                                     description='Exact origins, "*", or https://*.example.com')
    allow_methods: list[str] = Field(
        default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        description="Methods a preflight allows (Access-Control-Allow-Methods).",
    )
    allow_headers: list[str] = Field(
        default_factory=list, description='Request headers a preflight allows '
        '(Access-Control-Allow-Headers): names, or ["*"]. []: only the CORS-safelisted ones.')
    expose_headers: list[str] = Field(
        default_factory=list, description="Response headers scripts may read beyond the "
        "safelisted ones (Access-Control-Expose-Headers).")
    allow_credentials: bool = Field(
        False, description="Let browsers send cookies and credentials "
        "(Access-Control-Allow-Credentials: true); not with \"*\" origins or headers.")
    max_age: Duration = Field(  # type: ignore[assignment]  # parsed: validate_default
        "600s", description="How long browsers may cache a preflight answer "
        "(Access-Control-Max-Age); 0: ask again every time.")

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> CorsOptions:
        if self.allow_credentials and ("*" in self.allow_origins or "*" in self.allow_headers):
            raise ValueError('"*" cannot be combined with allow_credentials (browsers refuse it)')
        for origin in self.allow_origins:
            if origin != "*" and not re.fullmatch(r"https?://(\*\.)?[A-Za-z0-9.-]+(:\d+)?", origin):
                raise ValueError(f"invalid origin {origin!r}: expected scheme://host[:port]")
        return self


# -- etag --------------------------------------------------------------------------------------


class EtagOptions(Options):
    type: Literal["etag"] = Field("etag", description=TYPE)
    max_size: ByteSize = Field(  # type: ignore[assignment]  # parsed: validate_default
        "1MiB", description="200 GET responses without an ETag, up to this size, are buffered "
        "to hash one (and answer If-None-Match with 304); larger ones pass untagged.")


# -- headers -----------------------------------------------------------------------------------


class HeaderOps(BaseModel):
    """Edits of one direction's header fields. set and add values may hold the placeholders
    {client_ip}, {request_id}, {route}, {method}, {path} and {host}."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    set: dict[str, str] = Field(
        default_factory=dict, description="Name → value: replaces every field of that name.")
    add: dict[str, str] = Field(
        default_factory=dict, description="Name → value: appended, keeping fields already "
        "there.")
    remove: list[str] = Field(default_factory=list, description="Names of fields removed.")

    @field_validator("set", "add")
    @classmethod
    def _known_placeholders(cls, v: dict[str, str]) -> dict[str, str]:
        for template in v.values():
            for name in PLACEHOLDER.findall(template):
                if name not in PLACEHOLDER_NAMES:
                    raise ValueError(f"unknown placeholder {{{name}}}; known: "
                                     + ", ".join(sorted(PLACEHOLDER_NAMES)))
        return v


class HeadersOptions(Options):
    type: Literal["headers"] = Field("headers", description=TYPE)
    request: HeaderOps = Field(
        default_factory=HeaderOps, description="Edits of the request forwarded upstream.")
    response: HeaderOps = Field(
        default_factory=HeaderOps, description="Edits of the response sent to the client.")


# -- security_headers --------------------------------------------------------------------------


class SecurityHeadersOptions(Options):
    type: Literal["security_headers"] = Field("security_headers", description=TYPE)
    strict_transport_security: str | None = Field(
        "max-age=31536000; includeSubDomains", description="Strict-Transport-Security value, "
        "sent on HTTPS responses only; null: not sent.")
    x_content_type_options: str | None = Field(
        "nosniff", description="X-Content-Type-Options value; null: not sent.")
    x_frame_options: str | None = Field(
        "DENY", description="X-Frame-Options value (DENY, SAMEORIGIN); null: not sent.")
    referrer_policy: str | None = Field(
        "strict-origin-when-cross-origin", description="Referrer-Policy value; null: not sent.")
    content_security_policy: str | None = Field(
        None, description="Content-Security-Policy value; unset: not sent.")
    permissions_policy: str | None = Field(
        None, description="Permissions-Policy value; unset: not sent.")
    override: list[str] = Field(
        default_factory=list,
        description="Header names whose upstream value is replaced; others are kept.",
    )


# -- trace_id ----------------------------------------------------------------------------------


class TraceIdOptions(Options):
    type: Literal["trace_id"] = Field("trace_id", description=TYPE)
    header: str = Field("X-Request-ID", description="The request id's header field.")
    trust_incoming: bool = Field(
        True, description="Keep a client's request id (visible ASCII, at most 200 bytes) "
        "instead of making one.")
    echo: bool = Field(True, description="Send the request id back on the response.")
    traceparent: bool = Field(
        True, description="Take part in W3C Trace Context: a valid incoming traceparent keeps "
        "its trace id and gets proxyd's own parent id; an invalid one (malformed, uppercase, "
        "all-zero ids, version ff, sent twice) is replaced by a new trace, and its tracestate "
        "dropped.")
    start_traces: bool = Field(
        True, description="With traceparent: start a trace (a new traceparent) for a "
        "request that comes without one, so every upstream request can be traced from the "
        "edge.")
    sampled: bool = Field(
        True, description="The sampled flag of the traces proxyd starts: true asks the "
        "services behind to record them.")


# -- validation --------------------------------------------------------------------------------


class ValidationOptions(Options):
    type: Literal["validation"] = Field("validation", description=TYPE)
    methods: list[str] | None = Field(
        None, description="Methods allowed (GET brings HEAD); others get 405 with Allow. Unset: "
        "any method.")
    max_body_size: ByteSize | None = Field(
        None, description="Largest request body (413); can only lower server.limits."
        "max_body_size. Unset: the server's limit.")
    max_headers: int | None = Field(
        None, description="Most request header fields (431). Unset: server.limits only.")
    max_header_size: ByteSize | None = Field(
        None, description="Largest request header section, names and values (431). Unset: "
        "server.limits only.")
    max_uri_length: int | None = Field(
        None, description="Longest request target (path and query), in bytes (414). Unset: "
        "server.limits only.")
    reject_encoded_traversal: bool = Field(
        True, description="Answer 400 to a path whose encoded dot segments (..%2f, %2e%2e) "
        "would climb out of its directory once an upstream decodes them.")
    reject_encoded_slash: bool = Field(
        False, description="Answer 400 to a path with an encoded slash or backslash (%2F, %5C), "
        "which matters with server.encoded_slashes: keep.")
