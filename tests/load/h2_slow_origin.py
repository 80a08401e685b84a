"""An h2c origin that answers every stream after 2 seconds (h2_bench.py's ``streams``): so
that 10,000 streams are open through the proxy at once. Usage: h2_slow_origin.py PORT"""

from __future__ import annotations

import asyncio
import sys

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings

DELAY = 2.0


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    conn.local_settings = Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: 10000})
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    loop = asyncio.get_running_loop()

    def answer(sid: int) -> None:
        if writer.is_closing():
            return
        conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
        conn.send_data(sid, b"ok", end_stream=True)
        writer.write(conn.data_to_send())

    while data := await reader.read(65536):
        for event in conn.receive_data(data):
            if isinstance(event, ev.StreamEnded) and event.stream_id:
                loop.call_later(DELAY, answer, event.stream_id)
        writer.write(conn.data_to_send())
    writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
