"""The rate limiter's pipelined Redis client: replies, URLs, and a real redis-server.

A server that speaks broken RESP cannot be a real Redis: those two tests use a tiny asyncio
server on 127.0.0.1 that answers garbage.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ResponseError

from proxyd.middleware.rate_limit.gcra import Limit
from proxyd.middleware.rate_limit.redis_client import (
    INCOMPLETE,
    PipelinedClient,
    ProtocolError,
    RedisTarget,
    command,
    reader,
)
from proxyd.middleware.rate_limit.redis_store import KEY_PREFIX, RedisLimiter
from tests.redis_server import RedisServer, needs_redis, redis_server  # noqa: F401

# -- replies -------------------------------------------------------------------------------------

REPLY = b"*5\r\n:1\r\n:-42\r\n$3\r\nabc\r\n*2\r\n+OK\r\n$-1\r\n-ERR boom\r\n"


def test_every_reply_type() -> None:
    parser = reader()
    parser.feed(REPLY + b"*-1\r\n$0\r\n\r\n")
    value = parser.gets()
    assert value[:4] == [1, -42, b"abc", [b"OK", None]]
    assert isinstance(value[4], ResponseError) and str(value[4]) == "ERR boom"
    assert parser.gets() is None
    assert parser.gets() == b""
    assert parser.gets() is INCOMPLETE


def test_a_reply_waits_for_all_its_bytes_at_every_split() -> None:
    for cut in range(1, len(REPLY)):
        parser = reader()
        parser.feed(REPLY[:cut])
        assert parser.gets() is INCOMPLETE, cut
        parser.feed(REPLY[cut:])
        assert parser.gets()[0] == 1, cut


def test_what_is_not_resp_is_a_protocol_error() -> None:
    parser = reader()
    parser.feed(b"?what\r\n")
    with pytest.raises(ProtocolError):
        parser.gets()


def test_command_encoding() -> None:
    assert command(b"GET", b"k\r\n") == b"*2\r\n$3\r\nGET\r\n$3\r\nk\r\n\r\n"


# -- URLs -----------------------------------------------------------------------------------------


def test_target_reads_redis_urls_as_redis_py_does() -> None:
    t = RedisTarget("redis://127.0.0.1:6390/3")
    assert (t.host, t.port, t.db, t.password, t.ssl) == ("127.0.0.1", 6390, 3, None, None)
    assert t.handshake() == [command(b"SELECT", b"3")]
    t = RedisTarget("redis://us%40er:p%3Ass@redis.internal?db=2")
    assert (t.host, t.port, t.db) == ("redis.internal", 6379, 2)
    assert t.handshake() == [command(b"AUTH", b"us@er", b"p:ss"), command(b"SELECT", b"2")]
    assert RedisTarget("redis://:secret@h/0").handshake() == [command(b"AUTH", b"secret")]
    assert RedisTarget("redis://user:@h/0").handshake() == []  # an empty password: no AUTH
    assert RedisTarget("redis://h/not-a-number").db == 0  # ignored, as redis-py does
    t = RedisTarget("unix:///run/redis/redis.sock?db=1&password=pw&username=u&db=7")
    assert (t.scheme, t.path, t.db) == ("unix", "/run/redis/redis.sock", 1)  # first db wins
    assert t.handshake() == [command(b"AUTH", b"u", b"pw"), command(b"SELECT", b"1")]
    tls = RedisTarget("rediss://h:6380/0")
    assert tls.ssl is not None and tls.ssl.verify_mode == ssl.CERT_REQUIRED
    assert tls.ssl.check_hostname
    loose = RedisTarget("rediss://h/0?ssl_cert_reqs=none")
    assert loose.ssl is not None and loose.ssl.verify_mode == ssl.CERT_NONE
    by_ip = RedisTarget("rediss://10.0.0.5/0?ssl_check_hostname=false")
    assert by_ip.ssl is not None and not by_ip.ssl.check_hostname
    assert by_ip.ssl.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(("url", "message"), [
    ("http://:pw@h/0", r"must specify one of the following schemes \(redis://"),
    ("redis://:pw@h:port/0", "Port could not be cast to integer"),
    ("redis://:pw@h:99999/0", "Port out of range"),
    ("redis://h/0?db=x", "Invalid value for 'db'"),
    ("unix://", "socket's path"),
    ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem", "/nonexistent/ca.pem"),
    ("rediss://:pw@h/0?ssl_no_such_option=1", "unknown TLS option in the Redis URL: ssl_no_such"),
])
def test_target_rejects_what_cannot_work_without_showing_the_url(url: str, message: str
                                                                 ) -> None:
    with pytest.raises(ValueError, match=message) as info:
        RedisTarget(url)
    assert "pw" not in str(info.value)


def test_a_bad_url_fails_check_config_and_never_raises_at_request_time() -> None:
    from proxyd.config import ConfigError, load_config_text

    bad = 'redis:\n  url: "redis://:hunter2@h:port/0"\n'
    with pytest.raises(ConfigError) as info:
        load_config_text(bad + "cache:\n  backend: redis\n", "g.yaml")
    text = str(info.value)
    assert "g.yaml:2:8: redis.url: the Redis URL is not one redis-py reads: Port" in text
    assert "hunter2" not in text
    # Nothing reads it without a Redis backend: not checked (redis-py is not even imported).
    load_config_text(bad, "g.yaml")
    limiter = RedisLimiter("redis://h:port/0", [Limit(1, 1.0, 1)], 0.05)
    got: list[Any] = []

    async def request_once() -> None:
        limiter.request("k", got.append)

    asyncio.run(request_once())
    assert len(got) == 1 and isinstance(got[0], ConnectionError)


# -- against a real redis-server ------------------------------------------------------------------


class Replies:
    """Callbacks that record what they got, and a way to wait for all of them."""

    def __init__(self) -> None:
        self.got: dict[int, Any] = {}
        self.event = asyncio.Event()
        self.expected = 0

    def callback(self, i: int) -> Any:
        self.expected += 1

        def done(reply: Any) -> None:
            assert i not in self.got, f"reply {i} delivered twice"
            self.got[i] = reply
            if len(self.got) == self.expected:
                self.event.set()

        return done

    async def wait(self, timeout: float = 5.0) -> dict[int, Any]:
        await asyncio.wait_for(self.event.wait(), timeout)
        return self.got


async def ask(client: PipelinedClient, *args: bytes, timeout: float = 2.0) -> Any:
    """One command: its reply, or the exception delivered for it."""
    replies = Replies()
    client.call(command(*args), replies.callback(0), timeout)
    return (await replies.wait())[0]


async def until(condition: Any, timeout: float = 2.0) -> bool:
    """Wait for ``condition()`` to hold, up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@needs_redis
async def test_pipelined_replies_reach_their_callers_in_order(redis_server: RedisServer) -> None:  # noqa: F811
    client = PipelinedClient(redis_server.url, 1.0)
    replies = Replies()
    try:
        # All written before any reply arrives: one connection, matched by order.
        for i in range(300):
            client.call(command(b"ECHO", b"%d" % i), replies.callback(i), 2.0)
        got = await replies.wait()
        assert got == {i: b"%d" % i for i in range(300)}
        assert client._conn is not None and not client._conn.waiting
    finally:
        await client.close()


@needs_redis
async def test_error_replies_leave_the_connection_usable(redis_server: RedisServer) -> None:  # noqa: F811
    client = PipelinedClient(redis_server.url, 1.0)
    replies = Replies()
    try:
        client.call(command(b"NOSUCHCOMMAND"), replies.callback(0), 2.0)
        client.call(command(b"PING"), replies.callback(1), 2.0)
        got = await replies.wait()
        assert isinstance(got[0], ResponseError) and "unknown command" in str(got[0]).lower()
        assert got[1] == b"PONG"
    finally:
        await client.close()


@needs_redis
async def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, ("--requirepass", "s3cr:t"))
    server.start()
    try:
        good = PipelinedClient(f"redis://:s3cr%3At@127.0.0.1:{server.port}/5", 1.0)
        replies = Replies()
        good.call(command(b"SET", b"where", b"db5"), replies.callback(0), 2.0)
        good.call(command(b"CLIENT", b"INFO"), replies.callback(1), 2.0)
        got = await replies.wait()
        assert got[0] == b"OK" and b" db=5 " in got[1]
        await good.close()

        bad = PipelinedClient(f"redis://:wrong@127.0.0.1:{server.port}/0", 1.0)
        refused = await ask(bad, b"PING")
        assert isinstance(refused, ConnectionError) and "handshake" in str(refused)
        await bad.close()
    finally:
        server.stop()


@needs_redis
async def test_a_paused_redis_fails_every_waiting_call_at_its_deadline(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    client = PipelinedClient(redis_server.url, 0.5)
    assert redis_server.proc is not None
    try:
        await ask(client, b"PING", timeout=1.0)  # connected
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        replies = Replies()
        started = time.monotonic()
        for i in range(5):
            client.call(command(b"PING"), replies.callback(i), 0.2)
        got = await replies.wait(3.0)
        took = time.monotonic() - started
        assert all(isinstance(r, TimeoutError) for r in got.values()), got
        assert 0.15 < took < 1.5
        assert client._conn is None  # dropped: the next call connects afresh
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    try:
        assert await ask(client, b"PING") == b"PONG"
    finally:
        await client.close()


@needs_redis
async def test_a_killed_redis_fails_the_calls_then_a_restarted_one_serves(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    client = PipelinedClient(redis_server.url, 0.5)
    try:
        await ask(client, b"PING", timeout=1.0)
        redis_server.stop()
        got = await ask(client, b"PING", timeout=1.0)
        assert isinstance(got, ConnectionError), got
        # Nothing listens now: connecting fails fast, not at the deadline.
        started = time.monotonic()
        got = await ask(client, b"PING", timeout=5.0)
        assert isinstance(got, ConnectionError) and time.monotonic() - started < 1.0
        redis_server.start()
        assert await ask(client, b"PING", timeout=1.0) == b"PONG"
    finally:
        await client.close()


@needs_redis
async def test_close_fails_what_waits_and_what_comes_later(redis_server: RedisServer) -> None:  # noqa: F811
    client = PipelinedClient(redis_server.url, 1.0)
    replies = Replies()
    client.call(command(b"BLPOP", b"nothing", b"5"), replies.callback(0), 5.0)
    assert await until(lambda: client._conn is not None and client._conn.waiting)
    await client.close()
    client.call(command(b"PING"), replies.callback(1), 1.0)
    got = await replies.wait()
    assert all(isinstance(r, ConnectionError) for r in got.values()), got


@needs_redis
async def test_a_script_error_reaches_the_limiter_as_an_exception(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """A key of the wrong type makes the script fail: the caller sees ResponseError (and the
    middleware then answers from its fallback), and the connection stays usable."""
    limiter = RedisLimiter(redis_server.url, [Limit(10, 1.0, 10)], 0.5)
    helper = PipelinedClient(redis_server.url, 1.0)
    await ask(helper, b"LPUSH", f"{KEY_PREFIX}{{bad}}:0".encode(), b"x")
    try:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await limiter.check("bad")
        decisions = await limiter.check("good")
        assert decisions[0].allowed and decisions[0].remaining == 9
    finally:
        await limiter.close()
        await helper.close()


# -- a server that is not Redis -------------------------------------------------------------------


async def garbage_server(answer: bytes) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(answer)
        await writer.drain()
        await reader.read(100)  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"redis://127.0.0.1:{port}/0"


@pytest.mark.parametrize("answer", [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"+PONG\r\n+PONG\r\n"])
async def test_a_server_that_breaks_resp_fails_the_connection(answer: bytes) -> None:
    server, url = await garbage_server(answer)
    client = PipelinedClient(url, 1.0)
    try:
        got = await ask(client, b"PING")
        if answer.startswith(b"+PONG"):
            assert got == b"PONG"  # the first reply was asked for; the second was not
            assert await until(lambda: client._conn is None)
        else:
            assert isinstance(got, ProtocolError), got
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


@needs_redis
async def test_a_connection_redis_closes_is_replaced(redis_server: RedisServer) -> None:  # noqa: F811
    client = PipelinedClient(redis_server.url, 1.0)
    helper = PipelinedClient(redis_server.url, 1.0)
    try:
        first_id = await ask(client, b"CLIENT", b"ID")
        killed = await ask(helper, b"CLIENT", b"KILL", b"ID", b"%d" % first_id)
        assert killed == 1  # one connection killed: the client's
        # Once the EOF has arrived the dead connection is dropped; the next call gets a new one.
        assert await until(lambda: client._conn is None)
        new_id = await ask(client, b"CLIENT", b"ID")
        assert isinstance(new_id, int) and new_id != first_id, new_id
    finally:
        await client.close()
        await helper.close()


# -- failures that once left callers waiting forever (both event loops) ---------------------------


def on_both_loops(make: Any) -> None:
    """Run ``make()`` (a coroutine) on asyncio's loop and on uvloop's: they differ in how a
    write into a closed handle fails."""
    import uvloop

    for new_loop in (asyncio.new_event_loop, uvloop.new_event_loop):
        loop = new_loop()
        try:
            loop.run_until_complete(asyncio.wait_for(make(), 10))
        finally:
            loop.close()


@needs_redis
def test_redis_hanging_up_on_a_new_connection_answers_every_caller(tmp_path: Path) -> None:
    """A full Redis (maxclients) answers -ERR and closes at once: the calls queued while
    connecting fail quickly, on both loops, and a later call reconnects."""
    import socket

    server = RedisServer(tmp_path, ("--maxclients", "1"))
    server.start()
    hog = socket.create_connection(("127.0.0.1", server.port))  # takes the one slot
    try:
        async def calls() -> None:
            client = PipelinedClient(server.url, 0.5)
            try:
                for _ in range(2):
                    replies = Replies()
                    for i in range(3):
                        client.call(command(b"PING"), replies.callback(i), 1.0)
                    got = await replies.wait(3.0)
                    # The -ERR reply itself, or the connection's end: a failure for each.
                    assert all(isinstance(r, (ResponseError, ConnectionError))
                               for r in got.values()), got
            finally:
                await client.close()

        on_both_loops(calls)
    finally:
        hog.close()
        server.stop()


@needs_redis
def test_close_while_connecting_answers_the_queued_calls(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async def close_at_once() -> None:
        client = PipelinedClient(redis_server.url, 1.0)
        replies = Replies()
        client.call(command(b"PING"), replies.callback(0), 2.0)  # connect task not yet run
        await client.close()
        got = await replies.wait(2.0)
        assert isinstance(got[0], ConnectionError)

    on_both_loops(close_at_once)


@needs_redis
async def test_a_short_deadline_behind_a_long_one_is_kept(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Routes may set different redis_timeout values on one connection: a command with a
    short timeout queued behind one with a long timeout still fails at its own deadline."""
    client = PipelinedClient(redis_server.url, 1.0)
    assert redis_server.proc is not None
    try:
        await ask(client, b"PING", timeout=1.0)  # connected
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        replies = Replies()
        started = time.monotonic()
        client.call(command(b"PING"), replies.callback(0), 5.0)
        client.call(command(b"PING"), replies.callback(1), 0.2)
        got = await replies.wait(3.0)
        assert all(isinstance(r, TimeoutError) for r in got.values()), got
        assert time.monotonic() - started < 1.0
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        await client.close()


# -- TLS ------------------------------------------------------------------------------------------


@needs_redis
async def test_rediss_verifies_redis_and_presents_the_client_certificate(tmp_path: Path) -> None:
    """A real redis-server on TLS that requires a client certificate and a password: the
    URL's ssl_* options, read as redis-py reads them, decide what the limiter trusts and
    presents."""
    import socket

    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server_cert = ca.issue_cert("127.0.0.1")
    server_cert.private_key_pem.write_to_path(tmp_path / "server.key")
    server_cert.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    client_cert = ca.issue_cert("proxyd")
    client_cert.private_key_pem.write_to_path(tmp_path / "client.key")
    client_cert.cert_chain_pems[0].write_to_path(tmp_path / "client.pem")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        tls_port = s.getsockname()[1]
    server = RedisServer(tmp_path, (
        "--tls-port", str(tls_port), "--tls-cert-file", str(tmp_path / "server.pem"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "yes",
        "--requirepass", "s3cret"))
    server.start()
    base = f"rediss://:s3cret@127.0.0.1:{tls_port}/4"
    trust = f"ssl_ca_certs={tmp_path / 'ca.pem'}"
    present = f"ssl_certfile={tmp_path / 'client.pem'}&ssl_keyfile={tmp_path / 'client.key'}"
    try:
        client = PipelinedClient(f"{base}?{trust}&{present}", 2.0)
        try:
            info = await ask(client, b"CLIENT", b"INFO")
            assert b" db=4 " in info, info
        finally:
            await client.close()
        limiter = RedisLimiter(f"{base}?{trust}&{present}", [Limit(10, 1.0, 10)], 2.0)
        try:
            assert (await limiter.check("tls"))[0].remaining == 9
        finally:
            await limiter.close()
        for url in (f"{base}?{present}",  # Redis's certificate, not by a CA trusted here
                    f"{base}?{trust}"):  # no client certificate
            client = PipelinedClient(url, 2.0)
            try:
                got = await ask(client, b"PING", timeout=3.0)
                assert isinstance(got, ConnectionError), (url, got)
            finally:
                await client.close()
        # ssl_cert_reqs=none: no check of Redis's certificate (the client's is still sent).
        client = PipelinedClient(f"{base}?ssl_cert_reqs=none&{present}", 2.0)
        try:
            assert await ask(client, b"PING") == b"PONG"
        finally:
            await client.close()
    finally:
        server.stop()


# -- a restart under traffic ----------------------------------------------------------------------


@needs_redis
async def test_a_redis_restart_under_traffic_opens_the_breaker_and_it_closes_once_redis_is_back(
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Checks keep coming, as the middleware makes them, while Redis dies and comes back:
    every check is answered (by Redis, by a failure, or by the fallback while the breaker is
    open), the breaker opens once for the outage and closes once after it, with one warning
    each, and afterwards the checks are Redis's again."""
    # A killed Redis fails its checks at once (reset, refused): the timeout is generous so that
    # a busy machine cannot add a second outage.
    limiter = RedisLimiter(redis_server.url, [Limit(1_000_000, 1.0, 1_000_000)], 2.0)
    counts = {"asked": 0, "redis": 0, "failed": 0, "fallback": 0}
    stop = asyncio.Event()

    def check(i: int) -> None:
        counts["asked"] += 1
        if not limiter.breaker.allow():
            counts["fallback"] += 1
            return

        def answered(result: Any) -> None:
            if isinstance(result, BaseException):
                limiter.failure(result)
                counts["failed"] += 1
            else:
                limiter.success()
                counts["redis"] += 1

        limiter.request(f"k{i % 8}", answered)

    async def traffic() -> None:
        i = 0
        while not stop.is_set():
            for _ in range(8):  # a few at once: they share the connection's writes
                check(i)
                i += 1
            await asyncio.sleep(0.002)

    def answered() -> int:
        return counts["redis"] + counts["failed"] + counts["fallback"]

    caplog.set_level("WARNING", logger="proxyd.rate_limit")
    running = asyncio.get_running_loop().create_task(traffic())
    try:
        assert await until(lambda: counts["redis"] > 100, 10.0)
        redis_server.stop()
        assert await until(lambda: limiter.breaker.trips >= 1 and counts["fallback"] > 0, 10.0)
        await asyncio.to_thread(redis_server.start)
        served = counts["redis"]
        # The open time doubles per failed probe (0.5 s at first); the outage was short.
        assert await until(lambda: limiter.breaker.state == "closed"
                           and counts["redis"] > served + 100, 30.0), counts
    finally:
        stop.set()
        await running
    assert await until(lambda: answered() == counts["asked"], 5.0), counts
    await limiter.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in warnings) == 1, warnings
    assert sum("recovered" in m for m in warnings) == 1, warnings
