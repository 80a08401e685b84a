"""Active health checks, run once per instance in the master (never once per worker).

Each target of an upstream with ``health_check`` gets a loop: GET ``path`` every ``interval``
with a ``timeout``; a status in ``expected_statuses`` (any 2xx/3xx when empty) passes. The first
result sets the state; after that ``unhealthy_threshold`` failures in a row take a target out
and ``healthy_threshold`` passes in a row bring it back. Every change is pushed to the workers
as a ``health`` control message (and a worker that becomes ready gets the current state), and
``describe()`` is what /status shows under ``upstreams``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import h2.events as h2_events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import H2Error

from proxyd.config.models import GatewayConfig, HealthCheck, Upstream
from proxyd.proxy.upstream_tls import client_context

log = logging.getLogger("proxyd.health")
USER_AGENT = "proxyd-health-check"


class TargetHealth:
    """What the checker knows about one target."""

    def __init__(self, check: HealthCheck | None) -> None:
        self.check = check
        self.healthy = True  # until a check says otherwise
        self.last_check: float | None = None  # unix time
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.successes = 0  # consecutive
        self.failures = 0  # consecutive
        self.checks = 0
        self.changed_at: float | None = None

    def record(self, ok: bool, status: int | None, error: str | None) -> bool:
        """One check's result; True when it changed the target's state."""
        assert self.check is not None
        first = self.checks == 0
        self.checks += 1
        self.last_check = time.time()
        self.last_status, self.last_error = status, error
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1
        healthy = self.healthy
        if first:
            healthy = ok
        elif self.healthy and self.failures >= self.check.unhealthy_threshold:
            healthy = False
        elif not self.healthy and self.successes >= self.check.healthy_threshold:
            healthy = True
        if healthy == self.healthy:
            return False
        self.healthy = healthy
        self.changed_at = self.last_check
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy, "checked": self.check is not None,
            "last_check": self.last_check, "last_status": self.last_status,
            "last_error": self.last_error, "consecutive_successes": self.successes,
            "consecutive_failures": self.failures, "checks": self.checks,
            "changed_at": self.changed_at,
        }


def passes(check: HealthCheck, status: int) -> bool:
    if check.expected_statuses:
        return status in check.expected_statuses
    return 200 <= status < 400


async def probe_h2(url: str, check: HealthCheck, context: ssl.SSLContext | None,
                   server_name: str | None) -> tuple[bool, int | None, str | None]:
    """A check over HTTP/2, as the workers speak it to this upstream (h2 by ALPN, or h2c by
    prior knowledge): a new connection, one GET stream, the status, the close."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if context is not None else 80)
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=(server_name or host) if context
                else None)
            conn.initiate_connection()
            authority = parts.netloc.rpartition("@")[2]
            conn.send_headers(1, [(":method", "GET"), (":scheme", parts.scheme),
                                  (":authority", authority), (":path", check.path),
                                  ("user-agent", USER_AGENT)], end_stream=True)
            writer.write(conn.data_to_send())
            status: int | None = None
            while True:
                data = await reader.read(65536)
                if not data:
                    return False, status, "the connection closed before the answer"
                for event in conn.receive_data(data):
                    if isinstance(event, h2_events.ResponseReceived):
                        status = int(dict(event.headers or [])[b":status"])
                    elif isinstance(event, h2_events.DataReceived) and event.stream_id:
                        conn.acknowledge_received_data(event.flow_controlled_length or 0,
                                                       event.stream_id)
                    elif isinstance(event, h2_events.StreamEnded) and status is not None:
                        return passes(check, status), status, None
                    elif isinstance(event, h2_events.StreamReset):
                        return False, None, f"stream reset ({event.error_code})"
                writer.write(conn.data_to_send())
    except TimeoutError:
        return False, None, f"timeout after {check.timeout:g}s"
    except (OSError, H2Error, KeyError, ValueError) as exc:
        return False, None, f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()


class HealthChecker:
    """The master's checker: one task per checked target, reconfigured on reload."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.states: dict[str, dict[str, TargetHealth]] = {}
        self._tasks: dict[tuple[str, str], tuple[asyncio.Task[None], Any]] = {}
        self._session: aiohttp.ClientSession | None = None

    def configure(self, config: GatewayConfig) -> None:
        """Check what ``config`` asks for. A target checked the same way as before keeps its
        state and its loop; others start fresh; targets no longer configured stop."""
        states: dict[str, dict[str, TargetHealth]] = {}
        wanted: dict[tuple[str, str], Any] = {}
        for name, upstream in config.upstreams.items():
            check = upstream.health_check
            states[name] = {}
            for target in upstream.targets:
                key = (name, target.url)
                identity = (check, upstream.tls) if check is not None else None
                old = self.states.get(name, {}).get(target.url)
                running = self._tasks.get(key)
                if old is not None and running is not None and running[1] == identity:
                    states[name][target.url] = old
                    wanted[key] = identity
                    continue
                states[name][target.url] = TargetHealth(check)
                if check is not None:
                    wanted[key] = identity
        for key, (task, identity) in list(self._tasks.items()):
            if key not in wanted or wanted[key] != identity:
                task.cancel()
                del self._tasks[key]
        self.states = states
        for name, upstream in config.upstreams.items():
            if upstream.health_check is None:
                continue
            context = client_context(upstream)
            for target in upstream.targets:
                key = (name, target.url)
                if key in self._tasks:
                    continue
                state = states[name][target.url]
                task = asyncio.get_running_loop().create_task(
                    self._run(name, target.url, upstream, context, state))
                self._tasks[key] = (task, wanted[key])

    def snapshot(self) -> dict[str, dict[str, bool]]:
        """For the workers: checked targets only (unchecked ones stay as they are)."""
        return {name: {url: st.healthy for url, st in targets.items() if st.check is not None}
                for name, targets in self.states.items()}

    def message(self) -> dict[str, Any]:
        return {"type": "health", "upstreams": self.snapshot()}

    def describe(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {name: {url: st.describe() for url, st in targets.items()}
                for name, targets in self.states.items()}

    async def _run(self, name: str, url: str, upstream: Upstream,
                   context: ssl.SSLContext | None, state: TargetHealth) -> None:
        check = upstream.health_check
        assert check is not None
        server_name = upstream.tls.server_name
        probe = self.probe if upstream.protocol == "http1" else probe_h2
        while True:
            ok, status, error = await probe(url, check, context, server_name)
            if state.record(ok, status, error):
                log.warning("upstream %s target %s is now %s (%s)", name, url,
                            "healthy" if state.healthy else "unhealthy",
                            f"status {status}" if status is not None else error)
                self.on_change()
            await asyncio.sleep(check.interval)

    async def probe(self, url: str, check: HealthCheck, context: ssl.SSLContext | None,
                    server_name: str | None) -> tuple[bool, int | None, str | None]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                headers={"User-Agent": USER_AGENT}, auto_decompress=False,
            )
        try:
            async with self._session.get(
                url.rstrip("/") + check.path, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=check.timeout),
                ssl=context if context is not None else True,
                server_hostname=server_name if context is not None else None,
            ) as resp:
                await resp.read()
                return passes(check, resp.status), resp.status, None
        except TimeoutError:
            return False, None, f"timeout after {check.timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return False, None, f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        tasks = [task for task, _ in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
