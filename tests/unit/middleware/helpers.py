"""Building Context, Response and middleware directly, without a server."""

from __future__ import annotations

from typing import Any

from proxyd.middleware import REGISTRY
from proxyd.middleware.base import Context, Middleware, Response


def make_ctx(method: bytes = b"GET", path: bytes = b"/", query: bytes = b"",
             headers: list[tuple[bytes, bytes]] | None = None, *, host: bytes | None = b"app.test",
             client_ip: bytes = b"192.0.2.7", route: str = "api",
             request_id: str = "rid-generated") -> Context:
    return Context(method, path, query, host,
                   [(name.lower(), name, value) for name, value in headers or []],
                   client_ip, route, lambda: request_id)


def make(type_: str, **options: Any) -> Middleware:
    cls = REGISTRY[type_]
    return cls(cls.options_model.model_validate({"type": type_, **options}))


def response(status: int = 200, headers: list[tuple[bytes, bytes]] | None = None,
             body: bytes | None = None) -> Response:
    return Response(status, list(headers or []), body)


def values(resp: Response, lname: bytes) -> list[bytes]:
    return [v for n, v in resp.headers if n.lower() == lname]
