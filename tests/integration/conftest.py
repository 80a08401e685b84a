"""Integration fixtures: real ``proxyd run`` subprocesses, a real origin, real load.

Every proxyd is started in its own session (process group = master pid), so teardown can kill
the master and any worker it left behind by that one group id, without matching names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(
    probe: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.02,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = probe()
            if asyncio.iscoroutine(result):
                result = await result
            last = result
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            last = exc
            result = None
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


# -- the origin ---------------------------------------------------------------------------------


@dataclass
class Origin:
    port: int
    runner: web.AppRunner
    slow_started: int = 0
    slow_finished: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    """An aiohttp origin: GET / (fixed body), POST /echo (echoes), GET /slow?d=seconds."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    holder: list[Origin] = []

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello from origin")

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body, content_type="application/octet-stream")

    async def slow(request: web.Request) -> web.Response:
        o = holder[0]
        o.slow_started += 1
        await asyncio.sleep(float(request.query.get("d", "1")))
        o.slow_finished += 1
        return web.Response(text="slow done")

    app.router.add_get("/", hello)
    app.router.add_post("/echo", echo)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    holder.append(Origin(sock.getsockname()[1], runner))
    try:
        yield holder[0]
    finally:
        await runner.cleanup()


# -- config files -------------------------------------------------------------------------------


@dataclass
class Ports:
    traffic: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)


def make_config(
    ports: Ports,
    origin_url: str,
    *,
    workers: int = 2,
    server: dict[str, Any] | None = None,
    admin: dict[str, Any] | None = None,
    marker: str = "v1",
) -> dict[str, Any]:
    return {
        "server": {
            "listen": [f"127.0.0.1:{ports.traffic}"],
            "workers": workers,
            "backlog": 1024,
            "keepalive_timeout": "5s",
            "max_requests": 0,
            "max_requests_jitter": 0,
            "drain_timeout": "10s",
            **(server or {}),
        },
        "admin": {"listen": f"127.0.0.1:{ports.admin}", **(admin or {})},
        "upstreams": {"origin": {"targets": [origin_url]}},
        "routes": [
            # Which config a worker runs: answered by the worker itself, no upstream involved.
            {"name": "marker", "match": {"path": "/marker"}, "respond": {"body": marker}},
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "origin"},
        ],
        "access_log": {"enabled": False},
    }


def write_config(path: Path, config: dict[str, Any] | str) -> Path:
    """Write atomically: a reload must never read a half-written file."""
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# -- proxyd processes ---------------------------------------------------------------------------


@dataclass
class Proxyd:
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    ports: Ports
    admin_session: aiohttp.ClientSession

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.admin}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.traffic}"

    def log(self, tail: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-tail:])

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    async def status(self) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=5)
        async with self.admin_session.get(f"{self.admin_url}/status", timeout=timeout) as r:
            assert r.status == 200, await r.text()
            data: dict[str, Any] = await r.json()
            return data

    async def get_admin(self, path: str) -> tuple[int, Any]:
        async with self.admin_session.get(f"{self.admin_url}{path}") as r:
            return r.status, await r.json()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"proxyd exited with {self.proc.returncode}:\n{self.log()}")

    async def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            self.check_alive()
            async with self.admin_session.get(f"{self.admin_url}/health/ready") as r:
                if r.status != 200:
                    return None
            return await self.status()

        return await wait_until(probe, timeout, "proxyd ready")

    async def wait_generation(self, generation: int, timeout: float = 20.0) -> dict[str, Any]:
        """Until /status shows ``generation`` current with every slot's worker ready."""

        async def probe() -> dict[str, Any] | None:
            self.check_alive()
            st = await self.status()
            if st["generation"] != generation:
                return None
            ready = {w["slot"] for w in live_workers(st) if w["generation"] == generation}
            return st if ready >= set(range(st["worker_count"])) else None

        try:
            return await wait_until(probe, timeout, f"generation {generation} ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstatus: {await self.status()}\n"
                                 f"log:\n{self.log()}") from None

    async def wait_exit(self, timeout: float) -> int:
        def probe() -> list[int] | None:
            code = self.proc.poll()
            return None if code is None else [code]

        return (await wait_until(probe, timeout, "proxyd to exit"))[0]

    async def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``proxyd <args>`` in a thread (the test's loop also runs the origin)."""
        cmd = [sys.executable, "-m", "proxyd", *args]
        return await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, text=True, timeout=timeout, check=False
        )


def live_workers(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for w in status["workers"] if w["state"] != "draining"]


def pids_by_slot(status: dict[str, Any]) -> dict[int, int]:
    return {w["slot"]: w["pid"] for w in live_workers(status)
            if w["generation"] == status["generation"] and w["state"] == "ready"}


StartProxyd = Callable[..., Awaitable[Proxyd]]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
def process_groups() -> Iterator[list[int]]:
    """Process groups started by a test; whatever is left in them is SIGKILLed at teardown."""
    groups: list[int] = []
    try:
        yield groups
    finally:
        for pgid in groups:
            _kill_group(pgid)


@pytest.fixture
async def proxyd(
    tmp_path: Path, process_groups: list[int]
) -> AsyncIterator[StartProxyd]:
    """``await proxyd(config_dict_or_text, env=...)`` → a running, ready Proxyd."""
    started: list[Proxyd] = []
    logs: list[Any] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def start(config: dict[str, Any], *, ports: Ports, env: dict[str, str] | None = None,
                    args: tuple[str, ...] = (), wait: bool = True,
                    name: str = "gateway") -> Proxyd:
        path = write_config(tmp_path / f"{name}.yaml", config)
        log_path = tmp_path / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed at teardown
        logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxyd", "run", "-c", str(path), *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        process_groups.append(proc.pid)
        p = Proxyd(proc, path, log_path, ports, session)
        started.append(p)
        if wait:
            await p.wait_ready()
        return p

    try:
        yield start
    finally:
        for p in started:
            if p.proc.poll() is None:
                _kill_group(p.pid)
            # Reap the master (or learn it was already reaped); SIGKILL makes this quick.
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(p.proc.wait, 10)
            _kill_group(p.pid)  # orphaned workers of a master that died first
        await session.close()
        for log in logs:
            log.close()


# -- load -----------------------------------------------------------------------------------------


@dataclass
class Failure:
    started: float  # time.monotonic() when the request began
    at: float  # ... and when it failed
    kind: str  # "get" | "post"
    what: str


@dataclass
class Load:
    """Closed-loop load: GETs on a new connection each, keep-alive POSTs whose echo is checked.

    Every exception and every non-2xx or wrong body counts as a failure.
    """

    url: str
    get_clients: int = 4
    post_clients: int = 4
    # Keep-alive POST clients that pause between requests: their connections sit idle when a
    # drain begins, and must still be answered (a drain keeps idle keep-alives to their deadline).
    idle_clients: int = 0
    idle_pause: float = 0.3
    get_path: str = "/"
    expect_get: bytes = b"hello from origin"
    ok: int = 0
    ok_get: int = 0
    ok_post: int = 0
    failures: list[Failure] = field(default_factory=list)
    slowest: float = 0.0  # seconds, the slowest successful request
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def concurrency(self) -> int:
        return self.get_clients + self.post_clients + self.idle_clients

    async def start(self) -> Load:
        timeout = aiohttp.ClientTimeout(total=15)
        get_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0), timeout=timeout
        )
        post_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.post_clients), timeout=timeout
        )
        idle_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(1, self.idle_clients)), timeout=timeout
        )
        self._sessions = [get_session, post_session, idle_session]
        for session in self._sessions:
            # aiohttp silently retries an idempotent request once after a reset or disconnect,
            # even on a fresh connection: that would hide exactly the failures counted here.
            # (aiohttp's own test client switches it off the same way.)
            session._retry_connection = False
        for _ in range(self.get_clients):
            self._tasks.append(asyncio.create_task(self._get_loop(get_session)))
        for n in range(self.post_clients):
            self._tasks.append(asyncio.create_task(self._post_loop(post_session, n)))
        for n in range(self.idle_clients):
            self._tasks.append(asyncio.create_task(
                self._post_loop(idle_session, 1000 + n, self.idle_pause)))
        return self

    def _fail(self, started: float, kind: str, what: str | BaseException) -> None:
        if isinstance(what, BaseException):
            what = f"{type(what).__name__}: {what}"
        self.failures.append(Failure(started, time.monotonic(), kind, what))

    async def _get_loop(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                async with session.get(self.url + self.get_path) as r:
                    body = await r.read()
                    if r.status != 200 or body != self.expect_get:
                        self._fail(started, "get", f"status {r.status} body {body[:80]!r}")
                        continue
                self.ok += 1
                self.ok_get += 1
                self.slowest = max(self.slowest, time.monotonic() - started)
            except Exception as exc:
                self._fail(started, "get", exc)
                await asyncio.sleep(0.01)  # no busy loop against a closed port

    async def _post_loop(
        self, session: aiohttp.ClientSession, n: int, pause: float = 0.0
    ) -> None:
        i = 0
        while not self._stop.is_set():
            if pause:
                await asyncio.sleep(pause)
            i += 1
            # Varying sizes (up to ~48 KiB) so bodies span several reads and writes.
            body = (f"client {n} request {i} ".encode() * (1 + (i * 97) % 2000))
            started = time.monotonic()
            try:
                async with session.post(self.url + "/echo", data=body) as r:
                    echoed = await r.read()
                    if r.status != 200 or echoed != body:
                        self._fail(started, "post", f"status {r.status} echo mismatch "
                                           f"({len(echoed)} vs {len(body)} bytes)")
                        continue
                self.ok += 1
                self.ok_post += 1
                self.slowest = max(self.slowest, time.monotonic() - started)
            except Exception as exc:
                self._fail(started, "post", exc)
                await asyncio.sleep(0.01)

    async def wait_flowing(self, count: int = 200, timeout: float = 15.0) -> None:
        target = self.ok + count
        await wait_until(lambda: self.ok >= target, timeout,
                         f"{count} successful requests (failures: {self.report()})")

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
        self._tasks.clear()
        for s in self._sessions:
            await s.close()
        self._sessions.clear()

    def report(self, limit: int = 20) -> str:
        lines = [f"ok={self.ok} (get {self.ok_get}, post {self.ok_post}) "
                 f"failed={len(self.failures)} slowest={self.slowest * 1000:.0f}ms"]
        lines += [f"  {f.kind} {f.started:.3f}-{f.at:.3f}: {f.what}"
                  for f in self.failures[:limit]]
        return "\n".join(lines)


@pytest.fixture
async def load_factory() -> AsyncIterator[Callable[..., Awaitable[Load]]]:
    loads: list[Load] = []

    async def start(url: str, **kw: Any) -> Load:
        load = await Load(url, **kw).start()
        loads.append(load)
        return load

    try:
        yield start
    finally:
        for load in loads:
            await load.stop()
