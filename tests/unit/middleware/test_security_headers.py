"""security_headers: defaults, disabling, custom values, upstream values kept unless overridden,
and Strict-Transport-Security only towards clients on https."""

from __future__ import annotations

import pytest

from proxyd.middleware.base import Context

from .helpers import make, make_ctx, response, values

DEFAULTS = {
    b"strict-transport-security": b"max-age=31536000; includeSubDomains",
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"strict-origin-when-cross-origin",
}


def tls_ctx() -> Context:
    """A request that came over TLS (the connection's, or a trusted proxy's, scheme)."""
    ctx = make_ctx()
    ctx.scheme = b"https"
    return ctx


def headers_of(ctx: Context | None = None, **options: object) -> dict[bytes, list[bytes]]:
    resp = response(200, [(b"Content-Type", b"text/html")])
    make("security_headers", **options).on_response(ctx or tls_ctx(), resp)
    out: dict[bytes, list[bytes]] = {}
    for name, value in resp.headers:
        out.setdefault(name.lower(), []).append(value)
    return out


def test_defaults() -> None:
    got = headers_of()
    assert got == {b"content-type": [b"text/html"], **{k: [v] for k, v in DEFAULTS.items()}}
    assert b"content-security-policy" not in got
    assert b"permissions-policy" not in got


def test_header_names_are_sent_in_canonical_case() -> None:
    resp = response(200, [])
    make("security_headers").on_response(tls_ctx(), resp)
    assert (b"X-Frame-Options", b"DENY") in resp.headers
    assert (b"Strict-Transport-Security", DEFAULTS[b"strict-transport-security"]) in resp.headers


def test_null_or_empty_disables_one_header() -> None:
    got = headers_of(strict_transport_security=None, x_frame_options="")
    assert b"strict-transport-security" not in got
    assert b"x-frame-options" not in got
    assert got[b"x-content-type-options"] == [b"nosniff"]
    assert got[b"referrer-policy"] == [DEFAULTS[b"referrer-policy"]]


def test_custom_values() -> None:
    got = headers_of(x_frame_options="SAMEORIGIN", content_security_policy="default-src 'self'",
                     permissions_policy="camera=()")
    assert got[b"x-frame-options"] == [b"SAMEORIGIN"]
    assert got[b"content-security-policy"] == [b"default-src 'self'"]
    assert got[b"permissions-policy"] == [b"camera=()"]


def test_upstream_value_is_kept() -> None:
    resp = response(200, [(b"x-frame-options", b"SAMEORIGIN")])
    make("security_headers").on_response(make_ctx(), resp)
    assert values(resp, b"x-frame-options") == [b"SAMEORIGIN"]
    assert values(resp, b"x-content-type-options") == [b"nosniff"]


def test_override_replaces_upstream_value_case_insensitively() -> None:
    resp = response(200, [(b"x-frame-options", b"ALLOWALL"), (b"Referrer-Policy", b"unsafe-url")])
    make("security_headers", override=["X-Frame-Options"]).on_response(make_ctx(), resp)
    assert values(resp, b"x-frame-options") == [b"DENY"]
    assert values(resp, b"referrer-policy") == [b"unsafe-url"]  # not listed: kept


def test_disabled_header_is_not_removed_from_upstream() -> None:
    resp = response(200, [(b"X-Frame-Options", b"SAMEORIGIN")])
    make("security_headers", x_frame_options=None, override=["x-frame-options"]).on_response(
        make_ctx(), resp)
    assert values(resp, b"x-frame-options") == [b"SAMEORIGIN"]


def test_applies_to_error_responses_too() -> None:
    resp = response(502, [])
    make("security_headers").on_response(make_ctx(), resp)
    assert values(resp, b"x-content-type-options") == [b"nosniff"]


def test_a_context_is_plain_http_unless_told_otherwise() -> None:
    assert make_ctx().scheme == b"http"


def test_plain_http_gets_every_header_but_strict_transport_security() -> None:
    got = headers_of(make_ctx())
    assert b"strict-transport-security" not in got
    assert got == {b"content-type": [b"text/html"],
                   **{k: [v] for k, v in DEFAULTS.items() if k != b"strict-transport-security"}}


@pytest.mark.parametrize("upstream", [[], [(b"X-Frame-Options", b"SAMEORIGIN")]],
                         ids=["as-block", "one-by-one"])
def test_strict_transport_security_only_over_https_whichever_way_fields_are_added(
    upstream: list[tuple[bytes, bytes]]
) -> None:
    """Added as one block (no field of ours from the upstream) or field by field."""
    hsts = make("security_headers", override=["Strict-Transport-Security"])
    for ctx, sent in ((make_ctx(), []), (tls_ctx(), [DEFAULTS[b"strict-transport-security"]])):
        resp = response(200, list(upstream))
        hsts.on_response(ctx, resp)
        assert values(resp, b"strict-transport-security") == sent, ctx.scheme
        assert values(resp, b"x-content-type-options") == [b"nosniff"]


def test_plain_http_leaves_an_upstream_strict_transport_security_alone() -> None:
    """Not added over http, so not overridden either: the upstream's own field is its own."""
    resp = response(200, [(b"Strict-Transport-Security", b"max-age=60")])
    make("security_headers", override=["strict-transport-security"]).on_response(
        make_ctx(), resp)
    assert values(resp, b"strict-transport-security") == [b"max-age=60"]
    resp = response(200, [(b"Strict-Transport-Security", b"max-age=60")])
    make("security_headers", override=["strict-transport-security"]).on_response(
        tls_ctx(), resp)
    assert values(resp, b"strict-transport-security") == [DEFAULTS[b"strict-transport-security"]]
