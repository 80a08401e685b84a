"""How a master ends: drained, at once, or after handing over; and that it ends once.

- TERM (``terminate``): every worker is told to drain (it answers what it accepted, within
  drain_timeout, then leaves), and the master's copies of the listening sockets close at once,
  so that the port refuses new connections once the workers stop accepting.
- INT, QUIT or a second TERM (``quit``): every worker gets SIGQUIT (it leaves without
  draining), and SIGKILL if it is still there QUIT_GRACE later.
- After a code upgrade's hand-over (``drain_and_exit``, from upgrade.py): drained as on TERM;
  the new master is the service now.

However many of these are taken (TERM, then QUIT), the master lets go of what it holds once
(``Ending.release``: admin port, health checks, sockets, state and pid files, a new master it
was starting), and then ``stopped`` is set: the master's run is over. The protocol as a whole:
docs/architecture.md, "Reload, recycling and crash recovery" and "Upgrading the code".
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, Protocol

from proxyd.sockets import SocketSet
from proxyd.workers import WorkerSet

log = logging.getLogger("proxyd.master")

QUIT_GRACE = 2.0  # seconds a worker told to quit has before it is killed


class Ending(Protocol):
    """What ending needs of its master (master.py implements it)."""

    @property
    def state(self) -> str: ...

    def stopping(self) -> None:
        """From now on the master is stopping: it says so and starts nothing new."""
        ...

    async def release(self) -> None:
        """Let go of everything the master holds."""
        ...

    def start_task(self, coro: Coroutine[Any, Any, Any]) -> None: ...


class Shutdown:
    """The ways one master ends (one per master)."""

    def __init__(self, master: Ending, workers: WorkerSet, sockets: SocketSet) -> None:
        self.master = master
        self.workers = workers
        self.sockets = sockets  # the master's copies of the listening sockets
        self.stopped = asyncio.Event()  # everything let go of
        self._ended = False

    async def terminate(self) -> None:
        """TERM: drain, then end; a second TERM ends at once."""
        if self.master.state == "stopping":
            self.quit()
            return
        self.master.stopping()
        log.info("graceful shutdown")
        await self.drain_and_exit()

    async def drain_and_exit(self) -> None:
        workers = list(self.workers)
        log.info("draining %d workers", len(workers))
        for worker in workers:
            worker.drain()
        # Each worker's close is then the last (after an upgrade, the new master's copies
        # are): the port refuses new connections as soon as the workers stop accepting,
        # instead of queueing them until the drain ends, then resetting them.
        self.sockets.close_all()
        if workers:
            await asyncio.wait([w.exited for w in workers])
        await self._end()

    def quit(self) -> None:
        """INT, QUIT: every worker leaves at once."""
        self.master.stopping()
        for worker in self.workers:
            worker.kill(signal.SIGQUIT)
        self.master.start_task(self._end_after_quit())

    async def _end_after_quit(self) -> None:
        workers = [w for w in self.workers if not w.exited.done()]
        if workers:
            await asyncio.wait([w.exited for w in workers], timeout=QUIT_GRACE)
            for worker in workers:
                if not worker.exited.done():
                    worker.kill(signal.SIGKILL)
        await self._end()

    async def _end(self) -> None:
        if self._ended:
            return  # TERM then QUIT both end here; the master lets go once
        self._ended = True
        await self.master.release()
        log.info("proxyd stopped")
        self.stopped.set()
