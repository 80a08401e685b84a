"""An answer given before the request body was read reaches a client that is still sending.

Closing a socket with unread bytes in its receive queue makes the kernel send a reset, which can
destroy the answer before the client reads it. proxyd closes such a connection in stages
(RFC 9112 §9.6): the answer, a half-close, then it reads and drops what still arrives, then the
close. The client here behaves like urllib: it sends its whole body first, then reads.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from tests.functional._http import RawConn
from tests.functional.conftest import CATCH_ALL, StartProxy, Upstreams, route

BODY = 2 * 1024 * 1024  # over the 1 MiB limit below
TRIES = 6


def send_all_then_read(port: int, head: bytes, body_size: int, chunked: bool = False) -> bytes:
    """Send the head and the whole body (as a client without Expect does), then read the
    answer to EOF. A reset on the way is returned as a marker, not raised."""
    piece = b"x" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        try:
            s.sendall(head)
            sent = 0
            while sent < body_size:
                n = min(len(piece), body_size - sent)
                s.sendall(b"%x\r\n%b\r\n" % (n, piece[:n]) if chunked else piece[:n])
                sent += n
            if chunked:
                s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may stop reading; what matters is whether the answer arrives
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            return got + b"<reset>"
        return got


def post(path: str, length: int | None) -> bytes:
    framing = (b"Content-Length: %d\r\n" % length) if length is not None \
        else b"Transfer-Encoding: chunked\r\n"
    return b"POST %b HTTP/1.1\r\nHost: test\r\n%b\r\n" % (path.encode(), framing)


async def tries(port: int, head: bytes, chunked: bool = False) -> list[bytes]:
    return [await asyncio.to_thread(send_all_then_read, port, head, BODY, chunked)
            for _ in range(TRIES)]


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_413_reaches_a_client_still_sending(upstreams: Upstreams, proxy: StartProxy,
                                                  chunked: bool) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"max_body_size": "1MiB"})
    answers = await tries(p.port, post("/upload", None if chunked else BODY), chunked)
    assert [status_of(a) for a in answers] == [413] * TRIES, answers
    assert all(b"Connection: close" in a and not a.endswith(b"<reset>") for a in answers)
    if not chunked:
        assert up.seen == []  # refused on its head: nothing reached the upstream


async def test_404_with_a_body_reaches_the_client(proxy: StartProxy) -> None:
    p = await proxy([route("only", path="/only", respond={"status": 200, "body": "x"})])
    answers = await tries(p.port, post("/elsewhere", BODY))
    assert [status_of(a) for a in answers] == [404] * TRIES, answers


async def test_upstream_answer_before_the_body_reaches_the_client(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    """The origin answers 401 from the head alone and closes: proxyd relays it, and the
    client, still sending its body, gets it."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n"
                     b"Connection: close\r\n\r\nnope")
        await writer.drain()
        # Read the rest so that this side's own close is no reset: the test is the proxy.
        while await reader.read(65536):
            pass

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    answers = await tries(p.port, post("/upload", BODY))
    assert [status_of(a) for a in answers] == [401] * TRIES, answers
    assert all(a.endswith(b"nope") for a in answers)


async def test_lingering_close_is_bounded(upstreams: Upstreams, proxy: StartProxy) -> None:
    """A client that announced a huge body and sends it slowly forever is not read forever:
    after the answer, the connection closes within the lingering limits."""
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"max_body_size": "1KiB"})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(post("/upload", 10**9))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413 ")
    started = time.monotonic()
    # The half-close comes after the answer: the client reads EOF while it still sends.
    await asyncio.wait_for(reader.read(), 5)
    assert reader.at_eof()
    # Keep sending a trickle; proxyd reads it, and closes once the client stops for longer
    # than the lingering timeout (5 s) — well before the test's own limit.
    deadline = started + 20
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        while time.monotonic() < deadline:
            writer.write(b"x" * 100)
            await writer.drain()
            await asyncio.sleep(0.5 if time.monotonic() - started < 2 else 6)
    writer.close()
