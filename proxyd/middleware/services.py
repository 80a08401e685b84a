"""What a middleware element takes from its worker when it is bound (after fork): typed.

A worker builds one Services for all its routes (proxy/pipeline.py) and passes it to each
element's ``bind``, with the route. An element keeps what it needs of it; nothing here is
looked up by name at request time. The worker's live count and the rate limiters' fallback
state are small objects of their own, shared by every route's elements.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxyd.cache.service import CacheService
    from proxyd.config.models import GatewayConfig
    from proxyd.observe.metrics import WorkerMetrics
    from proxyd.proxy.field_rules import TrustedProxies
    from proxyd.proxy.upstream import UpstreamPool


class WorkerCount:
    """The number of workers the master runs (it changes with SIGTTIN/SIGTTOU), for what is
    shared among them (memory rate limits); until the master says, the configured number."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.listeners: list[Callable[[int], None]] = []

    def set(self, count: int) -> None:
        if count >= 1 and count != self.count:
            self.count = count
            for listener in self.listeners:
                listener(count)


class Fallbacks:
    """Which Redis-backed rate limiters of the worker are on their local fallback: the
    worker's gauge is 1 while any is."""

    def __init__(self) -> None:
        self.on: set[object] = set()

    def set(self, limiter: object, on_fallback: bool) -> None:
        if on_fallback:
            self.on.add(limiter)
        else:
            self.on.discard(limiter)

    @property
    def active(self) -> float:
        return 1.0 if self.on else 0.0


class Services:
    """The worker's resources, as middleware see them. ``metrics_enabled`` False: counting
    per request is left out; ``closers`` run when the worker stops."""

    def __init__(self, config: GatewayConfig, loop: asyncio.AbstractEventLoop | None,
                 metrics: WorkerMetrics, metrics_enabled: bool, trusted: TrustedProxies,
                 pools: Mapping[str, UpstreamPool], cache: CacheService | None,
                 workers: WorkerCount, fallbacks: Fallbacks) -> None:
        self.config = config
        self.loop = loop
        self.metrics = metrics
        self.metrics_enabled = metrics_enabled
        self.trusted = trusted
        self.pools = pools
        self.cache = cache
        self.workers = workers
        self.fallbacks = fallbacks
        self.closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def background(self) -> int:
        """How many tasks spawn() started are still running."""
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, kept until it ends."""
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
