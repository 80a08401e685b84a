"""An HTTP/2 origin for the tests, on h2 (server side) over a real socket, cleartext (h2c by
prior knowledge) or TLS with ALPN h2.

It answers each stream with what ``handler`` returns for the request (its headers and whole
body): status, fields, body, trailers. It records what it saw and can misbehave on purpose:
a GOAWAY after some streams, REFUSED_STREAM.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings


@dataclass
class H2Request:
    headers: dict[bytes, bytes]
    body: bytes
    stream_id: int
    connection: int  # which connection (1, 2, ...) carried it

    @property
    def path(self) -> str:
        return self.headers[b":path"].decode()


@dataclass
class H2Reply:
    status: int = 200
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] | None = None


Handler = Callable[[H2Request], Awaitable[H2Reply]]


async def echo(req: H2Request) -> H2Reply:
    return H2Reply(200, [(b"content-type", b"text/plain"),
                         (b"x-path", req.headers[b":path"])], req.body)


class H2Origin:
    def __init__(self, handler: Handler = echo, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.seen: list[H2Request] = []
        self.connections = 0
        self.goaway_after: int | None = None  # streams served, then a GOAWAY
        self.refuse_streams = 0  # the next N streams are refused (REFUSED_STREAM)
        self.max_streams: int | None = None
        self.pings = 0  # PINGs received
        self.closed_connections = 0
        self.answer_pings = True
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> H2Origin:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.append(writer)
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        if self.max_streams is not None:
            conn.local_settings = Settings(client=False, initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        heads: dict[int, dict[bytes, bytes]] = {}
        bodies: dict[int, bytearray] = {}
        served = 0
        pending: dict[int, tuple[bytes, bool, list[tuple[bytes, bytes]] | None]] = {}

        def push(sid: int) -> None:
            data, end, trailers = pending[sid]
            while data:
                room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if room <= 0:
                    break
                conn.send_data(sid, data[:room])
                data = data[room:]
            if data:
                pending[sid] = (data, end, trailers)
                return
            del pending[sid]
            if trailers is not None:
                conn.send_headers(sid, trailers, end_stream=True)
            else:
                conn.end_stream(sid)

        async def answer(sid: int) -> None:
            nonlocal served
            req = H2Request(heads.pop(sid), bytes(bodies.pop(sid, b"")), sid, number)
            self.seen.append(req)
            reply = await self.handler(req)
            conn.send_headers(sid, [(b":status", str(reply.status).encode()), *reply.fields])
            pending[sid] = (reply.body, True, reply.trailers)
            push(sid)
            writer.write(conn.data_to_send())
            served += 1
            if self.goaway_after is not None and served >= self.goaway_after:
                self.goaway_after = None
                conn.close_connection(last_stream_id=sid)
                writer.write(conn.data_to_send())

        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, ev.RequestReceived):
                        assert event.stream_id is not None
                        if self.refuse_streams:
                            self.refuse_streams -= 1
                            conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                            continue
                        heads[event.stream_id] = dict(event.headers or [])
                        bodies[event.stream_id] = bytearray()
                    elif isinstance(event, ev.DataReceived):
                        assert event.stream_id is not None
                        if event.stream_id in bodies:
                            bodies[event.stream_id] += event.data or b""
                        conn.acknowledge_received_data(event.flow_controlled_length or 0,
                                                       event.stream_id)
                    elif isinstance(event, ev.StreamEnded):
                        assert event.stream_id is not None
                        if event.stream_id in heads:
                            task = asyncio.ensure_future(answer(event.stream_id))
                            self._tasks.add(task)
                            task.add_done_callback(self._tasks.discard)
                    elif isinstance(event, ev.WindowUpdated):
                        for sid in list(pending):
                            push(sid)
                    elif isinstance(event, ev.PingReceived):
                        self.pings += 1
                writer.write(conn.data_to_send())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed_connections += 1
            writer.close()
