"""The rate limiter's connection to Redis: pipelined, no task and no lock per request.

redis-py's asyncio client costs a pool checkout, a lock, a coroutine and (called from the
middleware's protocol callbacks) a Task per command: measured, several times the client CPU
of this connection per check (docs/performance.md, "Costs behind the code"). So the
limiter keeps one connection per worker whose commands are written as they come (pipelined)
and whose replies are matched to callers in order and handed to plain callbacks straight
from ``data_received``. What is not specific to that stays redis-py's: the URL is read by
redis-py's ``parse_url`` and the TLS context built by its ``RedisSSLContext`` (so the cache's
client and this one read every URL alike), replies are parsed by hiredis (redis-py's own
fast parser), and error replies are redis-py's ``ResponseError``.

Failure is the caller's business (the breaker and the fallback): a connection that fails,
closes, or lets its oldest command wait past that command's deadline fails every command on
it, since with pipelining the ones behind the oldest are stuck too; the next call reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import ssl
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import RedisSSLContext, parse_url
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger("proxyd.rate_limit")

Callback = Callable[[Any], None]  # gets the reply, or an exception instance on failure


class ProtocolError(ConnectionError):
    """A reply that is not RESP: the connection cannot be trusted any more."""


INCOMPLETE: Any = object()


def reader() -> hiredis.Reader:
    """A RESP2 reply parser: bytes stay bytes, ``-ERR ...`` replies become ResponseError
    instances (returned, not raised: the connection itself is fine)."""
    return hiredis.Reader(protocolError=ProtocolError, replyError=ResponseError,
                          notEnoughData=INCOMPLETE)


def command(*args: bytes) -> bytes:
    """One command in RESP's request form (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RedisTarget:
    """Where and how to connect: a redis://, rediss:// or unix:// URL read by redis-py's
    ``parse_url`` (user and password from the URL or ``?username=``/``?password=``, the
    database from ``?db=`` or a numeric path), with redis-py's defaults, and for rediss the
    TLS context redis-py's ``RedisSSLContext`` builds from the URL's ``ssl_*`` options
    (``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_check_hostname``, ...). Certificate checks default to required, hostname
    included. Raises ValueError on what cannot work (a missing certificate file too): config
    checks call it. No message shows the URL: it may hold a password."""

    def __init__(self, url: str) -> None:
        try:
            options: dict[str, Any] = dict(parse_url(url))
        except ValueError as exc:
            raise ValueError(f"the Redis URL is not one redis-py reads: {exc}") from None
        options.pop("connection_class", None)
        self.scheme = url.partition(":")[0].lower()
        self.host: str = options.pop("host", "localhost")
        self.port: int = options.pop("port", 6379)
        self.path: str = options.pop("path", "") if self.scheme == "unix" else ""
        if self.scheme == "unix" and not self.path:
            raise ValueError("a unix:// Redis URL needs the socket's path")
        self.db: int = options.pop("db", 0)
        self.username: str | None = options.pop("username", None) or None
        self.password: str | None = options.pop("password", None) or None
        self.ssl: ssl.SSLContext | None = None
        if self.scheme == "rediss":
            # The names redis-py's SSLConnection takes, less their prefix.
            tls = {name[4:]: value for name, value in options.items()
                   if name.startswith("ssl_")}
            tls.setdefault("cert_reqs", "required")
            tls.setdefault("check_hostname", True)
            unknown = sorted(set(tls) - set(inspect.signature(RedisSSLContext).parameters))
            if unknown:  # redis-py's own client would fail on each connect
                raise ValueError("unknown TLS option in the Redis URL: "
                                 + ", ".join(f"ssl_{name}" for name in unknown))
            try:
                self.ssl = RedisSSLContext(**tls).get()
            except RedisError:
                raise ValueError("ssl_cert_reqs in the Redis URL must be none, optional or "
                                 "required") from None
            except (OSError, ssl.SSLError) as exc:
                files = " ".join(str(tls[n]) for n in ("ca_certs", "ca_path", "certfile",
                                                       "keyfile") if tls.get(n))
                raise ValueError(f"TLS files of the Redis URL ({files}): "
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
        self.reader = reader()
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
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        try:
            while True:
                reply = reader.gets()
                if reply is INCOMPLETE:
                    return
                if not waiting:
                    raise ProtocolError("a reply nobody asked for")
                deliver(waiting.popleft()[0], reply)
                if self.dead is not None:
                    return  # a callback failed the connection (a refused handshake)
        except ProtocolError as exc:
            self.fail(exc)

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
        # Every way the connection can end reaches the callers as a ConnectionError: a TLS
        # alert after the handshake (a client certificate refused under TLS 1.3) arrives
        # here as an SSLError, a reset as an OSError.
        if exc is None:
            exc = ConnectionError("redis closed the connection")
        elif not isinstance(exc, ConnectionError):
            exc = ConnectionError(f"redis connection lost: {exc!r}")
        self.fail(exc)


def deliver(callback: Callback, value: Any) -> None:
    try:
        callback(value)
    except Exception:  # one caller's bug must not break the replies of the others
        log.exception("rate limit reply callback failed")


class PipelinedClient:
    """Lazily connected; ``call`` never blocks and never raises: the callback learns all."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        self.target = RedisTarget(url)
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
        if isinstance(reply, ResponseError):
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
