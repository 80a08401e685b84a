"""A real proxyd, a real SIGHUP: an HTTP/2 client gets a GOAWAY naming its last stream, that
stream's answer arrives whole, and the next connection is served by the new workers."""

from __future__ import annotations

import os
import signal

from h2.errors import ErrorCodes

from tests.functional import _daemon
from tests.functional._daemon import daemon_config
from tests.functional._h2client import H2Client
from tests.functional.conftest import Upstreams, free_port, held, wait_for

daemon = _daemon.daemon  # the fixture: real proxyd processes


async def test_sighup_sends_goaway_and_the_stream_in_flight_finishes(
        daemon: object, upstreams: Upstreams) -> None:
    slow, release = held()
    up = await upstreams.aiohttp(slow)
    traffic, admin = free_port(), free_port()
    d = await daemon(daemon_config(traffic, admin, up.url), traffic, admin)  # type: ignore[operator]
    client = await H2Client.open(traffic)
    try:
        sid = client.request("/slow")
        await wait_for(lambda: [r.path_qs for r in up.seen] == ["/slow"], timeout=10,
                       what="the request upstream")
        os.kill(d.proc.pid, signal.SIGHUP)
        await client.until(lambda: client.goaway is not None, timeout=20)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.NO_ERROR
        assert client.goaway.last_stream_id == sid
        release.set()
        answer = await client.response(sid)
        assert (answer.status, bytes(answer.body)) == (200, b"finished")
        await client.until(lambda: client.closed)
    finally:
        release.set()
        await client.close()
    fresh = await H2Client.open(traffic)
    try:
        assert (await fresh.get("/marker")).status == 200
    finally:
        await fresh.close()
