"""The Redis store against a real redis-server on a free port (skipped when not installed)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxyd.cache import redis as redis_store
from proxyd.cache.redis import RedisStore, decode_record, encode_entry, entry_from, escape_glob
from proxyd.cache.store import Entry
from tests.redis_server import RedisServer, needs_redis, redis_server  # noqa: F401

AE = b"accept-encoding"
GZ = [(AE, b"gzip")]
BR = [(AE, b"br")]


def entry(body: bytes = b"body", lifetime: float = 60.0, vary: tuple[bytes, ...] = (),
          **kw: Any) -> Entry:
    kw.setdefault("initial_age", 0.0)
    return Entry(status=200, headers=[(b"Content-Type", b"text/plain"), (b"X-Latin", b"caf\xe9")],
                 body=body, stored_at=time.time(), lifetime=lifetime, vary=vary, **kw)


class Spawner:
    """Stands in for Pipeline.spawn: keeps the tasks so a test can wait for them."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def settle(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks))


Make = Callable[..., RedisStore]


@pytest.fixture
async def make(redis_server: RedisServer) -> AsyncIterator[Make]:  # noqa: F811
    stores: list[RedisStore] = []

    def build(**kw: Any) -> RedisStore:
        kw.setdefault("spawn", Spawner())
        store = RedisStore(redis_server.url, 1000, 1 << 24, 1 << 20, **kw)
        stores.append(store)
        return store

    yield build
    for store in stores:
        await store.spawn.settle()  # type: ignore[attr-defined]
        await store.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


def same(a: Entry | None, b: Entry) -> None:
    assert a is not None
    assert (a.status, a.headers, a.body, a.vary) == (b.status, b.headers, b.body, b.vary)
    assert a.stored_at == pytest.approx(b.stored_at)
    assert (a.initial_age, a.lifetime, a.stale_while_revalidate, a.stale_if_error) == (
        b.initial_age, b.lifetime, b.stale_while_revalidate, b.stale_if_error)


# -- without a server -----------------------------------------------------------------------------


def test_record_round_trip_is_compact_and_binary_safe() -> None:
    e = entry(body=bytes(range(256)) + b"\n\n", vary=(AE,), stale_while_revalidate=5.0,
              stale_if_error=7.0, initial_age=3.0)
    raw = encode_entry(e)
    assert raw.endswith(e.body)
    assert len(raw) < len(e.body) + 300
    head, body = decode_record(raw)
    same(entry_from(head, body), e)
    with pytest.raises(ValueError):
        decode_record(b"no newline here")


def test_escape_glob() -> None:
    assert escape_glob(b"a*b?c[d]e\\f") == b"a\\*b\\?c\\[d\\]e\\\\f"
    assert escape_glob(b"/plain/path") == b"/plain/path"


def test_expiry_covers_freshness_and_stale_windows() -> None:
    now = time.time()
    e = entry(lifetime=100.0, stale_while_revalidate=30.0, stale_if_error=50.0)
    assert redis_store.expiry_ms(e, now) == int((100 + 50 + redis_store.MARGIN) * 1000)
    old = entry(lifetime=10.0)
    old.initial_age = 1000.0
    assert redis_store.expiry_ms(old, now) == 1000  # long stale: the floor


# -- against a real redis-server ------------------------------------------------------------------


@needs_redis
async def test_round_trip_through_redis(make: Make, raw: aioredis.Redis) -> None:
    writer, reader = make(), make()
    e = entry(stale_if_error=9.0)
    assert await writer.aput("http://h/a", [], e)
    assert reader.get("http://h/a", []) is None  # nothing in the reader's L1 yet
    got = await reader.aget("http://h/a", [])
    same(got, e)
    assert reader.get("http://h/a", []) is got  # now in L1
    assert await raw.exists(b"proxyd:cache:http://h/a") == 1
    assert await reader.aget("http://h/missing", []) is None


@needs_redis
async def test_sync_put_writes_through_in_the_background(make: Make) -> None:
    writer, reader = make(), make()
    e = entry()
    assert writer.put("http://h/bg", [], e)
    assert writer.get("http://h/bg", []) is e  # L1 at once
    await writer.spawn.settle()  # type: ignore[attr-defined]
    same(await reader.aget("http://h/bg", []), e)
    assert not writer.put("http://h/big", [], entry(body=b"x" * ((1 << 20) + 1)))


@needs_redis
async def test_l1_entries_expire_after_max_age(make: Make) -> None:
    store = make(l1_max_age=0.05)
    store.put("http://h/l1", [], entry())
    assert store.get("http://h/l1", []) is not None
    await asyncio.sleep(0.08)
    assert store.get("http://h/l1", []) is None
    assert await store.aget("http://h/l1", []) is not None  # still in Redis


@needs_redis
async def test_vary_variants_in_redis(make: Make, raw: aioredis.Redis) -> None:
    writer, reader = make(), make()
    await writer.aput("http://h/v", GZ, entry(b"gz", vary=(AE,)))
    await writer.aput("http://h/v", BR, entry(b"br", vary=(AE,)))
    assert (await reader.aget("http://h/v", [(AE, b"gzip")])).body == b"gz"  # type: ignore[union-attr]
    assert (await reader.aget("http://h/v", [(AE, b" br ")])).body == b"br"  # type: ignore[union-attr]
    assert await reader.aget("http://h/v", []) is None
    keys = sorted(await raw.keys(b"proxyd:cache:*"))
    assert len(keys) == 3  # the marker and two variants
    head, _ = decode_record(await raw.get(b"proxyd:cache:http://h/v"))
    assert head["v"] == ["accept-encoding"]
    # The upstream stops varying: the plain entry replaces the marker.
    await writer.aput("http://h/v", GZ, entry(b"plain"))
    assert (await make().aget("http://h/v", BR)).body == b"plain"  # type: ignore[union-attr]


@needs_redis
async def test_each_key_carries_its_own_expiry(make: Make, raw: aioredis.Redis,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = make()
    await store.aput("http://h/ttl", [], entry(lifetime=100.0, stale_while_revalidate=20.0))
    ttl = await raw.pttl(b"proxyd:cache:http://h/ttl")
    expected = (100 + 20 + redis_store.MARGIN) * 1000
    assert expected - 2000 < ttl <= expected
    await store.aput("http://h/vttl", GZ, entry(lifetime=10.0, vary=(AE,)))
    for key in await raw.keys(b"proxyd:cache:http://h/vttl*"):
        assert 0 < await raw.pttl(key) <= (10 + redis_store.MARGIN) * 1000
    # And Redis drops them on time.
    monkeypatch.setattr(redis_store, "MARGIN", 0.0)
    await store.aput("http://h/short", [], entry(lifetime=0.0))
    assert await raw.exists(b"proxyd:cache:http://h/short") == 1
    await asyncio.sleep(1.1)
    assert await raw.exists(b"proxyd:cache:http://h/short") == 0
    assert await make().aget("http://h/short", []) is None


@needs_redis
async def test_delete_works_across_instances_and_variants(make: Make) -> None:
    a, b, c = make(), make(), make()
    await a.aput("http://h/d", GZ, entry(b"gz", vary=(AE,)))
    await a.aput("http://h/d", BR, entry(b"br", vary=(AE,)))
    assert await b.adelete("http://h/d") == 1
    assert await c.aget("http://h/d", GZ) is None
    assert await c.aget("http://h/d", BR) is None
    # A new variant after the delete does not resurrect the old ones.
    await a.aput("http://h/d", GZ, entry(b"gz2", vary=(AE,)))
    assert (await make().aget("http://h/d", GZ)).body == b"gz2"  # type: ignore[union-attr]
    assert await make().aget("http://h/d", BR) is None
    # The synchronous delete (the middleware's) clears L1 now and Redis in the background.
    a.put("http://h/d", GZ, entry(b"gz3", vary=(AE,)))
    await a.spawn.settle()  # type: ignore[attr-defined]
    assert a.get("http://h/d", GZ) is not None
    assert a.delete("http://h/d") == 1
    assert a.get("http://h/d", GZ) is None
    await a.spawn.settle()  # type: ignore[attr-defined]
    assert await make().aget("http://h/d", GZ) is None


@needs_redis
async def test_delete_prefix_across_instances_escapes_glob(make: Make,
                                                           raw: aioredis.Redis) -> None:
    a, b = make(), make()
    for key in ("http://h/a/1", "http://h/a/2", "http://h/ab", "http://h/b/1",
                "http://h/x*y", "http://h/xzy", "http://h/[q]", "http://h/q"):
        await a.aput(key, [], entry())
    await a.aput("http://h/a/3", GZ, entry(vary=(AE,)))
    assert await raw.set(b"other:app:http://h/a/1", b"not ours")
    assert await b.adelete_prefix("http://h/a/") == 4  # 2 entries + a marker and its variant
    assert await b.adelete_prefix("http://h/x*") == 1
    assert await b.adelete_prefix("http://h/[") == 1
    left = sorted(k.decode() for k in await raw.keys(b"*"))
    assert left == ["other:app:http://h/a/1", "proxyd:cache:http://h/ab",
                    "proxyd:cache:http://h/b/1", "proxyd:cache:http://h/q",
                    "proxyd:cache:http://h/xzy"]
    assert a.get("http://h/a/1", []) is None or await b.aget("http://h/a/1", []) is None


@needs_redis
async def test_an_admin_purge_counts_entries_not_keys(make: Make, raw: aioredis.Redis) -> None:
    a, b = make(), make()
    await a.aput("http://h/p", GZ, entry(b"gz", vary=(AE,)))
    await a.aput("http://h/p", BR, entry(b"br", vary=(AE,)))
    await a.aput("http://h/p/plain", [], entry())
    await a.aput("http://h/p*", [], entry())
    assert await a.aget("http://h/p", GZ) is not None  # now in a's L1 too
    # A varying response: its two variants, not its marker; and they are gone from Redis.
    assert await b.apurge("http://h/p", None) == (2, False)
    assert a.get("http://h/p", GZ) is not None  # another worker's L1: its own purge message
    assert await a.apurge("http://h/p", None) == (0, False)
    assert a.get("http://h/p", GZ) is None
    assert sorted(await raw.keys(b"proxyd:cache:http://h/p\0*")) == []
    await a.aput("http://h/p", GZ, entry(b"gz", vary=(AE,)))
    assert await b.apurge(None, "http://h/p*") == (1, False)  # a glob character, literally
    assert await b.apurge(None, "http://h/p") == (2, False)  # a variant and a plain entry
    assert await raw.keys(b"proxyd:cache:*") == []


@needs_redis
async def test_an_admin_purge_while_redis_is_down_is_deferred(
        make: Make, redis_server: RedisServer) -> None:  # noqa: F811
    store = make()
    await store.aput("http://h/gone", [], entry())
    redis_server.stop()
    assert await store.apurge("http://h/gone", None) == (0, True)
    redis_server.start()
    assert await store.aget("http://h/other", []) is None  # Redis answers: the replay starts
    await store.spawn.settle()  # type: ignore[attr-defined]
    assert await make().aget("http://h/gone", []) is None


@needs_redis
async def test_corrupt_records_are_misses(make: Make, raw: aioredis.Redis) -> None:
    await raw.set(b"proxyd:cache:http://h/bad", b"garbage")
    await raw.set(b"proxyd:cache:http://h/bad2", b'{"s":200}\nbody')
    store = make()
    assert await store.aget("http://h/bad", []) is None
    assert await store.aget("http://h/bad2", []) is None
    assert not store.open and store.errors == 0


@needs_redis
async def test_stopped_server_means_misses_and_the_breaker_trips_then_recovers(
    make: Make, redis_server: RedisServer, caplog: pytest.LogCaptureFixture,  # noqa: F811
) -> None:
    caplog.set_level(logging.WARNING, logger="proxyd.cache")
    store = make()
    await store.aput("http://h/s", [], entry())
    redis_server.stop()
    store.l1.clear()
    for _ in range(redis_store.BREAKER_THRESHOLD):
        assert await store.aget("http://h/s", []) is None  # refused: a miss, no exception
    assert store.open and store.trips == 1
    # Open: no command is sent, so nothing waits on a timeout.
    errors = store.errors
    started = time.monotonic()
    for _ in range(200):
        assert await store.aget("http://h/s", []) is None
        assert not await store.aput("http://h/s", [], entry())
        assert store.put("http://h/s2", [], entry())  # L1 still works
    assert time.monotonic() - started < 0.5
    assert store.errors == errors
    assert store.delete("http://h/s") == 0  # remembered for when Redis returns
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()

    redis_server.start()
    deadline = time.monotonic() + 10
    while store.open:  # probes run in the background, driven by traffic
        assert time.monotonic() < deadline, "breaker did not close after Redis came back"
        await store.aget("http://h/s", [])
        await asyncio.sleep(0.05)
    assert await store.aput("http://h/s", [], entry(b"again"))
    store.l1.clear()
    assert (await store.aget("http://h/s", [])).body == b"again"  # type: ignore[union-attr]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "available again" in warnings[1].getMessage()


@needs_redis
async def test_a_hung_server_costs_one_timeout_not_one_per_request(
    make: Make, raw: aioredis.Redis,
) -> None:
    store = make()
    await store.aput("http://h/p", [], entry())
    await store.aput("http://h/gone", [], entry())
    store.l1.clear()
    await raw.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # commands hang, data stays
    started = time.monotonic()
    results = await asyncio.gather(*(store.aget("http://h/p", []) for _ in range(50)))
    assert results == [None] * 50
    assert time.monotonic() - started < 1.0  # one timeout (~0.1 s) for the lot
    assert store.open
    started = time.monotonic()
    for _ in range(100):
        assert await store.aget("http://h/p", []) is None
    assert time.monotonic() - started < 0.1
    # An invalidation while Redis is away is applied when it answers again.
    store.delete("http://h/gone")
    deadline = time.monotonic() + 10
    while store.open:
        assert time.monotonic() < deadline, "breaker did not close after the pause"
        await store.aget("http://h/p", [])
        await asyncio.sleep(0.05)
    await store.spawn.settle()  # type: ignore[attr-defined]
    assert await raw.exists(b"proxyd:cache:http://h/gone") == 0
    assert await make().aget("http://h/p", []) is not None
