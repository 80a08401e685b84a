"""An exact number of answered requests, for tests that compare counts with the server's."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Exact:
    """Exactly ``n`` answered GETs, each on a new connection (so the kernel spreads them).

    A connection that was refused or reset before any answer is retried: without
    net.ipv4.tcp_migrate_req, a connection in the accept queue of a socket that a recycled
    worker closes is reset, and that request never reached a worker. Anything else fails.
    """

    url: str
    paths: tuple[str, ...] = ("/marker", "/")
    ok: int = 0
    retried: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    async def run(self, n: int, concurrency: int = 8, pause: float = 0.0) -> None:
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        timeout = aiohttp.ClientTimeout(total=15)
        tickets = iter(range(n))
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            session._retry_connection = False  # see conftest.Load.start

            async def client() -> None:
                for i in tickets:
                    path = self.paths[i % len(self.paths)]
                    while True:
                        try:
                            async with session.get(self.url + path) as r:
                                await r.read()
                                self.statuses[r.status] += 1
                            break
                        except aiohttp.ClientConnectionError as exc:
                            self.retried.append(f"{type(exc).__name__}: {exc}")
                            await asyncio.sleep(0.01)
                    self.ok += 1
                    if pause:
                        await asyncio.sleep(pause)

            await asyncio.gather(*(client() for _ in range(concurrency)))
