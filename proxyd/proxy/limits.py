"""The client side's limits and timeouts, read once from the server config.

What a client connection enforces before anything reaches an upstream: sizes, counts and
deadlines. 0 in the config turns a timeout or cap off: it is kept as infinity, which compares
false against any time or count, so the hot path needs no test for "off".
"""

from __future__ import annotations

import math

from proxyd.config.models_server import Server
from proxyd.proxy.field_rules import TrustedProxies


class ClientLimits:
    __slots__ = (
        "body_timeout",
        "header_timeout",
        "keep_encoded_slashes",
        "keepalive_timeout",
        "max_body_size",
        "max_connections",
        "max_head_bytes",
        "max_header_size",
        "max_headers",
        "max_keepalive_requests",
        "max_uri_size",
        "send_timeout",
        "trusted",
        "underscores",
    )

    def __init__(self, server: Server) -> None:
        limits = server.limits
        self.max_body_size = limits.max_body_size
        self.max_header_size = limits.max_header_size
        self.max_uri_size = limits.max_uri_size
        self.max_headers = limits.max_headers
        # Request line + header section, raw: the URI and field limits plus the fixed parts.
        self.max_head_bytes = limits.max_uri_size + limits.max_header_size + 64
        self.header_timeout = limits.header_timeout
        self.body_timeout = limits.body_timeout or math.inf
        self.send_timeout = limits.send_timeout
        self.max_connections = limits.max_connections or math.inf
        self.max_keepalive_requests = limits.max_keepalive_requests or math.inf
        self.keepalive_timeout = server.keepalive_timeout
        # Whose X-Forwarded-* and PROXY headers are believed.
        self.trusted = TrustedProxies(server.trusted_proxies)
        # How a request path with %2F, %5C or a backslash is treated (proxy/path.py).
        self.keep_encoded_slashes = server.encoded_slashes == "keep"
        # server.headers_with_underscores: "drop", "reject" or "allow".
        self.underscores = server.headers_with_underscores
