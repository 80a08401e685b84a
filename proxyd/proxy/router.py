"""Route table compiled once per config: first match in file order.

Paths are matched in their normal form (path.py): the request's, and the configured ones.

Matching is host → path → headers → method; a request whose host/path/headers match a route but
whose method does not is remembered so the caller can answer 405 with ``Allow`` instead of 404.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from proxyd.config.models import Respond, Route, WebSocket
from proxyd.middleware.base import Response
from proxyd.middleware.chain import Chain
from proxyd.proxy.head import CRLF, fixed_head
from proxyd.proxy.path import BadPath, normalize_path
from proxyd.proxy.path import remove_dot_segments as remove_dot_segments  # for explain

if TYPE_CHECKING:
    from proxyd.proxy.upstream import Timeouts


@dataclass(eq=False)
class CompiledRoute:
    name: str
    upstream: str | None
    host: bytes | None = None  # exact, lowercase, without port
    host_suffix: bytes | None = None  # "*.example.com" → b".example.com"
    path: bytes | None = None
    prefix: bytes | None = None
    regex: re.Pattern[bytes] | None = None
    methods: frozenset[bytes] | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    strip_prefix: bytes | None = None
    rewrite: tuple[re.Pattern[bytes], bytes] | None = None
    respond: DirectResponse | None = None
    websocket: WebSocket | None = None  # options when upgrades are relayed
    allow_header: bytes = b""
    config: Route | None = field(default=None, repr=False)
    chain: Chain = field(default_factory=lambda: Chain([]), repr=False)
    timeouts: Timeouts | None = None  # route-level timeouts merged into its upstream's (pipeline)

    def matches_without_method(
        self, host: bytes | None, path: bytes, headers: dict[bytes, bytes]
    ) -> bool:
        if self.host is not None and host != self.host:
            return False
        if self.host_suffix is not None and (host is None or not host.endswith(self.host_suffix)):
            return False
        if self.path is not None and path != self.path:
            return False
        if self.prefix is not None and not path.startswith(self.prefix):
            return False
        if self.regex is not None and self.regex.search(path) is None:
            return False
        if not self.headers:
            return True  # (the usual route: no generator for an empty all())
        return all(headers.get(name) == value for name, value in self.headers)

    def rewrite_path(self, path: bytes) -> bytes:
        if self.strip_prefix is not None and path.startswith(self.strip_prefix):
            path = path[len(self.strip_prefix):]
            if not path.startswith(b"/"):
                path = b"/" + path
        if self.rewrite is not None:
            regex, replacement = self.rewrite
            path = regex.sub(replacement, path, count=1)
        return path


# What a respond body or header value may take from the request (Respond's description).
PLACEHOLDERS: Final = (b"{scheme}", b"{host}", b"{path}", b"{query}", b"{request_id}")


class DirectResponse:
    """A ``respond:`` route's answer, rendered to bytes once at config load; one with
    placeholders (``templated``) is filled in per request instead, by ``filled``."""

    def __init__(self, cfg: Respond) -> None:
        body = cfg.body.encode()
        names = {k.lower() for k in cfg.headers}
        self._fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in cfg.headers.items()]
        if "content-type" not in names and body:
            self._fields.append((b"Content-Type", b"text/plain; charset=utf-8"))
        self.status = cfg.status
        # Without the final CRLF: Connection may follow.
        self.head = fixed_head(cfg.status, self._fields, len(body))
        self.body = body
        texts = [body] + [value for _, value in self._fields]
        self.templated = any(mark in text for text in texts for mark in PLACEHOLDERS)

    def response(self, values: tuple[bytes, ...] | None = None) -> Response:
        """A fresh copy for a route with middleware, which may edit it; ``values`` fill in
        the placeholders of a templated one."""
        if values is not None:
            fields, body = self.filled(values)
            return Response(self.status, fields, body)
        return Response(self.status, list(self._fields), self.body)

    def render(self, *, close: bool, head_only: bool) -> bytes:
        tail = b"Connection: close\r\n\r\n" if close else CRLF
        return self.head + tail if head_only else self.head + tail + self.body

    def filled(self, values: tuple[bytes, ...]) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The fields and body with PLACEHOLDERS replaced by ``values``, in that order."""
        fields = [(name, _fill(value, values)) for name, value in self._fields]
        return fields, _fill(self.body, values)

    def render_filled(self, values: tuple[bytes, ...], *, close: bool, head_only: bool
                      ) -> tuple[bytes, int]:
        """A templated answer's bytes for one request, and its body's length."""
        fields, body = self.filled(values)
        tail = b"Connection: close\r\n\r\n" if close else CRLF
        head = fixed_head(self.status, fields, len(body)) + tail
        return (head, 0) if head_only else (head + body, len(body))


def _fill(text: bytes, values: tuple[bytes, ...]) -> bytes:
    if b"{" not in text:
        return text
    for i, mark in enumerate(PLACEHOLDERS):
        text = text.replace(mark, values[i])
    return text


def _host_bytes(host: str | None) -> tuple[bytes | None, bytes | None]:
    if host is None:
        return None, None
    host = host.lower()
    if host.startswith("*."):
        return None, host[1:].encode()
    return host.encode(), None


def _route_path(path: str | None) -> bytes | None:
    """A configured path or prefix in the form request paths are matched in (path.py), so
    ``/%7euser/`` still matches the ``/~user/`` that a request for it is normalised to."""
    if path is None:
        return None
    raw = path.encode()
    if not raw.startswith(b"/"):
        return raw  # request paths all start with "/": nothing to line up with
    try:
        return normalize_path(raw, keep_slashes=True)
    except BadPath:
        return raw  # no request path normalises to it: the route never matches, as written


def compile_route(route: Route) -> CompiledRoute:
    m = route.match
    host, suffix = _host_bytes(m.host)
    rewrite = None
    if route.rewrite is not None:
        # Python's \1 and \g<name> work as written; "$1" is accepted for nginx habits.
        replacement = re.sub(r"\$(\d+)", r"\\\1", route.rewrite.replacement)
        rewrite = (re.compile(route.rewrite.regex.encode()), replacement.encode())
    methods = frozenset(x.encode() for x in m.methods) if m.methods else None
    if methods is not None and b"GET" in methods:
        methods = methods | {b"HEAD"}  # HEAD is GET without a body (RFC 9110 §9.3.2)
    return CompiledRoute(
        name=route.name,
        upstream=route.upstream,
        host=host,
        host_suffix=suffix,
        path=_route_path(m.path),
        prefix=_route_path(m.path_prefix),
        regex=re.compile(m.path_regex.encode()) if m.path_regex is not None else None,
        methods=methods,
        headers=tuple((k.lower().encode(), v.encode()) for k, v in (m.headers or {}).items()),
        strip_prefix=route.strip_prefix.encode() if route.strip_prefix else None,
        rewrite=rewrite,
        respond=DirectResponse(route.respond) if route.respond is not None else None,
        websocket=route.websocket if route.websocket.enabled else None,
        allow_header=b"Allow: " + b", ".join(sorted(methods)) + CRLF if methods else b"",
        config=route,
    )


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = [compile_route(r) for r in routes]
        self.needs_headers = any(r.headers for r in self.routes)

    def match(
        self, method: bytes, host: bytes | None, path: bytes, headers: dict[bytes, bytes]
    ) -> tuple[CompiledRoute | None, CompiledRoute | None]:
        """(route, None) on a match; (None, first route that only missed on method) otherwise."""
        wrong_method: CompiledRoute | None = None
        for route in self.routes:
            if not route.matches_without_method(host, path, headers):
                continue
            if route.methods is None or method in route.methods:
                return route, None
            if wrong_method is None:
                wrong_method = route
        return None, wrong_method


def normalize_host(value: bytes | None) -> bytes | None:
    """Host header → lowercase name without port, for matching."""
    if not value:
        return None
    value = value.lower()
    if value.startswith(b"["):
        end = value.find(b"]")
        return value[: end + 1] if end > 0 else value
    colon = value.rfind(b":")
    return value[:colon] if colon >= 0 else value
