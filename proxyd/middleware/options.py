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


class Options(BaseModel):
    # validate_default: defaults such as max_age "600s" or min_size "1KiB" must be parsed too.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    type: str
    enabled: bool = True


# -- cache -------------------------------------------------------------------------------------


class CacheOptions(Options):
    type: Literal["cache"] = "cache"
    coalesce: bool = True
    coalesce_timeout: Duration = Field(  # type: ignore[assignment]  # parsed: validate_default
        "5s", description="Longest wait for a coalesced miss.")
    x_cache: bool = Field(True, description="Also send X-Cache: HIT|MISS.")
    sort_query: bool = True
    ignore_query_params: list[str] = Field(default_factory=list)
    key_headers: list[str] = Field(default_factory=list,
                                   description="Request headers added to every key.")
    allow_set_cookie: bool = False


# -- compression -------------------------------------------------------------------------------


class CompressionOptions(Options):
    type: Literal["compression"] = "compression"
    min_size: ByteSize = "1KiB"  # type: ignore[assignment]  # parsed: validate_default
    algorithms: list[Literal["br", "gzip", "zstd"]] = Field(
        default_factory=lambda: ["br", "gzip"],  # type: ignore[arg-type]
        description="Server preference order."
    )
    types: list[str] = Field(default_factory=lambda: list(DEFAULT_TYPES),
                             description="Content-Type prefixes that are compressed.")
    gzip_level: int = Field(6, ge=1, le=9)
    brotli_quality: int = Field(4, ge=0, le=11)
    zstd_level: int = Field(3, ge=1, le=19)

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
    type: Literal["cors"] = "cors"
    allow_origins: list[str] = Field(default_factory=list,
                                     description='Exact origins, "*", or https://*.example.com')
    allow_methods: list[str] = Field(
        default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    )
    allow_headers: list[str] = Field(default_factory=list, description='Names, or ["*"].')
    expose_headers: list[str] = Field(default_factory=list)
    allow_credentials: bool = False
    max_age: Duration = "600s"  # type: ignore[assignment]  # parsed: validate_default

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
    type: Literal["etag"] = "etag"
    max_size: ByteSize = "1MiB"  # type: ignore[assignment]  # parsed: validate_default


# -- headers -----------------------------------------------------------------------------------


class HeaderOps(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)

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
    type: Literal["headers"] = "headers"
    request: HeaderOps = Field(default_factory=HeaderOps)
    response: HeaderOps = Field(default_factory=HeaderOps)


# -- security_headers --------------------------------------------------------------------------


class SecurityHeadersOptions(Options):
    type: Literal["security_headers"] = "security_headers"
    strict_transport_security: str | None = "max-age=31536000; includeSubDomains"
    x_content_type_options: str | None = "nosniff"
    x_frame_options: str | None = "DENY"
    referrer_policy: str | None = "strict-origin-when-cross-origin"
    content_security_policy: str | None = None
    permissions_policy: str | None = None
    override: list[str] = Field(
        default_factory=list,
        description="Header names whose upstream value is replaced; others are kept.",
    )


# -- trace_id ----------------------------------------------------------------------------------


class TraceIdOptions(Options):
    type: Literal["trace_id"] = "trace_id"
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
    type: Literal["validation"] = "validation"
    methods: list[str] | None = None
    max_body_size: ByteSize | None = None
    max_headers: int | None = None
    max_header_size: ByteSize | None = None
    max_uri_length: int | None = None
    reject_encoded_traversal: bool = True
    reject_encoded_slash: bool = False
