"""Upstream host names resolved through aiodns (c-ares), cached with a fixed TTL.

IP literals skip the resolver entirely; names are looked up on first use after fork and again
when the cached answer is older than ``ttl``, rotating across the addresses returned.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Any


class Resolver:
    def __init__(self, ttl: float = 30.0) -> None:
        self.ttl = ttl
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._turn = 0
        self._dns: Any = None  # aiodns.DNSResolver, created lazily inside the worker's loop

    async def resolve(self, host: str, port: int) -> str:
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        now = time.monotonic()
        cached = self._cache.get(host)
        if cached is None or cached[0] < now:
            addrs = await self._lookup(host, port)
            cached = (now + self.ttl, addrs)
            self._cache[host] = cached
        self._turn += 1
        return cached[1][self._turn % len(cached[1])]

    async def _lookup(self, host: str, port: int) -> list[str]:
        if host == "localhost":
            return ["127.0.0.1"]
        if self._dns is None:
            import aiodns

            self._dns = aiodns.DNSResolver(loop=asyncio.get_running_loop())
        try:
            result = await self._dns.getaddrinfo(
                host, port=port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM
            )
        except Exception as exc:  # aiodns.error.DNSError carries (code, message)
            raise OSError(f"cannot resolve {host}: {exc}") from exc
        addrs = [node.addr[0].decode() if isinstance(node.addr[0], bytes) else node.addr[0]
                 for node in result.nodes]
        if not addrs:
            raise OSError(f"cannot resolve {host}: no addresses")
        return addrs
