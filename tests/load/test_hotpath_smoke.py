"""CI smoke run of tests/load/hotpath.py, so the profiling harness cannot rot.

The harness drives a worker's protocols with in-memory transports; when the data plane changes
shape (a new attribute a transport must have, a new pool bookkeeping step), it would silently
stop measuring. This runs a few hundred requests per scenario and checks every one was answered
in full. It asserts nothing about speed (that is the benchmarks' business).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hotpath


@pytest.mark.parametrize("scenario", ["plain", "chain", "mw", "cache", "relay", "+log", "+gzip"])
def test_hotpath_harness_answers_every_request(tmp_path: Path, scenario: str) -> None:
    driver = hotpath.Driver(scenario, tmp_path)

    async def run() -> None:
        driver.setup(asyncio.get_running_loop())
        answers: list[bytes] = []
        driver.client.on_write = answers.append
        driver.rounds(100, 2)  # one warm-up request, then 2 rounds of 100
        driver.pipeline.close()
        heads = [a for a in answers if a.startswith(b"HTTP/1.1 ")]
        assert len(heads) == 201
        assert all(h.startswith(b"HTTP/1.1 200 ") for h in heads)
        if scenario == "cache":
            assert sum(b"Cache-Status: proxyd; hit" in h for h in heads) == 200
        else:
            assert driver.conn.transport is not None and driver.conn.reused
        if scenario == "+gzip":  # the build-up's last step compresses
            assert all(b"\r\nContent-Encoding: gzip\r\n" in h for h in heads)
        if scenario == "mw":  # bench.py's config for the mw chain is the one in force
            assert all(b"\r\nX-Route: all\r\n" in h and b"\r\nServer:" not in h
                       and b"\r\nETag: " in h for h in heads)

    uvloop.run(run())
