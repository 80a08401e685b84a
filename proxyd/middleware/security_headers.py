"""Security response headers with defaults; each can be changed or disabled (null or "").

Strict-Transport-Security goes only into answers to clients on https (Context.scheme):
RFC 6797 §7.2 forbids it over plain HTTP, where anyone on the path could forge or strip it.
"""

from __future__ import annotations

from typing import Final

from proxyd.middleware.base import Context, FieldBlock, Middleware, Response
from proxyd.middleware.element_options import SecurityHeadersOptions

_NAMES: Final = {
    "strict_transport_security": b"Strict-Transport-Security",
    "x_content_type_options": b"X-Content-Type-Options",
    "x_frame_options": b"X-Frame-Options",
    "referrer_policy": b"Referrer-Policy",
    "content_security_policy": b"Content-Security-Policy",
    "permissions_policy": b"Permissions-Policy",
}
_HSTS: Final = b"strict-transport-security"


class SecurityHeaders(Middleware):
    type = "security_headers"
    options_model = SecurityHeadersOptions

    def __init__(self, options: SecurityHeadersOptions) -> None:
        super().__init__(options)
        override = {h.lower() for h in options.override}
        # lname, name, value, override: for https, and the same without HSTS for http.
        self.tls_fields: list[tuple[bytes, bytes, bytes, bool]] = []
        for attr, name in _NAMES.items():
            value = getattr(options, attr)
            if value:
                lname = name.lower()
                self.tls_fields.append((lname, name, value.encode(), lname.decode() in override))
        self.fields = [field for field in self.tls_fields if field[0] != _HSTS]

        # The usual case, none of the fields sent by the upstream: added as one block, made
        # once per scheme.
        self.tls_block = FieldBlock([(name, value) for _, name, value, _ in self.tls_fields])
        self.block = FieldBlock([(name, value) for _, name, value, _ in self.fields])

    def on_response(self, ctx: Context, resp: Response) -> None:
        tls = ctx.scheme == b"https"
        block = self.tls_block if tls else self.block
        if not resp.has_any(block.lnames):
            resp.add_block(block)
            return
        for lname, name, value, override in self.tls_fields if tls else self.fields:
            if not resp.has(lname):
                resp.add(name, value, lname)
            elif override:
                resp.set(name, value)
