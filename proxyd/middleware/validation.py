"""Input validation per route, stricter than the server-wide limits.

The server already refuses ambiguous framing and enforces server.limits; this middleware adds
route-level method, size and path rules. Paths reach it normalised (proxy/path.py: encoded
dot segments resolved, %00 refused); what it still refuses is a dot segment that only an
encoded slash or backslash makes (``..%2f``), which the server passes with
``encoded_slashes: keep`` and an upstream that decodes them would resolve differently.
"""

from __future__ import annotations

import re
from typing import Final

from proxyd.middleware.base import Context, Middleware, Pending, Response, json_response
from proxyd.middleware.element_options import ValidationOptions

# A "." or ".." segment once decoded: dots plain or %2e, separators plain or %2f / %5c (so
# "..%2f" and "%2e%2e%2f" count). Only searched when the path holds a "%".
_ENCODED_DOT_SEGMENT: Final = re.compile(rb"(?:^|/|%2f|%5c)(?:%2e|\.){1,2}(?:/|%2f|%5c|$)",
                                  re.IGNORECASE)
_ENCODED_NUL: Final = re.compile(rb"%00")
_ENCODED_SLASH: Final = re.compile(rb"%2f|%5c", re.IGNORECASE)


class Validation(Middleware):
    type = "validation"
    options_model = ValidationOptions

    def __init__(self, options: ValidationOptions) -> None:
        super().__init__(options)
        self.methods = {m.upper().encode() for m in options.methods} if options.methods else None
        if self.methods and b"GET" in self.methods:
            self.methods.add(b"HEAD")
        self.allow = b", ".join(sorted(self.methods)) if self.methods else b""
        self.max_body = options.max_body_size
        self.max_headers = options.max_headers
        self.max_header_size = options.max_header_size
        self.max_uri = options.max_uri_length
        # The encoded-path rules this route applies, in the order they are reported.
        self.path_rules: list[tuple[re.Pattern[bytes], str]] = [
            (_ENCODED_NUL, "encoded NUL in path")]
        if options.reject_encoded_traversal:
            self.path_rules.append((_ENCODED_DOT_SEGMENT, "encoded path traversal"))
        if options.reject_encoded_slash:
            self.path_rules.append((_ENCODED_SLASH, "encoded slash in path"))

    def on_request(self, ctx: Context) -> Response | Pending | None:
        if self.methods is not None and ctx.method not in self.methods:
            return json_response(405, "method not allowed", ctx.id(), [(b"Allow", self.allow)])
        if self.max_uri is not None and (
            len(ctx.path) + (len(ctx.query) + 1 if ctx.query else 0) > self.max_uri  # "?" + query
        ):
            return json_response(414, "request URI too long", ctx.id())
        if self.max_headers is not None and len(ctx.headers) > self.max_headers:
            return json_response(431, "too many request header fields", ctx.id())
        if self.max_header_size is not None and sum(
            len(n) + len(v) + 4 for _, n, v in ctx.headers
        ) > self.max_header_size:
            return json_response(431, "request header section too large", ctx.id())
        path = ctx.path
        if path.find(b"%") >= 0:  # not "in": see proxy/path.py
            for pattern, message in self.path_rules:
                if pattern.search(path):
                    return json_response(400, message, ctx.id())
        if self.max_body is not None:
            # Enforced by the data plane as the body streams (Content-Length or chunked).
            current = ctx.max_body_size
            ctx.max_body_size = self.max_body if current is None else min(current, self.max_body)
        return None
