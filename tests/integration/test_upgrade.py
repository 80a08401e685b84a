"""Code upgrades: a new master from the installed code takes the sockets over, nothing dropped.

"The installed code" is whatever ``python -m proxyd`` imports in the master's environment: the
master runs with PYTHONPATH pointing at a symlink, and each upgrade points the symlink at a
fresh copy of the package whose ``__version__`` differs (or that cannot be imported).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import proxyd as package
from tests.integration.conftest import (
    Origin,
    Ports,
    Proxyd,
    StartProxyd,
    make_config,
    wait_until,
    write_config,
)

UPGRADES = 10
PACKAGE = Path(package.__file__).parent
VERSION = package.__version__
REPO = Path(__file__).resolve().parents[2]


# -- the code the next master finds ---------------------------------------------------------------


@dataclass
class Installed:
    """``current`` is on the masters' PYTHONPATH; ``install`` points it at a new copy."""

    root: Path
    n: int = 0

    @property
    def current(self) -> Path:
        return self.root / "current"

    def install(self, version: str, *, broken: str | None = None, then: str = "") -> None:
        self.n += 1
        tree = self.root / f"code-{self.n}"
        shutil.copytree(PACKAGE, tree / "proxyd", ignore=shutil.ignore_patterns("__pycache__"))
        # A compiled build's shared library sits beside the package: the copy needs it too.
        for lib in PACKAGE.parent.glob("proxyd_compiled__mypyc*"):
            shutil.copy2(lib, tree / lib.name)
        init = tree / "proxyd" / "__init__.py"
        text = init.read_text().replace(f'__version__ = "{VERSION}"',
                                        f'__version__ = "{version}"')
        assert version in text
        if broken is not None:
            text += f"\nraise ImportError({broken!r})\n"
        text += then  # code the new master runs as it imports the package
        init.write_text(text)
        link = self.root / "current.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(tree)
        os.replace(link, self.current)  # one rename: a master reads either tree, never half

    def env(self) -> dict[str, str]:
        paths = [str(self.current), *filter(None, [os.environ.get("PYTHONPATH")])]
        return {"PYTHONPATH": os.pathsep.join(paths)}


@pytest.fixture
def installed(tmp_path: Path) -> Installed:
    code = Installed(tmp_path / "code")
    code.root.mkdir()
    (code.root / "empty").mkdir()
    code.current.symlink_to(code.root / "empty")  # to start with: the checked-out code
    return code


# -- open-loop load -------------------------------------------------------------------------------


@dataclass
class OpenLoad:
    """Requests started at a steady rate whatever the answers take (open loop), in turn: a GET
    on a new connection, a GET on a keep-alive connection, a POST whose echo is checked."""

    url: str
    rate: float = 120.0  # requests started per second
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                      timeout=timeout)
        kept = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16),
                                     timeout=timeout)
        for session in (fresh, kept):
            session._retry_connection = False  # a reset must count, not be retried
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        try:
            while not self._stop.is_set():
                n += 1
                kind = n % 3
                coro = (self._get(fresh) if kind == 0 else self._get(kept) if kind == 1
                        else self._post(kept, n))
                task = asyncio.create_task(coro)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(),
                                           max(0.0, start + n / self.rate - loop.time()))
            if self._tasks:
                await asyncio.wait(self._tasks)
        finally:
            await fresh.close()
            await kept.close()

    async def _get(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(self.url + "/") as r:
                body = await r.read()
            if r.status == 200 and body == b"hello from origin":
                self.ok += 1
            else:
                self.failures.append(f"GET {r.status} {body[:60]!r}")
        except Exception as exc:
            self.failures.append(f"GET {type(exc).__name__}: {exc}")

    async def _post(self, session: aiohttp.ClientSession, n: int) -> None:
        body = f"request {n} ".encode() * (1 + (n * 97) % 3000)
        try:
            async with session.post(self.url + "/echo", data=body) as r:
                echoed = await r.read()
            if r.status == 200 and echoed == body:
                self.ok += 1
            else:
                self.failures.append(f"POST {r.status}: {len(echoed)} of {len(body)} bytes")
        except Exception as exc:
            self.failures.append(f"POST {type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()


# -- helpers --------------------------------------------------------------------------------------


async def status(p: Proxyd) -> dict[str, Any]:
    async with p.admin_session.get(f"{p.admin_url}/status") as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z":
            return False  # exited; its parent has not reaped it yet
    return True


async def upgrade(p: Proxyd, *args: str) -> subprocess.CompletedProcess[str]:
    return await p.cli("upgrade", "-c", str(p.config_path), "--admin", p.admin_url, *args,
                       timeout=150)


async def stop_master(p: Proxyd) -> None:
    """SIGTERM whichever master serves now (after upgrades, not the one the test started)."""
    with contextlib.suppress(aiohttp.ClientError, AssertionError, OSError):
        pid = (await status(p))["pid"]
        os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: not alive(pid), 30.0, f"master {pid} to stop")


@pytest.fixture
async def served(origin: Origin, proxyd: StartProxyd,
                 installed: Installed) -> AsyncIterator[tuple[Proxyd, Installed]]:
    ports = Ports()
    config = make_config(ports, origin.url, server={"keepalive_timeout": "2s"})
    p = await proxyd(config, ports=ports, env=installed.env())
    try:
        yield p, installed
    finally:
        await stop_master(p)


# -- the tests ------------------------------------------------------------------------------------


async def test_ten_upgrades_under_open_loop_load_drop_nothing(
    served: tuple[Proxyd, Installed]
) -> None:
    p, installed = served
    first = await status(p)
    inodes = {entry["inode"] for entry in first["listeners"]}
    load = OpenLoad(p.url)
    running = asyncio.create_task(load.run())
    try:
        await wait_until(lambda: load.ok >= 100, 20.0, f"load flowing ({load.failures[:3]})")
        previous = first["pid"]
        for i in range(1, UPGRADES + 1):
            version = f"{VERSION}+upgrade.{i}"
            installed.install(version)
            done = await upgrade(p)
            assert done.returncode == 0, done.stderr + p.log(80)
            assert f"proxyd {version} (pid" in done.stdout, done.stdout
            st = await status(p)
            assert st["version"] == version and st["pid"] != previous, st
            assert st["build"] == first["build"], "the copy loads as the original did"
            assert st["upgrades"]["ok"] == i and st["upgrades"]["failed"] == 0
            assert st["upgrades"]["last"]["to_version"] == version
            # The same kernel sockets, handed over: never closed, never bound again.
            assert {entry["inode"] for entry in st["listeners"]} == inodes
            old = previous
            previous = st["pid"]
            await wait_until(lambda old=old: not alive(old), 30.0,  # type: ignore[misc]
                             f"master {old} to drain and exit")
            before = load.ok
            await wait_until(lambda before=before: load.ok >= before + 30,  # type: ignore[misc]
                             20.0, "requests answered by the new master")
    finally:
        load.stop()
        await running
    assert not load.failures, f"{len(load.failures)} failed of {load.ok}: {load.failures[:10]}"
    async with p.admin_session.get(f"{p.admin_url}/metrics") as r:
        metrics = await r.text()
    assert f'gateway_upgrades_total{{result="ok"}} {float(UPGRADES)}' in metrics
    assert f'version="{VERSION}+upgrade.{UPGRADES}"' in metrics


async def test_a_new_master_with_a_bad_config_leaves_the_old_one_serving(
    served: tuple[Proxyd, Installed]
) -> None:
    p, installed = served
    before = await status(p)
    good = p.config_path.read_text()
    write_config(p.config_path, good.replace("workers: 2", "workers: lots"))
    installed.install(f"{VERSION}+next")
    done = await upgrade(p)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "upgrade failed, the running master keeps serving" in done.stderr
    assert "server.workers" in done.stderr, done.stderr  # the new master's own words
    st = await status(p)
    assert (st["pid"], st["version"]) == (before["pid"], before["version"])
    assert st["upgrades"]["failed"] == 1 and st["upgrades"]["last"]["ok"] is False
    assert (await p.get_admin("/health/ready"))[0] == 200
    async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
        assert r.status == 200
    write_config(p.config_path, good)
    done = await upgrade(p)  # fixed: the next upgrade goes through
    assert done.returncode == 0, done.stderr + p.log(60)


async def test_a_new_master_that_cannot_import_leaves_the_old_one_serving(
    served: tuple[Proxyd, Installed]
) -> None:
    p, installed = served
    before = await status(p)
    installed.install(f"{VERSION}+broken", broken="a broken build")
    done = await upgrade(p)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ImportError: a broken build" in done.stderr, done.stderr
    st = await status(p)
    assert (st["pid"], st["version"]) == (before["pid"], before["version"])
    assert [w["pid"] for w in st["workers"]] == [w["pid"] for w in before["workers"]]
    async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
        assert r.status == 200


async def test_connections_queued_during_the_handoff_are_served_not_reset(
    served: tuple[Proxyd, Installed]
) -> None:
    """The old workers are stopped: connections made now wait in the kernel's queues of the
    listening sockets, and only the new master's workers (on the same sockets) can take them."""
    p, installed = served
    st = await status(p)
    old_workers = [w["pid"] for w in st["workers"]]
    for pid in old_workers:
        os.kill(pid, signal.SIGSTOP)
    queued: list[socket.socket] = []
    try:
        for n in range(16):
            sock = socket.create_connection(("127.0.0.1", p.ports.traffic), timeout=60)
            sock.sendall(f"GET /?n={n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                         .encode())
            queued.append(sock)
        installed.install(f"{VERSION}+queued")
        done = await upgrade(p)
        assert done.returncode == 0, done.stderr + p.log(60)

        def answer(sock: socket.socket) -> bytes:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

        answers = await asyncio.gather(*(asyncio.to_thread(answer, s) for s in queued))
        assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"hello from origin")
                   for a in answers), answers
    finally:
        for pid in old_workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for sock in queued:
            sock.close()


async def test_sigusr2_upgrade_moves_the_pid_file_and_systemds_main_pid(
    origin: Origin, proxyd: StartProxyd, installed: Installed, tmp_path: Path
) -> None:
    from tests.integration.test_systemd import NotifySocket

    notify = NotifySocket(Path(tempfile_dir()) / "notify.sock")
    ports = Ports()
    pid_file = tmp_path / "proxyd.pid"
    env = {**installed.env(), "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    p = await proxyd(make_config(ports, origin.url), ports=ports, env=env,
                     args=("--pid-file", str(pid_file)))
    try:
        assert pid_file.read_text().strip() == str(p.pid)
        version = f"{VERSION}+signal"
        installed.install(version)
        p.signal(signal.SIGUSR2)

        async def new_master() -> dict[str, Any] | None:
            with contextlib.suppress(aiohttp.ClientError):
                st = await status(p)
                return st if st["pid"] != p.pid else None
            return None

        st = await wait_until(new_master, 60.0, "a new master answering /status")
        assert st["version"] == version
        new = st["pid"]
        await wait_until(lambda: pid_file.read_text().strip() == str(new), 10.0,
                         "the pid file to name the new master")
        assert await p.wait_exit(30.0) == 0, p.log()
        assert pid_file.read_text().strip() == str(new)  # the old one left it alone
        await wait_until(lambda: any(n.pid == new and n.kind == "WATCHDOG"
                                     for n in notify.poll()), 10.0, "pings from the new master")
        handover = [n for n in notify.poll() if n.fields.get("MAINPID") == str(new)]
        assert handover and handover[0].pid == p.pid, "the main pid named the new one"
        first_from_new = next(n for n in notify.poll() if n.pid == new)
        assert notify.received.index(handover[0]) < notify.received.index(first_from_new)
        assert not [n for n in notify.poll() if n.pid == p.pid and n.kind == "STOPPING"]
        os.kill(new, signal.SIGTERM)
        await wait_until(lambda: not alive(new), 30.0, "the new master to stop")
        assert not pid_file.exists()
    finally:
        notify.close()


def tempfile_dir() -> str:
    """A short directory for a unix socket (sun_path holds 108 bytes)."""
    import tempfile

    return tempfile.mkdtemp(prefix="proxyd-")


@pytest.fixture
def ws_origin(process_groups: list[int]) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration._ws_origin"], cwd=REPO,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    process_groups.append(proc.pid)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(b"PORT "), line
    try:
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


async def test_websocket_relays_follow_their_routes_on_reload_policy(
    ws_origin: str, proxyd: StartProxyd, installed: Installed
) -> None:
    ports = Ports()
    config = make_config(ports, ws_origin, server={"drain_timeout": "30s"})
    config["routes"] = [
        {"name": "keep", "match": {"path_prefix": "/keep"}, "upstream": "origin",
         "websocket": {"on_reload": "keep"}},
        {"name": "close", "match": {"path_prefix": "/close"}, "upstream": "origin",
         "websocket": {"on_reload": "close"}},
    ]
    p = await proxyd(config, ports=ports, env=installed.env())
    session = aiohttp.ClientSession()
    try:
        keep = await session.ws_connect(f"{p.url.replace('http', 'ws')}/keep")
        close = await session.ws_connect(f"{p.url.replace('http', 'ws')}/close")
        for ws in (keep, close):
            await ws.send_str("before")
            assert (await ws.receive(timeout=10)).data == "before"
        installed.install(f"{VERSION}+ws")
        done = await upgrade(p)
        assert done.returncode == 0, done.stderr + p.log(60)
        # close: 1001 Going Away as the old worker drains.
        message = await close.receive(timeout=15)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message
        assert close.close_code == 1001 or message.data == 1001, message
        # keep: the relay lives on in the old worker, past the handover.
        for n in range(5):
            await keep.send_str(f"after {n}")
            assert (await keep.receive(timeout=10)).data == f"after {n}"
        assert p.proc.poll() is None, "the old master waits for its kept relay"
        await keep.close()
        assert await p.wait_exit(30.0) == 0, p.log()
    finally:
        await session.close()
        await stop_master(p)


async def test_signals_to_the_old_master_after_the_handover_leave_the_new_one_serving(
    served: tuple[Proxyd, Installed], origin: Origin
) -> None:
    """The old master drains a slow request after the handover; TERM (it is leaving anyway)
    and QUIT (stop now) are its own business, never the new master's, which is the service."""
    p, installed = served

    async def slow_request() -> None:
        async with aiohttp.ClientSession() as s, s.get(p.url + "/slow?d=30") as r:
            await r.read()

    slow = asyncio.create_task(slow_request())
    try:
        await wait_until(lambda: origin.slow_started >= 1, 10.0, "the slow request in flight")
        installed.install(f"{VERSION}+signals")
        done = await upgrade(p)
        assert done.returncode == 0, done.stderr + p.log(60)
        new = (await status(p))["pid"]
        assert p.proc.poll() is None, "the old master drains the slow request"
        p.signal(signal.SIGTERM)
        st = await status(p)
        assert (st["pid"], st["state"]) == (new, "running"), st
        p.signal(signal.SIGQUIT)
        assert await p.wait_exit(30.0) == 0, p.log()
        st = await status(p)
        assert (st["pid"], st["state"]) == (new, "running"), st
        assert (await p.get_admin("/health/ready"))[0] == 200
        async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
            assert r.status == 200
    finally:
        slow.cancel()
        with contextlib.suppress(BaseException):
            await slow


async def test_a_new_master_that_cannot_take_the_admin_port_leaves_the_old_one_serving(
    served: tuple[Proxyd, Installed]
) -> None:
    """The new config moves the admin port to an address in use: found before the old master
    lets go, so the upgrade fails and nothing else changes."""
    p, installed = served
    before = await status(p)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    good = p.config_path.read_text()
    try:
        write_config(p.config_path, good.replace(f"127.0.0.1:{p.ports.admin}",
                                                 f"127.0.0.1:{taken.getsockname()[1]}"))
        installed.install(f"{VERSION}+admin")
        done = await upgrade(p)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Address already in use" in done.stderr, done.stderr
    finally:
        taken.close()
        write_config(p.config_path, good)
    st = await status(p)
    assert (st["pid"], st["version"]) == (before["pid"], before["version"])
    assert st["upgrades"]["last"]["ok"] is False
    assert (await p.get_admin("/health/ready"))[0] == 200
    async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
        assert r.status == 200


async def test_term_during_an_upgrade_stops_the_new_master_before_the_old_one_exits(
    served: tuple[Proxyd, Installed], origin: Origin, tmp_path: Path
) -> None:
    """A stop (systemctl stop: TERM to the main pid) while a new master starts: the new one is
    told at once, not once the old workers have drained, and waited for, so nothing of the
    service outlives the old master (under systemd, whatever does is killed)."""
    p, installed = served
    gate = tmp_path / "gate"
    installed.install(f"{VERSION}+gated", then=f"""
import os as _os, signal as _signal, sys as _sys, time as _time
if _os.environ.get("PROXYD_UPGRADE"):  # the new master: it stops here, and takes its time
    _signal.signal(_signal.SIGTERM, lambda *_: open({str(gate)!r} + ".term", "w").close())
    with open({str(gate)!r} + ".arrived.tmp", "w") as _f:
        _f.write(str(_os.getpid()))
    _os.replace({str(gate)!r} + ".arrived.tmp", {str(gate)!r} + ".arrived")
    while not _os.path.exists({str(gate)!r} + ".open"):
        _time.sleep(0.02)
    _sys.exit(3)
""")
    arrived, term, release = (Path(f"{gate}.{n}") for n in ("arrived", "term", "open"))
    upgrading = asyncio.create_task(upgrade(p))
    try:
        await wait_until(arrived.exists, 60.0, "the new master to start")
        successor = int(arrived.read_text())
        # An old worker drains this for seconds after the TERM.
        async with aiohttp.ClientSession() as s:
            slow = asyncio.create_task(s.get(p.url + "/slow?d=6"))
            await wait_until(lambda: origin.slow_started >= 1, 10.0, "the slow request")
            p.signal(signal.SIGTERM)
            await wait_until(term.exists, 3.0, "the new master to be told to stop at once")
            async with await slow as r:
                assert (r.status, await r.read()) == (200, b"slow done")
        assert p.proc.poll() is None, "the old master waits for the new one"
        release.touch()
        assert await p.wait_exit(30.0) == 0, p.log()
        assert not alive(successor)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.ports.traffic), timeout=5).close()
        done = await upgrading
        assert done.returncode == 1, done.stdout + done.stderr
    finally:
        release.touch()
        if not upgrading.done():
            await upgrading
