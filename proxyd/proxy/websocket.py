"""WebSocket relay: after the upstream's 101, a byte tunnel between the two sockets.

The handshake is proxied with fresh Sec-WebSocket-Key/Accept values; subprotocol and extension
negotiation pass through, so the frames themselves can be relayed untouched (what nginx does).
A small frame-boundary tracker per direction watches the headers only — never copying payload —
to count messages, read close codes, enforce ``max_message_size``, and know when a close 1001
can be injected on drain without cutting a frame in half.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxyd.config.models import WebSocket
    from proxyd.proxy.connection import ClientConnection
    from proxyd.proxy.pipeline import Pipeline
    from proxyd.proxy.upstream import UpstreamConnection

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
GOING_AWAY = 1001
TOO_BIG = 1009


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def close_frame(code: int, masked: bool) -> bytes:
    """A complete close frame; frames a client (proxyd towards the upstream) sends are masked."""
    payload = struct.pack("!H", code)
    if not masked:
        return b"\x88" + bytes([len(payload)]) + payload
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return b"\x88" + bytes([0x80 | len(payload)]) + mask + body


class FrameTracker:
    """Follows frame boundaries in one direction of the byte stream."""

    __slots__ = (
        "_close_buf",
        "_head",
        "_mask",
        "_opcode",
        "_payload_seen",
        "at_boundary",
        "close_code",
        "limit",
        "message_bytes",
        "messages",
        "remaining",
        "too_big",
    )

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit  # max_message_size; 0 = none
        self.too_big = False  # a message went over the limit (its frame header was seen)
        self._head = b""  # a frame header split across reads
        self.remaining = 0  # payload bytes of the current frame still to come
        self.at_boundary = True
        self.messages = 0
        self.message_bytes = 0  # size of the message being received (fragments summed)
        self.close_code: int | None = None
        self._opcode = 0
        self._mask = b""
        self._payload_seen = 0
        self._close_buf = b""

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self.remaining:
                take = min(self.remaining, end - pos)
                if self._opcode == 8 and len(self._close_buf) < 2:
                    self._close_buf += data[pos:pos + min(take, 2 - len(self._close_buf))]
                    if len(self._close_buf) == 2:
                        raw = self._close_buf
                        if self._mask:
                            raw = bytes(b ^ self._mask[i] for i, b in enumerate(raw))
                        self.close_code = struct.unpack("!H", raw)[0]
                self.remaining -= take
                pos += take
                self.at_boundary = self.remaining == 0
                continue
            head = self._head + data[pos:pos + 14]
            size = self._header_size(head)
            if size is None:  # incomplete header: keep it for the next read
                self._head = head
                self.at_boundary = False
                return
            consumed = size - len(self._head)
            self._head = b""
            self._parse(head[:size])
            pos += consumed
            self.at_boundary = self.remaining == 0

    @staticmethod
    def _header_size(head: bytes) -> int | None:
        if len(head) < 2:
            return None
        length = head[1] & 0x7F
        size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
        size += 4 if head[1] & 0x80 else 0
        return size if len(head) >= size else None

    def _parse(self, head: bytes) -> None:
        fin, opcode = head[0] & 0x80, head[0] & 0x0F
        length, pos = head[1] & 0x7F, 2
        if length == 126:
            length, pos = struct.unpack("!H", head[2:4])[0], 4
        elif length == 127:
            length, pos = struct.unpack("!Q", head[2:10])[0], 10
        self._mask = head[pos:pos + 4] if head[1] & 0x80 else b""
        self._opcode = opcode
        self._close_buf = b""
        self.remaining = length
        if opcode < 8:  # data frames (control frames do not belong to messages)
            self.message_bytes += length
            if self.limit and self.message_bytes > self.limit:
                self.too_big = True  # checked here: a final frame resets the count below
            if fin:
                self.messages += 1
                self.message_bytes = 0


class Tunnel:
    """Two sockets joined after the handshake; lives until either side closes."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "closed",
        "closing_after_boundary",
        "code",
        "conn",
        "down",
        "ds",
        "idle_timeout",
        "on_reload",
        "p",
        "recorded",
        "up",
    )

    def __init__(self, ds: ClientConnection, conn: UpstreamConnection, pipeline: Pipeline,
                 options: WebSocket) -> None:
        self.ds = ds
        self.conn = conn
        self.p = pipeline
        self.idle_timeout = options.idle_timeout
        self.on_reload = options.on_reload
        self.up = FrameTracker(options.max_message_size)  # client → upstream
        self.down = FrameTracker(options.max_message_size)  # upstream → client
        self.code: int | None = None  # the close code proxyd itself sent, if any
        self.bytes_up = 0
        self.bytes_down = 0
        self.closed = False  # close frames sent (or the peer left)
        self.recorded = False
        self.closing_after_boundary = False
        pipeline.tunnels.add(self)

    def touch(self) -> None:
        self.ds.deadline = self.p.deadlines.now + self.idle_timeout

    def from_client(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self._relay(self.up, data, self.conn.transport)

    def from_upstream(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self._relay(self.down, data, self.ds.transport)

    def _relay(self, tracker: FrameTracker, data: bytes, transport: Any) -> None:
        """One read, one direction: watch the frame headers, then pass the bytes on as read."""
        boundary = tracker.at_boundary
        tracker.feed(data)
        if tracker.too_big:
            tracker.at_boundary = boundary  # this read is not forwarded: the stream stops before it
            self.close(TOO_BIG)
            return
        if self.code is None and tracker.close_code is not None:
            self.code = tracker.close_code  # this side began the closing handshake
        if transport is not None:
            transport.write(data)
        self.touch()
        if self.closing_after_boundary:
            self.close(GOING_AWAY)

    def close(self, code: int = GOING_AWAY) -> None:
        """Close both sides with a close frame where a frame boundary allows one."""
        if self.closed:
            return
        if not (self.up.at_boundary and self.down.at_boundary) and code == GOING_AWAY:
            # Mid-frame: wait for the boundary (the next read), drain_timeout bounds it.
            self.closing_after_boundary = True
            return
        self.closed = True
        if self.code is None:
            self.code = code
        # One close frame per direction: none where a peer's close already went that way.
        ds_transport, up_transport = self.ds.transport, self.conn.transport
        if ds_transport is not None and self.down.at_boundary and self.down.close_code is None:
            ds_transport.write(close_frame(code, masked=False))
        if up_transport is not None and self.up.at_boundary and self.up.close_code is None:
            up_transport.write(close_frame(code, masked=True))
        self.ds.close()
        self.conn.close()

    def idle(self) -> None:
        """Idle timeout: a clean close if frames allow, else just end both connections."""
        if self.closing_after_boundary or self.closed:
            self.ds.close()
            self.conn.close()
        else:
            self.close(GOING_AWAY)
            if not self.closed:  # mid-frame after idling: nothing more will come
                self.ds.close()
                self.conn.close()

    def lost(self) -> None:
        """Either socket went away: the other one follows; the relay is counted once."""
        self.closed = True
        if self.recorded:
            return
        self.recorded = True
        self.p.tunnels.discard(self)
        self.p.metrics.websocket_messages.inc(("up",), self.up.messages)
        self.p.metrics.websocket_messages.inc(("down",), self.down.messages)
        self.p.metrics.websocket_bytes.inc(("up",), self.bytes_up)
        self.p.metrics.websocket_bytes.inc(("down",), self.bytes_down)
        code = self.code or self.down.close_code or self.up.close_code  # who closed first
        self.p.metrics.websocket_closes.inc((str(code or 1006),))
        self.ds.close()
        self.conn.close()
