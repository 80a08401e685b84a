"""CI smoke run of the locust scenario (gateway_performance_test.py), so it cannot rot.

Starts an aiohttp origin and a real ``proxyd run`` (one worker) on free ports, with a cached
route for the cached GETs and a plain route for the uncached GETs and the POSTs, runs locust
headless for a few seconds in a subprocess (locust's gevent patching stays out of pytest), and
asserts that requests were made and none failed.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (pip install -e '.[dev]')", allow_module_level=True)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LOCUSTFILE = HERE / "gateway_performance_test.py"

ORIGIN = r"""
import json, sys
from aiohttp import web

async def product(request):
    body = {"id": request.match_info["key"], "name": "widget", "price": 9.99}
    return web.json_response(body, headers={"Cache-Control": "public, max-age=60"})

async def user(request):
    return web.json_response({"id": request.match_info["id"], "name": "user"},
                             headers={"Cache-Control": "no-store"})

async def order(request):
    data = await request.json()
    return web.json_response({"accepted": data}, status=201)

async def health(request):
    return web.Response(text="ok")

app = web.Application()
app.router.add_get("/api/products/{key}", product)
app.router.add_get("/api/users/{id}", user)
app.router.add_post("/api/orders", order)
app.router.add_get("/health", health)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_status(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_ok(port: int, path: str, proc: subprocess.Popen[bytes], log: Path,
            timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if get_status(port, path) == 200:
            return
        time.sleep(0.05)
    pytest.fail(f"no 200 from :{port}{path} after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait, then SIGKILL the whole process group (it was started in its own)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@contextlib.contextmanager
def started(argv: list[str], log: Path, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        yield proc
    finally:
        stop(proc)


@pytest.mark.timeout(90)
def test_locust_scenario_runs_without_failures(tmp_path: Path) -> None:
    origin_port, port, admin = free_port(), free_port(), free_port()
    config = {
        "server": {"listen": [f"127.0.0.1:{port}"], "workers": 1, "max_requests": 0,
                   "drain_timeout": "2s"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin_port}"]}},
        "routes": [
            {"name": "catalog", "match": {"path_prefix": "/api/products/", "methods": ["GET"]},
             "upstream": "origin", "cache": {"ttl": "60s"}},
            {"name": "api", "match": {"path_prefix": "/api/"}, "upstream": "origin"},
        ],
        "middleware": [{"type": "cache"}],
        "access_log": {"enabled": False},
    }
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}

    with (
        started([sys.executable, "-c", ORIGIN, str(origin_port)], tmp_path / "origin.log",
                env) as origin,
        started([sys.executable, "-m", "proxyd", "run", "-c", str(config_path)],
                tmp_path / "proxyd.log", env) as proxyd,
    ):
        wait_ok(origin_port, "/health", origin, tmp_path / "origin.log")
        wait_ok(port, "/api/products/1", proxyd, tmp_path / "proxyd.log")

        csv_prefix = tmp_path / "smoke"
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
             "--users", "5", "--spawn-rate", "5", "--run-time", "5s", "--stop-timeout", "2",
             "--host", f"http://127.0.0.1:{port}", "--csv", str(csv_prefix), "--only-summary",
             "--loglevel", "WARNING"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={**env, "LOCUST_WAIT_MIN": "0.01", "LOCUST_WAIT_MAX": "0.1"},
            start_new_session=True,
        )
        output = run.stdout[-3000:] + run.stderr[-3000:]
        assert proxyd.poll() is None, f"proxyd exited:\n{(tmp_path / 'proxyd.log').read_text()}"

    rows = csv.DictReader(Path(f"{csv_prefix}_stats.csv").read_text().splitlines())
    stats = {row["Name"]: row for row in rows}
    total = stats["Aggregated"]
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    assert requests > 0, output
    assert failures == 0, f"{failures} of {requests} requests failed:\n{output}"
    assert run.returncode == 0, output
    names = set(stats) - {"Aggregated"}
    assert any("(cached)" in n for n in names), names
