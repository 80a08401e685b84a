"""headers: set/add/remove on requests and responses, with placeholders."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from proxyd.middleware.headers import Headers, HeadersOptions, compile_template, render

from .helpers import make, make_ctx, response, route, values, worker_services


def headers_mw(**options: object) -> Headers:
    return Headers(HeadersOptions.model_validate({"type": "headers", **options}))


def test_request_set_add_remove() -> None:
    mw = headers_mw(request={"set": {"X-Env": "prod"}, "add": {"X-Tag": "a"},
                             "remove": ["Cookie", "x-debug"]})
    ctx = make_ctx(headers=[(b"X-Env", b"client"), (b"Cookie", b"c=1")])
    assert mw.on_request(ctx) is None
    # set replaces the client's value: the name is removed, then the new value added.
    assert ctx.remove_request == {b"cookie", b"x-debug", b"x-env"}
    assert ctx.set_request == [(b"X-Env", b"prod"), (b"X-Tag", b"a")]


def test_request_add_keeps_the_client_value() -> None:
    ctx = make_ctx(headers=[(b"X-Tag", b"client")])
    headers_mw(request={"add": {"X-Tag": "proxy"}}).on_request(ctx)
    assert b"x-tag" not in ctx.remove_request
    assert ctx.set_request == [(b"X-Tag", b"proxy")]


def test_request_ops_accumulate_with_earlier_middleware() -> None:
    ctx = make_ctx()
    ctx.remove_request.add(b"x-request-id")
    ctx.set_request.append((b"X-Request-ID", b"r"))
    headers_mw(request={"remove": ["Authorization"]}).on_request(ctx)
    assert ctx.remove_request == {b"x-request-id", b"authorization"}
    assert ctx.set_request == [(b"X-Request-ID", b"r")]


def test_response_set_add_remove() -> None:
    mw = headers_mw(response={"set": {"Cache-Control": "no-store"}, "add": {"X-Served-By": "p1"},
                              "remove": ["Server", "X-Powered-By"]})
    resp = response(200, [(b"Server", b"nginx"), (b"cache-control", b"max-age=60"),
                          (b"x-powered-by", b"php"), (b"Content-Type", b"text/plain"),
                          (b"X-Served-By", b"up")])
    mw.on_response(make_ctx(), resp)
    assert resp.headers == [(b"Content-Type", b"text/plain"), (b"X-Served-By", b"up"),
                            (b"Cache-Control", b"no-store"), (b"X-Served-By", b"p1")]


def test_response_set_replaces_every_copy() -> None:
    resp = response(200, [(b"X-A", b"1"), (b"x-a", b"2")])
    headers_mw(response={"set": {"X-A": "3"}}).on_response(make_ctx(), resp)
    assert values(resp, b"x-a") == [b"3"]


def test_placeholders_are_rendered_per_request() -> None:
    template = "{client_ip}|{request_id}|{route}|{method}|{path}|{host}"
    mw = headers_mw(request={"set": {"X-Info": template}},
                    response={"add": {"X-Info": "id={request_id};r={route}"}})
    ctx = make_ctx(b"POST", b"/v1/x", b"q=1", host=b"api.test", client_ip=b"203.0.113.9",
                   route="orders", request_id="rid-77")
    mw.on_request(ctx)
    assert ctx.set_request == [(b"X-Info", b"203.0.113.9|rid-77|orders|POST|/v1/x|api.test")]
    resp = response(200, [])
    mw.on_response(ctx, resp)
    assert resp.headers == [(b"X-Info", b"id=rid-77;r=orders")]
    other = make_ctx(b"GET", b"/other", host=None, route="r2", request_id="rid-78")
    mw.on_request(other)
    assert other.set_request == [(b"X-Info", b"192.0.2.7|rid-78|r2|GET|/other|")]


def test_route_placeholder_is_filled_in_at_bind() -> None:
    mw = headers_mw(request={"set": {"X-R": "{route}", "X-M": "{route}:{method}"}},
                    response={"set": {"X-Route": "r={route}"}})
    mw.bind(worker_services(), route("orders"))
    assert mw.request.append[0][2] == b"orders"  # static now: no per-request rendering
    assert mw.response.append[0][2] == b"r=orders"
    ctx = make_ctx(b"PUT", route="orders")
    mw.on_request(ctx)
    assert ctx.set_request == [(b"X-R", b"orders"), (b"X-M", b"orders:PUT")]
    resp = response(200, [(b"Server", b"x")])
    mw.on_response(ctx, resp)
    assert resp.headers == [(b"Server", b"x"), (b"X-Route", b"r=orders")]


def test_request_id_placeholder_uses_the_context_id() -> None:
    ctx = make_ctx(request_id="generated")
    ctx.request_id = "from-trace-id"
    headers_mw(request={"set": {"X-R": "{request_id}"}}).on_request(ctx)
    assert ctx.set_request == [(b"X-R", b"from-trace-id")]


def test_templates_without_placeholders_compile_to_bytes() -> None:
    assert compile_template("plain {not a placeholder") == b"plain {not a placeholder"
    parts = compile_template("a{method}b")
    assert isinstance(parts, list)
    assert render(parts, make_ctx(b"PUT")) == b"aPUTb"
    assert render(compile_template("{path}"), make_ctx(path=b"/p")) == b"/p"


def test_unknown_placeholder_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match=r"unknown placeholder \{user\}"):
        headers_mw(response={"set": {"X-User": "{user}"}})
    with pytest.raises(ValidationError, match="unknown placeholder"):
        headers_mw(request={"add": {"X-A": "{method}-{nope}"}})


def test_unknown_field_in_ops_is_a_config_error() -> None:
    with pytest.raises(ValidationError):
        headers_mw(request={"delete": ["X-A"]})


def test_empty_ops_do_nothing() -> None:
    mw = make("headers")
    ctx = make_ctx()
    mw.on_request(ctx)
    assert ctx.set_request == []
    assert ctx.remove_request == set()
    resp = response(200, [(b"A", b"1")])
    mw.on_response(ctx, resp)
    assert resp.headers == [(b"A", b"1")]


def test_unknown_placeholder_is_reported_at_its_key_path() -> None:
    from proxyd.config import GatewayConfig
    from proxyd.middleware import check_middleware

    cfg = GatewayConfig.model_validate({"middleware": [
        {"type": "headers", "response": {"set": {"X-U": "{user}"}}}]})
    [(path, message)] = check_middleware(cfg)[0]
    assert path == ("middleware", 0, "response", "set")
    assert "unknown placeholder {user}" in message
