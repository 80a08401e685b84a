"""head.py: a cache hit's stored fields go out as the lines rendered once for the entry; any
change to those fields through the Response API must show in the bytes sent. The same for
render_fields and the blocks Response.extend records. Status lines and their bounded memo."""

from __future__ import annotations

from proxyd.cache.store import Entry
from proxyd.middleware.base import FieldBlock, Response
from proxyd.proxy import head as head_module
from proxyd.proxy.head import (
    REASON_LINES_MAX,
    render_fields,
    render_response,
    status_line,
    switching_protocols,
    upstream_head,
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


def test_status_line_keeps_the_upstream_reason_and_memo_stays_bounded() -> None:
    assert status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert status_line(200, b"Fine") == b"HTTP/1.1 200 Fine\r\n"
    assert status_line(200, b"Fine") == b"HTTP/1.1 200 Fine\r\n"  # from the memo now
    assert status_line(599) == b"HTTP/1.1 599 Unknown\r\n"
    kept = dict(head_module._REASON_LINES)
    try:
        for i in range(REASON_LINES_MAX + 50):  # an upstream inventing reasons
            assert status_line(200, b"R%d" % i) == b"HTTP/1.1 200 R%d\r\n" % i
        assert len(head_module._REASON_LINES) <= REASON_LINES_MAX
    finally:  # the memo is the module's: later tests get it as it was
        head_module._REASON_LINES.clear()
        head_module._REASON_LINES.update(kept)


def test_switching_protocols_and_upstream_head() -> None:
    head = switching_protocols(b"acc", [(b"Sec-WebSocket-Protocol", b"chat")])
    assert head == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: acc\r\n"
                    b"Sec-WebSocket-Protocol: chat\r\n\r\n")
    assert upstream_head(b"GET / HTTP/1.1\r\nA: b\r\n", b"Host: h\r\n") == (
        b"GET / HTTP/1.1\r\nA: b\r\nHost: h\r\n\r\n")
