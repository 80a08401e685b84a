"""One forked worker as the master sees it: the process, its control channel and its verbs.

``WorkerProcess.spawn`` forks a worker on a slot; the object then follows the worker's control
channel, learns of its exit (a pidfd), and is told what to do: ``drain`` (finish and leave),
``kill``, ``abandon`` (a worker that never became ready). It decides nothing about which
workers should exist: that is the master's reconcile step (reconcile.py). What it hears that
concerns others (ready, stats, retire, purge answers, invalidations) goes to the master through
``WorkerEvents``. The protocol as a whole: docs/architecture.md, "Reload, recycling and crash
recovery".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from proxyd.config.models import GatewayConfig
from proxyd.control import Channel
from proxyd.reconcile import DRAINING, READY, STARTING, UNRESPONSIVE

# Imported by the master, before any fork: every worker runs the code the master loaded (an
# edit on disk cannot reach a new generation halfway), and forked workers share these pages.
from proxyd.worker import STATS_INTERVAL, child_main, prepare_child, serve

log = logging.getLogger("proxyd.master")

READY_TIMEOUT = 30.0  # a new worker that is not READY by then has failed to start
KILL_GRACE = 5.0  # beyond drain_timeout, before a draining worker is killed
# A worker's stats push is its heartbeat. Silent this long (five pushes missed: far beyond a
# busy loop's jitter, short enough that a stopped worker's share of new connections does not
# wait long), it is marked unresponsive and replaced.
HEARTBEAT_TIMEOUT = 5 * STATS_INTERVAL

_serials = itertools.count(1)


class WorkerEvents(Protocol):
    """What a worker's process tells its master (the master implements it)."""

    def worker_ready(self, worker: WorkerProcess) -> None: ...

    def worker_responsive(self, worker: WorkerProcess) -> None: ...

    def worker_message(self, worker: WorkerProcess, message: dict[str, Any]) -> None: ...

    def worker_gone(self, worker: WorkerProcess) -> None: ...

    def child_exited(self) -> None: ...

    def other_child_exited(self, pid: int, code: int) -> None: ...

    def reconcile_later(self) -> None: ...

    def start_task(self, coro: Coroutine[Any, Any, Any]) -> None: ...


class WorkerProcess:
    """One worker process, from its fork to its reaping."""

    def __init__(self, pid: int, slot: int, generation: int, config: GatewayConfig,
                 events: WorkerEvents) -> None:
        loop = asyncio.get_running_loop()
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.config = config
        self.events = events
        self.serial = next(_serials)  # later spawns are newer, whatever their pids
        self.started_at = time.time()
        self.started = time.monotonic()
        self.state: str = STARTING
        # Why a successor should take over while it still serves: "retire" (max_requests) or
        # "unresponsive" (silent past HEARTBEAT_TIMEOUT, even if it speaks again meanwhile).
        self.replace_reason: str | None = None
        self.requests = 0
        self.connections = 0
        self.cache: dict[str, Any] = {}
        self.ejected: list[list[str]] = []  # [upstream, target] it ejects
        self.channel: Channel | None = None
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.heard_at = time.monotonic()  # its last control message

    # -- birth ------------------------------------------------------------------------------
    @classmethod
    def spawn(cls, slot: int, generation: int, config: GatewayConfig,
              sockets: list[socket.socket], events: WorkerEvents,
              blocked: Iterable[signal.Signals]) -> WorkerProcess:
        """Fork a worker serving ``config`` on ``sockets``; ``blocked``: the master's signals."""
        ours, theirs = socket.socketpair()
        server = config.server
        max_requests = server.max_requests
        if max_requests:
            max_requests += random.randint(0, server.max_requests_jitter)
        # Until the child has dropped the master's handlers, a signal sent to it would be
        # written to the signal wakeup fd it shares with the master, and the master would act
        # on it as its own (a SIGQUIT to a starting worker → the master quits again, ...).
        # Blocked across fork, such a signal waits in the child for its default action.
        blocked = list(blocked)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # child: never returns
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in blocked:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                prepare_child({theirs.fileno(), *(s.fileno() for s in sockets)})
                code = child_main(serve(config, sockets, theirs, slot=slot,
                                        generation=generation, max_requests=max_requests))
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        worker = cls(pid, slot, generation, config, events)
        worker._watch_exit()
        events.start_task(worker._follow(ours))
        log.info("worker %d started (slot %d, generation %d)", pid, slot, generation)
        return worker

    def _watch_exit(self) -> None:
        """Learn of the exit at once through a pidfd (uvloop keeps SIGCHLD to itself)."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            return  # no pidfd: the master's periodic reap finds it
        loop = asyncio.get_running_loop()

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self.events.child_exited()

        loop.add_reader(pidfd, readable)

    async def _follow(self, sock: socket.socket) -> None:
        """Read the worker's control messages until it goes away."""
        channel = self.channel = await Channel.open(sock)
        while (message := await channel.receive()) is not None:
            self.heard_at = time.monotonic()
            if self.state == UNRESPONSIVE:
                # It was only slow (or stopped and continued). Its successor, if one is on the
                # way, still takes over; the master decides (reconcile.py).
                self.state = READY
                log.warning("worker %d responds again", self.pid)
                self.events.worker_responsive(self)
            kind = message.get("type")
            if kind == "ready":
                if self.state == STARTING:
                    self.state = READY
                if not self.ready.done():
                    self.ready.set_result(True)
                self.events.worker_ready(self)
            elif kind == "stats":
                self.requests = int(message.get("requests", 0))
                self.connections = int(message.get("connections", 0))
                self.cache = message.get("cache", {})
                self.ejected = message.get("ejected", [])
                self.events.worker_message(self, message)
            elif kind != "heartbeat":
                self.events.worker_message(self, message)
        channel.close()
        self.events.worker_gone(self)

    # -- verbs ------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> bool:
        if self.channel is None:
            return False
        self.channel.send(message)
        return True

    @property
    def serving(self) -> bool:
        """Not draining, not gone: it takes its share of new connections (or will)."""
        return self.state != DRAINING and not self.exited.done()

    def drain(self) -> None:
        """Stop accepting, finish what it has, exit; killed if that takes too long."""
        if self.state == DRAINING or self.exited.done():
            return
        if self.state == UNRESPONSIVE:
            # It would not read a drain message nor act on SIGTERM (a stopped process keeps
            # even that pending): what it holds is lost either way, and its slot is covered.
            self.state = DRAINING
            log.warning("killing unresponsive worker %d", self.pid)
            self.kill(signal.SIGKILL)
            return
        self.state = DRAINING
        if not self.send({"type": "drain"}):
            self.kill(signal.SIGTERM)
        limit = self.config.server.drain_timeout + KILL_GRACE
        asyncio.get_running_loop().call_later(limit, self._kill_if_alive)

    def abandon(self) -> None:
        """Kill a worker that never became ready; its exit is expected, not a crash."""
        self.state = DRAINING
        self.kill(signal.SIGKILL)

    def kill(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def _kill_if_alive(self) -> None:
        if not self.exited.done():
            log.warning("worker %d did not drain in time; killing it", self.pid)
            self.kill(signal.SIGKILL)

    # -- death ------------------------------------------------------------------------------
    def reaped(self, code: int) -> None:
        """The master's waitpid collected its exit status."""
        if not self.exited.done():
            self.exited.set_result(code)
        if not self.ready.done():
            self.ready.set_result(False)

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "slot": self.slot, "generation": self.generation,
                "started_at": self.started_at, "requests": self.requests,
                "connections": self.connections, "state": self.state, "cache": self.cache}


async def wait_ready(workers: list[WorkerProcess], timeout: float) -> bool:
    """Whether every one of ``workers`` says READY within ``timeout`` (an exit is a no)."""

    async def one(w: WorkerProcess) -> bool:
        either: set[asyncio.Future[Any]] = {w.ready, w.exited}
        done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        return w.ready in done and w.ready.result()

    try:
        async with asyncio.timeout(timeout):
            results = await asyncio.gather(*(one(w) for w in workers))
    except TimeoutError:
        return False
    return all(results)
