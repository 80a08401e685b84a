"""The access log against a reader that does not keep up, and against failing writes.

A pipe or socket whose reader stalls must neither block the worker nor make it retry in a
loop: lines wait in a bounded backlog, what does not fit is dropped and counted, and what
reaches the reader is whole lines. A write that fails (a full disk) is counted, and reported
on the worker's log at most once per REPORT_INTERVAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxyd.config.models import AccessLogSettings
from proxyd.observe import access_log as access_log_module
from proxyd.observe.access_log import FLUSH_RECORDS, MAX_BACKLOG, AccessLog
from proxyd.observe.metrics import WorkerMetrics

FIELDS: dict[str, Any] = {
    "request_id": "ab-1", "client_ip": b"127.0.0.1", "method": b"GET", "host": b"example.com",
    "target": b"/p?q=1", "status": 200, "bytes_in": 0, "bytes_out": 5, "duration": 0.001,
    "upstream": "backend", "upstream_time": 0.0005, "cache": "", "route": "api",
}
DROPPED = "gateway_access_log_dropped_lines_total"
ERRORS = "gateway_access_log_write_errors_total"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@contextlib.contextmanager
def as_stdout(fd: int) -> Iterator[None]:
    """fd on descriptor 1 for the block (as a supervisor would start proxyd)."""
    saved = os.dup(1)
    os.dup2(fd, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def record(access: AccessLog, n: int, pad: int = 0) -> None:
    for i in range(n):
        access.record(**{**FIELDS, "request_id": f"r{i}", "target": b"/p?" + b"x" * pad})


def read_all(fd: int) -> bytes:
    """Whatever the pipe or socket holds now (fd non-blocking)."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def parse(data: bytes) -> list[dict[str, Any]]:
    assert data == b"" or data.endswith(b"\n"), "half a line"
    return [json.loads(line) for line in data.splitlines()]


def stalled_reader_is_bounded_and_counted(access: AccessLog, metrics: WorkerMetrics,
                                          reader: int) -> None:
    """Shared by the pipe and the socket cases: 20,000 requests' lines against a reader that
    takes nothing; then the reader catches up and gets whole lines only."""
    started = time.monotonic()
    record(access, 20_000, pad=200)  # ~10 MiB of lines
    access.flush()
    assert time.monotonic() - started < 20, "writes must not wait for the reader"
    line = len(json.dumps({}).encode()) + 400
    assert 0 < access.backlog <= MAX_BACKLOG + FLUSH_RECORDS * line
    assert access.dropped > 0 and access.write_errors == 0
    assert metrics.counters[DROPPED] == {("stalled",): access.dropped}

    got = b""
    deadline = time.monotonic() + 20
    while access.backlog and time.monotonic() < deadline:  # the reader wakes up
        got += read_all(reader)
        access.flush()
    got += read_all(reader)
    assert access.backlog == 0
    lines = parse(got)  # whole lines, nothing torn between two writes
    assert len(lines) == access.written
    assert access.written + access.dropped == 20_000
    ids = [int(r["request_id"][1:]) for r in lines]
    assert ids == sorted(ids), "in order"


def test_a_pipe_whose_reader_stalls_never_blocks_and_drops_counted_whole_lines(
    loop: asyncio.AbstractEventLoop
) -> None:
    """stdout a blocking pipe, as most supervisors leave it: the log writes it through a
    description of its own, non-blocking, and fd 1 stays as it was for everyone else."""
    reader, writer = os.pipe()
    os.set_blocking(reader, False)
    metrics = WorkerMetrics()
    try:
        with as_stdout(writer):
            access = AccessLog(AccessLogSettings(path="-"), loop, "ab", metrics)
            try:
                stalled_reader_is_bounded_and_counted(access, metrics, reader)
                assert os.get_blocking(1), "fd 1's own description is left blocking"
            finally:
                access.close()
    finally:
        os.close(reader)
        os.close(writer)


def test_a_socket_whose_reader_stalls_never_blocks(loop: asyncio.AbstractEventLoop) -> None:
    """stdout a stream socket (journald's, under systemd): sent to with MSG_DONTWAIT."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    metrics = WorkerMetrics()
    try:
        with as_stdout(ours.fileno()):
            access = AccessLog(AccessLogSettings(path="-"), loop, "ab", metrics)
            try:
                stalled_reader_is_bounded_and_counted(access, metrics, theirs.fileno())
                assert os.get_blocking(1)
            finally:
                access.close()
    finally:
        ours.close()
        theirs.close()


def test_a_named_pipe_path_is_written_without_blocking(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    metrics = WorkerMetrics()
    try:
        access = AccessLog(AccessLogSettings(path=str(fifo)), loop, "ab", metrics)
        try:
            stalled_reader_is_bounded_and_counted(access, metrics, reader)
        finally:
            access.close()
    finally:
        os.close(reader)


def test_a_line_longer_than_an_atomic_pipe_write_still_arrives_whole(
    loop: asyncio.AbstractEventLoop
) -> None:
    reader, writer = os.pipe()
    os.set_blocking(reader, False)
    try:
        with as_stdout(writer):
            access = AccessLog(AccessLogSettings(path="-"), loop, "ab")
            try:
                record(access, 3)
                record(access, 1, pad=3 * select.PIPE_BUF)
                record(access, 3)
                access.flush()
                lines = parse(read_all(reader))
            finally:
                access.close()
    finally:
        os.close(reader)
        os.close(writer)
    assert [len(r["query"]) for r in lines] == [0, 0, 0, 3 * select.PIPE_BUF, 0, 0, 0]


def test_a_retry_is_scheduled_not_spun(loop: asyncio.AbstractEventLoop) -> None:
    """With lines waiting for the reader, the log tries again on its flush timer: a few
    failed writes a second while the reader sleeps, not a loop."""
    reader, writer = os.pipe()
    os.set_blocking(reader, False)
    writes = 0
    try:
        with as_stdout(writer):
            access = AccessLog(AccessLogSettings(path="-"), loop, "ab")
            real = access._write

            def counting(data: memoryview) -> int:
                nonlocal writes
                writes += 1
                return real(data)

            access._write = counting
            try:
                record(access, 2000, pad=200)
                assert access.backlog > 0
                before = writes
                loop.run_until_complete(asyncio.sleep(0.5))
                # About five retries at one try per FLUSH_INTERVAL (the pipe takes nothing).
                assert 1 <= writes - before <= 10, writes - before
                read_all(reader)  # the reader catches up: the timer delivers the rest
                deadline = time.monotonic() + 5
                while access.backlog and time.monotonic() < deadline:
                    loop.run_until_complete(asyncio.sleep(0.05))
                    read_all(reader)
                assert access.backlog == 0 and access.written == 2000
            finally:
                access.close()
    finally:
        os.close(reader)
        os.close(writer)


def test_a_stop_gives_a_stalled_reader_a_moment_then_counts_what_is_left(
    loop: asyncio.AbstractEventLoop
) -> None:
    reader, writer = os.pipe()
    metrics = WorkerMetrics()
    try:
        with as_stdout(writer):
            access = AccessLog(AccessLogSettings(path="-"), loop, "ab", metrics)
            record(access, 1000, pad=200)
            access.flush()
            waiting = access.backlog
            assert waiting > 0
            started = time.monotonic()
            access.close()
            assert time.monotonic() - started < access_log_module.CLOSE_WAIT + 2
    finally:
        os.close(reader)
        os.close(writer)
    assert access.backlog == 0
    assert access.written + access.dropped == 1000
    assert metrics.counters[DROPPED][("stalled",)] == access.dropped > 0


def test_a_full_disk_counts_errors_and_reports_them_at_most_every_interval(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access_log_module, "REPORT_INTERVAL", 0.3)
    metrics = WorkerMetrics()
    access = AccessLog(AccessLogSettings(path="/dev/full"), loop, "ab", metrics)
    caplog.set_level(logging.WARNING, logger="proxyd.access_log")

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "proxyd.access_log"]

    try:
        for _ in range(5):  # five flushes, five failed writes: one message so far
            record(access, 10)
            access.flush()
        assert access.written == 0 and access.dropped == 50 and access.write_errors == 5
        assert metrics.counters[ERRORS] == {("ENOSPC",): 5}
        assert metrics.counters[DROPPED] == {("write_error",): 50}
        assert len(messages()) == 1
        assert "/dev/full" in messages()[0] and "10 lines dropped" in messages()[0]
        assert "No space left on device" in messages()[0]

        # Past the interval, what was lost meanwhile is summed up in one more message.
        deadline = time.monotonic() + 5
        while len(messages()) < 2 and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.05))
        assert len(messages()) == 2 and "40 lines dropped" in messages()[1]
    finally:
        access.close()
    assert len(messages()) == 2, "nothing was left to say at close"
