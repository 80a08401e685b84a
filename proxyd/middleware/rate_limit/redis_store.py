"""GCRA in Redis: one Lua script per request checks every limit atomically, on Redis's clock.

EVALSHA with an EVAL fallback on NOSCRIPT, over the limiter's own pipelined connection
(redis_client.py); keys expire when their bucket is full again. A circuit breaker stops asking a
Redis that fails: while open, the caller's fallback decides, and no request pays a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from proxyd.breaker import Breaker, Clock, Monotonic
from proxyd.middleware.rate_limit.gcra import Decision, Limit
from proxyd.middleware.rate_limit.redis_client import PipelinedClient, command

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
# The breaker opens at the first failure: each failed check is a request on the fallback
# anyway, and a second one would cost another timeout. Its open time doubles per failed probe.
BREAKER_OPEN_FOR = 0.5
BREAKER_LONGEST = 30.0


class RedisLimiter:
    """Every limit of one request in one EVALSHA, on this worker's pipelined connection."""

    def __init__(self, url: str, limits: list[Limit], timeout: float,
                 clock: Clock | None = None) -> None:
        self.url = url
        self.limits = limits
        self.timeout = timeout
        self.breaker = Breaker(clock or Monotonic(), failures=1, open_for=BREAKER_OPEN_FOR,
                               longest=BREAKER_LONGEST)
        self._client: PipelinedClient | None = None
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

    def failure(self, exc: BaseException) -> None:
        """A check failed: the breaker hears of it, and the first failure of an outage is
        logged (one line per outage, not one per request)."""
        if self.breaker.record(False):
            log.warning("redis rate limiting unavailable (%s); using the fallback", exc)

    def success(self) -> bool:
        """Redis answered a check: True when that ended an outage."""
        if self.breaker.record(True):
            log.warning("redis rate limiting recovered")
            return True
        return False

    def request(self, key: str, callback: Callable[[list[Decision] | BaseException], None]
                ) -> None:
        """Ask Redis; ``callback`` gets the decisions, or the exception on any failure."""
        client = self._client
        if client is None:
            # Created in the worker's loop, after fork. The connect timeout is the check's:
            # a slow Redis must cost milliseconds, then the breaker takes over.
            try:
                client = self._client = PipelinedClient(self.url, self.timeout)
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
            if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
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
            return ResponseError(f"unexpected reply to the rate limit script: {reply!r:.200}")
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
