"""Building Context, Response and middleware directly, without a server."""

from __future__ import annotations

from typing import Any

from proxyd.config.models import GatewayConfig
from proxyd.middleware import REGISTRY
from proxyd.middleware.base import Context, Middleware, Response
from proxyd.middleware.services import Fallbacks, Services, WorkerCount
from proxyd.observe.metrics import WorkerMetrics
from proxyd.proxy.field_rules import TrustedProxies
from proxyd.proxy.router import CompiledRoute


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


def worker_services(workers: int = 1, trusted: tuple[str, ...] = (),
                    metrics_enabled: bool = True) -> Services:
    """A worker's services as Pipeline builds them, with no loop, pools or cache: what
    middleware that are bound outside a worker may use."""
    config = GatewayConfig.model_validate({"redis": {"url": "redis://127.0.0.1:1/0"}})
    return Services(config, None, WorkerMetrics(), metrics_enabled, TrustedProxies(trusted), {},
                    None, WorkerCount(workers), Fallbacks())


def route(name: str = "api") -> CompiledRoute:
    return CompiledRoute(name=name, upstream=None)


def counts(metrics: WorkerMetrics) -> dict[tuple[str, tuple[str, ...]], float]:
    """Every counter the worker's metrics hold, by (name, labels)."""
    return {(name, tuple(labels)): value
            for name, rows in metrics.snapshot({})["counters"].items()
            for labels, value in rows}
