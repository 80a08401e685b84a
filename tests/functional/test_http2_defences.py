"""HTTP/2 limits and defences, each driven by a client doing what an attacker does: malformed
requests, rapid reset, CONTINUATION and control-frame floods, oversized header lists, too many
streams, a client that stops reading; and the graceful GOAWAY of a drain and of the stream
cap."""

from __future__ import annotations

import asyncio

from aiohttp import web
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame

from proxyd.proxy.h2_connection import MAX_CONCURRENT_STREAMS, Http2Connection
from tests.functional._h2client import H2Client
from tests.functional.conftest import CATCH_ALL, StartProxy, Upstreams, held, wait_for


def h2_connections(p: object) -> list[Http2Connection]:
    return [c for c in p.pipeline.connections  # type: ignore[attr-defined]
            if isinstance(c, Http2Connection)]


async def test_settings_advertise_the_limits(proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"max_header_size": "4KiB"})
    client = await H2Client.open(p.port)
    try:
        await client.get("/")
        assert client.settings[SettingCodes.MAX_CONCURRENT_STREAMS] == MAX_CONCURRENT_STREAMS
        # The fields, the target and HPACK's 32 bytes a field: larger than the field limit.
        assert 4096 < client.settings[SettingCodes.MAX_HEADER_LIST_SIZE] < 16384
        assert client.settings[SettingCodes.ENABLE_PUSH] == 0
    finally:
        await client.close()


async def test_malformed_request_is_a_stream_error_and_never_forwarded(
        proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    # A client that sends what HTTP/2 forbids (h2 would refuse to).
    client.conn.config = H2Configuration(client_side=True, header_encoding=None,
                                         validate_outbound_headers=False,
                                         normalize_outbound_headers=False)
    try:
        bad = [
            [("connection", "keep-alive")],  # connection-specific
            [("transfer-encoding", "chunked")],
            [("te", "gzip")],  # TE other than trailers
            [("X-Upper", "1")],  # uppercase name
        ]
        for extra in bad:
            answer = await client.response(client.request("/bad", headers=extra))
            assert answer.reset == ErrorCodes.PROTOCOL_ERROR, extra
        assert up.seen == []
        ok = await client.get("/good", headers=[("te", "trailers")])  # the connection lives
        assert ok.status == 200
        assert len(up.seen) == 1
    finally:
        await client.close()


async def test_rapid_reset_closes_the_connection(proxy: StartProxy,
                                                 upstreams: Upstreams) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    up = await upstreams.aiohttp(slow)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        for _ in range(300):
            sid = client.request("/reset")
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            client.flush()
            if client.closed or client.goaway is not None:
                break
        await client.until(lambda: client.goaway is not None)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        await client.until(lambda: client.closed)
        assert client.closed
        assert p.pipeline.metrics.client_limits.series.get(("rapid_reset",)) == 1
    finally:
        await client.close()


async def test_continuation_flood_is_cut_off(proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        await client.get("/")  # settings exchanged
        block = Encoder().encode([(":method", "GET"), (":scheme", "http"),
                                  (":authority", "x"), (":path", "/")])
        frames = [HeadersFrame(3, block, flags=[]).serialize()]
        filler = Encoder().encode([("x-fill", "a" * 100)])
        for _ in range(1000):  # never END_HEADERS
            frames.append(ContinuationFrame(3, filler).serialize())
        client.writer.write(b"".join(frames))
        await client.until(lambda: client.closed, timeout=10)
        assert client.closed
        assert len(up.seen) == 1  # only the first request
    finally:
        await client.close()


async def test_ping_flood_is_cut_off(proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        for i in range(2000):
            client.conn.ping(i.to_bytes(8, "big"))
        client.flush()
        await client.until(lambda: client.goaway is not None or client.closed)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert p.pipeline.metrics.client_limits.series.get(("http2_flood",)) == 1
    finally:
        await client.close()


async def test_settings_flood_is_cut_off(proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        for _ in range(2000):
            client.conn.update_settings({SettingCodes.ENABLE_PUSH: 0})
        client.flush()
        await client.until(lambda: client.goaway is not None or client.closed)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        await client.close()


async def test_a_few_pings_are_answered(proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        for i in range(20):
            client.conn.ping(i.to_bytes(8, "big"))
        client.flush()
        answer = await client.get("/after-pings")
        assert answer.status == 200 and client.goaway is None
    finally:
        await client.close()


async def test_header_list_over_the_limit_is_refused(proxy: StartProxy,
                                                     upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"max_header_size": "2KiB"})
    client = await H2Client.open(p.port)
    try:
        await client.get("/")  # the server's SETTINGS are in
        # Over the field limit, within what HPACK takes: 431, as on HTTP/1.1.
        answer = await client.get("/big", headers=[("x-big", "a" * 3000)])
        assert answer.status == 431
        # Far over what SETTINGS_MAX_HEADER_LIST_SIZE announced (a block of CONTINUATION
        # frames): refused the same way, and the connection goes on.
        bigger = await client.get("/bigger", headers=[("x-big", "a" * 64000)])
        assert bigger.status == 431
        assert (await client.get("/after")).status == 200
        assert [s.path_qs for s in up.seen] == ["/", "/after"]
    finally:
        await client.close()


async def test_stream_cap_per_connection_is_a_graceful_goaway(
        proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"max_keepalive_requests": 3})
    client = await H2Client.open(p.port)
    try:
        for i in range(3):
            answer = await client.get(f"/{i}")
            assert answer.status == 200
        await client.until(lambda: client.goaway is not None)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.NO_ERROR
        assert client.goaway.last_stream_id == 5
        await client.until(lambda: client.closed)
    finally:
        await client.close()


async def test_a_client_that_stops_reading_stops_the_upstream_read(
        proxy: StartProxy, upstreams: Upstreams) -> None:
    payload = b"z" * (8 * 1024 * 1024)

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for at in range(0, len(payload), 65536):
            await resp.write(payload[at:at + 65536])
        await resp.write_eof()
        return resp

    up = await upstreams.aiohttp(big)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    client.auto_ack = False
    try:
        sid = client.request("/big")
        await client.until(lambda: len(client.answers[sid].body) >= 65535)
        conn = h2_connections(p)[0]
        stream = conn.streams[sid]
        # The window is spent: the stream holds what came past it, and the upstream is not
        # read any more (what the proxy holds stays far below the 8 MiB on offer).
        await wait_for(lambda: stream.write_paused, what="the upstream paused")
        ex = stream.exchange
        assert ex is not None and ex.conn is not None and ex.conn.read_paused
        assert stream.out_size < 1024 * 1024
        client.auto_ack = True
        client.conn.acknowledge_received_data(len(client.answers[sid].body), sid)
        client.flush()
        answer = await client.response(sid, timeout=30)
        assert len(answer.body) == len(payload)
    finally:
        await client.close()


async def test_drain_sends_goaway_and_finishes_the_streams_in_flight(
        proxy: StartProxy, upstreams: Upstreams) -> None:
    slow, release = held()
    up = await upstreams.aiohttp(slow)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        sid = client.request("/slow")
        await wait_for(lambda: len(up.seen) == 1, what="the request upstream")
        drain = asyncio.ensure_future(p.worker.drain(10.0))
        await client.until(lambda: client.goaway is not None)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.NO_ERROR
        assert client.goaway.last_stream_id == sid
        release.set()
        answer = await client.response(sid)
        assert (answer.status, bytes(answer.body)) == (200, b"finished")
        await client.until(lambda: client.closed)
        await asyncio.wait_for(drain, 10)
    finally:
        release.set()
        await client.close()


async def test_an_idle_connection_gets_goaway_after_keepalive_timeout(
        proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, server={"keepalive_timeout": "0.3s"})
    client = await H2Client.open(p.port)
    try:
        assert (await client.get("/")).status == 200
        await client.until(lambda: client.closed, timeout=10)
        assert client.goaway is not None and client.goaway.error_code == ErrorCodes.NO_ERROR
    finally:
        await client.close()


async def test_a_client_that_never_opens_its_window_is_cut_off(
        proxy: StartProxy, upstreams: Upstreams) -> None:
    payload = b"y" * (256 * 1024)

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=payload)

    up = await upstreams.aiohttp(big)
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"send_timeout": "0.5s"})
    client = await H2Client.open(p.port)
    client.auto_ack = False  # reads the socket, never gives window back
    try:
        sid = client.request("/big")
        await client.until(lambda: client.closed, timeout=10)
        assert client.closed
        assert len(client.answers[sid].body) < len(payload)
        assert p.pipeline.metrics.client_limits.series.get(("send_timeout",)) == 1
    finally:
        await client.close()


async def test_a_stream_past_drain_timeout_is_cut(proxy: StartProxy,
                                                  upstreams: Upstreams) -> None:
    stuck, never = held("never")
    up = await upstreams.aiohttp(stuck)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        sid = client.request("/stuck")
        await wait_for(lambda: len(up.seen) == 1, what="the request upstream")
        await asyncio.wait_for(p.worker.drain(0.3), 10)
        await client.until(lambda: client.closed)
        assert client.closed and not client.answers[sid].ended
        assert client.goaway is not None and client.goaway.last_stream_id == sid
    finally:
        never.set()
        await client.close()


async def test_more_streams_than_announced_end_the_connection(
        proxy: StartProxy, upstreams: Upstreams) -> None:
    stuck, never = held("late")
    up = await upstreams.aiohttp(stuck)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        await client.until(lambda: SettingCodes.MAX_CONCURRENT_STREAMS in client.settings)
        # A client that ignores the limit (h2 would refuse to open the extra stream): raw
        # HEADERS frames, one HPACK encoder for all (no request went out before them).
        encoder = Encoder()
        client.writer.write(b"".join(
            HeadersFrame(2 * i + 1, encoder.encode([
                (":method", "GET"), (":scheme", "http"), (":authority", "x"),
                (":path", f"/s/{i}")]), flags=["END_HEADERS", "END_STREAM"]).serialize()
            for i in range(MAX_CONCURRENT_STREAMS + 1)))
        await client.until(lambda: client.closed or client.goaway is not None)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        assert len(up.seen) <= MAX_CONCURRENT_STREAMS
    finally:
        never.set()
        await client.close()


async def test_empty_data_flood_is_cut_off(proxy: StartProxy, upstreams: Upstreams) -> None:
    stuck, never = held("late")
    up = await upstreams.aiohttp(stuck)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        sid = client.request("/upload", "POST", end=False)
        frames = b"".join(DataFrame(sid, b"").serialize() for _ in range(5000))
        client.writer.write(frames)
        await client.until(lambda: client.goaway is not None or client.closed)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        never.set()
        await client.close()
