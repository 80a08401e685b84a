"""GCRA in Redis: one Lua script per request checks every limit atomically, on Redis's clock.

EVALSHA with a NOSCRIPT fallback (redis-py's Script does both); keys expire when their bucket
is full again. A circuit breaker stops asking a Redis that fails: while open, the caller's
fallback decides, and no request pays a timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxyd.middleware.rate_limit.gcra import Decision, Limit

log = logging.getLogger("proxyd.rate_limit")

# KEYS: one per limit. ARGV: interval and tolerance per limit, in microseconds.
# Returns {allowed, remaining_1, reset_us_1, retry_us_1, remaining_2, ...}.
GCRA_LUA = """
if redis.replicate_commands then redis.replicate_commands() end  -- TIME before writes, Redis < 5
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local allowed = 1
local out = {}
local new_tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - tolerance
  if now < allow_at then
    allowed = 0
    out[#out + 1] = 0
    out[#out + 1] = tat - now
    out[#out + 1] = allow_at - now
  else
    new_tats[i] = new_tat
    out[#out + 1] = math.floor((now - allow_at) / interval)
    out[#out + 1] = new_tat - now
    out[#out + 1] = 0
  end
end
if allowed == 1 then
  for i = 1, #KEYS do
    redis.call('SET', KEYS[i], string.format('%.0f', new_tats[i]),
               'PX', math.ceil((new_tats[i] - now) / 1000) + 1)
  end
end
table.insert(out, 1, allowed)
return out
"""

KEY_PREFIX = "proxyd:rl:"
POOL_SIZE = 16  # connections per limiter per worker; a check holds one for one round trip


class Breaker:
    """Open after a failure for a cool-down that doubles while Redis keeps failing.

    Once the cool-down has passed, one request probes Redis (half-open); the others stay on
    the fallback until it answers or another cool-down passes. Only a failed probe doubles
    the cool-down: the requests that were in flight when Redis died fail together, and they
    are one outage, not several.
    """

    def __init__(self, first: float = 0.5, longest: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first = first
        self.longest = longest
        self.clock = clock
        self.cooldown = first
        self.open_until = 0.0
        self.tripped = False
        self.probing = False

    def allow(self) -> bool:
        if not self.tripped:
            return True
        now = self.clock()
        if now < self.open_until:
            return False
        # Half-open: this request probes; the next probe waits another cool-down.
        self.probing = True
        self.open_until = now + self.cooldown
        return True

    def failure(self, exc: BaseException) -> None:
        if not self.tripped:
            log.warning("redis rate limiting unavailable (%s); using the fallback", exc)
            self.tripped = True
            self.cooldown = self.first
        elif self.probing:
            self.cooldown = min(self.longest, self.cooldown * 2)
        else:
            return  # in flight before the trip: the breaker is already open
        self.probing = False
        self.open_until = self.clock() + self.cooldown

    def success(self) -> None:
        if self.tripped:
            log.warning("redis rate limiting recovered")
        self.tripped = False
        self.probing = False
        self.cooldown = self.first


def _no_client_setinfo() -> dict[str, Any]:
    """Connection options that skip CLIENT SETINFO, in this redis-py's spelling."""
    import inspect

    from redis.asyncio.connection import AbstractConnection

    if "driver_info" in inspect.signature(AbstractConnection.__init__).parameters:
        return {"driver_info": None}  # redis-py >= 7.1 (lib_name is deprecated there)
    return {"lib_name": None, "lib_version": None}


class RedisLimiter:
    def __init__(self, url: str, limits: list[Limit], timeout: float) -> None:
        self.url = url
        self.limits = limits
        self.timeout = timeout
        self.breaker = Breaker()
        self._client: Any = None
        self._script: Any = None
        self._args = [max(1, round(x * 1e6)) for limit in limits
                      for x in (limit.interval, limit.tolerance)]

    def _ensure(self) -> None:
        if self._client is None:
            import redis.asyncio as aioredis

            # Created inside the worker's loop, after fork; tight timeouts: a slow Redis must
            # cost milliseconds, then the breaker takes over. A blocking pool: past its size a
            # check waits (up to the timeout) for a connection instead of failing at once,
            # which would trip the breaker on a burst. No CLIENT SETINFO: two more round
            # trips per new connection, enough to miss the connect timeout on a cold burst.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                max_connections=POOL_SIZE, timeout=self.timeout, **_no_client_setinfo(),
            )
            self._client = aioredis.Redis(connection_pool=pool)
            self._script = self._client.register_script(GCRA_LUA)

    async def check(self, key: str) -> list[Decision]:
        """Raises on Redis failure; the caller falls back."""
        self._ensure()
        # One hash tag for all of a request's keys: the script touches them together, which
        # Redis Cluster allows only within one slot.
        keys = [f"{KEY_PREFIX}{{{key}}}:{i}" for i in range(len(self.limits))]
        try:
            reply = await self._script(keys=keys, args=self._args)
        except (RedisConnectionError, RedisTimeoutError):
            # The idle connections are as dead as this one (Redis restarted or went away):
            # drop them all, or each would fail once later and trip the breaker again after
            # Redis is back.
            await self._client.connection_pool.disconnect(inuse_connections=False)
            raise
        allowed = bool(int(reply[0]))
        decisions = []
        for i, limit in enumerate(self.limits):
            remaining, reset_us, retry_us = (int(x) for x in reply[1 + 3 * i: 4 + 3 * i])
            ok = allowed or retry_us == 0
            decisions.append(Decision(allowed and ok, limit, remaining if allowed else 0,
                                      reset_us / 1e6, retry_us / 1e6))
        return decisions

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
            # A client given its pool leaves the pool open: close its connections too.
            await client.connection_pool.disconnect()
