"""100 MiB each way through a proxyd process whose resident memory must stay bounded."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.functional.conftest import (
    CATCH_ALL,
    Upstreams,
    build_config,
    free_port,
)

SERVE = Path(__file__).with_name("_serve.py")
MIB = 1024 * 1024
TOTAL_MIB = 100
RSS_LIMIT = 200 * MIB
BLOCK = bytes(range(256)) * 4096  # 1 MiB


def block(i: int) -> bytes:
    return i.to_bytes(8, "big") + BLOCK[8:]  # every block differs: a reorder changes the hash


def expected_sha256() -> str:
    h = hashlib.sha256()
    for i in range(TOTAL_MIB):
        h.update(block(i))
    return h.hexdigest()


async def sink(request: web.Request) -> web.StreamResponse:
    """Upload target: counts and hashes the body as it streams; stalls first (back-pressure)."""
    await asyncio.sleep(0.3)  # a slow start: the proxy must stop reading the client meanwhile
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        n += len(chunk)
    return web.json_response({"bytes": n, "sha256": h.hexdigest()})


async def source(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = TOTAL_MIB * MIB
    await resp.prepare(request)
    for i in range(TOTAL_MIB):
        await resp.write(block(i))
    await resp.write_eof()
    return resp


async def handler(request: web.Request) -> web.StreamResponse:
    return await (sink(request) if request.method == "PUT" else source(request))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def proxyd_process(config: dict[str, object], tmp: Path) -> AsyncIterator[
    subprocess.Popen[bytes]
]:
    path = tmp / "gateway.json"
    path.write_text(json.dumps(config))
    log = (tmp / "proxyd.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(SERVE), str(path)], stdout=log, stderr=log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
            except TimeoutError:
                proc.kill()
                proc.wait()
        log.close()


async def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"proxyd exited {proc.returncode}: {log.read_text()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise AssertionError("proxyd did not start listening") from None
            await asyncio.sleep(0.02)
        else:
            writer.close()
            await writer.wait_closed()
            return


@pytest.mark.timeout(60)
async def test_100mib_each_way_with_bounded_rss(upstreams: Upstreams, tmp_path: Path) -> None:
    up = await upstreams.aiohttp(handler)
    port = free_port()
    config = build_config(
        port, CATCH_ALL, {"backend": up.url}, limits={"max_body_size": "200MiB"}
    )
    want = expected_sha256()
    async with proxyd_process(config, tmp_path) as proc:
        await wait_listening(proc, port, tmp_path / "proxyd.log")
        peak = rss(proc.pid)
        baseline = peak
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss(proc.pid))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.02)

        sampler = asyncio.create_task(sample())
        url = f"http://127.0.0.1:{port}/stream"
        try:
            async with aiohttp.ClientSession() as http:

                async def body() -> AsyncIterator[bytes]:
                    for i in range(TOTAL_MIB):
                        yield block(i)

                async with http.put(url, data=body()) as resp:  # chunked upload
                    assert resp.status == 200
                    assert await resp.json() == {"bytes": TOTAL_MIB * MIB, "sha256": want}

                async with http.get(url) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Length"] == str(TOTAL_MIB * MIB)
                    h = hashlib.sha256()
                    n = 0
                    async for chunk in resp.content.iter_any():
                        if n == 0:
                            await asyncio.sleep(0.3)  # a slow reader: the proxy must hold off
                        h.update(chunk)
                        n += len(chunk)
                    assert n == TOTAL_MIB * MIB and h.hexdigest() == want
        finally:
            stop.set()
            await sampler
        assert proc.poll() is None, "proxyd died"
    assert proc.returncode == 0
    assert peak < RSS_LIMIT, f"proxyd RSS peaked at {peak / MIB:.0f} MiB"
    assert peak - baseline < 64 * MIB, (baseline / MIB, peak / MIB)
    assert "Traceback" not in (tmp_path / "proxyd.log").read_text()
