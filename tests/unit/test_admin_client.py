"""``proxyd status``'s table: per-worker requests, connections and cache use."""

from __future__ import annotations

import time

from proxyd.admin_client import format_status


def test_status_table_shows_cache_entries_and_bytes() -> None:
    now = time.time()
    data = {
        "version": "1.0", "pid": 10, "state": "running", "generation": 2,
        "workers": [
            {"slot": 0, "pid": 11, "generation": 2, "state": "ready", "requests": 1234,
             "connections": 7, "cache": {"entries": 42, "bytes": 3 * 1024 * 1024 + 1},
             "started_at": now - 5},
            {"slot": 1, "pid": 12, "generation": 2, "state": "starting", "requests": 0,
             "connections": 0, "cache": {}, "started_at": now},
        ],
    }
    lines = format_status(data).splitlines()
    header = next(line for line in lines if line.lstrip().startswith("SLOT"))
    assert header.split() == ["SLOT", "PID", "GEN", "STATE", "REQUESTS", "CONNS", "CACHE",
                              "CACHE", "SIZE", "UPTIME"]
    row = next(line for line in lines if line.split()[:2] == ["0", "11"])
    assert row.split()[4:8] == ["1234", "7", "42", "3.0MiB"]
    row = next(line for line in lines if line.split()[:2] == ["1", "12"])
    assert row.split()[4:8] == ["0", "0", "-", "-"]  # no stats pushed yet
