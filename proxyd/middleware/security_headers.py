"""Security response headers with defaults; each can be changed or disabled (null or "")."""

from __future__ import annotations

from typing import Final

from proxyd.middleware.base import Context, FieldBlock, Middleware, Response
from proxyd.middleware.options import SecurityHeadersOptions

_NAMES: Final = {
    "strict_transport_security": b"Strict-Transport-Security",
    "x_content_type_options": b"X-Content-Type-Options",
    "x_frame_options": b"X-Frame-Options",
    "referrer_policy": b"Referrer-Policy",
    "content_security_policy": b"Content-Security-Policy",
    "permissions_policy": b"Permissions-Policy",
}


class SecurityHeaders(Middleware):
    type = "security_headers"
    options_model = SecurityHeadersOptions

    def __init__(self, options: SecurityHeadersOptions) -> None:
        super().__init__(options)
        override = {h.lower() for h in options.override}
        self.fields: list[tuple[bytes, bytes, bytes, bool]] = []  # lname, name, value, override
        for attr, name in _NAMES.items():
            value = getattr(options, attr)
            if value:
                lname = name.lower()
                self.fields.append((lname, name, value.encode(), lname.decode() in override))

        # The usual case, none of the fields sent by the upstream: added as one block.
        self.block = FieldBlock([(name, value) for _, name, value, _ in self.fields])

    def on_response(self, ctx: Context, resp: Response) -> None:
        if not resp.has_any(self.block.lnames):
            resp.add_block(self.block)
            return
        for lname, name, value, override in self.fields:
            if not resp.has(lname):
                resp.add(name, value, lname)
            elif override:
                resp.set(name, value)
