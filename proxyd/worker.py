"""A worker: serve one config on inherited listening sockets until told to drain.

``serve`` is the whole life of a worker after fork, run by ``child_main`` on the child's own
loop. ``run_single`` runs one in the foreground without a master (development, tests of the
data plane).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import uvloop

from proxyd.config.models import GatewayConfig
from proxyd.control import Channel
from proxyd.fdlimit import ExhaustionWatch
from proxyd.listener_tls import Handshakes, server_context
from proxyd.proxy.connection import ClientConnection
from proxyd.proxy.field_rules import TrustedProxies
from proxyd.proxy.h2_connection import Http2Connection
from proxyd.proxy.pipeline import Pipeline
from proxyd.proxy.proxy_protocol import ListenerPolicy, TLSGate, refused
from proxyd.sockets import listen_socket

log = logging.getLogger("proxyd.worker")
STATS_INTERVAL = 1.0  # seconds between stats pushes to the master; each is also a heartbeat
ACCEPT_SETTLE = 0.01  # seconds for connections accepted before close() to reach the protocol


class Worker:
    """The serving side of one process: servers on its sockets, and its drain."""

    def __init__(self, config: GatewayConfig, sockets: Sequence[socket.socket]) -> None:
        self.config = config
        self.sockets = list(sockets)
        self.pipeline: Pipeline | None = None
        self.servers: list[asyncio.AbstractServer | TLSGate] = []
        # Per socket, what its server makes of a connection: for the queue left at drain.
        self.accepting: list[tuple[socket.socket, Callable[[], ClientConnection],
                                   ssl.SSLContext | None, TLSGate | None]] = []
        self.gates: list[TLSGate] = []
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        pipeline = self.pipeline = Pipeline(self.config, loop)
        pipeline.start()

        def factory_for(tls: bool, proxy: ListenerPolicy | None, client_certs: bool,
                        http2: bool) -> Callable[[], ClientConnection]:
            def factory() -> ClientConnection:
                return ClientConnection(pipeline, tls, proxy, client_certs, http2)
            return factory

        listeners = self.config.server.listen  # in the order of the sockets (for_slot)
        for index, sock in enumerate(self.sockets):
            listener = listeners[index] if index < len(listeners) else None
            tls = getattr(listener, "tls", None)
            proxy = (ListenerPolicy(TrustedProxies(getattr(listener, "proxy_protocol_from", ())))
                     if getattr(listener, "proxy_protocol", False) else None)
            # One context per TLS listener, loaded here after fork: a reload's new workers
            # read the certificate files as they are now.
            http2 = getattr(listener, "http2", True)
            ctx = server_context(tls, http2) if tls is not None else None
            make = factory_for(ctx is not None, proxy if ctx is None else None, tls is not None
                               and tls.client_ca is not None and tls.client_cert_headers, http2)
            if ctx is not None:
                # The gate accepts, so that it sees how each handshake ends (a server's own
                # accept path reports a failed one nowhere); with the PROXY protocol, the
                # header that precedes the handshake is taken off the socket first.
                gate = TLSGate(loop, sock, make, ctx, proxy,
                               self.config.server.limits.header_timeout,
                               lambda ip, why: refused(pipeline.metrics, ip, why),
                               Handshakes(pipeline.metrics, str(listener)))
                sock.listen(self.config.server.backlog)
                gate.start()
                self.gates.append(gate)
                self.servers.append(gate)
                self.accepting.append((sock, make, ctx, gate))
                continue
            # asyncio re-listens on a passed socket; without backlog it would shrink to 100.
            server = await loop.create_server(  # duck-typed protocol
                make, sock=sock,  # type: ignore[arg-type]
                backlog=self.config.server.backlog,
            )
            self.servers.append(server)
            self.accepting.append((sock, make, ctx, None))

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish, close keep-alives, then stop."""
        pipeline = self.pipeline
        assert pipeline is not None
        timeout = self.config.server.drain_timeout if timeout is None else timeout
        # A copy of each socket outlives its server, to take what is queued on it (below).
        # (None left on a second drain: closing a server detached its socket.)
        spares = [(sock.dup(), make, ctx, gate) for sock, make, ctx, gate in self.accepting
                  if sock.fileno() >= 0]
        for server in self.servers:
            server.close()  # close() only: shutdown() would kill the socket for every process
        pipeline.draining = True
        for conn in list(pipeline.connections):
            if isinstance(conn, Http2Connection):
                conn.go_away()  # GOAWAY: the streams taken finish, no new ones
        # A connection accepted just before close() gets connection_made only on a later loop
        # iteration; take stock after those arrived, or the worker exits under them (a reset).
        await asyncio.sleep(ACCEPT_SETTLE)
        handshakes = self._accept_queued(spares)
        # Nothing is cut short: every connection ends as it would have anyway. One that has
        # begun a request, or was accepted and has sent nothing yet, is served to the end of
        # that request (within its header and body deadlines), with Connection: close. An
        # idle keep-alive connection keeps its keep-alive deadline: a request may be on its
        # way on it at any moment, and closing it now would lose that request; it is
        # answered with Connection: close too. (Only its client's silence ends it early.)
        for tunnel in list(pipeline.tunnels):
            if tunnel.on_reload == "close":
                tunnel.close()  # 1001 Going Away now; "keep" relays live on until the deadline
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (pipeline.connections or any(not h.done() for h in handshakes)
               or any(gate.busy() for gate in self.gates)) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for handshake in handshakes:
            handshake.cancel()
        for tunnel in list(pipeline.tunnels):
            tunnel.close()
        for conn in list(pipeline.connections):
            if isinstance(conn, (ClientConnection, Http2Connection)):
                conn.close()  # past drain_timeout: what is still open is cut
        pipeline.close()
        self.stopped.set()


    def _accept_queued(self, spares: list[tuple[socket.socket, Callable[[], ClientConnection],
                                                ssl.SSLContext | None, TLSGate | None]]
                       ) -> list[asyncio.Task[object]]:
        """Accept what waits in the sockets' queues, then let go of them.

        When the master has retired a socket (its slot or listener is gone), this worker
        holds its last descriptor, and closing that would reset every connection still
        queued on it. So the queue is emptied first; the connections are served like those
        accepted before the drain (one request each, with Connection: close). A socket still
        in use is shared with this worker's successor: what this takes is what the successor
        would have served.
        """
        loop = asyncio.get_running_loop()
        timeout = self.config.server.limits.header_timeout or None
        handshakes: list[asyncio.Task[object]] = []
        for spare, make, ctx, gate in spares:
            with spare:
                spare.setblocking(False)
                while True:
                    try:
                        conn, addr = spare.accept()
                    except OSError:
                        break  # empty (EAGAIN), or out of descriptors: the rest stays queued
                    if gate is not None:
                        gate.admit(conn, addr[0])  # its PROXY header first, as any other
                        continue
                    conn.setblocking(False)
                    handshakes.append(loop.create_task(loop.connect_accepted_socket(
                        make, conn, ssl=ctx,  # type: ignore[type-var]  # duck-typed protocol
                        ssl_handshake_timeout=timeout if ctx is not None else None)))
        return handshakes


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


# -- life of a forked worker ------------------------------------------------------------------

def prepare_child(keep_fds: set[int]) -> None:
    """First thing after fork: forget the master's loop, signal handlers and descriptors.

    The master forks from inside its running event loop. The child never returns into that
    loop: it drops the running-loop marker, freezes the inherited objects (so no garbage
    collection of a master object can close a descriptor number the child has reused) and
    closes every descriptor except stdio, its control socket and its slot's sockets.
    """
    import gc

    gc.freeze()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    keep = {0, 1, 2, *keep_fds}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    asyncio.events._set_running_loop(None)


def child_main(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` (``serve``) on a new uvloop loop, the child's only one; its exit code."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


async def serve(
    config: GatewayConfig,
    sockets: Sequence[socket.socket],
    control: socket.socket,
    *,
    slot: int,
    generation: int,
    max_requests: int,
) -> int:
    loop = asyncio.get_running_loop()
    channel = await Channel.open(control)
    worker = Worker(config, sockets)
    await worker.start()
    pipeline = worker.pipeline
    assert pipeline is not None
    if config.cache.backend == "memory":
        # Each worker has its own store: what an unsafe request invalidates here must go
        # from the others' too (RFC 9111 §4.4); the master passes it on. The keys of one
        # turn of the loop go in one message, however many requests it answered.
        invalidated: list[str] = []

        def send_invalidated() -> None:
            keys = list(dict.fromkeys(invalidated))
            invalidated.clear()
            channel.send({"type": "invalidate", "keys": keys})

        def invalidate(keys: list[str]) -> None:
            if not invalidated:
                loop.call_soon(send_invalidated)
            invalidated.extend(keys)

        pipeline.cache.invalidated = invalidate
    drain = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, drain.set)
    loop.add_signal_handler(signal.SIGQUIT, os._exit, 0)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN,
                signal.SIGTTOU):
        loop.add_signal_handler(sig, lambda: None)  # the master decides; a terminal's ^C too

    def stats() -> dict[str, object]:
        store = pipeline.cache.store
        return {"type": "stats", "requests": pipeline.requests,
                "connections": len(pipeline.connections),
                "cache": {"entries": len(store), "bytes": store.bytes},
                "ejected": [[name, t.url] for name, pool in pipeline.pools.items()
                            for t in pool.targets if t.ejected_until > pipeline.deadlines.now],
                "metrics": pipeline.metrics.snapshot(pipeline.gauges())}

    channel.send({"type": "ready", "pid": os.getpid(), "slot": slot, "generation": generation})

    async def purge(message: dict[str, Any]) -> None:
        """Purge, then tell the master how many entries went (admin DELETE /cache)."""
        removed, deferred = await pipeline.cache.purge(message.get("key"), message.get("prefix"),
                                                 bool(message.get("shared", True)))
        channel.send({"type": "purged", "id": message.get("id"), "removed": removed,
                      "deferred": deferred})

    async def listen() -> None:
        while True:
            message = await channel.receive()
            if message is None or message.get("type") == "drain":
                drain.set()  # master gone or asked: either way, finish and leave
                return
            kind = message.get("type")
            if kind == "reopen" and pipeline.access_log is not None:
                pipeline.access_log.reopen()
            elif kind == "purge":
                pipeline.spawn(purge(message))
            elif kind == "invalidate":  # a sibling's invalidation (memory stores)
                for key in message.get("keys", []):
                    pipeline.cache.store.delete(key)
            elif kind == "health":
                pipeline.set_health(message.get("upstreams", {}))
            elif kind == "workers":
                pipeline.set_workers(int(message.get("count", 0)))

    fds = ExhaustionWatch(lambda: pipeline.metrics.fd_exhausted.inc(()))

    async def report() -> None:
        retired = False
        failed = False
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            fds.check()  # here, off the request path: libuv hides the accepts it fails
            # The push is also the heartbeat (the master replaces a worker silent for a few
            # intervals): a fault in gathering the stats must not stop it.
            try:
                message = stats()
            except Exception:
                if not failed:
                    log.exception("cannot gather stats; sending heartbeats only")
                failed = True
                message = {"type": "heartbeat"}
            channel.send(message)
            if max_requests and not retired and pipeline.requests >= max_requests:
                retired = True
                channel.send({"type": "retire"})

    tasks = [loop.create_task(listen()), loop.create_task(report())]
    await drain.wait()
    tasks[1].cancel()
    await worker.drain()
    await channel.send_and_flush({**stats(), "final": True})
    for task in tasks:
        task.cancel()
    channel.close()
    return 0
