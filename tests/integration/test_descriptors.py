"""A worker out of file descriptors says so (log, metric), and the master warns at start.

proxyd runs under a small RLIMIT_NOFILE, set on its process before exec (the fixture's
``proxyd`` cannot: the master raises its soft limit to the hard one, so both are lowered).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxyd.fdlimit import LOG_EVERY, OWN_FDS
from tests.integration.conftest import Origin, Ports, Proxyd, make_config, wait_until, write_config

LIMIT = 128  # the worker's table; the default max_connections (10000) needs far more
MORE_THAN_FITS = 4 * LIMIT
OUT = "out of file descriptors"


@pytest.fixture
async def limited(tmp_path: Path, process_groups: list[int],
                  origin: Origin) -> AsyncIterator[Proxyd]:
    """proxyd with one worker, RLIMIT_NOFILE = LIMIT (soft and hard)."""
    ports = Ports()
    config = make_config(ports, origin.url, workers=1, server={"keepalive_timeout": "60s"})
    path = write_config(tmp_path / "gateway.yaml", config)
    log_path = tmp_path / "gateway.log"

    def lower_limit() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxyd", "run", "-c", str(path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=lower_limit,
        )
    process_groups.append(proc.pid)  # killed with its workers at teardown
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        p = Proxyd(proc, path, log_path, ports, session)
        await p.wait_ready()
        try:
            yield p
        finally:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


async def _marker(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A keep-alive connection that was answered (and stays open), or None if it was closed
    without an answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /marker HTTP/1.1\r\nHost: test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 10.0)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        return None
    assert head.startswith(b"HTTP/1.1 200") and body == b"v1", (head, body)
    return reader, writer


async def _metric(p: Proxyd, name: str) -> float:
    async with p.admin_session.get(f"{p.admin_url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def test_start_warns_of_a_limit_below_max_connections(limited: Proxyd) -> None:
    log = limited.log()
    assert (f"the file descriptor limit (RLIMIT_NOFILE) is {LIMIT}, below the "
            f"{2 * 10000 + OWN_FDS} a worker may need at server.limits.max_connections 10000"
            in log), log


async def test_exhaustion_is_logged_counted_and_passes(limited: Proxyd) -> None:
    p = limited
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(MORE_THAN_FITS):
            conn = await _marker(p.ports.traffic)
            if conn is None:
                break  # closed unanswered: the worker's table is full
            held.append(conn[1])
        else:
            raise AssertionError(f"{MORE_THAN_FITS} connections served under a limit of {LIMIT}")
        assert len(held) > LIMIT // 2, "exhausted before the worker held many connections"
        full_at = time.monotonic()

        await wait_until(lambda: OUT in p.log(), 10.0, "the exhaustion to be logged")

        async def counted_thrice() -> bool:
            return await _metric(p, "gateway_fd_exhausted_total") >= 3

        await wait_until(counted_thrice, 15.0, "three checks to count the exhaustion")
        if time.monotonic() - full_at < LOG_EVERY:  # else a second line is due anyway
            assert p.log(400).count(OUT) == 1, "not rate-limited:\n" + p.log(400)
        assert await _marker(p.ports.traffic) is None  # still full: still turned away
    finally:
        for writer in held:
            writer.close()
        for writer in held:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # Descriptors given back: served again.
    async def served() -> bool:
        conn = await _marker(p.ports.traffic)
        if conn is None:
            return False
        conn[1].close()
        return True

    await wait_until(served, 10.0, "a new connection to be served again")
    log = p.log(400)
    assert f"(limit {LIMIT};" in log, log
    assert "Traceback" not in log, log
