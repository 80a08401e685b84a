"""An HTTP/2 header block into a Request, and HTTP/1.1 response lines into HTTP/2 fields."""

from __future__ import annotations

import pytest

from proxyd.config.models import GatewayConfig
from proxyd.proxy.h2_fields import Malformed, request_of, response_fields, split_answer
from proxyd.proxy.limits import ClientLimits
from proxyd.proxy.request import Reject

LIMITS = ClientLimits(GatewayConfig().server)
BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"),
        (b":path", b"/a?b=1")]


def test_a_request_as_http11_would_parse_it() -> None:
    req = request_of([*BASE, (b"x-forwarded-for", b"10.0.0.1"), (b"cookie", b"a=1"),
                      (b"cookie", b"b=2")], True, LIMITS)
    assert (req.method, req.url, req.host) == (b"GET", b"/a?b=1", b"example.com")
    assert req.xff == b"10.0.0.1"
    assert (b"cookie", b"cookie", b"a=1; b=2") in req.headers
    assert req.body_done and not req.has_body and req.http11 and req.keep_alive


def test_a_body_without_length_goes_upstream_chunked() -> None:
    req = request_of([*BASE[:1], *BASE[1:]], False, LIMITS)
    assert req.has_body and req.chunked and not req.body_done
    sized = request_of([*BASE, (b"content-length", b"5")], False, LIMITS)
    assert sized.content_length == 5 and not sized.chunked


@pytest.mark.parametrize("extra", [
    [(b"connection", b"close")],
    [(b"upgrade", b"websocket")],
    [(b"te", b"gzip")],
    [(b"Upper", b"x")],
    [(b":method", b"POST")],  # a pseudo-field twice
])
def test_what_http2_forbids_is_malformed(extra: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Malformed):
        request_of([*BASE, *extra], True, LIMITS)


def test_authority_and_host_must_agree() -> None:
    assert request_of([*BASE, (b"host", b"example.com")], True, LIMITS).host == b"example.com"
    with pytest.raises(Malformed):
        request_of([*BASE, (b"host", b"other.com")], True, LIMITS)


def test_limits_answer_their_status() -> None:
    with pytest.raises(Reject) as exc:
        request_of([*BASE[:3], (b":path", b"/" + b"a" * 9000)], True, LIMITS)
    assert exc.value.status == 414
    with pytest.raises(Reject) as exc:
        request_of([*BASE, *[(b"x-%d" % i, b"v") for i in range(101)]], True, LIMITS)
    assert exc.value.status == 431
    with pytest.raises(Reject) as exc:
        request_of([*BASE, (b"content-length", b"%d" % (11 << 20))], False, LIMITS)
    assert exc.value.status == 413
    with pytest.raises(Reject) as exc:
        request_of([(b":method", b"CONNECT"), (b":authority", b"example.com:443")], True,
                   LIMITS)
    assert exc.value.status == 405


def test_response_fields_lose_what_http2_forbids() -> None:
    lines = (b"Content-Type: text/plain\r\nConnection: close\r\nKeep-Alive: timeout=5\r\n"
             b"Transfer-Encoding: chunked\r\nX-Thing:  v \r\n")
    assert response_fields(lines) == [(b"content-type", b"text/plain"), (b"x-thing", b"v")]


def test_split_answer() -> None:
    data = (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2"
            b"\r\nConnection: close\r\n\r\n{}")
    assert split_answer(data) == (404, [(b"content-type", b"application/json"),
                                        (b"content-length", b"2")], b"{}")
