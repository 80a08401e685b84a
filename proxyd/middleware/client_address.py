"""The client's address as the gateway establishes it: the peer, or — when the peer is a trusted
proxy (``server.trusted_proxies``) — the nearest X-Forwarded-For hop that is not trusted.

One definition for every element that acts on the client's address (rate_limit's ``client_ip``
key, ip_access's lists), so that they can never disagree about who the client is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxyd.middleware.base import Context

if TYPE_CHECKING:
    from proxyd.proxy.field_rules import TrustedProxies


def client_address(ctx: Context, trusted: TrustedProxies | None) -> bytes:
    """The peer, or — behind trusted proxies only — the last untrusted X-Forwarded-For hop.

    Read from the right: each trusted proxy appended the address it received the request
    from, so the first untrusted hop from the right is the one no trusted party vouches for
    beyond. When every hop is trusted, the first one (as nginx's ``real_ip_recursive``): the
    client is inside the trusted networks, and the peer is just the last proxy. Without
    trusted proxies the header is never read: anyone can write it.
    """
    ip = ctx.client_ip
    if not trusted or ip.decode("latin-1") not in trusted:
        return ip
    forwarded = ctx.header(b"x-forwarded-for")
    if not forwarded:
        return ip
    hops = [h.strip() for h in forwarded.split(b",") if h.strip()]
    for hop in reversed(hops):
        if hop.decode("latin-1") not in trusted:
            return hop
    return hops[0] if hops else ip
