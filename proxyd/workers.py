"""The master's worker processes as a set: forked, reaped, and reconciled with what it wants.

``WorkerSet`` holds every ``WorkerProcess`` (worker_process.py) of one master and what the
master wants of them (``Desired``: a config, a generation, a slot count). ``reconcile`` asks the
pure plan (reconcile.py) what to do about the difference and does it: spawn a missing or
wanted successor, drain what a ready successor covers or what no slot wants any more, abandon a
worker that never became ready, back off a slot whose workers keep failing. The master calls it
from its event loop after anything that may have changed the picture. The protocol as a whole:
docs/architecture.md, "Reload, recycling and crash recovery".
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from proxyd.config.models import GatewayConfig
from proxyd.reconcile import DRAINING, READY, UNRESPONSIVE, plan
from proxyd.sockets import SocketSet
from proxyd.worker_process import READY_TIMEOUT, WorkerEvents, WorkerProcess

log = logging.getLogger("proxyd.master")

CRASH_WINDOW = 60.0  # failures of a slot within this long make its respawns back off
MAX_BACKOFF = 30.0  # seconds, the longest wait before a failing slot is tried again


@dataclass(frozen=True)
class Desired:
    config: GatewayConfig
    generation: int
    count: int  # slots 0..count-1


class WorkerSet:
    def __init__(self, sockets: SocketSet, events: WorkerEvents, desired: Desired,
                 signals: Iterable[signal.Signals]) -> None:
        self.sockets = sockets
        self.events = events
        self.desired = desired
        self.signals = list(signals)  # the master's: blocked across fork
        self.active = False  # reconcile acts only while the master runs
        self.by_pid: dict[int, WorkerProcess] = {}
        self.restarts = 0  # workers that died unexpectedly
        self.unresponsive = 0  # workers marked silent
        self.failures: dict[int, list[float]] = {}  # slot → when its workers failed recently
        self.blocked_until: dict[int, float] = {}  # slot → no respawn before (monotonic)

    def __iter__(self) -> Iterator[WorkerProcess]:
        return iter(list(self.by_pid.values()))

    def __len__(self) -> int:
        return len(self.by_pid)

    def live(self, generation: int | None = None) -> list[WorkerProcess]:
        return [w for w in self.by_pid.values()
                if w.serving and (generation is None or w.generation == generation)]

    def broadcast(self, message: dict[str, Any]) -> int:
        """Send a control message to every live worker; how many got it."""
        return sum(w.send(message) for w in self.live())

    def spawn(self, slot: int, config: GatewayConfig, generation: int) -> WorkerProcess:
        socks = self.sockets.for_slot(config.server.listen, slot)
        worker = WorkerProcess.spawn(slot, generation, config, socks, self.events, self.signals)
        self.by_pid[worker.pid] = worker
        return worker

    def reap(self) -> None:
        """Collect every exited child; a worker's unexpected exit counts against its slot.
        (Children that are not workers are left to whoever spawned them: ``others``.)"""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            worker = self.by_pid.pop(pid, None)
            if worker is None:
                self.events.other_child_exited(pid, code)
                continue
            expected = worker.state == DRAINING or not self.active
            worker.reaped(code)
            if expected:
                log.info("worker %d exited (%d)", pid, code)
                continue
            self.restarts += 1
            log.error("worker %d (slot %d) died unexpectedly: %s", pid, worker.slot,
                      f"exit {code}" if code >= 0 else signal.Signals(-code).name)
            desired = self.desired
            if worker.generation == desired.generation and worker.slot < desired.count:
                self._failed(worker.slot)

    def mark_unresponsive(self, worker: WorkerProcess, silent: float) -> None:
        """A ready worker sent nothing for HEARTBEAT_TIMEOUT (stopped, or its loop blocked)."""
        if worker.state != READY or worker.pid not in self.by_pid:
            return  # it spoke, began draining or exited since the check
        worker.state = UNRESPONSIVE  # not ready: /health/ready answers 503 until replaced
        worker.replace_reason = UNRESPONSIVE
        self.unresponsive += 1
        desired = self.desired
        if self.active and worker.generation == desired.generation and worker.slot < desired.count:
            log.error("worker %d (slot %d) has sent nothing for %.1fs; replacing it",
                      worker.pid, worker.slot, silent)
        else:  # its slot is gone or already taken over (a reload, a resize): only kill it
            log.error("worker %d (slot %d) has sent nothing for %.1fs; killing it",
                      worker.pid, worker.slot, silent)
            worker.drain()

    def reconcile(self) -> None:
        """Spawn, drain, abandon or call off what the plan says (while the master runs)."""
        if not self.active:
            return
        desired = self.desired
        todo = plan(self.by_pid.values(), desired.count, desired.generation,
                    now=time.monotonic(), ready_timeout=READY_TIMEOUT,
                    blocked_until=self.blocked_until)
        for worker in todo.abandon:
            log.error("worker %d for slot %d never became ready", worker.pid, worker.slot)
            worker.abandon()
            self._failed(worker.slot)
        for worker in todo.call_off:
            log.info("worker %d answers again: no successor for it", worker.pid)
            worker.replace_reason = None
        for worker in todo.drain:
            worker.drain()
        for slot in todo.spawn:
            self.spawn(slot, desired.config, desired.generation)
        if todo.drain or todo.abandon:
            self.close_unused_sockets()
        if todo.abandon or todo.call_off:
            self.reconcile()  # their slots, looked at again

    def _failed(self, slot: int) -> None:
        """A worker of the slot died or never started: respawn at once the first time, then
        back off (doubling) while the slot keeps failing."""
        now = time.monotonic()
        recent = [t for t in self.failures.get(slot, []) if now - t < CRASH_WINDOW] + [now]
        self.failures[slot] = recent
        delay = 0.0 if len(recent) <= 1 else min(MAX_BACKOFF, 0.1 * 2 ** (len(recent) - 2))
        current = self.live(self.desired.generation)
        if any(w.slot == slot and w.state == UNRESPONSIVE for w in current):
            log.warning("slot %d has no responsive worker; trying again in %.1fs", slot, delay)
        elif delay:
            log.warning("slot %d crashed %d times in a minute; respawning in %.1fs",
                        slot, len(recent), delay)
        if delay:
            self.blocked_until[slot] = now + delay
            asyncio.get_running_loop().call_later(delay, self.events.reconcile_later)

    def close_unused_sockets(self) -> None:
        """Let go of sockets no serving worker needs, at once, not when their drainers exit.

        A draining worker still holds its copy until it stops accepting; that close is then
        the last, and the socket leaves the SO_REUSEPORT group right away. Kept open here, it
        would stay in the group, taking its share of new connections with nobody accepting,
        then reset them all when the drainer exits.
        """
        desired = self.desired
        wanted = {(listener, slot) for listener in desired.config.server.listen
                  for slot in range(desired.count)}
        for worker in self.live():
            wanted |= {(listener, worker.slot) for listener in worker.config.server.listen}
        for listener, slot in self.sockets.close_unused(wanted):
            log.info("closed listener %s slot %d", listener, slot)
