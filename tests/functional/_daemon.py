"""Real ``python -m proxyd run`` processes for functional tests that need a master: the
``daemon`` fixture, a small config for it, and atomic file replacement (renewals, edits).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    traffic: int
    admin: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await daemon(config_dict)`` → a running ``python -m proxyd run`` (its own group)."""
    started: list[Daemon] = []

    async def start(config: dict[str, Any], traffic: int, admin: int,
                    token: str = "") -> Daemon:
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log_path = tmp_path / "proxyd.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "proxyd", "run", "-c", str(path)],
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        d = Daemon(proc, path, log_path, traffic, admin)
        started.append(d)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.poll() is None, f"proxyd exited:\n{d.log()}"
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"http://127.0.0.1:{admin}/health/ready") as r:
                        if r.status == 200:
                            return d
                assert time.monotonic() < deadline, f"proxyd not ready:\n{d.log()}"
                await asyncio.sleep(0.05)

    try:
        yield start
    finally:
        for d in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(d.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(d.proc.wait, 15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(d.proc.wait, 5)


def daemon_config(traffic: int, admin: int, upstream_url: str, *,
                  listen: Any = None, admin_extra: dict[str, Any] | None = None,
                  marker: str = "v1") -> dict[str, Any]:
    return {
        "server": {"listen": listen or [f"127.0.0.1:{traffic}"], "workers": 1,
                   "max_requests": 0, "max_requests_jitter": 0, "drain_timeout": "2s"},
        "admin": {"listen": f"127.0.0.1:{admin}", **(admin_extra or {})},
        "upstreams": {"backend": {"targets": [upstream_url]}},
        "routes": [{"name": "marker", "match": {"path": "/marker"},
                    "respond": {"body": marker}},
                   {"name": "all", "match": {"path_prefix": "/"}, "upstream": "backend"}],
        "access_log": {"enabled": False},
    }
