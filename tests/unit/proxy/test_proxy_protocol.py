"""PROXY protocol headers (HAProxy's specification, versions 1 and 2): parsing what a balancer
sends, and the headers proxyd sends an upstream."""

from __future__ import annotations

import pytest

from proxyd.proxy.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeaderError,
    header_v1,
    header_v2,
    parse,
)


@pytest.mark.parametrize(("src", "dst"), [("192.0.2.7", "198.51.100.1"),
                                          ("2001:db8::7", "2001:db8::1")])
@pytest.mark.parametrize("make", [header_v1, header_v2])
def test_round_trip_and_every_prefix_is_incomplete(make, src: str, dst: str) -> None:  # type: ignore[no-untyped-def]
    header = make(src, 51000, dst, 443)
    assert parse(header + b"GET / HTTP/1.1\r\n") == (src, len(header))
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut


def test_v1_unknown_and_v2_local_mean_the_peer_itself() -> None:
    assert parse(b"PROXY UNKNOWN\r\nGET") == (None, 15)
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse(local) == (None, 16)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 extra\r\n",
    b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n",
    b"PROXY TCP4 " + b"1" * 120 + b"\r\n",
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
    V2_SIGNATURE + b"\x2f\x11\x00\x0c" + b"\x00" * 12,  # command 15
    V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # too short for IPv4 addresses
])
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_mixed_families_are_sent_without_addresses() -> None:
    assert header_v1("192.0.2.7", 1, "2001:db8::1", 2) == b"PROXY UNKNOWN\r\n"
    assert parse(header_v2("192.0.2.7", 1, "2001:db8::1", 2)) == (None, 16)
