"""The arbiter's core: owns sockets and config, forks workers, never serves traffic.

Signal handlers only enqueue; ``run`` dispatches each to ``handle_<name>()``, which the Master
(master.py) defines: reload, resize, recycling, crash recovery and shutdown. This core forks a
worker on a slot, follows its control channel, learns of its exit or of its silence (no
message for HEARTBEAT_TIMEOUT: a stopped or hung worker), and replaces it (``replace``: fork the
successor on the same slot, wait for its READY, then tell the predecessor to drain;
one that has gone silent cannot drain and is killed); ``start`` brings the first generation up.
The protocol as a whole: docs/architecture.md, "Reload, recycling and crash recovery".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Info

from proxyd import __version__, build, systemd
from proxyd.config.models import GatewayConfig
from proxyd.control import Channel
from proxyd.cpus import worker_choice
from proxyd.errors import EXIT_RUNTIME
from proxyd.fdlimit import limit_warnings, raise_nofile_limit
from proxyd.observe.metrics import MasterMetrics
from proxyd.purge import Purges
from proxyd.runtime import write_state
from proxyd.sockets import SocketSet

# Imported by the master, before any fork: every worker runs the code the master loaded (an
# edit on disk cannot reach a new generation halfway), and forked workers share these pages.
from proxyd.worker import STATS_INTERVAL, child_main, prepare_child

log = logging.getLogger("proxyd.master")

READY_TIMEOUT = 30.0  # a new worker that is not READY by then is a failed reload
KILL_GRACE = 5.0  # beyond drain_timeout, before a draining worker is killed
# A worker's stats push is its heartbeat. Silent this long (five pushes missed: far beyond a
# busy loop's jitter, short enough that a stopped worker's share of new connections does not
# wait long), it is marked unresponsive and replaced.
HEARTBEAT_TIMEOUT = 5 * STATS_INTERVAL
SUPERVISE_INTERVAL = 1.0  # seconds between the master's checks of its children
SIGNALS = {
    signal.SIGHUP: "hup", signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
    signal.SIGUSR1: "usr1", signal.SIGTTIN: "ttin", signal.SIGTTOU: "ttou",
}


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class WorkerHandle:
    pid: int
    slot: int
    generation: int
    config: GatewayConfig
    started_at: float = field(default_factory=time.time)
    # starting → ready (⇄ unresponsive) → draining; removed when reaped
    state: str = "starting"
    requests: int = 0
    connections: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    ejected: list[list[str]] = field(default_factory=list)  # [upstream, target] it ejected
    channel: Channel | None = None
    ready: asyncio.Future[bool] = field(default_factory=lambda: _future())
    exited: asyncio.Future[int] = field(default_factory=lambda: _future())
    heard_at: float = field(default_factory=time.monotonic)  # its last control message

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "slot": self.slot, "generation": self.generation,
                "started_at": self.started_at, "requests": self.requests,
                "connections": self.connections, "state": self.state, "cache": self.cache}


class Arbiter:
    """The state of the master and its workers; the handlers are Master's (master.py)."""

    def __init__(self, config_path: str, config: GatewayConfig, sha256: str) -> None:
        self.config_path = config_path
        self.config = config
        self.sha256 = sha256
        self.loaded_at = time.time()
        self.generation = 1
        self.worker_count, self.workers_reason = worker_choice(config.server.workers)
        self.workers: dict[int, WorkerHandle] = {}
        self.sockets = SocketSet()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.state = "starting"
        self.last_reload: dict[str, Any] = {"ok": None, "error": None, "at": None}
        self.reload_counts = {"ok": 0, "failed": 0}
        self.worker_restarts = 0
        self.workers_unresponsive = 0
        self.crashes: dict[int, list[float]] = {}
        self.purges = Purges()  # admin purges waiting for the workers' counts
        self.exit_code = 0
        self.admin: Any = None
        self.health: Any = None  # proxyd.proxy.health.HealthChecker, from start()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self.metrics = MasterMetrics()
        self.registry = CollectorRegistry()
        self.registry.register(self.metrics)
        Info("gateway_build", "proxyd build", registry=self.registry).info(
            {"version": __version__})
        self._shutting_down = False

    if TYPE_CHECKING:
        def handle_quit(self) -> None: ...

    # -- plumbing ---------------------------------------------------------------------------
    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def enqueue(self, name: str, arg: Any = None) -> None:
        self.queue.put_nowait((name, arg))

    def live(self, generation: int | None = None) -> list[WorkerHandle]:
        return [w for w in self.workers.values()
                if w.state != "draining" and (generation is None or w.generation == generation)]

    def broadcast(self, message: dict[str, Any]) -> int:
        """Send a control message to every live worker; how many got it."""
        sent = 0
        for handle in self.live():
            if handle.channel is not None:
                handle.channel.send(message)
                sent += 1
        return sent

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__, "build": build(), "pid": os.getpid(), "state": self.state,
            "config": {"path": self.config_path, "sha256": self.sha256},
            "generation": self.generation, "loaded_at": self.loaded_at,
            "last_reload": self.last_reload, "reloads": self.reload_counts,
            "worker_count": self.worker_count, "workers_reason": self.workers_reason,
            "worker_restarts": self.worker_restarts,
            "workers_unresponsive": self.workers_unresponsive,
            "workers": [w.describe() for w in sorted(self.workers.values(),
                                                       key=lambda w: (w.slot, w.generation))],
            "listeners": self.sockets.describe(),
            "upstreams": self._upstreams_status(),
        }

    def _upstreams_status(self) -> dict[str, Any]:
        """Per target of every upstream: the active check's results (``checked`` false and
        ``healthy`` null without one), next to passive outlier detection: which of the live
        workers eject it now (each ejects on its own failures)."""
        active = self.health.describe() if self.health is not None else {}
        live = [w for w in self.live() if w.state != "starting"]
        result: dict[str, Any] = {}
        for name, upstream in self.config.upstreams.items():
            result[name] = {}
            for target in upstream.targets:
                state = active.get(name, {}).get(target.url) or {}
                if not state.get("checked"):  # no active check: nothing it could say
                    state = {"checked": False, "healthy": None}
                result[name][target.url] = {
                    **state, "outlier_detection": upstream.outlier_detection.enabled,
                    "ejected_by_workers": 0, "ejected_slots": [], "workers": len(live)}
        for handle in live:
            for name, url in handle.ejected:
                target = result.get(name, {}).get(url)
                if target is not None:
                    target["ejected_by_workers"] += 1
                    target["ejected_slots"].append(handle.slot)
        return result

    def push_health(self) -> None:
        if self.health is not None:
            self.broadcast(self.health.message())

    def is_ready(self) -> bool:
        """Running, and every slot has a current worker that is ready (an unresponsive one
        does not count: the connections its socket takes wait unanswered)."""
        if self.state != "running":
            return False
        ready_slots = {w.slot for w in self.live(self.generation) if w.state == "ready"}
        return ready_slots >= set(range(self.worker_count))

    # -- forking ----------------------------------------------------------------------------
    def spawn(self, slot: int, config: GatewayConfig, generation: int) -> WorkerHandle:
        socks = self.sockets.for_slot(config.server.listen, slot)
        ours, theirs = socket.socketpair()
        server = config.server
        max_requests = server.max_requests
        if max_requests:
            max_requests += random.randint(0, server.max_requests_jitter)
        # Until the child has dropped the master's handlers, a signal sent to it would be
        # written to the signal wakeup fd it shares with the master, and the master would act
        # on it as its own (a SIGQUIT to a starting worker → the master quits again, ...).
        # Blocked across fork, such a signal waits in the child for its default action.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:  # child: never returns
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                prepare_child({theirs.fileno(), *(s.fileno() for s in socks)})
                code = child_main(config, socks, theirs, slot=slot, generation=generation,
                                  max_requests=max_requests)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        handle = WorkerHandle(pid=pid, slot=slot, generation=generation, config=config)
        self.workers[pid] = handle
        self._watch_exit(handle)
        self._spawn_task(self._follow(handle, ours))
        log.info("worker %d started (slot %d, generation %d)", pid, slot, generation)
        return handle

    def _watch_exit(self, handle: WorkerHandle) -> None:
        """Learn of a worker's exit at once through a pidfd (uvloop keeps SIGCHLD to itself)."""
        try:
            pidfd = os.pidfd_open(handle.pid)
        except (AttributeError, OSError):
            return  # no pidfd: the periodic poll reaps it
        loop = asyncio.get_running_loop()

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self.enqueue("chld")

        loop.add_reader(pidfd, readable)

    async def _follow(self, handle: WorkerHandle, sock: socket.socket) -> None:
        """Read one worker's control messages until it goes away."""
        channel = handle.channel = await Channel.open(sock)
        while (message := await channel.receive()) is not None:
            handle.heard_at = time.monotonic()
            if handle.state == "unresponsive":
                # It was only slow (or stopped and continued): its successor, already on the
                # way, still takes over, and it drains like any predecessor.
                handle.state = "ready"
                log.warning("worker %d responds again", handle.pid)
            kind = message.get("type")
            if kind == "ready":
                if handle.state == "starting":
                    handle.state = "ready"
                if not handle.ready.done():
                    handle.ready.set_result(True)
                if self.health is not None:
                    channel.send(self.health.message())  # what the checks know so far
                # The live count (SIGTTIN/SIGTTOU change it), for what workers share by it; a
                # reload's new generation runs with its config's count, which it has.
                if handle.generation == self.generation:
                    channel.send({"type": "workers", "count": self.worker_count})
            elif kind == "stats":
                handle.requests = int(message.get("requests", 0))
                handle.connections = int(message.get("connections", 0))
                handle.cache = message.get("cache", {})
                handle.ejected = message.get("ejected", [])
                if "metrics" in message:
                    self.metrics.update(handle.pid, message["metrics"], handle.slot)
            elif kind == "retire":
                self.enqueue("retire", handle)
            elif kind == "purged":
                self.purges.answered(handle.pid, message)
            elif kind == "invalidate":  # keys one worker's memory cache invalidated
                for other in self.live():
                    if other is not handle and other.channel is not None:
                        other.channel.send(message)
        channel.close()
        # The channel ends after the worker's final stats: fold its counters into the totals
        # of retired workers, so sums never go backwards across recycling or crashes.
        self.metrics.worker_exited(handle.pid)

    async def wait_ready(self, handles: list[WorkerHandle], timeout: float) -> bool:
        async def one(h: WorkerHandle) -> bool:
            either: set[asyncio.Future[Any]] = {h.ready, h.exited}
            done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            return h.ready in done and h.ready.result()

        try:
            async with asyncio.timeout(timeout):
                results = await asyncio.gather(*(one(h) for h in handles))
        except TimeoutError:
            return False
        return all(results)

    def drain(self, handle: WorkerHandle) -> None:
        if handle.state == "draining" or handle.exited.done():
            return
        if handle.state == "unresponsive":
            # It would not read a drain message nor act on SIGTERM (a stopped process keeps
            # even that pending): what it holds is lost either way, and its slot is covered.
            handle.state = "draining"
            log.warning("killing unresponsive worker %d", handle.pid)
            self._kill(handle, signal.SIGKILL)
            return
        handle.state = "draining"
        if handle.channel is not None:
            handle.channel.send({"type": "drain"})
        else:
            self._kill(handle, signal.SIGTERM)
        limit = handle.config.server.drain_timeout + KILL_GRACE
        asyncio.get_running_loop().call_later(limit, self._kill_if_alive, handle)

    def _kill(self, handle: WorkerHandle, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, sig)

    def _kill_if_alive(self, handle: WorkerHandle) -> None:
        if not handle.exited.done():
            log.warning("worker %d did not drain in time; killing it", handle.pid)
            self._kill(handle, signal.SIGKILL)

    async def replace(self, slot: int, old: WorkerHandle | None) -> bool:
        """Fork a successor on ``slot``, wait for READY, then drain ``old``."""
        new = self.spawn(slot, self.config, self.generation)
        if await self.wait_ready([new], READY_TIMEOUT):
            if old is not None:
                self.drain(old)
            return True
        log.error("replacement worker %d for slot %d never became ready", new.pid, slot)
        self._abandon(new)
        return False

    def _abandon(self, handle: WorkerHandle) -> None:
        """Kill a worker that never became ready; its exit is expected, not a crash."""
        handle.state = "draining"
        self._kill(handle, signal.SIGKILL)

    # -- main loop --------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sig, name in SIGNALS.items():
            loop.add_signal_handler(sig, self.enqueue, name)
        nofile = raise_nofile_limit()
        for warning in limit_warnings(self.config, nofile, self.worker_count):
            log.warning("%s", warning)
        server = self.config.server
        self.sockets.ensure(server.listen, self.worker_count, server.backlog)
        from proxyd.admin import AdminServer

        self.admin = AdminServer(self)  # type: ignore[arg-type]  # self is the Master
        await self.admin.start(self.config.admin)
        from proxyd.proxy.health import HealthChecker

        self.health = HealthChecker(self.push_health)  # active checks: once, here
        self.health.configure(self.config)
        if self.state != "starting":
            return  # TERM, INT or QUIT while starting: already on the way out
        handles = [self.spawn(slot, self.config, self.generation)
                   for slot in range(self.worker_count)]
        ready = await self.wait_ready(handles, READY_TIMEOUT)
        if self.state != "starting":
            return  # TERM, INT or QUIT while starting: already on the way out
        if not ready:
            raise RuntimeError("workers failed to start")
        self.state = "running"
        log.info("proxyd %s ready: %d workers (%s), listening on %s (nofile %d)", __version__,
                 self.worker_count, self.workers_reason,
                 ", ".join(str(a) for a in server.listen), nofile)
        write_state(self.config_path, str(self.config.admin.listen))
        systemd.notify("READY=1", self._status_line(), f"MAINPID={os.getpid()}")
        if (interval := systemd.watchdog_interval()) is not None:
            self._spawn_task(self._watchdog(interval))
        if self.config.server.watch_config:
            from proxyd.watch import watch_config
            self._spawn_task(watch_config(self))  # type: ignore[arg-type]  # self is the Master
        self._spawn_task(self._supervise())

    async def run(self) -> int:
        # Dispatch from the start: a worker that dies while starting is reaped through the
        # queue, and only that ends the wait for its READY before READY_TIMEOUT.
        dispatcher = self._spawn_task(self._dispatch())
        try:
            await self.start()
        except RuntimeError as exc:
            log.error("cannot start: %s", exc)
            self.exit_code = EXIT_RUNTIME
            self.handle_quit()
        await self._stopped.wait()
        dispatcher.cancel()
        return self.exit_code

    async def _dispatch(self) -> None:
        while True:
            name, arg = await self.queue.get()
            handler = getattr(self, f"handle_{name}")
            try:
                result = handler(arg) if arg is not None else handler()
                if asyncio.iscoroutine(result):
                    # Long handlers (drain and stop) run beside the queue: the exits they
                    # wait for arrive through it.
                    self._spawn_task(result)
            except Exception:
                log.exception("error handling %s", name)

    def _status_line(self) -> str:
        return f"STATUS=generation {self.generation}, {len(self.live())} workers"

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _supervise(self) -> None:
        """Every second: reap (a safety net behind the pidfds: no exit goes unnoticed for
        long), and report the ready workers that have gone silent (to handle_unresponsive)."""
        loop = asyncio.get_running_loop()
        while True:
            slept_from = loop.time()
            await asyncio.sleep(SUPERVISE_INTERVAL)
            self.enqueue("chld")
            if loop.time() - slept_from > 2 * SUPERVISE_INTERVAL:
                continue  # the master itself was held up: its workers' messages wait unread
            now = time.monotonic()
            for handle in list(self.workers.values()):
                if handle.state == "ready" and now - handle.heard_at > HEARTBEAT_TIMEOUT:
                    self.enqueue("unresponsive", handle)
