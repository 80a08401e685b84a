"""validation: methods, URI length, header limits, encoded traversal/NUL/slash, body size."""

from __future__ import annotations

import json

import pytest

from proxyd.middleware.base import Context, Response

from .helpers import make, make_ctx


def answer(ctx: Context, **options: object) -> Response | None:
    return make("validation", **options).on_request(ctx)


def error_of(resp: Response | None) -> tuple[int, str]:
    assert resp is not None
    assert resp.body is not None
    return resp.status, json.loads(resp.body)["error"]


def test_defaults_pass_an_ordinary_request() -> None:
    ctx = make_ctx(b"POST", b"/api/items/42", b"a=1", [(b"Content-Type", b"application/json")])
    assert answer(ctx) is None
    assert ctx.max_body_size is None


def test_method_not_allowed_is_405_with_allow() -> None:
    resp = answer(make_ctx(b"DELETE", request_id="rid-9"), methods=["get", "POST"])
    assert error_of(resp) == (405, "method not allowed")
    assert resp is not None
    assert resp.get(b"allow") == b"GET, HEAD, POST"
    assert resp.body is not None
    assert json.loads(resp.body)["request_id"] == "rid-9"
    assert resp.get(b"content-type") == b"application/json"


def test_allowed_methods_pass_and_get_implies_head() -> None:
    assert answer(make_ctx(b"POST"), methods=["GET", "POST"]) is None
    assert answer(make_ctx(b"HEAD"), methods=["GET"]) is None
    assert error_of(answer(make_ctx(b"HEAD"), methods=["POST"]))[0] == 405


def test_uri_too_long_is_414() -> None:
    # "/abcdefgh?x=1" is 13 bytes.
    assert answer(make_ctx(path=b"/abcdefgh", query=b"x=1"), max_uri_length=13) is None
    assert error_of(answer(make_ctx(path=b"/abcdefgh", query=b"x=12"), max_uri_length=13)) == (
        414, "request URI too long")


def test_uri_length_without_query_counts_only_the_path() -> None:
    assert answer(make_ctx(path=b"/abcdefgh"), max_uri_length=9) is None
    assert error_of(answer(make_ctx(path=b"/abcdefghi"), max_uri_length=9))[0] == 414


def test_too_many_headers_is_431() -> None:
    headers = [(f"X-H{i}".encode(), b"v") for i in range(5)]
    assert answer(make_ctx(headers=headers), max_headers=5) is None
    assert error_of(answer(make_ctx(headers=headers), max_headers=4)) == (
        431, "too many request header fields")


def test_header_section_too_large_is_431() -> None:
    headers = [(b"X-Big", b"x" * 100)]  # "X-Big: xxx...\r\n" = 5 + 100 + 4 = 109 bytes
    assert answer(make_ctx(headers=headers), max_header_size=109) is None
    assert error_of(answer(make_ctx(headers=headers), max_header_size=108)) == (
        431, "request header section too large")


@pytest.mark.parametrize("path", [
    b"/static/%2e%2e/etc/passwd", b"/static/.%2e/etc", b"/static/%2e./etc", b"/static/%2E%2E/x",
    b"/static/%2e%2E", b"/static/%2e/x", b"%2e%2e/x",
    # Encoded separators next to the dots: an upstream that decodes sees "/../".
    b"/static/%2e%2e%2fetc", b"/static/..%2fetc", b"/static/..%2Fetc", b"/static%2f..%2fetc",
    b"/static/..%5cwin", b"/static/%2e%2e%5c",
])
def test_encoded_traversal_is_400(path: bytes) -> None:
    assert error_of(answer(make_ctx(path=path))) == (400, "encoded path traversal")


@pytest.mark.parametrize("path", [
    b"/static/%2e%2evil", b"/static/a%2e%2e/x", b"/files/report.%2epdf", b"/a/b%2ec/d",
    b"/static/%2e%2e%2e/x",
])
def test_dots_inside_a_segment_are_not_traversal(path: bytes) -> None:
    assert answer(make_ctx(path=path)) is None


def test_encoded_traversal_allowed_when_disabled() -> None:
    assert answer(make_ctx(path=b"/static/%2e%2e/x"), reject_encoded_traversal=False) is None


@pytest.mark.parametrize("path", [b"/a%00b", b"/a/%00", b"/file.txt%00.jpg"])
def test_encoded_nul_is_400_even_when_traversal_checks_are_off(path: bytes) -> None:
    assert error_of(answer(make_ctx(path=path), reject_encoded_traversal=False)) == (
        400, "encoded NUL in path")


def test_encoded_slash_only_when_configured() -> None:
    for path in (b"/a%2fb", b"/a%2Fb", b"/a%5cb"):
        assert answer(make_ctx(path=path)) is None
        assert error_of(answer(make_ctx(path=path), reject_encoded_slash=True)) == (
            400, "encoded slash in path")


def test_percent_in_query_is_not_checked_as_a_path() -> None:
    assert answer(make_ctx(path=b"/search", query=b"q=%2e%2e%2f%00"),
                  reject_encoded_slash=True) is None


def test_max_body_size_sets_the_context_limit() -> None:
    ctx = make_ctx(b"POST")
    assert answer(ctx, max_body_size="1KiB") is None
    assert ctx.max_body_size == 1024


def test_max_body_size_keeps_the_smaller_existing_limit() -> None:
    ctx = make_ctx(b"POST")
    ctx.max_body_size = 100
    answer(ctx, max_body_size="1KiB")
    assert ctx.max_body_size == 100
    ctx.max_body_size = 5000
    answer(ctx, max_body_size="1KiB")
    assert ctx.max_body_size == 1024


def test_refused_request_does_not_set_body_limit() -> None:
    ctx = make_ctx(b"PUT")
    assert answer(ctx, methods=["GET"], max_body_size=10) is not None
    assert ctx.max_body_size is None
