"""ip_access: allow and deny networks on the client's address as the gateway establishes it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from proxyd.middleware.access.ip_access import REMEMBERED, IpAccess
from proxyd.middleware.base import Response
from proxyd.observe.metrics import WorkerMetrics

from .helpers import counts, make, make_ctx, route, worker_services


def ip_access(trusted: tuple[str, ...] = (), **options: Any) -> tuple[IpAccess, WorkerMetrics]:
    mw = make("ip_access", **options)
    assert isinstance(mw, IpAccess)
    services = worker_services(trusted=trusted)
    mw.bind(services, route("admin"))
    return mw, services.metrics


def passes(mw: IpAccess, ip: bytes, xff: bytes | None = None) -> bool:
    headers = [(b"X-Forwarded-For", xff)] if xff is not None else []
    answer = mw.on_request(make_ctx(client_ip=ip, headers=headers))
    if answer is None:
        return True
    assert isinstance(answer, Response) and answer.status == 403
    return False


@pytest.mark.parametrize("options, message", [
    ({}, "give allow or deny"),
    ({"allow": ["10.0.0.1/8"]}, "has host bits set"),
    ({"deny": ["not-a-network"]}, "does not appear to be"),
])
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make("ip_access", **options)


def test_allow_list_refuses_everyone_else() -> None:
    mw, metrics = ip_access(allow=["10.0.0.0/8", "2001:db8::/32"])
    assert passes(mw, b"10.1.2.3")
    assert passes(mw, b"2001:db8::7")
    assert not passes(mw, b"192.0.2.1")
    assert not passes(mw, b"192.0.2.1")  # remembered, same answer
    assert counts(metrics) == {
        ("gateway_auth_total", ("admin", "ip_access", "ok")): 2.0,
        ("gateway_auth_total", ("admin", "ip_access", "denied")): 2.0,
    }


def test_deny_wins_over_allow() -> None:
    mw, _ = ip_access(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    assert passes(mw, b"10.1.0.1")
    assert not passes(mw, b"10.9.0.1")
    only_deny, _ = ip_access(deny=["192.0.2.0/24"])
    assert passes(only_deny, b"198.51.100.1") and not passes(only_deny, b"192.0.2.200")


def test_ipv4_mapped_peers_match_ipv4_networks() -> None:
    mw, _ = ip_access(allow=["10.0.0.0/8"])
    assert passes(mw, b"::ffff:10.0.0.1")
    assert not passes(mw, b"::ffff:192.0.2.1")


def test_forwarded_for_counts_only_behind_a_trusted_proxy() -> None:
    mw, _ = ip_access(trusted=("127.0.0.1/32",), deny=["198.51.100.0/24"])
    assert not passes(mw, b"127.0.0.1", b"198.51.100.7")  # the proxy vouches for the client
    assert passes(mw, b"127.0.0.1", b"203.0.113.1")
    # From anyone else the header is the client's own word: the peer is what counts.
    assert passes(mw, b"192.0.2.9", b"198.51.100.7")
    # A client writing the header behind the proxy only adds hops to the left.
    assert not passes(mw, b"127.0.0.1", b"10.0.0.1, 198.51.100.7")


def test_an_address_that_cannot_be_read_is_refused() -> None:
    mw, _ = ip_access(trusted=("127.0.0.1/32",), deny=["198.51.100.0/24"])
    assert not passes(mw, b"127.0.0.1", b"unknown")


def test_decisions_remembered_up_to_a_bound() -> None:
    mw, _ = ip_access(deny=["192.0.2.0/24"])
    for i in range(REMEMBERED + 10):
        passes(mw, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}".encode())
    assert len(mw.decisions) == REMEMBERED
