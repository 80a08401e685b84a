"""The PROXY protocol (HAProxy's, versions 1 and 2): the client's address, sent ahead of the
first byte of HTTP by a load balancer in front of proxyd, and by proxyd to an upstream.

A listener with ``proxy_protocol`` reads the header before the parser sees a byte: from a
peer in ``proxy_protocol_from`` it is required (no header, or a bad one, closes the
connection), from anyone else it is refused (a client must not choose its own address). The
address it carries becomes the connection's client address: the one the access log, rate
limits, ``ip_access`` and X-Forwarded-For use.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxyd.listener_tls import Handshakes
from proxyd.observe.metrics import WorkerMetrics
from proxyd.observe.throttle import ThrottledLog

if TYPE_CHECKING:
    from proxyd.proxy.connection import ClientConnection
    from proxyd.proxy.field_rules import TrustedProxies

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the longest v1 line, CRLF included (the specification's bound)
V2_MAX: Final = 16 + 65535
# Out of descriptors (or kernel memory), accepting fails while the socket stays readable: the
# gate stops watching it for this long instead of spinning on it.
ACCEPT_PAUSE: Final = 0.1
_OUT_OF: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ProxyHeaderError(Exception):
    """Not a valid PROXY protocol header."""


# What parse() finds: None while the header is incomplete; else (client address or None for
# "the peer itself" (LOCAL, UNKNOWN), the header's length).
Parsed = tuple[str | None, int] | None


def parse(data: bytes) -> Parsed:
    if data.startswith(V2_SIGNATURE[:len(data)]) and len(data) < len(V2_SIGNATURE):
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if V1_PREFIX.startswith(data[:6]) and len(data) < 6:
        return None
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> Parsed:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    words = data[:end].split(b" ")
    if len(words) >= 2 and words[1] == b"UNKNOWN":
        return None, end + 2
    if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        src = ipaddress.ip_address(words[2].decode("ascii"))
        ipaddress.ip_address(words[3].decode("ascii"))
        ports = [int(w) for w in words[4:6]]
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("malformed PROXY v1 addresses") from None
    if (src.version == 4) != (words[1] == b"TCP4") or not all(0 <= p <= 65535 for p in ports):
        raise ProxyHeaderError("malformed PROXY v1 addresses")
    return str(src), end + 2


def _parse_v2(data: bytes) -> Parsed:
    if len(data) < 16:
        return None
    version_command, family, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if version_command >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY protocol version")
    total = 16 + length
    if len(data) < total:
        return None
    command = version_command & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection (a health check)
        return None, total
    if command != 1:
        raise ProxyHeaderError("unknown PROXY v2 command")
    body = data[16:total]
    if family >> 4 == 1 and len(body) >= 12:  # AF_INET
        return socket.inet_ntop(socket.AF_INET, body[:4]), total
    if family >> 4 == 2 and len(body) >= 36:  # AF_INET6
        return str(ipaddress.ip_address(body[:16])), total
    if family >> 4 in (0, 3):  # UNSPEC, or a unix socket: no address to use
        return None, total
    raise ProxyHeaderError("malformed PROXY v2 addresses")


def header_v1(src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    family = b"TCP6" if ":" in src else b"TCP4"
    if (":" in dst) != (":" in src):
        return b"PROXY UNKNOWN\r\n"
    return b"PROXY %b %b %b %d %d\r\n" % (family, src.encode(), dst.encode(), src_port, dst_port)


def header_v2(src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    if (":" in dst) != (":" in src):
        return V2_SIGNATURE + b"\x21\x00\x00\x00"  # PROXY, UNSPEC: no usable addresses
    if ":" in src:
        body = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
                + struct.pack("!HH", src_port, dst_port))
        return V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(body)) + body
    body = (socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", src_port, dst_port))
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


PROXY_ERRORS: Final = ThrottledLog(logging.getLogger("proxyd.proxy_protocol"))


def refused(metrics: WorkerMetrics, ip: str, reason: str) -> None:
    """A connection closed for its PROXY protocol header (missing, malformed, unwelcome):
    counted and logged (throttled), whichever listener it came to."""
    metrics.client_limits.inc(("proxy_protocol",))
    PROXY_ERRORS.warning("closing a connection from %s: %s", ip, reason)


class ListenerPolicy:
    """A PROXY protocol listener's rule: whose header is required, whose refused."""

    __slots__ = ("trusted",)

    def __init__(self, trusted: TrustedProxies) -> None:
        self.trusted = trusted


class HeaderReader:
    """Stands in for a connection's HTTP parser until the PROXY header is read (or refused);
    then hands the connection, and the bytes after the header, to a fresh HTTP parser."""

    __slots__ = ("buffer", "ds", "required")

    def __init__(self, ds: ClientConnection, required: bool) -> None:
        self.ds = ds
        self.required = required
        self.buffer = b""

    def feed_data(self, data: bytes) -> None:
        ds = self.ds
        buffer = self.buffer = self.buffer + data
        if not self.required:
            # Not a peer that may send one: a header from it is refused (it would choose its
            # own address); anything else is HTTP. Decided on the first bytes.
            for signature in (V1_PREFIX, V2_SIGNATURE):
                n = min(len(buffer), len(signature))
                if buffer[:n] == signature[:n]:
                    if n == len(signature):
                        ds.refuse_proxy_header("PROXY protocol header from an untrusted peer")
                    return  # refused, or too short to tell yet
            self._to_http(buffer)
            return
        try:
            parsed = parse(buffer)
        except ProxyHeaderError as exc:
            ds.refuse_proxy_header(str(exc))
            return
        if parsed is None:
            if len(buffer) > V2_MAX:
                ds.refuse_proxy_header("PROXY protocol header too long")
            return
        address, length = parsed
        if address is not None:
            ds.set_client_address(address)
        self._to_http(buffer[length:])

    def _to_http(self, rest: bytes) -> None:
        """From here on the connection is HTTP: what followed the header is parsed as if it
        had just arrived (so a parser error's offsets are the offsets into it)."""
        ds = self.ds
        ds.parser = httptools.HttpRequestParser(ds)
        self.buffer = b""
        if rest:
            ds.parsing = False
            ds.data_received(rest)


class TLSGate:
    """Accepts for a TLS listener, and sees each handshake's end.

    Each accepted socket's handshake is awaited (``connect_accepted_socket``), because that is
    the one place either event loop tells how it ended: a server's own accept path reports a
    failed handshake nowhere (the protocol never hears of the connection, and the loop's
    exception handler is not called for an ``OSError``, which ``ssl.SSLError`` is). So every
    outcome is counted, by reason or TLS version, and a failure logged with the client's
    address (``Handshakes``); the cost is a task per connection, not per request.

    With the PROXY protocol (``policy``) the header comes before the TLS handshake, so it
    must be taken off the socket before TLS reads a byte: each new connection's bytes are
    peeked at, and exactly the header's are consumed (bytes peeked before the header is
    complete all belong to it, so they are consumed as they come: no busy loop on a slow
    sender). Then the socket goes to the handshake, with the header's address as its client's.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 make: Callable[[], ClientConnection], ctx: ssl.SSLContext,
                 policy: ListenerPolicy | None, header_timeout: float,
                 refuse: Callable[[str, str], None], outcomes: Handshakes) -> None:
        self.loop = loop
        self.sock = sock
        self.make = make
        self.ctx = ctx
        self.policy = policy
        self.timeout = header_timeout or None
        self.refuse = refuse
        self.outcomes = outcomes
        self.pending: dict[int, _Pending] = {}  # by descriptor: connections still at the header
        self.handshakes: set[asyncio.Task[object]] = set()
        self.paused: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.paused = None
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting; this worker's copy of the socket goes (as a server's close)."""
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def busy(self) -> bool:
        return bool(self.pending) or any(not t.done() for t in self.handshakes)

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError as exc:
                if exc.errno in _OUT_OF:  # the rest stays queued; try again shortly
                    self.loop.remove_reader(self.sock.fileno())
                    self.paused = self.loop.call_later(ACCEPT_PAUSE, self.start)
                if exc.errno == errno.ECONNABORTED:
                    continue  # gone before it was accepted: the next one
                return  # none left (EAGAIN)
            self.admit(conn, addr[0])

    def admit(self, conn: socket.socket, ip: str) -> None:
        conn.setblocking(False)
        if self.policy is None:
            self._handshake(conn, ip, None)
            return
        pending = _Pending(conn, ip, ip in self.policy.trusted)
        if self.timeout:
            pending.timer = self.loop.call_later(self.timeout, self._drop, pending,
                                                 "no PROXY protocol header in time")
        self.pending[conn.fileno()] = pending
        self.loop.add_reader(conn.fileno(), self._readable, pending)

    def _readable(self, pending: _Pending) -> None:
        conn = pending.conn
        try:
            data = conn.recv(V2_MAX, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._drop(pending, None)
            return
        if not data:
            self._drop(pending, None)  # closed before the header
            return
        if not pending.required:
            # A TLS client's first byte is a handshake record (0x16): "P" or CR is a header.
            if data[:1] in (b"P", b"\r"):
                self._drop(pending, "PROXY protocol header from an untrusted peer")
            else:
                self._hand_off(pending, None)
            return
        whole = pending.buffer + data
        try:
            parsed = parse(whole)
        except ProxyHeaderError as exc:
            self._drop(pending, str(exc))
            return
        if parsed is None:
            pending.buffer += conn.recv(len(data))  # all of it is header: take it
            return
        address, length = parsed
        rest = length - len(pending.buffer)
        if rest:
            conn.recv(rest)  # exactly the header's bytes, peeked already: TLS gets the rest
        self._hand_off(pending, address)

    def _forget(self, pending: _Pending) -> None:
        fd = pending.conn.fileno()
        self.pending.pop(fd, None)
        self.loop.remove_reader(fd)
        if pending.timer is not None:
            pending.timer.cancel()

    def _drop(self, pending: _Pending, reason: str | None) -> None:
        self._forget(pending)
        if reason is not None:
            self.refuse(pending.ip, reason)
        pending.conn.close()

    def _hand_off(self, pending: _Pending, address: str | None) -> None:
        self._forget(pending)
        self._handshake(pending.conn, address or pending.ip, address)

    def _handshake(self, conn: socket.socket, ip: str, address: str | None) -> None:
        """``ip``: the client's address for the log; ``address``: the PROXY header's, if any
        (the connection's client address)."""
        protocol = self.make()
        protocol.client_address = address

        def made() -> ClientConnection:
            return protocol

        task = self.loop.create_task(self.loop.connect_accepted_socket(
            made, conn, ssl=self.ctx,  # type: ignore[type-var]  # duck-typed protocol
            ssl_handshake_timeout=self.timeout))
        self.handshakes.add(task)
        task.add_done_callback(lambda t: self._handshaken(t, ip))

    def _handshaken(self, task: asyncio.Task[object], ip: str) -> None:
        self.handshakes.discard(task)
        if task.cancelled():
            return  # the drain's deadline: not the client's doing
        exc = task.exception()
        if exc is not None:
            self.outcomes.failed(ip, exc)
            return
        transport = cast("tuple[asyncio.BaseTransport, object]", task.result())[0]
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None:  # lost before the handshake ended, without an error to say so
            self.outcomes.failed(ip, ConnectionResetError("closed during the handshake"))
        else:
            self.outcomes.done(sslobj.version())


class _Pending:
    __slots__ = ("buffer", "conn", "ip", "required", "timer")

    def __init__(self, conn: socket.socket, ip: str, required: bool) -> None:
        self.conn = conn
        self.ip = ip
        self.required = required
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None
