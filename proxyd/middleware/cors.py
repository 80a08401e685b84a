"""CORS (Fetch standard): preflights answered here, response headers for allowed origins.

Origins, methods and header lists are rendered to bytes once; per request the work is one
Origin lookup (a set hit, or a suffix test for ``https://*.example.com`` patterns).
"""

from __future__ import annotations

from proxyd.middleware.base import Context, Middleware, Pending, Response, json_response
from proxyd.middleware.element_options import CorsOptions


class Cors(Middleware):
    type = "cors"
    options_model = CorsOptions

    def __init__(self, options: CorsOptions) -> None:
        super().__init__(options)
        self.any_origin = "*" in options.allow_origins
        self.exact = {o.lower().encode() for o in options.allow_origins if "*" not in o}
        # "https://*.example.com" → (b"https://", b".example.com")
        self.patterns = [
            (o.split("*", 1)[0].lower().encode(), o.split("*", 1)[1].lower().encode())
            for o in options.allow_origins if o != "*" and "*" in o
        ]
        self.credentials = options.allow_credentials
        self.methods = {m.upper().encode() for m in options.allow_methods}
        self.methods_value = ", ".join(m.upper() for m in options.allow_methods).encode()
        self.any_header = "*" in options.allow_headers
        self.headers = {h.lower().encode() for h in options.allow_headers}
        self.expose = ", ".join(options.expose_headers).encode()
        self.max_age = str(int(options.max_age)).encode()
        # The answer depends on Origin unless it is a literal "*" for everyone.
        self.vary = not (self.any_origin and not self.credentials)

    def allowed(self, origin: bytes) -> bool:
        if self.any_origin:
            return True
        lower = origin.lower()
        if lower in self.exact:
            return True
        return any(lower.startswith(scheme) and lower.endswith(suffix)
                   and len(lower) > len(scheme) + len(suffix)
                   for scheme, suffix in self.patterns)

    def _allow_origin(self, origin: bytes) -> bytes:
        # A literal "*" only when any origin is fine and no credentials are involved; otherwise
        # echo the origin (and say Vary: Origin so caches keep answers apart).
        return b"*" if self.any_origin and not self.credentials else origin

    def on_request(self, ctx: Context) -> Response | Pending | None:
        if ctx.method != b"OPTIONS":  # only a preflight is answered here
            return None
        origin = ctx.header(b"origin")
        if origin is None:
            return None
        requested = ctx.header(b"access-control-request-method")
        if requested is None:
            return None  # a plain OPTIONS request, not a preflight
        if not self.allowed(origin):
            return json_response(403, "CORS origin not allowed", ctx.id())
        if requested.strip().upper() not in self.methods:
            return json_response(403, "CORS method not allowed", ctx.id())
        req_headers = ctx.header(b"access-control-request-headers") or b""
        names = [h.strip() for h in req_headers.split(b",") if h.strip()]
        if not self.any_header and any(n.lower() not in self.headers for n in names):
            return json_response(403, "CORS header not allowed", ctx.id())
        headers = [
            (b"Access-Control-Allow-Origin", self._allow_origin(origin)),
            (b"Access-Control-Allow-Methods", self.methods_value),
            (b"Access-Control-Max-Age", self.max_age),
            (b"Vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ]
        if names:
            headers.append((b"Access-Control-Allow-Headers", b", ".join(names)))
        if self.credentials:
            headers.append((b"Access-Control-Allow-Credentials", b"true"))
        return Response(204, headers, b"")

    def on_response(self, ctx: Context, resp: Response) -> None:
        if self.vary:
            resp.add_vary(b"Origin", b"origin")
        origin = ctx.header(b"origin")
        if origin is None or not self.allowed(origin):
            return
        if resp.has(b"access-control-allow-origin"):
            return  # preflight answered above, or the upstream does CORS itself
        resp.add(b"Access-Control-Allow-Origin", self._allow_origin(origin))
        if self.credentials:
            resp.add(b"Access-Control-Allow-Credentials", b"true")
        if self.expose:
            resp.add(b"Access-Control-Expose-Headers", self.expose)
