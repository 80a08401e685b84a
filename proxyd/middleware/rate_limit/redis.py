"""GCRA in Redis: one Lua script per request checks every limit atomically, on Redis's clock.

EVALSHA with a NOSCRIPT fallback (redis-py's Script does both); keys expire when their bucket
is full again. A circuit breaker stops asking a Redis that fails: while open, the caller's
fallback decides, and no request pays a timeout.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from proxyd.middleware.rate_limit.gcra import Decision, Limit

log = logging.getLogger("proxyd.rate_limit")

# KEYS: one per limit. ARGV: interval and tolerance per limit, in microseconds.
# Returns {allowed, remaining_1, reset_us_1, retry_us_1, remaining_2, ...}.
GCRA_LUA = """
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


class Breaker:
    """Open after a failure for a cool-down that doubles while Redis keeps failing."""

    def __init__(self, first: float = 0.5, longest: float = 30.0) -> None:
        self.first = first
        self.longest = longest
        self.cooldown = first
        self.open_until = 0.0
        self.tripped = False

    def allow(self) -> bool:
        return time.monotonic() >= self.open_until

    def failure(self, exc: BaseException) -> None:
        if not self.tripped:
            log.warning("redis rate limiting unavailable (%s); using the fallback", exc)
        else:
            self.cooldown = min(self.longest, self.cooldown * 2)
        self.tripped = True
        self.open_until = time.monotonic() + self.cooldown

    def success(self) -> None:
        if self.tripped:
            log.warning("redis rate limiting recovered")
        self.tripped = False
        self.cooldown = self.first


class RedisLimiter:
    def __init__(self, url: str, limits: list[Limit], timeout: float) -> None:
        self.url = url
        self.limits = limits
        self.timeout = timeout
        self.breaker = Breaker()
        self._client: Any = None
        self._script: Any = None
        self._args = [int(x) for limit in limits
                      for x in (round(limit.interval * 1e6), round(limit.tolerance * 1e6))]

    def _ensure(self) -> None:
        if self._client is None:
            import redis.asyncio as aioredis

            # Created inside the worker's loop, after fork; tight timeouts: a slow Redis must
            # cost milliseconds, then the breaker takes over.
            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                max_connections=256,
            )
            self._script = self._client.register_script(GCRA_LUA)

    async def check(self, key: str) -> list[Decision]:
        """Raises on Redis failure; the caller falls back."""
        self._ensure()
        keys = [f"{KEY_PREFIX}{i}:{key}" for i in range(len(self.limits))]
        reply = await self._script(keys=keys, args=self._args)
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
            await self._client.aclose()
