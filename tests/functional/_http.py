"""Byte-level HTTP/1.1 helpers for the functional tests: a raw client and a raw upstream side.

aiohttp is used wherever a test does not care about exact bytes; these helpers exist for the
cases where it must (pipelining, malformed requests, HEAD framing, 1xx, close-delimited bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

IO_TIMEOUT = 5.0  # any single read in a test; a hang fails fast instead of at the 120 s limit


@dataclass
class Message:
    """A parsed HTTP/1.1 message (request or response) as it appeared on the wire."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False
    raw_head: bytes = b""

    @property
    def status(self) -> int:
        return int(self.start.split(" ", 2)[1])

    @property
    def method(self) -> str:
        return self.start.split(" ", 1)[0]

    @property
    def target(self) -> str:
        return self.start.split(" ", 2)[1]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def has(self, name: str) -> bool:
        return self.header(name) is not None

    def json(self) -> Any:
        return json.loads(self.body)


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]], bytes]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw[:-4].decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    return lines[0], headers, raw


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n", "chunk not followed by CRLF"


async def read_message(
    reader: asyncio.StreamReader, *, is_response: bool, head_request: bool = False
) -> Message:
    start, headers, raw = await _read_head(reader)
    msg = Message(start, headers, raw_head=raw)
    await read_body(reader, msg, is_response=is_response, head_request=head_request)
    return msg


async def read_body(
    reader: asyncio.StreamReader, msg: Message, *, is_response: bool, head_request: bool = False
) -> None:
    te = (msg.header("transfer-encoding") or "").lower()
    length = msg.header("content-length")
    if is_response and (head_request or msg.status < 200 or msg.status in (204, 304)):
        return
    if te:
        assert te == "chunked", f"unexpected Transfer-Encoding {te!r}"
        msg.chunked = True
        msg.body = await _read_chunked(reader)
    elif length is not None:
        msg.body = await reader.readexactly(int(length))
    elif is_response:
        msg.body = await reader.read()  # close-delimited


class RawClient:
    """One client connection to the proxy, written and read as bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head: bool = False, timeout: float = IO_TIMEOUT) -> Message:
        async with asyncio.timeout(timeout):
            return await read_message(self.reader, is_response=True, head_request=head)

    async def request(self, data: bytes, *, head: bool = False) -> Message:
        await self.send(data)
        return await self.response(head=head)

    async def read_to_eof(self, timeout: float = IO_TIMEOUT) -> bytes:
        """Everything until the proxy closes; fails if it does not close within ``timeout``."""
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def get(path: str = "/", host: str = "test", extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


# -- the upstream side --------------------------------------------------------------------------

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawConn"], Awaitable[None]]


@dataclass
class RawConn:
    """One connection accepted by a raw upstream; ``index`` counts from 0 in accept order."""

    index: int
    peer_port: int
    requests: int = 0
    eof: asyncio.Event = field(default_factory=asyncio.Event)  # the proxy closed it
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the handler returned


class RawUpstream:
    """An asyncio server whose handler writes exact response bytes."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.conns: list[RawConn] = []
        self.requests: list[Message] = []  # filled by handlers that use self.read_request
        self.partial: list[bytes] = []  # requests cut off by EOF (bytes that did arrive)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def read_request(
        self, reader: asyncio.StreamReader, conn: RawConn | None = None
    ) -> Message | None:
        """The next request on a connection, or None at a clean EOF before one started."""
        msg: Message | None = None
        try:
            start, headers, raw = await _read_head(reader)
            msg = Message(start, headers, raw_head=raw)
            await read_body(reader, msg, is_response=False)
        except asyncio.IncompleteReadError as exc:
            got = (msg.raw_head if msg is not None else b"") + exc.partial
            if got:
                self.partial.append(got)
            if conn is not None:
                conn.eof.set()
            return None
        self.requests.append(msg)
        if conn is not None:
            conn.requests += 1
        return msg

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = RawConn(len(self.conns), writer.get_extra_info("peername")[1])
        self.conns.append(conn)
        try:
            await self.handler(reader, writer, conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # close() at teardown; a cancelled task here would be logged by asyncio
        finally:
            self._tasks.discard(task)
            conn.done.set()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()


async def serve_keepalive(
    upstream: RawUpstream,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: RawConn,
    respond: Callable[[Message, RawConn], bytes],
) -> None:
    """Answer requests on one connection with ``respond(request)`` bytes until EOF."""
    while (req := await upstream.read_request(reader, conn)) is not None:
        writer.write(respond(req, conn))
        await writer.drain()

