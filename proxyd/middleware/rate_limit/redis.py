"""GCRA in Redis: one Lua script per request checks every limit atomically, on Redis's clock.

EVALSHA with an EVAL fallback on NOSCRIPT, over the limiter's own pipelined RESP connection
(resp.py); keys expire when their bucket is full again. A circuit breaker stops asking a
Redis that fails: while open, the caller's fallback decides, and no request pays a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from proxyd.middleware.rate_limit.gcra import Decision, Limit
from proxyd.middleware.rate_limit.resp import RespClient, RespError, command

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


class RedisLimiter:
    """Every limit of one request in one EVALSHA, on this worker's pipelined connection."""

    def __init__(self, url: str, limits: list[Limit], timeout: float) -> None:
        self.url = url
        self.limits = limits
        self.timeout = timeout
        self.breaker = Breaker()
        self._client: RespClient | None = None
        self._args = [max(1, round(x * 1e6)) for limit in limits
                      for x in (limit.interval, limit.tolerance)]
        # The request's constant parts, encoded once: only the keys change per request.
        count = len(limits)
        sha = hashlib.sha1(GCRA_LUA.encode()).hexdigest().encode()
        size = b"*%d\r\n" % (3 + count + len(self._args))
        numkeys = b"$%d\r\n%d\r\n" % (len(str(count)), count)
        self._evalsha = size + command(b"EVALSHA", sha)[4:] + numkeys
        self._eval = size + command(b"EVAL", GCRA_LUA.encode())[4:] + numkeys
        self._argv = b"".join(b"$%d\r\n%d\r\n" % (len(str(a)), a) for a in self._args)
        self._suffixes = [b":%d" % i for i in range(count)]

    def request(self, key: str, callback: Callable[[list[Decision] | BaseException], None]
                ) -> None:
        """Ask Redis; ``callback`` gets the decisions, or the exception on any failure."""
        client = self._client
        if client is None:
            # Created in the worker's loop, after fork. The connect timeout is the check's:
            # a slow Redis must cost milliseconds, then the breaker takes over.
            try:
                client = self._client = RespClient(self.url, self.timeout)
            except (ValueError, OSError) as exc:  # config checks catch these; never raise
                callback(ConnectionError(f"bad redis.url: {exc}"))
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        # One hash tag for all of a request's keys: the script touches them together, which
        # Redis Cluster allows only within one slot.
        base = f"{KEY_PREFIX}{{{key}}}".encode()
        keys = b"".join(b"$%d\r\n%s%s\r\n" % (len(base) + len(suffix), base, suffix)
                        for suffix in self._suffixes)

        def on_reply(reply: Any) -> None:
            if isinstance(reply, RespError) and str(reply).startswith("NOSCRIPT"):
                # Not cached in this Redis (restarted, SCRIPT FLUSH): EVAL loads it again,
                # within what is left of this check's time.
                left = max(0.001, deadline - loop.time())
                client.call(self._eval + keys + self._argv, on_eval, left)
                return
            on_eval(reply)

        def on_eval(reply: Any) -> None:
            callback(self._decisions(reply))

        client.call(self._evalsha + keys + self._argv, on_reply, self.timeout)

    def _decisions(self, reply: Any) -> list[Decision] | BaseException:
        if isinstance(reply, BaseException):
            return reply
        limits = self.limits
        if not isinstance(reply, list) or len(reply) != 1 + 3 * len(limits):
            return RespError(f"unexpected reply to the rate limit script: {reply!r:.200}")
        allowed = reply[0] == 1
        decisions = []
        for i, limit in enumerate(limits):
            remaining, reset_us, retry_us = reply[1 + 3 * i: 4 + 3 * i]
            ok = allowed or retry_us == 0
            decisions.append(Decision(allowed and ok, limit, remaining if allowed else 0,
                                      reset_us / 1e6, retry_us / 1e6))
        return decisions

    async def check(self, key: str) -> list[Decision]:
        """``request`` for a coroutine: raises on Redis failure."""
        future: asyncio.Future[list[Decision] | BaseException] = (
            asyncio.get_running_loop().create_future())

        def settle(result: list[Decision] | BaseException) -> None:
            if not future.done():
                future.set_result(result)

        self.request(key, settle)
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
