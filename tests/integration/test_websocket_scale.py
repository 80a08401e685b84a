"""Many concurrent WebSockets through a real ``proxyd run`` (2 workers), and a SIGHUP under them.

N comes from PROXYD_WS_SCALE_N (the issue's target is 10,000). Each WebSocket holds one socket
in this process, two in a worker (client side + upstream side) and one in the origin, so the
RLIMIT_NOFILE hard limit must be above N plus some headroom (this test raises the soft limit to
the hard one; proxyd's master does the same for itself and its workers). The kernel's
net.core.somaxconn caps the listen backlog (4096 here): connections are opened at most
OPEN_CONCURRENCY at a time so the accept queues never overflow; a larger fan-in needs a larger
somaxconn (and tcp_max_syn_backlog) or SYN retransmits stall the ramp for seconds.

The client side is a bare asyncio.Protocol (no aiohttp per connection): this process runs the
N clients, and a heavy client would measure itself instead of the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import (
    Ports,
    Proxyd,
    StartProxyd,
    wait_until,
    write_config,
)

SCALE_N = int(os.environ.get("PROXYD_WS_SCALE_N", "10000"))
OPEN_CONCURRENCY = 256  # handshakes in flight at once
RSS_LIMIT = 1 << 30  # master + workers, in total
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's example pair
REPO = Path(__file__).resolve().parents[2]


# -- a minimal WebSocket client -------------------------------------------------------------------


def text_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return (bytes([0x81, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


class WsClient(asyncio.Protocol):
    """One WebSocket: the handshake, then one text message at a time, awaited."""

    __slots__ = ("_request", "buf", "transport", "upgraded", "waiter")

    def __init__(self, request: bytes, waiter: asyncio.Future[bytes]) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.waiter: asyncio.Future[bytes] | None = waiter
        self._request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]
        del self._request

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            del buf[:end + 4]
            if not head.startswith(b"HTTP/1.1 101") or ACCEPT not in head:
                self._fail(ConnectionError(f"handshake refused: {head[:200]!r}"))
                return
            self.upgraded = True
            self._wake(head)
        while len(buf) >= 2:
            n, pos = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, pos = struct.unpack("!H", buf[2:4])[0], 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, pos = struct.unpack("!Q", buf[2:10])[0], 10
            if len(buf) < pos + n:
                return
            opcode, payload = buf[0] & 0x0F, bytes(buf[pos:pos + n])
            del buf[:pos + n]
            if opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self._fail(ConnectionError(f"closed by the proxy with {code}"))
            elif opcode in (1, 2):
                self._wake(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc!r}"))

    def _wake(self, value: bytes) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def echo(self, text: str, timeout: float = 30.0) -> None:
        assert self.transport is not None and self.waiter is None
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(text_frame(text))
        got = await asyncio.wait_for(waiter, timeout)
        assert got == text.encode(), (got, text)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_ws(port: int, path: str = "/ws", timeout: float = 30.0) -> WsClient:
    loop = asyncio.get_running_loop()
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    waiter: asyncio.Future[bytes] = loop.create_future()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: WsClient(request, waiter), "127.0.0.1", port), timeout)
    try:
        await asyncio.wait_for(waiter, timeout)
    except BaseException:
        client.close()
        raise
    return client


async def open_many(port: int, n: int, tag: str) -> tuple[list[WsClient], list[str]]:
    """``n`` WebSockets, each echoing one message; the failures described, not raised."""
    sem = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one(i: int) -> WsClient:
        async with sem:
            client = await open_ws(port)
            await client.echo(f"{tag} {i}")
            return client

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    clients = [r for r in results if isinstance(r, WsClient)]
    errors = [f"{type(r).__name__}: {r}" for r in results if not isinstance(r, WsClient)]
    return clients, errors


async def echo_all(clients: list[WsClient], tag: str) -> list[str]:
    sem = asyncio.Semaphore(1024)

    async def one(i: int, client: WsClient) -> None:
        async with sem:
            await client.echo(f"{tag} {i}")

    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)),
                                   return_exceptions=True)
    return [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]


# -- processes ------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def proxy_rss(p: Proxyd) -> tuple[int, dict[int, int]]:
    """Master + every worker /status lists: the total, and per pid."""
    status = await p.status()
    per = {p.pid: rss_bytes(p.pid)}
    for w in status["workers"]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            per[w["pid"]] = rss_bytes(w["pid"])
    return sum(per.values()), per


@pytest.fixture
def nofile() -> Iterator[int]:
    """The soft RLIMIT_NOFILE raised to the hard one for this test (the N client sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
async def ws_origin(nofile: int, process_groups: list[int]) -> AsyncIterator[str]:
    """The echo origin in its own process (started after the limit is raised: it inherits it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration._ws_origin"], cwd=REPO,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    process_groups.append(proc.pid)
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
    assert line.startswith(b"PORT "), line
    try:
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)
        proc.stdout.close()


def ws_config(ports: Ports, origin: str, n: int, marker: str) -> dict[str, Any]:
    return {
        "server": {
            "listen": [f"127.0.0.1:{ports.traffic}"],
            "workers": 2,
            "backlog": 4096,
            "max_requests": 0,
            "max_requests_jitter": 0,
            "drain_timeout": "100s",  # on_reload keep: old relays outlive the whole test
        },
        "admin": {"listen": f"127.0.0.1:{ports.admin}"},
        # Every relay holds an upstream connection, and the pool counts those against
        # max_connections (per target per worker, default 1000): size it for N.
        "upstreams": {"origin": {"targets": [origin],
                                 "pool": {"max_connections": 2 * n + 1000,
                                          "connect_timeout": "20s"}}},
        "routes": [
            {"name": "marker", "match": {"path": "/marker"}, "respond": {"body": marker}},
            {"name": "ws", "match": {"path_prefix": "/"}, "upstream": "origin",
             "websocket": {"on_reload": "keep"}},
        ],
        "access_log": {"enabled": False},
    }


async def marker(url: str) -> str:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, s.get(f"{url}/marker") as r:
        return await r.text()


# -- the test -------------------------------------------------------------------------------------


async def test_many_websockets_two_workers_and_a_reload_that_keeps_them(
    nofile: int, ws_origin: str, proxyd: StartProxyd
) -> None:
    n = SCALE_N
    if nofile < n + 2000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {nofile} is too low for {n} WebSockets "
                    f"(raise it, e.g. ulimit -Hn {2 * n + 2000})")
    ports = Ports()
    p = await proxyd(ws_config(ports, ws_origin, n, "v1"), ports=ports)
    first = await p.status()
    old_pids = {w["pid"] for w in first["workers"]}
    assert len(old_pids) == 2

    # Warm-up: code paths, pools and allocator arenas in place before the baseline.
    warm, errors = await open_many(ports.traffic, 40, "warm")
    assert not errors, errors[:5]
    for c in warm:
        c.close()
    await asyncio.sleep(0.5)
    rss_before, _ = await proxy_rss(p)

    t0 = time.monotonic()
    clients, errors = await open_many(ports.traffic, n, "hello")
    opened = time.monotonic() - t0
    assert not errors, f"{len(errors)} of {n} failed: {errors[:5]}"
    assert len(clients) == n
    await asyncio.sleep(0.3)  # stats settle (no effect on RSS; keeps the read honest)
    rss_open, per_pid = await proxy_rss(p)
    per_ws = (rss_open - rss_before) / n
    print(f"\n{n} WebSockets opened and echoed in {opened:.1f}s "
          f"({n / opened:.0f}/s); proxy RSS {rss_before / 2**20:.1f} MiB → "
          f"{rss_open / 2**20:.1f} MiB; {per_ws / 1024:.2f} KiB per idle WebSocket; "
          f"per pid (MiB): { {k: round(v / 2**20, 1) for k, v in per_pid.items()} }")
    assert rss_open < RSS_LIMIT, per_pid
    fds = {pid: fd_count(pid) for pid in old_pids}
    assert sum(fds.values()) >= 2 * n, fds  # both sides of every relay, across the 2 workers

    # SIGHUP with on_reload keep: every open WebSocket stays on its old worker and works.
    t1 = time.monotonic()
    write_config(p.config_path, ws_config(ports, ws_origin, n, "v2"))
    p.signal(signal.SIGHUP)
    st = await p.wait_generation(2, timeout=30)
    by_pid = {w["pid"]: w for w in st["workers"]}
    assert {by_pid[pid]["state"] for pid in old_pids if pid in by_pid} == {"draining"}, st
    assert all(pid in by_pid for pid in old_pids), "an old worker left with relays open"
    new_pids = {w["pid"] for w in st["workers"]
                if w["generation"] == 2 and w["state"] == "ready"}
    assert len(new_pids) == 2 and not new_pids & old_pids
    errors = await echo_all(clients, "again")
    reloaded = time.monotonic() - t1
    assert not errors, f"{len(errors)} of {n} lost over the reload: {errors[:5]}"
    print(f"reload + {n} echoes on the kept relays in {reloaded:.1f}s")

    # New connections go to the new generation: the old workers no longer accept (their
    # descriptor counts do not grow), and the new ones gain both sides of each relay.
    assert await marker(p.url) == "v2"
    new_fds = {pid: fd_count(pid) for pid in new_pids}
    old_fds = {pid: fd_count(pid) for pid in old_pids}
    fresh, errors = await open_many(ports.traffic, 100, "fresh")
    assert not errors, errors[:5]
    # Both sides of each relay: 200, less the one idle upstream connection the marker
    # request may have left in a new worker's pool, which an upgrade may reuse.
    assert sum(fd_count(pid) for pid in new_pids) - sum(new_fds.values()) >= 199
    assert all(fd_count(pid) <= old_fds[pid] for pid in old_pids)

    # The old workers exit once their last relay ends (well before drain_timeout).
    for c in clients:
        c.close()

    async def old_gone() -> bool:
        st = await p.status()
        return not old_pids & {w["pid"] for w in st["workers"]}

    await wait_until(old_gone, 30, "the old generation to exit after its relays ended")
    errors = await echo_all(fresh, "still")
    assert not errors, errors[:5]
    for c in fresh:
        c.close()
    p.check_alive()
    print(f"total {time.monotonic() - t0:.1f}s")
