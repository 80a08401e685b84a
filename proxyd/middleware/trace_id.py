"""Request ids and W3C trace context: accept or create, forward upstream, echo to the client."""

from __future__ import annotations

import os
import re
from typing import Final

from proxyd.middleware.base import Context, Middleware, Pending, Response
from proxyd.middleware.options import TraceIdOptions

_TRACEPARENT: Final = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# Visible ASCII only: safe to echo and to log. Used with fullmatch ("$" would let a "\n" in).
_SAFE_ID: Final = re.compile(rb"[\x21-\x7e]{1,200}")


class TraceId(Middleware):
    type = "trace_id"
    options_model = TraceIdOptions

    def __init__(self, options: TraceIdOptions) -> None:
        super().__init__(options)
        self.name = options.header.encode()
        self.lname = self.name.lower()
        self.trust = options.trust_incoming
        self.echo = options.echo
        self.traceparent = options.traceparent

    def on_request(self, ctx: Context) -> Response | Pending | None:
        incoming = ctx.header(self.lname) if self.trust else None
        if incoming is not None and _SAFE_ID.fullmatch(incoming):
            ctx.request_id = incoming.decode()
        else:
            # The server may have taken an inbound X-Request-ID already; this middleware's
            # own rules (header name, trust_incoming) decide instead.
            ctx.request_id = ctx.make_request_id()
        rid = ctx.id_bytes = ctx.request_id.encode()  # for the echo: encoded once
        ctx.remove_request.add(self.lname)
        ctx.set_request.append((self.name, rid))
        if self.traceparent:
            parent = ctx.header(b"traceparent")
            m = _TRACEPARENT.match(parent.strip().lower()) if parent else None
            if (m and m.group(1) != b"ff" and m.group(2) != b"0" * 32
                    and m.group(3) != b"0" * 16):
                # proxyd is a hop in the trace: same trace id, a new span (parent) id.
                span = os.urandom(8).hex().encode()
                ctx.remove_request.add(b"traceparent")
                ctx.set_request.append(
                    (b"traceparent", b"-".join((b"00", m.group(2), span, m.group(4))))
                )
                ctx.state["trace_id"] = m.group(2).decode()
        return None

    def on_response(self, ctx: Context, resp: Response) -> None:
        if self.echo and not resp.has(self.lname):
            rid = ctx.id_bytes
            resp.add(self.name, rid if rid is not None else ctx.id().encode(), self.lname)
