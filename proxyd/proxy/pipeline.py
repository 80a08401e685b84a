"""Everything a worker needs to serve, built from one config after fork.

A reload never edits a Pipeline: the new generation of workers builds its own.
"""

from __future__ import annotations

import asyncio
import itertools
import os

from proxyd.config.models import GatewayConfig, Respond
from proxyd.proxy.headers import TrustedProxies
from proxyd.proxy.resolver import Resolver
from proxyd.proxy.router import DirectResponse, Router
from proxyd.proxy.timers import Deadlines
from proxyd.proxy.upstream import UpstreamPool


class Pipeline:
    def __init__(self, config: GatewayConfig, loop: asyncio.AbstractEventLoop) -> None:
        server = config.server
        limits = server.limits
        self.config = config
        self.loop = loop
        self.router = Router(config.routes)
        self.max_body_size = limits.max_body_size
        self.max_header_size = limits.max_header_size
        self.max_uri_size = limits.max_uri_size
        self.max_headers = limits.max_headers
        # Request line + header section, raw: the URI and field limits plus the fixed parts.
        self.max_head_bytes = limits.max_uri_size + limits.max_header_size + 64
        self.header_timeout = limits.header_timeout
        self.keepalive_timeout = server.keepalive_timeout
        self.trusted = TrustedProxies(server.trusted_proxies)
        pool_timeouts = [u.pool.read_timeout for u in config.upstreams.values()]
        self.deadlines = Deadlines(
            loop,
            Deadlines.tick_for(self.header_timeout, self.keepalive_timeout, *pool_timeouts),
        )
        resolver = Resolver()
        self.pools = {
            name: UpstreamPool(name, cfg, self.deadlines, resolver)
            for name, cfg in config.upstreams.items()
        }
        self.draining = False
        # Kubernetes probes on the traffic port; they win over routes with the same path.
        json_type = {"Content-Type": "application/json"}
        self.health = DirectResponse(Respond(body='{"status":"ok"}', headers=json_type))
        self.ready = DirectResponse(Respond(body='{"ready":true}', headers=json_type))
        self.not_ready = DirectResponse(
            Respond(status=503, body='{"ready":false,"state":"draining"}', headers=json_type)
        )
        self.connections: set[object] = set()
        self.requests = 0
        # Request ids: a per-process random prefix and a counter — unique without a syscall
        # or uuid4 per request.
        self._id_prefix = os.urandom(4).hex()
        self._ids = itertools.count(1)

    def builtin(self, path: bytes) -> DirectResponse | None:
        if path == b"/health":
            return self.health
        if path == b"/health/ready":
            return self.not_ready if self.draining else self.ready
        return None

    def next_request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids):x}"

    def start(self) -> None:
        self.deadlines.start()

    def close(self) -> None:
        self.deadlines.stop()
        for pool in self.pools.values():
            pool.close()
