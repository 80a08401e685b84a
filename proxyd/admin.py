"""The admin HTTP server, inside the master: health, readiness, status, reload.

aiohttp is right here: nothing on this port is hot, and the master's state is read in-process,
through the narrow ``MasterApi`` (master_api.py), never the master's internals.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
from typing import TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxyd.config.models import Admin
from proxyd.config.redact import redact_value
from proxyd.master_api import MasterApi, ReloadResult, UpgradeResult

T = TypeVar("T")


def admin_socket(config: Admin, inherited: socket.socket | None = None) -> socket.socket:
    """A listening socket for the admin port: ``inherited`` (a code upgrade's predecessor's)
    while it is bound to ``config.listen``, else a new one."""
    listen = config.listen
    if inherited is not None:
        if inherited.getsockname()[:2] == (listen.host, listen.port):
            return inherited
        inherited.close()
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


class AdminServer:
    def __init__(self, master: MasterApi) -> None:
        self.master = master
        self.config: Admin | None = None
        self.runner: web.AppRunner | None = None
        self.site: web.SockSite | None = None
        # The admin port's listening socket, made here rather than by aiohttp: a code upgrade
        # hands it to the new master (upgrade.py), so the port never refuses a connection.
        self.socket: socket.socket | None = None
        # Callers of POST /reload waiting for its result: answered at stop if still waiting,
        # or stopping would wait for their handlers (aiohttp's shutdown grace, 60 s).
        self._waiting: set[asyncio.Future[ReloadResult]] = set()
        self._upgrading: set[asyncio.Future[UpgradeResult]] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/ready", self.ready)
        app.router.add_get("/status", self.status)
        app.router.add_post("/reload", self.reload)
        app.router.add_post("/upgrade", self.upgrade)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/config", self.running_config)
        app.router.add_delete("/cache", self.purge)
        return app

    async def start(self, config: Admin, sock: socket.socket | None = None) -> None:
        """Listen on ``config.listen``, or serve ``sock`` (an upgrade's successor got it from
        ``admin_socket`` before its predecessor let go)."""
        self.config = config
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        await self._listen(config, sock)

    async def _listen(self, config: Admin, sock: socket.socket | None = None) -> None:
        assert self.runner is not None
        if sock is None:
            sock = admin_socket(config)
        site = web.SockSite(self.runner, sock)
        await site.start()
        self.site, self.socket = site, sock

    async def reconfigure(self, config: Admin) -> None:
        """A reload may move the admin port: listen on the new one, then leave the old."""
        old_config, old_site = self.config, self.site
        self.config = config
        if old_config is not None and old_config.listen == config.listen:
            return
        await self._listen(config)
        if old_site is not None:
            await old_site.stop()

    async def stop(self) -> None:
        for upgrade in self._upgrading:
            if not upgrade.done():
                upgrade.set_result(UpgradeResult(False, "proxyd is shutting down"))
        for reply in self._waiting:
            if not reply.done():
                reply.set_result(ReloadResult(
                    False, "proxyd is shutting down; the reload was abandoned",
                    self.master.generation))
        if self.runner is not None:
            await self.runner.cleanup()

    def _authorized(self, request: web.Request) -> bool:
        token = self.config.token if self.config else ""
        if not token:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.master.is_ready()
        return web.json_response({"ready": ok, "state": self.master.state},
                                 status=200 if ok else 503)

    def _refused(self, request: web.Request) -> web.Response | None:
        """401 unless the request carries the admin token (when one is set)."""
        if self._authorized(request):
            return None
        return web.json_response({"error": "unauthorized"}, status=401,
                                 headers={"WWW-Authenticate": "Bearer"})

    def _read_refused(self, request: web.Request) -> web.Response | None:
        """For what only reads: refused only with protect_reads."""
        if self.config is not None and self.config.protect_reads:
            return self._refused(request)
        return None

    @staticmethod
    async def _result(reply: asyncio.Future[T], waiting: set[asyncio.Future[T]]) -> T:
        """``reply``'s result, held in ``waiting`` meanwhile so that stop() can answer it."""
        waiting.add(reply)
        try:
            return await reply
        finally:
            waiting.discard(reply)

    async def status(self, request: web.Request) -> web.Response:
        # Redacted as a safety net: nothing in it should quote a secret (a reload error names
        # keys, not values), and nothing ever will.
        return self._read_refused(request) or web.json_response(
            redact_value(self.master.status(), self.master.config))

    async def reload(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        reply = self.master.request_reload()
        if request.query.get("wait", "1") in ("0", "false", "no"):
            return web.json_response({"accepted": True}, status=202)
        result = await self._result(reply, self._waiting)
        return web.json_response(
            {"ok": result.ok, "error": result.error, "generation": result.generation,
             "changes": result.changes if result.ok else None},
            status=200 if result.ok else 422,
        )

    async def upgrade(self, request: web.Request) -> web.Response:
        """POST /upgrade: a new master from the installed code takes over; answered once it
        serves (200) or has failed and this one serves on (422)."""
        if (refused := self._refused(request)) is not None:
            return refused
        result = await self._result(self.master.request_upgrade(), self._upgrading)
        return web.json_response(
            {"ok": result.ok, "error": result.error, "pid": result.pid,
             "version": result.version}, status=200 if result.ok else 422)

    async def running_config(self, request: web.Request) -> web.Response:
        """The configuration being served, secrets masked (``check-config --diff``). It says
        more than /status (addresses, paths, middleware): with a token set, it asks for it
        whether or not protect_reads is on."""
        if (refused := self._refused(request)) is not None:
            return refused
        from proxyd.config.diff import comparable

        config = self.master.config
        return web.json_response({"path": self.master.config_path, "sha256": self.master.sha256,
                                  "generation": self.master.generation,
                                  "config": comparable(config)})

    async def metrics(self, request: web.Request) -> web.Response:
        if (refused := self._read_refused(request)) is not None:
            return refused
        body = self.master.metrics_text()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def purge(self, request: web.Request) -> web.Response:
        """DELETE /cache?key=...|prefix=...: every worker's store, and Redis when shared;
        answers {"purged": entries removed, "workers", "answered", "deferred", ...}."""
        if (refused := self._refused(request)) is not None:
            return refused
        key, prefix = request.query.get("key"), request.query.get("prefix")
        if not key and not prefix:
            return web.json_response({"error": "give key= or prefix="}, status=400)
        # How many entries went: summed over the workers' stores (memory), or what Redis
        # removed; workers that do not answer in time are left out, and say so.
        result = await self.master.purge(key, prefix)
        return web.json_response({**result, "key": key, "prefix": prefix})
