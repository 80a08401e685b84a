"""The admin port and the CLI that talks to it; the traffic port's own probes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import aiohttp

from tests.integration.conftest import (
    Origin,
    Ports,
    StartProxyd,
    live_workers,
    make_config,
    write_config,
)

TOKEN = "s3cret-token"


async def test_admin_endpoints_token_and_cli(origin: Origin, proxyd: StartProxyd) -> None:
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url, admin={"token": TOKEN}), ports=ports)

    assert await p.get_admin("/health") == (200, {"status": "ok"})
    code, body = await p.get_admin("/health/ready")
    assert (code, body["ready"]) == (200, True)

    async with aiohttp.ClientSession() as s:
        # The traffic port answers its own probes, whatever the routes say.
        for path, expected in (("/health", {"status": "ok"}), ("/health/ready", {"ready": True})):
            async with s.get(p.url + path) as r:
                assert r.status == 200
                assert await r.json() == expected

        reload_url = f"{p.admin_url}/reload?wait=1"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            async with s.post(reload_url, headers=headers) as r:
                assert r.status == 401, (headers, await r.text())
                assert r.headers.get("WWW-Authenticate") == "Bearer"
        assert (await p.status())["generation"] == 1, "a refused reload must not reload"
        async with s.post(reload_url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
    assert body == {"ok": True, "error": None, "generation": 2, "changes": {
        "routes": {"added": [], "removed": [], "changed": [], "reordered": False},
        "upstreams": {"added": [], "removed": [], "changed": []}, "sections": []}}
    st = await p.wait_generation(2)

    result = await p.cli("status", "--admin", p.admin_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"pid {p.pid}" in out and "generation 2" in out, out
    assert "SLOT" in out and "PID" in out, out
    for worker in live_workers(st):
        assert str(worker["pid"]) in out, out
    assert f"127.0.0.1:{ports.traffic}" in out, out

    result = await p.cli("status", "--admin", p.admin_url, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["pid"] == p.pid and data["generation"] == 2

    # The CLI through the token: refused without it, accepted with it.
    result = await p.cli("reload", "--wait", "--admin", p.admin_url)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "token" in result.stderr
    result = await p.cli("reload", "--wait", "--admin", p.admin_url, "--token", TOKEN)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "generation 3" in result.stdout
    await p.wait_generation(3)


async def test_pid_file_and_reload_through_it(
    origin: Origin, proxyd: StartProxyd, tmp_path: Path
) -> None:
    ports = Ports()
    pid_file = tmp_path / "proxyd.pid"
    p = await proxyd(make_config(ports, origin.url), ports=ports,
                     args=("--pid-file", str(pid_file)))
    assert pid_file.read_text().strip() == str(p.pid)

    write_config(p.config_path, make_config(ports, origin.url, marker="v2"))
    result = await p.cli("reload", "--wait", "--pid-file", str(pid_file),
                         "--admin", p.admin_url)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "generation 2" in result.stdout
    await p.wait_generation(2)

    p.signal(signal.SIGTERM)
    assert await p.wait_exit(15.0) == 0, p.log()
    assert not pid_file.exists()
