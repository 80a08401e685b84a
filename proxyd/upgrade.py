"""A code upgrade: a new master from the installed code takes the same sockets over.

Both sides of the protocol live here, as ``Upgrades`` (one per master):

- The predecessor (``upgrade``: SIGUSR2, ``POST /upgrade``) starts a new master with its
  descriptors (handover.py) and waits for its ``ready``: every worker of the new master READY
  on the same sockets. Only then does it commit: systemd's MAINPID names the new master, the
  caller gets its answer, the admin port goes quiet here, ``take_over`` (with the upgrade
  history) goes to the new master, and this one drains its workers and exits. A successor that
  exits, says ``failed`` or is not ready within UPGRADE_TIMEOUT is stopped (its workers drain
  what they took) and the predecessor serves on, the failure recorded like any other.
- The successor (``adopt``, then ``take_over`` once its workers are READY) checks whatever
  could still fail before it says ``ready`` (the admin port's address, the pid file), so that
  nothing it does after the predecessor has let go can fail for a reason known in advance.

The master is seen through ``UpgradeHost``, never its internals. Once committed, a hand-over is
finished whatever the predecessor is told meanwhile (TERM, INT, QUIT stop its own workers,
never the master that is now the service). The protocol as a whole: docs/architecture.md,
"Upgrading the code".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from proxyd import __version__, handover
from proxyd.admin import admin_socket
from proxyd.config.models import Admin
from proxyd.config.types import HostPort
from proxyd.control import Channel
from proxyd.master_api import UpgradeResult
from proxyd.runtime import stage_pid_file
from proxyd.sockets import SocketSet

log = logging.getLogger("proxyd.master")

# The successor parses its config (bounded by the loader's own limits) and starts its workers
# (READY_TIMEOUT each, in parallel): past this, it is given up.
UPGRADE_TIMEOUT = 90.0
HISTORY = 20  # upgrades remembered in /status
# The caller's answer leaves before the admin port goes quiet here (its socket stays open in
# the new master: connections made meanwhile wait in its queue).
ANSWER_GRACE = 0.05


@dataclass
class UpgradeHistory:
    """Every upgrade this service has gone through, passed on from master to master."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})

    def record(self, entry: dict[str, Any]) -> None:
        self.entries = [*self.entries, entry][-HISTORY:]
        self.counts["ok" if entry["ok"] else "failed"] += 1

    def describe(self) -> dict[str, Any]:
        return {"ok": self.counts["ok"], "failed": self.counts["failed"],
                "last": self.entries[-1] if self.entries else None,
                "history": self.entries}

    def encode(self) -> dict[str, Any]:
        return {"entries": self.entries, "counts": self.counts}

    @classmethod
    def decode(cls, data: Any) -> UpgradeHistory:
        if not isinstance(data, dict):
            return cls()
        return cls(list(data.get("entries", [])),
                   {"ok": int(data.get("counts", {}).get("ok", 0)),
                    "failed": int(data.get("counts", {}).get("failed", 0))})


class UpgradeHost(Protocol):
    """What an upgrade needs of its master (master.py implements it)."""

    @property
    def config_path(self) -> str: ...

    @property
    def pid_file(self) -> str | None: ...

    @property
    def state(self) -> str: ...

    def handed_sockets(self) -> tuple[handover.Named, socket.socket | None]:
        """The listening sockets and the admin port's socket: what a successor inherits."""
        ...

    def child_exited(self) -> None: ...

    def start_task(self, coro: Coroutine[Any, Any, Any]) -> None: ...

    def step_down(self, successor_pid: int) -> None:
        """The successor is the service from now on: systemd follows it, and this master
        stops reconciling."""
        ...

    async def quiet_admin(self) -> None: ...

    async def drain_and_exit(self) -> None: ...

    async def serve_admin(self, sock: socket.socket) -> None:
        """The successor, handed over to: serve the admin port, speak to systemd."""
        ...


class Upgrades:
    """This master's part in code upgrades: as the predecessor of a new master, or as the
    successor of the one that started it (``inheritance``), and the history of both."""

    def __init__(self, host: UpgradeHost, registry: CollectorRegistry,
                 inheritance: handover.Inheritance | None) -> None:
        self.host = host
        self.inheritance = inheritance
        self.history = UpgradeHistory()
        self.counter = Counter("gateway_upgrades", "Code upgrades by result", ["result"],
                               registry=registry)
        self.successor: handover.Successor | None = None  # a master this one is starting
        self.handing_over: asyncio.Task[None] | None = None
        self.channel: Channel | None = None  # to the predecessor, until it has handed over

    # -- the predecessor's side ---------------------------------------------------------------
    async def upgrade(self) -> UpgradeResult:
        """Start a new master from the installed code; commit once its workers are READY.
        (The master holds its reload lock: one reload, resize or upgrade at a time.)"""
        host = self.host
        log.info("upgrade: starting a new master from the installed code")
        exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        listeners, admin = host.handed_sockets()
        try:
            successor = self.successor = await handover.spawn(
                host.config_path, host.pid_file, listeners, admin, exited)
        except OSError as exc:
            return self._done(False, f"cannot start a new master: {exc}", None)
        handover.watch_exit(successor.pid, host.child_exited)
        answer = await handover.wait_ready(successor, UPGRADE_TIMEOUT)
        if isinstance(answer, str) or host.state != "running":
            handover.stop(successor)
            why = answer if isinstance(answer, str) else f"{host.state} meanwhile"
            return self._done(False, why, None)
        result = self._done(True, None, answer)
        host.step_down(successor.pid)
        self.handing_over = asyncio.get_running_loop().create_task(self._hand_over(successor))
        host.start_task(self._leave_after(self.handing_over))
        return result

    def _done(self, ok: bool, error: str | None,
              answer: dict[str, Any] | None) -> UpgradeResult:
        to_pid = int(answer["pid"]) if answer else None
        to_version = str(answer["version"]) if answer else None
        record = {"ok": ok, "error": error, "at": time.time(), "from_pid": os.getpid(),
                  "from_version": __version__, "to_pid": to_pid, "to_version": to_version}
        self.history.record(record)
        self.counter.labels("ok" if ok else "failed").inc()
        if ok:
            log.info("upgrade: the new master %s (proxyd %s) is ready; handing over", to_pid,
                     to_version)
        else:
            log.error("upgrade failed, this master keeps serving: %s", error)
        return UpgradeResult(ok, error, to_pid, to_version)

    async def _hand_over(self, successor: handover.Successor) -> None:
        await asyncio.sleep(ANSWER_GRACE)
        await self.host.quiet_admin()
        await successor.channel.send_and_flush(
            {"type": "take_over", "upgrades": self.history.encode()})
        successor.channel.close()

    async def _leave_after(self, hand_over: asyncio.Task[None]) -> None:
        try:
            await hand_over
        except Exception:  # a bug: the new master is the service all the same
            log.exception("upgrade: the hand-over failed")
        await self.host.drain_and_exit()

    def child_exited(self, pid: int, code: int) -> None:
        successor = self.successor
        if successor is not None and successor.pid == pid and not successor.exited.done():
            successor.exited.set_result(code)

    def abandon(self) -> None:
        """This master is stopping: a successor still starting is stopped at once (one that
        has been handed over to is the service, and is left alone)."""
        if self.successor is not None and self.handing_over is None:
            handover.stop(self.successor)

    async def settle(self, limit: float) -> None:
        """Before this master exits: a committed hand-over is completed (the new master is
        the service and must hear ``take_over``); a successor still starting is stopped, and
        waited for up to ``limit`` (it drains what its workers took), so that nothing of the
        service outlives its stop."""
        if self.handing_over is not None:
            with contextlib.suppress(Exception):  # logged where it is awaited first
                await asyncio.shield(self.handing_over)
            return
        successor = self.successor
        if successor is None or successor.exited.done():
            return
        handover.stop(successor)
        try:
            await asyncio.wait_for(asyncio.shield(successor.exited), limit)
        except TimeoutError:
            log.warning("the new master %d did not stop in time; killing it", successor.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(successor.pid, signal.SIGKILL)

    # -- the successor's side -----------------------------------------------------------------
    async def adopt(self, sockets: SocketSet, listeners: Sequence[HostPort]) -> None:
        """Open the channel to the predecessor; take the sockets this config still names."""
        inheritance = self.inheritance
        assert inheritance is not None
        self.channel = await Channel.open(inheritance.channel)
        handover.adopt_sockets(inheritance, sockets, listeners)

    async def take_over(self, admin: Admin) -> None:
        """Every worker is READY: check what could still fail, say ``ready``, wait for the
        predecessor to let go, then serve the admin port and write the pid file."""
        inheritance, channel = self.inheritance, self.channel
        assert inheritance is not None and channel is not None
        try:
            sock = admin_socket(admin, inheritance.admin)
            staged = stage_pid_file(self.host.pid_file) if self.host.pid_file else None
        except OSError as exc:
            raise RuntimeError(f"cannot take over: {exc}") from exc
        await channel.send_and_flush({"type": "ready", "pid": os.getpid(),
                                      "version": __version__})
        try:
            message = await asyncio.wait_for(channel.receive(), UPGRADE_TIMEOUT)
        except TimeoutError:
            message = None
        channel.close()
        self.channel = None
        if message is None or message.get("type") != "take_over":
            sock.close()
            if staged is not None:
                staged.unlink(missing_ok=True)
            raise RuntimeError("the old master did not hand over")
        self.history = UpgradeHistory.decode(message.get("upgrades"))
        for result, count in self.history.counts.items():
            self.counter.labels(result).inc(count)
        handover.take_over_watchdog(inheritance)
        await self.host.serve_admin(sock)
        if staged is not None and self.host.pid_file:
            staged.replace(self.host.pid_file)
        log.info("took over from master %d (proxyd %s)", inheritance.from_pid,
                 inheritance.from_version)

    async def say_failed(self, error: str) -> None:
        """The successor cannot start: the predecessor serves on (and quotes ``error``)."""
        if self.channel is not None:
            with contextlib.suppress(OSError):
                await self.channel.send_and_flush({"type": "failed", "error": error})
            self.channel.close()
            self.channel = None
