"""Chain: request hooks in order, response hooks innermost-first, short-circuits."""

from __future__ import annotations

import pytest

from proxyd.middleware.base import Context, Middleware, Options, Response
from proxyd.middleware.chain import Chain

from .helpers import make, make_ctx, response


class Recorder(Middleware):
    type = "recorder"
    options_model = Options

    def __init__(self, name: str, log: list[str], answer: Response | None = None) -> None:
        super().__init__(Options(type="recorder"))
        self.name = name
        self.log = log
        self.answer = answer

    def on_request(self, ctx: Context) -> Response | None:
        self.log.append(f"req:{self.name}")
        return self.answer

    def on_response(self, ctx: Context, resp: Response) -> None:
        self.log.append(f"resp:{self.name}")
        resp.add(b"X-Seen", self.name.encode())


class RequestOnly(Middleware):
    type = "request_only"
    options_model = Options
    seen: list[Context] = []  # the requests it saw, for the test to read

    def on_request(self, ctx: Context) -> Response | None:
        self.seen.append(ctx)
        return None


def test_request_hooks_run_in_config_order() -> None:
    log: list[str] = []
    chain = Chain([Recorder("a", log), Recorder("b", log), Recorder("c", log)])
    answer, index = chain.request(make_ctx())
    assert answer is None
    assert index == 3 == chain.size
    assert log == ["req:a", "req:b", "req:c"]


def test_response_hooks_run_innermost_first() -> None:
    log: list[str] = []
    chain = Chain([Recorder("a", log), Recorder("b", log), Recorder("c", log)])
    resp = response()
    chain.response(make_ctx(), resp)
    assert log == ["resp:c", "resp:b", "resp:a"]
    assert resp.headers == [(b"X-Seen", b"c"), (b"X-Seen", b"b"), (b"X-Seen", b"a")]


def test_short_circuit_skips_later_middleware_and_their_response_hooks() -> None:
    log: list[str] = []
    local = Response(403, [], b"no")
    chain = Chain([Recorder("a", log), Recorder("b", log, answer=local), Recorder("c", log)])
    ctx = make_ctx()
    answer, index = chain.request(ctx)
    assert answer is local
    assert index == 1
    assert log == ["req:a", "req:b"]  # c never saw the request
    chain.response(ctx, answer, upto=index)
    assert log == ["req:a", "req:b", "resp:a"]  # only the middleware before the answerer
    assert answer.headers == [(b"X-Seen", b"a")]


def test_first_middleware_answering_runs_no_response_hooks() -> None:
    log: list[str] = []
    chain = Chain([Recorder("a", log, answer=Response(204, [])), Recorder("b", log)])
    ctx = make_ctx()
    answer, index = chain.request(ctx)
    assert answer is not None
    assert index == 0
    chain.response(ctx, answer, upto=index)
    assert log == ["req:a"]


def test_middleware_without_a_response_hook_still_counts_for_indexes() -> None:
    log: list[str] = []
    chain = Chain([RequestOnly(Options(type="request_only")), Recorder("b", log),
                   Recorder("c", log, answer=Response(401, []))])
    ctx = make_ctx()
    answer, index = chain.request(ctx)
    assert RequestOnly.seen[-1] is ctx
    assert index == 2
    assert answer is not None
    chain.response(ctx, answer, upto=index)
    assert log == ["req:b", "req:c", "resp:b"]


def test_wants_body_asks_only_buffering_middleware() -> None:
    chain = Chain([make("cors", allow_origins=["*"]), make("etag")])
    ctx = make_ctx()
    assert chain.wants_body(ctx, response(200, [(b"Content-Length", b"10")]))
    assert not chain.wants_body(ctx, response(200, [(b"Content-Length", b"10"),
                                                    (b"ETag", b'"x"')]))
    assert not Chain([make("cors", allow_origins=["*"])]).wants_body(
        ctx, response(200, [(b"Content-Length", b"10")]))


def test_empty_chain_is_falsy_and_names_follow_order() -> None:
    assert not Chain([])
    chain = Chain([make("trace_id"), make("cors"), make("compression")])
    assert chain
    assert chain.names == ["trace_id", "cors", "compression"]


@pytest.mark.parametrize("filler", [0, 5], ids=["scanned", "indexed"])
def test_context_header_is_the_first_field_of_that_name(filler: int) -> None:
    """A few fields are scanned, more are indexed (FEW_FIELDS): the same answers."""
    ctx = make_ctx(headers=[(b"Origin", b"https://a.example"), (b"X-Id", b"1"),
                            *[(b"X-Fill-%d" % i, b"f") for i in range(filler)],
                            (b"origin", b"https://b.example")])
    assert ctx.header(b"origin") == b"https://a.example"  # as a scan from the start finds it
    assert ctx.header(b"x-id") == b"1"
    assert ctx.header(b"accept-encoding") is None
    assert make_ctx().header(b"origin") is None  # no fields at all
