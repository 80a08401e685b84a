"""The cache element's decisions on a response head, without a server."""

from __future__ import annotations

from proxyd.cache.memory import MemoryStore
from proxyd.middleware.base import Context
from proxyd.middleware.cache import Cache
from proxyd.middleware.cache_request import CacheRequest

from .helpers import make, make_ctx, response

FRESH = [(b"Cache-Control", b"max-age=60")]


def cache_with_store(max_object_size: int = 100) -> Cache:
    mw = make("cache")
    assert isinstance(mw, Cache)
    mw.store = MemoryStore(10, 1 << 20, max_object_size)
    mw.max_object_size = max_object_size
    return mw


def miss(method: bytes = b"GET") -> tuple[Cache, Context]:
    ctx = make_ctx(method)
    ctx.cache = CacheRequest("http://app.test/", [], 0.0)
    return cache_with_store(), ctx


def test_rfc9110_8_6_a_storable_miss_with_a_content_length_is_read_whole() -> None:
    """Read whole, it is stored as it comes and relayed with the origin's Content-Length;
    copied while streaming it would go out chunked."""
    mw, ctx = miss()
    resp = response(200, [*FRESH, (b"Content-Length", b"100")])
    assert mw.wants_body(ctx, resp)
    assert ctx.cache is not None and ctx.cache.verdict is not None


def test_what_is_streamed_untouched() -> None:
    mw, ctx = miss()
    too_large = response(200, [*FRESH, (b"Content-Length", b"101")])
    not_storable = response(200, [(b"Cache-Control", b"no-store"), (b"Content-Length", b"5")])
    without_length = response(200, FRESH)  # chunked: copied by a Tee while it streams
    for resp in (too_large, not_storable, without_length):
        assert not mw.wants_body(ctx, resp)
    head_mw, head_ctx = miss(b"HEAD")
    assert not head_mw.wants_body(head_ctx,
                                  response(200, [*FRESH, (b"Content-Length", b"5")]))
    hit_ctx = make_ctx()  # no miss recorded: a hit, a bypass, another route's request
    assert not mw.wants_body(hit_ctx, response(200, [*FRESH, (b"Content-Length", b"5")]))
