"""The ``ip_access`` element: allow and deny lists of networks, on the client's address.

The address is the one the gateway establishes (client_address: the peer, or behind
``server.trusted_proxies`` the nearest untrusted X-Forwarded-For hop), the same that rate_limit
counts. Deny wins over allow; with an allow list, every address not on it is refused; an
address that cannot be read (a trusted proxy forwarding "unknown") is refused too. IPv4 peers
on an IPv6 socket (::ffff:a.b.c.d) are matched as IPv4.

Decisions are remembered per address, up to a bound (addresses behind a trusted proxy are
whatever the client writes): a returning client costs one lookup.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Final

from proxyd.middleware.access import outcome
from proxyd.middleware.access.access_options import IpAccessOptions
from proxyd.middleware.access.outcome import Outcomes, forbidden
from proxyd.middleware.base import Context, Middleware, Pending, Response
from proxyd.middleware.client_address import client_address

if TYPE_CHECKING:
    from proxyd.middleware.services import Services
    from proxyd.proxy.router import CompiledRoute

REMEMBERED: Final = 4096  # decisions kept per element and worker

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class IpAccess(Middleware):
    type = "ip_access"
    options_model = IpAccessOptions

    def __init__(self, options: IpAccessOptions) -> None:
        super().__init__(options)
        self.allow: list[Network] = [ipaddress.ip_network(c) for c in options.allow]
        self.deny: list[Network] = [ipaddress.ip_network(c) for c in options.deny]
        self.decisions: dict[bytes, bool] = {}
        self.trusted: Any = None
        self.outcomes = Outcomes()

    def bind(self, services: Services, route: CompiledRoute) -> None:
        self.trusted = services.trusted
        self.outcomes.bind(services, route.name, self.type)

    def on_request(self, ctx: Context) -> Response | Pending | None:
        ip = client_address(ctx, self.trusted)
        allowed = self.decisions.get(ip)
        if allowed is None:
            allowed = self.decide(ip)[0]
            if len(self.decisions) < REMEMBERED:
                self.decisions[ip] = allowed
        if allowed:
            self.outcomes.count(outcome.OK)
            return None
        self.outcomes.count(outcome.DENIED)
        return forbidden(ctx)

    def decide(self, ip: bytes) -> tuple[bool, str]:
        """(allowed, why) for an address."""
        try:
            addr = ipaddress.ip_address(ip.decode("latin-1"))
        except ValueError:
            return False, "not an IP address"
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        for network in self.deny:
            if addr in network:
                return False, f"in deny {network}"
        if not self.allow:
            return True, "in no deny network"
        for network in self.allow:
            if addr in network:
                return True, f"in allow {network}"
        return False, "in no allow network"

    def explain(self, ctx: Context, trusted: Any) -> str:
        ip = client_address(ctx, trusted)
        allowed, why = self.decide(ip)
        return f"{'passes' if allowed else '403'}: client {ip.decode('latin-1')} {why}"
