"""Request ids and W3C trace context: accept or create, forward upstream, echo to the client."""

from __future__ import annotations

import re
from random import getrandbits
from typing import Final

from proxyd.middleware.base import Context, Middleware, Pending, Response
from proxyd.middleware.element_options import TraceIdOptions

# W3C Trace Context §3.2: lowercase hex only; a later version may append "-" and more.
_TRACEPARENT: Final = re.compile(
    rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x21-\x7e]*)?")
_ZERO_TRACE: Final = b"0" * 32
_ZERO_PARENT: Final = b"0" * 16
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
        self.start = options.start_traces
        self.new_flags = b"01" if options.sampled else b"00"
        self.flags_tail = "-01" if options.sampled else "-00"

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
            self._trace(ctx)
        return None

    def _trace(self, ctx: Context) -> None:
        """proxyd is a hop in the trace: the trace id it came with and a new parent (span) id
        of its own; a new trace when none came (start_traces), or when the one that came is
        invalid, which W3C Trace Context says to restart rather than pass on."""
        parent = ctx.header(b"traceparent")
        trace = _valid(ctx, parent) if parent is not None else None
        if trace is not None:
            trace_id, flags = trace
            # Random, not secret: Python's generator (reseeded in each forked worker) costs no
            # system call, where os.urandom would cost one or two per request.
            span = (getrandbits(64) | 1).to_bytes(8, "big").hex().encode()
            line = b"00-" + trace_id + b"-" + span + b"-" + flags
        elif parent is not None or self.start:
            # A new trace: its id and proxyd's span id from one draw, rendered in one pass (the
            # start of every trace is on the request path).
            ids = new_ids(getrandbits(192))
            line = ("00-" + ids[:32] + "-" + ids[32:] + self.flags_tail).encode()
            # A tracestate belongs to the traceparent it came with: never to a new trace.
            ctx.remove_request.add(b"tracestate")
        else:
            return
        ctx.remove_request.add(b"traceparent")
        ctx.set_request.append((b"traceparent", line))

    def on_response(self, ctx: Context, resp: Response) -> None:
        if self.echo and not resp.has(self.lname):
            rid = ctx.id_bytes
            resp.add(self.name, rid if rid is not None else ctx.id().encode(), self.lname)


def new_ids(bits: int) -> str:
    """A new trace id (32 hex digits) and span id (16) from 192 random bits; the low bit of
    each set, so that neither is all zeros, which W3C Trace Context forbids."""
    return (bits | 1 << 64 | 1).to_bytes(24, "big").hex()


def _valid(ctx: Context, value: bytes) -> tuple[bytes, bytes] | None:
    """(trace id, flags) of a valid traceparent (W3C Trace Context §3.2.2); None otherwise."""
    m = _TRACEPARENT.fullmatch(value.strip(b" \t"))
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None  # ff is never valid; version 00 has nothing after its flags
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    if sum(1 for name, _, _ in ctx.headers if name == b"traceparent") > 1:
        return None  # which one would be the parent? Neither: a new trace.
    return trace_id, flags
