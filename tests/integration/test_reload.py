"""SIGHUP reload under load, and a reload of a broken file."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.integration._procfs import socket_inodes
from tests.integration.conftest import (
    Load,
    Origin,
    Ports,
    StartProxyd,
    live_workers,
    make_config,
    pids_by_slot,
    wait_until,
    write_config,
)

RELOADS = 20


async def marker(url: str) -> str:
    """The /marker body, on a new connection (so it lands wherever the kernel puts it)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, s.get(f"{url}/marker") as r:
        assert r.status == 200
        return await r.text()


async def test_reload_under_load_drops_nothing(
    origin: Origin, proxyd: StartProxyd, load_factory: Callable[..., Awaitable[Load]]
) -> None:
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url), ports=ports)
    first = await p.status()
    original = {w["pid"] for w in first["workers"]}
    inodes = [entry["inode"] for entry in first["listeners"]]
    assert len(inodes) == 2
    assert set(inodes) <= socket_inodes(p.pid)

    load = await load_factory(p.url, get_clients=4, post_clients=4, idle_clients=2)
    await load.wait_flowing()
    served_before = load.ok
    for generation in range(2, RELOADS + 2):
        write_config(p.config_path, make_config(ports, origin.url, marker=f"v{generation}"))
        p.signal(signal.SIGHUP)
        await p.wait_generation(generation)
        # New connections reach the new configuration: the old workers stopped accepting.
        await wait_until(lambda g=generation: _is(marker(p.url), f"v{g}"), 5.0,
                         f"new connections served by generation {generation}")
    await load.wait_flowing(200)
    await load.stop()
    print(load.report())

    assert not load.failures, load.report()
    assert load.ok - served_before > RELOADS * 10, load.report()
    final = await p.status()
    assert final["pid"] == p.pid
    assert final["reloads"] == {"ok": RELOADS, "failed": 0}
    assert final["worker_restarts"] == 0
    current = {w["pid"] for w in live_workers(final)}
    assert len(current) == 2
    assert not current & original, (original, final["workers"])
    # The same listening sockets, held by the master the whole time.
    assert [entry["inode"] for entry in final["listeners"]] == inodes
    assert set(inodes) <= socket_inodes(p.pid)
    # Every generation but the last drained and exited.
    last = await wait_until(
        lambda: _all_current(p.status()), 15.0, "old generations to exit"
    )
    assert {w["pid"] for w in last["workers"]} == current


async def _is(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


async def _all_current(status: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
    st = await status
    return st if all(w["generation"] == st["generation"] for w in st["workers"]) else None


def broken(config: dict[str, Any]) -> tuple[str, int]:
    """The config as YAML with a misspelt key; returns the text and the key's line number."""
    lines = yaml.safe_dump(config, sort_keys=False).splitlines()
    at = lines.index("  max_requests: 0") + 1
    lines.insert(at, "  max_request: 5")
    return "\n".join(lines) + "\n", at + 1


async def test_bad_config_on_reload_changes_nothing(
    origin: Origin, proxyd: StartProxyd, load_factory: Callable[..., Awaitable[Load]]
) -> None:
    ports = Ports()
    good = make_config(ports, origin.url)
    p = await proxyd(good, ports=ports)
    before = await p.status()
    pids = {w["pid"] for w in before["workers"]}
    load = await load_factory(p.url, get_clients=2, post_clients=2)
    await load.wait_flowing()

    text, line = broken(good)
    write_config(p.config_path, text)
    p.signal(signal.SIGHUP)

    async def reload_result() -> dict[str, Any] | None:
        st = await p.status()
        return st if st["last_reload"]["at"] is not None else None

    st = await wait_until(reload_result, 10.0, "the reload result")
    assert st["last_reload"]["ok"] is False
    error = st["last_reload"]["error"]
    assert f"{p.config_path}:{line}:" in error, error
    assert "server.max_request" in error, error
    assert st["reloads"] == {"ok": 0, "failed": 1}
    assert st["generation"] == 1
    assert {w["pid"] for w in st["workers"]} == pids
    assert all(w["state"] == "ready" for w in st["workers"])
    await load.wait_flowing(200)  # still serving
    assert await marker(p.url) == "v1"

    result = await p.cli("reload", "--wait", "--admin", p.admin_url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"{p.config_path}:{line}:" in result.stderr
    st = await p.status()
    assert st["reloads"] == {"ok": 0, "failed": 2}
    assert {w["pid"] for w in st["workers"]} == pids

    write_config(p.config_path, make_config(ports, origin.url, marker="v2"))
    result = await p.cli("reload", "--wait", "--admin", p.admin_url)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "generation 2" in result.stdout
    st = await p.wait_generation(2)
    assert st["last_reload"]["ok"] is True and st["last_reload"]["error"] is None
    assert not {w["pid"] for w in live_workers(st)} & pids
    await wait_until(lambda: _is(marker(p.url), "v2"), 5.0, "the fixed config serving")
    await load.wait_flowing(200)
    await load.stop()
    assert not load.failures, load.report()


async def test_reload_whose_workers_cannot_start_keeps_the_old_generation(
    origin: Origin, proxyd: StartProxyd, load_factory: Callable[..., Awaitable[Load]],
    tmp_path: Path,
) -> None:
    """Valid YAML, but the new workers die while starting (access log in a missing dir)."""
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url), ports=ports)
    before = await p.status()
    load = await load_factory(p.url, get_clients=2, post_clients=2)
    await load.wait_flowing()

    unstartable = make_config(ports, origin.url, workers=3, marker="v2")
    unstartable["access_log"] = {"path": str(tmp_path / "missing" / "access.log")}
    write_config(p.config_path, unstartable)
    result = await p.cli("reload", "--wait", "--admin", p.admin_url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    st = await p.status()
    assert st["last_reload"]["ok"] is False, st["last_reload"]
    assert st["generation"] == 1 and st["worker_count"] == 2
    assert pids_by_slot(st) == pids_by_slot(before)
    # The third slot's socket, opened for the new generation, is closed again.
    assert st["listeners"] == before["listeners"]
    await load.wait_flowing(200)
    assert await marker(p.url) == "v1"

    write_config(p.config_path, make_config(ports, origin.url, marker="v2"))
    result = await p.cli("reload", "--wait", "--admin", p.admin_url)
    assert result.returncode == 0, (result.stdout, result.stderr)
    await p.wait_generation(2)
    await wait_until(lambda: _is(marker(p.url), "v2"), 5.0, "the good config serving")
    await load.wait_flowing(200)
    await load.stop()
    assert not load.failures, load.report()
