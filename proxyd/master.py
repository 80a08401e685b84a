"""The master (arbiter): owns sockets and config, forks workers, never serves traffic.

Signal handlers only enqueue; ``run`` dispatches each to ``handle_<name>()``. Reload,
``max_requests`` recycling and crash recovery share one path (``replace``): fork the successor
on the same slot, wait for its READY, then tell the predecessor to drain (DESIGN §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import resource
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Info

from proxyd import __version__, systemd
from proxyd.config.models import GatewayConfig
from proxyd.control import Channel
from proxyd.errors import EXIT_RUNTIME, ConfigError
from proxyd.observe.metrics import MasterMetrics
from proxyd.sockets import SocketSet

log = logging.getLogger("proxyd.master")

READY_TIMEOUT = 30.0  # a new worker that is not READY by then is a failed reload
KILL_GRACE = 5.0  # beyond drain_timeout, before a draining worker is killed
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
    state: str = "starting"  # starting → ready → draining; removed when reaped
    requests: int = 0
    connections: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    ejected: list[list[str]] = field(default_factory=list)  # [upstream, target] it ejected
    channel: Channel | None = None
    ready: asyncio.Future[bool] = field(default_factory=lambda: _future())
    exited: asyncio.Future[int] = field(default_factory=lambda: _future())

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "slot": self.slot, "generation": self.generation,
                "started_at": self.started_at, "requests": self.requests,
                "connections": self.connections, "state": self.state, "cache": self.cache}


def load_file(path: str) -> tuple[GatewayConfig, str]:
    from proxyd.config import load_config

    data = Path(path).read_bytes()
    return load_config(path), hashlib.sha256(data).hexdigest()


def raise_nofile_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Master:
    def __init__(self, config_path: str, config: GatewayConfig, sha256: str) -> None:
        self.config_path = config_path
        self.config = config
        self.sha256 = sha256
        self.loaded_at = time.time()
        self.generation = 1
        self.worker_count = config.server.worker_count()
        self.workers: dict[int, WorkerHandle] = {}
        self.sockets = SocketSet()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.state = "starting"
        self.last_reload: dict[str, Any] = {"ok": None, "error": None, "at": None}
        self.reload_counts = {"ok": 0, "failed": 0}
        self.worker_restarts = 0
        self.crashes: dict[int, list[float]] = {}
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
            "version": __version__, "pid": os.getpid(), "state": self.state,
            "config": {"path": self.config_path, "sha256": self.sha256},
            "generation": self.generation, "loaded_at": self.loaded_at,
            "last_reload": self.last_reload, "reloads": self.reload_counts,
            "worker_count": self.worker_count, "worker_restarts": self.worker_restarts,
            "workers": [w.describe() for w in sorted(self.workers.values(),
                                                       key=lambda w: (w.slot, w.generation))],
            "listeners": self.sockets.describe(),
            "upstreams": self._upstreams_status(),
        }

    def _upstreams_status(self) -> dict[str, Any]:
        """Active check results per target, and how many workers eject it passively."""
        result = self.health.describe() if self.health is not None else {}
        for handle in self.live():
            for name, url in handle.ejected:
                target = result.get(name, {}).get(url)
                if target is not None:
                    target["ejected_by_workers"] = target.get("ejected_by_workers", 0) + 1
        return result

    def push_health(self) -> None:
        if self.health is not None:
            self.broadcast(self.health.message())

    def is_ready(self) -> bool:
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
                from proxyd.worker import child_main, prepare_child

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
            kind = message.get("type")
            if kind == "ready":
                if handle.state == "starting":
                    handle.state = "ready"
                if not handle.ready.done():
                    handle.ready.set_result(True)
                if self.health is not None:
                    channel.send(self.health.message())  # what the checks know so far
            elif kind == "stats":
                handle.requests = int(message.get("requests", 0))
                handle.connections = int(message.get("connections", 0))
                handle.cache = message.get("cache", {})
                handle.ejected = message.get("ejected", [])
                if "metrics" in message:
                    self.metrics.update(handle.pid, message["metrics"])
            elif kind == "retire":
                self.enqueue("retire", handle)
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
        server = self.config.server
        self.sockets.ensure(server.listen, self.worker_count, server.backlog)
        from proxyd.admin import AdminServer

        self.admin = AdminServer(self)
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
        log.info("proxyd %s ready: %d workers, listening on %s (nofile %d)", __version__,
                 self.worker_count, ", ".join(str(a) for a in server.listen), nofile)
        systemd.notify("READY=1", self._status_line(), f"MAINPID={os.getpid()}")
        if (interval := systemd.watchdog_interval()) is not None:
            self._spawn_task(self._watchdog(interval))
        if self.config.server.watch_config:
            from proxyd.watch import watch_config
            self._spawn_task(watch_config(self))
        self._spawn_task(self._poll_children())

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

    async def _poll_children(self) -> None:
        # A safety net behind the pidfds: no exit goes unnoticed for long.
        while True:
            await asyncio.sleep(1.0)
            self.enqueue("chld")

    # -- signal and event handlers ----------------------------------------------------------
    def handle_hup(self) -> None:
        self._spawn_task(self.reload())

    def handle_reload(self, reply: asyncio.Future[tuple[bool, str | None]]) -> None:
        """POST /reload: the same path as SIGHUP, with the result for the caller."""

        async def run() -> None:
            result = await self.reload()
            if not reply.done():
                reply.set_result(result)

        self._spawn_task(run())

    async def reload(self) -> tuple[bool, str | None]:
        async with self._reload_lock:
            if self.state != "running":
                return False, f"not reloading while {self.state}"
            systemd.reloading()
            try:
                ok, error = await self._reload()
            finally:
                systemd.notify("READY=1", self._status_line())
            self.last_reload = {"ok": ok, "error": error, "at": time.time()}
            self.reload_counts["ok" if ok else "failed"] += 1
            self.metrics.master_counters["gateway_config_reloads_total"][
                ("ok" if ok else "failed",)] = float(self.reload_counts["ok" if ok else "failed"])
            if ok:
                self.metrics.master_gauges[
                    "gateway_config_last_reload_success_timestamp_seconds"] = time.time()
            if ok:
                log.info("reload complete: generation %d", self.generation)
            else:
                log.error("reload failed, old configuration keeps serving: %s", error)
            return ok, error

    async def _reload(self) -> tuple[bool, str | None]:
        try:
            config, sha256 = load_file(self.config_path)
        except ConfigError as exc:
            return False, str(exc)
        except OSError as exc:
            return False, f"{self.config_path}: {exc.strerror or exc}"
        from proxyd.tls import file_issues

        # Certificates are loaded by the new workers; a file that cannot be is caught here,
        # before any of them is forked, and the old ones keep serving.
        if tls_issues := file_issues(config, self.config_path):
            return False, "\n".join(str(issue) for issue in tls_issues)
        count = config.server.worker_count()
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
        self.config, self.sha256, self.generation = config, sha256, generation
        self.worker_count, self.loaded_at = count, time.time()
        if self.admin is not None:
            await self.admin.reconfigure(config.admin)
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

    def handle_ttin(self) -> None:
        self._spawn_task(self._resize(self.worker_count + 1))

    def handle_ttou(self) -> None:
        if self.worker_count > 1:
            self._spawn_task(self._resize(self.worker_count - 1))

    async def _resize(self, count: int) -> None:
        async with self._reload_lock:
            server = self.config.server
            old_count, self.worker_count = self.worker_count, count
            if count > old_count:
                self.sockets.ensure(server.listen, count, server.backlog)
                for slot in range(old_count, count):
                    await self.replace(slot, None)
            else:
                leaving = [w for w in self.live() if w.slot >= count]
                for handle in leaving:
                    self.drain(handle)
                self._close_unused_sockets()
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
