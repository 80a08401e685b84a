"""compression: Accept-Encoding negotiation, what is skipped, buffered and streaming bodies."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import brotli
import pytest
from pydantic import ValidationError

from proxyd.middleware.base import Context, Response
from proxyd.middleware.compression import (
    TYPE_MEMO,
    Compression,
    CompressionOptions,
    parse_accept_encoding,
)

from .helpers import make_ctx, response, values

TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i
                for i in range(400))


def comp(**options: Any) -> Compression:
    return Compression(CompressionOptions.model_validate({"type": "compression", **options}))


def ctx_ae(accept: bytes | None, method: bytes = b"GET") -> Context:
    return make_ctx(method, headers=[(b"Accept-Encoding", accept)] if accept is not None else [])


def buffered(body: bytes = TEXT, ctype: bytes = b"text/plain; charset=utf-8",
             extra: list[tuple[bytes, bytes]] | None = None, status: int = 200) -> Response:
    return response(status, [(b"Content-Type", ctype), (b"Content-Length", str(len(body)).encode()),
                             *(extra or [])], body)


def decode(coding: bytes | None, data: bytes) -> bytes:
    if coding == b"gzip":
        return gzip.decompress(data)
    if coding == b"br":
        return brotli.decompress(data)  # type: ignore[no-any-return]
    raise AssertionError(f"unexpected coding {coding!r}")


# --- negotiation ----------------------------------------------------------------------------------

def test_parse_accept_encoding() -> None:
    assert parse_accept_encoding(b"gzip, BR;q=0.5 , deflate; q=0, *;q=0.1") == {
        b"gzip": 1.0, b"br": 0.5, b"deflate": 0.0, b"*": 0.1}
    assert parse_accept_encoding(b"gzip;q=bogus") == {b"gzip": 0.0}
    assert parse_accept_encoding(b"") == {}


@pytest.mark.parametrize(("accept", "chosen"), [
    (b"gzip", b"gzip"),
    (b"br", b"br"),
    (b"gzip, br", b"br"),  # tie: the server's order (br first) wins
    (b"br, gzip", b"br"),
    (b"gzip;q=1.0, br;q=0.9", b"gzip"),
    (b"br;q=0.2, gzip;q=0.8", b"gzip"),
    (b"br;q=0, gzip", b"gzip"),
    (b"br;q=0, gzip;q=0", None),
    (b"*", b"br"),
    (b"*;q=0.5, gzip", b"gzip"),
    (b"br;q=0, *", b"gzip"),
    (b"*;q=0", None),
    (b"identity", None),
    (b"deflate, compress", None),
    (b"GZIP", b"gzip"),
    (b"gzip ; q=0.5", b"gzip"),
])
def test_choose(accept: bytes, chosen: bytes | None) -> None:
    assert comp().choose(accept) == chosen


def test_server_preference_follows_configured_order() -> None:
    assert comp(algorithms=["gzip", "br"]).choose(b"br, gzip") == b"gzip"
    assert comp(algorithms=["gzip"]).choose(b"br") is None
    assert comp(algorithms=["gzip"]).choose(b"*") == b"gzip"


def test_algorithm_options_are_validated() -> None:
    with pytest.raises(ValidationError):
        comp(algorithms=[])
    with pytest.raises(ValidationError):
        comp(algorithms=["deflate"])
    with pytest.raises(ValidationError):
        comp(gzip_level=0)


# --- buffered bodies ------------------------------------------------------------------------------

@pytest.mark.parametrize(("accept", "coding"), [(b"gzip", b"gzip"), (b"br, gzip", b"br")])
def test_buffered_body_is_compressed(accept: bytes, coding: bytes) -> None:
    resp = buffered()
    comp().on_response(ctx_ae(accept), resp)
    assert resp.get(b"content-encoding") == coding
    assert resp.body is not None
    assert len(resp.body) < len(TEXT)
    assert decode(coding, resp.body) == TEXT
    assert values(resp, b"content-length") == [str(len(resp.body)).encode()]
    assert resp.get(b"vary") == b"Accept-Encoding"
    assert resp.filters == []


def test_vary_is_added_to_an_existing_vary() -> None:
    resp = buffered(extra=[(b"Vary", b"Origin")])
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert values(resp, b"vary") == [b"Origin, Accept-Encoding"]


def test_strong_etag_is_weakened_and_weak_kept() -> None:
    resp = buffered(extra=[(b"ETag", b'"abc"')])
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert values(resp, b"etag") == [b'W/"abc"']
    resp = buffered(extra=[(b"ETag", b'W/"abc"')])
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert values(resp, b"etag") == [b'W/"abc"']


def test_etag_untouched_when_not_compressed() -> None:
    resp = buffered(extra=[(b"ETag", b'"abc"')])
    comp().on_response(ctx_ae(None), resp)
    assert resp.get(b"etag") == b'"abc"'


# --- what is skipped ------------------------------------------------------------------------------

def assert_untouched(resp: Response, body: bytes | None = TEXT) -> None:
    assert not resp.has(b"content-encoding")
    assert resp.body == body
    assert resp.filters == []


def test_small_bodies_are_skipped() -> None:
    small = TEXT[:1023]
    resp = buffered(small)
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert_untouched(resp, small)
    assert resp.get(b"vary") == b"Accept-Encoding"  # the answer still depends on the header
    resp = buffered(TEXT[:1024])
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert resp.get(b"content-encoding") == b"gzip"


def test_small_streaming_body_is_skipped_by_content_length() -> None:
    resp = response(200, [(b"Content-Type", b"text/html"), (b"Content-Length", b"100")])
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert_untouched(resp, None)
    assert resp.get(b"content-length") == b"100"


@pytest.mark.parametrize("ctype", [b"image/png", b"application/octet-stream", b"video/mp4",
                                   b"application/zip"])
def test_non_compressible_types_are_skipped(ctype: bytes) -> None:
    resp = buffered(ctype=ctype)
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert_untouched(resp)
    assert not resp.has(b"vary")


def test_missing_content_type_is_skipped() -> None:
    resp = response(200, [(b"Content-Length", str(len(TEXT)).encode())], TEXT)
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert_untouched(resp)


@pytest.mark.parametrize("ctype", [b"application/json", b"TEXT/HTML", b"image/svg+xml",
                                   b"application/problem+json"])
def test_compressible_types(ctype: bytes) -> None:
    resp = buffered(ctype=ctype)
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert resp.get(b"content-encoding") == b"gzip"


def test_one_instance_answers_many_types_alike_whatever_it_remembers() -> None:
    """The Content-Type memo: repeated and varied values (more than it keeps) decide as a
    fresh instance would."""
    shared = comp()
    for i in range(3 * TYPE_MEMO):
        for ctype, compressed in ((b"text/html", True), (b"image/png", False),
                                  (b"multipart/mixed; boundary=%d" % i, False),
                                  (b"text/plain; charset=x-%d" % i, True)):
            resp = buffered(ctype=ctype)
            shared.on_response(ctx_ae(b"gzip"), resp)
            assert resp.has(b"content-encoding") is compressed, ctype


def test_configured_types_replace_the_defaults() -> None:
    resp = buffered(ctype=b"application/x-custom")
    comp(types=["application/x-custom"]).on_response(ctx_ae(b"gzip"), resp)
    assert resp.get(b"content-encoding") == b"gzip"
    resp = buffered(ctype=b"text/plain")
    comp(types=["application/x-custom"]).on_response(ctx_ae(b"gzip"), resp)
    assert_untouched(resp)


def test_already_encoded_is_skipped() -> None:
    resp = buffered(extra=[(b"Content-Encoding", b"gzip")])
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert values(resp, b"content-encoding") == [b"gzip"]
    assert resp.body == TEXT


def test_no_transform_is_respected() -> None:
    resp = buffered(extra=[(b"Cache-Control", b"public, No-Transform")])
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert_untouched(resp)


@pytest.mark.parametrize("status", [101, 204, 206, 304])
def test_bodiless_and_partial_statuses_are_skipped(status: int) -> None:
    resp = buffered(status=status)
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert_untouched(resp)
    assert not resp.has(b"vary")


def test_dropped_body_is_skipped() -> None:
    resp = buffered()
    resp.drop_body = True
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert_untouched(resp)


def test_no_accept_encoding_is_skipped() -> None:
    for ctx in (ctx_ae(None), ctx_ae(b"identity"), ctx_ae(b"gzip;q=0, br;q=0")):
        resp = buffered()
        comp().on_response(ctx, resp)
        assert_untouched(resp)
        assert resp.get(b"content-length") == str(len(TEXT)).encode()


@pytest.mark.parametrize(("accept", "coding"), [(b"gzip", b"gzip"), (b"br", b"br")])
def test_each_streamed_chunk_is_decodable_at_once(accept: bytes, coding: bytes) -> None:
    # Server-sent events and NDJSON must reach the client as written, not when the compressor's
    # buffer happens to fill: every chunk fed comes out whole.
    resp = response(200, [(b"Content-Type", b"text/event-stream")])
    comp().on_response(ctx_ae(accept), resp)
    [f] = resp.filters
    d: Any = zlib.decompressobj(31) if coding == b"gzip" else brotli.Decompressor()
    step = d.decompress if coding == b"gzip" else d.process
    for event in (b"data: one\n\n", b"data: two\n\n", b"event: x\ndata: 3\n\n"):
        assert step(f.feed(event)) == event
    assert f.feed(b"") == b""
    step(f.finish())
    assert d.eof if coding == b"gzip" else d.is_finished()


# --- streaming ------------------------------------------------------------------------------------

def stream(resp: Response, chunks: list[bytes]) -> bytes:
    [f] = resp.filters
    out = b"".join(f.feed(c) for c in chunks)
    return out + f.finish()


@pytest.mark.parametrize(("accept", "coding"), [(b"gzip", b"gzip"), (b"br", b"br")])
def test_streaming_filter_round_trips(accept: bytes, coding: bytes) -> None:
    resp = response(200, [(b"Content-Type", b"application/json"),
                          (b"Content-Length", str(len(TEXT)).encode()), (b"ETag", b'"s"')])
    comp().on_response(ctx_ae(accept), resp)
    assert resp.body is None
    assert resp.get(b"content-encoding") == coding
    assert not resp.has(b"content-length")  # the compressed size is not known in advance
    assert resp.get(b"etag") == b'W/"s"'
    assert resp.get(b"vary") == b"Accept-Encoding"
    chunks = [TEXT[i:i + 700] for i in range(0, len(TEXT), 700)]
    assert decode(coding, stream(resp, chunks)) == TEXT


def test_streaming_without_content_length_is_compressed() -> None:
    resp = response(200, [(b"Content-Type", b"text/html")])
    comp().on_response(ctx_ae(b"gzip"), resp)
    assert decode(b"gzip", stream(resp, [b"<p>", b"", b"hello", b"</p>"])) == b"<p>hello</p>"


def test_gzip_stream_is_a_single_member() -> None:
    resp = response(200, [(b"Content-Type", b"text/html")])
    comp().on_response(ctx_ae(b"gzip"), resp)
    data = stream(resp, [TEXT[:10], TEXT[10:]])
    d = zlib.decompressobj(31)
    assert d.decompress(data) == TEXT
    assert d.eof
    assert d.unused_data == b""


def test_head_gets_headers_but_no_filter() -> None:
    resp = response(200, [(b"Content-Type", b"text/html"),
                          (b"Content-Length", str(len(TEXT)).encode())])
    comp().on_response(ctx_ae(b"gzip", method=b"HEAD"), resp)
    assert resp.get(b"content-encoding") == b"gzip"
    assert not resp.has(b"content-length")
    assert resp.filters == []
