"""server.watch_config: change detection (pure), the watcher task, and a real proxyd reloading."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from proxyd import watch
from proxyd.config.models import GatewayConfig
from proxyd.watch import check, snapshot

T = TypeVar("T")


def write(path: Path, text: str) -> None:
    """Replace atomically, as editors, `cp` onto a temp + `mv`, and config management do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- change detection -------------------------------------------------------------------------


def test_new_content_is_a_change(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 1\n")
    state = snapshot(str(path))
    path.write_text("a: 2\n")  # in place: same inode
    changed, state = check(str(path), state)
    assert changed
    assert check(str(path), state) == (False, state)


def test_same_content_rewritten_is_no_change(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 1\n")
    state = snapshot(str(path))
    write(path, "a: 1\n")  # new inode, new mtime, same bytes
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    changed, new_state = check(str(path), state)
    assert not changed
    assert new_state.stat_key != state.stat_key  # it looked, and remembers what it saw
    assert new_state.sha256 == state.sha256


def test_unchanged_stat_is_not_rehashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 1\n")
    state = snapshot(str(path))

    def no_hashing(path: str) -> str:
        raise AssertionError("hashed although nothing moved")

    monkeypatch.setattr(watch, "_sha256", no_hashing)
    assert check(str(path), state) == (False, state)


def test_unreadable_file_is_no_change(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 1\n")
    state = snapshot(str(path))
    path.unlink()
    assert check(str(path), state) == (False, state)
    path.write_text("a: 1\n")  # back with the same content: still nothing to reload
    assert check(str(path), state)[0] is False


def configmap_dir(root: Path, version: str, text: str) -> None:
    """Lay out a ConfigMap volume the way the kubelet does (AtomicWriter)."""
    data_dir = root / f"..{version}"
    data_dir.mkdir()
    (data_dir / "gateway.yaml").write_text(text)
    link = root / "..data_tmp"
    link.symlink_to(data_dir.name)
    os.replace(link, root / "..data")  # the atomic swap
    if not (root / "gateway.yaml").is_symlink():
        (root / "gateway.yaml").symlink_to("..data/gateway.yaml")


def test_configmap_symlink_swap_is_a_change(tmp_path: Path) -> None:
    configmap_dir(tmp_path, "2024_01_01_v1", "a: 1\n")
    path = str(tmp_path / "gateway.yaml")
    state = snapshot(path)
    assert state.data_target == "..2024_01_01_v1"
    configmap_dir(tmp_path, "2024_01_01_v2", "a: 2\n")
    changed, state = check(path, state)
    assert changed and state.data_target == "..2024_01_01_v2"
    configmap_dir(tmp_path, "2024_01_01_v3", "a: 2\n")  # a new version, same content
    assert check(path, state)[0] is False


# -- the watcher task -------------------------------------------------------------------------


class Reloads:
    """What the watcher is handed: the file, its loaded hash, and where a change goes."""

    def __init__(self, path: Path, sha256: str) -> None:
        self.path = str(path)
        self.sha256 = sha256
        self.events: list[str] = []

    def watch(self) -> Any:
        return watch.watch_config(self.path, self.sha256, lambda: self.events.append("hup"),
                                  lambda: True, interval=0.05)


async def until(probe: Callable[[], T], timeout: float = 5.0) -> T:
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return result


async def test_watcher_enqueues_hup_on_change(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 1\n")
    sha256 = snapshot(str(path)).sha256
    assert sha256 is not None
    master = Reloads(path, sha256)
    task = asyncio.create_task(master.watch())
    try:
        await asyncio.sleep(0.3)
        write(path, "a: 1\n")
        await asyncio.sleep(0.3)
        assert master.events == []  # same bytes: no reload
        write(path, "a: 2\n")
        await until(lambda: master.events)
        await asyncio.sleep(0.4)
        assert master.events == ["hup"]  # once per change
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_watcher_catches_an_edit_made_before_it_started(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 2\n")
    master = Reloads(path, "sha256-of-what-was-loaded")
    task = asyncio.create_task(master.watch())
    try:
        await until(lambda: master.events)
        assert master.events == ["hup"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_watch_config_defaults_off() -> None:
    assert GatewayConfig().server.watch_config is False
    field = GatewayConfig.model_json_schema()["$defs"]["Server"]["properties"]["watch_config"]
    assert field["default"] is False and field["description"]


# -- a real proxyd ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway(traffic: int, admin: int, body: str, **extra: Any) -> str:
    config = {
        "server": {"listen": [f"127.0.0.1:{traffic}"], "workers": 1, "max_requests": 0,
                   "drain_timeout": "5s", "watch_config": True},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "routes": [{"name": "marker", "match": {"path": "/marker"}, "respond": {"body": body}}],
        "access_log": {"enabled": False},
        **extra,
    }
    return yaml.safe_dump(config, sort_keys=False)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(probe: Callable[[], T], what: str, proc: subprocess.Popen[bytes],
             log: Path, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"proxyd exited ({proc.returncode}):\n{log.read_text()}")
        try:
            result = probe()
            last = result
        except (OSError, ValueError, KeyError) as exc:
            result, last = None, exc  # type: ignore[assignment]
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last {last!r}\n"
                                 f"{log.read_text()[-4000:]}")
        time.sleep(0.05)


@pytest.fixture
def run_proxyd(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def start(config: Path) -> subprocess.Popen[bytes]:
        log = open(tmp_path / "proxyd.log", "ab")  # noqa: SIM115 - closed at teardown
        logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "proxyd", "run", "-c", str(config)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the master drains its workers
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    # Its own session: the group id is the master's pid, workers included.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        for log in logs:
            log.close()


def test_real_proxyd_reloads_on_edit_and_rejects_a_bad_one(
    tmp_path: Path, run_proxyd: Callable[[Path], subprocess.Popen[bytes]]
) -> None:
    traffic, admin = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    log = tmp_path / "proxyd.log"
    write(config, gateway(traffic, admin, "v1"))
    proc = run_proxyd(config)

    def status() -> dict[str, Any]:
        code, body = get(f"http://127.0.0.1:{admin}/status")
        assert code == 200
        data: dict[str, Any] = json.loads(body)
        return data

    def marker() -> bytes:
        return get(f"http://127.0.0.1:{traffic}/marker")[1]

    wait_for(lambda: get(f"http://127.0.0.1:{admin}/health/ready")[0] == 200, "ready", proc, log)
    assert marker() == b"v1"
    assert status()["generation"] == 1

    # A valid edit: a new generation serves the new body, without any signal from us.
    write(config, gateway(traffic, admin, "v2"))
    wait_for(lambda: status()["generation"] == 2 and status()["last_reload"]["ok"],
             "generation 2", proc, log)
    wait_for(lambda: marker() == b"v2", "the new body", proc, log)

    # An invalid edit: rejected by the SIGHUP path; generation 2 keeps serving.
    write(config, gateway(traffic, admin, "v3", bogus_key=1))
    last = wait_for(lambda: (st := status())["last_reload"]["ok"] is False and st,
                    "the rejected reload", proc, log)
    assert "bogus_key" in (last["last_reload"]["error"] or "")
    assert last["generation"] == 2
    assert marker() == b"v2"
    time.sleep(1.5)  # a poll or two more: each edit reloads once, a rejected one is not retried
    assert status()["reloads"] == {"ok": 1, "failed": 1}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
