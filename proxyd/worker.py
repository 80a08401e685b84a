"""A worker: serve one config on inherited listening sockets until told to drain.

``serve`` is the whole life of a worker after fork. ``run_single`` runs one in the foreground
without a master (development, tests of the data plane).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Sequence

import uvloop

from proxyd.config.models import GatewayConfig
from proxyd.proxy.downstream import DownstreamProtocol
from proxyd.proxy.pipeline import Pipeline

log = logging.getLogger("proxyd.worker")


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket that joins the SO_REUSEPORT group of its address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Worker:
    """The serving side of one process: servers on its sockets, and its drain."""

    def __init__(self, config: GatewayConfig, sockets: Sequence[socket.socket]) -> None:
        self.config = config
        self.sockets = list(sockets)
        self.pipeline: Pipeline | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        pipeline = self.pipeline = Pipeline(self.config, loop)
        pipeline.start()

        def factory() -> DownstreamProtocol:
            return DownstreamProtocol(pipeline)

        for sock in self.sockets:
            # asyncio re-listens on a passed socket; without backlog it would shrink to 100.
            server = await loop.create_server(
                factory, sock=sock, backlog=self.config.server.backlog
            )
            self.servers.append(server)

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish, close keep-alives, then stop."""
        pipeline = self.pipeline
        assert pipeline is not None
        timeout = self.config.server.drain_timeout if timeout is None else timeout
        for server in self.servers:
            server.close()  # close() only: shutdown() would kill the socket for every process
        pipeline.draining = True
        for conn in list(pipeline.connections):
            if isinstance(conn, DownstreamProtocol) and conn.active is None and conn.req is None:
                conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while pipeline.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(pipeline.connections):
            if isinstance(conn, DownstreamProtocol):
                conn.close()
        pipeline.close()
        self.stopped.set()


def run_single(config: GatewayConfig, config_path: str | None = None,
               on_ready: Callable[[], None] | None = None) -> None:
    """Serve in this process (no master, no reload) until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sockets = [listen_socket(a.host, a.port, config.server.backlog) for a in config.server.listen]

    async def main() -> None:
        worker = Worker(config, sockets)
        await worker.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        addrs = ", ".join(str(a) for a in config.server.listen)
        log.info("proxyd serving on %s (single process, config %s)", addrs, config_path)
        if on_ready is not None:
            on_ready()
        await stop.wait()
        await worker.drain()

    uvloop.run(main())
