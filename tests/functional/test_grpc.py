"""gRPC through proxyd, with grpcio on both sides (a real server and a real client, h2c):
the four kinds of call, statuses and trailers relayed, the client's deadline, proxyd's own
errors as gRPC statuses, a route per service, and a server that sends GOAWAY."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from tests.functional._h2client import H2Client
from tests.functional._h2server import H2Origin, H2Reply, H2Request
from tests.functional.conftest import StartProxy, refused_url, route

SERVICE = "test.Echo"


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"fail":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request.startswith(b"sleep"):
        time.sleep(float(request[5:]))
    context.set_trailing_metadata((("x-trailer", "kept"),))
    return b"echo:" + request


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"part %d" % i


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"|".join(requests)


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        yield request.upper()


HANDLERS = grpc.method_handlers_generic_handler(SERVICE, {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
    "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
    "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
})


@pytest.fixture
def grpc_server() -> Iterator[Callable[..., int]]:
    """``grpc_server(options=...)`` → the port of a real grpcio server (its own threads)."""
    servers: list[grpc.Server] = []

    def start(options: list[tuple[str, Any]] | None = None) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options or [])
        server.add_generic_rpc_handlers((HANDLERS,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(None).wait(5)


def grpc_routes() -> list[dict[str, Any]]:
    return [route("echo", "grpc", path_prefix=f"/{SERVICE}/")]


async def call(port: int, fn: Callable[[grpc.Channel], Any]) -> Any:
    """Run a blocking grpcio client call in a thread (the proxy runs in this loop)."""
    def run() -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return fn(channel)
    return await asyncio.to_thread(run)


async def test_four_kinds_of_call_and_trailers(proxy: StartProxy,
                                               grpc_server: Callable[..., int]) -> None:
    port = grpc_server()
    p = await proxy(grpc_routes(), {"grpc": {"targets": [f"http://127.0.0.1:{port}"],
                                             "protocol": "h2c"}})

    def unary(ch: grpc.Channel) -> tuple[bytes, Any]:
        response, state = ch.unary_unary(f"/{SERVICE}/Unary").with_call(b"hi", timeout=10)
        return response, dict(state.trailing_metadata())

    response, trailers = await call(p.port, unary)
    assert response == b"echo:hi"
    assert trailers["x-trailer"] == "kept"
    parts = await call(p.port, lambda ch: list(
        ch.unary_stream(f"/{SERVICE}/ServerStream")(b"5", timeout=10)))
    assert parts == [b"part %d" % i for i in range(5)]
    joined = await call(p.port, lambda ch: ch.stream_unary(f"/{SERVICE}/ClientStream")(
        iter([b"a", b"b", b"c"]), timeout=10))
    assert joined == b"a|b|c"
    upper = await call(p.port, lambda ch: list(ch.stream_stream(f"/{SERVICE}/Bidi")(
        iter([b"x", b"y", b"z"]), timeout=10)))
    assert upper == [b"X", b"Y", b"Z"]


async def test_status_relayed_and_deadline(proxy: StartProxy,
                                           grpc_server: Callable[..., int]) -> None:
    port = grpc_server()
    p = await proxy(grpc_routes(), {"grpc": {"targets": [f"http://127.0.0.1:{port}"],
                                             "protocol": "h2c"}})

    def status_of(request: bytes, timeout: float) -> Callable[[grpc.Channel], Any]:
        def fn(ch: grpc.Channel) -> Any:
            try:
                ch.unary_unary(f"/{SERVICE}/Unary")(request, timeout=timeout)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
            return grpc.StatusCode.OK, ""
        return fn

    code, details = await call(p.port, status_of(b"fail", 10))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "no such thing")
    code, _ = await call(p.port, status_of(b"sleep2", 0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_proxyd_errors_are_grpc_statuses(proxy: StartProxy,
                                               grpc_server: Callable[..., int]) -> None:
    port = grpc_server()
    p = await proxy(
        [*grpc_routes(), route("limited", "grpc", path_prefix="/test.Limited/",
                               middleware={"rate_limit": {"enabled": True, "rate": "1/m",
                                                      "burst": 1}}),
         route("dead", "dead", path_prefix="/test.Dead/")],
        {"grpc": {"targets": [f"http://127.0.0.1:{port}"], "protocol": "h2c"},
         "dead": {"targets": [refused_url()], "protocol": "h2c"}},
        middleware=[{"type": "rate_limit", "enabled": False, "rate": "1/m"}])

    def status_of(path: str) -> Callable[[grpc.Channel], Any]:
        def fn(ch: grpc.Channel) -> Any:
            try:
                ch.unary_unary(path)(b"x", timeout=10)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
            return grpc.StatusCode.OK, ""
        return fn

    code, details = await call(p.port, status_of("/test.Dead/Call"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "upstream connect failed" in details and "request id" in details
    code, _ = await call(p.port, status_of("/test.Nowhere/Call"))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    first, _ = await call(p.port, status_of("/test.Limited/Call"))
    assert first == grpc.StatusCode.UNIMPLEMENTED  # through to the server: no such service
    code, _ = await call(p.port, status_of("/test.Limited/Call"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_server_that_sends_goaway(proxy: StartProxy,
                                          grpc_server: Callable[..., int]) -> None:
    # The server ends each connection after 200 ms (GOAWAY, then a grace period): calls
    # made across those ends keep working, on new connections.
    port = grpc_server([("grpc.max_connection_age_ms", 200),
                        ("grpc.max_connection_age_grace_ms", 10000)])
    p = await proxy(grpc_routes(), {"grpc": {"targets": [f"http://127.0.0.1:{port}"],
                                             "protocol": "h2c"}})

    def many(ch: grpc.Channel) -> list[bytes]:
        out = []
        deadline = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < deadline:
            out.append(ch.unary_unary(f"/{SERVICE}/Unary")(b"%d" % i, timeout=10))
            i += 1
            time.sleep(0.02)
        return out

    results = await call(p.port, many)
    assert results == [b"echo:%d" % i for i in range(len(results))]
    target = p.target("grpc")
    assert target.opened_connections >= 2  # the server's GOAWAYs moved calls to new ones


async def test_compression_and_cache_leave_grpc_alone(proxy: StartProxy,
                                                      grpc_server: Callable[..., int]) -> None:
    port = grpc_server()
    p = await proxy(grpc_routes(), {"grpc": {"targets": [f"http://127.0.0.1:{port}"],
                                             "protocol": "h2c"}},
                    middleware=[{"type": "compression", "types": ["application/"],
                                 "min_size": 0},
                                {"type": "cache"}])

    def twice(ch: grpc.Channel) -> list[bytes]:
        method = ch.unary_unary(f"/{SERVICE}/Unary")
        big = b"z" * 4000  # compressible, were it compressed
        return [method(big + b"%d" % i, timeout=10, metadata=(("accept-encoding", "gzip"),))
                for i in range(2)]

    first, second = await call(p.port, twice)
    assert first.endswith(b"z0") and second.endswith(b"z1")  # each from the server


async def test_grpc_timeout_is_the_deadline_inside_proxyd(proxy: StartProxy) -> None:
    """A client that sends grpc-timeout but keeps no deadline of its own (a raw HTTP/2
    client), to a server that does not keep it either: proxyd ends the call itself, as
    DEADLINE_EXCEEDED, trailers-only, with its request id."""
    async def slow(req: H2Request) -> H2Reply:
        await asyncio.sleep(3)
        return H2Reply(200, [(b"content-type", b"application/grpc")], b"",
                       [(b"grpc-status", b"0")])

    origin = await H2Origin(slow).start()
    p = await proxy(grpc_routes(), {"grpc": {"targets": [origin.url], "protocol": "h2c"}})
    client = await H2Client.open(p.port)
    try:
        message = b"hello"
        started = time.monotonic()
        answer = await client.response(client.request(
            f"/{SERVICE}/Unary", "POST", headers=[
                ("content-type", "application/grpc"), ("te", "trailers"),
                ("grpc-timeout", "300m")],
            body=b"\x00" + len(message).to_bytes(4, "big") + message), timeout=10)
        assert time.monotonic() - started < 2.5  # well before the server's 3 s
        assert answer.status == 200
        fields = dict(answer.headers)
        assert fields[b"grpc-status"] == b"4"  # DEADLINE_EXCEEDED
        assert b"request id" in fields[b"grpc-message"]
        assert not answer.body and not answer.trailers  # trailers-only
    finally:
        await client.close()
        await origin.close()
