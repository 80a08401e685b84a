"""CORS: origin matching, preflights, simple-response headers, credentials."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from proxyd.middleware.cors import Cors, CorsOptions

from .helpers import make_ctx, response, values


def cors(**options: Any) -> Cors:
    return Cors(CorsOptions.model_validate({"type": "cors", **options}))


def preflight(origin: bytes, method: bytes = b"PUT", headers: bytes | None = None) -> Any:
    hdrs = [(b"Origin", origin), (b"Access-Control-Request-Method", method)]
    if headers is not None:
        hdrs.append((b"Access-Control-Request-Headers", headers))
    return make_ctx(b"OPTIONS", b"/items", headers=hdrs, request_id="rid-pf")


# --- origin matching ------------------------------------------------------------------------------

def test_exact_origins_match_case_insensitively_and_nothing_else() -> None:
    mw = cors(allow_origins=["https://a.test", "http://localhost:3000"])
    assert mw.allowed(b"https://a.test")
    assert mw.allowed(b"HTTPS://A.TEST")
    assert mw.allowed(b"http://localhost:3000")
    assert not mw.allowed(b"http://a.test")
    assert not mw.allowed(b"https://a.test:8443")
    assert not mw.allowed(b"https://b.test")
    assert not mw.allowed(b"http://localhost:3001")
    assert not mw.allowed(b"null")


def test_wildcard_subdomain_pattern() -> None:
    mw = cors(allow_origins=["https://*.example.com"])
    assert mw.allowed(b"https://a.example.com")
    assert mw.allowed(b"https://deep.sub.example.com")
    assert not mw.allowed(b"https://example.com")  # the apex is not a subdomain
    assert not mw.allowed(b"http://a.example.com")  # scheme must match
    assert not mw.allowed(b"https://.example.com")  # empty label
    assert not mw.allowed(b"https://a.example.com.evil.test")
    assert not mw.allowed(b"https://evilexample.com")


def test_star_allows_any_origin() -> None:
    mw = cors(allow_origins=["*"])
    assert mw.allowed(b"https://whatever.test")


def test_no_origins_configured_allows_none() -> None:
    assert not cors().allowed(b"https://a.test")


@pytest.mark.parametrize("origin", ["a.test", "https://a.test/", "https://a.test/path",
                                    "ftp://a.test", "https://a.*.test"])
def test_invalid_origin_is_a_config_error(origin: str) -> None:
    with pytest.raises(ValidationError, match="invalid origin"):
        cors(allow_origins=[origin])


@pytest.mark.parametrize("field", ["allow_origins", "allow_headers"])
def test_credentials_with_star_is_a_config_error(field: str) -> None:
    opts: dict[str, Any] = {"allow_origins": ["https://a.test"], "allow_credentials": True}
    opts[field] = ["*"]
    with pytest.raises(ValidationError, match="allow_credentials"):
        cors(**opts)


# --- preflight ------------------------------------------------------------------------------------

def test_preflight_is_answered_with_204() -> None:
    mw = cors(allow_origins=["https://a.test"], allow_methods=["GET", "put"],
              allow_headers=["Content-Type", "X-Token"], max_age="10m")
    answer = mw.on_request(preflight(b"https://a.test", b"PUT", b"content-type, X-Token"))
    assert answer is not None
    assert answer.status == 204
    assert answer.body == b""
    assert answer.get(b"access-control-allow-origin") == b"https://a.test"
    assert answer.get(b"access-control-allow-methods") == b"GET, PUT"
    assert answer.get(b"access-control-allow-headers") == b"content-type, X-Token"
    assert answer.get(b"access-control-max-age") == b"600"
    vary = answer.get(b"vary")
    assert vary is not None
    assert b"Origin" in vary
    assert b"Access-Control-Request-Method" in vary
    assert b"Access-Control-Request-Headers" in vary
    assert not answer.has(b"access-control-allow-credentials")


def test_preflight_without_requested_headers_has_no_allow_headers() -> None:
    answer = cors(allow_origins=["https://a.test"]).on_request(preflight(b"https://a.test"))
    assert answer is not None
    assert answer.status == 204
    assert not answer.has(b"access-control-allow-headers")


def test_preflight_with_star_headers_allows_any_requested_header() -> None:
    mw = cors(allow_origins=["https://a.test"], allow_headers=["*"])
    answer = mw.on_request(preflight(b"https://a.test", b"GET", b"X-Anything"))
    assert answer is not None
    assert answer.status == 204
    assert answer.get(b"access-control-allow-headers") == b"X-Anything"


def test_preflight_with_credentials_echoes_origin() -> None:
    mw = cors(allow_origins=["https://*.a.test"], allow_credentials=True)
    answer = mw.on_request(preflight(b"https://x.a.test"))
    assert answer is not None
    assert answer.get(b"access-control-allow-origin") == b"https://x.a.test"
    assert answer.get(b"access-control-allow-credentials") == b"true"


def test_preflight_star_origin_without_credentials_answers_star() -> None:
    answer = cors(allow_origins=["*"]).on_request(preflight(b"https://x.test"))
    assert answer is not None
    assert answer.get(b"access-control-allow-origin") == b"*"


@pytest.mark.parametrize(("origin", "method", "headers", "reason"), [
    (b"https://evil.test", b"PUT", None, "CORS origin not allowed"),
    (b"https://a.test", b"DELETE", None, "CORS method not allowed"),
    (b"https://a.test", b"PUT", b"X-Token, X-Other", "CORS header not allowed"),
])
def test_preflight_refusals_are_403(origin: bytes, method: bytes, headers: bytes | None,
                                    reason: str) -> None:
    mw = cors(allow_origins=["https://a.test"], allow_methods=["GET", "PUT"],
              allow_headers=["X-Token"])
    answer = mw.on_request(preflight(origin, method, headers))
    assert answer is not None
    assert answer.status == 403
    assert answer.body is not None
    assert json.loads(answer.body) == {"error": reason, "request_id": "rid-pf"}
    assert not answer.has(b"access-control-allow-origin")


def test_plain_options_and_other_methods_pass_through() -> None:
    mw = cors(allow_origins=["https://a.test"])
    # OPTIONS without Access-Control-Request-Method is not a preflight.
    assert mw.on_request(make_ctx(b"OPTIONS", headers=[(b"Origin", b"https://a.test")])) is None
    # OPTIONS without Origin neither.
    assert mw.on_request(make_ctx(b"OPTIONS", headers=[
        (b"Access-Control-Request-Method", b"GET")])) is None
    assert mw.on_request(make_ctx(b"GET", headers=[
        (b"Origin", b"https://a.test"), (b"Access-Control-Request-Method", b"GET")])) is None


# --- simple responses -----------------------------------------------------------------------------

def test_simple_response_headers_for_allowed_origin() -> None:
    mw = cors(allow_origins=["https://a.test"], expose_headers=["X-Total", "X-Page"],
              allow_credentials=True)
    resp = response(200, [(b"Content-Type", b"text/plain")])
    mw.on_response(make_ctx(headers=[(b"Origin", b"https://a.test")]), resp)
    assert resp.get(b"access-control-allow-origin") == b"https://a.test"
    assert resp.get(b"access-control-allow-credentials") == b"true"
    assert resp.get(b"access-control-expose-headers") == b"X-Total, X-Page"
    assert values(resp, b"vary") == [b"Origin"]


def test_simple_response_for_disallowed_origin_gets_only_vary() -> None:
    mw = cors(allow_origins=["https://a.test"], expose_headers=["X-Total"])
    resp = response(200, [])
    mw.on_response(make_ctx(headers=[(b"Origin", b"https://evil.test")]), resp)
    assert resp.headers == [(b"Vary", b"Origin")]


def test_response_without_origin_still_varies_on_origin() -> None:
    resp = response(200, [(b"Vary", b"Accept-Encoding")])
    cors(allow_origins=["https://a.test"]).on_response(make_ctx(), resp)
    assert resp.headers == [(b"Vary", b"Accept-Encoding, Origin")]


def test_vary_origin_is_not_repeated() -> None:
    resp = response(200, [(b"Vary", b"origin")])
    cors(allow_origins=["https://a.test"]).on_response(
        make_ctx(headers=[(b"Origin", b"https://a.test")]), resp)
    assert values(resp, b"vary") == [b"origin"]


def test_star_origin_answers_star_without_vary() -> None:
    resp = response(200, [])
    cors(allow_origins=["*"]).on_response(make_ctx(headers=[(b"Origin", b"https://x.test")]), resp)
    assert resp.get(b"access-control-allow-origin") == b"*"
    assert not resp.has(b"vary")
    assert not resp.has(b"access-control-allow-credentials")
    assert not resp.has(b"access-control-expose-headers")


def test_upstream_cors_headers_are_left_alone() -> None:
    resp = response(200, [(b"Access-Control-Allow-Origin", b"https://up.test")])
    cors(allow_origins=["https://a.test"]).on_response(
        make_ctx(headers=[(b"Origin", b"https://a.test")]), resp)
    assert values(resp, b"access-control-allow-origin") == [b"https://up.test"]
