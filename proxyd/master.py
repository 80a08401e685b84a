"""The master: what it does on each signal and event that it dispatches to ``handle_<name>()``.

Reload (SIGHUP, POST /reload, watch_config), worker recycling (``max_requests``), crash
recovery, resizing (TTIN/TTOU), log reopening (USR1) and shutdown (TERM drains, INT and QUIT
stop at once). Reload, recycling and crash recovery share one path (``replace``): fork the
successor on the same slot, wait for its READY, then tell the predecessor to drain;
a reload that fails changes nothing, and every reload ends in ``/status``, the reload metric, the
log and the caller's answer, whatever it failed on. The new file is read in a child process
(config/isolated.py), never on the master's loop. Forking, following and replacing workers, and
the loop that dispatches to these handlers, are the Arbiter's (arbiter.py). The protocol as a
whole: docs/architecture.md, "Reload, recycling and crash recovery".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from proxyd import systemd
from proxyd.arbiter import (
    KILL_GRACE,
    READY_TIMEOUT,
    SIGNALS,
    Arbiter,
    WorkerHandle,
)
from proxyd.config.diff import config_diff, describe
from proxyd.config.isolated import load_isolated
from proxyd.config.models import GatewayConfig
from proxyd.cpus import worker_choice
from proxyd.errors import ConfigError
from proxyd.fdlimit import raise_nofile_limit
from proxyd.runtime import remove_state, write_state

__all__ = ["KILL_GRACE", "READY_TIMEOUT", "SIGNALS", "Master", "WorkerHandle",
           "raise_nofile_limit", "run_master"]

log = logging.getLogger("proxyd.master")


class Master(Arbiter):
    """The arbiter with its handlers: one ``handle_<name>()`` per signal or event."""

    _changes: dict[str, Any] | None = None  # what the reload in progress changed, once done

    # -- signal and event handlers ----------------------------------------------------------
    def handle_hup(self) -> None:
        self._spawn_task(self.reload())

    def handle_reload(self, reply: asyncio.Future[tuple[bool, str | None]]) -> None:
        """POST /reload: the same path as SIGHUP, with the result for the caller."""

        async def run() -> None:
            result: tuple[bool, str | None] = (False, "the reload was interrupted")
            try:
                result = await self.reload()
            finally:  # cancelled by shutdown: the caller still gets an answer
                if not reply.done():
                    reply.set_result(result)

        self._spawn_task(run())

    async def reload(self) -> tuple[bool, str | None]:
        async with self._reload_lock:
            error: str | None
            if self.state != "running":
                ok, error = False, f"not reloading while {self.state}"
            else:
                systemd.reloading()
                try:
                    ok, error = await self._reload()
                except Exception as exc:
                    # A bug, not a bad file; still a failed reload like any other, reported
                    # everywhere a failure is (the traceback goes to the log).
                    log.exception("reload failed unexpectedly")
                    ok, error = False, f"reload failed: {type(exc).__name__}: {exc}"
                finally:
                    systemd.notify("READY=1", self._status_line())
            changes, self._changes = self._changes, None
            self.last_reload = {"ok": ok, "error": error, "at": time.time(),
                                "changes": changes}
            self.reload_counts["ok" if ok else "failed"] += 1
            self.metrics.master_counters["gateway_config_reloads_total"][
                ("ok" if ok else "failed",)] = float(self.reload_counts["ok" if ok else "failed"])
            if ok:
                self.metrics.master_gauges[
                    "gateway_config_last_reload_success_timestamp_seconds"] = time.time()
            if ok:
                log.info("reload complete: generation %d: %s", self.generation,
                         describe(changes) if changes is not None else "no changes")
            else:
                log.error("reload failed, old configuration keeps serving: %s", error)
            return ok, error

    async def _reload(self) -> tuple[bool, str | None]:
        try:
            # In a child: a file that takes long or much to read costs the master nothing.
            # Its TLS files are checked there too, before any new worker is forked.
            loaded = await load_isolated(self.config_path)
        except ConfigError as exc:
            return False, str(exc)
        if self.state != "running":
            return False, f"not reloading while {self.state}"  # TERM arrived meanwhile
        config, sha256 = loaded.config, loaded.sha256
        count, reason = worker_choice(config.server.workers)
        try:
            self.sockets.ensure(config.server.listen, count, config.server.backlog)
        except OSError as exc:
            return False, f"cannot listen: {exc}"
        generation = self.generation + 1
        new = [self.spawn(slot, config, generation) for slot in range(count)]
        if not await self.wait_ready(new, READY_TIMEOUT):
            for handle in new:
                self._abandon(handle)
            self._close_unused_sockets()
            return False, "new workers did not become ready; old generation kept"
        old = [w for w in self.live() if w.generation < generation]
        self._changes = config_diff(self.config, config)
        self.config, self.sha256, self.generation = config, sha256, generation
        self.worker_count, self.loaded_at = count, time.time()
        self.workers_reason = reason
        if self.admin is not None:
            await self.admin.reconfigure(config.admin)
        write_state(self.config_path, str(config.admin.listen))  # the admin port may move
        if self.health is not None:
            self.health.configure(config)
            self.push_health()
        for handle in old:
            self.drain(handle)
        self._close_unused_sockets()
        return True, None

    def _close_unused_sockets(self) -> None:
        """Let go of sockets no serving worker needs, at once, not when their drainers exit.

        A draining worker still holds its copy until it stops accepting; that close is then
        the last, and the socket leaves the SO_REUSEPORT group right away. Kept open here, it
        would stay in the group, taking its share of new connections with nobody accepting,
        then reset them all when the drainer exits.
        """
        wanted = {(listener, slot) for listener in self.config.server.listen
                  for slot in range(self.worker_count)}
        for handle in self.workers.values():
            if handle.state != "draining":
                wanted |= {(listener, handle.slot) for listener in handle.config.server.listen}
        for listener, slot in self.sockets.close_unused(wanted):
            log.info("closed listener %s slot %d", listener, slot)

    def handle_retire(self, handle: WorkerHandle) -> None:
        if handle.state == "ready" and self.state == "running" and handle.pid in self.workers:
            log.info("worker %d served %d requests; recycling", handle.pid, handle.requests)
            self._spawn_task(self.replace(handle.slot, handle))

    def handle_chld(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self.workers.pop(pid, None)
            if handle is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if not handle.exited.done():
                handle.exited.set_result(code)
            if not handle.ready.done():
                handle.ready.set_result(False)
            if handle.state == "draining" or self.state != "running":
                log.info("worker %d exited (%d)", pid, code)
                continue
            self.worker_restarts += 1
            self.metrics.master_counters["gateway_worker_restarts_total"][()] = float(
                self.worker_restarts)
            log.error("worker %d (slot %d) died unexpectedly: %s", pid, handle.slot,
                      f"exit {code}" if code >= 0 else signal.Signals(-code).name)
            if handle.generation == self.generation and handle.slot < self.worker_count:
                self._spawn_task(self._respawn(handle.slot))

    async def _respawn(self, slot: int) -> None:
        """Crash recovery: immediate the first time, backing off when a slot keeps dying."""
        now = time.monotonic()
        recent = [t for t in self.crashes.get(slot, []) if now - t < 60] + [now]
        self.crashes[slot] = recent
        delay = 0.0 if len(recent) <= 1 else min(30.0, 0.1 * 2 ** (len(recent) - 2))
        if delay:
            log.warning("slot %d crashed %d times in a minute; respawning in %.1fs",
                        slot, len(recent), delay)
            await asyncio.sleep(delay)
        if self.state != "running" or any(w.slot == slot for w in self.live(self.generation)):
            return  # shutting down, or the slot was refilled meanwhile (e.g. by a reload)
        if not await self.replace(slot, None):
            self._spawn_task(self._respawn(slot))

    def handle_unresponsive(self, handle: WorkerHandle) -> None:
        """A ready worker sent nothing for HEARTBEAT_TIMEOUT (stopped, or its loop blocked)."""
        if handle.state != "ready" or handle.pid not in self.workers:
            return  # it spoke, began draining or exited since the check
        handle.state = "unresponsive"  # not ready: /health/ready answers 503 until replaced
        self.workers_unresponsive += 1
        self.metrics.master_counters["gateway_worker_unresponsive_total"][()] = float(
            self.workers_unresponsive)
        silent = time.monotonic() - handle.heard_at
        if (self.state == "running" and handle.generation == self.generation
                and handle.slot < self.worker_count):
            log.error("worker %d (slot %d) has sent nothing for %.1fs; replacing it",
                      handle.pid, handle.slot, silent)
            self._spawn_task(self._replace_unresponsive(handle))
        else:  # its slot is gone or already taken over (a reload, a resize): only kill it
            log.error("worker %d (slot %d) has sent nothing for %.1fs; killing it",
                      handle.pid, handle.slot, silent)
            self.drain(handle)

    async def _replace_unresponsive(self, handle: WorkerHandle) -> None:
        """Try until a successor is READY (``replace`` then kills the silent worker, or drains
        it if it answered meanwhile); called off when it answers before one could start, or
        when shutdown, a reload or a resize has taken its slot over."""

        def called_off() -> bool:
            if handle.state == "ready":
                log.info("worker %d answers again: no successor for it", handle.pid)
                return True
            return (handle.state != "unresponsive" or self.state != "running"
                    or handle.generation != self.generation)

        delay = 0.1
        while not called_off():
            # One successor at a time per slot: recycling or crash recovery (if it died
            # meanwhile) may have one starting already; its READY ends this too.
            mates = [w for w in self.live(self.generation)
                     if w.slot == handle.slot and w is not handle]
            if mates:
                if await self.wait_ready(mates, READY_TIMEOUT):
                    self.drain(handle)
                    return
            elif await self.replace(handle.slot, handle):
                return
            if called_off():
                return
            log.warning("slot %d has no responsive worker; trying again in %.1fs",
                        handle.slot, delay)
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)

    def handle_ttin(self) -> None:
        self._spawn_task(self._resize(self.worker_count + 1))

    def handle_ttou(self) -> None:
        if self.worker_count > 1:
            self._spawn_task(self._resize(self.worker_count - 1))

    async def _resize(self, count: int) -> None:
        async with self._reload_lock:
            server = self.config.server
            old_count, self.worker_count = self.worker_count, count
            self.workers_reason = f"resized from {old_count} by a signal"
            if count > old_count:
                self.sockets.ensure(server.listen, count, server.backlog)
                for slot in range(old_count, count):
                    await self.replace(slot, None)
            else:
                leaving = [w for w in self.live() if w.slot >= count]
                for handle in leaving:
                    self.drain(handle)
                self._close_unused_sockets()
            # Every live worker's share of what they share (memory rate limits) follows.
            self.broadcast({"type": "workers", "count": count})
            log.info("worker count %d → %d", old_count, count)

    def handle_usr1(self) -> None:
        for handle in self.workers.values():
            if handle.channel is not None:
                handle.channel.send({"type": "reopen"})
        log.info("reopening log files")

    async def handle_term(self) -> None:
        if self.state == "stopping":
            self.handle_quit()  # a second TERM: stop now
            return
        self.state = "stopping"
        systemd.notify("STOPPING=1")
        log.info("graceful shutdown: draining %d workers", len(self.workers))
        handles = list(self.workers.values())
        for handle in handles:
            self.drain(handle)
        # Each worker's close is then the last: the port refuses new connections as soon as
        # the workers stop accepting, instead of queueing them until the drain ends, then
        # resetting them.
        self.sockets.close_all()
        if handles:
            await asyncio.wait([h.exited for h in handles])
        await self._shutdown()

    def handle_int(self) -> None:
        self.handle_quit()

    def handle_quit(self) -> None:
        self.state = "stopping"
        systemd.notify("STOPPING=1")
        for handle in self.workers.values():
            self._kill(handle, signal.SIGQUIT)
        self._spawn_task(self._quit_after_exit())

    async def _quit_after_exit(self) -> None:
        handles = [h for h in self.workers.values() if not h.exited.done()]
        if handles:
            _, _pending = await asyncio.wait([h.exited for h in handles], timeout=2.0)
            for handle in handles:
                if not handle.exited.done():
                    self._kill(handle, signal.SIGKILL)
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._shutting_down:
            return  # TERM then QUIT both end here; the admin runner cleans up once
        self._shutting_down = True
        if self.admin is not None:
            await self.admin.stop()
        if self.health is not None:
            await self.health.close()
        self.sockets.close_all()
        remove_state(self.config_path)
        log.info("proxyd stopped")
        self._stopped.set()


def run_master(config_path: str, config: GatewayConfig) -> int:
    import uvloop

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s proxyd[%(process)d] %(levelname)s %(message)s")
    sha256 = hashlib.sha256(Path(config_path).read_bytes()).hexdigest()

    async def main() -> int:
        master = Master(config_path, config, sha256)
        return await master.run()

    return uvloop.run(main())
