"""The master: owns the config, the listening sockets and the workers; never serves traffic.

Signal handlers and the other sources of events (worker messages, the admin port, the config
watcher, the supervision tick) only put an event on one queue; ``_dispatch`` takes them one at a
time. What workers should exist is decided in one place, ``reconcile`` (the plan is
reconcile.py's), so reload, recycling, crash recovery, silent workers and resizing all end the
same way: a slot's successor is started, and its predecessor drains once the successor is
READY. Each worker process is a ``WorkerProcess`` (worker_process.py). A reload is a
transaction (reload.py): its new generation must all be READY before it is committed. A code
upgrade hands the sockets to a new master (upgrade.py, through ``UpgradeHost``). The protocol
as a whole: docs/architecture.md, "Reload, recycling and crash recovery".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Info, generate_latest

from proxyd import __version__, build, handover, systemd
from proxyd.admin import AdminServer
from proxyd.config.diff import config_diff
from proxyd.config.models import GatewayConfig
from proxyd.cpus import worker_choice
from proxyd.errors import EXIT_RUNTIME
from proxyd.events import SIGNALS, Event, Message, Reload, Retire, Unresponsive, Upgrade
from proxyd.fdlimit import limit_warnings, raise_nofile_limit
from proxyd.master_api import ReloadResult, UpgradeResult, upstreams_status
from proxyd.observe.metrics import MasterMetrics
from proxyd.purge import Purges
from proxyd.reconcile import READY, STARTING
from proxyd.reload import ReloadRecord, new_generation
from proxyd.runtime import remove_pid_file, remove_state, write_pid_file, write_state
from proxyd.shutdown import Shutdown
from proxyd.sockets import SocketSet
from proxyd.upgrade import Upgrades
from proxyd.watch import watch_config
from proxyd.worker_process import (
    HEARTBEAT_TIMEOUT,
    KILL_GRACE,
    READY_TIMEOUT,
    WorkerProcess,
    wait_ready,
)
from proxyd.workers import Desired, WorkerSet

__all__ = ["HEARTBEAT_TIMEOUT", "KILL_GRACE", "READY_TIMEOUT", "SUPERVISE_INTERVAL", "Master",
           "run_master"]

log = logging.getLogger("proxyd.master")

SUPERVISE_INTERVAL = 1.0  # seconds between the master's checks of its children

R = TypeVar("R")


class Master:
    def __init__(self, config_path: str, config: GatewayConfig, sha256: str,
                 pid_file: str | None = None,
                 inheritance: handover.Inheritance | None = None) -> None:
        self.config_path = config_path
        self.pid_file = pid_file
        self.config = config
        self.sha256 = sha256
        self.loaded_at = time.time()
        self.generation = 1
        self.worker_count, self.workers_reason = worker_choice(config.server.workers)
        self.sockets = SocketSet()
        self.workers = WorkerSet(self.sockets, self, self._desired(), SIGNALS)
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.state = "starting"
        self.reloads = ReloadRecord()
        self.purges = Purges()  # admin purges waiting for the workers' counts
        self.exit_code = 0
        self.admin = AdminServer(self)
        self.health: Any = None  # proxyd.proxy.health.HealthChecker, from start()
        self.reload_lock = asyncio.Lock()  # one reload or resize at a time
        self._tasks: set[asyncio.Task[Any]] = set()
        self.shutdown = Shutdown(self, self.workers, self.sockets)
        self.metrics = MasterMetrics()
        self.registry = CollectorRegistry()
        self.registry.register(self.metrics)
        Info("gateway_build", "proxyd build", registry=self.registry).info(
            {"version": __version__})
        # inheritance: set when this master takes over from another (upgrade.py)
        self.upgrades = Upgrades(self, self.registry, inheritance)
        # Whether systemd hears this master: not while it is a successor that has not taken
        # over, nor once it has handed over (systemd would refuse a non-main pid anyway).
        self.notifying = inheritance is None

    def _desired(self) -> Desired:
        return Desired(self.config, self.generation, self.worker_count)

    # -- what the admin port may ask (master_api.MasterApi) -----------------------------------
    def request_reload(self) -> asyncio.Future[ReloadResult]:
        reply: asyncio.Future[ReloadResult] = asyncio.get_running_loop().create_future()
        self.enqueue(Reload(reply))
        return reply

    def request_upgrade(self) -> asyncio.Future[UpgradeResult]:
        reply: asyncio.Future[UpgradeResult] = asyncio.get_running_loop().create_future()
        self.enqueue(Upgrade(reply))
        return reply

    def status(self) -> dict[str, Any]:
        active = self.health.describe() if self.health is not None else {}
        workers = sorted(self.workers, key=lambda w: (w.slot, w.generation))
        return {
            "version": __version__, "build": build(), "pid": os.getpid(), "state": self.state,
            "config": {"path": self.config_path, "sha256": self.sha256},
            "generation": self.generation, "loaded_at": self.loaded_at,
            "last_reload": self.reloads.last, "reloads": self.reloads.counts,
            "upgrades": self.upgrades.history.describe(),
            "worker_count": self.worker_count, "workers_reason": self.workers_reason,
            "worker_restarts": self.workers.restarts,
            "workers_unresponsive": self.workers.unresponsive,
            "workers": [w.describe() for w in workers],
            "listeners": self.sockets.describe(),
            "upstreams": upstreams_status(
                self.config, active, [w for w in self.workers.live() if w.state != STARTING]),
        }

    def is_ready(self) -> bool:
        """Running, and every slot has a current worker that is ready (an unresponsive one
        does not count: the connections its socket takes wait unanswered)."""
        if self.state != "running":
            return False
        ready_slots = {w.slot for w in self.workers.live(self.generation) if w.state == READY}
        return ready_slots >= set(range(self.worker_count))

    async def purge(self, key: str | None, prefix: str | None) -> dict[str, Any]:
        return await self.purges.run(self.workers.live(), key, prefix)

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    # -- what workers tell (worker_process.WorkerEvents) --------------------------------------
    def start_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def worker_ready(self, worker: WorkerProcess) -> None:
        if self.health is not None:
            worker.send(self.health.message())  # what the checks know so far
        # The live count (SIGTTIN/SIGTTOU change it), for what workers share by it; a
        # reload's new generation runs with its config's count, which it has.
        if worker.generation == self.generation:
            worker.send({"type": "workers", "count": self.worker_count})
        self.enqueue(Event.RECONCILE)  # its predecessor may drain now

    def worker_responsive(self, worker: WorkerProcess) -> None:
        self.enqueue(Event.RECONCILE)  # its replacement may be called off

    def worker_message(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "stats":
            if "metrics" in message:
                self.metrics.update(worker.pid, message["metrics"], worker.slot)
        elif kind == "retire":
            self.enqueue(Retire(worker))
        elif kind == "purged":
            self.purges.answered(worker.pid, message)
        elif kind == "invalidate":  # keys one worker's memory cache invalidated
            for other in self.workers.live():
                if other is not worker:
                    other.send(message)

    def worker_gone(self, worker: WorkerProcess) -> None:
        # The channel ends after the worker's final stats: fold its counters into the totals
        # of retired workers, so sums never go backwards across recycling or crashes.
        self.metrics.worker_exited(worker.pid)

    def child_exited(self) -> None:
        self.enqueue(Event.CHLD)

    def other_child_exited(self, pid: int, code: int) -> None:
        self.upgrades.child_exited(pid, code)  # the only other child: a new master

    def reconcile_later(self) -> None:
        self.enqueue(Event.RECONCILE)

    # -- events -------------------------------------------------------------------------------
    def enqueue(self, message: Message) -> None:
        self.queue.put_nowait(message)

    async def _dispatch(self) -> None:
        while True:
            message = await self.queue.get()
            try:
                self._handle(message)
            except Exception:
                log.exception("error handling %s", message)

    def _handle(self, message: Message) -> None:
        match message:
            case Event.RECONCILE:
                self.workers.reconcile()
            case Event.CHLD:
                self.workers.reap()
                self._count_supervision()
                self.workers.reconcile()
            case Event.HUP:
                self.start_task(self.reload())
            case Reload(reply):
                self.start_task(self._answer(reply, self.reload, ReloadResult(
                    False, "the reload was interrupted", self.generation)))
            case Event.USR2:
                self.start_task(self.upgrade())
            case Upgrade(reply):
                self.start_task(self._answer(reply, self.upgrade, UpgradeResult(
                    False, "the upgrade was interrupted")))
            case Retire(worker):
                if (worker.state == READY and self.state == "running"
                        and worker in self.workers.live()):
                    log.info("worker %d served %d requests; recycling", worker.pid,
                             worker.requests)
                    worker.replace_reason = "retire"
                    self.workers.reconcile()
            case Unresponsive(worker):
                self.workers.mark_unresponsive(worker, time.monotonic() - worker.heard_at)
                self._count_supervision()
                self.workers.reconcile()
            case Event.TTIN:
                self.start_task(self._resize(self.worker_count + 1))
            case Event.TTOU:
                if self.worker_count > 1:
                    self.start_task(self._resize(self.worker_count - 1))
            case Event.USR1:
                self.workers.broadcast({"type": "reopen"})
                log.info("reopening log files")
            case Event.TERM if self.state == "upgraded":
                # Already leaving, once its workers have drained; the new master is the
                # service now, and stopping the service is its business.
                log.info("handed over to a new master; leaving once the workers have drained")
            case Event.TERM:
                self.start_task(self.shutdown.terminate())
            case Event.INT | Event.QUIT:
                self.shutdown.quit()

    def _count_supervision(self) -> None:
        counters = self.metrics.master_counters
        counters["gateway_worker_restarts_total"][()] = float(self.workers.restarts)
        counters["gateway_worker_unresponsive_total"][()] = float(self.workers.unresponsive)

    async def _resize(self, count: int) -> None:
        async with self.reload_lock:
            if self.state != "running":
                return
            server = self.config.server
            old_count, self.worker_count = self.worker_count, count
            self.workers_reason = f"resized from {old_count} by a signal"
            self.sockets.ensure(server.listen, count, server.backlog)
            self.workers.desired = self._desired()
            self.workers.reconcile()
            # Every live worker's share of what they share (memory rate limits) follows.
            self.workers.broadcast({"type": "workers", "count": count})
            log.info("worker count %d → %d", old_count, count)

    @staticmethod
    async def _answer(reply: asyncio.Future[R], work: Callable[[], Awaitable[R]],
                      interrupted: R) -> None:
        """``reply`` gets ``work``'s result; cut short by shutdown, ``interrupted``."""
        result = interrupted
        try:
            result = await work()
        finally:  # cancelled by shutdown: the caller still gets an answer
            if not reply.done():
                reply.set_result(result)

    # -- reload -------------------------------------------------------------------------------
    async def reload(self) -> ReloadResult:
        async with self.reload_lock:
            changes: dict[str, Any] | None = None
            error: str | None
            if self.state != "running":
                ok, error = False, f"not reloading while {self.state}"
            else:
                if self.notifying:
                    systemd.reloading()
                try:
                    ok, error, changes = await self._reload()
                except Exception as exc:
                    # A bug, not a bad file; still a failed reload like any other, reported
                    # everywhere a failure is (the traceback goes to the log).
                    log.exception("reload failed unexpectedly")
                    ok, error = False, f"reload failed: {type(exc).__name__}: {exc}"
                finally:
                    self._notify("READY=1", self.status_line())
            self.reloads.record(ok, error, changes, self.metrics, self.generation)
            return ReloadResult(ok, error, self.generation, changes)

    async def _reload(self) -> tuple[bool, str | None, dict[str, Any] | None]:
        new = await new_generation(
            self.config_path, self.generation + 1, self.workers,
            lambda: None if self.state == "running" else self.state)
        if isinstance(new, str):
            return False, new, None
        # Committed: the reconcile step drains the old generation (every slot of the new one
        # is READY) and the sockets no serving worker needs are closed.
        changes = config_diff(self.config, new.config)
        self.config, self.sha256, self.generation = new.config, new.sha256, new.generation
        self.worker_count, self.workers_reason = new.count, new.reason
        self.loaded_at = time.time()
        await self.admin.reconfigure(new.config.admin)
        write_state(self.config_path, str(new.config.admin.listen))  # the admin port may move
        if self.health is not None:
            self.health.configure(new.config)
            self.push_health()
        self.workers.desired = self._desired()
        self.workers.reconcile()
        return True, None, changes

    # -- code upgrade (upgrade.py) ------------------------------------------------------------
    async def upgrade(self) -> UpgradeResult:
        async with self.reload_lock:
            if self.state != "running":
                return UpgradeResult(False, f"not upgrading while {self.state}")
            return await self.upgrades.upgrade()

    def handed_sockets(self) -> tuple[handover.Named, socket.socket | None]:
        return self.sockets.named(), self.admin.socket

    def step_down(self, successor_pid: int) -> None:
        self._notify(f"MAINPID={successor_pid}")
        self.notifying = False
        self.state = "upgraded"
        self.workers.active = False

    async def quiet_admin(self) -> None:
        await self.admin.stop()

    async def serve_admin(self, sock: socket.socket) -> None:
        self.notifying = True
        await self.admin.start(self.config.admin, sock)

    def push_health(self) -> None:
        if self.health is not None:
            self.workers.broadcast(self.health.message())

    # -- start and stop -----------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sig, event in SIGNALS.items():
            loop.add_signal_handler(sig, self.enqueue, event)
        nofile = raise_nofile_limit()
        for warning in limit_warnings(self.config, nofile, self.worker_count):
            log.warning("%s", warning)
        server = self.config.server
        inheriting = self.upgrades.inheritance is not None
        if inheriting:
            await self.upgrades.adopt(self.sockets, server.listen)
        elif self.pid_file:
            write_pid_file(self.pid_file)
        self.sockets.ensure(server.listen, self.worker_count, server.backlog)
        if not inheriting:
            await self.admin.start(self.config.admin)
        from proxyd.proxy.health import HealthChecker

        self.health = HealthChecker(self.push_health)  # active checks: once, here
        self.health.configure(self.config)
        if self.state != "starting":
            return  # TERM, INT or QUIT while starting: already on the way out
        first = [self.workers.spawn(slot, self.config, self.generation)
                 for slot in range(self.worker_count)]
        ready = await wait_ready(first, READY_TIMEOUT)
        if self.state != "starting":
            return  # TERM, INT or QUIT while starting: already on the way out
        if not ready:
            raise RuntimeError("workers failed to start")
        if inheriting:
            await self.upgrades.take_over(self.config.admin)
        self.state = "running"
        self.workers.active = True
        log.info("proxyd %s ready: %d workers (%s), listening on %s (nofile %d)", __version__,
                 self.worker_count, self.workers_reason,
                 ", ".join(str(a) for a in server.listen), nofile)
        write_state(self.config_path, str(self.config.admin.listen))
        self._notify("READY=1", self.status_line(), f"MAINPID={os.getpid()}")
        if (interval := systemd.watchdog_interval()) is not None:
            self.start_task(self._watchdog(interval))
        if self.config.server.watch_config:
            self.start_task(watch_config(
                self.config_path, self.sha256, lambda: self.enqueue(Event.HUP),
                lambda: self.state == "running" and self.config.server.watch_config))
        self.start_task(self._supervise())

    async def run(self) -> int:
        # Dispatch from the start: a worker that dies while starting is reaped through the
        # queue, and only that ends the wait for its READY before READY_TIMEOUT.
        dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
        try:
            await self.start()
        except RuntimeError as exc:
            log.error("cannot start: %s", exc)
            self.exit_code = EXIT_RUNTIME
            if self.upgrades.inheritance is not None:
                # Workers of a successor may already serve on the shared sockets: they
                # finish what they took, and the old master serves on.
                await self.upgrades.say_failed(str(exc))
                self.state = "starting"
                self.start_task(self.shutdown.terminate())
            else:
                self.shutdown.quit()
        await self.shutdown.stopped.wait()
        dispatcher.cancel()
        return self.exit_code

    def _notify(self, *fields: str) -> None:
        if self.notifying:
            systemd.notify(*fields)

    def status_line(self) -> str:
        return f"STATUS=generation {self.generation}, {len(self.workers.live())} workers"

    async def _watchdog(self, interval: float) -> None:
        while self.notifying:
            self._notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _supervise(self) -> None:
        """Every second: reap (a safety net behind the pidfds: no exit goes unnoticed for
        long; the reconcile after it abandons starts that overran READY_TIMEOUT), and report
        the ready workers that have gone silent."""
        loop = asyncio.get_running_loop()
        while True:
            slept_from = loop.time()
            await asyncio.sleep(SUPERVISE_INTERVAL)
            self.enqueue(Event.CHLD)
            if loop.time() - slept_from > 2 * SUPERVISE_INTERVAL:
                continue  # the master itself was held up: its workers' messages wait unread
            now = time.monotonic()
            for worker in self.workers:
                if worker.state == READY and now - worker.heard_at > HEARTBEAT_TIMEOUT:
                    self.enqueue(Unresponsive(worker))

    # -- the end (shutdown.py) ----------------------------------------------------------------
    async def drain_and_exit(self) -> None:
        await self.shutdown.drain_and_exit()

    def stopping(self) -> None:
        self.state = "stopping"
        self.workers.active = False
        self._notify("STOPPING=1")
        self.upgrades.abandon()  # a new master being started goes too (not one handed over)

    async def release(self) -> None:
        await self.admin.stop()
        if self.health is not None:
            await self.health.close()
        self.sockets.close_all()
        remove_state(self.config_path)
        if self.pid_file:
            remove_pid_file(self.pid_file)
        await self.upgrades.settle(self.config.server.drain_timeout + KILL_GRACE)


def run_master(config_path: str, config: GatewayConfig, pid_file: str | None = None) -> int:
    import uvloop

    inheritance = handover.inherited()
    if inheritance is not None:
        handover.speak_for_self(inheritance)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s proxyd[%(process)d] %(levelname)s %(message)s")
    sha256 = hashlib.sha256(Path(config_path).read_bytes()).hexdigest()

    async def main() -> int:
        master = Master(config_path, config, sha256, pid_file, inheritance)
        return await master.run()

    return uvloop.run(main())
