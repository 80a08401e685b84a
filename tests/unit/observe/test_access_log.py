"""The access log's line formatting and its table of escaped constant fields."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from proxyd.config.models import AccessLogSettings
from proxyd.observe.access_log import AccessLog

FIELDS: dict[str, Any] = {
    "request_id": "ab-1", "client_ip": b"127.0.0.1", "method": b"GET", "host": b"example.com",
    "target": b"/p?q=1", "status": 200, "bytes_in": 0, "bytes_out": 5, "duration": 0.001,
    "upstream": "backend", "upstream_time": 0.0005, "cache": "", "route": "api",
}


@pytest.fixture
def log(tmp_path: Path) -> Any:
    loop = asyncio.new_event_loop()
    access = AccessLog(AccessLogSettings(format="json", path=str(tmp_path / "a.log")), loop, "ab")
    yield access, tmp_path / "a.log"
    access.close()
    loop.close()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_are_json_with_every_field_whether_escaped_fresh_or_remembered(log: Any) -> None:
    access, path = log
    for host in (b"example.com", b"example.com", b'q"uote\xe9.example'):
        access.record(**{**FIELDS, "host": host})
    access.flush()
    got = lines(path)
    assert [g["host"] for g in got] == ["example.com", "example.com", 'q"uote\u00e9.example']
    assert got[0] == {**got[0], "method": "GET", "path": "/p", "query": "q=1", "status": 200,
                      "route": "api", "upstream": "backend", "cache": "", "request_id": "ab-1"}
    assert got[0]["upstream_ms"] == 0.5 and got[0]["duration_ms"] == 1.0


def test_client_chosen_hosts_cannot_grow_the_table_without_bound(log: Any) -> None:
    access, path = log
    for i in range(3000):  # a scan: every request a new Host, some of them huge
        access.record(**{**FIELDS, "host": b"h%d." % i + (b"\xe9" * 8192 if i % 2 else b"")})
    access.flush()  # (lines, and the table, are made at the flush)
    assert len(access._escaped) <= 1024
    assert all(len(key[1] or b"") <= 128 for key in access._escaped)
    access.record(**FIELDS)  # a table that filled up starts over: common hosts are cached again
    access.flush()
    assert (b"GET", b"example.com", "backend", "", "api") in access._escaped
    assert len(lines(path)) == 3001


@pytest.mark.parametrize("fmt", ["json", "template"])
def test_counter_request_ids_are_made_at_the_flush_with_the_worker_prefix(
    tmp_path: Path, fmt: str
) -> None:
    loop = asyncio.new_event_loop()
    path = tmp_path / "a.log"
    template = "$status $request_id" if fmt == "template" else None
    access = AccessLog(AccessLogSettings(format=fmt, path=str(path), template=template), loop,
                       "cafe0001")
    try:
        access.record(**{**FIELDS, "request_id": 255})
        access.record(**{**FIELDS, "request_id": 'in"bound'})  # a client's: escaped in JSON
        access.flush()
    finally:
        access.close()
        loop.close()
    text = path.read_text().splitlines()
    if fmt == "json":
        assert [json.loads(line)["request_id"] for line in text] == ["cafe0001-ff", 'in"bound']
    else:
        assert text == ["200 cafe0001-ff", "200 in\\x22bound"]
