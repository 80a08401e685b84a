"""An HTTP/2 client for the tests, on h2 (client side) over a real socket.

Small on purpose: it opens streams, sends what a test tells it (including what a well-behaved
client never would: resets, floods, malformed blocks), and collects what comes back per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.settings import SettingCodes


@dataclass
class Answer:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    interim: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None  # the error code of a RST_STREAM

    @property
    def status(self) -> int:
        return int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)


class H2Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 window: int | None = None, hold: bool = False) -> None:
        """``hold``: the preface is not written (the test writes conn.data_to_send())."""
        self.reader = reader
        self.writer = writer
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.answers: dict[int, Answer] = {}
        self.goaway: ev.ConnectionTerminated | None = None
        self.closed = False
        self.settings: dict[int, int] = {}
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.unsent: dict[int, tuple[bytearray, bool]] = {}
        self.auto_ack = True  # acknowledge received DATA at once (False: a client not reading)
        if not hold:
            self.flush()

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None,
                   window: int | None = None) -> H2Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None)
        return cls(reader, writer, window)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def request(self, path: str, method: str = "GET", headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
                body: bytes | None = None, end: bool = True,
                authority: str = "localhost") -> int:
        sid = self.conn.get_next_available_stream_id()
        block = [(":method", method), (":scheme", "http"), (":authority", authority),
                 (":path", path), *headers]
        self.conn.send_headers(sid, block, end_stream=body is None and end)
        self.answers[sid] = Answer()
        self.flush()
        if body is not None:
            self.unsent[sid] = (bytearray(body), end)
            self._push(sid)
        return sid

    def _push(self, sid: int) -> None:
        """Send what the windows let through of a request body; the rest as they open."""
        data, end = self.unsent[sid]
        while data:
            room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if room <= 0:
                break
            piece = bytes(data[:room])
            del data[:room]
            self.conn.send_data(sid, piece, end_stream=end and not data)
        if not data:
            del self.unsent[sid]
        self.flush()

    async def sent(self, sid: int, timeout: float = 10.0) -> None:
        """Wait until the request body of ``sid`` is all sent."""
        await self.until(lambda: sid not in self.unsent, timeout)

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end)
        self.flush()

    async def read_once(self, timeout: float = 10.0) -> bool:
        """One read; False when the server closed the connection."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._event(event)
        self.flush()
        return True

    def _event(self, event: ev.Event) -> None:
        if isinstance(event, ev.ResponseReceived):
            self.answers[event.stream_id].headers = list(event.headers)  # type: ignore[index, arg-type]
        elif isinstance(event, ev.InformationalResponseReceived):
            self.answers[event.stream_id].interim.append(list(event.headers))  # type: ignore[index, arg-type]
        elif isinstance(event, ev.TrailersReceived):
            self.answers[event.stream_id].trailers = list(event.headers)  # type: ignore[index, arg-type]
        elif isinstance(event, ev.DataReceived):
            assert event.stream_id is not None and event.data is not None
            self.answers[event.stream_id].body += event.data
            if self.auto_ack and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
        elif isinstance(event, ev.StreamEnded):
            self.answers[event.stream_id].ended = True  # type: ignore[index]
        elif isinstance(event, ev.StreamReset):
            answer = self.answers.get(event.stream_id)  # type: ignore[arg-type]
            if answer is not None:
                answer.reset = int(event.error_code)  # type: ignore[arg-type]
        elif isinstance(event, ev.WindowUpdated):
            for sid in list(self.unsent):
                if sid in self.unsent:
                    self._push(sid)
        elif isinstance(event, ev.ConnectionTerminated):
            self.goaway = event
            if event.error_code == 0:
                # A graceful GOAWAY: the streams it covers may still finish (RFC 9113 §6.8),
                # but h2 closes its connection state on any GOAWAY; this test client reopens
                # it to read them.
                self.conn.state_machine.state = ConnectionState.CLIENT_OPEN
        elif isinstance(event, ev.RemoteSettingsChanged):
            for code, change in event.changed_settings.items():
                self.settings[int(code)] = change.new_value

    async def until(self, done: callable, timeout: float = 10.0) -> None:  # type: ignore[valid-type]
        """Read until ``done()`` or the connection closes; fail after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError("timed out waiting on the HTTP/2 connection")
            if not await self.read_once(left):
                return

    async def response(self, sid: int, timeout: float = 10.0) -> Answer:
        answer = self.answers[sid]
        await self.until(lambda: answer.ended or answer.reset is not None, timeout)
        return answer

    async def get(self, path: str, **kw: object) -> Answer:
        return await self.response(self.request(path, **kw))  # type: ignore[arg-type]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)
