"""render_response: a cache hit's stored fields go out as the lines rendered once for the entry;
any change to those fields through the Response API must show in the bytes sent. The same for
render_fields and the blocks Response.extend records. Status lines, TrustedProxies."""

from __future__ import annotations

import pytest

from proxyd.cache.store import Entry
from proxyd.middleware.base import FieldBlock, Response
from proxyd.proxy import headers as headers_module
from proxyd.proxy.headers import (
    NAMES_MAX,
    REASON_LINES_MAX,
    RESPONSE_DROP,
    RESPONSE_DROP_SHAPES,
    TrustedProxies,
    content_length,
    lower_name,
    name_shape,
    render_fields,
    render_response,
    status_line,
)

STORED = [(b"Content-Type", b"text/plain"), (b"ETag", b'"v1"'), (b"Cache-Control", b"max-age=60")]


def hit() -> Response:
    entry = Entry(200, list(STORED), b"hello", 0.0, 0.0, 60.0)
    resp = Response(200, [*entry.headers, (b"Age", b"3")], entry.body)
    resp.rendered = (entry.rendered(), len(entry.headers))
    return resp


def plain(resp: Response) -> bytes:
    """The same response without the pre-rendered lines."""
    copy = Response(resp.status, list(resp.headers), resp.body)
    return render_response(copy, close=False, head=False)[0]


def test_prerendered_lines_give_the_same_bytes() -> None:
    resp = hit()
    data, sent = render_response(resp, close=True, head=False)
    assert data == plain(resp).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    assert data.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nETag: \"v1\"\r\n")
    assert b"Age: 3\r\nContent-Length: 5\r\n" in data and sent == 5


def test_appended_fields_keep_the_lines() -> None:
    resp = hit()
    resp.add(b"X-Frame-Options", b"DENY")
    resp.headers.append((b"X-Direct", b"1"))
    assert resp.rendered is not None
    data = render_response(resp, close=False, head=False)[0]
    assert data == plain(resp) and b"X-Frame-Options: DENY\r\nX-Direct: 1\r\n" in data


def test_changing_a_stored_field_drops_the_lines() -> None:
    resp = hit()
    resp.set(b"Cache-Control", b"no-cache")
    assert resp.rendered is None
    assert b"Cache-Control: no-cache\r\n" in render_response(resp, close=False, head=False)[0]
    resp = hit()
    resp.remove(b"etag")
    assert resp.rendered is None
    assert b"ETag" not in render_response(resp, close=False, head=False)[0]
    resp = hit()
    resp.headers = [(b"Content-Type", b"text/html")]
    data = render_response(resp, close=False, head=False)[0]
    assert b"text/plain" not in data and b"Content-Type: text/html\r\n" in data


BLOCK = FieldBlock([(b"X-Frame-Options", b"DENY"), (b"Referrer-Policy", b"no-referrer")])
# Not the fields' real lines: seeing it in the output proves the block was used as given.
MARK = b"X-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\nX-Block: used\r\n"
BLOCK.lines = MARK


def with_block() -> Response:
    resp = Response(200, [(b"Server", b"s"), (b"Date", b"d")])
    resp.add_block(BLOCK)
    resp.add(b"ETag", b'"e"')
    return resp


def test_a_block_in_place_goes_out_as_its_lines() -> None:
    resp = with_block()
    assert render_fields(resp.headers, resp.blocks) == (
        b"Server: s\r\nDate: d\r\n" + MARK + b'ETag: "e"\r\n')
    resp.add_vary(b"Origin")  # appended after it: still in place
    resp.set(b"Date", b"d2")  # a field before it changed in place: still in place
    assert MARK in render_fields(resp.headers, resp.blocks)


def test_a_moved_or_changed_block_is_rendered_field_by_field() -> None:
    moved = with_block()
    moved.remove(b"server")  # a field before it gone: the block is not at its index
    changed = with_block()
    changed.set(b"Referrer-Policy", b"same-origin")
    shortened = with_block()
    shortened.remove(b"x-frame-options")
    replaced = with_block()
    replaced.headers = list(replaced.headers)  # a new list: no blocks
    for resp in (moved, changed, shortened, replaced):
        out = render_fields(resp.headers, resp.blocks)
        assert b"X-Block" not in out
        assert out == render_fields(resp.headers)


def test_content_length_parses_digits_and_leaves_the_rest_to_int() -> None:
    for value in (b"0", b"7", b"1024", b"007", b"18446744073709551616"):
        assert content_length(value) == int(value)
    for odd in (b" 12 ", b"+1", b"-1"):  # not digits only: int()'s rules, as before
        assert content_length(odd) == int(odd)
    for bad in (b"", b"1a", b"1 2"):
        with pytest.raises(ValueError):
            content_length(bad)


def test_trusted_proxies_membership_and_truth() -> None:
    none = TrustedProxies([])
    assert not none and "10.1.2.3" not in none  # nothing trusted: callers skip the lookup
    some = TrustedProxies(["10.0.0.0/8", "2001:db8::/32"])
    assert some
    assert "10.1.2.3" in some and "2001:db8::1" in some
    assert "192.0.2.1" not in some and "not an address" not in some


def test_status_line_keeps_the_upstream_reason_and_memo_stays_bounded() -> None:
    assert status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert status_line(200, b"Fine") == b"HTTP/1.1 200 Fine\r\n"
    assert status_line(200, b"Fine") == b"HTTP/1.1 200 Fine\r\n"  # from the memo now
    assert status_line(599) == b"HTTP/1.1 599 Unknown\r\n"
    kept = dict(headers_module._REASON_LINES)
    try:
        for i in range(REASON_LINES_MAX + 50):  # an upstream inventing reasons
            assert status_line(200, b"R%d" % i) == b"HTTP/1.1 200 R%d\r\n" % i
        assert len(headers_module._REASON_LINES) <= REASON_LINES_MAX
    finally:  # the memo is the module's: later tests get it as it was
        headers_module._REASON_LINES.clear()
        headers_module._REASON_LINES.update(kept)


def test_lower_name_gives_one_lowercase_object_per_name_and_stays_bounded() -> None:
    names: dict[bytes, bytes] = {}
    first = lower_name(b"Content-Length", names)
    assert first == b"content-length"
    assert lower_name(b"Content-Length", names) is first
    assert lower_name(b"CONTENT-length", names) is first  # another spelling, the same object
    assert lower_name(b"content-length", names) is first
    for i in range(NAMES_MAX):  # a peer inventing names fills the table, then no more
        assert lower_name(b"X-Made-Up-%d" % i, names) == b"x-made-up-%d" % i
    full = len(names)
    assert NAMES_MAX - 2 <= full <= NAMES_MAX
    assert lower_name(b"X-One-More", names) == b"x-one-more"
    assert len(names) == full and b"X-One-More" not in names
    assert lower_name(b"Content-Length", names) is first  # what it holds is still served


def test_every_dropped_response_field_in_any_case_has_a_marked_shape() -> None:
    """A relay without middleware lowers only names of a marked shape: a dropped field whose
    shape were unmarked would reach the client."""
    for name in RESPONSE_DROP:
        for spelling in (name, name.upper(), name.title(), name.capitalize()):
            assert RESPONSE_DROP_SHAPES[name_shape(spelling)], spelling
    assert RESPONSE_DROP_SHAPES[name_shape(b"")]
    relayed = [b"Server", b"Date", b"Content-Type", b"Last-Modified", b"Accept-Ranges", b"ETag",
               b"Cache-Control", b"Vary", b"Set-Cookie", b"Location"]
    assert not any(RESPONSE_DROP_SHAPES[name_shape(n)] for n in relayed)
