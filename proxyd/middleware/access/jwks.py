"""A JWKS URL's keys, fetched in the background by each worker; requests never wait on a fetch
except the first one's.

One ``JwksSource`` per URL (and timing options) per worker, shared by every route's jwt_auth
element: a config with fifty routes behind one issuer makes one fetch, not fifty. The source
fetches at start and every ``refresh``; a token naming a kid the keys lack makes it fetch again
at once (the issuer has rotated), at most every ``min_interval``. A failed fetch (the issuer
down, a bad document) changes nothing: the last good keys stay in use, the failure is logged
and counted (``gateway_jwks_refreshes_total{result="error"}``), and the next try comes after
``min_interval``, doubling up to ``refresh``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from proxyd.middleware.access.keys import KeySet, UnusableKey, parse_jwks
from proxyd.observe.throttle import ThrottledLog

if TYPE_CHECKING:
    from proxyd.observe.metrics import WorkerMetrics

log = logging.getLogger("proxyd.jwt_auth")
MAX_DOCUMENT: Final = 1 << 20  # bytes; a JWKS is a few KiB

# (id of the event loop, url, refresh, timeout, min_interval, algorithms) → the source; the
# loop is the worker's (tests run several in one process, one loop each).
Key = tuple[int, str, float, float, float, frozenset[str]]
_SOURCES: dict[Key, JwksSource] = {}


class JwksSource:
    """The keys of one JWKS URL, kept current by a background task of the worker's loop."""

    def __init__(self, url: str, refresh: float, timeout: float, min_interval: float,
                 algorithms: frozenset[str], metrics: WorkerMetrics | None = None) -> None:
        self.url = url
        self.refresh = max(refresh, 1.0)
        self.timeout = timeout
        self.min_interval = min_interval
        self.algorithms = algorithms
        self.metrics = metrics
        self.keys: KeySet | None = None  # None until a fetch has succeeded
        self.generation = 0  # +1 each time the keys change: tokens verified before re-verify
        self.fetched_at = 0.0  # monotonic time of the last good fetch
        self.attempted_at = -float("inf")  # monotonic time the last fetch began
        self.fetching = False
        self.failures = 0  # in a row
        self.users = 0
        self._waiters: list[Callable[[], None]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._log = ThrottledLog(log, per_interval=2, interval=60.0)

    # -- sharing -----------------------------------------------------------------------------
    @classmethod
    def acquire(cls, loop: asyncio.AbstractEventLoop, url: str, refresh: float,
                timeout: float, min_interval: float, algorithms: frozenset[str],
                metrics: WorkerMetrics | None = None) -> JwksSource:
        """The worker's source for these settings, started on first use."""
        key: Key = (id(loop), url, refresh, timeout, min_interval, algorithms)
        source = _SOURCES.get(key)
        if source is None or source.loop is not loop:  # (an id reused by a later loop)
            source = _SOURCES[key] = cls(url, refresh, timeout, min_interval, algorithms,
                                         metrics)
            source.start(loop)
        source.users += 1
        return source

    async def release(self) -> None:
        """One user fewer; the last one stops the task and closes its connections."""
        self.users -= 1
        if self.users > 0:
            return
        for key, source in list(_SOURCES.items()):
            if source is self:
                del _SOURCES[key]
        await self.close()

    # -- the task ----------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._wake = asyncio.Event()
        self.fetching = True  # from now: requests before the first fetch ends wait for it
        self._task = loop.create_task(self._run(), name=f"jwks {self.url}")

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._settle()  # nobody waits on a source that is gone

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            ok = await self.fetch()
            delay = self.refresh if ok else min(
                self.refresh, max(self.min_interval, 1.0) * 2 ** min(self.failures - 1, 10))
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)

    def fetch_soon(self) -> bool:
        """Ask for a fetch now (a kid the keys lack); False when the last one began less than
        ``min_interval`` ago. When True, ``when_fetched`` callbacks run after it."""
        if self.fetching:
            return True
        if time.monotonic() - self.attempted_at < self.min_interval or self._wake is None:
            return False
        self._wake.set()
        self.fetching = True  # so that requests arriving before the task runs wait for it
        return True

    def when_fetched(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the fetch in progress (or asked for) has ended, either way."""
        self._waiters.append(callback)

    def _settle(self) -> None:
        waiters, self._waiters = self._waiters, []
        for callback in waiters:
            callback()

    async def fetch(self) -> bool:
        """One fetch; the keys change only when it gives a usable key set."""
        import aiohttp

        self.fetching = True
        self.attempted_at = time.monotonic()
        try:
            keys, skipped = await self._download()
        except (UnusableKey, aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.fetching = False
            self._failed(str(exc) or type(exc).__name__)
            return False
        self.fetching = False
        if skipped:
            self._log.warning("jwt_auth: JWKS %s: keys skipped: %s", self.url, "; ".join(skipped))
        if self.keys is None or keys.fingerprint != self.keys.fingerprint:
            self.keys = keys
            self.generation += 1
        self.fetched_at = time.monotonic()
        self.failures = 0
        self._count("ok")
        self._settle()
        return True

    async def _download(self) -> tuple[KeySet, list[str]]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Accept": "application/json"})
        # No redirects: the URL configured is the one trusted to name the keys.
        async with self._session.get(self.url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise UnusableKey(f"HTTP {resp.status}")
            body = await resp.content.read(MAX_DOCUMENT + 1)
        if len(body) > MAX_DOCUMENT:
            raise UnusableKey(f"a document over {MAX_DOCUMENT} bytes")
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise UnusableKey(f"not JSON ({exc})") from None
        keys, skipped = parse_jwks(document, self.algorithms)
        if not keys:
            raise UnusableKey("no usable key" + (f" ({'; '.join(skipped)})" if skipped else ""))
        return keys, skipped

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self._count("error")
        if self.keys is None:
            self._log.warning("jwt_auth: JWKS %s: fetch failed (%s); no keys yet, tokens are "
                              "refused with 503", self.url, reason)
        else:
            self._log.warning("jwt_auth: JWKS %s: fetch failed (%s); keeping the %d keys "
                              "fetched %.0fs ago", self.url, reason, len(self.keys),
                              time.monotonic() - self.fetched_at)
        self._settle()

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.jwks_refreshes.inc((result,))
