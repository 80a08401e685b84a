"""A pipelined RESP2 client for the rate limiter's one command: no task, no lock per request.

redis-py's asyncio client costs a pool checkout, a lock and a coroutine per command, which
measured more than the round trip itself (docs/performance.md). A rate check is one EVALSHA
whose reply is a flat array of integers, so the limiter speaks RESP itself: one connection per
worker, commands written as they come (pipelined), replies matched to callers in order and
handed to plain callbacks straight from ``data_received``.

Failure is the caller's business (the breaker and the fallback): a connection that fails,
closes, or lets its oldest command wait past that command's deadline fails every command on
it, since with pipelining the ones behind the oldest are stuck too; the next call reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
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


_TRUE = {"1", "true", "yes", "on", "y"}


class Target:
    """Where and how to connect, from a redis://, rediss:// or unix:// URL, read as redis-py's
    ``from_url`` reads it (the response cache hands the same URL to redis-py): user and
    password from the URL or ``?username=``/``?password=``, the database from ``?db=`` or a
    numeric path, and for rediss ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``,
    ``ssl_keyfile`` and ``ssl_check_hostname``. Raises ValueError on what cannot work (a missing
    certificate file too): config checks call it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        # parse_qs decodes; the first of repeated values wins, as in redis-py.
        query = {k: v[0] for k, v in parse_qs(parts.query).items() if v}
        self.scheme = parts.scheme
        if self.scheme not in ("redis", "rediss", "unix"):
            # (Never the URL itself in a message: it may hold a password.)
            raise ValueError("a Redis URL must start with redis://, rediss:// or unix://")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port of the Redis URL is not a number from 0 to 65535") \
                from None
        self.host = unquote(parts.hostname) if parts.hostname else "127.0.0.1"
        self.port = port or 6379
        self.path = unquote(parts.path) if self.scheme == "unix" else ""
        if self.scheme == "unix" and not self.path:
            raise ValueError("a unix:// Redis URL needs the socket's path")
        self.db = 0
        if "db" in query:
            try:
                self.db = int(query["db"])
            except ValueError:
                raise ValueError("the db of the Redis URL is not a number") from None
        elif self.scheme != "unix" and parts.path:
            with contextlib.suppress(ValueError):  # redis-py ignores a non-numeric path
                self.db = int(unquote(parts.path).replace("/", ""))
        self.username = unquote(parts.username) if parts.username else query.get("username")
        self.password = unquote(parts.password) if parts.password else query.get("password")
        self.ssl: ssl.SSLContext | None = None
        if self.scheme == "rediss":
            try:
                self.ssl = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"ssl_ca_certs {query.get('ssl_ca_certs')}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
            reqs = query.get("ssl_cert_reqs", "required").lower()
            if reqs not in ("none", "cert_none", "optional", "cert_optional", "required",
                            "cert_required"):
                raise ValueError("ssl_cert_reqs in the Redis URL must be none, optional or "
                                 "required")
            check = query.get("ssl_check_hostname", "true").lower() in _TRUE
            if reqs in ("none", "cert_none"):
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE
            else:
                self.ssl.check_hostname = check
                if reqs in ("optional", "cert_optional"):
                    self.ssl.verify_mode = ssl.CERT_OPTIONAL
            if "ssl_certfile" in query:  # a client certificate (Redis's tls-auth-clients)
                try:
                    self.ssl.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
                except (OSError, ssl.SSLError) as exc:
                    raise ValueError(f"ssl_certfile {query['ssl_certfile']}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None

    def handshake(self) -> list[bytes]:
        """Commands sent first on every connection (their replies must be OK)."""
        out = []
        if self.password:
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
        self.watch_at = 0.0
        self.on_lost = on_lost
        self.dead: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, payload: bytes, callback: Callback, deadline: float) -> None:
        if self.dead is not None or self.transport is None:
            deliver(callback, self.dead or ConnectionError("redis connection not open"))
            return
        self.waiting.append((callback, deadline))
        try:
            self.transport.write(payload)
        except Exception as exc:  # uvloop raises on a handle already closed
            self.fail(ConnectionError(f"redis connection unusable: {exc!r}"))
            return
        if self.watchdog is None or deadline < self.watch_at:
            # Limiters on different routes may have different timeouts: the watchdog keeps
            # the soonest deadline of all that wait, not just the oldest command's.
            if self.watchdog is not None:
                self.watchdog.cancel()
            self.watch_at = deadline
            self.watchdog = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self.watchdog = None
        if not self.waiting:
            return
        soonest = min(deadline for _, deadline in self.waiting)
        if soonest <= self.loop.time():
            # Replies come in order: a command past its time holds up every later one.
            self.fail(TimeoutError("redis did not answer in time"))
        else:
            self.watch_at = soonest
            self.watchdog = self.loop.call_at(soonest, self._check_deadline)

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
        # Calls made while connecting: (payload, callback, deadline, timeout).
        self._connecting: list[tuple[bytes, Callback, float, float]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def call(self, payload: bytes, callback: Callback, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._conn
        if conn is not None and (conn.dead is not None or conn.transport is None
                                 or conn.transport.is_closing()):
            # Redis sent EOF and connection_lost has not run yet: do not write into it.
            self._conn = conn = None
        if conn is not None:
            conn.send(payload, callback, deadline)
        elif self.closed:
            deliver(callback, ConnectionError("redis client closed"))
        elif self._connecting is not None:
            self._connecting.append((payload, callback, deadline, timeout))
        else:
            self._connecting = [(payload, callback, deadline, timeout)]
            task = loop.create_task(self._connect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _fail_connecting(self, exc: BaseException) -> None:
        queued, self._connecting = self._connecting or [], None
        for _, callback, _, _ in queued:
            deliver(callback, exc)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        t = self.target
        try:
            try:
                if t.scheme == "unix":
                    opening = loop.create_unix_connection(lambda: _Connection(self._lost),
                                                          t.path)
                else:
                    opening = loop.create_connection(lambda: _Connection(self._lost), t.host,
                                                     t.port, ssl=t.ssl)
                _, conn = await asyncio.wait_for(opening, self.connect_timeout)
            except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
                self._fail_connecting(ConnectionError(f"redis connect failed: {exc!r}"))
                return
            if self.closed or conn.dead is not None or conn.transport is None \
                    or conn.transport.is_closing():
                # Closed meanwhile, or Redis hung up at once (maxclients, protected mode).
                reason = ConnectionError("redis client closed" if self.closed else
                                         f"redis closed the new connection: {conn.dead!r}")
                conn.fail(reason)
                self._fail_connecting(reason)
                return
            queued, self._connecting = self._connecting or [], None
            self._conn = conn
            now = loop.time()
            for payload in t.handshake():
                conn.send(payload, functools.partial(self._handshake_reply, conn),
                          now + self.connect_timeout)
            for payload, callback, deadline, timeout in queued:
                # The wait for the connection does not eat into the command's own time: a
                # slow connect (TLS) must not fail every first batch, and so every probe.
                conn.send(payload, callback, max(deadline, now + timeout))
        finally:
            if self._connecting is not None:  # cancelled (close) or an unexpected error
                self._fail_connecting(ConnectionError("redis connect abandoned"))

    @staticmethod
    def _handshake_reply(conn: _Connection, reply: Any) -> None:
        if isinstance(reply, RespError):
            conn.fail(ConnectionError(f"redis refused the handshake: {reply}"))

    def _lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def close(self) -> None:
        self.closed = True
        if self._conn is not None:
            self._conn.fail(ConnectionError("redis client closed"))
        for task in list(self._tasks):
            task.cancel()
        self._fail_connecting(ConnectionError("redis client closed"))
