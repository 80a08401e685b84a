"""The Redis store: one cache shared by every worker and every instance.

Layout, all under ``proxyd:cache:``:

- ``<primary>`` holds either the entry itself (a response without Vary) or a Vary marker
  (``{"v": [names], "g": generation}``);
- ``<primary>\\0<generation>\\0<variant>`` holds one variant of a varying response.

A lookup is one GET, two for a varying response. Deleting the primary key invalidates every
variant at once, on every instance: variants are only reachable through the marker, and a new
marker gets a new generation, so an orphaned variant is never found again (it expires on its
own). Each key carries its own expiry: the entry's remaining freshness plus the stale window it
may still be served in, plus a margin during which it can still be revalidated.

Records are a compact JSON header (status, timings, vary, headers as latin-1 strings), a
newline, and the raw body; nothing is pickled.

A small per-worker L1 (a few hundred entries, one second old at most) answers repeated hits
without a round trip. Redis errors are misses, never errors: a circuit breaker
(``proxyd/breaker.py``) stops sending commands after a few consecutive failures, logs once,
probes in the background with PING and logs once more when Redis is back.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from proxyd.breaker import CLOSED, Breaker, Clock, Monotonic
from proxyd.cache.memory import MemoryStore
from proxyd.cache.policy import Headers, variant_key
from proxyd.cache.store import Entry

log = logging.getLogger("proxyd.cache")

NAMESPACE = b"proxyd:cache:"
TIMEOUT = 0.1  # socket connect and read: a slow Redis must not slow the proxy down
MARGIN = 60.0  # seconds a stale entry is kept past its stale windows, for revalidation
L1_ENTRIES = 512
L1_BYTES = 32 * 1024 * 1024
L1_MAX_AGE = 1.0  # how long another instance's invalidation can go unseen here
BREAKER_THRESHOLD = 3  # consecutive failures that open the breaker
BREAKER_COOLDOWN = 1.0  # first wait before probing; doubles up to BREAKER_MAX_COOLDOWN
BREAKER_MAX_COOLDOWN = 10.0
SCAN_COUNT = 500
MAX_DEFERRED = 1000  # invalidations kept while the breaker is open, replayed when it closes

Spawn = Callable[[Coroutine[Any, Any, None]], None]


def escape_glob(raw: bytes) -> bytes:
    """``raw`` as a literal inside a Redis MATCH pattern."""
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


def encode_entry(entry: Entry) -> bytes:
    head = {
        "s": entry.status,
        "t": entry.stored_at,
        "a": entry.initial_age,
        "l": entry.lifetime,
        "w": entry.stale_while_revalidate,
        "e": entry.stale_if_error,
        "v": [n.decode("latin-1") for n in entry.vary],
        "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in entry.headers],
    }
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + entry.body


def decode_record(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """(JSON header, body); ValueError when the record is not one of ours."""
    head, sep, body = raw.partition(b"\n")
    if not sep:
        raise ValueError("no header line")
    data = json.loads(head)
    if not isinstance(data, dict):
        raise ValueError("header is not an object")
    return data, body


def entry_from(data: dict[str, Any], body: bytes) -> Entry:
    return Entry(
        status=int(data["s"]),
        headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in data["h"]],
        body=body,
        stored_at=float(data["t"]),
        initial_age=float(data["a"]),
        lifetime=float(data["l"]),
        stale_while_revalidate=float(data["w"]),
        stale_if_error=float(data["e"]),
        vary=tuple(n.encode("latin-1") for n in data["v"]),
    )


def expiry_ms(entry: Entry, now: float) -> int:
    """Remaining freshness + the longest stale window + MARGIN, in milliseconds (≥ 1 s)."""
    remaining = entry.lifetime - entry.age(now)
    keep = remaining + max(entry.stale_while_revalidate, entry.stale_if_error) + MARGIN
    return max(1000, int(keep * 1000))


class _L1(MemoryStore):
    """A MemoryStore whose entries stop being answered ``max_age`` seconds after they landed."""

    def __init__(self, max_entries: int, max_bytes: int, max_object_size: int,
                 max_age: float) -> None:
        super().__init__(max_entries, max_bytes, max_object_size)
        self.max_age = max_age
        self._landed: dict[str, float] = {}  # primary → when its newest variant landed here

    def get(self, primary: str, request_headers: Headers) -> Entry | None:
        landed = self._landed.get(primary)
        if landed is None:
            return None
        if time.monotonic() - landed > self.max_age:
            self.delete(primary)
            return None
        return super().get(primary, request_headers)

    def put(self, primary: str, request_headers: Headers, entry: Entry) -> bool:
        if not super().put(primary, request_headers, entry):
            return False
        self._landed[primary] = time.monotonic()
        if len(self._landed) > 2 * self.max_entries:  # forget primaries the LRU evicted
            self._landed = {p: t for p, t in self._landed.items() if p in self._vary}
        return True

    def delete(self, primary: str) -> int:
        self._landed.pop(primary, None)
        return super().delete(primary)

    def clear(self) -> None:
        super().clear()
        self._landed.clear()


class RedisStore:
    """The Store interface (synchronous, L1 only) plus async twins that talk to Redis."""

    remote = True

    def __init__(self, url: str, max_entries: int, max_bytes: int, max_object_size: int,
                 spawn: Spawn, *, timeout: float = TIMEOUT, l1_max_age: float = L1_MAX_AGE,
                 l1_entries: int = L1_ENTRIES, clock: Clock | None = None) -> None:
        self.url = url
        self.max_object_size = max_object_size
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.spawn = spawn
        self.l1 = _L1(min(max_entries, l1_entries), min(max_bytes, L1_BYTES), max_object_size,
                      l1_max_age)
        self._client: Any = None
        self._closed = False
        # Probed with PING in the background: a lookup never waits on a Redis that failed.
        self.breaker = Breaker(clock or Monotonic(), failures=BREAKER_THRESHOLD,
                               open_for=BREAKER_COOLDOWN, longest=BREAKER_MAX_COOLDOWN)
        self.errors = 0  # Redis errors seen, including those that did not trip it
        # Invalidations made while Redis was unreachable: (primary or prefix, is_prefix).
        self._deferred: dict[tuple[str, bool], None] = {}

    # What this worker holds (its L1), as MemoryStore reports it: the worker's stats push
    # and /status read these of whichever store the config chose.
    def __len__(self) -> int:
        return len(self.l1)

    @property
    def bytes(self) -> int:  # hides the builtin in this class body: builtins.bytes below
        return self.l1.bytes

    # -- client and breaker -----------------------------------------------------------------
    def client(self) -> Any:
        """The client, created on first use so it belongs to the worker's loop (after fork)."""
        if self._closed:
            raise ConnectionError("the cache store is closed")
        if self._client is None:
            import redis.asyncio as aioredis

            self._client = aioredis.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                retry_on_timeout=False, health_check_interval=0,
            )
        return self._client

    @property
    def open(self) -> bool:
        """Whether the breaker keeps commands from Redis (open, or half-open and probing)."""
        return self.breaker.state != CLOSED

    @property
    def trips(self) -> int:
        return self.breaker.trips

    def available(self) -> bool:
        """Whether commands may be sent now; while open, starts a background probe when due."""
        breaker = self.breaker
        if breaker.state == CLOSED:
            return not self._closed
        # The probe is a PING of its own rather than the caller's command, so that no request
        # waits on a Redis that failed: this one is a miss like the others.
        if not self._closed and breaker.allow():
            self.spawn(self._probe())
        return False

    async def _probe(self) -> None:
        try:
            await self.client().ping()
        except Exception as exc:  # the breaker opens again, for longer
            self.breaker.record(False)
            log.debug("redis cache still unavailable: %s", exc)
        else:
            self._succeeded()

    def _failed(self, exc: BaseException) -> None:
        if self._closed:
            return  # an operation cut short by shutdown, not an outage
        self.errors += 1
        if self.breaker.record(False):
            log.warning("redis cache at %s unavailable (%s: %s); serving misses until it "
                        "answers again", self._safe_url(), type(exc).__name__, exc)

    def _succeeded(self) -> None:
        if self.breaker.record(True):
            log.warning("redis cache at %s available again", self._safe_url())
        if self._deferred and self.breaker.state == CLOSED:
            deferred, self._deferred = list(self._deferred), {}
            self.spawn(self._replay(deferred))

    def _defer(self, target: str, prefix: bool) -> None:
        if len(self._deferred) < MAX_DEFERRED:
            self._deferred[(target, prefix)] = None
        elif len(self._deferred) == MAX_DEFERRED:
            self._deferred[("", True)] = None  # too many: purge everything on recovery
            log.warning("redis cache: too many invalidations while unavailable; the whole "
                        "cache is purged when it returns")

    async def _replay(self, deferred: list[tuple[str, bool]]) -> None:
        for target, prefix in deferred:
            await (self.adelete_prefix(target) if prefix else self.adelete(target))

    def _safe_url(self) -> str:
        scheme, sep, rest = self.url.partition("://")
        return scheme + sep + rest.rpartition("@")[2]  # never log a password

    # -- keys ---------------------------------------------------------------------------------
    @staticmethod
    def primary_key(primary: str) -> builtins.bytes:
        return NAMESPACE + primary.encode("latin-1")

    @staticmethod
    def variant_key(primary: str, generation: str, names: tuple[builtins.bytes, ...],
                    request_headers: Headers) -> builtins.bytes:
        return (NAMESPACE + primary.encode("latin-1") + b"\0" + generation.encode() + b"\0"
                + variant_key(names, request_headers))

    # -- synchronous Store interface: L1 now, Redis in the background ----------------------
    def get(self, primary: str, request_headers: Headers) -> Entry | None:
        return self.l1.get(primary, request_headers)

    def put(self, primary: str, request_headers: Headers, entry: Entry) -> bool:
        if len(entry.body) > self.max_object_size or entry.size > self.max_bytes:
            return False
        self.l1.put(primary, request_headers, entry)
        if self.available():
            self.spawn(self._put_quietly(primary, list(request_headers), entry))
        return True

    def delete(self, primary: str) -> int:
        removed = self.l1.delete(primary)
        self._delete_shared(primary, False)
        return removed

    def delete_prefix(self, prefix: str) -> int:
        removed = self.l1.delete_prefix(prefix)
        self._delete_shared(prefix, True)
        return removed

    def _delete_shared(self, target: str, prefix: bool) -> None:
        """Redis's copy goes in the background; while Redis is unavailable, the deletion
        waits to be replayed."""
        if self.available():
            self.spawn(self._quietly(
                self.adelete_prefix(target) if prefix else self.adelete(target)))
        else:
            self._defer(target, prefix)

    async def _put_quietly(self, primary: str, request_headers: Headers, entry: Entry) -> None:
        await self.aput(primary, request_headers, entry)

    @staticmethod
    async def _quietly(coro: Coroutine[Any, Any, int]) -> None:
        await coro

    # -- asynchronous twins -------------------------------------------------------------------
    async def aget(self, primary: str, request_headers: Headers) -> Entry | None:
        """The entry from Redis (and into L1), or None on a miss or any Redis trouble."""
        if not self.available():
            return None
        client = self.client()
        try:
            raw = await client.get(self.primary_key(primary))
            if raw is None:
                self._succeeded()
                return None
            data, body = decode_record(raw)
            if "g" in data:  # a Vary marker: the variant is one more GET away
                names = tuple(n.encode("latin-1") for n in data["v"])
                raw = await client.get(
                    self.variant_key(primary, str(data["g"]), names, request_headers))
                self._succeeded()
                if raw is None:
                    return None
                data, body = decode_record(raw)
            else:
                self._succeeded()
            entry = entry_from(data, body)
        except (ValueError, KeyError, TypeError, UnicodeError) as exc:
            log.debug("unreadable cache record for %r: %s", primary, exc)
            return None
        except Exception as exc:  # Redis down, timeout, protocol: a miss
            self._failed(exc)
            return None
        self.l1.put(primary, request_headers, entry)
        return entry

    async def aput(self, primary: str, request_headers: Headers, entry: Entry) -> bool:
        if not self.available():
            return False
        client = self.client()
        px = expiry_ms(entry, time.time())
        key = self.primary_key(primary)
        try:
            if not entry.vary:
                await client.set(key, encode_entry(entry), px=px)
            else:
                names = [n.decode("latin-1") for n in entry.vary]
                generation = None
                raw = await client.get(key)
                if raw is not None:
                    try:
                        data, _ = decode_record(raw)
                        if "g" in data and data["v"] == names:
                            generation = str(data["g"])
                    except (ValueError, KeyError, TypeError):
                        pass
                pipe = client.pipeline(transaction=False)
                if generation is None:
                    generation = os.urandom(6).hex()
                    marker = json.dumps({"v": names, "g": generation}, separators=(",", ":"))
                    pipe.set(key, marker.encode() + b"\n", px=px)
                else:
                    pipe.pexpire(key, px, gt=True)  # the marker lives as long as its variants
                pipe.set(self.variant_key(primary, generation, entry.vary, request_headers),
                         encode_entry(entry), px=px)
                await pipe.execute()
        except Exception as exc:
            self._failed(exc)
            return False
        self._succeeded()
        return True

    async def adelete(self, primary: str) -> int:
        """Invalidate ``primary`` and all its variants, for every instance (but their L1s)."""
        self.l1.delete(primary)
        return await self._delete_in_redis(primary, False)

    async def adelete_prefix(self, prefix: str) -> int:
        """Every key whose primary starts with ``prefix`` (variants included); keys removed."""
        self.l1.delete_prefix(prefix)
        return await self._delete_in_redis(prefix, True)

    async def _delete_in_redis(self, target: str, prefix: bool) -> int:
        """Redis's keys of a primary, or of every primary that starts with a prefix: how many
        went. With Redis unavailable or failing, the deletion is replayed once it is back."""
        if not self.available():
            self._defer(target, prefix)
            return 0
        removed = 0
        try:
            client = self.client()
            if not prefix:
                removed = int(await client.delete(self.primary_key(target)))
            else:
                pattern = escape_glob(self.primary_key(target)) + b"*"
                batch: list[bytes] = []
                async for key in client.scan_iter(match=pattern, count=SCAN_COUNT):
                    batch.append(key)
                    if len(batch) >= SCAN_COUNT:
                        removed += int(await client.unlink(*batch))
                        batch = []
                if batch:
                    removed += int(await client.unlink(*batch))
        except Exception as exc:
            self._failed(exc)
            self._defer(target, prefix)
            return removed
        self._succeeded()
        return removed

    async def apurge(self, key: str | None, prefix: str | None) -> tuple[int, bool]:
        """An admin purge: (entries removed from Redis, whether Redis was unreachable and the
        purge waits to be replayed). Unlike an invalidation, a key's variants go too, so the
        count is of entries (a varying response's marker is not one)."""
        if key:
            self.l1.delete(key)
        if prefix:
            self.l1.delete_prefix(prefix)
        if not self.available():
            self._defer_purge(key, prefix)
            return 0, True
        client = self.client()
        removed = 0
        try:
            if key:
                primary = self.primary_key(key)
                deleted = int(await client.delete(primary))
                variants = await self._unlink_matching(escape_glob(primary + b"\0") + b"*")
                removed += variants or deleted
            if prefix:
                removed += await self._unlink_matching(
                    escape_glob(self.primary_key(prefix)) + b"*")
        except Exception as exc:
            self._failed(exc)
            self._defer_purge(key, prefix)
            return removed, True
        self._succeeded()
        return removed, False

    def _defer_purge(self, key: str | None, prefix: str | None) -> None:
        if key:
            self._defer(key, False)
        if prefix:
            self._defer(prefix, True)

    async def _unlink_matching(self, pattern: builtins.bytes) -> int:
        """Unlink every key matching ``pattern``; the entries among them: variants, and keys
        without variants (a key some variant names as its primary is a Vary marker)."""
        client = self.client()
        singles: list[builtins.bytes] = []  # removed keys without a variant part
        markers: set[builtins.bytes] = set()  # the primaries the removed variants name
        variants = 0

        async def unlink(batch: list[builtins.bytes]) -> None:
            nonlocal variants
            pipe = client.pipeline(transaction=False)
            for name in batch:
                pipe.unlink(name)
            for name, gone in zip(batch, await pipe.execute(), strict=True):
                if not gone:
                    continue  # removed meanwhile by someone else: not counted twice
                primary, sep, _ = name.partition(b"\0")
                if sep:
                    variants += 1
                    markers.add(primary)
                else:
                    singles.append(name)

        batch: list[builtins.bytes] = []
        async for name in client.scan_iter(match=pattern, count=SCAN_COUNT):
            batch.append(name)
            if len(batch) >= SCAN_COUNT:
                await unlink(batch)
                batch = []
        if batch:
            await unlink(batch)
        return variants + sum(1 for name in singles if name not in markers)

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception as exc:  # closing a dead connection
                log.debug("closing the redis cache client: %s", exc)
