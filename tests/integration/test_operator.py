"""What an operator reads and runs against a live instance: how the CLI finds it, what a reload
says it changed, /status per upstream target, per-process metrics, the worker count's reason,
and rate limit shares that follow SIGTTIN."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp

from proxyd.runtime import read_state
from tests.integration.conftest import (
    Origin,
    Ports,
    Proxyd,
    StartProxyd,
    free_port,
    live_workers,
    make_config,
    wait_until,
    write_config,
)

TOKEN = "operator-s3cret"


def runtime_env(tmp_path: Path) -> dict[str, str]:
    """A runtime directory of the test's own, as systemd's RuntimeDirectory would be."""
    directory = tmp_path / "run"
    directory.mkdir(exist_ok=True)
    return {"RUNTIME_DIRECTORY": str(directory)}


async def cli(p: Proxyd, env: dict[str, str], *args: str) -> Any:
    """``proxyd ARGS`` with the runtime directory (and nothing of the test's own admin)."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items()
             if k not in ("PROXYD_ADMIN_URL", "PROXYD_ADMIN_TOKEN", "PROXYD_CONFIG")}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxyd", *args], capture_output=True,
        text=True, timeout=60, check=False, env={**clean, **env})


async def test_reload_finds_the_instance_when_the_file_is_broken(
    origin: Origin, proxyd: StartProxyd, tmp_path: Path, monkeypatch: Any
) -> None:
    env = runtime_env(tmp_path)
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url), ports=ports, env=env)
    monkeypatch.setenv("RUNTIME_DIRECTORY", env["RUNTIME_DIRECTORY"])
    await wait_until(lambda: read_state(str(p.config_path)), 10, "the master's state file")
    assert read_state(str(p.config_path)) == {
        "pid": p.pid, "admin": f"127.0.0.1:{ports.admin}", "config": str(p.config_path)}

    # The edit being reloaded is broken: what systemd's ExecReload runs still reaches the
    # instance, and reports the rejection (exit 1), not "unreachable" (exit 3).
    write_config(p.config_path, "server: {workers: 2\nadmin: [\n")
    result = await cli(p, env, "reload", "--wait", "-c", str(p.config_path))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "reload rejected, old configuration still serving" in result.stderr
    assert f"{p.config_path}:" in result.stderr

    # A valid edit that moves the admin port: the next command finds the new one.
    moved = Ports(traffic=ports.traffic)
    write_config(p.config_path, make_config(moved, origin.url, marker="v2"))
    result = await cli(p, env, "reload", "--wait", "-c", str(p.config_path))
    assert result.returncode == 0, (result.stdout, result.stderr)
    state = read_state(str(p.config_path))
    assert state is not None and state["admin"] == f"127.0.0.1:{moved.admin}"
    write_config(p.config_path, "admin: [broken\n")  # and broken again: still found
    result = await cli(p, env, "status", "-c", str(p.config_path))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert f"pid {p.pid}" in result.stdout and "generation 2" in result.stdout

    p.signal(signal.SIGTERM)
    assert await p.wait_exit(30) == 0
    assert read_state(str(p.config_path)) is None
    assert not list(Path(env["RUNTIME_DIRECTORY"]).iterdir())  # removed at stop


async def test_status_sends_the_token(
    origin: Origin, proxyd: StartProxyd, tmp_path: Path
) -> None:
    env = runtime_env(tmp_path)
    ports = Ports()
    config = make_config(ports, origin.url, admin={"token": TOKEN, "protect_reads": True})
    p = await proxyd(config, ports=ports, env=env, wait=False)

    async def ready() -> bool:  # /health/ready is never protected; /status is, here
        p.check_alive()
        async with p.admin_session.get(f"{p.admin_url}/health/ready") as r:
            return r.status == 200

    await wait_until(ready, 20, "proxyd ready")
    refused = await cli(p, env, "status", "-c", str(p.config_path))
    assert refused.returncode == 3, (refused.stdout, refused.stderr)
    assert "401 unauthorized" in refused.stderr and "None" not in refused.stdout
    for args, extra in ((("--token", TOKEN), {}), ((), {"PROXYD_ADMIN_TOKEN": TOKEN})):
        result = await cli(p, {**env, **extra}, "status", "-c", str(p.config_path), *args)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert f"pid {p.pid}" in result.stdout and "None" not in result.stdout


async def test_reload_says_what_changed(
    origin: Origin, proxyd: StartProxyd, tmp_path: Path
) -> None:
    env = runtime_env(tmp_path)
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url, admin={"token": TOKEN}), ports=ports,
                     env=env)
    edited = make_config(ports, origin.url, admin={"token": TOKEN}, marker="v2")
    edited["upstreams"]["spare"] = {"targets": [origin.url]}
    edited["routes"].insert(1, {"name": "spare", "match": {"path_prefix": "/spare"},
                                "upstream": "spare"})
    edited["server"]["keepalive_timeout"] = "7s"
    write_config(p.config_path, edited)

    diff = await cli(p, {**env, "PROXYD_ADMIN_TOKEN": TOKEN}, "check-config", "--diff",
                     "-c", str(p.config_path))
    assert diff.returncode == 0, (diff.stdout, diff.stderr)
    expected = "routes: +spare ~marker; upstreams: +spare; changed: server"
    assert f"against the running configuration (generation 1): {expected}" in diff.stdout
    no_token = await cli(p, env, "check-config", "--diff", "-c", str(p.config_path))
    assert no_token.returncode == 3 and "401 unauthorized" in no_token.stderr

    result = await cli(p, env, "reload", "--wait", "--token", TOKEN, "-c", str(p.config_path))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert f"reloaded: generation 2: {expected}" in result.stdout
    st = await p.wait_generation(2)
    changes = st["last_reload"]["changes"]
    assert changes["routes"] == {"added": ["spare"], "removed": [], "changed": ["marker"],
                                 "reordered": False}
    assert changes["upstreams"] == {"added": ["spare"], "removed": [], "changed": []}
    assert changes["sections"] == ["server"]
    await wait_until(lambda: f"reload complete: generation 2: {expected}" in p.log(200), 5,
                     "the reload's changes in the log")
    same = await cli(p, {**env, "PROXYD_ADMIN_TOKEN": TOKEN}, "check-config", "--diff",
                     "-c", str(p.config_path))
    assert "against the running configuration (generation 2): no changes" in same.stdout


async def test_status_shows_passive_ejections_next_to_active_checks(
    origin: Origin, proxyd: StartProxyd
) -> None:
    ports = Ports()
    dead = f"http://127.0.0.1:{free_port()}"
    config = make_config(ports, origin.url, workers=1)
    config["upstreams"] = {
        "origin": {"targets": [origin.url, dead],
                   "outlier_detection": {"consecutive_failures": 1, "base_ejection": "60s"}},
        "checked": {"targets": [origin.url],
                    "health_check": {"path": "/", "interval": "1s", "timeout": "1s"}},
    }
    config["routes"].append({"name": "checked", "match": {"path_prefix": "/checked"},
                             "upstream": "checked"})
    p = await proxyd(config, ports=ports)
    async with aiohttp.ClientSession() as session:
        for _ in range(4):  # round robin: the dead target is tried, fails, is ejected
            async with session.get(p.url + "/") as r:
                assert r.status == 200  # retried on the live target

    async def ejected() -> dict[str, Any] | None:
        targets: dict[str, Any] = (await p.status())["upstreams"]["origin"]
        return targets if targets[dead]["ejected_by_workers"] == 1 else None

    targets = await wait_until(ejected, 10, "the dead target ejected in /status")
    assert targets[dead]["checked"] is False and targets[dead]["healthy"] is None
    assert targets[dead]["ejected_slots"] == [0] and targets[dead]["workers"] == 1
    assert targets[origin.url]["ejected_by_workers"] == 0

    async def checked() -> dict[str, Any] | None:
        target: dict[str, Any] = (await p.status())["upstreams"]["checked"][origin.url]
        return target if target.get("last_check") else None

    target = await wait_until(checked, 10, "the active check's result")
    assert target["checked"] is True and target["healthy"] is True
    assert target["ejected_by_workers"] == 0 and target["outlier_detection"] is True
    result = await p.cli("status", "--admin", p.admin_url)
    row = next(line for line in result.stdout.splitlines() if dead in line)
    assert row.split() == ["origin", dead, "-", "1/1", "(slots", "0)"], row


def process_samples(text: str) -> dict[tuple[str, str, str], float]:
    """gateway_process_* samples by (field, process, slot)."""
    found = {}
    for m in re.finditer(r'^gateway_process_(\w+)\{process="(\w+)",slot="(\d*)"\} (\S+)$',
                         text, re.M):
        found[(m.group(1), m.group(2), m.group(3))] = float(m.group(4))
    return found


async def test_process_metrics_per_worker_slot_and_master(
    origin: Origin, proxyd: StartProxyd
) -> None:
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url, workers=2), ports=ports)
    st = await p.status()
    assert st["worker_count"] == 2 and st["workers_reason"] == "configured"

    async def scrape() -> dict[tuple[str, str, str], float] | None:
        async with p.admin_session.get(f"{p.admin_url}/metrics") as r:
            samples = process_samples(await r.text())
        wanted = {(f, proc, slot) for f in ("resident_memory_bytes", "cpu_seconds_total",
                                            "open_fds", "max_fds", "start_time_seconds")
                  for proc, slot in (("master", ""), ("worker", "0"), ("worker", "1"))}
        return samples if wanted <= set(samples) else None

    before = await wait_until(scrape, 10, "process metrics of the master and both slots")
    for key, value in before.items():
        assert value >= 0, key
    assert before[("resident_memory_bytes", "worker", "0")] > 10 * 1024 * 1024
    assert before[("open_fds", "worker", "0")] < before[("max_fds", "worker", "0")]
    assert before[("start_time_seconds", "worker", "1")] >= before[
        ("start_time_seconds", "master", "")]

    # Both workers replaced: each slot's CPU counter keeps what its old worker used.
    p.signal(signal.SIGHUP)
    await p.wait_generation(2)

    async def replaced() -> dict[tuple[str, str, str], float] | None:
        samples = await scrape()
        if samples is None:
            return None
        starts = [samples[("start_time_seconds", "worker", s)] for s in "01"]
        return samples if min(starts) > before[("start_time_seconds", "worker", "1")] else None

    after = await wait_until(replaced, 15, "the new generation's samples")
    for slot in "01":
        key = ("cpu_seconds_total", "worker", slot)
        assert after[key] >= before[key], (slot, before[key], after[key])


async def test_memory_rate_limit_share_follows_sigttin(
    origin: Origin, proxyd: StartProxyd
) -> None:
    ports = Ports()
    config = make_config(ports, origin.url, workers=2)
    config["middleware"] = [{"type": "rate_limit", "rate": "600/m", "burst": 600,
                             "key": "header:X-Client"}]
    p = await proxyd(config, ports=ports)

    async def policies(n: int) -> set[str]:
        seen = set()
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as session:
            for i in range(n):  # new connections: spread over the workers
                async with session.get(p.url + "/", headers={"X-Client": str(i)}) as r:
                    seen.add(r.headers["RateLimit-Policy"])
        return seen

    assert await policies(10) == {"600;w=120;burst=300"}
    p.signal(signal.SIGTTIN)

    async def three() -> bool:
        st = await p.status()
        ready = [w for w in live_workers(st) if w["state"] == "ready"]
        return st["worker_count"] == 3 and len(ready) == 3

    await wait_until(three, 20, "three workers")
    st = await p.status()
    assert st["workers_reason"] == "resized from 2 by a signal"
    # The resize's message reaches the old workers right after the new one is ready.
    await wait_until(lambda: _only(policies(20), "600;w=180;burst=200"), 10,
                     "every worker enforcing a third")


async def _only(pending: Any, value: str) -> bool:
    return bool(await pending == {value})


async def test_auto_workers_say_what_they_counted(origin: Origin, proxyd: StartProxyd) -> None:
    from proxyd.cpus import usable_cpus

    ports = Ports()
    p = await proxyd(make_config(ports, origin.url, server={"workers": "auto"}), ports=ports)
    st = await p.status()
    budget = usable_cpus()
    assert st["worker_count"] == budget.count
    assert st["workers_reason"] == f"auto: {budget.reason}"
    assert f"ready: {budget.count} workers (auto: {budget.reason})" in p.log(200)
    result = await p.cli("status", "--admin", p.admin_url)
    assert f"workers  {budget.count} (auto: {budget.reason})" in result.stdout
