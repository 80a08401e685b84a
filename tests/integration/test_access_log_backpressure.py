"""The access log never stops a worker, and never loses a line without saying so.

A real ``proxyd run`` whose stdout is a pipe the test does not read (a supervisor's log
collector that stalled): the worker keeps answering, sits idle at idle CPU afterwards, and the
lines it could not keep are counted on /metrics; once the reader catches up it gets whole
lines. With the log on a full disk (/dev/full): requests succeed, the failed writes are
counted, and the worker's stderr says so — once, not once per write.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration._exact import Exact
from tests.integration.conftest import (
    Ports,
    Proxyd,
    live_workers,
    make_config,
    wait_until,
    write_config,
)

DROPPED = "gateway_access_log_dropped_lines_total"
ERRORS = "gateway_access_log_write_errors_total"
REQUESTS = 2000
# Answered by the worker itself; the query pads each line to ~2.3 KiB, so 2,000 lines (~4.6
# MiB) are more than the pipe (64 KiB) and the worker's backlog (1 MiB) hold together.
PADDED = "/marker?pad=" + "x" * 2000

Start = Callable[..., Awaitable[Proxyd]]


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """(read end, write end) of the pipe that is proxyd's stdout."""
    reader, writer = os.pipe()
    try:
        yield reader, writer
    finally:
        os.close(reader)
        os.close(writer)


@pytest.fixture
async def start_proxyd(
    tmp_path: Path, process_groups: list[int]
) -> AsyncIterator[Start]:
    """``await start_proxyd(config, stdout=fd)`` → a ready Proxyd; stderr goes to its log."""
    started: list[Proxyd] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def start(config: dict[str, Any], *, ports: Ports, stdout: int) -> Proxyd:
        path = write_config(tmp_path / "gateway.yaml", config)
        log_path = tmp_path / "gateway.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxyd", "run", "-c", str(path)],
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=log, start_new_session=True,
            )
        process_groups.append(proc.pid)
        p = Proxyd(proc, path, log_path, ports, session)
        started.append(p)
        await p.wait_ready()
        return p

    try:
        yield start
    finally:
        for p in started:
            if p.proc.poll() is None:
                p.proc.kill()
            await asyncio.to_thread(p.proc.wait, 10)
        await session.close()


def logging_config(ports: Ports, path: str) -> dict[str, Any]:
    config = make_config(ports, "http://127.0.0.1:9", workers=1)  # no upstream is used
    config["access_log"] = {"enabled": True, "format": "json", "path": path}
    return config


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def worker_pid(p: Proxyd) -> int:
    workers = live_workers(await p.status())
    assert len(workers) == 1, workers
    return int(workers[0]["pid"])


async def counter(p: Proxyd, name: str, label: str) -> dict[str, float]:
    """One counter of the admin port's /metrics, by the value of one label."""
    async with p.admin_session.get(f"{p.admin_url}/metrics") as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    return {s.labels[label]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


@pytest.mark.parametrize("supervisor_nonblocking", [True, False],
                         ids=["nonblocking-pipe", "blocking-pipe"])
async def test_a_stdout_pipe_nobody_reads_never_stops_the_worker(
    start_proxyd: Start, pipe: tuple[int, int], supervisor_nonblocking: bool
) -> None:
    reader, writer = pipe
    # Some supervisors set O_NONBLOCK on the pipe they hand over; others leave it blocking.
    os.set_blocking(writer, not supervisor_nonblocking)
    ports = Ports()
    p = await start_proxyd(logging_config(ports, "-"), ports=ports, stdout=writer)
    pid = await worker_pid(p)

    load = Exact(p.url, paths=(PADDED,))
    started = time.monotonic()
    try:
        await asyncio.wait_for(load.run(REQUESTS), 60)
    except TimeoutError:
        raise AssertionError(f"{load.ok} of {REQUESTS} answered before a timeout; worker "
                             f"CPU {cpu_seconds(pid):.1f} s\n{p.log()}") from None
    elapsed = time.monotonic() - started
    assert load.statuses == {200: REQUESTS}, load.statuses
    assert elapsed < 30, f"{REQUESTS} requests took {elapsed:.1f}s"

    # The lines that did not fit are counted (workers push their counters every second).
    dropped = await wait_until(
        lambda: _positive(counter(p, DROPPED, "reason")), 10, "dropped lines on /metrics")
    assert set(dropped) == {"stalled"}

    # Idle with lines still waiting for the reader: retried on a timer, not in a loop.
    before, at = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(2.0)  # the interval measured, not a wait for something to happen
    busy = (cpu_seconds(pid) - before) / (time.monotonic() - at)
    assert busy < 0.2, f"the idle worker used {busy:.0%} of a core"
    p.check_alive()

    # The reader wakes up: what the worker kept reaches it as whole lines, in order, and
    # with the dropped ones accounts for every request.
    os.set_blocking(reader, False)
    got = bytearray()

    async def caught_up() -> dict[str, float] | None:
        while True:
            try:
                chunk = os.read(reader, 1 << 16)
            except BlockingIOError:
                break
            got.extend(chunk)
        lost = await counter(p, DROPPED, "reason")
        if got.endswith(b"\n") and got.count(b"\n") + lost.get("stalled", 0) == REQUESTS:
            return lost
        return None

    await wait_until(caught_up, 20, "the kept lines and the dropped count to add up")
    records = [json.loads(line) for line in got.splitlines()]
    assert {r["path"] for r in records} == {"/marker"}
    assert 0 < len(records) < REQUESTS
    print(f"{REQUESTS} requests in {elapsed:.1f}s; {len(records)} lines read, "
          f"{REQUESTS - len(records)} dropped; idle worker at {busy:.1%} of a core")


async def _positive(values: Awaitable[dict[str, float]]) -> dict[str, float] | None:
    got = await values
    return got if got and all(v > 0 for v in got.values()) else None


async def _at_least(values: Awaitable[dict[str, float]], n: int) -> bool:
    return sum((await values).values()) >= n


async def test_a_log_on_a_full_disk_is_counted_and_reported_once(
    start_proxyd: Start, tmp_path: Path
) -> None:
    ports = Ports()
    with open(tmp_path / "stdout", "wb") as stdout:
        p = await start_proxyd(logging_config(ports, "/dev/full"), ports=ports,
                               stdout=stdout.fileno())
    load = Exact(p.url, paths=("/marker",))
    # Several batches, each written (and failing) on a flush of its own.
    for batch in range(1, 5):
        await load.run(50)
        await wait_until(lambda b=batch: _at_least(counter(p, ERRORS, "errno"), b), 10,
                         f"failed write {batch} counted")
    assert load.statuses == {200: 200}, load.statuses

    async def counted() -> tuple[dict[str, float], dict[str, float]] | None:
        dropped = await counter(p, DROPPED, "reason")
        errors = await counter(p, ERRORS, "errno")
        return (dropped, errors) if dropped.get("write_error") == 200 else None

    dropped, errors = await wait_until(counted, 10, "every line counted as dropped")
    assert set(dropped) == {"write_error"}
    assert set(errors) == {"ENOSPC"} and errors["ENOSPC"] >= 4, errors

    warnings = [line for line in p.log(tail=1000).splitlines() if "access log to" in line]
    assert len(warnings) == 1, warnings  # rate-limited: the next one 10 s later at the earliest
    assert "/dev/full" in warnings[0] and "No space left on device" in warnings[0]
    assert "WARNING" in warnings[0]
