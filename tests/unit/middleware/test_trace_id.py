"""trace_id: request ids accepted or generated, forwarded, echoed; W3C traceparent."""

from __future__ import annotations

import re

import pytest

from proxyd.middleware.base import Context

from .helpers import make, make_ctx, response, values

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def run(ctx: Context, **options: object) -> Context:
    assert make("trace_id", **options).on_request(ctx) is None
    return ctx


def forwarded(ctx: Context, lname: bytes) -> list[bytes]:
    return [v for n, v in ctx.set_request if n.lower() == lname]


def test_generates_an_id_when_absent_and_forwards_it() -> None:
    ctx = run(make_ctx(request_id="gen-1"))
    assert ctx.request_id == "gen-1"
    assert forwarded(ctx, b"x-request-id") == [b"gen-1"]
    assert b"x-request-id" in ctx.remove_request  # the client's copy is replaced, not doubled


def test_keeps_a_safe_incoming_id() -> None:
    ctx = run(make_ctx(headers=[(b"x-request-id", b"abc-123_XYZ.9")], request_id="gen"))
    assert ctx.id() == "abc-123_XYZ.9"
    assert forwarded(ctx, b"x-request-id") == [b"abc-123_XYZ.9"]


@pytest.mark.parametrize("incoming", [
    b"abc\x01def", b"abc def", b"abc\n", b"\tabc", b"a" * 201, b"", b"caf\xc3\xa9", b"x\x7f",
])
def test_unsafe_incoming_id_is_replaced_by_a_generated_one(incoming: bytes) -> None:
    ctx = run(make_ctx(headers=[(b"X-Request-ID", incoming)], request_id="gen-2"))
    assert ctx.id() == "gen-2"
    assert forwarded(ctx, b"x-request-id") == [b"gen-2"]
    assert b"x-request-id" in ctx.remove_request


def test_longest_accepted_id() -> None:
    ctx = run(make_ctx(headers=[(b"X-Request-ID", b"a" * 200)], request_id="gen"))
    assert ctx.id() == "a" * 200


def test_incoming_id_ignored_when_not_trusted() -> None:
    ctx = run(make_ctx(headers=[(b"X-Request-ID", b"client")], request_id="gen-3"),
              trust_incoming=False)
    assert ctx.id() == "gen-3"


def test_custom_header_name() -> None:
    ctx = run(make_ctx(headers=[(b"x-correlation-id", b"corr-1")]), header="X-Correlation-ID")
    assert ctx.id() == "corr-1"
    assert ctx.set_request[0] == (b"X-Correlation-ID", b"corr-1")
    assert forwarded(ctx, b"x-request-id") == []
    assert b"x-correlation-id" in ctx.remove_request


def test_echoes_the_id_on_the_response() -> None:
    mw = make("trace_id")
    ctx = make_ctx(headers=[(b"X-Request-ID", b"abc")])
    mw.on_request(ctx)
    resp = response(200, [])
    mw.on_response(ctx, resp)
    assert values(resp, b"x-request-id") == [b"abc"]


def test_echo_does_not_duplicate_an_upstream_value_and_can_be_off() -> None:
    ctx = make_ctx(request_id="gen")
    resp = response(200, [(b"x-request-id", b"upstream")])
    make("trace_id").on_response(ctx, resp)
    assert values(resp, b"x-request-id") == [b"upstream"]
    resp = response(200, [])
    make("trace_id", echo=False).on_response(ctx, resp)
    assert resp.headers == []


def test_valid_traceparent_keeps_trace_id_with_new_parent() -> None:
    ctx = run(make_ctx(headers=[(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())]))
    [value] = forwarded(ctx, b"traceparent")
    m = re.fullmatch(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-01", value)
    assert m is not None
    assert m.group(1).decode() == TRACE
    assert m.group(2).decode() != PARENT
    assert b"traceparent" in ctx.remove_request


def test_traceparent_of_a_future_version_is_rewritten_as_version_00() -> None:
    # A later version may append fields after the flags: read as version 00, sent as 00.
    value = f" 0a-{TRACE}-{PARENT}-00-later.fields ".encode()
    ctx = run(make_ctx(headers=[(b"traceparent", value)]))
    [sent] = forwarded(ctx, b"traceparent")
    assert sent.startswith(f"00-{TRACE}-".encode())
    assert sent.endswith(b"-00")


def test_each_hop_gets_a_fresh_parent_id() -> None:
    header = [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())]
    first = forwarded(run(make_ctx(headers=header)), b"traceparent")
    second = forwarded(run(make_ctx(headers=header)), b"traceparent")
    assert first != second


@pytest.mark.parametrize("value", [
    f"ff-{TRACE}-{PARENT}-01",  # version ff is forbidden
    f"00-{TRACE.upper()}-{PARENT}-01",  # uppercase hex
    f"0A-{TRACE}-{PARENT}-01",  # uppercase version
    f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
    f"00-{TRACE[:-1]}-{PARENT}-01",  # short trace id
    f"00-{TRACE}-{PARENT}",  # no flags
    f"00-{TRACE}-{PARENT}-01-extra",
    f"00-{TRACE[:-1]}g-{PARENT}-01",  # not hex
    "garbage",
])
def test_invalid_traceparent_restarts_the_trace(value: str) -> None:
    ctx = run(make_ctx(headers=[(b"traceparent", value.encode()), (b"tracestate", b"k=v")]))
    [sent] = forwarded(ctx, b"traceparent")
    m = re.fullmatch(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-01", sent)
    assert m is not None and m.group(1).decode() != TRACE
    assert {b"traceparent", b"tracestate"} <= ctx.remove_request  # neither passes through
    assert forwarded(ctx, b"x-request-id") != []  # the request id is still handled


def test_two_traceparents_restart_the_trace() -> None:
    header = (b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())
    ctx = run(make_ctx(headers=[header, header]))
    [sent] = forwarded(ctx, b"traceparent")
    assert not sent.startswith(f"00-{TRACE}".encode())


def test_new_trace_ids_are_never_all_zeros() -> None:
    from proxyd.middleware.trace_id import new_ids

    for bits in (0, 1 << 64, (1 << 192) - 1):  # the worst draws there are, and the largest
        ids = new_ids(bits)
        assert len(ids) == 48 and set(ids[:32]) != {"0"} and set(ids[32:]) != {"0"}


def test_a_trace_starts_at_the_edge() -> None:
    ctx = run(make_ctx(headers=[(b"tracestate", b"orphan=1")]))
    [sent] = forwarded(ctx, b"traceparent")
    assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-01", sent)
    assert b"tracestate" in ctx.remove_request
    unsampled = run(make_ctx(), sampled=False)
    assert forwarded(unsampled, b"traceparent")[0].endswith(b"-00")
    quiet = run(make_ctx(headers=[(b"tracestate", b"k=v")]), start_traces=False)
    assert forwarded(quiet, b"traceparent") == []
    assert b"tracestate" not in quiet.remove_request


def test_traceparent_handling_can_be_off() -> None:
    ctx = run(make_ctx(headers=[(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())]),
              traceparent=False)
    assert forwarded(ctx, b"traceparent") == []
