"""The admin token: POST and DELETE need it, protect_reads extends it to /status and
/metrics, a reload can change that, and the token never appears in output or logs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import aiohttp
import yaml

from tests.functional import _daemon
from tests.functional._daemon import Daemon, daemon_config, write_atomic
from tests.functional.conftest import Upstreams, free_port

daemon = _daemon.daemon  # the fixture: real proxyd processes


async def test_admin_token_and_protected_reads(
    upstreams: Upstreams, daemon: Callable[..., Any]
) -> None:
    up = await upstreams.aiohttp()
    traffic, admin = free_port(), free_port()
    token = "tok-" + os.urandom(12).hex()
    config = daemon_config(traffic, admin, up.url,
                           admin_extra={"token": token, "protect_reads": True})
    d: Daemon = await daemon(config, traffic, admin)
    base = f"http://127.0.0.1:{admin}"
    good = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                        {"Authorization": f"Basic {token}"},
                        {"Authorization": f"Bearer {token}x"}):
            async with s.post(f"{base}/reload", headers=headers) as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            async with s.delete(f"{base}/cache?prefix=/", headers=headers) as r:
                assert r.status == 401
            for path in ("/status", "/metrics"):
                async with s.get(base + path, headers=headers) as r:
                    assert r.status == 401, path
        async with s.get(f"{base}/health") as r:  # probes stay open
            assert r.status == 200
        async with s.get(f"{base}/status", headers=good) as r:
            assert r.status == 200
            text = await r.text()
            assert token not in text
            assert json.loads(text)["generation"] == 1
        async with s.get(f"{base}/metrics", headers=good) as r:
            assert r.status == 200
        async with s.post(f"{base}/reload", headers=good) as r:
            assert r.status == 200 and (await r.json())["ok"] is True
        # Reads unprotected by a reload: /status opens, /reload still needs the token.
        config["admin"]["protect_reads"] = False
        write_atomic(d.config_path, yaml.safe_dump(config).encode())
        async with s.post(f"{base}/reload", headers=good) as r:
            assert r.status == 200 and (await r.json())["generation"] == 3
        async with s.get(f"{base}/status") as r:
            assert r.status == 200 and token not in await r.text()
        async with s.post(f"{base}/reload") as r:
            assert r.status == 401
    assert token not in d.log()
