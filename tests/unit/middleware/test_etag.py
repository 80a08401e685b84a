"""etag: strong ETags from body hashes, If-None-Match → 304, when to buffer."""

from __future__ import annotations

import pytest
import xxhash

from proxyd.cache.fields import weak_match
from proxyd.middleware.base import Context, Response

from .helpers import make, make_ctx, response

BODY = b'{"items": [1, 2, 3]}'
TAG = b'"' + xxhash.xxh3_128_hexdigest(BODY).encode() + b'"'  # the XXH3-128 of the body


def run(ctx: Context, resp: Response, **options: object) -> Response:
    make("etag", **options).on_response(ctx, resp)
    return resp


def full(body: bytes = BODY, extra: list[tuple[bytes, bytes]] | None = None) -> Response:
    return response(200, [(b"Content-Type", b"application/json"),
                          (b"Content-Length", str(len(body)).encode()), *(extra or [])], body)


def test_strong_etag_from_body_hash() -> None:
    resp = run(make_ctx(), full())
    assert resp.get(b"etag") == TAG
    assert resp.status == 200
    assert resp.body == BODY
    other = run(make_ctx(), full(BODY + b" "))
    assert other.get(b"etag") not in (None, TAG)
    assert run(make_ctx(), full()).get(b"etag") == TAG  # stable
    # Same length, one byte apart, and a swap of two bytes: the hash tells them apart.
    tags = {run(make_ctx(), full(body)).get(b"etag")
            for body in (BODY, BODY.replace(b"1", b"4"), BODY.replace(b"1, 2", b"2, 1"))}
    assert len(tags) == 3


def test_upstream_etag_is_kept() -> None:
    resp = run(make_ctx(), full(extra=[(b"ETag", b'"v1"')]))
    assert [v for n, v in resp.headers if n.lower() == b"etag"] == [b'"v1"']


def test_no_etag_for_other_statuses_methods_or_large_bodies() -> None:
    assert not run(make_ctx(), response(404, [], b"nope")).has(b"etag")
    assert not run(make_ctx(b"POST"), full()).has(b"etag")
    assert not run(make_ctx(), full(), max_size=len(BODY) - 1).has(b"etag")
    assert run(make_ctx(), full(), max_size=len(BODY)).has(b"etag")
    assert not run(make_ctx(), response(200, [])).has(b"etag")  # streaming: no body to hash


@pytest.mark.parametrize("inm", [
    TAG, b"W/" + TAG, b'"other", ' + TAG, b'"a",W/' + TAG + b' , "b"', b"*", b"  *  ",
])
def test_if_none_match_answers_304(inm: bytes) -> None:
    resp = full(extra=[(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept"),
                       (b"Last-Modified", b"Tue, 01 Jan 2030 00:00:00 GMT"),
                       (b"X-Custom", b"1")])
    run(make_ctx(headers=[(b"If-None-Match", inm)]), resp)
    assert resp.status == 304
    assert resp.reason == b"Not Modified"
    assert resp.body == b""
    assert resp.drop_body
    assert {n.lower() for n, _ in resp.headers} == {b"etag", b"cache-control", b"vary",
                                                   b"last-modified"}
    assert resp.get(b"etag") == TAG


def test_weak_upstream_etag_matches_strong_if_none_match() -> None:
    resp = full(extra=[(b"ETag", b'W/"v1"')])
    run(make_ctx(headers=[(b"If-None-Match", b'"v1"')]), resp)
    assert resp.status == 304


def test_streaming_response_with_upstream_etag_is_turned_into_304() -> None:
    resp = response(200, [(b"ETag", b'"v2"'), (b"Content-Length", b"99999999"),
                          (b"Transfer-Encoding", b"chunked")])
    run(make_ctx(headers=[(b"If-None-Match", b'"v2"')]), resp)
    assert resp.status == 304
    assert resp.body is None
    assert resp.drop_body
    assert resp.headers == [(b"ETag", b'"v2"')]


@pytest.mark.parametrize("inm", [b'"nope"', b'W/"nope", "also-not"', b"", TAG[:-2] + b'"'])
def test_if_none_match_mismatch_keeps_200(inm: bytes) -> None:
    resp = run(make_ctx(headers=[(b"If-None-Match", inm)]), full())
    assert resp.status == 200
    assert resp.body == BODY
    assert not resp.drop_body
    assert resp.has(b"content-type")


def test_head_can_be_answered_304_from_an_upstream_etag() -> None:
    resp = response(200, [(b"ETag", b'"v3"'), (b"Content-Length", b"10")])
    run(make_ctx(b"HEAD", headers=[(b"If-None-Match", b'"v3"')]), resp)
    assert resp.status == 304


def test_post_is_never_304() -> None:
    resp = full(extra=[(b"ETag", b'"v4"')])
    run(make_ctx(b"POST", headers=[(b"If-None-Match", b'"v4"')]), resp)
    assert resp.status == 200


def test_weak_match_is_the_one_if_none_match_comparison() -> None:
    """RFC 9110 §13.1.2: the etag element and the cache share it."""
    assert weak_match(b'"a"', b'W/"a"')
    assert weak_match(b'W/"a"', b'"a"')
    assert weak_match(b"*", b'"anything"')
    assert not weak_match(b'"a"', b'"b"')
    assert not weak_match(b'"ab"', b'"a"')


def test_wants_body_only_for_small_get_200_without_etag() -> None:
    mw = make("etag", max_size=100)
    get = make_ctx(b"GET")

    def head(*extra: tuple[bytes, bytes], status: int = 200, length: bytes | None = b"100"
             ) -> Response:
        hdrs = [(b"Content-Length", length)] if length is not None else []
        return response(status, [*hdrs, *extra])

    assert mw.wants_body(get, head())
    assert mw.wants_body(get, head(length=b"0"))
    assert not mw.wants_body(get, head(length=b"101"))
    assert not mw.wants_body(get, head(length=None))  # chunked: size unknown
    assert not mw.wants_body(get, head((b"ETag", b'"x"')))
    assert not mw.wants_body(get, head(status=206))
    assert not mw.wants_body(get, head(status=404))
    assert not mw.wants_body(make_ctx(b"HEAD"), head())
    assert not mw.wants_body(make_ctx(b"POST"), head())
    # From the relay, the upstream's length comes parsed; the field is not read again.
    assert mw.wants_body(get, Response(200, [], upstream_length=100))
    assert not mw.wants_body(get, Response(200, [(b"Content-Length", b"5")], upstream_length=101))
