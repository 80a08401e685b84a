"""The access log to a file: one JSON object per request served, none lost on a reload, a
graceful stop, or a logrotate-style rename followed by SIGUSR1."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp

from tests.integration._exact import Exact
from tests.integration.conftest import (
    Origin,
    Ports,
    Proxyd,
    StartProxyd,
    make_config,
    wait_until,
)

FIELDS = {"ts", "request_id", "client_ip", "method", "host", "path", "query", "status",
          "bytes_in", "bytes_out", "duration_ms", "upstream", "upstream_ms", "cache", "route",
          "pid", "user_agent", "referer", "protocol", "upstream_addr", "tries", "tls_version"}


def logging_config(ports: Ports, origin_url: str, path: Path, **kw: Any) -> dict[str, Any]:
    config = make_config(ports, origin_url, **kw)
    config["access_log"] = {"enabled": True, "format": "json", "path": str(path)}
    return config


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the file as JSON; fails on the first that does not parse."""
    text = path.read_text() if path.exists() else ""
    assert text == "" or text.endswith("\n"), "a partial last line"
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"{path.name}:{number}: not JSON ({exc}): {line!r}") from None
        assert isinstance(record, dict) and set(record) == FIELDS, line
        records.append(record)
    return records


class Slow:
    """Requests to the origin's /slow, in flight while the test signals the master."""

    def __init__(self, p: Proxyd, origin: Origin, count: int, seconds: float) -> None:
        self.p, self.origin, self.count, self.seconds = p, origin, count, seconds
        self.tasks: list[asyncio.Task[int]] = []

    async def start(self) -> Slow:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        self.session = session
        target = self.origin.slow_started + self.count

        async def one() -> int:
            async with session.get(f"{self.p.url}/slow?d={self.seconds:g}") as r:
                await r.read()
                return r.status

        self.tasks = [asyncio.create_task(one()) for _ in range(self.count)]
        await wait_until(lambda: self.origin.slow_started >= target, 5.0,
                         "the slow requests to reach the origin")
        return self

    async def finish(self) -> list[int]:
        try:
            return list(await asyncio.gather(*self.tasks))
        finally:
            await self.session.close()


async def test_every_line_parses_and_counts_across_reload_and_stop(
    origin: Origin, proxyd: StartProxyd, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    ports = Ports()
    p = await proxyd(logging_config(ports, origin.url, log_path), ports=ports)
    load = Exact(p.url)
    await load.run(400)

    # A reload with requests in flight on the old workers and more arriving during it.
    slow = await Slow(p, origin, 4, 1.0).start()
    p.signal(signal.SIGHUP)
    await load.run(400)
    await p.wait_generation(2)
    assert await slow.finish() == [200] * 4
    await load.run(400)

    # A graceful stop, again with requests in flight: their lines are written at exit.
    slow_at_stop = await Slow(p, origin, 4, 1.0).start()
    p.signal(signal.SIGTERM)
    assert await slow_at_stop.finish() == [200] * 4
    assert await p.wait_exit(20.0) == 0, p.log()

    served = load.ok + 8
    assert load.statuses == {200: load.ok}, load.statuses
    records = read_lines(log_path)
    print(f"served {served}, logged {len(records)}, retried connects {len(load.retried)}")
    assert len(records) == served
    assert len({r["request_id"] for r in records}) == served, "request ids are unique"
    assert {r["status"] for r in records} == {200}
    assert {r["route"] for r in records} == {"marker", "all"}
    slow_lines = [r for r in records if r["path"] == "/slow"]
    assert len(slow_lines) == 8 and {r["query"] for r in slow_lines} == {"d=1"}
    assert all(r["upstream"] == "origin" and r["upstream_ms"] >= 900 for r in slow_lines)
    assert all(r["duration_ms"] >= r["upstream_ms"] for r in slow_lines)
    marker = [r for r in records if r["path"] == "/marker"]
    assert marker and all(r["upstream"] == "" and r["upstream_ms"] is None for r in marker)
    assert len({r["pid"] for r in records}) >= 4, "two generations of two workers each"


async def test_sigusr1_after_rename_moves_writing_to_a_new_file(
    origin: Origin, proxyd: StartProxyd, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    ports = Ports()
    p = await proxyd(logging_config(ports, origin.url, log_path), ports=ports)
    load = Exact(p.url)
    await load.run(300)

    log_path.rename(rotated)  # logrotate's move; the workers still hold the old file
    await load.run(200)
    assert not log_path.exists()
    p.signal(signal.SIGUSR1)
    await wait_until(log_path.exists, 5.0, "a new file at the original path")
    await asyncio.sleep(0.3)  # every worker has its control message by now
    before_reopen = load.ok
    await load.run(300)

    # New lines reach the new file while proxyd runs (flushed about every 0.1 s).
    await wait_until(lambda: len(log_path.read_text().splitlines()) >= 300, 5.0,
                     "the new requests' lines in the new file")
    assert len(read_lines(rotated)) == before_reopen, "the old file got every line before"

    p.signal(signal.SIGTERM)
    assert await p.wait_exit(20.0) == 0, p.log()
    old, new = read_lines(rotated), read_lines(log_path)
    print(f"served {load.ok}: {len(old)} lines in the rotated file, {len(new)} in the new one")
    assert (len(old), len(new)) == (before_reopen, load.ok - before_reopen)
    assert len({r["request_id"] for r in old + new}) == load.ok
