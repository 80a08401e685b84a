"""Admin purges (DELETE /cache): sent to every live worker, answered with what they removed.

Each worker answers a ``purge`` control message with ``purged {id, removed, deferred}``. With
the memory backend every worker purges its own store and the counts add up; with Redis one
worker (``shared``) purges the shared store and counts, and the others drop their L1 copies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Protocol

from proxyd.control import Channel

TIMEOUT = 5.0  # a worker that has not answered by then is reported as not answering


class Handle(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def channel(self) -> Channel | None: ...


class Purges:
    """The master's side: one per master, fed the workers' ``purged`` messages."""

    def __init__(self) -> None:
        self._next = 0
        self._waiting: dict[tuple[int, int], asyncio.Future[dict[str, Any]]] = {}

    async def run(self, handles: Iterable[Handle], key: str | None, prefix: str | None,
                  timeout: float = TIMEOUT) -> dict[str, Any]:
        """{"purged": entries removed, "workers": asked, "answered": answered, "deferred":
        whether Redis was unreachable (the purge is replayed when it answers again)}."""
        self._next += 1
        purge_id = self._next
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[dict[str, Any]]] = []
        keys: list[tuple[int, int]] = []
        for handle in handles:
            channel = handle.channel
            if channel is None:
                continue
            reply: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._waiting[(purge_id, handle.pid)] = reply
            keys.append((purge_id, handle.pid))
            waits.append(reply)
            channel.send({"type": "purge", "id": purge_id, "key": key, "prefix": prefix,
                          "shared": len(waits) == 1})
        try:
            done: set[asyncio.Future[dict[str, Any]]] = set()
            if waits:
                done, _ = await asyncio.wait(waits, timeout=timeout)
        finally:
            for k in keys:
                self._waiting.pop(k, None)
        answers = [reply.result() for reply in done]
        return {"purged": sum(int(a.get("removed", 0)) for a in answers),
                "workers": len(waits), "answered": len(answers),
                "deferred": any(bool(a.get("deferred")) for a in answers)}

    def answered(self, pid: int, message: dict[str, Any]) -> None:
        """A worker's ``purged`` message."""
        reply = self._waiting.pop((message.get("id", -1), pid), None)
        if reply is not None and not reply.done():
            reply.set_result(message)
