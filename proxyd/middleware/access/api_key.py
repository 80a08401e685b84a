"""The ``api_key`` element: a key in a request header (or a query parameter) names the client.

Keys are configured as their SHA-256, never in clear. A fast hash is right for them, where it
would not be for passwords: an API key is a long random string (``openssl rand -hex 32``),
so there is nothing to search for offline. Per request the presented key is hashed and its
digest looked up, which also makes the comparison independent of how much of a key matches.
The key's name becomes the consumer: rate_limit's ``consumer`` key part, and, where
configured, a request header for the upstream.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from proxyd.middleware.access import outcome
from proxyd.middleware.access.access_options import ApiKeyOptions
from proxyd.middleware.access.outcome import Outcomes, header_value, quoted
from proxyd.middleware.base import Context, Middleware, Pending, Response

if TYPE_CHECKING:
    from proxyd.middleware.services import Services
    from proxyd.proxy.router import CompiledRoute


class ApiKey(Middleware):
    type = "api_key"
    options_model = ApiKeyOptions

    def __init__(self, options: ApiKeyOptions) -> None:
        super().__init__(options)
        self.o = options
        self.by_digest = options.by_digest
        self.header = options.header.lower().encode() if options.header is not None else None
        self.query = options.query.encode() + b"=" if options.query is not None else None
        self.challenge = b"ApiKey realm=" + quoted(options.realm)
        self.consumer_header = (options.consumer_header.encode()
                                if options.consumer_header is not None else None)
        # name → the header value carrying it, made once (names are few and fixed).
        self.consumer_values = {name: header_value(name) for name in self.by_digest.values()}
        remove = set()
        if options.consumer_header is not None:
            remove.add(options.consumer_header.lower().encode())
        if self.header is not None and not options.forward_key:
            remove.add(self.header)
        self.remove = remove
        self.outcomes = Outcomes()

    def bind(self, services: Services, route: CompiledRoute) -> None:
        self.outcomes.bind(services, route.name, self.type)

    def presented(self, ctx: Context) -> bytes | None:
        """The key the request carries: the header's, else the query parameter's."""
        key = ctx.header(self.header) if self.header is not None else None
        if key is None and self.query is not None and ctx.query:
            key = query_value(ctx.query, self.query)
        return key or None

    def on_request(self, ctx: Context) -> Response | Pending | None:
        if self.remove:
            ctx.remove_request.update(self.remove)
        key = self.presented(ctx)
        if key is None:
            return self.outcomes.unauthorized(ctx, outcome.MISSING, self.challenge,
                                              "API key required")
        name = self.by_digest.get(hashlib.sha256(key.strip()).digest())
        if name is None:
            return self.outcomes.unauthorized(ctx, outcome.INVALID, self.challenge,
                                              "invalid API key")
        ctx.consumer = name
        if self.consumer_header is not None:
            value = self.consumer_values[name]
            if value is not None:
                ctx.set_request.append((self.consumer_header, value))
        self.outcomes.count(outcome.OK)
        return None

    def explain(self, ctx: Context, trusted: Any) -> str:
        where = " or ".join(w for w in (
            self.o.header and f"header {self.o.header}",
            self.o.query and f"query parameter {self.o.query}") if w)
        key = self.presented(ctx)
        if key is None:
            return f"401: needs an API key ({where})"
        name = self.by_digest.get(hashlib.sha256(key.strip()).digest())
        return f"passes; consumer {name}" if name is not None else "401: unknown API key"


def query_value(query: bytes, prefix: bytes) -> bytes | None:
    """The first value of the parameter ``prefix`` names (b"name="), form-decoded."""
    for pair in query.split(b"&"):
        if pair.startswith(prefix):
            return unquote_to_bytes(pair[len(prefix):].replace(b"+", b" "))
    return None
