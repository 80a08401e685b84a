"""A pipelined RESP2 client for the rate limiter's one command: no task, no lock per request.

redis-py's asyncio client costs a pool checkout, a lock and a coroutine per command: on this
machine about 100 µs above the round trip itself, more than the round trip (issue 8). A rate
check is one EVALSHA whose reply is a flat array of integers, so the limiter speaks RESP
itself: one connection per worker, commands written as they come (pipelined), replies matched
to callers in order and handed to plain callbacks straight from ``data_received``.

Failure is the caller's business (the breaker and the fallback): a connection that fails,
closes, or lets its oldest command wait past that command's deadline fails every command on
it, since with pipelining the ones behind the oldest are stuck too; the next call reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("proxyd.rate_limit")

Callback = Callable[[Any], None]  # gets the reply, or an exception instance on failure


class RespError(Exception):
    """An error reply (``-ERR ...``, ``-NOSCRIPT ...``): the connection itself is fine."""


class ProtocolError(ConnectionError):
    """A reply that is not RESP: the connection cannot be trusted any more."""


INCOMPLETE: Any = object()


def parse(buf: bytearray, pos: int) -> Any:
    """One reply at ``pos``: (value, next position), or INCOMPLETE until more bytes come."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return INCOMPLETE
    kind = buf[pos]
    if kind == 58:  # ':' integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 42:  # '*' array
        count = int(buf[pos + 1:end])
        pos = end + 2
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item = parse(buf, pos)
            if item is INCOMPLETE:
                return INCOMPLETE
            items.append(item[0])
            pos = item[1]
        return items, pos
    if kind == 36:  # '$' bulk string
        size = int(buf[pos + 1:end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            return INCOMPLETE
        return bytes(buf[end + 2:stop]), stop + 2
    if kind == 43:  # '+' simple string
        return bytes(buf[pos + 1:end]), end + 2
    if kind == 45:  # '-' error
        return RespError(buf[pos + 1:end].decode("utf-8", "replace")), end + 2
    raise ProtocolError(f"not a RESP2 reply: {bytes(buf[pos:pos + 32])!r}")


def command(*args: bytes) -> bytes:
    """One command in RESP's request form (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class Target:
    """Where and how to connect, from a redis://, rediss:// or unix:// URL (as redis-py reads
    them: user and password, the database as the path or ``?db=``, and for rediss
    ``ssl_cert_reqs`` and ``ssl_ca_certs``)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.scheme = parts.scheme
        if self.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {self.scheme!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.path = unquote(parts.path) if self.scheme == "unix" else ""
        db = query.get("db") or (parts.path.strip("/") if self.scheme != "unix" else "")
        self.db = int(db or 0)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None
        self.ssl: ssl.SSLContext | None = None
        if self.scheme == "rediss":
            self.ssl = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
            reqs = query.get("ssl_cert_reqs", "required").lower()
            if reqs in ("none", "cert_none"):
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE
            elif reqs in ("optional", "cert_optional"):
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_OPTIONAL

    def handshake(self) -> list[bytes]:
        """Commands sent first on every connection (their replies must be OK)."""
        out = []
        if self.password is not None:
            auth = (self.username.encode(),) if self.username else ()
            out.append(command(b"AUTH", *auth, self.password.encode()))
        if self.db:
            out.append(command(b"SELECT", b"%d" % self.db))
        return out


class _Connection(asyncio.Protocol):
    """One TCP (or unix) connection: writes in order, replies to the oldest caller first."""

    def __init__(self, on_lost: Callable[[_Connection], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiting: collections.deque[tuple[Callback, float]] = collections.deque()
        self.watchdog: asyncio.TimerHandle | None = None
        self.on_lost = on_lost
        self.dead: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, payload: bytes, callback: Callback, deadline: float) -> None:
        assert self.transport is not None
        self.waiting.append((callback, deadline))
        self.transport.write(payload)
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self.watchdog = None
        if not self.waiting:
            return
        oldest = self.waiting[0][1]
        if oldest <= self.loop.time():
            self.fail(TimeoutError("redis did not answer in time"))
        else:
            self.watchdog = self.loop.call_at(oldest, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        waiting = self.waiting
        try:
            while waiting:
                item = parse(buf, pos)
                if item is INCOMPLETE:
                    break
                pos = item[1]
                callback = waiting.popleft()[0]
                deliver(callback, item[0])
                if self.dead is not None:
                    return  # a callback failed the connection (a refused handshake)
            if not waiting and len(buf) > pos:
                raise ProtocolError("a reply nobody asked for")
        except (ValueError, IndexError, ProtocolError) as exc:
            self.fail(ProtocolError(str(exc)))
            return
        del buf[:pos]

    def fail(self, exc: BaseException) -> None:
        """Every caller on this connection gets ``exc``; the connection is closed."""
        if self.dead is None:
            self.dead = exc
            self.on_lost(self)
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()
        waiting, self.waiting = self.waiting, collections.deque()
        while waiting:  # emptied as it goes: data_received may be iterating it
            deliver(waiting.popleft()[0], exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("redis closed the connection"))


def deliver(callback: Callback, value: Any) -> None:
    try:
        callback(value)
    except Exception:  # one caller's bug must not break the replies of the others
        log.exception("rate limit reply callback failed")


class RespClient:
    """Lazily connected; ``call`` never blocks and never raises: the callback learns all."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        self.target = Target(url)
        self.connect_timeout = connect_timeout
        self._conn: _Connection | None = None
        self._connecting: list[tuple[bytes, Callback, float]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def call(self, payload: bytes, callback: Callback, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._conn
        if conn is not None and conn.transport is not None and conn.transport.is_closing():
            # Redis sent EOF and connection_lost has not run yet: do not write into it.
            self._conn = conn = None
        if conn is not None:
            conn.send(payload, callback, deadline)
        elif self.closed:
            deliver(callback, ConnectionError("redis client closed"))
        elif self._connecting is not None:
            self._connecting.append((payload, callback, deadline))
        else:
            self._connecting = [(payload, callback, deadline)]
            task = loop.create_task(self._connect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        t = self.target
        try:
            if t.scheme == "unix":
                opening = loop.create_unix_connection(lambda: _Connection(self._lost), t.path)
            else:
                opening = loop.create_connection(lambda: _Connection(self._lost), t.host,
                                                 t.port, ssl=t.ssl)
            _, conn = await asyncio.wait_for(opening, self.connect_timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            queued, self._connecting = self._connecting or [], None
            for _, callback, _ in queued:
                deliver(callback, ConnectionError(f"redis connect failed: {exc!r}"))
            return
        queued, self._connecting = self._connecting or [], None
        if self.closed:
            conn.fail(ConnectionError("redis client closed"))
            for _, callback, _ in queued:
                deliver(callback, ConnectionError("redis client closed"))
            return
        self._conn = conn
        first = queued[0][2] if queued else loop.time() + self.connect_timeout
        for payload in t.handshake():
            conn.send(payload, self._handshake_reply, first)
        for payload, callback, deadline in queued:
            conn.send(payload, callback, deadline)

    def _handshake_reply(self, reply: Any) -> None:
        if isinstance(reply, BaseException):
            if isinstance(reply, RespError) and self._conn is not None:
                self._conn.fail(ConnectionError(f"redis refused the handshake: {reply}"))
            return

    def _lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def close(self) -> None:
        self.closed = True
        if self._conn is not None:
            self._conn.fail(ConnectionError("redis client closed"))
        for task in list(self._tasks):
            task.cancel()
