"""Fixtures: real upstream servers on 127.0.0.1 and a proxyd Worker running in the test's loop."""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop
from aiohttp import web

from proxyd.config.models import GatewayConfig
from proxyd.proxy.pipeline import Pipeline
from proxyd.proxy.upstream import TargetPool
from proxyd.sockets import listen_socket
from proxyd.worker import Worker
from tests.functional._http import Message, RawHandler, RawUpstream


def free_port() -> int:
    """A port nothing listens on right now (for subprocesses that bind by number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_REFUSING: list[socket.socket] = []  # held while the tests run: see refused_url
atexit.register(lambda: [s.close() for s in _REFUSING])


def refused_url() -> str:
    """The URL of a port that refuses connections for as long as the tests run: bound, never
    listening, and held, so that no other process can take it meanwhile (a port found free
    and let go could be)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _REFUSING.append(s)
    return f"http://127.0.0.1:{s.getsockname()[1]}"


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


# -- aiohttp upstreams ---------------------------------------------------------------------------


@dataclass
class Seen:
    """What an aiohttp upstream received, recorded before its handler runs."""

    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    peer_port: int
    body: bytes | None = None  # filled by the echo handler

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def held(text: str = "finished") -> tuple[Handler, asyncio.Event]:
    """An aiohttp handler that answers ``text`` only once the event is set: an upstream the
    test keeps busy (a request in flight) and lets go of when it wants."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text=text)

    return handler, release
NAME = web.AppKey("name", str)
SEEN = web.RequestKey("seen", Seen)


@dataclass
class AioUpstream:
    name: str
    port: int
    runner: web.AppRunner
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def echo(request: web.Request) -> web.Response:
    """Describe the request as JSON; the body is hashed, and returned when small."""
    body = await request.read()
    seen: Seen = request[SEEN]
    seen.body = body
    return web.json_response(
        {
            "upstream": request.app[NAME],
            "method": request.method,
            "path": request.path_qs,
            "headers": seen.headers,
            "body": body.decode("latin-1") if len(body) <= 4096 else None,
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "peer_port": seen.peer_port,
        },
        headers={"X-Upstream": request.app[NAME]},
    )


class Upstreams:
    """Starts upstream servers for one test and stops them after it."""

    def __init__(self) -> None:
        self._aio: list[AioUpstream] = []
        self._raw: list[RawUpstream] = []

    async def aiohttp(self, handler: Handler = echo, name: str = "backend") -> AioUpstream:
        app = web.Application()
        app[NAME] = name
        upstream: AioUpstream

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
            seen = Seen(request.method, request.path_qs, headers, peer[1] if peer else 0)
            request[SEEN] = seen
            upstream.seen.append(seen)
            return await handler(request)

        app.middlewares.append(record)
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock)
        await site.start()
        upstream = AioUpstream(name, sock.getsockname()[1], runner)
        self._aio.append(upstream)
        return upstream

    async def raw(self, handler: RawHandler) -> RawUpstream:
        upstream = await RawUpstream(handler).start()
        self._raw.append(upstream)
        return upstream

    async def close(self) -> None:
        for raw in self._raw:
            await raw.close()
        for aio in self._aio:
            await aio.runner.cleanup()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The workers' own event loop, uvloop: its read path is not asyncio's (an upstream
    connection's reads land in a buffer of ours, upstream_conn.ReadBuffer). The pure-source
    pass of .ci/run sets PROXYD_TEST_LOOP=asyncio, so asyncio's path (data_received) is
    tested too."""
    if os.environ.get("PROXYD_TEST_LOOP", "uvloop") == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    factory = Upstreams()
    try:
        yield factory
    finally:
        await factory.close()


# -- the proxy under test --------------------------------------------------------------------------


@dataclass
class Proxy:
    worker: Worker
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pipeline(self) -> Pipeline:
        assert self.worker.pipeline is not None
        return self.worker.pipeline

    def target(self, upstream: str = "backend", index: int = 0) -> TargetPool:
        return self.pipeline.pools[upstream].targets[index]

    @property
    def dispatched(self) -> int:
        """Requests that got past parsing and framing checks (routed or answered)."""
        return self.pipeline.requests


StartProxy = Callable[..., Awaitable[Proxy]]


def build_config(
    port: int,
    routes: list[dict[str, Any]],
    upstreams: dict[str, Any] | None = None,
    *,
    limits: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    middleware: list[dict[str, Any]] | None = None,
    access_log: dict[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
    redis: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config dict; an upstream given as a URL string (or list of them) gets ``pool``.

    ``middleware`` is the top-level chain (routes override entries by type with a
    ``middleware`` key); ``access_log`` replaces the default (JSON lines on stdout).
    """
    ups: dict[str, Any] = {}
    for name, value in (upstreams or {}).items():
        if isinstance(value, dict):
            ups[name] = value
        else:
            targets = [value] if isinstance(value, str) else list(value)
            ups[name] = {"targets": targets, "pool": pool or {}}
    config: dict[str, Any] = {
        "server": {
            "listen": [f"127.0.0.1:{port}"],
            "workers": 1,
            "backlog": 128,
            "drain_timeout": "2s",
            "limits": limits or {},
            **(server or {}),
        },
        "upstreams": ups,
        "routes": routes,
    }
    if middleware is not None:
        config["middleware"] = middleware
    if access_log is not None:
        config["access_log"] = access_log
    if cache is not None:
        config["cache"] = cache
    if redis is not None:
        config["redis"] = redis
    if metrics is not None:
        config["metrics"] = metrics
    return config


@pytest.fixture
async def proxy(upstreams: Upstreams) -> AsyncIterator[StartProxy]:
    """``await proxy(routes, upstreams, limits=..., middleware=..., access_log=...)`` → a Proxy.

    Depends on ``upstreams`` so the proxy drains before the upstream servers stop.
    """
    started: list[Proxy] = []

    async def start(
        routes: list[dict[str, Any]], upstreams: dict[str, Any] | None = None, **kw: Any
    ) -> Proxy:
        sock = listen_socket("127.0.0.1", 0, 128)
        port = sock.getsockname()[1]
        try:
            config = GatewayConfig.model_validate(build_config(port, routes, upstreams, **kw))
            worker = Worker(config, [sock])
            await worker.start()
        except BaseException:
            sock.close()
            raise
        p = Proxy(worker, port)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            await p.worker.drain(1.0)


def route(name: str, upstream: str = "backend", **match: Any) -> dict[str, Any]:
    """A route dict; keyword arguments go to ``match`` except the route-level ones."""
    top: dict[str, Any] = {
        k: match.pop(k)
        for k in ("strip_prefix", "rewrite", "respond", "middleware", "cache") if k in match
    }
    r: dict[str, Any] = {"name": name, "match": match, **top}
    if "respond" not in top:
        r["upstream"] = upstream
    return r



CATCH_ALL = [route("all", path_prefix="/")]


def assert_json_error(resp: Message, status: int) -> dict[str, str]:
    assert resp.status == status, (resp.start, resp.body)
    assert resp.header("Content-Type") == "application/json"
    err: dict[str, str] = resp.json()
    assert set(err) == {"error", "request_id"}
    assert err["request_id"] == resp.header("X-Request-ID")
    return err
