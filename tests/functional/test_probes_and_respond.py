"""The traffic port's probe paths (server.probes) and respond routes with placeholders."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.functional._http import RawClient, get
from tests.functional.conftest import CATCH_ALL, StartProxy, Upstreams, route


async def answers(port: int, *requests: bytes) -> list[tuple[int, dict[str, Any] | None, str]]:
    """(status, JSON body or None, who answered: "probe" or "upstream") per request."""
    out = []
    async with await RawClient.connect(port) as c:
        for request in requests:
            resp = await c.request(request, head=request.startswith(b"HEAD "))
            body = json.loads(resp.body) if resp.body else None
            # The echo upstream answers with what it saw; a probe with its own small body.
            who = "upstream" if isinstance(body, dict) and "path" in body else "probe"
            out.append((resp.status, body, who))
    return out


async def test_default_probes_answer_get_and_head_only(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    got = await answers(p.port, get("/health"), get("/health/ready"),
                        get("/health", method="HEAD"),
                        get("/health", method="POST", extra="Content-Length: 0\r\n"),
                        get("/health/other"))
    assert got[0] == (200, {"status": "ok"}, "probe")
    assert got[1] == (200, {"ready": True}, "probe")
    assert got[2][:1] == (200,) and got[2][1] is None  # HEAD: the probe, without a body
    assert got[3][0] == 200 and got[3][2] == "upstream"  # another method: routed
    assert got[4][0] == 200 and got[4][2] == "upstream"  # another path under it: routed


async def test_probe_paths_can_move(upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url},
                    server={"probes": {"live": "/_proxyd/live", "ready": "/_proxyd/ready"}})
    got = await answers(p.port, get("/health"), get("/health/ready"), get("/_proxyd/live"),
                        get("/_proxyd/ready"))
    assert [who for _, _, who in got] == ["upstream", "upstream", "probe", "probe"]
    assert got[3][1] == {"ready": True}


async def test_probes_can_be_turned_off(upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, server={"probes": {"enabled": False}})
    got = await answers(p.port, get("/health"), get("/health/ready"))
    assert [who for _, _, who in got] == ["upstream", "upstream"]


async def test_readiness_fails_while_draining(upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/health/ready"))).status == 200
        p.pipeline.draining = True
        resp = await c.request(get("/health/ready"))
    assert resp.status == 503 and json.loads(resp.body) == {"ready": False, "state": "draining"}


REDIRECT = {"status": 301, "headers": {"Location": "{scheme}s://{host}{path}{query}",
                                       "X-Id": "{request_id}"},
            "body": "moved to https://{host}{path}{query}\n"}


@pytest.mark.parametrize("chain", [False, True], ids=["plain", "with-middleware"])
async def test_respond_placeholders_make_the_https_redirect_one_route(
    proxy: StartProxy, chain: bool
) -> None:
    kw: dict[str, Any] = {"middleware": [{"type": "trace_id"}]} if chain else {}
    p = await proxy([route("https", respond=REDIRECT, path_prefix="/")], {}, **kw)
    async with await RawClient.connect(p.port) as c:
        a = await c.request(get("/a/b%7e/../c?x=1&y=%22", host="Example.COM:8080"))
        b = await c.request(get("/plain", host="example.org"))
        head = await c.request(get("/h?q", method="HEAD"), head=True)
    assert a.status == 301
    assert a.header("Location") == "https://example.com/a/c?x=1&y=%22"
    assert a.body == b"moved to https://example.com/a/c?x=1&y=%22\n"
    assert a.header("Content-Length") == str(len(a.body))
    assert b.header("Location") == "https://example.org/plain"  # no query: no "?"
    assert a.header("X-Id") and b.header("X-Id") and a.header("X-Id") != b.header("X-Id")
    if chain:
        assert a.header("X-Id") == a.header("X-Request-ID")
    assert head.status == 301 and head.body == b""
    assert head.header("Location") == "https://test/h?q"
    assert head.header("Content-Length") == str(len(b"moved to https://test/h?q\n"))


async def test_scheme_from_a_trusted_proxy(proxy: StartProxy) -> None:
    p = await proxy([route("where", respond={"body": "{scheme}://{host}{path}"},
                           path_prefix="/")], {}, server={"trusted_proxies": ["127.0.0.1/32"]})
    async with await RawClient.connect(p.port) as c:
        forwarded = await c.request(get("/x", extra="X-Forwarded-Proto: https\r\n"))
        direct = await c.request(get("/y"))
    assert forwarded.body == b"https://test/x" and direct.body == b"http://test/y"


async def test_a_plain_respond_is_not_templated(proxy: StartProxy) -> None:
    body = '{"service": "proxyd", "status": "ok", "path": "{paths}"}'
    p = await proxy([route("hello", respond={"body": body}, path="/")], {})
    respond = p.pipeline.router.routes[0].respond
    assert respond is not None and not respond.templated  # rendered once, at load
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/"))).body == body.encode()
