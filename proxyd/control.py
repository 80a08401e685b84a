"""Master ⇄ worker messages over a socketpair: one framing, both directions.

A frame is a 4-byte big-endian length and a JSON object with a "type":
  worker → master: ready, stats {requests, connections, ...}, retire (max_requests reached),
  purged {id, removed, deferred} (the answer to a purge), invalidate {keys} (memory caches)
  master → worker: drain, reopen (log files), purge {id, key, prefix, shared} (cache),
  invalidate {keys} (another worker's, passed on),
  health {upstreams: {name: {url: healthy}}} (active check results: on every change, and to
  each worker once it is ready)
JSON because the volume is tiny (about one message a second per worker) and it stays readable
with strace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from typing import Any

_LEN = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


class Channel:
    """One end of a control socketpair, as asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None when the other end has gone."""
        try:
            header = await self.reader.readexactly(_LEN.size)
            (length,) = _LEN.unpack(header)
            if length > MAX_FRAME:
                raise ValueError(f"control frame of {length} bytes")
            message: dict[str, Any] = json.loads(await self.reader.readexactly(length))
            return message
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))

    async def send_and_flush(self, message: dict[str, Any]) -> None:
        self.send(message)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def close(self) -> None:
        self.writer.close()
